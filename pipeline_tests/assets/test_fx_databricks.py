"""``pipeline deploy`` and wheel-based Databricks tasks, against the loopback fake (issue 10).

The wheel is built once per module with ``uv build`` (offline, ~5 s) and uploaded to the
fake workspace's DBFS, or to a Unity Catalog volume through the Files API; a second deploy
of unchanged code finds it and uploads nothing. A job task installs the wheel from the
volume path (``{"whl": "/Volumes/..."}``) into the fake's fresh virtual environment.

What this does not prove: anything about a real workspace (volume permissions, whether the
Files API creates missing parent folders, a cluster installing a volume wheel); the fake
follows the documented request and answer shapes only.
"""

import re
import subprocess
import zipfile
from pathlib import Path

import dagster as dg
import pytest
from databricks.sdk import WorkspaceClient

from pipeline import deploy
from pipeline.domain.loan_loss import simulate_portfolio_loss
from pipeline.resources import build_resources
from pipeline.resources import compute as compute_module
from pipeline.resources.compute import ComputeError, ComputeResource
from pipeline.settings import experiment_root, load_settings, sanitise_branch
from pipeline_tests.assets.test_databricks_pipes import BOOK, fast_compute, one_scenario
from pipeline_tests.fakes.databricks_server import CLUSTER_ID as CLUSTER
from pipeline_tests.fakes.databricks_server import FakeDatabricksWorkspace

ROOT = "dbfs:/pipeline/wheels"
VOLUME = "/Volumes/main/pipeline/wheels"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> deploy.Wheel:
    return deploy.build_wheel(tmp_path_factory.mktemp("dist"))


def test_wheel_holds_the_platform_and_is_named_by_content(
    wheel: deploy.Wheel, tmp_path: Path
) -> None:
    with zipfile.ZipFile(wheel.path) as archive:
        names = set(archive.namelist())
    assert {"pipeline/jobs/fx_spark.py", "pipeline/jobs/fx_training.py"} <= names
    assert {"pipeline/remote/loan_loss_job.py", "pipeline/remote/fx_job.py"} <= names
    assert not any(n.startswith("pipeline_tests/") for n in names)
    assert re.fullmatch(
        rf"{ROOT}/{wheel.version}/[0-9a-f]{{16}}/pipeline-{wheel.version}-py3-none-any\.whl",
        wheel.target(ROOT),
    )
    # the name depends on the entries, not on when the zip was written
    rebuilt = deploy.build_wheel(tmp_path / "again")
    assert rebuilt.content_hash == wheel.content_hash


def test_deploy_uploads_a_build_once(
    workspace: FakeDatabricksWorkspace, token: str, tmp_path: Path, wheel: deploy.Wheel
) -> None:
    env = {"DATABRICKS_HOST": workspace.host, "DATABRICKS_TOKEN": token}
    first = deploy.deploy(env, root=ROOT, out_dir=tmp_path / "dist")
    client = WorkspaceClient(host=workspace.host, token=token, auth_type="pat")
    path, uploaded = deploy.upload_wheel(client, wheel, ROOT)  # the same code, built again

    assert first["uploaded"] and not uploaded
    assert first["path"] == path
    remote = workspace.local_path(path)
    assert remote.read_bytes() == Path(first["wheel"]).read_bytes() == wheel.path.read_bytes()
    assert workspace.dbfs_files() == [first["path"].removeprefix("dbfs:")]
    writes = [r for r in workspace.requests if r.endpoint in ("dbfs/put", "dbfs/create")]
    assert len(writes) == 1  # the second deploy only asked for the file's status
    assert all(r.authorized for r in workspace.requests)


