"""Ship the project to a Databricks workspace: the wheel, and where runs are tracked.

``pipeline deploy`` builds the project's wheel with ``uv build`` (offline: the build
backend comes from this virtualenv, no index is asked) and uploads it with the Databricks
SDK's ``WorkspaceClient`` to

    <root>/<version>/<content hash>/pipeline-<version>-py3-none-any.whl

The root is a DBFS folder (``dbfs:/...``, uploaded over the DBFS API) or a folder of a Unity
Catalog volume (``/Volumes/<catalog>/<schema>/<volume>/...``, uploaded over the Files API,
``PUT /api/2.0/fs/files{path}``); see :func:`wheel_root_kind`.

The content hash covers the wheel's entries (names and bytes), not the zip's timestamps,
so rebuilding unchanged code gives the same path, and a path that already holds a file of
the same size is not uploaded again. Job tasks name the path in ``libraries: [{"whl":
...}]``, so a cluster runs exactly the code of that build.

Experiments on a Databricks tracking server are named after the git branch: see
:func:`pipeline.settings.experiment_root`.
"""

import hashlib
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_WHEEL_ROOT = "dbfs:/pipeline/wheels"
# /Volumes/<catalog>/<schema>/<volume>[/<folder>...]: Unity Catalog names, plain folder names
_VOLUME_ROOT = re.compile(
    r"/Volumes/[A-Za-z0-9_-]+/[A-Za-z0-9_-]+/[A-Za-z0-9_-]+(?:/(?!\.\.?(?:/|$))[A-Za-z0-9._-]+)*"
)
_BUILD_TIMEOUT_SECONDS = 300
_SOURCE_DATE_EPOCH = "315532800"  # 1980-01-01, the earliest time a zip entry can hold


class DeployError(RuntimeError):
    """The wheel cannot be built or uploaded."""


@dataclass(frozen=True)
class Wheel:
    """A built wheel and its identity.

    Attributes
    ----------
    path : pathlib.Path
        The wheel file.
    version : str
        The project version in its name.
    content_hash : str
        SHA-256 over the sorted entries (name and bytes), independent of zip timestamps.
    """

    path: Path
    version: str
    content_hash: str

    def target(self, root: str = DEFAULT_WHEEL_ROOT) -> str:
        """Where the wheel goes under ``root``: named by version and content hash."""
        return f"{root.rstrip('/')}/{self.version}/{self.content_hash[:16]}/{self.path.name}"


def project_root() -> Path:
    """The checkout this package is imported from (it holds ``pyproject.toml``).

    Raises
    ------
    DeployError
        When the package is installed from a wheel, not run from a checkout.
    """
    root = Path(__file__).resolve().parent.parent
    if not (root / "pyproject.toml").is_file():
        raise DeployError(f"{root} holds no pyproject.toml: deploy from a checkout")
    return root


def content_hash(wheel: bytes) -> str:
    """SHA-256 of a wheel's entries (sorted names and bytes), not of the zip itself."""
    digest = hashlib.sha256()
    with zipfile.ZipFile(io.BytesIO(wheel)) as archive:
        for name in sorted(archive.namelist()):
            data = archive.read(name)
            digest.update(f"{name}\0{len(data)}\0".encode())
            digest.update(data)
    return digest.hexdigest()


def build_wheel(out_dir: Path, root: Path | None = None) -> Wheel:
    """Build the project's wheel into ``out_dir`` with ``uv build``, offline.

    The sources are copied to a temporary folder first (tracked layout only: the
    package, ``pyproject.toml``, README), so no ``build/`` leftovers of an earlier build
    end up in the wheel and nothing is written to the checkout.

    Raises
    ------
    DeployError
        When ``uv`` is missing or the build fails (its output is in the message).
    """
    root = root or project_root()
    uv = shutil.which("uv")
    if uv is None:
        raise DeployError("`uv` is not on PATH; install it (pip install uv) to build the wheel")
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="pipeline-wheel-") as tmp:
        source = Path(tmp) / "src"
        source.mkdir()
        for name in ("pyproject.toml", "README.md"):
            shutil.copy2(root / name, source / name)
        shutil.copytree(
            root / "pipeline", source / "pipeline", ignore=shutil.ignore_patterns("__pycache__")
        )
        done = subprocess.run(  # noqa: S603  (fixed argv: uv, this interpreter, a temp folder)
            [
                uv,
                "build",
                "--wheel",
                "--offline",
                "--no-build-isolation",
                "--python",
                sys.executable,
                "--out-dir",
                str(Path(tmp) / "dist"),
                str(source),
            ],
            capture_output=True,
            text=True,
            timeout=_BUILD_TIMEOUT_SECONDS,
            # fixed zip timestamps: unchanged code gives the same bytes, not only entries
            env={**os.environ, "SOURCE_DATE_EPOCH": _SOURCE_DATE_EPOCH},
            check=False,
        )
        if done.returncode != 0:
            raise DeployError(f"uv build failed ({done.returncode}):\n{done.stderr[-3000:]}")
        (built,) = (Path(tmp) / "dist").glob("*.whl")
        target = out_dir / built.name
        shutil.copy2(built, target)
    data = target.read_bytes()
    return Wheel(path=target, version=target.name.split("-")[1], content_hash=content_hash(data))


