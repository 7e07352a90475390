"""MLflow or object storage unreachable: the step fails within the configured bound.

A real socket server on a loopback port accepts connections and never answers (the
worst case: no refusal, no reset). A step that talks to it runs in a child process
with a generous timeout, so a hang becomes a test failure instead of a stuck suite;
the step must fail on its own, with a message naming the service and the bound,
having connected once or a few times rather than retrying for minutes.
"""

import json
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
BOUND_S = 4
HANG_GUARD_S = 240  # interpreter start-up + one failing step, on a loaded machine


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


STEP = """
import json, sys, time
import dagster as dg
import deltalake, mlflow.exceptions  # imported up front: the time measured is time waited
from pipeline.resources.lake import LakeResource
from pipeline.resources.tracking import TrackingResource
mlflow_port, lake_port, bound, home = map(str, sys.argv[1:5])
bound = int(bound)

@dg.asset
def talks_to_mlflow(tracking: TrackingResource) -> None:
    tracking.experiment_id("fx_spreads")

@dg.asset
def talks_to_the_lake(lake: LakeResource) -> None:
    import polars as pl
    lake.overwrite_partition("bronze", "claims", pl.DataFrame({"p": ["a"]}), {"p": "a"})

resources = {
    "tracking": TrackingResource(
        tracking_uri=f"http://127.0.0.1:{mlflow_port}", request_timeout_s=bound
    ),
    "lake": LakeResource(
        root_uri="s3://landing-bucket/lake",
        service_timeout_s=bound,
        storage_options={
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{lake_port}",
            "AWS_ALLOW_HTTP": "true",
            "AWS_REGION": "us-east-1",
            "AWS_ACCESS_KEY_ID": "test-only",
            "AWS_SECRET_ACCESS_KEY": "test-only",
            "AWS_S3_ALLOW_UNSAFE_RENAME": "true",
        },
    ),
}
outcomes = {}
with dg.instance_for_test(temp_dir=home) as instance:
    for which, asset in (("mlflow", talks_to_mlflow), ("lake", talks_to_the_lake)):
        started = time.monotonic()
        result = dg.materialize(
            [asset], resources=resources, instance=instance, raise_on_error=False
        )
        elapsed = time.monotonic() - started
        failure = result.failure_data_for_node(asset.op.name)
        error = failure.error if failure else None
        outcomes[which] = {
            "success": result.success,
            "elapsed_s": elapsed,
            "error": error.to_string() if error else "",
        }
print(json.dumps(outcomes))
"""


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[dict, dict]]:
    """Both steps, against one unanswering server each, in one child interpreter."""
    mlflow_hole, lake_hole = BlackHole(), BlackHole()
    home = tmp_path_factory.mktemp("unreachable")
    try:
        done = subprocess.run(
            [
                sys.executable,
                "-c",
                STEP,
                str(mlflow_hole.port),
                str(lake_hole.port),
                str(BOUND_S),
                str(home),
            ],
            capture_output=True,
            text=True,
            timeout=HANG_GUARD_S,
            cwd=REPO,
            check=False,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        steps = json.loads(done.stdout.strip().splitlines()[-1])
        yield (
            {
                **steps["mlflow"],
                "port": mlflow_hole.port,
                "connections": len(mlflow_hole.connections),
            },
            {**steps["lake"], "port": lake_hole.port, "connections": len(lake_hole.connections)},
        )
    finally:
        mlflow_hole.close()
        lake_hole.close()


def test_an_unanswering_mlflow_server_fails_the_step_naming_server_and_bound(
    outcomes: tuple[dict, dict],
) -> None:
    outcome, _ = outcomes
    print(f"MLflow unreachable: the step failed after {outcome['elapsed_s']:.1f} s")
    assert not outcome["success"]
    assert (
        f"MLflow tracking server http://127.0.0.1:{outcome['port']} did not answer GET /health "
        f"within {BOUND_S} s (PIPELINE_SERVICE_TIMEOUT_S)"
    ) in outcome["error"]
    assert "ConnectionError" in outcome["error"]
    assert outcome["connections"] == 1  # one bounded probe, no retry storm


def test_an_unanswering_object_store_fails_the_step_naming_table_and_bound(
    outcomes: tuple[dict, dict],
) -> None:
    _, outcome = outcomes
    print(f"object store unreachable: the step failed after {outcome['elapsed_s']:.1f} s")
    assert not outcome["success"]
    assert "LakeUnavailableError" in outcome["error"]
    assert (
        f"s3://landing-bucket/lake/bronze/claims: the object store failed or did not answer "
        f"within the bound of {BOUND_S} s (PIPELINE_SERVICE_TIMEOUT_S)"
    ) in outcome["error"]
    assert 1 <= outcome["connections"] <= 6  # bounded retries, not a retry storm
