"""Actuarial and market-risk ML platform as a Dagster asset graph.

This package file imports nothing, so ``pipeline.domain`` runs inside a Spark
task or a Databricks job without pulling in dagster.
"""
