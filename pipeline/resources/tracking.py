"""MLflow tracking and model registry through one bound ``MlflowClient``.

Nothing here touches MLflow's global state: no ``mlflow.set_tracking_uri``, no fluent
``mlflow.start_run``, no environment variable. Every call goes through the client that
:meth:`TrackingResource.client` binds to the configured stores, so two resources
pointing at two stores can live in one process (tests do exactly that) and a Spark task
or a Databricks job builds the same resource from its settings.

Every run opened here is tagged with the Dagster run id, asset key and partition key, so
a run can be found from the asset and the asset from the run. ``dagster-mlflow`` is not
used: it ties one MLflow run to one Dagster run through global state, while this
platform logs one run per partition (per symbol, per month) inside one Dagster run.
"""

import contextlib
import re
import tempfile
import urllib.parse
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dagster import ConfigurableResource

_SAFE_SYMBOL = re.compile(r"^[A-Z0-9]{3,12}$")
_UC_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

DAGSTER_RUN_TAG = "dagster.run_id"
DAGSTER_ASSET_TAG = "dagster.asset_key"
DAGSTER_PARTITION_TAG = "dagster.partition_key"
PARENT_RUN_TAG = "mlflow.parentRunId"  # MLflow's own tag: the UI nests a run under its parent
_MAX_PARAM_LENGTH = 6000  # MLflow's limit on a parameter value


class TrackingError(ValueError):
    """A model name or alias request is not acceptable."""


