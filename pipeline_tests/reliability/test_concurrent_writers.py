"""Concurrent writers on different partitions of one table: nothing lost, nothing doubled.

Two writer processes (forked from a warm :class:`WriterServer`, released together by a
go file) write different partitions of the same table, 50 rounds in a row:

* two FX days of ``bronze/fx_ticks`` through partition overwrites: both commits land,
  each partition holds its own round's write;
* two symbols of one FX day of ``curated/fx_spreads``: both write the day's quarantine
  partition (the regression: its rows were duplicated in 1 round of 10). After every
  round each commit record is present exactly once, and rows in = curated +
  quarantined holds for both symbols, with every quarantine row present once.
"""

import os
from collections.abc import Iterator
from pathlib import Path

import polars as pl
import pytest
from deltalake import DeltaTable

from pipeline.resources.lake import BATCH_COLUMN, LakeResource
from pipeline_tests.reliability.writers import ROWS, TableSpec, WriterServer

ROUNDS = 50

pytestmark = pytest.mark.slow

DAY = "2026-09-01"
BRONZE_DAYS = (
    TableSpec("bronze", "fx_ticks", "overwrite", ({"_partition_key": "2026-09-01"},)),
    TableSpec("bronze", "fx_ticks", "overwrite", ({"_partition_key": "2026-09-02"},)),
)
FX_SYMBOLS = (
    TableSpec("curated", "fx_spreads", "commit", ({"symbol": "EURUSD", "date": DAY},)),
    TableSpec("curated", "fx_spreads", "commit", ({"symbol": "GBPUSD", "date": DAY},)),
)


@pytest.fixture(scope="module")
def server() -> Iterator[WriterServer]:
    with WriterServer() as started:
        yield started


def _round(
    server: WriterServer, root: str, specs: tuple[TableSpec, ...], write_no: int, work: Path
) -> list[str]:
    """Release one write of each spec at once; return what each writer reported."""
    go = work / f"go-{write_no}"
    progress = [work / f"progress-{write_no}-{i}" for i in range(len(specs))]
    pids = [
        server.spawn(root, spec, write_no, path, count=1, go=go)
        for spec, path in zip(specs, progress, strict=True)
    ]
    go.touch()
    outcomes = [server.reap(pid) for pid in pids]
    assert outcomes == [(None, 0)] * len(specs), f"round {write_no}: writers failed {outcomes}"
    return [path.read_text().strip() for path in progress]


def test_overwrites_of_different_partitions_both_land_every_round(
    tmp_path: Path, server: WriterServer
) -> None:
    root = str(tmp_path / "lake")
    lake = LakeResource(root_uri=root, service_timeout_s=30)
    for write_no in range(ROUNDS):
        _round(server, root, BRONZE_DAYS, write_no, tmp_path)
        stored = lake.read("bronze", "fx_ticks")
        per_day = stored.group_by("_partition_key").agg(
            pl.col("write_no").unique().alias("writes"), pl.len().alias("rows")
        )
        assert sorted(per_day.rows()) == [
            ("2026-09-01", [write_no], ROWS),
            ("2026-09-02", [write_no], ROWS),
        ], f"round {write_no}"
    # every commit landed once: a table creation plus two overwrites per later round
    assert DeltaTable(lake.table_uri("bronze", "fx_ticks")).version() + 1 == 2 * ROUNDS


def test_two_symbols_of_one_day_commit_with_their_quarantine_exactly_once(
    tmp_path: Path, server: WriterServer
) -> None:
    root = str(tmp_path / "lake")
    lake = LakeResource(root_uri=root, service_timeout_s=30)
    seen_batches: list[str] = []
    for write_no in range(ROUNDS):
        batches = _round(server, root, FX_SYMBOLS, write_no, tmp_path)
        seen_batches += batches
        split = write_no % (ROWS + 1)
        curated = lake.read("curated", "fx_spreads")
        quarantined = lake.read("quarantine", "fx_spreads", {"partition_key": DAY})
        for spec in FX_SYMBOLS:
            symbol = spec.partitions[0]["symbol"]
            rows = curated.filter(pl.col("symbol") == symbol)
            assert sorted(rows["row"]) == list(range(split)), f"round {write_no} {symbol}"
            assert set(rows["write_no"]) <= {write_no}
        # both writers quarantined the same rows of the day: one batch of them is visible
        assert sorted(quarantined["row"]) == list(range(split, ROWS)), f"round {write_no}"
        assert quarantined["write_no"].n_unique() <= 1
        # rows in = curated + quarantined, per symbol as for the whole day
        assert curated.height + 2 * quarantined.height == 2 * ROWS
        commits = lake.read("ops", "ingest_commits")
        counts = commits.filter(pl.col("batch_id").is_in(batches)).group_by("batch_id").len()
        # each batch: one record for its curated partition, one for the day's quarantine
        assert sorted(counts.rows()) == sorted((b, 2) for b in batches), f"round {write_no}"
    all_commits = lake.read("ops", "ingest_commits")
    assert all_commits["batch_id"].n_unique() == len(set(seen_batches)) == 2 * ROUNDS
    assert all_commits.height == 4 * ROUNDS
    stored = lake.read("quarantine", "fx_spreads", committed=False)
    assert stored[BATCH_COLUMN].n_unique() <= 2, "superseded quarantine batches are deleted"
    assert os.path.isdir(lake.table_uri("ops", "ingest_commits"))
