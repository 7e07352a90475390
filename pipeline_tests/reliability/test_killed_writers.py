"""kill -9 of writers at random moments, for every Delta table the platform writes.

For each table of :data:`~pipeline_tests.reliability.writers.TABLES`, 20 seeded trials
fork a writer that loops the platform's write of that table, wait until it has
committed at least once, let it run a random fraction of a write longer and
``SIGKILL`` it. After every kill the table must load, its latest and previous
versions must read, and every visible partition must hold exactly one write's rows,
all of them (for a curated table: curated + quarantined rows of one batch add up to
what was delivered). Writers are forked from a warm
:class:`~pipeline_tests.reliability.writers.WriterServer`, so a trial costs
milliseconds rather than an interpreter start.
"""

import os
import random
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import polars as pl
import pytest
from deltalake import DeltaTable

from pipeline.resources.lake import BATCH_COLUMN, LakeResource
from pipeline_tests.reliability.conftest import unreferenced_files
from pipeline_tests.reliability.writers import (
    ROWS,
    TABLES,
    TableSpec,
    WriterServer,
    quarantine_key,
)

TRIALS = 20
KILL_WINDOW_S = 0.06  # about one write of these small frames
HANG_GUARD_S = 120.0  # a writer that commits nothing for this long is a hang, not slowness

pytestmark = pytest.mark.slow


def kill_mid_write(
    server: WriterServer, root: str, spec: TableSpec, start: int, rng: random.Random, work: Path
) -> int:
    """Fork a looping writer, let it commit, SIGKILL it at a random moment; return commits."""
    progress = work / f"progress-{start}"
    pid = server.spawn(root, spec, start, progress)
    try:
        deadline = time.monotonic() + HANG_GUARD_S
        while not progress.exists() or progress.stat().st_size < 1:
            if time.monotonic() > deadline:
                pytest.fail(f"{spec.name}: writer committed nothing in {HANG_GUARD_S} s")
            time.sleep(0.001)
        time.sleep(rng.uniform(0.0, KILL_WINDOW_S))
    finally:
        os.kill(pid, signal.SIGKILL)
        killed_by, _ = server.reap(pid)
    assert killed_by == signal.SIGKILL, f"{spec.name}: writer ended by {killed_by}, not SIGKILL"
    return len(progress.read_text().splitlines())


def _assert_whole_writes(frame: pl.DataFrame, keys: list[str], where: str) -> None:
    """Every partition holds exactly one write, with all its rows."""
    per_partition = frame.group_by(keys or pl.lit(0)).agg(
        pl.col("write_no").n_unique().alias("writes"),
        pl.len().alias("rows"),
        pl.col("row").n_unique().alias("distinct_rows"),
    )
    bad = per_partition.filter(
        (pl.col("writes") != 1) | (pl.col("rows") != ROWS) | (pl.col("distinct_rows") != ROWS)
    )
    assert bad.height == 0, f"{where}: partial or mixed writes {bad.rows(named=True)}"


def _previous(uri: str) -> pl.DataFrame | None:
    """The version before the latest, read in full (``None`` for a table of one version)."""
    version = DeltaTable(uri).version()
    if version == 0:
        return None
    return pl.from_arrow(DeltaTable(uri, version=version - 1).to_pyarrow_table())


def _check_overwrite(lake: LakeResource, spec: TableSpec, uri: str) -> None:
    keys = list(spec.partitions[0])
    _assert_whole_writes(lake.read(spec.layer, spec.table), keys, f"{spec.name} latest")
    previous = _previous(uri)
    if previous is not None:
        _assert_whole_writes(previous, keys, f"{spec.name} previous version")


def _check_append(lake: LakeResource, spec: TableSpec, uri: str) -> None:
    for frame in (lake.read(spec.layer, spec.table), _previous(uri)):
        if frame is None:
            continue
        counts = frame.group_by("write_no").len()
        assert (counts["len"] == ROWS).all(), f"{spec.name}: partial appends {counts}"


def _check_commit(lake: LakeResource, spec: TableSpec, uri: str) -> int:
    """Curated and quarantine show one whole batch per partition; return invisible batches."""
    curated = lake.read("curated", spec.table)
    quarantined = lake.read("quarantine", spec.table)
    for partition in spec.partitions:
        c = curated.filter(*(pl.col(k) == v for k, v in partition.items()))
        q = quarantined.filter(pl.col("partition_key") == quarantine_key(partition))
        writes = set(c["write_no"]) | set(q["write_no"])
        assert len(writes) == 1, f"{spec.name} {partition}: batches mixed {writes}"
        rows = sorted([*c["row"].to_list(), *q["row"].to_list()])
        assert rows == list(range(ROWS)), f"{spec.name} {partition}: rows lost or doubled"
        (write_no,) = writes
        assert c.height == write_no % (ROWS + 1), f"{spec.name}: curated of another batch"
    _previous(uri)
    stored = lake.read("curated", spec.table, committed=False)
    committed = set(lake.commits("curated", spec.table)[BATCH_COLUMN])
    return len(set(stored[BATCH_COLUMN]) - committed)


@pytest.fixture(scope="module")
def server() -> Iterator[WriterServer]:
    """One warm writer server for every table (starting one imports the platform)."""
    with WriterServer() as started:
        yield started


@pytest.mark.parametrize("spec", TABLES, ids=[s.name for s in TABLES])
def test_a_writer_killed_at_random_moments_never_leaves_partial_rows(
    tmp_path: Path, spec: TableSpec, server: WriterServer
) -> None:
    root = str(tmp_path / "lake")
    lake = LakeResource(root_uri=root, service_timeout_s=30)
    uri = lake.table_uri(spec.layer, spec.table)
    rng = random.Random(f"kill-9:{spec.name}")
    commits, interrupted = 0, 0
    for trial in range(TRIALS):
        commits += kill_mid_write(server, root, spec, trial * 10_000, rng, tmp_path)
        if spec.kind == "overwrite":
            _check_overwrite(lake, spec, uri)
        elif spec.kind == "append":
            _check_append(lake, spec, uri)
        else:
            interrupted += _check_commit(lake, spec, uri) > 0
    orphans = len(unreferenced_files(Path(uri)))
    print(
        f"{spec.name}: {TRIALS} kills after {commits} commits; {orphans} orphaned files, "
        f"{interrupted} kills between a batch and its commit record"
    )
    assert commits >= TRIALS
