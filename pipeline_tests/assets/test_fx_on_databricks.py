"""``COMPUTE=databricks`` for FX training and scoring equals the local path (issue 10, item 2).

Two private copies of the curated demo home train and promote the first two symbols, then
score two held-out days of each: one with ``COMPUTE=local``, one with
``COMPUTE=databricks`` against the loopback fake workspace
(:mod:`pipeline_tests.fakes.databricks_server`) with ``DATABRICKS_WHEEL=build``. The fake
installs the uploaded wheel into a fresh virtual environment and runs
:mod:`pipeline.remote.fx_job` with that environment's Python, so the job imports the
platform from the wheel; it reaches the test's sqlite MLflow store, as a cluster reaches the
workspace's tracking server. Same seeds, same results: the registered challengers' metrics
and the stored evaluations and scores are equal to the last bit.

What this does not prove: that a real cluster resolves the wheel's dependencies, that
``databricks`` / ``databricks-uc`` tracking works from a cluster, or anything about Spark
on Databricks (the job runs in process).
"""

import json
from pathlib import Path

import dagster as dg
import pytest
from databricks.sdk import WorkspaceClient
from databricks.sdk.service import jobs
from polars.testing import assert_frame_equal

from pipeline import keys
from pipeline.remote import fx_job
from pipeline.resources.tracking import (
    DAGSTER_ASSET_TAG,
    DAGSTER_PARTITION_TAG,
    DAGSTER_RUN_TAG,
    TrackingResource,
)
from pipeline.stores.fx import CHALLENGER, CHAMPION
from pipeline_tests.assets.test_databricks_pipes import (
    CLUSTER,
    event_log_text,
    failure_text,
    fast_compute,
    request_text,
)
from pipeline_tests.assets.test_fx_assets import (  # noqa: F401  (module fixture)
    HOLDOUT_DATES,
    UNREVIEWED,
    curated_home,
    restored_mlflow_environment,
)
from pipeline_tests.assets.test_fx_spark import copy_of, materialize_box, scores
from pipeline_tests.fakes.databricks_server import FakeDatabricksWorkspace

SCRIPT = "dbfs:/pipeline/jobs/fx_job.py"
# differ between any two runs by construction, not by result
VOLATILE = ("dagster_run_id", "mlflow_run_id", "evaluated_at")


def test_tracking_settings_carry_no_password_and_rebuild_the_resource() -> None:
    tracking = TrackingResource(
        tracking_uri="databricks", registry_uri="databricks-uc", uc_catalog="c", uc_schema="s"
    )
    settings = fx_job.tracking_settings(tracking)
    assert settings["registry_uri"] == "databricks-uc"
    rebuilt = fx_job.tracking_from(settings)
    assert rebuilt.model_name("EURUSD") == "c.s.fx_spread_eurusd"
    assert rebuilt.experiment_root == ""
    with pytest.raises(fx_job.JobError, match="tracking_uri carries a password"):
        fx_job.tracking_settings(TrackingResource(tracking_uri="https://u:secret@mlflow.example"))
    with pytest.raises(fx_job.JobError, match="no other keys"):
        fx_job.tracking_from({"tracking_uri": "databricks", "token": "x"})
    with pytest.raises(fx_job.JobError, match="not a normalised partition key"):
        fx_job.ticks_file("../EURUSD")


def test_a_wheel_missing_from_dbfs_fails_the_run_as_a_library_error(
    workspace: FakeDatabricksWorkspace, token: str
) -> None:
    client = WorkspaceClient(host=workspace.host, token=token, auth_type="pat")
    missing = "dbfs:/pipeline/wheels/0.1.0/none/pipeline-0.1.0-py3-none-any.whl"
    task = {
        "task_key": "t",
        "existing_cluster_id": CLUSTER,
        "spark_python_task": {"python_file": SCRIPT},
        "libraries": [{"whl": missing}],
    }
    run_id = client.jobs.submit(tasks=[jobs.SubmitTask.from_dict(task)]).run_id
    run = client.jobs.wait_get_run_job_terminated_or_skipped(run_id)
    assert run.state.result_state == jobs.RunResultState.FAILED
    assert f"Library installation failed: {missing} does not exist" in run.state.state_message
    assert workspace.venvs == {}