class TrackingResource(ConfigurableResource):
    """MLflow client factory and naming rules for registered models.

    Attributes
    ----------
    tracking_uri
        ``sqlite:///…`` locally, ``http://…`` for a server or ``databricks``.
    registry_uri
        Defaults to the tracking URI; ``databricks-uc`` for Unity Catalog.
    artifact_root
        Where new experiments store artefacts (ignored by remote servers that
        manage their own).
    ui_url
        Base URL of the MLflow UI used in Dagster metadata links.
    uc_catalog, uc_schema
        When both are set, models are registered as
        ``<catalog>.<schema>.fx_spread_<symbol>``.
    request_timeout_s
        Bound (seconds) on the reachability probe of an HTTP tracking server;
        ``None`` reads ``PIPELINE_SERVICE_TIMEOUT_S``.
    parent_run_id
        When set, every run opened here is nested under this run (tag
        ``mlflow.parentRunId``): the run of an ``mlflow run`` entry point
        (:mod:`pipeline.jobs.mlproject`) is the parent of the runs its job opens.
    """

    tracking_uri: str
    registry_uri: str | None = None
    artifact_root: str | None = None
    ui_url: str = "http://127.0.0.1:5000"
    uc_catalog: str | None = None
    uc_schema: str | None = None
    request_timeout_s: int | None = None
    parent_run_id: str | None = None

    def client(self) -> Any:
        """An ``MlflowClient`` bound to this tracking store and registry.

        An HTTP(S) tracking server is first asked ``GET /health`` with a bounded wait
        (``request_timeout_s``): a server that is down or never answers fails the step
        within that bound with a ``ConnectionError`` naming it (the retry policy then
        retries the step), before any run is opened or alias moved, instead of after
        MLflow's own timeouts and retries (``MLFLOW_HTTP_REQUEST_TIMEOUT`` and
        ``MLFLOW_HTTP_REQUEST_MAX_RETRIES``, which MLflow reads from the environment
        and this resource leaves alone). An HTTP error status means the server answered.
        """
        import urllib.error
        import urllib.request

        if self.tracking_uri.startswith(("http://", "https://")):
            from pipeline.settings import get_settings

            bound = self.request_timeout_s or get_settings().service_timeout_s
            url = f"{self.tracking_uri.rstrip('/')}/health"
            try:
                with urllib.request.urlopen(url, timeout=bound):  # noqa: S310 - http(s) only
                    pass
            except urllib.error.HTTPError:
                pass  # an answer, even an error status: the server is there
            except OSError as exc:  # refused, unreachable, DNS, or no answer within the bound
                raise ConnectionError(
                    f"MLflow tracking server {self.tracking_uri} did not answer GET /health "
                    f"within {bound} s (PIPELINE_SERVICE_TIMEOUT_S): {exc}"
                ) from exc
        from mlflow import MlflowClient

        return MlflowClient(
            tracking_uri=self.tracking_uri, registry_uri=self.registry_uri or self.tracking_uri
        )

    def experiment_id(self, name: str) -> str:
        """Id of experiment ``name``, created with the configured artefact root."""
        from mlflow.exceptions import MlflowException

        client = self.client()
        existing = client.get_experiment_by_name(name)
        if existing is not None:
            return existing.experiment_id
        location = f"{self.artifact_root.rstrip('/')}/{name}" if self.artifact_root else None
        try:
            return client.create_experiment(name, artifact_location=location)
        except MlflowException:
            # another process created it between our lookup and create
            existing = client.get_experiment_by_name(name)
            if existing is None:
                raise
            return existing.experiment_id

    @contextlib.contextmanager
    def start_run(
        self,
        *,
        experiment: str,
        run_name: str,
        dagster_run_id: str,
        asset_key: str,
        partition_key: str | None,
        tags: Mapping[str, str] | None = None,
    ) -> Iterator["TrackedRun"]:
        """Open an MLflow run tagged with its Dagster origin.

        The run ends as ``FINISHED``, or as ``FAILED`` when the body raises, so a broken
        materialisation is visible in MLflow too.
        """
        client = self.client()
        all_tags = {
            DAGSTER_RUN_TAG: dagster_run_id,
            DAGSTER_ASSET_TAG: asset_key,
            DAGSTER_PARTITION_TAG: partition_key or "",
            **({PARENT_RUN_TAG: self.parent_run_id} if self.parent_run_id else {}),
            **(tags or {}),
        }
        info = client.create_run(
            self.experiment_id(experiment), run_name=run_name, tags=all_tags
        ).info
        run = TrackedRun(
            client=client,
            run_id=info.run_id,
            experiment_id=info.experiment_id,
            artifact_uri=info.artifact_uri,
        )
        try:
            yield run
        except BaseException:
            client.set_terminated(run.run_id, "FAILED")
            raise
        client.set_terminated(run.run_id, "FINISHED")

    def existing_run(self, run_id: str) -> "TrackedRun":
        """A handle on a run that already exists (e.g. to attach a later artefact)."""
        client = self.client()
        info = client.get_run(run_id).info
        return TrackedRun(
            client=client,
            run_id=info.run_id,
            experiment_id=info.experiment_id,
            artifact_uri=info.artifact_uri,
        )

    def model_name(self, symbol: str) -> str:
        """Registered model name of a symbol's spread model."""
        if not isinstance(symbol, str) or not _SAFE_SYMBOL.fullmatch(symbol):
            raise TrackingError(f"symbol {symbol!r} is not a normalised partition key")
        base = f"fx_spread_{symbol.lower()}"
        if self.uc_catalog and self.uc_schema:
            # the resource can be built without Settings (tests, notebooks), so the
            # catalog and schema are validated again before they reach the registry
            for label, value in (("catalog", self.uc_catalog), ("schema", self.uc_schema)):
                if not _UC_NAME.fullmatch(value):
                    raise TrackingError(f"Unity Catalog {label} {value!r} is not an identifier")
            return f"{self.uc_catalog}.{self.uc_schema}.{base}"
        return base

    def run_url(self, experiment_id: str, run_id: str) -> str:
        """Link to a run in the MLflow UI."""
        return f"{self.ui_url.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"

    def model_version_url(self, name: str, version: str | int) -> str:
        """Link to a registered model version in the MLflow UI."""
        quoted = urllib.parse.quote(name, safe="")
        return f"{self.ui_url.rstrip('/')}/#/models/{quoted}/versions/{version}"

    # --- registry -------------------------------------------------------------------
    def alias_version(self, name: str, alias: str) -> Any | None:
        """The model version behind ``alias``, or ``None`` when the alias (or model) is unset."""
        from mlflow.exceptions import MlflowException

        try:
            return self.client().get_model_version_by_alias(name, alias)
        except MlflowException as exc:
            if exc.error_code in (
                "RESOURCE_DOES_NOT_EXIST",
                "INVALID_PARAMETER_VALUE",
                "NOT_FOUND",
            ):
                return None
            raise

    def set_alias(self, name: str, alias: str, version: str | int) -> None:
        """Point ``alias`` of model ``name`` at ``version``."""
        self.client().set_registered_model_alias(name, alias, str(version))

    def delete_alias(self, name: str, alias: str) -> None:
        """Remove ``alias`` from model ``name`` (no error when it is not set)."""
        if self.alias_version(name, alias) is not None:
            self.client().delete_registered_model_alias(name, alias)

    def register_version(
        self, name: str, *, source: str, run_id: str, tags: Mapping[str, str]
    ) -> str:
        """Register ``source`` as a new version of model ``name`` (created if missing).

        The version is created with its tags in one call: three ``set_model_version_tag``
        calls afterwards cost more than the registration itself.
        """
        from mlflow.exceptions import MlflowException

        client = self.client()
        try:
            client.create_registered_model(name)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        version = client.create_model_version(
            name, source=source, run_id=run_id, tags=dict(tags), await_creation_for=0
        )
        return str(version.version)

    def load_sklearn(
        self, name: str, alias: str | None = None, *, version: str | int | None = None
    ) -> Any:
        """Load the scikit-learn model behind ``name@alias`` or ``name/version``.

        Pass the version when the caller has already resolved an alias and records which
        version it used: loading by alias again could pick up a version the alias moved to
        in between (a promotion or a revert in another run).
        """
        import mlflow.sklearn

        if (alias is None) == (version is None):
            raise TrackingError(f"load_sklearn({name!r}): give exactly one of alias or version")
        client = self.client()
        found = (
            client.get_model_version_by_alias(name, alias)
            if alias is not None
            else client.get_model_version(name, str(version))
        )
        with self.local_copy(found.source) as path:
            return mlflow.sklearn.load_model(str(path))

    def download_artifact(self, run_id: str, path: str) -> bytes:
        """The bytes of one artefact file of a run (read in place when stored on this machine)."""
        artifact_uri = self.client().get_run(run_id).info.artifact_uri
        with self.local_copy(f"{artifact_uri.rstrip('/')}/{path}") as local:
            return local.read_bytes()

    @contextlib.contextmanager
    def local_copy(self, artifact_uri: str) -> Iterator[Path]:
        """A local path of an artefact folder: itself when on this machine, else a download."""
        import mlflow.artifacts

        parsed = urllib.parse.urlparse(artifact_uri)
        if parsed.scheme == "file":
            yield Path(urllib.parse.unquote(parsed.path))
            return
        with tempfile.TemporaryDirectory() as tmp:
            yield Path(
                mlflow.artifacts.download_artifacts(
                    artifact_uri=artifact_uri, dst_path=tmp, tracking_uri=self.tracking_uri
                )
            )


