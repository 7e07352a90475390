"""Shared fixtures: a temp PIPELINE_HOME with real Delta, MLflow sqlite and Dagster."""

import os
import secrets
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import pytest

from pipeline.settings import DEFAULT_PARTITIONS_START

# the tests' partitions start on the default date, whatever start a `make demo` recorded
# in ./.pipeline (read when pipeline.partitions is first imported, just below)
os.environ["PIPELINE_PARTITIONS_START"] = DEFAULT_PARTITIONS_START

from pipeline.definitions import build_definitions
from pipeline.resources import build_resources
from pipeline.settings import Settings, load_settings

os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
# the PII scan's tokenisation salt (a secret in production): a fresh one per test session
os.environ.setdefault("PIPELINE_PII_SALT", secrets.token_hex(16))
os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)


@dataclass
class Platform:
    """Everything an asset test needs, pointed at one temp folder."""

    settings: Settings
    resources: dict
    defs: dg.Definitions
    instance: dg.DagsterInstance

    @property
    def lake(self):
        return self.resources["lake"]

    @property
    def tracking(self):
        return self.resources["tracking"]

    def materialize(
        self, asset_keys, partition_key=None, *, raise_on_error=True, tags=None, run_config=None
    ):
        """Materialise ``asset_keys`` and their checks for one partition, in process.

        ``run_config`` is passed through, e.g. ``{"ops": {"gold__credibility_posterior":
        {"config": {...}}}}`` to change the sampler settings of one run.
        """
        return dg.materialize(
            [*self.defs.assets, *(self.defs.asset_checks or [])],
            selection=dg.AssetSelection.assets(*asset_keys),
            partition_key=None if partition_key is None else str(partition_key),
            resources=self.resources,
            instance=self.instance,
            raise_on_error=raise_on_error,
            tags=tags,
            run_config=run_config,
        )


def make_platform(home: Path, **env: str) -> Platform:
    settings = load_settings({"PIPELINE_HOME": str(home), **env})
    return Platform(
        settings=settings,
        resources=build_resources(settings),
        defs=build_definitions(settings),
        instance=dg.DagsterInstance.ephemeral(),
    )


@pytest.fixture
def platform(tmp_path: Path) -> Iterator[Platform]:
    """A fresh platform (empty lake, landing, MLflow store, ephemeral instance)."""
    plat = make_platform(tmp_path / "home")
    yield plat
    plat.instance.dispose()


@pytest.fixture(scope="session")
def spark_session():
    """One local[2] Spark session for the whole test session (start-up costs ~10 s)."""
    from pyspark.sql import SparkSession

    session = (
        SparkSession.builder.master("local[2]")
        .appName("pipeline-tests")
        .config("spark.ui.enabled", "false")
        .config("spark.sql.shuffle.partitions", "2")
        .config("spark.sql.execution.arrow.pyspark.enabled", "true")
        .getOrCreate()
    )
    yield session
    session.stop()
