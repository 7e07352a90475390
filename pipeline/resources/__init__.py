"""Resources derived from one place: the settings of this deployment."""

from dagster import EnvVar

from pipeline.resources.compute import ComputeResource
from pipeline.resources.lake import LakeResource
from pipeline.resources.landing import LandingResource
from pipeline.resources.pii import SALT_VARIABLE, PiiResource
from pipeline.resources.tracking import TrackingResource
from pipeline.settings import Settings


class BranchTrackingResource(TrackingResource):
    """:class:`TrackingResource` whose experiments live under ``experiment_root``.

    On a Databricks tracking server ``experiment_root`` is ``/Shared/pipeline/<branch>``
    (:func:`pipeline.settings.experiment_root`), so each branch logs to its own experiments;
    empty elsewhere, where experiment names stay as the jobs give them.
    """

    experiment_root: str = ""

    def experiment_id(self, name: str) -> str:
        """Id of experiment ``<experiment_root>/<name>`` (created when missing)."""
        root = self.experiment_root.rstrip("/")
        return super().experiment_id(f"{root}/{name}" if root else name)


def build_resources(settings: Settings) -> dict[str, object]:
    """Resources for ``settings``: tests pass settings pointing at a temp folder."""
    compute_kwargs: dict[str, object] = {
        "backend": settings.compute,
        "spark_master": settings.spark_master,
    }
    if settings.compute == "databricks":
        compute_kwargs["databricks_host"] = EnvVar("DATABRICKS_HOST")
        compute_kwargs["databricks_token"] = EnvVar("DATABRICKS_TOKEN")
        # Cluster and script locations are not secrets: plain settings. Without a cluster
        # id each run asks for a new cluster from DATABRICKS_NEW_CLUSTER (JSON spec).
        compute_kwargs["databricks_cluster_id"] = settings.databricks_cluster_id
        compute_kwargs["databricks_new_cluster"] = settings.databricks_new_cluster
        compute_kwargs["databricks_job_python_file"] = settings.databricks_job_python_file
        compute_kwargs["databricks_wheel"] = settings.databricks_wheel
        compute_kwargs["databricks_wheel_root"] = settings.wheel_root
    return {
        "lake": LakeResource(root_uri=settings.lake_uri),
        "landing": LandingResource(path=str(settings.landing_dir)),
        "tracking": BranchTrackingResource(
            experiment_root=settings.mlflow_experiment_root,
            tracking_uri=settings.mlflow_tracking_uri,
            artifact_root=settings.mlflow_artifact_root,
            ui_url=settings.mlflow_ui_url,
            uc_catalog=settings.uc_catalog,
            uc_schema=settings.uc_schema,
            registry_uri="databricks-uc" if settings.uc_catalog else None,
        ),
        "compute": ComputeResource(**compute_kwargs),
        "pii": PiiResource(salt=EnvVar(SALT_VARIABLE)),
    }
