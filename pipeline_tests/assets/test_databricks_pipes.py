"""COMPUTE=databricks end to end: Dagster Pipes against a loopback fake Databricks workspace.

The fake (:mod:`pipeline_tests.fakes.databricks_server`) is a real HTTP server speaking the
Jobs, Clusters and DBFS REST endpoints the Databricks SDK calls; it runs each submitted
``spark_python_task`` as a subprocess that sees the fake DBFS where a cluster sees
``/dbfs``. Nothing in the code under test knows it is a fake: the resource gets
``DATABRICKS_HOST=http://127.0.0.1:<port>`` and a token from the environment.

What is asserted is what a user relies on: the stored summary and loss samples equal the
local backend's bit for bit for the same seed; the workspace was asked for what the docs
say (``runs/submit`` of a ``spark_python_task`` on the configured cluster, the script and
code on DBFS); the token appears in no event, request body, job argument or environment;
a failed run, a crashing script and a wrong token each fail with a message naming the run
or the credential problem.
"""

import base64
import io
import json
import subprocess
import sys
import uuid
from importlib import resources
from pathlib import Path

import dagster as dg
import numpy as np
import polars as pl
import pytest
from databricks.sdk import WorkspaceClient
from databricks.sdk.errors import InvalidParameterValue, NotFound, Unauthenticated
from databricks.sdk.service import jobs
from polars.testing import assert_frame_equal

from pipeline import keys
from pipeline.domain.demo_data import write_demo_landing
from pipeline.domain.loan_loss import LoanArrays, simulate_portfolio_loss
from pipeline.jobs.loan_loss_simulation import simulate_scenario
from pipeline.remote import loan_loss_job
from pipeline.resources.compute import ComputeResource, code_bundle
from pipeline.stores.loan_loss import committed_samples_uri
from pipeline_tests.conftest import Platform, make_platform
from pipeline_tests.fakes.databricks_server import CLUSTER_ID as CLUSTER
from pipeline_tests.fakes.databricks_server import FakeDatabricksWorkspace

VALUATION = "2026-09-30"
LOSS_OP = "__".join(keys.LOAN_LOSS_DISTRIBUTION.path)
N_SIMS = 20_000
LOAN_INPUTS = (
    keys.BRONZE_LOAN_BOOK,
    keys.LOAN_BOOK,
    keys.BRONZE_LOAN_SCENARIOS,
    keys.LOAN_SCENARIOS,
)
# columns that differ between any two runs by construction, not by result
VOLATILE = ("dagster_run_id", "mlflow_run_id", "computed_at", "samples_uri")
SCRIPT = "dbfs:/pipeline/jobs/loan_loss_job.py"


