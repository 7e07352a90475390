"""Secrets reach the platform only through ``dagster.EnvVar`` and never leave a trace.

A recognisable value is set in every secret variable the platform or its clients read
(Databricks token, MLflow credentials, object-store keys, the PII salt); a real small
materialisation then runs with a compute resource holding the Databricks credentials
through ``EnvVar``. The value must appear nowhere in the Dagster event log (every
event record of the instance, serialised, and every run's config and tags), in the
params, tags and names of the MLflow runs created, or in the gold rows written.
A control run that puts the value into asset metadata proves the scan would see it.
"""

import json

import dagster as dg
import polars as pl
import pytest

from pipeline import keys
from pipeline.domain.demo_data import write_demo_landing
from pipeline.resources import build_resources
from pipeline.resources.compute import ComputeResource
from pipeline.resources.pii import SALT_VARIABLE
from pipeline.settings import load_settings
from pipeline_tests.conftest import make_platform

SECRET = "s3cr3t-7f3a9c1e-do-not-log-5b0d2e"  # noqa: S105 (a test value, recognisable on purpose)
SECRET_VARIABLES = (
    "DATABRICKS_TOKEN",
    "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_TRACKING_PASSWORD",
    "AWS_SECRET_ACCESS_KEY",
    "AZURE_STORAGE_ACCOUNT_KEY",
    "GOOGLE_SERVICE_ACCOUNT_KEY",
    "PIPELINE_PII_SALT",
)
VALUATION = "2026-09-30"
MONTH = "2026-07"


def dagster_leaks(instance: dg.DagsterInstance) -> list[str]:
    """Where the secret appears in the runs and event records of ``instance``."""
    found = []
    for run in instance.get_runs():
        if SECRET in json.dumps(run.run_config, default=str) + json.dumps(run.tags):
            found.append(f"run {run.run_id} config or tags")
        for entry in instance.all_logs(run.run_id):
            if SECRET in dg.serialize_value(entry):
                found.append(f"run {run.run_id} event {entry.dagster_event_type}")
    return found


def mlflow_leaks(client) -> list[str]:
    """Where the secret appears in the params, tags or names of every MLflow run."""
    found = []
    experiments = client.search_experiments()
    for run in client.search_runs([e.experiment_id for e in experiments]):
        text = json.dumps([run.info.run_name, run.data.params, run.data.tags])
        if SECRET in text:
            found.append(f"mlflow run {run.info.run_id}")
    return found


@pytest.fixture
def secret_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in SECRET_VARIABLES:
        monkeypatch.setenv(name, SECRET)
    monkeypatch.setenv("DATABRICKS_HOST", "https://127.0.0.1:9")


def test_databricks_credentials_are_env_var_references_not_values(secret_env, tmp_path) -> None:
    settings = load_settings({"PIPELINE_HOME": str(tmp_path), "COMPUTE": "databricks"})
    compute = build_resources(settings)["compute"]
    assert compute.databricks_token == dg.EnvVar("DATABRICKS_TOKEN")
    assert SECRET not in repr(compute)
    pii = build_resources(settings)["pii"]
    assert pii.salt == dg.EnvVar(SALT_VARIABLE)
    assert SECRET not in repr(pii)
    # no setting carries a secret: the settings are built without reading one
    assert SECRET not in repr(settings)


def test_no_secret_in_event_log_mlflow_or_gold(secret_env, tmp_path) -> None:
    platform = make_platform(tmp_path / "home")
    platform.resources["compute"] = ComputeResource(
        backend="local",
        databricks_host=dg.EnvVar("DATABRICKS_HOST"),
        databricks_token=dg.EnvVar("DATABRICKS_TOKEN"),
    )
    write_demo_landing(
        platform.settings.landing_dir,
        n_policies=400,
        claims_months=(MONTH,),
        fx_dates=(),
        valuation_dates=(VALUATION,),
    )
    # the PII scan tokenises with the salt from PIPELINE_PII_SALT
    scan = [keys.BRONZE_CLAIMS, keys.CLAIMS_REDACTED, keys.PII_DETECTION_LOG]
    assert platform.materialize(scan, MONTH).success
    ingest = platform.materialize(
        [keys.BRONZE_LOAN_BOOK, keys.LOAN_BOOK, keys.BRONZE_LOAN_SCENARIOS, keys.LOAN_SCENARIOS],
        VALUATION,
    )
    assert ingest.success
    selection = dg.AssetSelection.assets(keys.LOAN_LOSS_DISTRIBUTION).without_checks()
    check = dg.AssetCheckKey(keys.LOAN_LOSS_DISTRIBUTION, keys.CHECK_MC_ERROR)
    result = dg.materialize(
        [*platform.defs.assets, *platform.defs.asset_checks],
        selection=selection | dg.AssetSelection.checks(check),
        partition_key=VALUATION,
        resources=platform.resources,
        instance=platform.instance,
        raise_on_error=False,
        run_config={"ops": {"gold__loan_loss_distribution": {"config": {"n_sims": 2048}}}},
    )
    # the asset and its check ran (the check fails on 2,048 simulations: its failure
    # message and metadata are scanned too)
    assert result.get_asset_materialization_events()
    assert result.get_asset_check_evaluations()

    assert dagster_leaks(platform.instance) == []
    client = platform.tracking.client()
    assert client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert mlflow_leaks(client) == []
    for layer, table in (
        ("gold", "loan_loss_summary"),
        ("gold", "loan_loss_contributions"),
        ("gold", "pii_detection_log"),
        ("curated", "claims_redacted"),
    ):
        rows = platform.lake.read(layer, table)
        assert rows.height, table
        assert SECRET not in rows.cast(pl.String, strict=False).write_csv(), table
    platform.instance.dispose()


def test_the_scan_sees_a_secret_in_asset_metadata(secret_env) -> None:
    """Control: a value that does reach metadata is found, so an empty scan means something."""
    import os

    @dg.asset
    def leaky() -> dg.MaterializeResult:
        return dg.MaterializeResult(metadata={"token": os.environ["DATABRICKS_TOKEN"]})

    with dg.DagsterInstance.ephemeral() as instance:
        assert dg.materialize([leaky], instance=instance).success
        assert any("ASSET_MATERIALIZATION" in leak for leak in dagster_leaks(instance))
