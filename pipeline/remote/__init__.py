"""Scripts that run on a remote cluster and talk back to Dagster through Pipes.

Each module here is uploaded as a Databricks ``spark_python_task`` by
:meth:`pipeline.resources.compute.ComputeResource.run_databricks_job`.

* :mod:`~pipeline.remote.loan_loss_job` imports only the standard library, numpy and
  ``dagster_pipes`` at module level (a cluster without the wheel has no dagster), and
  reaches the science through :mod:`pipeline.domain`, which is shipped to the cluster as a
  zip next to the script, or installed with the wheel.
* :mod:`~pipeline.remote.fx_job` runs from the project's wheel only: it calls the
  building blocks the local path calls (training, scoring, the tracking resource).
"""
