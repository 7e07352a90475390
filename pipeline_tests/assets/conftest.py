"""Fixtures of the Databricks tests: a personal access token and the loopback workspace."""

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline_tests.fakes.databricks_server import CLUSTER_ID, FakeDatabricksWorkspace


@pytest.fixture
def token() -> str:
    """A fresh personal access token, so a leak is attributable to one test."""
    return f"dapi-fake-{uuid.uuid4().hex}"


@pytest.fixture
def workspace(tmp_path: Path, token: str) -> Iterator[FakeDatabricksWorkspace]:
    """The loopback fake of a workspace with :data:`CLUSTER_ID`, accepting ``token`` only."""
    with FakeDatabricksWorkspace(
        tmp_path / "workspace", token=token, cluster_ids=(CLUSTER_ID,)
    ) as ws:
        yield ws
