"""``pipeline maintenance`` on tables left by real killed writers.

Writers are forked and ``SIGKILL``-ed mid-write until the lake holds what a crash
leaves: Parquet files no commit references, a file cut off while being written (still
under its staging name ``part-….parquet#1``), and (on a curated table) a batch appended
without its commit record. Maintenance two hours later (the files are dated back two
hours, the clock of the batch ids moved on) must remove the orphans' bytes and the
invisible rows, keep every version readable, and leave what readers see unchanged;
on the same day it must leave young files alone (they may belong to a writer still
running).
"""

import datetime as dt
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import polars as pl
import pytest
from deltalake import DeltaTable
from polars.testing import assert_frame_equal

from pipeline.maintenance import lake_tables, maintain_lake
from pipeline.resources.lake import BATCH_COLUMN, LakeResource
from pipeline_tests.reliability.conftest import unreferenced_files
from pipeline_tests.reliability.writers import TABLES_BY_NAME, TableSpec, WriterServer

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
BRONZE = TABLES_BY_NAME["bronze/claims"]
CURATED = TABLES_BY_NAME["curated/loan_book"]
MAX_TRIALS = 150


@pytest.fixture(scope="module")
def server() -> Iterator[WriterServer]:
    with WriterServer() as started:
        yield started


def _uncommitted(lake: LakeResource) -> set[str]:
    stored = lake.read("curated", CURATED.table, committed=False)
    return set(stored[BATCH_COLUMN]) - set(lake.commits("curated", CURATED.table)[BATCH_COLUMN])


def _kill_until(server: WriterServer, root: str, spec: TableSpec, work: Path, done) -> int:
    """Kill writers of ``spec`` at random moments until ``done()``; return the trials used."""
    rng = random.Random(f"maintenance:{spec.name}")
    for trial in range(MAX_TRIALS):
        progress = work / f"{spec.table}-{trial}"
        pid = server.spawn(root, spec, trial * 10_000, progress)
        while not progress.exists() or not progress.read_text():
            time.sleep(0.001)
        time.sleep(rng.uniform(0.0, 0.05))
        os.kill(pid, signal.SIGKILL)
        assert server.reap(pid) == (signal.SIGKILL, None)
        if done():
            return trial + 1
    pytest.fail(f"{spec.name}: {MAX_TRIALS} kills left no orphan; nothing to maintain")


_BIG_WRITER = """
import sys
import numpy as np
import polars as pl
from pipeline.resources.lake import LakeResource

n = 4_000_000
x = np.random.default_rng(0).random(n)
frame = pl.DataFrame({"valuation_date": ["2026-09-30"] * n, "x": x})
print("ready", flush=True)
LakeResource(root_uri=sys.argv[1], service_timeout_s=30).overwrite_partition(
    "gold", "loan_loss_summary", frame, {"valuation_date": "2026-09-30"}
)
"""


KILL_ATTEMPTS = 5


def _kill_while_writing_a_file(root: str) -> Path:
    """SIGKILL a writer while its data file is still being written; return that file.

    A writer that finishes before its staging file is seen is tried again (up to
    :data:`KILL_ATTEMPTS` times); never seeing one fails the test rather than skipping it.
    """
    lake = LakeResource(root_uri=root, service_timeout_s=30)
    lake.overwrite_partition(
        "gold",
        "loan_loss_summary",
        pl.DataFrame({"valuation_date": ["2026-09-30"], "x": [0.5]}),
        {"valuation_date": "2026-09-30"},
    )
    folder = Path(lake.table_uri("gold", "loan_loss_summary")) / "valuation_date=2026-09-30"
    for _ in range(KILL_ATTEMPTS):
        staged = _staged_file_of_a_killed_writer(root, folder)
        if staged is not None:
            return staged
    pytest.fail(f"{KILL_ATTEMPTS} writers finished before a file under its staging name was seen")


