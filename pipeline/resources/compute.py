"""Where heavy work runs: this process, a Spark cluster, or Databricks.

Domain functions are pure and chunkable, so the same function runs in-process,
inside a Spark task (``mapInPandas`` over chunk ids) or in a Databricks job
launched through Dagster Pipes. Assets ask this resource to map a function over
chunks, or to run a packaged job script on Databricks, and never import Spark or
the Databricks SDK themselves.

Databricks jobs (``backend="databricks"``)
------------------------------------------
:meth:`ComputeResource.run_databricks_job` submits one of the scripts of
:mod:`pipeline.remote` as a ``spark_python_task`` with the Jobs API ``runs/submit``
through ``dagster_databricks.PipesDatabricksClient``, on the cluster named by
``DATABRICKS_CLUSTER_ID`` (or a ``new_cluster`` spec). What it ships first, over the
DBFS API under ``databricks_dbfs_root`` (default ``dbfs:/pipeline``):

* the script, to ``<root>/jobs/<script>``, unless ``databricks_job_python_file`` names
  one deployed some other way (a workspace file, a Git folder, a DBFS path);
* the pure code it imports, ``pipeline/domain`` and ``pipeline/remote`` as one zip named by
  its content hash (``<root>/jobs/pipeline-code-<sha>.zip``), so the cluster runs exactly
  the domain code of this process without a wheel being installed on it;
* the run's input files, to a folder of its own, ``<root>/runs/<dagster run>/<uuid>/``,
  deleted when the run is over.

A job reads its inputs and writes its outputs under ``/dbfs`` and reports each output's
SHA-256 in a Pipes custom message; the resource downloads the outputs, checks them
against the digests and hands them to the asset. The token is only ever sent in the
``Authorization`` header by the SDK: it is in no task parameter, no environment
variable of the job, no extra and no log line.
"""

import functools
import hashlib
import io
import json
import os
import sys
import uuid
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata, resources
from pathlib import Path
from typing import Any

from dagster import AssetExecutionContext, ConfigurableResource
from pydantic import PrivateAttr

from pipeline.dagster_private import named_run_pipes_client_class

BACKENDS = ("local", "spark", "databricks")
DEFAULT_DBFS_ROOT = "dbfs:/pipeline"
# what a cluster needs besides its runtime to start a job of pipeline.remote: the Pipes
# protocol and the one non-runtime import of pipeline.domain.loan_loss, pinned to this
# environment so both sides speak the same versions
JOB_PYPI_DISTRIBUTIONS = ("dagster-pipes", "polars")
_BUNDLED_PACKAGES = ("pipeline/domain", "pipeline/remote")
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)  # fixed timestamps: the bundle's hash depends on code only


class ComputeError(RuntimeError):
    """The configured backend cannot run the request."""


@dataclass(frozen=True)
class DatabricksJobResult:
    """What a Databricks job run handed back.

    Attributes
    ----------
    run_id : str
        The Databricks run id.
    run_page_url : str or None
        Link to the run in the workspace UI.
    message : dict
        The custom Pipes message that announced the outputs (digests, versions, timings).
    outputs : dict of str to bytes
        Each requested output file, checked against its reported SHA-256.
    """

    run_id: str
    run_page_url: str | None
    message: dict[str, Any]
    outputs: dict[str, bytes] = field(repr=False)


