"""MLflow or object storage unreachable: the step fails within the configured bound.

A real socket server on a loopback port accepts connections and never answers (the
worst case: no refusal, no reset). A step that talks to it must fail on its own, with
a message naming the service and the bound, having connected once or a few times
rather than retrying for minutes; a hang guard (pytest-timeout) turns a hang into a
failure instead of a stuck suite.
"""

import socket
import threading
import time

import dagster as dg
import polars as pl
import pytest

from pipeline.resources.lake import LakeResource
from pipeline.resources.tracking import TrackingResource

pytestmark = pytest.mark.slow

BOUND_S = 4
HANG_GUARD_S = 120  # far beyond the bound: only a hang reaches it


class BlackHole:
    """A TCP server that accepts every connection and never sends a byte."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.connections: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections.append(conn)

    def close(self) -> None:
        self.sock.close()
        for conn in self.connections:
            conn.close()


@dg.asset
def talks_to_mlflow(tracking: TrackingResource) -> None:
    tracking.experiment_id("fx_spreads")


@dg.asset
def talks_to_the_lake(lake: LakeResource) -> None:
    lake.overwrite_partition("bronze", "claims", pl.DataFrame({"p": ["a"]}), {"p": "a"})


def _step(asset: dg.AssetsDefinition, resources: dict) -> dict:
    """Materialise one asset that talks to an unanswering server; how it failed, and when."""
    import deltalake  # noqa: F401 - imported up front: the time measured is time waited
    import mlflow.exceptions  # noqa: F401

    with dg.instance_for_test() as instance:
        started = time.monotonic()
        result = dg.materialize(
            [asset], resources=resources, instance=instance, raise_on_error=False
        )
        elapsed = time.monotonic() - started
    failure = result.failure_data_for_node(asset.op.name)
    error = failure.error if failure else None
    return {
        "success": result.success,
        "elapsed_s": elapsed,
        "error": error.to_string() if error else "",
    }


@pytest.mark.timeout(HANG_GUARD_S)
def test_an_unanswering_mlflow_server_fails_the_step_naming_server_and_bound() -> None:
    hole = BlackHole()
    try:
        tracking = TrackingResource(
            tracking_uri=f"http://127.0.0.1:{hole.port}", request_timeout_s=BOUND_S
        )
        outcome = _step(talks_to_mlflow, {"tracking": tracking})
    finally:
        hole.close()
    print(f"MLflow unreachable: the step failed after {outcome['elapsed_s']:.1f} s")
    assert not outcome["success"]
    assert (
        f"MLflow tracking server http://127.0.0.1:{hole.port} did not answer GET /health "
        f"within {BOUND_S} s (PIPELINE_SERVICE_TIMEOUT_S)"
    ) in outcome["error"]
    assert "ConnectionError" in outcome["error"]
    assert len(hole.connections) == 1  # one bounded probe, no retry storm


@pytest.mark.timeout(HANG_GUARD_S)
def test_an_unanswering_object_store_fails_the_step_naming_table_and_bound() -> None:
    hole = BlackHole()
    try:
        lake = LakeResource(
            root_uri="s3://landing-bucket/lake",
            service_timeout_s=BOUND_S,
            storage_options={
                "AWS_ENDPOINT_URL": f"http://127.0.0.1:{hole.port}",
                "AWS_ALLOW_HTTP": "true",
                "AWS_REGION": "us-east-1",
                "AWS_ACCESS_KEY_ID": "test-only",
                "AWS_SECRET_ACCESS_KEY": "test-only",
                "AWS_S3_ALLOW_UNSAFE_RENAME": "true",
            },
        )
        outcome = _step(talks_to_the_lake, {"lake": lake})
    finally:
        hole.close()
    print(f"object store unreachable: the step failed after {outcome['elapsed_s']:.1f} s")
    assert not outcome["success"]
    assert "LakeUnavailableError" in outcome["error"]
    assert (
        f"s3://landing-bucket/lake/bronze/claims: the object store failed or did not answer "
        f"within the bound of {BOUND_S} s (PIPELINE_SERVICE_TIMEOUT_S)"
    ) in outcome["error"]
    # the request was retried, and no more than the lake's max_retries=2 allow (measured 3)
    assert 2 <= len(hole.connections) <= 3, hole.connections