@pytest.fixture
def databricks_env(
    monkeypatch: pytest.MonkeyPatch, workspace: FakeDatabricksWorkspace, token: str
) -> dict[str, str]:
    env = {
        "DATABRICKS_HOST": workspace.host,
        "DATABRICKS_TOKEN": token,
        "DATABRICKS_CLUSTER_ID": CLUSTER,
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


def fast_compute(**overrides: object) -> ComputeResource:
    """The resource ``build_resources`` makes for COMPUTE=databricks, polling every 0.2 s.

    The default 5 s poll interval suits a real workspace; against the fake it would only
    add idle seconds per scenario.
    """
    config: dict[str, object] = {
        "backend": "databricks",
        "databricks_host": dg.EnvVar("DATABRICKS_HOST"),
        "databricks_token": dg.EnvVar("DATABRICKS_TOKEN"),
        "databricks_cluster_id": CLUSTER,  # a plain setting, as build_resources passes it
        "databricks_poll_interval_seconds": 0.2,
        **overrides,
    }
    return ComputeResource(**config)


def platform_with_inputs(home: Path, **env: str) -> Platform:
    """A platform whose lake holds the demo loan book and scenarios of :data:`VALUATION`."""
    platform = make_platform(home, **env)
    write_demo_landing(
        platform.settings.landing_dir, claims_months=(), fx_dates=(), valuation_dates=(VALUATION,)
    )
    ingested = platform.materialize(LOAN_INPUTS, VALUATION)
    assert ingested.success
    return platform


def simulate(platform: Platform) -> dg.ExecuteInProcessResult:
    """Materialise the loss distribution (without its checks: they test the maths, not
    where it ran) with :data:`N_SIMS` simulations."""
    return dg.materialize(
        [*platform.defs.assets, *(platform.defs.asset_checks or [])],
        selection=dg.AssetSelection.assets(keys.LOAN_LOSS_DISTRIBUTION).without_checks(),
        partition_key=VALUATION,
        resources=platform.resources,
        instance=platform.instance,
        raise_on_error=False,
        run_config={"ops": {LOSS_OP: {"config": {"n_sims": N_SIMS}}}},
    )


def stored(platform: Platform) -> tuple[pl.DataFrame, dict[str, np.ndarray]]:
    summary = platform.lake.read("gold", "loan_loss_summary", {"valuation_date": VALUATION})
    uri = committed_samples_uri(platform.lake, VALUATION)
    assert uri is not None, "no committed loss samples"
    with np.load(io.BytesIO(platform.lake.read_bytes(uri))) as npz:
        samples = {name: npz[name] for name in npz.files}
    return summary.drop(*VOLATILE).sort("scenario"), samples


def failure_text(result: dg.ExecuteInProcessResult) -> str:
    """Every step failure with its chain of causes, as a user sees it in the UI."""
    return "\n".join(
        event.step_failure_data.error.to_string()
        for event in result.all_events
        if event.is_step_failure and event.step_failure_data.error is not None
    )


def event_log_text(platform: Platform, run_id: str) -> str:
    """The run's whole event log and stored run record, serialised."""
    records = platform.instance.all_logs(run_id)
    assert records, f"no event records for run {run_id}"
    run = platform.instance.get_run_by_id(run_id)
    return "\n".join(dg.serialize_value(r) for r in [*records, run])


def request_text(workspace: FakeDatabricksWorkspace) -> str:
    """Everything the fake was sent or ran with, base64 payloads decoded."""
    parts = []
    for request in workspace.requests:
        parts.append(json.dumps([request.path, request.query, request.body]))
        body = request.body if isinstance(request.body, dict) else {}
        for key in ("contents", "data"):
            if body.get(key):
                parts.append(base64.b64decode(body[key]).decode("utf-8", errors="replace"))
    for run in workspace.runs.values():
        parts.append(json.dumps([run.argv, run.env, run.stdout, run.stderr]))
    return "\n".join(parts)


# --- the fake speaks the documented protocol ---------------------------------------------


def test_fake_workspace_speaks_documented_dbfs_jobs_and_auth(
    workspace: FakeDatabricksWorkspace, token: str
) -> None:
    client = WorkspaceClient(host=workspace.host, token=token, auth_type="pat")
    payload = bytes(range(256)) * 6_000  # 1.5 MB: more than one put, one block or one read
    client.dbfs.upload("/t/big.bin", io.BytesIO(payload), overwrite=True)
    assert client.dbfs.download("/t/big.bin").read() == payload
    assert [r.endpoint for r in workspace.requests[:5]] == [
        "dbfs/create",
        "dbfs/add-block",
        "dbfs/add-block",
        "dbfs/close",
        "dbfs/get-status",
    ]
    first = client.dbfs.read("/t/big.bin")  # documented default length: 0.5 MB
    assert first.bytes_read == 512 * 1024
    assert base64.b64decode(first.data) == payload[: 512 * 1024]
    tail = client.dbfs.read("/t/big.bin", offset=len(payload) - 10, length=100)
    assert (tail.bytes_read, base64.b64decode(tail.data)) == (10, payload[-10:])
    status = client.dbfs.get_status("/t/big.bin")
    assert (status.is_dir, status.file_size) == (False, len(payload))
    assert [f.path for f in client.dbfs.list("/t")] == ["/t/big.bin"]

    with pytest.raises(NotFound) as missing:
        client.dbfs.get_status("/t/nothing.json")
    assert missing.value.error_code == "RESOURCE_DOES_NOT_EXIST"
    assert workspace.requests[-1].status == 404
    with pytest.raises(InvalidParameterValue, match="does not exist"):
        client.jobs.submit(
            tasks=[
                jobs.SubmitTask.from_dict(
                    {
                        "task_key": "t",
                        "existing_cluster_id": "no-such-cluster",
                        "spark_python_task": {"python_file": SCRIPT},
                    }
                )
            ]
        )
    client.dbfs.delete("/t", recursive=True)
    assert workspace.dbfs_files() == []

    wrong = WorkspaceClient(host=workspace.host, token=f"{token}-not", auth_type="pat")
    with pytest.raises(Unauthenticated):
        wrong.dbfs.get_status("/")
    assert (workspace.requests[-1].authorized, workspace.requests[-1].status) == (False, 401)


def test_job_script_refuses_to_run_outside_dagster_pipes(tmp_path: Path) -> None:
    """Without bootstrap parameters ``open_dagster_pipes`` would return a do-nothing mock."""
    script = resources.files("pipeline.remote").joinpath("loan_loss_job.py")
    done = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin"},
        check=False,
    )
    assert done.returncode != 0
    assert "JobError: not launched by Dagster Pipes" in done.stderr


