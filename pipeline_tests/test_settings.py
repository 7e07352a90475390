"""Settings: defaults under PIPELINE_HOME, overrides, refusals, a loadable DAGSTER_HOME and
the partitions start (variable, recorded in the home, default)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

from pipeline.settings import (
    DEFAULT_PARTITIONS_START,
    PARTITIONS_START_FILE,
    SettingsError,
    ensure_dagster_home,
    load_settings,
    partitions_start,
    record_partitions_start,
)


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


# --- partitions start ------------------------------------------------------------------


def test_partitions_start_defaults_to_the_documented_date(tmp_path: Path) -> None:
    assert partitions_start({"PIPELINE_HOME": str(tmp_path / "empty")}) == "2026-01-01"
    assert DEFAULT_PARTITIONS_START == "2026-01-01"


def test_recorded_start_is_used_and_the_environment_variable_wins(tmp_path: Path) -> None:
    home = tmp_path / "home"
    assert record_partitions_start(home, "2026-09-01") == "2026-09-01"
    assert (home / PARTITIONS_START_FILE).read_text().strip() == "2026-09-01"
    assert partitions_start({"PIPELINE_HOME": str(home)}) == "2026-09-01"
    env = {"PIPELINE_HOME": str(home), "PIPELINE_PARTITIONS_START": " 2025-03-15 "}
    assert partitions_start(env) == "2025-03-15"
    # blank counts as unset, as for the other variables
    assert partitions_start({**env, "PIPELINE_PARTITIONS_START": " "}) == "2026-09-01"


def test_recorded_start_only_moves_back(tmp_path: Path) -> None:
    """A later re-seed must not drop partitions the home already holds."""
    home = tmp_path / "home"
    record_partitions_start(home, "2026-09-01")
    assert record_partitions_start(home, "2026-10-01") == "2026-09-01"
    assert record_partitions_start(home, "2026-08-01") == "2026-08-01"
    assert partitions_start({"PIPELINE_HOME": str(home)}) == "2026-08-01"
    assert sorted(p.name for p in home.iterdir()) == [PARTITIONS_START_FILE]


@pytest.mark.parametrize("value", ["2026-13-01", "2026-02-30", "20260101", "2026-1-1", "soon"])
def test_an_unusable_partitions_start_is_refused_naming_variable_and_value(
    tmp_path: Path, value: str
) -> None:
    env = {"PIPELINE_HOME": str(tmp_path), "PIPELINE_PARTITIONS_START": value}
    with pytest.raises(SettingsError) as err:
        partitions_start(env)
    assert str(err.value) == (f"PIPELINE_PARTITIONS_START={value!r} is not an ISO date YYYY-MM-DD")


def test_an_unusable_recorded_start_is_refused_naming_the_file(tmp_path: Path) -> None:
    (tmp_path / PARTITIONS_START_FILE).write_text("2026-02-30\n")
    with pytest.raises(SettingsError, match=r"partitions_start='2026-02-30\\n' is not an ISO"):
        partitions_start({"PIPELINE_HOME": str(tmp_path)})


def _fresh_partitions(env: dict[str, str]) -> dict[str, str]:
    """Starts of the partitions a freshly started Python process loads under ``env``."""
    script = (
        "import json\n"
        "from pipeline import partitions as p\n"
        "print(json.dumps({\n"
        "    'date': p.date_partitions.start.strftime('%Y-%m-%d'),\n"
        "    'valuation_date': p.valuation_date_partitions.start.strftime('%Y-%m-%d'),\n"
        "    'month': p.month_partitions.start.strftime('%Y-%m-%d'),\n"
        "    'first_month_key': p.month_partitions.get_first_partition_key(),\n"
        "}))\n"
    )
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("PIPELINE_")}
    out = subprocess.run(
        [sys.executable, "-c", script],
        env={**inherited, **env},
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_fresh_load_of_the_partitions_honours_the_home_and_the_variable(
    tmp_path: Path,
) -> None:
    home = tmp_path / "home"
    record_partitions_start(home, "2026-09-01")
    assert _fresh_partitions({"PIPELINE_HOME": str(home)}) == {
        "date": "2026-09-01",
        "valuation_date": "2026-09-01",
        "month": "2026-09-01",
        "first_month_key": "2026-09",
    }
    mid_month = {"PIPELINE_HOME": str(home), "PIPELINE_PARTITIONS_START": "2025-11-20"}
    assert _fresh_partitions(mid_month) == {
        "date": "2025-11-20",
        "valuation_date": "2025-11-20",
        "month": "2025-11-01",
        "first_month_key": "2025-11",
    }