@pytest.mark.slow
def test_databricks_training_and_scoring_equal_the_local_path(
    curated_home: Path,  # noqa: F811
    tmp_path: Path,
    workspace: FakeDatabricksWorkspace,
    token: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DATABRICKS_HOST", workspace.host)
    monkeypatch.setenv("DATABRICKS_TOKEN", token)
    with restored_mlflow_environment():
        local = copy_of(curated_home, tmp_path / "local")
        remote = copy_of(
            curated_home,
            tmp_path / "remote",
            COMPUTE="databricks",
            DATABRICKS_CLUSTER_ID=CLUSTER,
            DATABRICKS_WHEEL="build",
        )
        remote.resources["compute"] = fast_compute(databricks_wheel="build")
        symbols = list(local.instance.get_dynamic_partitions("symbol"))[:2]
        models = [keys.FX_CHALLENGER_MODEL, keys.FX_CHAMPION_MODEL]
        first = dg.MultiPartitionKey({"symbol": symbols[0], "date": HOLDOUT_DATES[0]})
        last = dg.MultiPartitionKey({"symbol": symbols[1], "date": HOLDOUT_DATES[1]})
        runs = {}
        for name, plat in (("local", local), ("databricks", remote)):
            trained = materialize_box(plat, models, symbols[0], symbols[1])
            assert trained.success, failure_text(trained)
            scored = materialize_box(plat, [keys.FX_ANOMALY_SCORES], first, last)
            assert scored.success, failure_text(scored)
            runs[name] = (trained.run_id, scored.run_id)

        # the challengers: same versions and aliases, same metrics, tagged with the run
        for symbol in symbols:
            name = remote.tracking.model_name(symbol)
            by_path = {}
            for label, plat in (("local", local), ("databricks", remote)):
                client = plat.tracking.client()
                version = client.get_model_version_by_alias(name, CHALLENGER)
                run = client.get_run(version.run_id)
                assert run.data.tags[DAGSTER_RUN_TAG] == runs[label][0]
                assert run.data.tags[DAGSTER_ASSET_TAG] == "models/fx_challenger_model"
                assert run.data.tags[DAGSTER_PARTITION_TAG] == symbol
                assert run.data.tags["symbol"] == symbol
                assert version.tags["dagster_run_id"] == runs[label][0]
                metrics = dict(run.data.metrics)
                assert 0 < metrics.pop("fit_seconds") < 60  # wall time: differs between paths
                champion = client.get_model_version_by_alias(name, CHAMPION).version
                by_path[label] = (version.version, champion, metrics)
            assert by_path["databricks"] == by_path["local"], symbol
            measured = by_path["databricks"][2]
            if symbol == UNREVIEWED:  # label-free gate: no AP, and none logged as NaN
                assert "holdout_average_precision" not in measured
            else:
                assert 0.3 < measured["holdout_average_precision"] <= 1.0
        local_eval, remote_eval = (
            p.lake.read("gold", "fx_model_evaluations").drop(VOLATILE).sort("symbol")
            for p in (local, remote)
        )
        assert remote_eval.height == len(symbols)
        assert_frame_equal(remote_eval, local_eval, check_exact=True)

        # the scores: the same rows; each path records its own Dagster and MLflow runs
        expected, actual = scores(local, symbols), scores(remote, symbols)
        assert expected.height == actual.height > 2 * 2 * 1_000
        assert sorted(actual["date"].unique().to_list()) == list(HOLDOUT_DATES[:2])
        ids = ["dagster_run_id", "mlflow_run_id"]
        assert_frame_equal(actual.drop(ids), expected.drop(ids), check_exact=True)
        assert set(actual["dagster_run_id"]) == {runs["databricks"][1]}

        # one Databricks run per asset run, from the wheel, in a fresh venv
        submits = workspace.calls("jobs/runs/submit")
        assert len(submits) == 2
        (wheel,) = {s.body["tasks"][0]["libraries"][0]["whl"] for s in submits}
        for submit in submits:
            (task,) = submit.body["tasks"]
            assert task["libraries"] == [{"whl": wheel}]
            assert task["spark_python_task"]["python_file"] == SCRIPT
            assert task["existing_cluster_id"] == CLUSTER
        assert workspace.local_path(wheel).is_file()
        uploads = [
            r
            for r in workspace.requests
            if r.endpoint in ("dbfs/put", "dbfs/create") and r.body.get("path") == wheel[5:]
        ]
        assert len(uploads) == 1  # built once per process, found by the second run
        (venv,) = workspace.venvs.values()
        reported = []
        for run in workspace.runs.values():
            assert run.result_state == "SUCCESS", run.stderr[-3000:]
            assert run.python == str(venv / "bin" / "python")
            message = json.loads(run.stdout.strip().splitlines()[-1])
            assert Path(message["pipeline_origin"]).is_relative_to(venv)
            reported.append((message["mode"], message["symbols"]))
        assert reported == [("train", symbols), ("score", symbols)]
        assert not any(p.startswith("/pipeline/runs") for p in workspace.dbfs_files())

        # the token was only ever in the Authorization header
        assert all(request.authorized for request in workspace.requests)
        assert token not in request_text(workspace)
        for run_id in runs["databricks"]:
            assert token not in event_log_text(remote, run_id)
        assert "platform from " + str(venv) in event_log_text(remote, runs["databricks"][0])
        for plat in (local, remote):
            plat.instance.dispose()


def test_evaluations_round_trip_with_nan_and_time() -> None:
    import datetime as dt

    row = {"symbol": "EURUSD", "ap": float("nan"), "evaluated_at": dt.datetime(2026, 9, 30, 1)}
    rows, errors = fx_job.decode_evaluations(fx_job.encode_evaluations([row], {"GBPUSD": "x"}))
    assert rows[0]["evaluated_at"] == row["evaluated_at"]
    assert rows[0]["ap"] != rows[0]["ap"]  # NaN stays NaN
    assert errors == {"GBPUSD": "x"}
