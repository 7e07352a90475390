"""The ``MLproject`` entry points (issue 10): ``mlflow run`` runs the assets' own functions.

The slow test runs ``mlflow run <repo> -e train_fx --env-manager local`` as a subprocess on a
private copy of the curated FX demo home (the module fixture of the FX asset tests) and
checks that the project run holds the entry point's parameters, that the training run is
nested under it and registered and aliased as the asset path does it, and that its
metrics equal those of :func:`pipeline.jobs.fx_training.train_challenger` called in this
process on another copy of the same data with the same seed. A second one runs the
``loan_loss`` entry point in process under a project run and compares what it stores with
what the asset stores for the same book, seed and simulations.
"""

import math
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import dagster as dg
import pytest
import yaml
from polars.testing import assert_frame_equal

from pipeline import keys
from pipeline.jobs import mlproject
from pipeline.jobs.fx_training import EXPERIMENT, TrainingParams, train_challenger
from pipeline.jobs.loan_loss_simulation import SE_COLUMNS, SUMMARY_COLUMNS
from pipeline.resources.tracking import DAGSTER_RUN_TAG, PARENT_RUN_TAG
from pipeline.stores import fx as fx_store
from pipeline.stores.loan_loss import read_summary
from pipeline_tests.assets.test_fx_assets import (  # noqa: F401  (module fixture)
    MODEL,
    SYMBOL,
    curated_home,
    restored_mlflow_environment,
)
from pipeline_tests.assets.test_loan_loss_assets import (
    LOAN_INPUTS,
    LOSS_OP,
    VALUATION,
    write_landing,
)
from pipeline_tests.conftest import make_platform

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PROJECT_EXPERIMENT = "mlproject_runs"
TIMING_METRICS = {"fit_seconds"}  # wall time, the one metric that may differ between runs
PARAMS = {"symbol": SYMBOL, "n_estimators": "50", "bootstrap_resamples": "200"}


def entry_points() -> dict:
    return yaml.safe_load((REPO / "MLproject").read_text())["entry_points"]


def test_every_entry_point_runs_a_job_of_the_cli_with_all_its_parameters() -> None:
    """Each ``MLproject`` command resolves to a job of the CLI and parses with its defaults."""
    from mlflow.projects._project_spec import load_project

    spec = yaml.safe_load((REPO / "MLproject").read_text())
    assert set(spec) == {"name", "entry_points"}, "no environment file: --env-manager local"
    assert (
        set(entry_points())
        == set(mlproject.ENTRY_POINTS)
        == {
            "train_fx",
            "score_fx",
            "loan_loss",
            "credibility",
        }
    )
    project = load_project(str(REPO))
    for name, declared in entry_points().items():
        required = {p: f"x{p}" for p, v in declared["parameters"].items() if isinstance(v, str)}
        required |= {"symbol": "EUR/USD", "dates": "2026-09-06", "month": "2026-09"}
        required |= {"valuation_date": "2026-09-30"}
        command = project.get_entry_point(name).compute_command(
            {k: v for k, v in required.items() if k in declared["parameters"]}, None
        )
        argv = shlex.split(command)
        assert argv[:4] == ["python", "-m", "pipeline.jobs.mlproject", name], command
        args = mlproject.parser().parse_args(argv[3:])
        assert mlproject.ENTRY_POINTS[args.entry_point] is getattr(mlproject, name)
        for parameter in declared["parameters"]:
            assert f"{{{parameter}}}" in declared["command"], (name, parameter)
            assert hasattr(args, parameter), (name, parameter)


