"""Typed settings, read once from the environment, with embedded defaults.

Everything a deployment may change is an environment variable, so the same code
runs on a laptop (local Delta folder, MLflow on sqlite, in-process compute) and
against object storage, an MLflow server or Databricks. Secrets are never
settings: credentials for object stores and Databricks are read by the client
libraries (or by ``dagster.EnvVar`` in resources) from their standard variables.
"""

import datetime as dt
import functools
import json
import os
import re
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

COMPUTE_BACKENDS = ("local", "spark", "databricks")
EXPERIMENT_ROOT = "/Shared/pipeline"
BRANCH_VARIABLES = (
    "PIPELINE_GIT_BRANCH",  # explicit override
    "GITHUB_HEAD_REF",  # GitHub Actions, pull requests
    "GITHUB_REF_NAME",  # GitHub Actions, pushes
    "CI_COMMIT_REF_NAME",  # GitLab CI
    "BUILD_SOURCEBRANCHNAME",  # Azure Pipelines
    "BRANCH_NAME",  # Jenkins
)
_UNSAFE_SEGMENT = re.compile(r"[^A-Za-z0-9._-]+")
LANDING_COMPLETION_MODES = ("settle", "marker")
_UC_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_ISO_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")

DEFAULT_PARTITIONS_START = "2026-01-01"
"""First daily partition when neither the environment nor the home names one."""

PARTITIONS_START_FILE = "partitions_start"
"""File under ``PIPELINE_HOME`` in which ``pipeline seed-landing`` records the demo's start."""


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
    databricks_wheel: str | None = None
    wheel_root: str = "dbfs:/pipeline/wheels"
    mlflow_experiment_root: str = ""
    landing_settle_s: int = 15
    landing_completion: str = "settle"
    service_timeout_s: int = 30
    ingest_max_runtime_s: int = 900
    run_max_runtime_s: int = 21_600
    vacuum_retention_hours: int = 168
    curate_bucket_rows: int = 1_000_000

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
    home = _home(env)
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
    completion = env.get("PIPELINE_LANDING_COMPLETION", "").strip().lower() or "settle"
    if completion not in LANDING_COMPLETION_MODES:
        raise SettingsError(
            f"PIPELINE_LANDING_COMPLETION={completion!r} is not one of "
            f"{', '.join(LANDING_COMPLETION_MODES)}"
        )
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
        databricks_wheel=env.get("DATABRICKS_WHEEL") or None,
        wheel_root=env.get("PIPELINE_WHEEL_ROOT") or "dbfs:/pipeline/wheels",
        mlflow_experiment_root=(
            env["MLFLOW_EXPERIMENT_ROOT"].rstrip("/")
            if "MLFLOW_EXPERIMENT_ROOT" in env
            else experiment_root(env.get("MLFLOW_TRACKING_URI") or "", env)
        ),
        landing_settle_s=_whole_number(env, "PIPELINE_LANDING_SETTLE_S", 15, 0, 86_400),
        landing_completion=completion,
        service_timeout_s=_whole_number(env, "PIPELINE_SERVICE_TIMEOUT_S", 30, 3, 600),
        ingest_max_runtime_s=_whole_number(env, "PIPELINE_INGEST_MAX_RUNTIME_S", 900, 60, 86_400),
        run_max_runtime_s=_whole_number(env, "PIPELINE_RUN_MAX_RUNTIME_S", 21_600, 60, 604_800),
        vacuum_retention_hours=_whole_number(env, "PIPELINE_VACUUM_RETENTION_HOURS", 168, 1, 8_760),
        curate_bucket_rows=_whole_number(
            env, "PIPELINE_CURATE_BUCKET_ROWS", 1_000_000, 1, 1_000_000_000
        ),
    )


def _whole_number(env: Mapping[str, str], var: str, default: int, low: int, high: int) -> int:
    """``env[var]`` as a whole number in ``[low, high]``; ``default`` when unset or blank.

    Raises
    ------
    SettingsError
        Naming the variable, the value and the bounds.
    """
    raw = env.get(var, "").strip()
    if not raw:
        return default
    if not raw.isdigit() or not low <= int(raw) <= high:
        raise SettingsError(f"{var}={raw!r} is not a whole number in [{low}, {high}]")
    return int(raw)


def git_branch(environ: Mapping[str, str] | None = None, cwd: Path | None = None) -> str:
    """The branch this code is built from: a CI variable when set, else git's HEAD."""
    env = os.environ if environ is None else environ
    for variable in BRANCH_VARIABLES:
        if env.get(variable, "").strip():
            return env[variable].strip()
    git = shutil.which("git")
    if git is None:
        return "unknown"
    done = subprocess.run(  # noqa: S603  (fixed argv)
        [git, "rev-parse", "--abbrev-ref", "HEAD"],
        capture_output=True,
        text=True,
        timeout=10,
        cwd=cwd or Path(__file__).resolve().parent,
        check=False,
    )
    return done.stdout.strip() if done.returncode == 0 and done.stdout.strip() else "unknown"


def sanitise_branch(branch: str) -> str:
    """A branch name as one path segment: ``feature/FX x`` -> ``feature-FX-x``."""
    return _UNSAFE_SEGMENT.sub("-", branch).strip("-.") or "unknown"


