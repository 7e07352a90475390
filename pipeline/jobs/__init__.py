"""The heavy jobs as plain functions over data and the lake / MLflow clients.

Training and registering one symbol's model, scoring a symbol's days, fitting and
logging one month's posterior, simulating one valuation date: each is a function an
asset calls, and that a Spark task or a Databricks job can call unchanged, because
it takes data frames and resources built from settings, never a Dagster context.
"""
