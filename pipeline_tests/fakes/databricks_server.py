"""A loopback fake of a Databricks workspace: Jobs, Clusters, DBFS and Files REST endpoints.

A real HTTP server on ``127.0.0.1`` (stdlib ``http.server`` in a thread) that answers the
documented REST calls the Databricks SDK makes for Dagster Pipes, with the documented JSON
shapes and error codes, so the code under test talks to it exactly as to a workspace:

* Jobs: ``POST /api/2.{1,2}/jobs/runs/submit``, ``GET .../runs/get``,
  ``GET .../runs/get-output``, ``POST .../runs/cancel`` (the SDK in the lock file speaks
  2.2; 2.1 is served too, with the same shapes). A run goes ``PENDING`` -> ``RUNNING`` ->
  ``TERMINATED`` with ``result_state`` ``SUCCESS``, ``FAILED`` or ``CANCELED``.
* Clusters: ``GET /api/2.{0,1}/clusters/get`` for the clusters the fake was given.
* DBFS: ``POST /api/2.0/dbfs/put|mkdirs|delete|create|add-block|close|move`` and
  ``GET /api/2.0/dbfs/read|get-status|list``; ``read`` returns base64 ``data`` and
  ``bytes_read`` (0.5 MB by default, 1 MB at most); a missing path is HTTP 404
  ``RESOURCE_DOES_NOT_EXIST``. DBFS is a temp folder.
* Files API on Unity Catalog volumes (``/Volumes/<catalog>/<schema>/<volume>/...``, every
  volume exists): ``PUT|GET|HEAD|DELETE /api/2.0/fs/files{path}`` (raw octet-stream bodies;
  ``PUT`` takes ``?overwrite=true|false``, answers 204; ``GET``/``HEAD`` answer
  ``Content-Length``, ``Content-Type`` and ``Last-Modified``) and
  ``PUT|HEAD|GET /api/2.0/fs/directories{path}`` (create like ``mkdir -p``, exists?, list
  ``contents``). A missing file or directory is HTTP 404 ``NOT_FOUND`` (a ``HEAD`` answer has
  no body), writing over an existing file with ``overwrite=false`` is 409
  ``ALREADY_EXISTS``. Stricter than documented, on purpose: a file's parent directory must
  exist (404 otherwise), so callers create it. Volumes are a second temp folder.
* Every call needs ``Authorization: Bearer <token>``; anything else is HTTP 401.

On ``runs/submit`` the ``spark_python_task`` is executed the way a cluster would: a
subprocess runs the ``python_file`` read from the fake DBFS, with the task ``parameters``
as argv and, on a ``new_cluster``, its ``spark_env_vars`` in the environment. The
environment is otherwise minimal (nothing of the test process leaks in, ``PYTHONPATH`` and
credentials least of all), plus ``PIPELINE_DBFS_FUSE_ROOT`` pointing at the DBFS temp
folder: that is where the job sees DBFS, as a cluster sees it under ``/dbfs``.
``DATABRICKS_RUNTIME_VERSION`` is not set (jobs run without Spark).

Task ``libraries``: a ``whl`` on the fake DBFS or on a fake volume (``/Volumes/...``, the
documented form for volume wheels) is installed, as a cluster installs it, into
a fresh virtual environment (``python -m venv``, one per wheel content hash and fake
instance), and the task runs with that environment's interpreter, so the job imports the
platform from the installed wheel, never from the checkout. The environment stands for the
cluster's runtime: a ``.pth`` file puts the running interpreter's ``purelib`` after the
venv's own site-packages, and the wheel is installed with ``--no-deps`` (offline; its
dependencies are those of this virtualenv, not resolved from an index). A ``whl`` missing
from DBFS or the volume fails the run as a library installation error. ``pypi`` libraries
are recorded, not installed (the runtime has them); a task without a wheel runs with this
virtualenv's Python (``python``).

Every request is recorded (method, path, query, JSON body, whether it was authorised) so
tests assert what was asked. ``fail_runs`` makes the next runs fail like a lost cluster,
without executing anything.

Limits, stated so nobody mistakes this for Databricks: one task per submitted run;
``spark_python_task`` only; ``python_file`` must be on DBFS (``dbfs:/...``), not a
workspace file; no job clusters, no repair, no run listing; no directory ``DELETE`` and no
multipart or resumable uploads in the Files API; no volume permissions.
"""

import base64
import email.utils
import hashlib
import itertools
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

FUSE_ROOT_ENV = "PIPELINE_DBFS_FUSE_ROOT"  # honoured by pipeline.remote.loan_loss_job
READ_DEFAULT = 512 * 1024  # documented default ``length`` of dbfs/read
MAX_BLOCK = 1024 * 1024  # documented limit of dbfs/read length, put contents, add-block data
JOB_ID = 947  # one-time runs report a job id on real workspaces too
FILES_PREFIXES = ("/api/2.0/fs/files/", "/api/2.0/fs/directories/")


