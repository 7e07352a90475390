"""The compute resource's Spark session outside the test harness.

The test session sets ``PYSPARK_PYTHON`` for its shared Spark session (conftest), which
would hide the case of a user's process: here a fresh interpreter without it, and a
``python3`` first on PATH that is not this environment's.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

WORKER_JOB = textwrap.dedent(
    """
    from pipeline.resources.compute import ComputeResource

    spark = ComputeResource(backend="spark").spark_session()
    rows = spark.range(4).repartition(2).mapInPandas(
        lambda frames: (f.assign(id=f["id"] * 2) for f in frames), "id long"
    ).collect()
    print(sorted(r.id for r in rows))
    spark.stop()
    """
)


@pytest.mark.slow
def test_spark_workers_run_this_interpreter_without_pyspark_python(tmp_path: Path) -> None:
    """Without the default the workers would start the ``python3`` on PATH (here a script
    that fails), and every Spark task would die before running a line of the platform."""
    bogus = tmp_path / "bin"
    bogus.mkdir()
    (bogus / "python3").write_text("#!/bin/sh\necho 'not the platform interpreter' >&2\nexit 3\n")
    (bogus / "python3").chmod(0o755)
    env = {
        k: v for k, v in os.environ.items() if k not in ("PYSPARK_PYTHON", "PYSPARK_DRIVER_PYTHON")
    }
    env["PATH"] = f"{bogus}{os.pathsep}{env.get('PATH', '')}"
    done = subprocess.run(
        [sys.executable, "-c", WORKER_JOB],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "[0, 2, 4, 6]"