def wheel_root_kind(root: str) -> str:
    """``"dbfs"`` for a ``dbfs:/...`` root, ``"volume"`` for a Unity Catalog volume folder.

    A volume root is ``/Volumes/<catalog>/<schema>/<volume>`` with an optional folder below
    it; catalog, schema and volume are ``[A-Za-z0-9_-]+``, folders plain names (no ``..``).

    Raises
    ------
    DeployError
        For anything else, naming the value.
    """
    if root.startswith("dbfs:/"):
        return "dbfs"
    if root.startswith("/Volumes/") or root == "/Volumes":
        if _VOLUME_ROOT.fullmatch(root.rstrip("/")):
            return "volume"
        raise DeployError(
            f"wheel root {root!r} is not a Unity Catalog volume folder: expected "
            "/Volumes/<catalog>/<schema>/<volume>[/<folder>...] with catalog, schema and "
            "volume names of letters, digits, '_' or '-'"
        )
    raise DeployError(
        f"wheel root {root!r} is neither a DBFS path (dbfs:/...) nor a Unity Catalog volume "
        "folder (/Volumes/<catalog>/<schema>/<volume>/...)"
    )


def upload_wheel(workspace: Any, wheel: Wheel, root: str = DEFAULT_WHEEL_ROOT) -> tuple[str, bool]:
    """Upload ``wheel`` under ``root`` unless the same build is there already.

    A build is "there already" when its path (version and content hash) holds a file of the
    wheel's size: DBFS is asked with ``get-status``, a volume with the Files API's metadata
    call (``HEAD /api/2.0/fs/files{path}``). A volume upload first creates the folder
    (``PUT /api/2.0/fs/directories{folder}``, idempotent), then ``PUT``s the bytes.

    Parameters
    ----------
    workspace
        A ``databricks.sdk.WorkspaceClient``.
    root
        A DBFS folder, ``dbfs:/...``, or a volume folder, ``/Volumes/<c>/<s>/<v>/...``.

    Returns
    -------
    tuple of (str, bool)
        The wheel's workspace path (for ``libraries: [{"whl": path}]``) and whether it was
        uploaded (``False``: an identical build was found).

    Raises
    ------
    DeployError
        When ``root`` is neither (see :func:`wheel_root_kind`).
    """
    from databricks.sdk.errors import NotFound

    if wheel_root_kind(root) == "volume":
        return _upload_to_volume(workspace, wheel, root)
    target = wheel.target(root)
    api_path = target.removeprefix("dbfs:")
    size = wheel.path.stat().st_size
    try:
        status = workspace.dbfs.get_status(api_path)
    except NotFound:
        status = None
    if status is not None and not status.is_dir and status.file_size == size:
        return target, False
    with wheel.path.open("rb") as f:
        workspace.dbfs.upload(api_path, f, overwrite=True)
    return target, True


def _upload_to_volume(workspace: Any, wheel: Wheel, root: str) -> tuple[str, bool]:
    """:func:`upload_wheel` for a Unity Catalog volume, over the Files API."""
    from databricks.sdk.errors import NotFound

    target = wheel.target(root)
    size = wheel.path.stat().st_size
    try:
        metadata = workspace.files.get_metadata(target)
    except NotFound:
        metadata = None
    if metadata is not None and metadata.content_length == size:
        return target, False
    workspace.files.create_directory(target.rsplit("/", 1)[0])
    with wheel.path.open("rb") as f:
        workspace.files.upload(target, f, overwrite=True)
    return target, True