@dataclass(frozen=True)
class TrackedRun:
    """One open MLflow run and the bound client that writes to it."""

    client: Any
    run_id: str
    experiment_id: str
    artifact_uri: str

    def log_params(self, params: Mapping[str, object]) -> None:
        """Log parameters in one batch (values as text, cut to MLflow's limit)."""
        from mlflow.entities import Param

        self.client.log_batch(
            self.run_id,
            params=[Param(k, str(v)[:_MAX_PARAM_LENGTH]) for k, v in params.items()],
        )

    def log_metrics(self, metrics: Mapping[str, float]) -> None:
        """Log metrics in one batch, all at step 0."""
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(
            self.run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()]
        )

    def log_files(self, files: Mapping[str, bytes], artifact_path: str | None = None) -> None:
        """Log in-memory files as artefacts (under ``artifact_path`` when given)."""
        with tempfile.TemporaryDirectory() as tmp:
            for name, payload in files.items():
                (Path(tmp) / name).write_bytes(payload)
            self.client.log_artifacts(self.run_id, tmp, artifact_path=artifact_path)

    def log_sklearn_model(
        self,
        model: Any,
        *,
        input_example: Any,
        pip_requirements: list[str],
        skops_trusted_types: list[str],
        artifact_path: str = "model",
    ) -> str:
        """Save a scikit-learn model (skops format, signature, example) into this run.

        Returns
        -------
        str
            The artefact URI of the model folder, the source of a registered version.
        """
        import mlflow.sklearn
        from mlflow.models import infer_signature

        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / artifact_path
            mlflow.sklearn.save_model(
                model,
                str(folder),
                signature=infer_signature(input_example, model.score_samples(input_example)),
                input_example=input_example,
                pip_requirements=pip_requirements,
                serialization_format="skops",
                skops_trusted_types=skops_trusted_types,
            )
            self.client.log_artifacts(self.run_id, str(folder), artifact_path=artifact_path)
        return f"{self.artifact_uri.rstrip('/')}/{artifact_path}"