def repo_state() -> list[str]:
    """Every changed, untracked or ignored path of the repository, except the test run's
    own temporary folder (``make test`` keeps it under ``.pipeline/tmp/`` of the checkout)."""
    scratch = Path(tempfile.gettempdir()).resolve()
    done = subprocess.run(
        ["git", "status", "--porcelain", "--ignored", "--untracked-files=all"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    return [
        line
        for line in done.stdout.splitlines()
        if not (REPO / line[3:]).resolve().is_relative_to(scratch)
    ]


@pytest.mark.slow
def test_mlflow_run_train_fx_registers_like_the_asset_path(
    curated_home: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    project_home, local_home = tmp_path / "project", tmp_path / "local"
    shutil.copytree(curated_home, project_home)
    shutil.copytree(curated_home, local_home)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    tracking_uri = f"sqlite:///{project_home / 'mlflow.db'}"
    project = make_platform(project_home, MLFLOW_TRACKING_URI=tracking_uri)
    client = project.tracking.client()
    # the project run's artefacts (result.json) go under the home, not into a ./mlruns
    client.create_experiment(
        PROJECT_EXPERIMENT, artifact_location=(project_home / "project_runs").as_uri()
    )
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PIPELINE_", "LAKE"))
    }
    env |= {
        "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        "PIPELINE_HOME": str(project_home),
        "PIPELINE_PARTITIONS_START": os.environ["PIPELINE_PARTITIONS_START"],
        "MLFLOW_TRACKING_URI": tracking_uri,
        "PYTHONDONTWRITEBYTECODE": "1",  # the repository stays as it was
    }
    before = repo_state()
    started = time.monotonic()
    done = subprocess.run(
        [
            str(BIN / "mlflow"),
            "run",
            str(REPO),
            "-e",
            "train_fx",
            "--env-manager",
            "local",
            "--experiment-name",
            PROJECT_EXPERIMENT,
            *[arg for k, v in PARAMS.items() for arg in ("-P", f"{k}={v}")],
        ],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    seconds = time.monotonic() - started
    assert done.returncode == 0, done.stderr[-4000:]
    assert list(cwd.iterdir()) == [], "mlflow run wrote into its working directory"
    assert repo_state() == before, "mlflow run left files in the repository"

    # the project run: the entry point's parameters, finished, pointing at its nested run
    (parent,) = client.search_runs(
        [client.get_experiment_by_name(PROJECT_EXPERIMENT).experiment_id]
    )
    assert parent.info.status == "FINISHED"
    assert {k: parent.data.params[k] for k in PARAMS} == PARAMS
    assert parent.data.params["random_state"] == "42"
    assert parent.data.tags["mlflow.project.entryPoint"] == "train_fx"
    assert parent.data.tags[mlproject.ENTRY_POINT_TAG] == "train_fx"
    training = client.get_experiment_by_name(EXPERIMENT).experiment_id
    (child,) = client.search_runs([training])
    assert child.data.tags[PARENT_RUN_TAG] == parent.info.run_id
    assert parent.data.tags[mlproject.NESTED_RUNS_TAG] == child.info.run_id
    assert child.data.tags[DAGSTER_RUN_TAG] == f"mlproject-{parent.info.run_id}"
    assert client.list_artifacts(parent.info.run_id)[0].path == mlproject.RESULT_ARTIFACT

    # registered and aliased the way the asset does it, and the evaluation row stored
    version = client.get_model_version_by_alias(MODEL, fx_store.CHALLENGER)
    assert (str(version.version), version.run_id) == ("1", child.info.run_id)
    assert version.tags["dagster_run_id"] == f"mlproject-{parent.info.run_id}"
    stored = project.lake.read("gold", "fx_model_evaluations")
    assert stored.select("symbol", "model_version", "mlflow_run_id").rows() == [
        (SYMBOL, "1", child.info.run_id)
    ]

    # the same function in this process, same data and seed: the same metrics
    local = make_platform(local_home)
    with restored_mlflow_environment():
        evaluation = train_challenger(
            fx_store.read_symbol_ticks(local.lake, SYMBOL),
            fx_store.read_incidents(local.lake, SYMBOL),
            symbol=SYMBOL,
            params=TrainingParams(n_estimators=50, bootstrap_resamples=200),
            tracking=local.tracking,
            dagster_run_id="in-process",
        )
    expected = local.tracking.client().get_run(evaluation["mlflow_run_id"]).data.metrics
    measured = client.get_run(child.info.run_id).data.metrics
    assert set(measured) == set(expected)
    assert "holdout_average_precision" in measured and "train_rows" in measured
    differing = {
        k: (measured[k], expected[k])
        for k in set(expected) - TIMING_METRICS
        if not math.isclose(measured[k], expected[k], rel_tol=1e-12, abs_tol=0.0)
    }
    assert differing == {}
    local_params = local.tracking.client().get_run(evaluation["mlflow_run_id"]).data.params
    assert child.data.params == local_params
    print(f"mlflow run train_fx: {seconds:.1f} s")
    local.instance.dispose()
    project.instance.dispose()


@pytest.mark.slow
def test_loan_loss_entry_point_stores_what_the_asset_stores(tmp_path: Path) -> None:
    """``loan_loss`` in process, under a project run: the asset's figures, nested run, tags."""
    plat = make_platform(tmp_path / "home")
    write_landing(plat)
    assert plat.materialize(LOAN_INPUTS, VALUATION).success
    client = plat.tracking.client()
    experiment = client.create_experiment(
        PROJECT_EXPERIMENT, artifact_location=(tmp_path / "project_runs").as_uri()
    )
    parent = client.create_run(experiment).info.run_id  # what `mlflow run` opens
    config = {"n_sims": 4_000, "seed": 7, "chunk_size": 1_000}
    argv = ["loan_loss", "--valuation-date", VALUATION, "--n-sims", "4000", "--seed", "7"]
    environ = {
        "PIPELINE_HOME": str(plat.settings.home),
        "PIPELINE_PARTITIONS_START": os.environ["PIPELINE_PARTITIONS_START"],
        "MLFLOW_RUN_ID": parent,
    }
    assert mlproject.main([*argv, "--chunk-size", "1000"], environ=environ) == 0
    figures = ["scenario", *SUMMARY_COLUMNS, *SE_COLUMNS, "n_sims"]
    project_summary = read_summary(plat.lake, VALUATION).sort("scenario")
    assert set(project_summary["dagster_run_id"]) == {f"mlproject-{parent}"}
    (nested,) = set(project_summary["mlflow_run_id"])
    assert client.get_run(nested).data.tags[PARENT_RUN_TAG] == parent
    assert client.get_run(parent).data.tags[mlproject.NESTED_RUNS_TAG] == nested

    result = dg.materialize(
        [*plat.defs.assets, *(plat.defs.asset_checks or [])],
        selection=dg.AssetSelection.assets(keys.LOAN_LOSS_DISTRIBUTION).without_checks(),
        partition_key=VALUATION,
        resources=plat.resources,
        instance=plat.instance,
        run_config={"ops": {LOSS_OP: {"config": config}}},
    )
    assert result.success
    asset_summary = read_summary(plat.lake, VALUATION).sort("scenario")
    assert set(asset_summary["dagster_run_id"]) == {result.run_id}
    assert project_summary.height == asset_summary.height >= 2
    assert_frame_equal(
        project_summary.select(figures), asset_summary.select(figures), check_exact=True
    )
    plat.instance.dispose()