def _staged_file_of_a_killed_writer(root: str, folder: Path) -> Path | None:
    """Start the big writer, SIGKILL it once a staging file has bytes; ``None`` if too late."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _BIG_WRITER, root],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    staged: list[Path] = []
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        while proc.poll() is None:
            staged = [p for p in folder.glob("*.parquet#*") if p.stat().st_size > 0]
            if staged:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.001)
    finally:
        proc.wait(timeout=120)
    return staged[0] if proc.returncode == -signal.SIGKILL else None


def _age_files(table_dir: Path, hours: float) -> None:
    """Date every data file back: the lake as it is ``hours`` after the crash."""
    then = time.time() - hours * 3600
    for path in table_dir.rglob("*.parquet"):
        if "_delta_log" not in path.parts:
            os.utime(path, (then, then))
    for path in table_dir.rglob("*.parquet#*"):
        os.utime(path, (then, then))


def _every_version_reads(uri: str) -> int:
    latest = DeltaTable(uri).version()
    for version in range(latest + 1):
        DeltaTable(uri, version=version).to_pyarrow_table()
    return latest


def test_maintenance_removes_what_killed_writers_left_and_keeps_every_version(
    tmp_path: Path, server: WriterServer
) -> None:
    root = str(tmp_path / "lake")
    lake = LakeResource(root_uri=root, service_timeout_s=30)
    bronze_dir = Path(lake.table_uri("bronze", BRONZE.table))
    curated_dir = Path(lake.table_uri("curated", CURATED.table))
    _kill_until(server, root, BRONZE, tmp_path, lambda: bool(unreferenced_files(bronze_dir)))
    _kill_until(server, root, CURATED, tmp_path, lambda: bool(_uncommitted(lake)))
    cut_off = _kill_while_writing_a_file(root)  # left under its staging name
    gold_dir = Path(lake.table_uri("gold", "loan_loss_summary"))
    assert cut_off in unreferenced_files(gold_dir)
    orphans = [*unreferenced_files(bronze_dir), *unreferenced_files(curated_dir), cut_off]
    orphan_bytes = sum(p.stat().st_size for p in orphans)
    visible = {
        (layer, table): lake.read(layer, table)
        for layer, table in lake_tables(lake)
        if layer != "ops"
    }
    invisible_rows = (
        lake.read("curated", CURATED.table, committed=False).height
        - visible[("curated", CURATED.table)].height
    )
    assert orphan_bytes > 0 and invisible_rows > 0

    # the same day: nothing a running writer may still own is touched
    same_day = maintain_lake(lake, retention_hours=1)
    assert {p for p in orphans if p.exists()} == set(orphans)
    assert sum(r.bytes_removed for r in same_day) == 0

    # two hours later
    for table_dir in Path(root).glob("*/*"):
        _age_files(table_dir, hours=2)
    later = dt.datetime.now(dt.UTC).replace(tzinfo=None) + dt.timedelta(hours=2)
    reports = {(r.layer, r.table): r for r in maintain_lake(lake, retention_hours=1, now=later)}

    assert not [p for p in orphans if p.exists()], "orphaned files survived maintenance"
    assert unreferenced_files(bronze_dir) == unreferenced_files(curated_dir) == []
    assert unreferenced_files(gold_dir) == []
    removed = sum(r.bytes_removed for r in reports.values())
    assert removed >= orphan_bytes
    assert reports[("curated", CURATED.table)].rows_deleted >= invisible_rows
    print(
        f"maintenance removed {removed} bytes in "
        f"{sum(r.files_removed for r in reports.values())} files (orphans: {len(orphans)} "
        f"files, {orphan_bytes} bytes) and {reports[('curated', CURATED.table)].rows_deleted} "
        "invisible rows"
    )
    for (layer, table), before in visible.items():
        after = lake.read(layer, table)
        assert_frame_equal(after.sort(after.columns), before.sort(before.columns))
        _every_version_reads(lake.table_uri(layer, table))
    stored = lake.read("curated", CURATED.table, committed=False)
    assert stored.height == visible[("curated", CURATED.table)].height
    assert not _uncommitted(lake)


def test_pipeline_maintenance_command_reports_every_table(tmp_path: Path) -> None:
    home = tmp_path / "home"
    lake = LakeResource(root_uri=str(home / "lake"), service_timeout_s=30)
    lake.overwrite_partition(
        "bronze",
        "claims",
        pl.DataFrame({"_partition_key": ["2026-07"], "x": ["1"]}),
        {"_partition_key": "2026-07"},
    )
    lake.append("ops", "landing_rejects", pl.DataFrame({"file": ["claims/x.txt"]}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIPELINE_")}
    done = subprocess.run(
        [str(Path(sys.executable).with_name("pipeline")), "maintenance", "--retention-hours", "1"],
        env={**env, "PIPELINE_HOME": str(home)},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == ["bronze/claims", "ops/landing_rejects"]
    assert "0 invisible rows deleted" in lines[0] and "checkpoint at version" in lines[0]
