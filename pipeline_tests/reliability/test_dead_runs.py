"""A run killed after its materialisation: detected, failed, and not waited on for ever.

The run worker is a real process killed with ``SIGKILL`` right after the bronze FX day
was materialised (:mod:`pipeline_tests.reliability.dead_run_defs`), on a Dagster
instance written by :func:`pipeline.settings.ensure_dagster_home`. Its run record stays
``STARTED``. The fx_spreads gate waits for it only up to its max runtime, and
``dagster-daemon``'s run monitoring, enabled by the generated ``dagster.yaml``, marks it
failed.
"""

import os
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pytest

from pipeline import automation, keys
from pipeline.resources.lake import LakeResource
from pipeline.settings import ensure_dagster_home, load_settings

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
DEFS = REPO / "pipeline_tests" / "reliability" / "dead_run_defs.py"
HANG_GUARD_S = 300.0


def _dead_run(tmp_path: Path, max_runtime_s: int) -> tuple[Path, str]:
    """A DAGSTER_HOME holding one run whose worker was SIGKILL-ed after materialising."""
    settings = load_settings({"PIPELINE_HOME": str(tmp_path / "home")})
    home = ensure_dagster_home(settings)
    done = subprocess.run(
        [sys.executable, str(DEFS), str(home), str(max_runtime_s)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), "DAGSTER_HOME": str(home)},
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
        check=False,
    )
    assert done.returncode == -9, done.stderr[-2000:]
    with dg.DagsterInstance.from_config(str(home)) as instance:
        (record,) = instance.fetch_materializations(keys.BRONZE_FX_TICKS, limit=1).records
        return home, record.run_id


def test_generated_instance_monitors_runs_without_resuming_them(tmp_path: Path) -> None:
    home = ensure_dagster_home(load_settings({"PIPELINE_HOME": str(tmp_path / "home")}))
    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert instance.run_monitoring_enabled
        settings = instance.run_monitoring_settings
        assert settings["max_resume_run_attempts"] == 0
        assert settings["max_runtime_seconds"] == 21_600
        assert settings["poll_interval_seconds"] == 30
        assert settings["free_slots_after_run_end_seconds"] == 60
        assert instance.run_retries_enabled and instance.run_retries_max_retries == 1


def test_the_fx_spreads_gate_stops_waiting_for_a_dead_run(tmp_path: Path) -> None:
    home, run_id = _dead_run(tmp_path, max_runtime_s=600)
    lake = LakeResource(root_uri=str(tmp_path / "lake"), service_timeout_s=30)
    with dg.DagsterInstance.from_config(str(home)) as instance:
        run = instance.get_run_record_by_id(run_id)
        assert run.dagster_run.status == dg.DagsterRunStatus.STARTED
        (record,) = instance.fetch_materializations(keys.BRONZE_FX_TICKS, limit=1).records
        started = run.start_time

        def tick(now_s: float) -> dg.SensorResult:
            context = dg.build_sensor_context(instance=instance, resources={"lake": lake})
            return automation.evaluate_fx_spreads(context, lake, now_s=now_s)

        # within its max runtime the run may still be going: wait, look again next tick
        status, reason = automation.bronze_gate_status(
            instance, record, automation.BRONZE_FX_GATE, now_s=started + 30
        )
        assert status == "pending", reason
        assert tick(started + 30).cursor is None

        # past max runtime plus a monitoring poll: dead, the gate is closed, the cursor moves on
        late = started + 600 + automation.RUN_MONITORING_GRACE_S + 1
        status, reason = automation.bronze_gate_status(
            instance, record, automation.BRONZE_FX_GATE, now_s=late
        )
        assert status == "failed"
        assert reason.startswith(f"run {run_id} that wrote 2026-09-01 is still STARTED after ")
        assert "beyond its max runtime of 600 s" in reason
        result = tick(late)
        assert not result.run_requests
        assert result.cursor == str(record.storage_id)


def test_run_monitoring_marks_the_dead_run_failed(tmp_path: Path) -> None:
    home, run_id = _dead_run(tmp_path, max_runtime_s=1)
    log = tmp_path / "daemon.log"
    env = {**os.environ, "PYTHONPATH": str(REPO), "DAGSTER_HOME": str(home)}
    with log.open("w") as out:
        daemon = subprocess.Popen(
            [str(Path(sys.executable).with_name("dagster-daemon")), "run", "-f", str(DEFS)],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        with dg.DagsterInstance.from_config(str(home)) as instance:
            deadline = time.monotonic() + HANG_GUARD_S
            # the daemon cancels the over-time run, finds no worker to stop, and fails it
            while not instance.get_run_by_id(run_id).is_finished:
                if daemon.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"run monitoring did not fail run {run_id}:\n{log.read_text()}")
                time.sleep(1.0)
            run = instance.get_run_by_id(run_id)
            assert run.status == dg.DagsterRunStatus.FAILURE
            (record,) = instance.fetch_materializations(keys.BRONZE_FX_TICKS, limit=1).records
            status, reason = automation.bronze_gate_status(
                instance, record, automation.BRONZE_FX_GATE
            )
            assert status == "failed"
            assert reason == (
                f"bronze/fx_ticks:{keys.CHECK_FILE_SCHEMA} did not complete for partition "
                f"2026-09-01 in run {run_id}"
            )
            messages = [entry.message for entry in instance.all_logs(run_id)]
            assert any("maximum runtime of 1 seconds" in m for m in messages), messages[-5:]
    finally:
        daemon.terminate()
        try:
            daemon.wait(timeout=60)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()
