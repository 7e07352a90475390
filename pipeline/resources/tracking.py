"""MLflow tracking and model registry, bound to the platform's settings.

``dagster-mlflow`` only wraps tracking, so the registry (versions, aliases) is
driven with ``MlflowClient``. Every run opened here is tagged with the Dagster
run id, asset key and partition key, so a run can be found from the asset and
the asset from the run.
"""

import contextlib
import os
import re
import urllib.parse
from collections.abc import Iterator
from typing import Any

from dagster import ConfigurableResource

_SAFE_SYMBOL = re.compile(r"^[A-Z0-9]{3,12}$")
_UC_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

DAGSTER_RUN_TAG = "dagster.run_id"
DAGSTER_ASSET_TAG = "dagster.asset_key"
DAGSTER_PARTITION_TAG = "dagster.partition_key"


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
    """

    tracking_uri: str
    registry_uri: str | None = None
    artifact_root: str | None = None
    ui_url: str = "http://127.0.0.1:5000"
    uc_catalog: str | None = None
    uc_schema: str | None = None

    def _bind(self) -> None:
        import mlflow

        # progress bars of artefact downloads are noise in Dagster's captured logs
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        # models are logged with explicit pip requirements: detecting the uv project
        # around the process would only log about it
        os.environ.setdefault("MLFLOW_UV_AUTO_DETECT", "false")
        mlflow.set_tracking_uri(self.tracking_uri)
        mlflow.set_registry_uri(self.registry_uri or self.tracking_uri)

    def client(self) -> Any:
        """An ``MlflowClient`` bound to this store (also sets the global URIs)."""
        from mlflow import MlflowClient

        self._bind()
        return MlflowClient(
            tracking_uri=self.tracking_uri, registry_uri=self.registry_uri or self.tracking_uri
        )

    def experiment_id(self, name: str) -> str:
        """Id of experiment ``name``, created with the configured artefact root."""
        client = self.client()
        existing = client.get_experiment_by_name(name)
        if existing is not None:
            return existing.experiment_id
        location = f"{self.artifact_root.rstrip('/')}/{name}" if self.artifact_root else None
        try:
            return client.create_experiment(name, artifact_location=location)
        except Exception:
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
        tags: dict[str, str] | None = None,
    ) -> Iterator[Any]:
        """Open an MLflow run tagged with its Dagster origin.

        The run ends as ``FAILED`` when the body raises, so a broken
        materialisation is visible in MLflow too.
        """
        import mlflow

        self._bind()
        all_tags = {
            DAGSTER_RUN_TAG: dagster_run_id,
            DAGSTER_ASSET_TAG: asset_key,
            DAGSTER_PARTITION_TAG: partition_key or "",
            **(tags or {}),
        }
        with mlflow.start_run(
            experiment_id=self.experiment_id(experiment), run_name=run_name, tags=all_tags
        ) as run:
            yield run

    def model_name(self, symbol: str) -> str:
        """Registered model name of a symbol's spread model."""
        if not _SAFE_SYMBOL.match(symbol):
            raise TrackingError(f"symbol {symbol!r} is not a normalised partition key")
        base = f"fx_spread_{symbol.lower()}"
        if self.uc_catalog and self.uc_schema:
            # the resource can be built without Settings (tests, notebooks), so the
            # catalog and schema are validated again before they reach the registry
            for label, value in (("catalog", self.uc_catalog), ("schema", self.uc_schema)):
                if not _UC_NAME.match(value):
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

    def load_sklearn(
        self, name: str, alias: str | None = None, *, version: str | int | None = None
    ) -> Any:
        """Load the scikit-learn model ``models:/<name>@<alias>`` or ``models:/<name>/<version>``.

        Pass the version when the caller has already resolved an alias and records which
        version it used: loading by alias again could pick up a version the alias moved to
        in between (a promotion or a revert in another run).
        """
        import mlflow.sklearn

        if (alias is None) == (version is None):
            raise TrackingError(f"load_sklearn({name!r}): give exactly one of alias or version")
        self._bind()
        ref = f"{name}@{alias}" if alias is not None else f"{name}/{version}"
        return mlflow.sklearn.load_model(f"models:/{ref}")
