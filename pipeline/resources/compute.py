"""Where heavy work runs: this process, a Spark cluster, or Databricks.

Domain functions are pure and chunkable, so the same function runs in-process,
inside a Spark task (``mapInPandas`` over chunk ids) or in a Databricks job
launched through Dagster Pipes. Assets ask this resource to map a function over
chunks and never import Spark themselves.
"""

import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from dagster import ConfigurableResource
from pydantic import PrivateAttr

BACKENDS = ("local", "spark", "databricks")


class ComputeError(RuntimeError):
    """The configured backend cannot run the request."""


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
    """

    backend: str = "local"
    spark_master: str = "local[2]"
    databricks_host: str | None = None
    databricks_token: str | None = None
    databricks_cluster_id: str | None = None

    _spark: Any = PrivateAttr(default=None)

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
                "COMPUTE=databricks runs whole assets as Databricks jobs through Dagster "
                "Pipes (see pipeline.resources.compute.databricks_pipes_client); chunk "
                "mapping inside this process is not available on that backend"
            )
        raise ComputeError(f"unknown compute backend {self.backend!r}; use one of {BACKENDS}")

    def spark_session(self) -> Any:
        """A Spark session on ``spark_master``, created once per resource instance."""
        if self._spark is None:
            os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
            os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
            from pyspark.sql import SparkSession

            self._spark = (
                SparkSession.builder.master(self.spark_master)
                .appName("pipeline")
                .config("spark.sql.execution.arrow.pyspark.enabled", "true")
                .config("spark.ui.enabled", "false")
                .config("spark.sql.shuffle.partitions", "4")
                .getOrCreate()
            )
        return self._spark

    def databricks_pipes_client(self) -> Any:
        """A ``PipesDatabricksClient`` for launching a job that reports back to Dagster."""
        if not (self.databricks_host and self.databricks_token):
            raise ComputeError(
                "COMPUTE=databricks needs DATABRICKS_HOST and DATABRICKS_TOKEN in the environment"
            )
        from dagster_databricks import PipesDatabricksClient
        from databricks.sdk import WorkspaceClient

        return PipesDatabricksClient(
            client=WorkspaceClient(host=self.databricks_host, token=self.databricks_token)
        )