class ComputeResource(ConfigurableResource):
    """Chunked execution on the configured backend.

    Attributes
    ----------
    backend
        ``local`` (default), ``spark`` or ``databricks``.
    spark_master
        Spark master URL for ``backend="spark"`` (``local[2]`` on a laptop).
    databricks_host, databricks_token
        Read from ``DATABRICKS_HOST``/``DATABRICKS_TOKEN`` through ``EnvVar``;
        never logged.
    databricks_cluster_id
        Existing cluster for Pipes jobs.
    databricks_new_cluster
        JSON of a Jobs API ``new_cluster`` spec, used when no cluster id is set: each run
        then starts its own cluster (slower to start, nothing shared).
    databricks_job_python_file
        ``python_file`` of the task when the job script is deployed by other means
        (``dbfs:/...`` or ``/Workspace/...``); by default the packaged script is uploaded
        to ``<databricks_dbfs_root>/jobs/``.
    databricks_dbfs_root
        DBFS folder for the script, the code bundle and per-run exchange files.
    databricks_pypi_packages
        PyPI requirements installed on the cluster for the job; ``None`` pins
        :data:`JOB_PYPI_DISTRIBUTIONS` to the versions of this environment, ``[]``
        installs nothing (the cluster has them already).
    databricks_wheel
        ``libraries: [{"whl": ...}]`` instead of the zip bundle: the workspace path of a
        wheel uploaded by ``pipeline deploy``, or ``"build"`` to build this checkout's
        wheel and upload it (once per content hash) on first use.
    databricks_wheel_root
        Folder of uploaded wheels (``"build"`` uploads there): ``dbfs:/...`` (DBFS API) or
        a Unity Catalog volume folder ``/Volumes/<catalog>/<schema>/<volume>/...`` (Files
        API); tasks then install ``{"whl": "/Volumes/..."}``.
    databricks_poll_interval_seconds
        How often the run state is polled.
    databricks_timeout_seconds
        Databricks cancels a task still running after this long.
    """

    backend: str = "local"
    spark_master: str = "local[2]"
    databricks_host: str | None = None
    databricks_token: str | None = None
    databricks_cluster_id: str | None = None
    databricks_new_cluster: str | None = None
    databricks_job_python_file: str | None = None
    databricks_dbfs_root: str = DEFAULT_DBFS_ROOT
    databricks_pypi_packages: list[str] | None = None
    databricks_wheel: str | None = None
    databricks_wheel_root: str = "dbfs:/pipeline/wheels"
    databricks_poll_interval_seconds: float = 5.0
    databricks_timeout_seconds: int = 3600

    _spark: Any = PrivateAttr(default=None)
    _deployed: dict[str, str] = PrivateAttr(default_factory=dict)

    def map_chunks(
        self,
        fn: Callable[[int], Any],
        chunk_ids: Sequence[int],
        *,
        spark_fn: Callable[[Any, Sequence[int]], list[Any]] | None = None,
    ) -> list[Any]:
        """Run ``fn(chunk_id)`` for every chunk and return results in chunk order.

        Parameters
        ----------
        fn
            Pure function of one chunk id (local backend).
        spark_fn
            ``spark_fn(session, chunk_ids)`` implementing the same computation
            with Spark primitives (e.g. ``mapInPandas``); required for
            ``backend="spark"`` so the distributed path is explicit, not implied.
        """
        if self.backend == "local":
            return [fn(chunk_id) for chunk_id in chunk_ids]
        if self.backend == "spark":
            if spark_fn is None:
                raise ComputeError("this computation has no Spark implementation")
            return spark_fn(self.spark_session(), list(chunk_ids))
        if self.backend == "databricks":
            raise ComputeError(
                "COMPUTE=databricks runs packaged job scripts as Databricks runs through Dagster "
                "Pipes (ComputeResource.run_databricks_job); chunk mapping inside this process "
                "is not available on that backend"
            )
        raise ComputeError(f"unknown compute backend {self.backend!r}; use one of {BACKENDS}")

    def spark_config(self) -> dict[str, str]:
        """Spark settings of the session this resource hands out."""
        return {
            "spark.master": self.spark_master,
            "spark.app.name": "pipeline",
            "spark.sql.execution.arrow.pyspark.enabled": "true",
            "spark.ui.enabled": "false",
            "spark.sql.shuffle.partitions": "4",
            # Python workers run this interpreter, where the platform is installed
            "spark.pyspark.python": sys.executable,
            "spark.pyspark.driver.python": sys.executable,
        }

    def spark_session(self) -> Any:
        """The Spark session on ``spark_master``, built by dagster-pyspark on first use.

        ``LazyPySparkResource`` builds the session only when it is asked for, so a run on
        the local backend never starts a JVM; it is created here, not at import, because
        importing dagster-pyspark imports pyspark.
        """
        if self._spark is None:
            from dagster_pyspark import LazyPySparkResource

            # A session built inside a running interpreter starts its Python workers with
            # $PYSPARK_PYTHON, else the `python3` on PATH (pyspark/core/context.py): the
            # `spark.pyspark.python` setting is read by spark-submit only. Default it to this
            # interpreter, where the platform is installed; a value the user set is kept.
            os.environ.setdefault("PYSPARK_PYTHON", sys.executable)

            self._spark = LazyPySparkResource(spark_config=self.spark_config())
        return self._spark.spark_session

    # ------------------------------------------------------------------ Databricks

    def databricks_workspace_client(self) -> Any:
        """A ``WorkspaceClient`` authenticating with the personal access token only.

        ``auth_type="pat"`` keeps other credentials the SDK might find (a
        ``~/.databrickscfg`` profile, OAuth variables) from being used instead, or from
        making the configuration ambiguous.
        """
        if not (self.databricks_host and self.databricks_token):
            raise ComputeError(
                "COMPUTE=databricks needs DATABRICKS_HOST and DATABRICKS_TOKEN in the environment"
            )
        from databricks.sdk import WorkspaceClient

        return WorkspaceClient(
            host=self.databricks_host, token=self.databricks_token, auth_type="pat"
        )

    def databricks_pipes_client(self) -> Any:
        """A ``PipesDatabricksClient`` for launching a job that reports back to Dagster.

        Failed runs raise :class:`ComputeError` naming the run, its page and the task's
        error output, rather than only the run's state message.
        """
        return named_run_pipes_client_class(_failed_run_error)(
            client=self.databricks_workspace_client(),
            poll_interval_seconds=self.databricks_poll_interval_seconds,
        )

    def run_databricks_job(
        self,
        context: AssetExecutionContext,
        *,
        script: str,
        run_name: str,
        inputs: Mapping[str, bytes],
        outputs: Sequence[str],
        extras: Mapping[str, Any],
    ) -> DatabricksJobResult:
        """Run a script of :mod:`pipeline.remote` as one Databricks run and collect its outputs.

        Parameters
        ----------
        context
            The asset's execution context (Pipes streams the job's logs and messages to it).
        script
            File name in :mod:`pipeline.remote`, e.g. ``"loan_loss_job.py"``.
        run_name
            Name of the run in the workspace UI.
        inputs
            Files for the job, by name; uploaded to the run's exchange folder and passed
            to the job as ``extras["inputs"][name] = "dbfs:/..."``.
        outputs
            Files the job must write to ``extras["outputs"][name]`` and announce with a
            custom message ``{"outputs": {name: {"sha256": ..., "bytes": ...}}}``.
        extras
            JSON-serialisable settings for the job; keep them small (they travel in the
            Pipes context file).

        Returns
        -------
        DatabricksJobResult
            Run id and link, the job's message and the verified output bytes.

        Raises
        ------
        ComputeError
            When the backend is not ``databricks``; the workspace rejects the token; the
            run fails (the message names the run, its page and the task's error); or an
            output is missing or does not match its digest.
        """
        if self.backend != "databricks":
            raise ComputeError(
                f"run_databricks_job needs COMPUTE=databricks; this resource runs {self.backend!r}"
            )
        from databricks.sdk.errors import DatabricksError, PermissionDenied, Unauthenticated

        pipes = self.databricks_pipes_client()
        workspace = pipes.client
        root = self.databricks_dbfs_root.rstrip("/")
        exchange = f"{root}/runs/{_path_safe(context.run.run_id)}/{uuid.uuid4().hex}"
        stage = "deploying the job code"
        uploaded_inputs = False
        try:
            python_file, bundle = self._deploy(workspace, script, root)
            wheel = self.deployed_wheel(workspace)
            stage = "uploading the job inputs"
            uploaded_inputs = True
            input_paths = {name: f"{exchange}/{name}" for name in inputs}
            for name, data in inputs.items():
                path = _api_path(input_paths[name])
                workspace.dbfs.upload(path, io.BytesIO(data), overwrite=True)
            output_paths = {name: f"{exchange}/{name}" for name in outputs}
            stage = "running the job"
            invocation = pipes.run(
                context=context,
                task=self._task(script, python_file, wheel),
                extras={
                    **extras,
                    "inputs": input_paths,
                    "outputs": output_paths,
                    "code_bundle": None if wheel else bundle,
                },
                submit_args={"run_name": run_name},
            )
            run_id = _metadata_text(invocation.metadata, "Databricks Job Run ID") or "?"
            run_url = _metadata_text(invocation.metadata, "Databricks Job Run URL")
            message = _outputs_message(invocation.get_custom_messages(), outputs, run_id)
            stage = f"downloading the outputs of run {run_id}"
            files = {}
            for name in outputs:
                data = workspace.dbfs.download(_api_path(output_paths[name])).read()
                _verify_output(name, data, message["outputs"][name], run_id)
                files[name] = data
            return DatabricksJobResult(run_id, run_url, message, files)
        except (Unauthenticated, PermissionDenied) as exc:
            uploaded_inputs = False  # nothing to clean up with credentials that do not work
            raise ComputeError(
                f"Databricks workspace {self.databricks_host} rejected the credentials while "
                f"{stage} ({type(exc).__name__}: {exc}); DATABRICKS_TOKEN is missing, expired "
                "or not valid for this workspace: create a personal access token and set "
                "DATABRICKS_TOKEN"
            ) from exc
        except DatabricksError as exc:
            raise ComputeError(
                f"Databricks workspace {self.databricks_host} refused a request while {stage}: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        finally:
            if uploaded_inputs:
                _remove_exchange(workspace, exchange, context)

    def deployed_wheel(self, workspace: Any) -> str | None:
        """The wheel tasks install, or ``None`` for the zip bundle (see ``databricks_wheel``).

        With ``"build"`` the checkout's wheel is built once per process (Dagster hands each
        run a fresh copy of this resource, so the build is cached at module level) and
        uploaded unless the workspace holds an identical build already.
        """
        if self.databricks_wheel != "build":
            return self.databricks_wheel
        if "wheel" not in self._deployed:
            from pipeline import deploy

            try:
                path, _ = deploy.upload_wheel(workspace, _built_wheel(), self.databricks_wheel_root)
            except deploy.DeployError as exc:
                raise ComputeError(f"cannot deploy the wheel: {exc}") from exc
            self._deployed["wheel"] = path
        return self._deployed["wheel"]

    def _task(self, script: str, python_file: str, wheel: str | None = None) -> Any:
        """The ``SubmitTask``: the script on the configured cluster with its libraries.

        With a wheel the task installs it (its dependencies come with it); otherwise the
        pinned PyPI packages the zip bundle's code needs.
        """
        from databricks.sdk.service import compute, jobs

        packages = self.databricks_pypi_packages
        if packages is None:
            packages = [f"{name}=={metadata.version(name)}" for name in JOB_PYPI_DISTRIBUTIONS]
        libraries = [{"pypi": {"package": p}} for p in packages]
        task: dict[str, Any] = {
            "task_key": _path_safe(Path(script).stem),
            "spark_python_task": {"python_file": python_file, "parameters": []},
            "libraries": [{"whl": wheel}] if wheel else libraries,
            "timeout_seconds": int(self.databricks_timeout_seconds),
        }
        if self.databricks_cluster_id:
            task["existing_cluster_id"] = self.databricks_cluster_id
        elif self.databricks_new_cluster:
            try:
                spec = json.loads(self.databricks_new_cluster)
            except json.JSONDecodeError as exc:
                raise ComputeError(f"databricks_new_cluster is not valid JSON: {exc}") from exc
            if not isinstance(spec, dict):
                raise ComputeError(
                    f"databricks_new_cluster must be a JSON object, got {type(spec).__name__}"
                )
            task["new_cluster"] = compute.ClusterSpec.from_dict(spec).as_dict()
        else:
            raise ComputeError(
                "COMPUTE=databricks needs DATABRICKS_CLUSTER_ID (an existing cluster) or a "
                "databricks_new_cluster spec to run jobs on"
            )
        return jobs.SubmitTask.from_dict(task)

    def _deploy(self, workspace: Any, script: str, root: str) -> tuple[str, str | None]:
        """Upload the code bundle and (unless configured elsewhere) the script, once.

        With ``databricks_wheel`` set no bundle is uploaded (the bundle path is ``None``).

        Returns the task's ``python_file`` and the bundle's DBFS path. Both are compared
        with what DBFS holds, so a shared workspace is only written when the code changed.
        """
        bundle = None
        if not self.databricks_wheel:
            bundle_bytes = code_bundle()
            digest = hashlib.sha256(bundle_bytes).hexdigest()[:16]
            bundle = f"{root}/jobs/pipeline-code-{digest}.zip"
        if bundle is not None and bundle not in self._deployed:
            _ensure_file(workspace, bundle, bundle_bytes)
            self._deployed[bundle] = bundle
        if self.databricks_job_python_file:
            return self.databricks_job_python_file, bundle
        target = f"{root}/jobs/{script}"
        if target not in self._deployed:
            source = resources.files("pipeline.remote").joinpath(script)
            if not source.is_file():
                raise ComputeError(f"pipeline.remote has no script {script!r}")
            _ensure_file(workspace, target, source.read_bytes())
            self._deployed[target] = target
        return target, bundle


@functools.cache
def _built_wheel() -> Any:
    """The checkout's wheel, built on first use into a folder removed at exit.

    Cached per process: a failed build is not cached (the next call tries again).
    """
    import atexit
    import shutil
    import tempfile

    from pipeline import deploy

    folder = tempfile.mkdtemp(prefix="pipeline-deploy-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return deploy.build_wheel(Path(folder))


@functools.cache
def code_bundle() -> bytes:
    """``pipeline/__init__.py``, ``pipeline/domain`` and ``pipeline/remote`` as a zip.

    Only the pure layers: they import numpy, scipy, polars and ``dagster_pipes``, which a
    cluster has or gets from the task's libraries. Entries are sorted and timestamped at a
    fixed epoch so the bytes, hence the DBFS file name, change only when the code does.
    """
    package_root = Path(resources.files("pipeline").joinpath("__init__.py")).parent
    files = [package_root / "__init__.py"]
    for sub in _BUNDLED_PACKAGES:
        files.extend(sorted((package_root.parent / sub).glob("*.py")))
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for path in files:
            info = zipfile.ZipInfo(path.relative_to(package_root.parent).as_posix(), _ZIP_EPOCH)
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, path.read_bytes())
    return buffer.getvalue()


def _api_path(dbfs_path: str) -> str:
    """The DBFS REST API wants absolute paths without the ``dbfs:`` scheme."""
    return dbfs_path.removeprefix("dbfs:")


def _path_safe(value: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in value) or "_"


def _ensure_file(workspace: Any, dbfs_path: str, data: bytes) -> None:
    """Write ``data`` to ``dbfs_path`` unless the file there holds exactly these bytes."""
    from databricks.sdk.errors import NotFound

    path = _api_path(dbfs_path)
    try:
        status = workspace.dbfs.get_status(path)
    except NotFound:
        status = None
    if status is not None and not status.is_dir and status.file_size == len(data):
        if workspace.dbfs.download(path).read() == data:
            return
    workspace.dbfs.upload(path, io.BytesIO(data), overwrite=True)


def _remove_exchange(workspace: Any, exchange: str, context: AssetExecutionContext) -> None:
    """Delete a run's exchange folder, warning (never hiding) when that fails.

    A failed deletion does not replace the outcome of the run itself: the folder holds
    only that run's copies, and the warning names it for removal by hand.
    """
    from databricks.sdk.errors import DatabricksError

    try:
        workspace.dbfs.delete(_api_path(exchange), recursive=True)
    except DatabricksError as exc:
        context.log.warning(
            f"could not delete the Databricks exchange folder {exchange}: "
            f"{type(exc).__name__}: {exc}; delete it by hand"
        )


def _metadata_text(meta: Mapping[str, Any], key: str) -> str | None:
    value = meta.get(key)
    if value is None:
        return None
    return str(getattr(value, "value", value))


def _outputs_message(
    messages: Sequence[Any], outputs: Sequence[str], run_id: str
) -> dict[str, Any]:
    """The last custom message that announces every requested output."""
    for message in reversed(messages):
        announced = message.get("outputs") if isinstance(message, dict) else None
        if isinstance(announced, dict) and all(name in announced for name in outputs):
            return message
    raise ComputeError(
        f"Databricks run {run_id} succeeded but announced none of the outputs {list(outputs)} "
        f"through Pipes ({len(messages)} custom message(s) received); was the job script "
        "launched with open_dagster_pipes and the DBFS message writer?"
    )


def _verify_output(name: str, data: bytes, announced: Mapping[str, Any], run_id: str) -> None:
    digest = hashlib.sha256(data).hexdigest()
    if digest != announced.get("sha256") or len(data) != announced.get("bytes"):
        raise ComputeError(
            f"output {name} of Databricks run {run_id} is {len(data)} bytes with SHA-256 "
            f"{digest}, but the job announced {announced.get('bytes')} bytes with SHA-256 "
            f"{announced.get('sha256')}: the file changed or was cut in transfer"
        )


def describe_failed_run(workspace: Any, run_id: int) -> str:
    """A failure message naming the run, its page, its state and each task's error output.

    The task output (``runs/get-output`` per task run) carries the Python exception and
    its trace; the run state alone says only "Workload failed".
    """
    from databricks.sdk.errors import DatabricksError

    run = workspace.jobs.get_run(run_id)
    state = run.state
    life = state.life_cycle_state.value if state and state.life_cycle_state else "?"
    result = state.result_state.value if state and state.result_state else "?"
    lines = [
        f"Databricks run {run_id} ({run.run_page_url or 'no run page'}) ended {life}/{result}: "
        f"{(state.state_message if state else '') or 'no state message'}"
    ]
    for task in run.tasks or []:
        try:
            output = workspace.jobs.get_run_output(task.run_id)
        except DatabricksError as exc:
            lines.append(f"task {task.task_key} (run {task.run_id}): output unavailable ({exc})")
            continue
        if output.error:
            lines.append(f"task {task.task_key} (run {task.run_id}) error: {output.error}")
        if output.error_trace:
            tail = output.error_trace.strip().splitlines()[-15:]
            lines.append("error trace (last lines):\n" + "\n".join(tail))
    return "\n".join(lines)


def _failed_run_error(workspace: Any, run_id: int) -> ComputeError:
    return ComputeError(describe_failed_run(workspace, run_id))
