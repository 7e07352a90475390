"""The tracking resource against a real MLflow sqlite store under ``tmp_path``."""

import os
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest

from pipeline.resources.tracking import (
    DAGSTER_ASSET_TAG,
    DAGSTER_PARTITION_TAG,
    DAGSTER_RUN_TAG,
    TrackingError,
    TrackingResource,
)
from pipeline.settings import load_settings

EXPERIMENT = "tracking_test"


@pytest.fixture(autouse=True)
def _mlflow_global_state_untouched() -> Iterator[None]:
    """The resource works through a bound client: MLflow's globals and the environment
    are the same after every test as before it, so no test needs to restore them."""
    import mlflow

    environ = {k: v for k, v in os.environ.items() if k.startswith("MLFLOW")}
    tracking_uri = mlflow.get_tracking_uri()
    yield
    assert {k: v for k, v in os.environ.items() if k.startswith("MLFLOW")} == environ
    assert mlflow.get_tracking_uri() == tracking_uri
    assert mlflow.active_run() is None


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One PIPELINE_HOME for the module: creating an MLflow sqlite store runs its schema
    migrations (~5 s), so tests share the store and use their own experiments."""
    return tmp_path_factory.mktemp("tracking") / "home"


@pytest.fixture(autouse=True)
def empty_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test runs in an empty working directory, which must stay empty."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return cwd


def tracking_for(home: Path, **env: str) -> TrackingResource:
    s = load_settings({"PIPELINE_HOME": str(home), **env})
    return TrackingResource(
        tracking_uri=s.mlflow_tracking_uri,
        artifact_root=s.mlflow_artifact_root,
        ui_url=s.mlflow_ui_url,
        uc_catalog=s.uc_catalog,
        uc_schema=s.uc_schema,
    )


def test_runs_carry_the_dagster_run_asset_and_partition(home: Path) -> None:
    tracking = tracking_for(home)
    parts = dg.StaticPartitionsDefinition(["EURUSD", "USDJPY"])

    @dg.asset(key=["models", "tracked"], partitions_def=parts)
    def tracked(context: dg.AssetExecutionContext, tracking: TrackingResource) -> dg.Output:
        with tracking.start_run(
            experiment=EXPERIMENT,
            run_name=f"tracked-{context.partition_key}",
            dagster_run_id=context.run.run_id,
            asset_key=context.asset_key.to_user_string(),
            partition_key=context.partition_key,
            tags={"model_kind": "spread"},
        ) as run:
            run.log_metrics({"rmse": 0.25})
            run.log_files({"readme.txt": b"hello"}, artifact_path="notes")
        return dg.Output(None, metadata={"mlflow_run_id": run.run_id})

    instance = dg.DagsterInstance.ephemeral()
    try:
        result = dg.materialize(
            [tracked], partition_key="USDJPY", resources={"tracking": tracking}, instance=instance
        )
    finally:
        instance.dispose()
    assert result.success
    mlflow_run_id = (
        result.asset_materializations_for_node("models__tracked")[0].metadata["mlflow_run_id"].value
    )

    client = tracking.client()
    experiment_id = tracking.experiment_id(EXPERIMENT)
    found = client.search_runs(
        [experiment_id], filter_string=f"tags.`{DAGSTER_RUN_TAG}` = '{result.run_id}'"
    )
    assert [r.info.run_id for r in found] == [mlflow_run_id]
    run = found[0]
    assert run.data.tags[DAGSTER_RUN_TAG] == result.run_id
    assert run.data.tags[DAGSTER_ASSET_TAG] == "models/tracked"
    assert run.data.tags[DAGSTER_PARTITION_TAG] == "USDJPY"
    assert run.data.tags["model_kind"] == "spread"
    assert run.data.metrics == {"rmse": 0.25}
    assert run.info.status == "FINISHED"

    # artefacts live under PIPELINE_HOME, and nothing was written to the working directory
    artifact = home / "mlruns" / EXPERIMENT / mlflow_run_id / "artifacts" / "notes" / "readme.txt"
    assert artifact.read_text() == "hello"
    assert run.info.artifact_uri.startswith((home / "mlruns").as_uri())
    assert (home / "mlflow.db").is_file()
    assert list(Path.cwd().iterdir()) == []

    assert tracking.run_url(experiment_id, mlflow_run_id) == (
        f"http://127.0.0.1:5000/#/experiments/{experiment_id}/runs/{mlflow_run_id}"
    )


def test_a_failing_body_ends_the_run_as_failed(home: Path) -> None:
    tracking = tracking_for(home)
    with (
        pytest.raises(RuntimeError, match="boom"),
        tracking.start_run(
            experiment="failing_runs",
            run_name="broken",
            dagster_run_id="run-1",
            asset_key="models/x",
            partition_key=None,
        ),
    ):
        raise RuntimeError("boom")
    (run,) = tracking.client().search_runs([tracking.experiment_id("failing_runs")])
    assert run.info.status == "FAILED"
    assert run.data.tags[DAGSTER_PARTITION_TAG] == ""
    assert list(Path.cwd().iterdir()) == []


def test_experiment_is_created_once_with_its_artifact_root(home: Path) -> None:
    tracking = tracking_for(home)
    first = tracking.experiment_id("exp_a")
    assert tracking.experiment_id("exp_a") == first
    location = tracking.client().get_experiment(first).artifact_location
    assert location == f"{(home / 'mlruns').as_uri()}/exp_a"
    assert list(Path.cwd().iterdir()) == []


@pytest.mark.parametrize("symbol", ["../x", "eurusd", "EUR/USD", "EU", "", "EURUSD;DROP"])
def test_model_names_accept_only_normalised_symbols(home: Path, symbol: str) -> None:
    with pytest.raises(TrackingError, match="is not a normalised partition key"):
        tracking_for(home).model_name(symbol)


def test_model_names_with_and_without_a_unity_catalog_prefix(home: Path) -> None:
    assert tracking_for(home).model_name("EURUSD") == "fx_spread_eurusd"
    uc = tracking_for(home, UC_CATALOG="risk", UC_SCHEMA="fx_models")
    assert uc.model_name("USDJPY") == "risk.fx_models.fx_spread_usdjpy"
    assert uc.model_version_url("risk.fx_models.fx_spread_usdjpy", 3) == (
        "http://127.0.0.1:5000/#/models/risk.fx_models.fx_spread_usdjpy/versions/3"
    )


def test_unsafe_unity_catalog_names_are_refused_even_without_settings() -> None:
    """Regression: the resource can be built directly (tests, notebooks) and pasted the
    catalog into the registered name unchecked."""
    bad = TrackingResource(tracking_uri="sqlite:///unused.db", uc_catalog="risk", uc_schema="x;y")
    with pytest.raises(TrackingError, match="Unity Catalog schema 'x;y' is not an identifier"):
        bad.model_name("EURUSD")


def test_a_registered_model_loads_by_alias_and_by_version_without_global_state(
    home: Path,
) -> None:
    import numpy as np
    from sklearn.ensemble import IsolationForest

    tracking = tracking_for(home)
    train = np.random.default_rng(7).normal(size=(300, 3))
    model = IsolationForest(n_estimators=20, random_state=7).fit(train)
    name = tracking.model_name("EURUSD")
    versions = []
    for _ in range(2):
        with tracking.start_run(
            experiment="registry_test",
            run_name="fit",
            dagster_run_id="run-2",
            asset_key="models/fx",
            partition_key="EURUSD",
        ) as run:
            source = run.log_sklearn_model(
                model,
                input_example=train[:5],
                pip_requirements=["scikit-learn"],
                skops_trusted_types=["sklearn.tree._tree.Tree"],
            )
            run.log_files({"reference.npy": train[:, 0].tobytes()})
        assert tracking.download_artifact(run.run_id, "reference.npy") == train[:, 0].tobytes()
        versions.append(
            tracking.register_version(name, source=source, run_id=run.run_id, tags={"k": "v"})
        )
    assert versions == ["1", "2"]
    tracking.set_alias(name, "champion", "1")
    by_alias = tracking.load_sklearn(name, "champion")
    by_version = tracking.load_sklearn(name, version="2")
    expected = model.score_samples(train)
    np.testing.assert_array_equal(by_alias.score_samples(train), expected)
    np.testing.assert_array_equal(by_version.score_samples(train), expected)
    assert tracking.client().get_model_version(name, "2").tags == {"k": "v"}
    assert tracking.alias_version(name, "challenger") is None
    assert list(Path.cwd().iterdir()) == []
