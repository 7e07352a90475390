"""Typed settings, read once from the environment, with embedded defaults.

Everything a deployment may change is an environment variable, so the same code
runs on a laptop (local Delta folder, MLflow on sqlite, in-process compute) and
against object storage, an MLflow server or Databricks. Secrets are never
settings: credentials for object stores and Databricks are read by the client
libraries (or by ``dagster.EnvVar`` in resources) from their standard variables.
"""

import functools
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

COMPUTE_BACKENDS = ("local", "spark", "databricks")
_UC_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class SettingsError(ValueError):
    """An environment variable holds a value the platform cannot use."""


@dataclass(frozen=True)
class Settings:
    """Resolved configuration of one deployment.

    Attributes mirror the environment variables documented in the README.
    """

    home: Path
    lake_uri: str
    landing_dir: Path
    dagster_home: Path
    mlflow_tracking_uri: str
    mlflow_artifact_root: str
    mlflow_ui_url: str
    compute: str
    spark_master: str
    uc_catalog: str | None
    uc_schema: str | None
    databricks_cluster_id: str | None = None
    databricks_new_cluster: str | None = None
    databricks_job_python_file: str | None = None

    @property
    def lake_is_local(self) -> bool:
        """Whether the lake root is a folder on this machine."""
        return "://" not in self.lake_uri or self.lake_uri.startswith("file://")


def load_settings(environ: dict[str, str] | None = None) -> Settings:
    """Build settings from ``environ`` (default: the process environment).

    Parameters
    ----------
    environ
        Mapping to read; tests pass their own so nothing leaks between them.

    Raises
    ------
    SettingsError
        When ``COMPUTE`` or a Unity Catalog name is not usable.
    """
    env = dict(os.environ if environ is None else environ)
    home = Path(env.get("PIPELINE_HOME", ".pipeline")).expanduser().resolve()
    compute = env.get("COMPUTE", "local").strip().lower()
    if compute not in COMPUTE_BACKENDS:
        raise SettingsError(f"COMPUTE={compute!r} is not one of {', '.join(COMPUTE_BACKENDS)}")
    uc_catalog = env.get("UC_CATALOG") or None
    uc_schema = env.get("UC_SCHEMA") or None
    for var, value in (("UC_CATALOG", uc_catalog), ("UC_SCHEMA", uc_schema)):
        if value is not None and not _UC_NAME.match(value):
            raise SettingsError(f"{var}={value!r} is not a valid Unity Catalog identifier")
    if (uc_catalog is None) != (uc_schema is None):
        raise SettingsError("UC_CATALOG and UC_SCHEMA must be set together")
    return Settings(
        home=home,
        lake_uri=env.get("LAKE_URI") or str(home / "lake"),
        landing_dir=Path(env.get("LANDING_DIR") or home / "landing").expanduser().resolve(),
        dagster_home=Path(env.get("DAGSTER_HOME") or home / "dagster").expanduser().resolve(),
        mlflow_tracking_uri=env.get("MLFLOW_TRACKING_URI") or f"sqlite:///{home / 'mlflow.db'}",
        mlflow_artifact_root=env.get("MLFLOW_ARTIFACT_ROOT") or (home / "mlruns").as_uri(),
        mlflow_ui_url=(env.get("MLFLOW_UI_URL") or "http://127.0.0.1:5000").rstrip("/"),
        compute=compute,
        spark_master=env.get("SPARK_MASTER", "local[2]"),
        uc_catalog=uc_catalog,
        uc_schema=uc_schema,
        databricks_cluster_id=env.get("DATABRICKS_CLUSTER_ID") or None,
        databricks_new_cluster=env.get("DATABRICKS_NEW_CLUSTER") or None,
        databricks_job_python_file=env.get("DATABRICKS_JOB_PYTHON_FILE") or None,
    )


@functools.cache
def get_settings() -> Settings:
    """Settings of this process, read once."""
    return load_settings()


DAGSTER_YAML = """\
# Written by pipeline on first use: sqlite storage under DAGSTER_HOME.
storage:
  sqlite:
    base_dir: {base_dir}
concurrency:
  runs:
    max_concurrent_runs: 4
  pools:
    default_limit: 1
telemetry:
  enabled: false
"""


def ensure_dagster_home(settings: Settings) -> Path:
    """Create ``DAGSTER_HOME`` with a sqlite ``dagster.yaml`` unless one exists.

    The ``model_training`` pool limit of one keeps heavy model runs from
    competing for the two cores of a laptop; raise it with
    ``dagster instance concurrency set model_training N``.
    """
    settings.dagster_home.mkdir(parents=True, exist_ok=True)
    config = settings.dagster_home / "dagster.yaml"
    if not config.exists():
        # JSON string syntax is valid YAML: a quoted path survives spaces and ``#``
        # (which would otherwise start a YAML comment and truncate the path)
        base_dir = json.dumps(str(settings.dagster_home / "storage"))
        config.write_text(DAGSTER_YAML.format(base_dir=base_dir))
    return settings.dagster_home