def deploy(
    environ: Mapping[str, str] | None = None,
    *,
    root: str | None = None,
    out_dir: Path | None = None,
    upload: bool = True,
) -> dict[str, Any]:
    """Build the wheel and upload it to the workspace of ``DATABRICKS_HOST``.

    Parameters
    ----------
    environ
        Where ``DATABRICKS_HOST``, ``DATABRICKS_TOKEN`` and ``PIPELINE_WHEEL_ROOT`` are
        read (default: the process environment).
    root
        Folder of the wheels, ``dbfs:/...`` or ``/Volumes/<catalog>/<schema>/<volume>/...``
        (default ``PIPELINE_WHEEL_ROOT``, else :data:`DEFAULT_WHEEL_ROOT`).
    out_dir
        Where the wheel is kept locally (default ``$PIPELINE_HOME/dist``).
    upload
        ``False`` builds only (no workspace needed).

    Returns
    -------
    dict
        ``wheel`` (local file), ``version``, ``content_hash``, ``path`` (workspace path for
        ``libraries: [{"whl": path}]``) and ``uploaded``.

    Raises
    ------
    DeployError
        When the root is not a DBFS or volume folder, the build fails, or the host or
        token is not set for an upload.
    """
    env = os.environ if environ is None else environ
    root = root or env.get("PIPELINE_WHEEL_ROOT") or DEFAULT_WHEEL_ROOT
    wheel_root_kind(root)  # a wrong root fails before the build, not after it
    home = Path(env.get("PIPELINE_HOME", ".pipeline")).expanduser().resolve()
    wheel = build_wheel(out_dir or home / "dist")
    result: dict[str, Any] = {
        "wheel": str(wheel.path),
        "version": wheel.version,
        "content_hash": wheel.content_hash,
        "path": wheel.target(root),
        "uploaded": False,
    }
    if not upload:
        return result
    host, token = env.get("DATABRICKS_HOST"), env.get("DATABRICKS_TOKEN")
    if not host or not token:
        raise DeployError("set DATABRICKS_HOST and DATABRICKS_TOKEN to upload the wheel")
    from databricks.sdk import WorkspaceClient

    workspace = WorkspaceClient(host=host, token=token, auth_type="pat")
    result["path"], result["uploaded"] = upload_wheel(workspace, wheel, root)
    return result


POSTGRES_DAGSTER_YAML = """\
# Dagster instance shared by more than one machine (webserver, daemon, run workers):
# runs, event logs and schedules/sensors in PostgreSQL (dagster-postgres). The password
# is read from the environment of each process, never written here.
storage:
  postgres:
    postgres_db:
      hostname: {hostname}
      port: {port}
      db_name: {db_name}
      username: {username}
      password:
        env: {password_env}
      # psycopg2 (dagster-postgres' driver): SQLAlchemy's default for `postgresql` is psycopg 3
      scheme: postgresql+psycopg2
run_monitoring:
  enabled: true
telemetry:
  enabled: false
nux:
  enabled: false
"""


def write_postgres_instance(
    dagster_home: Path,
    *,
    hostname: str,
    port: int,
    db_name: str,
    username: str,
    password_env: str = "DAGSTER_PG_PASSWORD",  # noqa: S107  (a variable name, not a secret)
) -> Path:
    """Write the ``dagster.yaml`` of a Postgres-backed instance into ``dagster_home``."""
    dagster_home.mkdir(parents=True, exist_ok=True)
    path = dagster_home / "dagster.yaml"
    values = {"hostname": hostname, "db_name": db_name, "username": username}
    for key, value in values.items():
        if not re.fullmatch(r"[A-Za-z0-9._-]+", value):
            raise DeployError(f"Postgres {key} {value!r} is not a plain name")
    path.write_text(
        POSTGRES_DAGSTER_YAML.format(**values, port=int(port), password_env=password_env)
    )
    return path


def postgres_instance(dagster_home: Path) -> Any:
    """The Dagster instance of ``dagster_home``, checked to keep everything in Postgres.

    Raises
    ------
    DeployError
        When its run, event log or schedule storage is not dagster-postgres.
    """
    import dagster as dg
    from dagster_postgres import (
        PostgresEventLogStorage,
        PostgresRunStorage,
        PostgresScheduleStorage,
    )

    instance = dg.DagsterInstance.from_config(str(dagster_home))
    expected = {
        "run": (instance.run_storage, PostgresRunStorage),
        "event log": (instance.event_log_storage, PostgresEventLogStorage),
        "schedule": (instance.schedule_storage, PostgresScheduleStorage),
    }
    wrong = [
        f"{name} storage is {type(storage).__name__}"
        for name, (storage, kind) in expected.items()
        if not isinstance(getattr(storage, "_storage", storage), kind)
        and not isinstance(storage, kind)
    ]
    if wrong:
        instance.dispose()
        raise DeployError(f"{dagster_home}/dagster.yaml: " + "; ".join(wrong))
    return instance