def experiment_root(tracking_uri: str, environ: Mapping[str, str] | None = None) -> str:
    """``/Shared/pipeline/<branch>`` when tracking on Databricks, else ``""`` (plain names)."""
    if tracking_uri.split("://")[0] not in ("databricks",):
        return ""
    return f"{EXPERIMENT_ROOT}/{sanitise_branch(git_branch(environ))}"


def _home(env: Mapping[str, str]) -> Path:
    return Path(env.get("PIPELINE_HOME", ".pipeline")).expanduser().resolve()


def _iso_date(value: str, source: str) -> str:
    """``value`` stripped if it is a calendar date ``YYYY-MM-DD``, else :class:`SettingsError`."""
    text = value.strip()
    if _ISO_DATE.match(text):
        try:
            return dt.date.fromisoformat(text).isoformat()
        except ValueError:
            pass
    raise SettingsError(f"{source}={value!r} is not an ISO date YYYY-MM-DD")


def partitions_start(environ: Mapping[str, str] | None = None) -> str:
    """First day of the daily partitions; monthly partitions start on the first of its month.

    Resolved, in this order, from

    1. ``PIPELINE_PARTITIONS_START`` when set (and not blank);
    2. the start recorded in ``$PIPELINE_HOME/partitions_start`` by
       :func:`record_partitions_start` (``pipeline seed-landing`` and ``pipeline demo``
       write the first day of the earliest demo month there);
    3. :data:`DEFAULT_PARTITIONS_START`.

    Definitions read it once, when :mod:`pipeline.partitions` is imported, so a code
    location keeps the same partitions for a given home.

    Parameters
    ----------
    environ
        Mapping to read; tests pass their own so nothing leaks between them.

    Returns
    -------
    str
        The start as ``YYYY-MM-DD``.

    Raises
    ------
    SettingsError
        When the variable or the recorded file does not hold an ISO date.
    """
    env = os.environ if environ is None else environ
    configured = env.get("PIPELINE_PARTITIONS_START")
    if configured and configured.strip():
        return _iso_date(configured, "PIPELINE_PARTITIONS_START")
    recorded = _home(env) / PARTITIONS_START_FILE
    if recorded.is_file():
        return _iso_date(recorded.read_text(), str(recorded))
    return DEFAULT_PARTITIONS_START


def record_partitions_start(home: Path, start: str) -> str:
    """Record ``start`` as the partitions start of ``home``, unless an earlier one is recorded.

    The recorded start only ever moves back, so partitions that a home already
    holds stay partitions of its definitions after a later re-seed.

    Parameters
    ----------
    home
        The ``PIPELINE_HOME`` to record in.
    start
        First day of the earliest partition the caller delivers, ``YYYY-MM-DD``.

    Returns
    -------
    str
        The start recorded after the call.

    Raises
    ------
    SettingsError
        When ``start`` or an already recorded start is not an ISO date.
    """
    start = _iso_date(start, "partitions start")
    path = home / PARTITIONS_START_FILE
    if path.is_file():
        start = min(start, _iso_date(path.read_text(), str(path)))
    home.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(f"{start}\n")
    tmp.replace(path)
    return start


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
# A run whose process died must not stay STARTED for ever: the daemon fails runs that
# exceed their max runtime (the run tag dagster/max_runtime, set on ingest runs, else
# max_runtime_seconds), never resumes them (the default launcher cannot), frees their
# pool slots, and the run retries below launch one fresh attempt.
run_monitoring:
  enabled: true
  start_timeout_seconds: 180
  cancel_timeout_seconds: 180
  max_runtime_seconds: {max_runtime_s}
  max_resume_run_attempts: 0
  poll_interval_seconds: 30
  free_slots_after_run_end_seconds: 60
run_retries:
  enabled: true
  max_retries: 1
  retry_on_asset_or_op_failure: false
telemetry:
  enabled: false
# no "join the community" dialog over the UI of a fresh instance (it covered menus
# opened in the first seconds of a session)
nux:
  enabled: false
"""


def ensure_dagster_home(settings: Settings) -> Path:
    """Create ``DAGSTER_HOME`` with a sqlite ``dagster.yaml`` unless one exists.

    The ``model_training`` pool limit of one keeps heavy model runs from
    competing for the two cores of a laptop; raise it with
    ``dagster instance concurrency set model_training N``.

    Run monitoring is on: the default run launcher cannot tell whether a run's
    process is alive, so a run still ``STARTED`` after its max runtime
    (``PIPELINE_RUN_MAX_RUNTIME_S``, or the ``dagster/max_runtime`` tag of ingest runs,
    ``PIPELINE_INGEST_MAX_RUNTIME_S``) is failed by the daemon and retried once
    (``run_retries`` without ``retry_on_asset_or_op_failure``: a failing asset is not
    retried, a dead worker is).
    """
    settings.dagster_home.mkdir(parents=True, exist_ok=True)
    config = settings.dagster_home / "dagster.yaml"
    if not config.exists():
        # JSON string syntax is valid YAML: a quoted path survives spaces and ``#``
        # (which would otherwise start a YAML comment and truncate the path)
        base_dir = json.dumps(str(settings.dagster_home / "storage"))
        config.write_text(
            DAGSTER_YAML.format(base_dir=base_dir, max_runtime_s=settings.run_max_runtime_s)
        )
    return settings.dagster_home