CLUSTER_ID = "0930-120000-fakeclu1"
"""The existing cluster the tests give a fake workspace."""


class ApiError(Exception):
    """An error answered as ``{"error_code": ..., "message": ...}`` with an HTTP status."""

    def __init__(self, status: int, error_code: str, message: str):
        super().__init__(message)
        self.status, self.error_code, self.message = status, error_code, message


class LibraryError(Exception):
    """A task library cannot be installed (the run fails before the task starts)."""


def _checked(argv: list[str]) -> str:
    """Run an install step; its stdout, or :class:`LibraryError` with its stderr."""
    done = subprocess.run(  # fixed argv: an interpreter or uv, temp paths
        argv, capture_output=True, text=True, timeout=300, check=False, env=_install_env()
    )
    if done.returncode != 0:
        raise LibraryError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr[-2000:]}")
    return done.stdout


def _install_env() -> dict[str, str]:
    """What the install steps see: no PYTHONPATH of the test process, no index."""
    keep = ("PATH", "HOME", "LANG", "PYENV_VERSION", "PYENV_ROOT", "UV_CACHE_DIR")
    env = {k: os.environ[k] for k in keep if k in os.environ}
    env["PIP_NO_INDEX"] = "1"
    return env


def _not_found(path: str) -> ApiError:
    return ApiError(404, "RESOURCE_DOES_NOT_EXIST", f"No file or directory exists on path {path}.")


@dataclass
class RawResponse:
    """A Files API answer: not JSON, a status, headers and bytes (sent unless ``HEAD``)."""

    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""


def _file_missing(path: str) -> ApiError:
    return ApiError(404, "NOT_FOUND", f"The file or directory {path} does not exist.")


@dataclass
class RecordedRequest:
    """One HTTP request as the fake saw it."""

    method: str
    path: str
    query: dict[str, str]
    body: Any
    authorized: bool
    status: int = 0
    size: int = 0  # bytes of the request body (the Files API sends raw bytes, not JSON)

    @property
    def endpoint(self) -> str:
        """The path without the API version, e.g. ``jobs/runs/submit`` or ``dbfs/put``;
        ``fs/files`` or ``fs/directories`` for the Files API (its target is in ``path``)."""
        parts = self.path.strip("/").split("/")
        if parts[:1] == ["api"] and parts[2:3] == ["fs"]:
            return "/".join(parts[2:4])
        return "/".join(parts[2:]) if parts[:1] == ["api"] else self.path

    @property
    def file_path(self) -> str:
        """The Files API target (``/Volumes/...``), ``""`` for other endpoints."""
        if not self.path.startswith(FILES_PREFIXES):
            return ""
        return unquote("/" + self.path.strip("/").split("/", 4)[4])


@dataclass
class FakeRun:
    """A one-time run of one task."""

    run_id: int
    task_run_id: int
    run_name: str
    task: dict[str, Any]
    submitted: dict[str, Any]
    start_time: int
    life_cycle_state: str = "PENDING"
    result_state: str | None = None
    state_message: str = "Waiting for cluster"
    end_time: int = 0
    python: str = ""
    argv: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    stdout: str = ""
    stderr: str = ""
    returncode: int | None = None
    error: str | None = None
    error_trace: str | None = None
    process: subprocess.Popen | None = None
    cancel_requested: bool = False

    @property
    def terminal(self) -> bool:
        return self.life_cycle_state in ("TERMINATED", "SKIPPED", "INTERNAL_ERROR")


def _millis() -> int:
    return int(time.time() * 1000)


