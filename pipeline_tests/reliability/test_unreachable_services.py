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


@pytest.fixture
def black_hole() -> Iterator[BlackHole]:
    hole = BlackHole()
    yield hole
    hole.close()


STEP = """
import json, sys, time
import dagster as dg
import deltalake, mlflow.exceptions  # imported up front: the time measured is time waited
from pipeline.resources.lake import LakeResource
from pipeline.resources.tracking import TrackingResource
port, bound, which, home = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]

@dg.asset
def talks_to_mlflow(tracking: TrackingResource) -> None:
    tracking.experiment_id("fx_spreads")

@dg.asset
def talks_to_the_lake(lake: LakeResource) -> None:
    import polars as pl
    lake.overwrite_partition("bronze", "claims", pl.DataFrame({"p": ["a"]}), {"p": "a"})

resources = {
    "tracking": TrackingResource(tracking_uri=f"http://127.0.0.1:{port}", request_timeout_s=bound),
    "lake": LakeResource(
        root_uri="s3://landing-bucket/lake",
        service_timeout_s=bound,
        storage_options={
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
            "AWS_ALLOW_HTTP": "true",
            "AWS_REGION": "us-east-1",
            "AWS_ACCESS_KEY_ID": "test-only",
            "AWS_SECRET_ACCESS_KEY": "test-only",
            "AWS_S3_ALLOW_UNSAFE_RENAME": "true",
        },
    ),
}
asset = talks_to_mlflow if which == "mlflow" else talks_to_the_lake
with dg.instance_for_test(temp_dir=home) as instance:
    started = time.monotonic()
    result = dg.materialize([asset], resources=resources, instance=instance, raise_on_error=False)
    elapsed = time.monotonic() - started
    failure = result.failure_data_for_node(asset.op.name)
    error = failure.error if failure else None
    print(json.dumps({
        "success": result.success,
        "elapsed_s": elapsed,
        "error": error.to_string() if error else "",
    }))
"""


def _run_step(which: str, port: int, tmp_path: Path) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", STEP, str(port), str(BOUND_S), which, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
        cwd=REPO,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_an_unanswering_mlflow_server_fails_the_step_naming_server_and_bound(
    black_hole: BlackHole, tmp_path: Path
) -> None:
    outcome = _run_step("mlflow", black_hole.port, tmp_path)
    print(f"MLflow unreachable: the step failed after {outcome['elapsed_s']:.1f} s")
    assert not outcome["success"]
    assert (
        f"MLflow tracking server http://127.0.0.1:{black_hole.port} did not answer GET /health "
        f"within {BOUND_S} s (PIPELINE_SERVICE_TIMEOUT_S)"
    ) in outcome["error"]
    assert "ConnectionError" in outcome["error"]
    assert len(black_hole.connections) == 1  # one bounded probe, no retry storm


def test_an_unanswering_object_store_fails_the_step_naming_table_and_bound(
    black_hole: BlackHole, tmp_path: Path
) -> None:
    outcome = _run_step("lake", black_hole.port, tmp_path)
    print(f"object store unreachable: the step failed after {outcome['elapsed_s']:.1f} s")
    assert not outcome["success"]
    assert "LakeUnavailableError" in outcome["error"]
    assert (
        f"s3://landing-bucket/lake/bronze/claims: the object store failed or did not answer "
        f"within the bound of {BOUND_S} s (PIPELINE_SERVICE_TIMEOUT_S)"
    ) in outcome["error"]
    assert 1 <= len(black_hole.connections) <= 6  # bounded retries, not a retry storm