def test_deploy_to_a_volume_uploads_a_build_once_over_the_files_api(
    workspace: FakeDatabricksWorkspace,
    token: str,
    wheel: deploy.Wheel,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # the module's wheel stands in for the build (deploy's build is tested above)
    monkeypatch.setattr(deploy, "build_wheel", lambda out_dir: wheel)
    env = {
        "DATABRICKS_HOST": workspace.host,
        "DATABRICKS_TOKEN": token,
        "PIPELINE_WHEEL_ROOT": VOLUME,
    }
    first = deploy.deploy(env)
    second = deploy.deploy(env)

    assert first["uploaded"] and not second["uploaded"]
    assert first["path"] == second["path"] == wheel.target(VOLUME)
    assert first["path"].startswith(f"{VOLUME}/{wheel.version}/{wheel.content_hash[:16]}/")
    assert workspace.volume_files() == [first["path"]]
    assert workspace.volume_path(first["path"]).read_bytes() == wheel.path.read_bytes()
    files = [(r.method, r.endpoint, r.file_path, r.status) for r in workspace.requests]
    folder = first["path"].rsplit("/", 1)[0]
    assert files == [
        ("HEAD", "fs/files", first["path"], 404),  # not there yet
        ("PUT", "fs/directories", folder, 204),
        ("PUT", "fs/files", first["path"], 204),
        ("HEAD", "fs/files", first["path"], 200),  # the second deploy only asks
    ]
    (put,) = workspace.calls("fs/files")[1:2]
    assert put.query == {"overwrite": "true"}
    assert put.size == wheel.path.stat().st_size
    assert all(r.authorized for r in workspace.requests)
    assert workspace.dbfs_files() == []


@pytest.mark.parametrize(
    "root",
    [
        "/Volumes/main/pipeline",  # no volume
        "/Volumes/main/pipe line/wheels",
        "/Volumes/main/pipeline/wheels/../other",
        "/Volumes//pipeline/wheels",
        "Volumes/main/pipeline/wheels",
        "s3://bucket/wheels",
    ],
)
def test_an_invalid_wheel_root_is_refused_naming_it(
    root: str, workspace: FakeDatabricksWorkspace, token: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_build(out_dir: Path) -> deploy.Wheel:
        raise AssertionError("a wrong root must fail before the build")

    monkeypatch.setattr(deploy, "build_wheel", no_build)
    env = {"DATABRICKS_HOST": workspace.host, "DATABRICKS_TOKEN": token}
    with pytest.raises(deploy.DeployError, match=re.escape(repr(root))):
        deploy.deploy(env, root=root)
    compute = ComputeResource(
        backend="databricks", databricks_wheel="build", databricks_wheel_root=root
    )
    monkeypatch.setattr(compute_module, "_built_wheel", lambda: None)
    with pytest.raises(ComputeError, match=re.escape(repr(root))):
        compute.deployed_wheel(WorkspaceClient(host=workspace.host, token=token, auth_type="pat"))
    assert workspace.requests == []


def test_a_job_installs_the_wheel_from_a_volume(
    workspace: FakeDatabricksWorkspace,
    token: str,
    wheel: deploy.Wheel,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DATABRICKS_HOST", workspace.host)
    monkeypatch.setenv("DATABRICKS_TOKEN", token)
    monkeypatch.setattr(compute_module, "_built_wheel", lambda: wheel)
    compute = fast_compute(databricks_wheel="build", databricks_wheel_root=VOLUME)

    result = dg.materialize([one_scenario], resources={"compute": compute})

    losses = result.output_for_node("one_scenario")
    expected = simulate_portfolio_loss(BOOK, pd_multiplier=1.7, rho=0.18, n_sims=5_000, seed=11)
    assert losses.tobytes() == expected.tobytes()
    path = wheel.target(VOLUME)
    (submit,) = workspace.calls("jobs/runs/submit")
    (task,) = submit.body["tasks"]
    assert task["libraries"] == [{"whl": path}]
    assert workspace.volume_files() == [path]
    (venv,) = workspace.venvs.values()
    (run,) = workspace.runs.values()
    assert run.python == str(venv / "bin" / "python")
    assert list(venv.glob("lib/python*/site-packages/pipeline/remote/loan_loss_job.py"))
    assert not any(f.endswith(".zip") for f in workspace.dbfs_files())  # no code bundle


def test_deploy_command_builds_without_a_workspace(tmp_path: Path) -> None:
    done = subprocess.run(
        [".venv/bin/pipeline", "deploy", "--build-only"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parents[2],
        env={"PATH": "/usr/bin:/bin:/root/.local/bin:" + _uv_dir(), "PIPELINE_HOME": str(tmp_path)},
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert '"uploaded": false' in done.stdout
    assert list((tmp_path / "dist").glob("pipeline-*.whl"))


def _uv_dir() -> str:
    import shutil

    uv = shutil.which("uv")
    assert uv is not None
    return str(Path(uv).parent)


def test_tasks_install_the_wheel_instead_of_the_bundle() -> None:
    compute = ComputeResource(
        backend="databricks", databricks_cluster_id=CLUSTER, databricks_wheel=f"{ROOT}/x.whl"
    )
    task = compute._task("fx_train_job.py", "dbfs:/pipeline/jobs/fx_train_job.py", f"{ROOT}/x.whl")
    assert [lib.as_dict() for lib in task.libraries] == [{"whl": f"{ROOT}/x.whl"}]


def test_experiments_are_named_after_the_branch_on_databricks(tmp_path: Path) -> None:
    assert sanitise_branch("feature/FX spark #10") == "feature-FX-spark-10"
    ci = {"GITHUB_HEAD_REF": "feature/fx-spark"}
    assert experiment_root("databricks", ci) == "/Shared/pipeline/feature-fx-spark"
    assert experiment_root("sqlite:///x.db", ci) == ""
    head = subprocess.run(
        ["git", "rev-parse", "--abbrev-ref", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert experiment_root("databricks", {}) == f"/Shared/pipeline/{sanitise_branch(head)}"

    settings = load_settings(
        {"PIPELINE_HOME": str(tmp_path), "MLFLOW_TRACKING_URI": "databricks", **ci}
    )
    tracking = build_resources(settings)["tracking"]
    assert tracking.experiment_root == "/Shared/pipeline/feature-fx-spark"
    local = build_resources(load_settings({"PIPELINE_HOME": str(tmp_path)}))["tracking"]
    assert local.experiment_root == ""
