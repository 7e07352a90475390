"""Settings: defaults under PIPELINE_HOME, overrides, refusals, and a loadable DAGSTER_HOME."""

from pathlib import Path

import dagster as dg
import pytest

from pipeline.settings import SettingsError, ensure_dagster_home, load_settings


def test_defaults_live_under_pipeline_home(tmp_path: Path) -> None:
    home = tmp_path / "home"
    s = load_settings({"PIPELINE_HOME": str(home)})
    assert s.home == home.resolve()
    assert s.lake_uri == str(home / "lake")
    assert s.lake_is_local
    assert s.landing_dir == home / "landing"
    assert s.dagster_home == home / "dagster"
    assert s.mlflow_tracking_uri == f"sqlite:///{home}/mlflow.db"
    assert s.mlflow_artifact_root == (home / "mlruns").as_uri()
    assert s.mlflow_ui_url == "http://127.0.0.1:5000"
    assert s.compute == "local"
    assert s.spark_master == "local[2]"
    assert s.uc_catalog is None
    assert s.uc_schema is None


def test_relative_home_is_resolved_against_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert load_settings({}).home == tmp_path / ".pipeline"
    assert load_settings({"PIPELINE_HOME": "rel/home"}).lake_uri == str(tmp_path / "rel/home/lake")


def test_every_setting_can_be_overridden(tmp_path: Path) -> None:
    s = load_settings(
        {
            "PIPELINE_HOME": str(tmp_path / "home"),
            "LAKE_URI": "s3://bucket/lake",
            "LANDING_DIR": str(tmp_path / "drops"),
            "DAGSTER_HOME": str(tmp_path / "dg"),
            "MLFLOW_TRACKING_URI": "http://mlflow:5000",
            "MLFLOW_ARTIFACT_ROOT": "s3://bucket/mlruns",
            "MLFLOW_UI_URL": "https://mlflow.example.org/",
            "COMPUTE": " Spark ",
            "SPARK_MASTER": "spark://master:7077",
            "UC_CATALOG": "risk",
            "UC_SCHEMA": "fx_models",
        }
    )
    assert s.lake_uri == "s3://bucket/lake"
    assert not s.lake_is_local
    assert s.landing_dir == tmp_path / "drops"
    assert s.dagster_home == tmp_path / "dg"
    assert s.mlflow_tracking_uri == "http://mlflow:5000"
    assert s.mlflow_artifact_root == "s3://bucket/mlruns"
    assert s.mlflow_ui_url == "https://mlflow.example.org"
    assert s.compute == "spark"
    assert s.spark_master == "spark://master:7077"
    assert (s.uc_catalog, s.uc_schema) == ("risk", "fx_models")
    assert load_settings({"LAKE_URI": "file:///data/lake"}).lake_is_local


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"COMPUTE": "gpu"}, "COMPUTE='gpu' is not one of local, spark, databricks"),
        (
            {"UC_CATALOG": "risk; drop", "UC_SCHEMA": "fx"},
            "UC_CATALOG='risk; drop' is not a valid Unity Catalog identifier",
        ),
        (
            {"UC_CATALOG": "risk", "UC_SCHEMA": "fx.models"},
            "UC_SCHEMA='fx.models' is not a valid Unity Catalog identifier",
        ),
        ({"UC_CATALOG": "risk"}, "UC_CATALOG and UC_SCHEMA must be set together"),
        ({"UC_SCHEMA": "fx"}, "UC_CATALOG and UC_SCHEMA must be set together"),
    ],
)
def test_unusable_values_are_refused_with_the_variable_named(
    tmp_path: Path, env: dict[str, str], message: str
) -> None:
    with pytest.raises(SettingsError) as err:
        load_settings({"PIPELINE_HOME": str(tmp_path), **env})
    assert str(err.value) == message


def test_ensure_dagster_home_writes_a_loadable_sqlite_instance(tmp_path: Path) -> None:
    """The home has a space and a ``#`` (regression: unquoted, ``#`` started a YAML comment
    and the storage went to a sibling folder ``with space``). Opening a sqlite instance
    takes ~3 s, so one awkward path covers the plain case too."""
    folder = "with space #3"
    s = load_settings({"PIPELINE_HOME": str(tmp_path / folder)})
    dagster_home = ensure_dagster_home(s)
    assert dagster_home == s.dagster_home
    config = dagster_home / "dagster.yaml"
    assert config.is_file()

    instance = dg.DagsterInstance.from_config(str(dagster_home))
    try:
        assert type(instance.run_storage).__name__ == "SqliteRunStorage"
        assert instance.get_concurrency_config().run_queue_config.max_concurrent_runs == 4

        @dg.asset
        def probe() -> dg.MaterializeResult:
            return dg.MaterializeResult(metadata={"n": 1})

        assert dg.materialize([probe], instance=instance).success
        assert instance.get_latest_materialization_event(dg.AssetKey("probe")) is not None
    finally:
        instance.dispose()
    assert (dagster_home / "storage").is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == [folder]

    # an existing configuration is the user's: it is never overwritten
    config.write_text("# edited by hand\n")
    ensure_dagster_home(s)
    assert config.read_text() == "# edited by hand\n"
