"""Scripts that run on a remote cluster and talk back to Dagster through Pipes.

Each module here is uploaded as a Databricks ``spark_python_task`` by
:meth:`pipeline.resources.compute.ComputeResource.run_databricks_job`. A job module
imports only the standard library, numpy and ``dagster_pipes`` at module level (the
cluster has no dagster), and reaches the science through :mod:`pipeline.domain`,
which is shipped to the cluster as a zip next to the script.
"""