class FakeDatabricksWorkspace:
    """The workspace: state, DBFS folder, runs and the HTTP server in front of them.

    Parameters
    ----------
    root : pathlib.Path
        Folder for DBFS (``root/dbfs``) and run scratch space (``root/runs``).
    token : str
        The only bearer token accepted.
    cluster_ids : sequence of str
        Existing clusters a task may name in ``existing_cluster_id``.
    python : str
        Interpreter that runs ``spark_python_task`` files (default: this one).
    run_timeout_seconds : float
        Kill a task still running after this long (a test should never hit it).

    Use as a context manager, or call :meth:`start` and :meth:`stop`.
    """

    def __init__(
        self,
        root: Path,
        *,
        token: str,
        cluster_ids: tuple[str, ...] = ("0930-120000-fakeclu1",),
        python: str = sys.executable,
        run_timeout_seconds: float = 300.0,
    ):
        self.root = Path(root)
        self.dbfs_root = self.root / "dbfs"
        self.dbfs_root.mkdir(parents=True, exist_ok=True)
        self.files_root = self.root / "volumes"  # /Volumes/<catalog>/<schema>/<volume>/...
        self.files_root.mkdir(exist_ok=True)
        (self.root / "runs").mkdir(exist_ok=True)
        self.token = token
        self.cluster_ids = tuple(cluster_ids)
        self.python = python
        self.run_timeout_seconds = run_timeout_seconds
        self.requests: list[RecordedRequest] = []
        self.runs: dict[int, FakeRun] = {}
        self.fail_runs: str | None = None
        self._ids = itertools.count(1001)
        self._handles: dict[int, Path] = {}
        self._handle_targets: dict[int, Path] = {}
        self._lock = threading.RLock()
        self._threads: list[threading.Thread] = []
        self._server: ThreadingHTTPServer | None = None
        self.venvs: dict[str, Path] = {}  # wheel SHA-256 -> virtual environment it is in
        self._venv_lock = threading.Lock()

    # ------------------------------------------------------------------ lifecycle

    @property
    def host(self) -> str:
        """``http://127.0.0.1:<port>``, the value for ``DATABRICKS_HOST``."""
        if self._server is None:
            raise RuntimeError("the fake workspace is not started")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "FakeDatabricksWorkspace":
        workspace = self

        class Handler(_Handler):
            fake = workspace

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        thread.start()
        return self

    def stop(self) -> None:
        with self._lock:
            for run in self.runs.values():
                if run.process is not None and run.process.poll() is None:
                    run.process.kill()
        for thread in self._threads:
            thread.join(timeout=30)
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> "FakeDatabricksWorkspace":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ test helpers

    def calls(self, endpoint: str) -> list[RecordedRequest]:
        """Recorded requests to ``endpoint`` (e.g. ``"jobs/runs/submit"``), in order."""
        return [r for r in self.requests if r.endpoint == endpoint]

    def local_path(self, dbfs_path: str) -> Path:
        """Where a DBFS path lives in the temp folder."""
        return self._local(dbfs_path.removeprefix("dbfs:"))

    def dbfs_files(self) -> list[str]:
        """Every file on the fake DBFS, as absolute DBFS paths."""
        return sorted(
            "/" + p.relative_to(self.dbfs_root).as_posix()
            for p in self.dbfs_root.rglob("*")
            if p.is_file()
        )

    def volume_path(self, path: str) -> Path:
        """Where a ``/Volumes/...`` path lives in the temp folder."""
        return self._volume_local(path)

    def volume_files(self) -> list[str]:
        """Every file on the fake volumes, as ``/Volumes/...`` paths."""
        return sorted(
            "/Volumes/" + p.relative_to(self.files_root).as_posix()
            for p in self.files_root.rglob("*")
            if p.is_file() and not p.name.startswith(".")
        )

    # ------------------------------------------------------------------ Files API (volumes)

    def _volume_local(self, path: Any) -> Path:
        parts = path.split("/") if isinstance(path, str) else []
        if parts[:2] != ["", "Volumes"] or len(parts) < 5 or not all(parts[2:5]):
            raise ApiError(
                400,
                "INVALID_PARAMETER_VALUE",
                "the fake workspace serves /Volumes/<catalog>/<schema>/<volume>/... only: "
                f"{path!r}",
            )
        names = [p for p in parts[2:] if p]
        if any(n in (".", "..") for n in names):
            raise ApiError(400, "INVALID_PARAMETER_VALUE", f"Invalid path: {path}")
        volume = self.files_root.joinpath(*names[:3])
        volume.mkdir(parents=True, exist_ok=True)  # every volume exists
        return self.files_root.joinpath(*names)

    @staticmethod
    def _file_headers(local: Path) -> dict[str, str]:
        stat = local.stat()
        return {
            "Content-Length": str(stat.st_size),
            "Content-Type": "application/octet-stream",
            "Last-Modified": email.utils.formatdate(stat.st_mtime, usegmt=True),
        }

    def files_read(self, path: str, with_body: bool) -> RawResponse:
        local = self._volume_local(path)
        if not local.is_file():
            raise _file_missing(path)
        body = local.read_bytes() if with_body else b""
        return RawResponse(200, self._file_headers(local), body)

    def files_upload(self, path: str, query: dict[str, str], data: bytes) -> RawResponse:
        local = self._volume_local(path)
        overwrite = query.get("overwrite", "true").lower() != "false"
        if local.is_dir():
            raise ApiError(409, "ALREADY_EXISTS", f"A directory exists at {path}.")
        if local.exists() and not overwrite:
            raise ApiError(409, "ALREADY_EXISTS", f"The file {path} already exists.")
        if not local.parent.is_dir():
            raise ApiError(404, "NOT_FOUND", f"The parent directory of {path} does not exist.")
        tmp = local.with_name(f".{local.name}.upload-{os.getpid()}-{threading.get_ident()}")
        tmp.write_bytes(data)
        tmp.replace(local)
        return RawResponse(204)

    def files_delete(self, path: str) -> RawResponse:
        local = self._volume_local(path)
        if not local.is_file():
            raise _file_missing(path)
        local.unlink()
        return RawResponse(204)

    def directories_create(self, path: str) -> RawResponse:
        local = self._volume_local(path)
        for folder in (local, *local.parents):
            if folder.is_file():
                raise ApiError(409, "ALREADY_EXISTS", f"A file exists at a prefix of {path}.")
            if folder == self.files_root:
                break
        local.mkdir(parents=True, exist_ok=True)
        return RawResponse(204)

    def directories_exists(self, path: str) -> RawResponse:
        if not self._volume_local(path).is_dir():
            raise _file_missing(path)
        return RawResponse(200)

    def directories_list(self, path: str) -> dict[str, Any]:
        local = self._volume_local(path)
        if not local.is_dir():
            raise _file_missing(path)
        base = path.rstrip("/")
        contents = []
        for child in sorted(local.iterdir()):
            if child.name.startswith("."):
                continue
            entry: dict[str, Any] = {
                "path": f"{base}/{child.name}" + ("/" if child.is_dir() else ""),
                "name": child.name,
                "is_directory": child.is_dir(),
            }
            if child.is_file():
                stat = child.stat()
                entry["file_size"] = stat.st_size
                entry["last_modified"] = int(stat.st_mtime * 1000)
            contents.append(entry)
        return {"contents": contents}

    def handle_files(self, method: str, path: str, query: dict[str, str], data: bytes) -> Any:
        """The Files API: ``path`` is the URL path (``/api/2.0/fs/{files,directories}/...``)."""
        kind = "files" if path.startswith(FILES_PREFIXES[0]) else "directories"
        target = unquote("/" + path.split("/", 5)[5])
        routes = {
            ("files", "PUT"): lambda: self.files_upload(target, query, data),
            ("files", "GET"): lambda: self.files_read(target, with_body=True),
            ("files", "HEAD"): lambda: self.files_read(target, with_body=False),
            ("files", "DELETE"): lambda: self.files_delete(target),
            ("directories", "PUT"): lambda: self.directories_create(target),
            ("directories", "HEAD"): lambda: self.directories_exists(target),
            ("directories", "GET"): lambda: self.directories_list(target),
        }
        if (kind, method) not in routes:
            raise ApiError(404, "ENDPOINT_NOT_FOUND", f"No API found for '{method} {path}'")
        return routes[kind, method]()

    # ------------------------------------------------------------------ DBFS

    def _local(self, path: Any) -> Path:
        if not isinstance(path, str) or not path.startswith("/"):
            raise ApiError(400, "INVALID_PARAMETER_VALUE", f"Path must be absolute: {path!r}")
        parts = [p for p in path.split("/") if p]
        if ".." in parts:
            raise ApiError(400, "INVALID_PARAMETER_VALUE", f"Invalid path: {path}")
        return self.dbfs_root.joinpath(*parts)

    def _status(self, path: str, local: Path) -> dict[str, Any]:
        stat = local.stat()
        return {
            "path": path.rstrip("/") or "/",
            "is_dir": local.is_dir(),
            "file_size": 0 if local.is_dir() else stat.st_size,
            "modification_time": int(stat.st_mtime * 1000),
        }

    def _parent_ok(self, path: str, local: Path) -> None:
        for parent in local.parents:
            if parent == self.dbfs_root.parent:
                break
            if parent.is_file():
                raise ApiError(
                    400, "RESOURCE_ALREADY_EXISTS", f"A file exists at a parent of {path}."
                )

    def _write_file(self, path: str, data: bytes, overwrite: bool) -> None:
        local = self._local(path)
        if local.is_dir():
            raise ApiError(400, "RESOURCE_ALREADY_EXISTS", f"A directory exists at {path}.")
        if local.exists() and not overwrite:
            raise ApiError(
                400, "RESOURCE_ALREADY_EXISTS", f"A file or directory already exists at {path}."
            )
        self._parent_ok(path, local)
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_name(f".{local.name}.upload-{os.getpid()}-{threading.get_ident()}")
        tmp.write_bytes(data)
        tmp.replace(local)

    @staticmethod
    def _b64(value: Any, what: str) -> bytes:
        try:
            return base64.b64decode(value or "", validate=True)
        except (ValueError, TypeError) as exc:
            raise ApiError(400, "INVALID_PARAMETER_VALUE", f"{what} is not base64") from exc

    def dbfs_put(self, body: dict[str, Any]) -> dict[str, Any]:
        data = self._b64(body.get("contents"), "contents")
        if len(data) > MAX_BLOCK:
            raise ApiError(
                400,
                "MAX_BLOCK_SIZE_EXCEEDED",
                f"The contents of a put call cannot exceed {MAX_BLOCK} bytes; use create, "
                "add-block and close",
            )
        self._write_file(body.get("path"), data, bool(body.get("overwrite")))
        return {}

    def dbfs_mkdirs(self, body: dict[str, Any]) -> dict[str, Any]:
        path = body.get("path")
        local = self._local(path)
        if local.is_file():
            raise ApiError(400, "RESOURCE_ALREADY_EXISTS", f"A file exists at {path}.")
        self._parent_ok(path, local)
        local.mkdir(parents=True, exist_ok=True)
        return {}

    def dbfs_delete(self, body: dict[str, Any]) -> dict[str, Any]:
        path = body.get("path")
        local = self._local(path)
        if local == self.dbfs_root:
            raise ApiError(400, "INVALID_PARAMETER_VALUE", "Cannot delete the DBFS root.")
        if local.is_dir():
            if any(local.iterdir()) and not body.get("recursive"):
                raise ApiError(
                    400, "IO_ERROR", f"Directory {path} is not empty; set recursive to delete it."
                )
            shutil.rmtree(local)
        elif local.exists():
            local.unlink()
        return {}  # deleting a missing path succeeds, as on DBFS

    def dbfs_create(self, body: dict[str, Any]) -> dict[str, Any]:
        path = body.get("path")
        local = self._local(path)
        if local.is_dir() or (local.exists() and not body.get("overwrite")):
            raise ApiError(
                400, "RESOURCE_ALREADY_EXISTS", f"A file or directory already exists at {path}."
            )
        self._parent_ok(path, local)
        handle = next(self._ids)
        buffer = self.root / "runs" / f"handle-{handle}"
        buffer.write_bytes(b"")
        with self._lock:
            self._handles[handle] = buffer
            self._handle_targets[handle] = local
        return {"handle": handle}

    def _handle(self, body: dict[str, Any]) -> tuple[int, Path]:
        handle = body.get("handle")
        with self._lock:
            if handle not in self._handles:
                raise ApiError(404, "RESOURCE_DOES_NOT_EXIST", f"Handle {handle!r} does not exist.")
            return handle, self._handles[handle]

    def dbfs_add_block(self, body: dict[str, Any]) -> dict[str, Any]:
        _, buffer = self._handle(body)
        data = self._b64(body.get("data"), "data")
        if len(data) > MAX_BLOCK:
            raise ApiError(
                400, "MAX_BLOCK_SIZE_EXCEEDED", f"A block cannot exceed {MAX_BLOCK} bytes."
            )
        with buffer.open("ab") as f:
            f.write(data)
        return {}

    def dbfs_close(self, body: dict[str, Any]) -> dict[str, Any]:
        handle, buffer = self._handle(body)
        with self._lock:
            target = self._handle_targets.pop(handle)
            del self._handles[handle]
        target.parent.mkdir(parents=True, exist_ok=True)
        buffer.replace(target)
        return {}

    def dbfs_move(self, body: dict[str, Any]) -> dict[str, Any]:
        source, dest = body.get("source_path"), body.get("destination_path")
        src, dst = self._local(source), self._local(dest)
        if not src.exists():
            raise _not_found(source)
        if dst.exists():
            raise ApiError(400, "RESOURCE_ALREADY_EXISTS", f"{dest} already exists.")
        dst.parent.mkdir(parents=True, exist_ok=True)
        src.replace(dst)
        return {}

    def dbfs_read(self, query: dict[str, str]) -> dict[str, Any]:
        path = query.get("path")
        local = self._local(path)
        if not local.exists():
            raise _not_found(path)
        if local.is_dir():
            raise ApiError(400, "INVALID_PARAMETER_VALUE", f"{path} is a directory.")
        try:
            offset = int(query.get("offset", 0))
            length = int(query.get("length", READ_DEFAULT))
        except ValueError as exc:
            raise ApiError(400, "INVALID_PARAMETER_VALUE", str(exc)) from exc
        if offset < 0 or length < 0:
            raise ApiError(400, "INVALID_PARAMETER_VALUE", "offset and length must be >= 0")
        if length > MAX_BLOCK:
            raise ApiError(
                400, "MAX_READ_SIZE_EXCEEDED", f"Cannot read more than {MAX_BLOCK} bytes at once."
            )
        with local.open("rb") as f:
            f.seek(offset)
            data = f.read(length)
        return {"bytes_read": len(data), "data": base64.b64encode(data).decode("ascii")}

    def dbfs_get_status(self, query: dict[str, str]) -> dict[str, Any]:
        path = query.get("path")
        local = self._local(path)
        if not local.exists():
            raise _not_found(path)
        return self._status(path, local)

    def dbfs_list(self, query: dict[str, str]) -> dict[str, Any]:
        path = query.get("path")
        local = self._local(path)
        if not local.exists():
            raise _not_found(path)
        if local.is_file():
            return {"files": [self._status(path, local)]}
        base = path.rstrip("/")
        files = [
            self._status(f"{base}/{child.name}", child)
            for child in sorted(local.iterdir())
            if not child.name.startswith(".")
        ]
        return {"files": files} if files else {}

    # ------------------------------------------------------------------ clusters

    def cluster(self, cluster_id: str) -> dict[str, Any]:
        if cluster_id not in self.cluster_ids:
            raise ApiError(400, "INVALID_PARAMETER_VALUE", f"Cluster {cluster_id} does not exist")
        return {
            "cluster_id": cluster_id,
            "cluster_name": "fake loopback cluster",
            "spark_version": "15.4.x-scala2.12",
            "node_type_id": "fake-node",
            "num_workers": 0,
            "state": "RUNNING",
            "state_message": "",
            "cluster_source": "UI",
            "spark_env_vars": {},
        }

    # ------------------------------------------------------------------ jobs

    def submit(self, body: dict[str, Any]) -> dict[str, Any]:
        tasks = body.get("tasks")
        if not isinstance(tasks, list) or not tasks:
            raise ApiError(400, "INVALID_PARAMETER_VALUE", "A run must have at least one task.")
        if len(tasks) > 1:
            raise ApiError(
                400, "INVALID_PARAMETER_VALUE", "the fake workspace runs one task per submit"
            )
        task = tasks[0]
        if not task.get("task_key"):
            raise ApiError(400, "INVALID_PARAMETER_VALUE", "Task key must be provided.")
        python_task = task.get("spark_python_task")
        if not isinstance(python_task, dict) or not python_task.get("python_file"):
            raise ApiError(
                400,
                "INVALID_PARAMETER_VALUE",
                "the fake workspace runs spark_python_task with a python_file only",
            )
        has_existing, has_new = "existing_cluster_id" in task, "new_cluster" in task
        if has_existing == has_new:
            raise ApiError(
                400,
                "INVALID_PARAMETER_VALUE",
                "Exactly one of existing_cluster_id or new_cluster must be specified.",
            )
        if has_existing:
            self.cluster(task["existing_cluster_id"])
        run_id, task_run_id = next(self._ids), next(self._ids)
        run = FakeRun(
            run_id=run_id,
            task_run_id=task_run_id,
            run_name=body.get("run_name") or "Untitled",
            task=task,
            submitted=body,
            start_time=_millis(),
        )
        with self._lock:
            self.runs[run_id] = run
            thread = threading.Thread(target=self._execute, args=(run,), daemon=True)
            self._threads.append(thread)
        thread.start()
        return {"run_id": run_id}

    def _finish(self, run: FakeRun, result: str, message: str) -> None:
        with self._lock:
            run.life_cycle_state, run.result_state = "TERMINATED", result
            run.state_message, run.end_time = message, _millis()

    def _execute(self, run: FakeRun) -> None:
        time.sleep(0.05)  # PENDING is observable, as on a workspace
        if self.fail_runs is not None:
            run.error = self.fail_runs
            self._finish(run, "FAILED", self.fail_runs)
            return
        try:
            run.python = self._interpreter(run.task.get("libraries") or [])
        except LibraryError as exc:
            run.error = str(exc)
            self._finish(run, "FAILED", f"Library installation failed: {exc}")
            return
        python_file = run.task["spark_python_task"]["python_file"]
        if not python_file.startswith("dbfs:/"):
            run.error = f"the fake workspace runs DBFS python files only, got {python_file}"
            self._finish(run, "FAILED", run.error)
            return
        script = self.local_path(python_file)
        if not script.is_file():
            run.error = f"FileNotFoundError: {python_file} does not exist"
            self._finish(run, "FAILED", f"Cannot read the python file {python_file}.")
            return
        scratch = Path(tempfile.mkdtemp(prefix=f"run-{run.run_id}-", dir=self.root / "runs"))
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(scratch),
            "LANG": "C.UTF-8",
            "PYTHONUNBUFFERED": "1",
            FUSE_ROOT_ENV: str(self.dbfs_root),
        }
        if "new_cluster" in run.task:
            env.update(run.task["new_cluster"].get("spark_env_vars") or {})
        run.argv = [run.python, str(script), *run.task["spark_python_task"].get("parameters", [])]
        run.env = env
        out_path, err_path = scratch / "stdout", scratch / "stderr"
        with out_path.open("wb") as out, err_path.open("wb") as err:
            process = subprocess.Popen(  # the argv is this fake's own interpreter and file
                run.argv, cwd=scratch, env=env, stdout=out, stderr=err
            )
            with self._lock:
                run.process = process
                run.life_cycle_state, run.state_message = "RUNNING", ""
            try:
                returncode = process.wait(timeout=self.run_timeout_seconds)
            except subprocess.TimeoutExpired:
                process.kill()
                returncode = process.wait()
                run.error = f"timed out after {self.run_timeout_seconds} s"
        run.stdout = out_path.read_text(errors="replace")
        run.stderr = err_path.read_text(errors="replace")
        run.returncode = returncode
        if run.cancel_requested:
            self._finish(run, "CANCELED", "Run cancelled.")
        elif returncode == 0:
            self._finish(run, "SUCCESS", "")
        else:
            lines = [line for line in run.stderr.splitlines() if line.strip()]
            run.error = run.error or (lines[-1] if lines else f"exit code {returncode}")
            run.error_trace = run.stderr
            self._finish(
                run,
                "FAILED",
                f"Task {run.task['task_key']} failed with message: Workload failed, see run "
                "output for details.",
            )

    def _interpreter(self, libraries: list[Any]) -> str:
        """The Python that runs the task: a venv with the task's wheel installed, if any."""
        wheels = [lib["whl"] for lib in libraries if isinstance(lib, dict) and "whl" in lib]
        if not wheels:
            return self.python
        if len(wheels) > 1:
            raise LibraryError(f"the fake workspace installs one wheel per task, got {wheels}")
        (wheel,) = wheels
        if isinstance(wheel, str) and wheel.startswith("dbfs:/"):
            local = self.local_path(wheel)
        elif isinstance(wheel, str) and wheel.startswith("/Volumes/"):
            try:
                local = self.volume_path(wheel)
            except ApiError as exc:
                raise LibraryError(f"{wheel} is not a volume file: {exc.message}") from exc
        else:
            raise LibraryError(
                f"the fake workspace installs DBFS or volume wheels only, got {wheel!r}"
            )
        if not local.is_file():
            raise LibraryError(f"{wheel} does not exist")
        digest = hashlib.sha256(local.read_bytes()).hexdigest()
        with self._venv_lock:
            if digest not in self.venvs:
                self.venvs[digest] = self._install(local, self.root / "venvs" / digest[:16])
            return str(self.venvs[digest] / "bin" / "python")

    def _install(self, wheel: Path, venv: Path) -> Path:
        """A fresh venv over this interpreter's packages, with ``wheel`` installed (no deps)."""
        python = venv / "bin" / "python"
        uv = shutil.which("uv")
        if uv is not None:
            install = [uv, "pip", "install", "--offline", "--no-deps", "--python", str(python)]
        else:
            install = [self.python, "-m", "pip", "install", "--no-index", "--no-deps"]
            install += ["--python", str(python)]
        _checked([self.python, "-m", "venv", "--without-pip", str(venv)])
        purelib = _checked(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]
        ).strip()
        # the "runtime": this interpreter's packages, after the venv's own site-packages
        Path(purelib, "_fake_runtime.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
        _checked([*install, str(wheel)])
        return venv

    def _find_run(self, value: Any) -> FakeRun:
        try:
            run_id = int(value)
        except (TypeError, ValueError) as exc:
            raise ApiError(400, "INVALID_PARAMETER_VALUE", f"Invalid run_id {value!r}") from exc
        with self._lock:
            if run_id in self.runs:
                return self.runs[run_id]
            for run in self.runs.values():
                if run.task_run_id == run_id:
                    return run
        raise ApiError(400, "INVALID_PARAMETER_VALUE", f"Run {run_id} does not exist.")

    def _state(self, run: FakeRun) -> dict[str, Any]:
        state = {
            "life_cycle_state": run.life_cycle_state,
            "state_message": run.state_message,
            "user_cancelled_or_timedout": run.cancel_requested,
        }
        if run.result_state is not None:
            state["result_state"] = run.result_state
        return state

    def _task_view(self, run: FakeRun) -> dict[str, Any]:
        view = {
            key: value
            for key, value in run.task.items()
            if key
            in (
                "task_key",
                "spark_python_task",
                "existing_cluster_id",
                "new_cluster",
                "libraries",
                "timeout_seconds",
            )
        }
        return {
            **view,
            "run_id": run.task_run_id,
            "state": self._state(run),
            "start_time": run.start_time,
            "end_time": run.end_time,
            "attempt_number": 0,
            "run_page_url": self._page(run.task_run_id),
            "cluster_instance": {
                "cluster_id": run.task.get("existing_cluster_id", f"fake-job-cluster-{run.run_id}")
            },
        }

    def _page(self, run_id: int) -> str:
        return f"{self.host}/?o=0#job/{JOB_ID}/run/{run_id}"

    def get_run(self, query: dict[str, str]) -> dict[str, Any]:
        run = self._find_run(query.get("run_id"))
        with self._lock:
            return {
                "job_id": JOB_ID,
                "run_id": run.run_id,
                "number_in_job": run.run_id,
                "original_attempt_run_id": run.run_id,
                "creator_user_name": "fake-user@example.com",
                "run_name": run.run_name,
                "run_type": "SUBMIT_RUN",
                "format": "MULTI_TASK",
                "state": self._state(run),
                "start_time": run.start_time,
                "end_time": run.end_time,
                "setup_duration": 0,
                "execution_duration": max(run.end_time - run.start_time, 0) if run.end_time else 0,
                "cleanup_duration": 0,
                "run_page_url": self._page(run.run_id),
                "tasks": [self._task_view(run)],
            }

    def get_output(self, query: dict[str, str]) -> dict[str, Any]:
        run = self._find_run(query.get("run_id"))
        if int(query["run_id"]) == run.run_id:
            raise ApiError(
                400,
                "INVALID_PARAMETER_VALUE",
                "Retrieving the output of runs with multiple tasks is not supported. Please "
                "retrieve the output of each individual task run instead.",
            )
        with self._lock:
            output: dict[str, Any] = {"metadata": self._task_view(run)}
            if run.terminal:
                output["logs"] = run.stdout + run.stderr
                output["logs_truncated"] = False
            if run.error is not None:
                output["error"] = run.error
            if run.error_trace is not None:
                output["error_trace"] = run.error_trace
            return output

    def cancel(self, body: dict[str, Any]) -> dict[str, Any]:
        run = self._find_run(body.get("run_id"))
        with self._lock:
            run.cancel_requested = True
            if run.process is not None and run.process.poll() is None:
                run.process.terminate()
            elif not run.terminal and run.process is None:
                run.life_cycle_state, run.result_state = "TERMINATED", "CANCELED"
                run.state_message, run.end_time = "Run cancelled.", _millis()
        return {}

    # ------------------------------------------------------------------ routing

    def handle(self, method: str, path: str, query: dict[str, str], body: Any) -> Any:
        parts = path.strip("/").split("/")
        if len(parts) < 3 or parts[0] != "api":
            raise ApiError(404, "ENDPOINT_NOT_FOUND", f"No API found for '{method} {path}'")
        version, endpoint = parts[1], "/".join(parts[2:])
        routes = {
            ("POST", "dbfs/put", ("2.0",)): self.dbfs_put,
            ("POST", "dbfs/mkdirs", ("2.0",)): self.dbfs_mkdirs,
            ("POST", "dbfs/delete", ("2.0",)): self.dbfs_delete,
            ("POST", "dbfs/create", ("2.0",)): self.dbfs_create,
            ("POST", "dbfs/add-block", ("2.0",)): self.dbfs_add_block,
            ("POST", "dbfs/close", ("2.0",)): self.dbfs_close,
            ("POST", "dbfs/move", ("2.0",)): self.dbfs_move,
            ("GET", "dbfs/read", ("2.0",)): self.dbfs_read,
            ("GET", "dbfs/get-status", ("2.0",)): self.dbfs_get_status,
            ("GET", "dbfs/list", ("2.0",)): self.dbfs_list,
            ("GET", "clusters/get", ("2.0", "2.1")): lambda q: self.cluster(q.get("cluster_id")),
            ("POST", "jobs/runs/submit", ("2.1", "2.2")): self.submit,
            ("GET", "jobs/runs/get", ("2.1", "2.2")): self.get_run,
            ("GET", "jobs/runs/get-output", ("2.1", "2.2")): self.get_output,
            ("POST", "jobs/runs/cancel", ("2.1", "2.2")): self.cancel,
        }
        for (verb, name, versions), handler in routes.items():
            if verb == method and name == endpoint and version in versions:
                if method == "GET":
                    return handler(query)
                if not isinstance(body, dict):
                    raise ApiError(400, "MALFORMED_REQUEST", "Request body must be a JSON object")
                return handler(body)
        raise ApiError(404, "ENDPOINT_NOT_FOUND", f"No API found for '{method} {path}'")


class _Handler(BaseHTTPRequestHandler):
    """HTTP front of :class:`FakeDatabricksWorkspace`: auth, JSON, recording."""

    fake: FakeDatabricksWorkspace
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        """Keep the test output clean: requests are recorded, not printed."""

    def _serve(self, method: str) -> None:
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        files_api = url.path.startswith(FILES_PREFIXES)
        try:
            body = None if files_api else json.loads(raw) if raw else {}
        except (json.JSONDecodeError, UnicodeDecodeError):
            body = None
        authorized = self.headers.get("Authorization") == f"Bearer {self.fake.token}"
        record = RecordedRequest(method, url.path, query, body, authorized, size=len(raw))
        with self.fake._lock:
            self.fake.requests.append(record)
        if not authorized:
            status, payload = (
                HTTPStatus.UNAUTHORIZED,
                {
                    "error_code": "UNAUTHENTICATED",
                    "message": "Invalid access token.",
                },
            )
        else:
            try:
                if files_api:
                    payload = self.fake.handle_files(method, url.path, query, raw)
                else:
                    payload = self.fake.handle(method, url.path, query, body)
                status = HTTPStatus.OK
            except ApiError as exc:
                status = HTTPStatus(exc.status)
                payload = {"error_code": exc.error_code, "message": exc.message}
        if isinstance(payload, RawResponse):
            record.status = payload.status
            self.send_response(payload.status)
            headers = {"Content-Length": str(len(payload.body)), **payload.headers}
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()
            if method != "HEAD":
                self.wfile.write(payload.body)
            return
        record.status = int(status)
        data = json.dumps(payload).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if method != "HEAD":  # a HEAD answer has headers only, errors included
            self.wfile.write(data)

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    def do_PUT(self) -> None:
        self._serve("PUT")

    def do_HEAD(self) -> None:
        self._serve("HEAD")

    def do_DELETE(self) -> None:
        self._serve("DELETE")