def test_wire_format_round_trips_exactly_and_rejects_wrong_shapes() -> None:
    rng = np.random.default_rng(3)
    losses = rng.lognormal(10.0, 2.0, size=4_099)
    assert loan_loss_job.decode_losses(loan_loss_job.encode_losses(losses), 4_099).tobytes() == (
        losses.tobytes()
    )
    with pytest.raises(loan_loss_job.JobError, match=r"expected float64 of shape \(4100,\)"):
        loan_loss_job.decode_losses(loan_loss_job.encode_losses(losses), 4_100)
    pd_ = rng.uniform(0.0, 0.2, 7)
    arrays = loan_loss_job.decode_book(
        loan_loss_job.encode_book([f"L{i}" for i in range(7)], pd_, np.ones(7), np.full(7, 0.4))
    )
    assert arrays["pd"].tobytes() == pd_.tobytes()
    assert arrays["loan_id"].tolist() == [f"L{i}" for i in range(7)]


# --- the loan-loss asset on COMPUTE=databricks ------------------------------------------


@pytest.mark.slow
def test_databricks_backend_equals_local_bit_for_bit(
    tmp_path: Path,
    workspace: FakeDatabricksWorkspace,
    databricks_env: dict[str, str],
    token: str,
) -> None:
    local = platform_with_inputs(tmp_path / "local")
    remote = platform_with_inputs(tmp_path / "remote", COMPUTE="databricks")
    remote.resources["compute"] = fast_compute()

    local_result, remote_result = simulate(local), simulate(remote)
    assert local_result.success, failure_text(local_result)
    assert remote_result.success, failure_text(remote_result)

    local_summary, local_samples = stored(local)
    remote_summary, remote_samples = stored(remote)
    assert remote_summary.height == 8
    assert_frame_equal(remote_summary, local_summary, check_exact=True)
    assert sorted(remote_samples) == sorted(local_samples)
    for name, losses in local_samples.items():
        assert losses.shape == (N_SIMS,)
        assert remote_samples[name].dtype == np.float64
        assert remote_samples[name].tobytes() == losses.tobytes(), name
    # the samples are a real simulation, not one array eight times
    assert len({s.tobytes() for s in remote_samples.values()}) == 8
    # the contribution pass ran on the cluster too, over the same chunks: the same floats
    order = ["scenario", "kind", "segment", "rank"]
    remote_contributions, local_contributions = (
        p.lake.read("gold", "loan_loss_contributions", {"valuation_date": VALUATION})
        .drop("dagster_run_id", "mlflow_run_id", "computed_at")
        .sort(order)
        for p in (remote, local)
    )
    assert remote_contributions.height > 8
    assert_frame_equal(remote_contributions, local_contributions, check_exact=True)

    # the workspace was asked for a spark_python_task run of the packaged script per scenario
    submits = workspace.calls("jobs/runs/submit")
    assert len(submits) == 8
    for submit in submits:
        (task,) = submit.body["tasks"]
        assert task["existing_cluster_id"] == CLUSTER
        assert task["spark_python_task"]["python_file"] == SCRIPT
        assert "--dagster-pipes-context" in task["spark_python_task"]["parameters"]
        assert {"pypi": {"package": "polars==" + pl.__version__}} in task["libraries"]
        assert submit.body["run_name"].startswith(f"gold/loan_loss_distribution {VALUATION} m=")
    assert all(run.result_state == "SUCCESS" for run in workspace.runs.values())
    packaged = resources.files("pipeline.remote").joinpath("loan_loss_job.py").read_bytes()
    assert workspace.local_path(SCRIPT).read_bytes() == packaged
    # the domain code ran from the uploaded bundle, not from this checkout
    bundles = [p for p in workspace.dbfs_files() if p.endswith(".zip")]
    assert len(bundles) == 1
    assert workspace.local_path(bundles[0]).read_bytes() == code_bundle()
    for run in workspace.runs.values():
        reported = json.loads(run.stdout.strip().splitlines()[-1])
        assert reported["code_origin"].startswith(str(workspace.local_path(bundles[0])))
        assert reported["engine"] == "local"
    # exchange folders and Pipes temp folders were removed; code stays for the next run
    assert workspace.dbfs_files() == sorted([SCRIPT.removeprefix("dbfs:"), bundles[0]])

    # the token was only ever in the Authorization header
    assert all(request.authorized for request in workspace.requests)
    assert token not in event_log_text(remote, remote_result.run_id)
    assert token not in request_text(workspace)
    assert "Databricks run" in event_log_text(remote, remote_result.run_id)


@pytest.mark.slow
def test_failed_databricks_run_fails_the_asset_naming_the_run(
    tmp_path: Path, workspace: FakeDatabricksWorkspace, databricks_env: dict[str, str]
) -> None:
    platform = platform_with_inputs(tmp_path / "home", COMPUTE="databricks")
    platform.resources["compute"] = fast_compute()
    workspace.fail_runs = "Cluster 0930-120000-fakeclu1 was terminated. Reason: SPOT_INSTANCE_LOST"

    result = simulate(platform)

    assert not result.success
    (run,) = workspace.runs.values()  # the first scenario's failure stops the asset
    message = failure_text(result)
    assert f"Databricks run {run.run_id} (" in message
    assert f"#job/947/run/{run.run_id}" in message
    assert "TERMINATED/FAILED" in message
    assert "SPOT_INSTANCE_LOST" in message
    assert (
        platform.lake.read("gold", "loan_loss_summary", {"valuation_date": VALUATION}).height == 0
    )
    assert [p for p in workspace.dbfs_files() if p.startswith("/pipeline/runs")] == []


@pytest.mark.slow
def test_wrong_token_is_a_clear_authentication_error(
    tmp_path: Path,
    workspace: FakeDatabricksWorkspace,
    databricks_env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Resources exactly as ``build_resources`` makes them from the environment."""
    wrong = f"dapi-wrong-{uuid.uuid4().hex}"
    monkeypatch.setenv("DATABRICKS_TOKEN", wrong)
    platform = platform_with_inputs(tmp_path / "home", COMPUTE="databricks")

    result = simulate(platform)

    assert not result.success
    message = failure_text(result)
    assert f"Databricks workspace {workspace.host} rejected the credentials" in message
    assert "DATABRICKS_TOKEN is missing, expired or not valid" in message
    assert "Invalid access token" in message
    assert workspace.requests and not any(r.authorized for r in workspace.requests)
    assert workspace.runs == {}
    assert wrong not in message
    assert wrong not in event_log_text(platform, result.run_id)


# --- the resource's other paths, on a one-scenario asset --------------------------------

BOOK = LoanArrays(
    loan_id=np.array([f"T{i:03d}" for i in range(40)]),
    pd=np.linspace(0.005, 0.12, 40),
    ead=np.linspace(1_000.0, 50_000.0, 40),
    lgd=np.full(40, 0.45),
)
SCENARIO = {"pd_multiplier": 1.7, "rho": 0.18, "n_sims": 5_000, "seed": 11, "chunk_size": 2_048}


@dg.asset
def one_scenario(context: dg.AssetExecutionContext, compute: ComputeResource) -> dg.Output:
    return dg.Output(simulate_scenario(compute, BOOK, **SCENARIO, pipes_context=context))


@pytest.mark.slow
def test_new_cluster_runs_get_pipes_bootstrap_through_spark_env_vars(
    workspace: FakeDatabricksWorkspace, databricks_env: dict[str, str]
) -> None:
    spec = {"spark_version": "15.4.x-scala2.12", "node_type_id": "i3.xlarge", "num_workers": 2}
    compute = fast_compute(
        databricks_cluster_id=None,
        databricks_new_cluster=json.dumps(spec),
        databricks_pypi_packages=[],
    )

    result = dg.materialize([one_scenario], resources={"compute": compute})

    losses = result.output_for_node("one_scenario")
    expected = simulate_portfolio_loss(BOOK, pd_multiplier=1.7, rho=0.18, n_sims=5_000, seed=11)
    assert losses.tobytes() == expected.tobytes()
    (submit,) = workspace.calls("jobs/runs/submit")
    (task,) = submit.body["tasks"]
    assert "existing_cluster_id" not in task
    assert {k: task["new_cluster"][k] for k in spec} == spec
    assert "DAGSTER_PIPES_CONTEXT" in task["new_cluster"]["spark_env_vars"]
    assert task["spark_python_task"].get("parameters", []) == []
    assert "libraries" not in task or task["libraries"] == []
    assert workspace.calls("clusters/get") == []
    (run,) = workspace.runs.values()
    assert "DAGSTER_PIPES_CONTEXT" in run.env


@pytest.mark.slow
def test_configured_python_file_is_run_and_its_crash_is_reported(
    workspace: FakeDatabricksWorkspace, databricks_env: dict[str, str]
) -> None:
    """DATABRICKS_JOB_PYTHON_FILE: the script deployed elsewhere is used, not uploaded."""
    custom = "dbfs:/shared/team/loss_job.py"
    path = workspace.local_path(custom)
    path.parent.mkdir(parents=True)
    path.write_text("raise RuntimeError('book too large for this cluster: 12 GB > 8 GB')\n")
    compute = fast_compute(databricks_job_python_file=custom)

    result = dg.materialize([one_scenario], resources={"compute": compute}, raise_on_error=False)

    assert not result.success
    (submit,) = workspace.calls("jobs/runs/submit")
    assert submit.body["tasks"][0]["spark_python_task"]["python_file"] == custom
    assert not workspace.local_path(SCRIPT).exists()
    (run,) = workspace.runs.values()
    message = failure_text(result)
    assert f"Databricks run {run.run_id} (" in message
    assert (
        f"task loan_loss_job (run {run.task_run_id}) error: RuntimeError: book too large for "
        "this cluster: 12 GB > 8 GB"
    ) in message
    assert "Workload failed, see run output for details" in message


# --- the Spark path the job takes on a cluster ------------------------------------------


@pytest.mark.slow
@pytest.mark.spark
def test_job_spark_path_equals_local_chunks(spark_session) -> None:
    """On a cluster the job maps chunks with ``mapInPandas``; the fake runs it without Spark."""
    from pipeline.domain.loan_loss import chunk_ranges, tail_spec

    ranges = chunk_ranges(5_000, 1_024)
    settings = {"pd_multiplier": 1.7, "rho": 0.18, "seed": 11}
    on_spark = loan_loss_job.simulate_losses(BOOK, **settings, ranges=ranges, spark=spark_session)
    in_process = loan_loss_job.simulate_losses(BOOK, **settings, ranges=ranges)
    assert len(ranges) == 5
    assert on_spark.tobytes() == in_process.tobytes()
    expected = simulate_portfolio_loss(BOOK, **settings, n_sims=5_000)
    assert in_process.tobytes() == expected.tobytes()
    # the contribution pass maps the same chunks and merges the same floats
    groups = np.arange(BOOK.n_loans) % 3
    tail = tail_spec(in_process)
    on_spark, in_process = (
        loan_loss_job.contribution_sums(BOOK, groups, 3, tail, **settings, ranges=ranges, spark=s)
        for s in (spark_session, None)
    )
    assert on_spark.n_window == in_process.n_window == tail.n_window
    for name, values in in_process.loans.items():
        assert on_spark.loans[name].tobytes() == values.tobytes(), name
        assert on_spark.groups[name].tobytes() == in_process.groups[name].tobytes(), name
