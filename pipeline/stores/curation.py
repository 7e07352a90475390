"""A source's contract applied to a bronze partition of any size, one key bucket at a time.

:func:`pipeline.domain.contracts.apply_contract` needs a whole partition in memory,
because a duplicate key is judged against every other row of the partition. A month
of 50 million policies does not fit that way, so a partition larger than
``PIPELINE_CURATE_BUCKET_ROWS`` is first spilled to local Parquet files, one per
bucket of the typed key's hash (polars' streaming engine, a few batches in memory).
Every row of a key lands in the same bucket, so the contract applied to each bucket
alone judges every row exactly as it would on the whole partition: the curated rows
and the quarantine are the same sets, and reconcile the same way.

What a bucket yields is reduced at once (``per_bucket``: the claims' district
sufficient statistics, or the rows themselves for the small sources) and the parts
are merged by the caller; quarantined rows go to a spill file and reach the lake as a
stream. A partition that fits in one bucket takes the plain path, without spilling.
"""

import math
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import polars as pl
from dagster import MetadataValue

from pipeline.domain import contracts
from pipeline.metadata import counts_table
from pipeline.resources.lake import LakeResource
from pipeline.resources.lake_stream import FrameStream, Rows
from pipeline.stores.sources import Source, split_partition, stored_bronze

BUCKET_COLUMN = "__bucket"
SPILL_ROW_GROUP_ROWS = 20_000
"""Row-group size of the spill files: each open bucket file buffers about this many rows."""


@dataclass
class CuratedPartition:
    """The contract's outcome for one partition, reduced bucket by bucket.

    Attributes
    ----------
    parts
        ``per_bucket`` of each bucket's curated rows, in bucket order.
    quarantined
        Every rejected row with its reason: in memory, or a stream of spill files.
    """

    parts: list[pl.DataFrame]
    quarantined: Rows
    rows_in: int
    rows_curated: int
    rows_quarantined: int
    reasons: Counter[str]
    buckets: int
    scratch: tempfile.TemporaryDirectory | None = None

    def reconciliation_metadata(self) -> dict:
        """Metadata showing that every delivered row is accounted for."""
        return {
            "rows_in": self.rows_in,
            "rows_curated": self.rows_curated,
            "rows_quarantined": self.rows_quarantined,
            "quarantine_reasons": MetadataValue.md(counts_table(self.reasons)),
            "buckets": self.buckets,
        }

    def cleanup(self) -> None:
        """Remove the spill files (after the quarantine stream was written)."""
        if self.scratch is not None:
            self.scratch.cleanup()


def quarantine_reasons(quarantined: pl.DataFrame) -> Counter[str]:
    """Rejected rows per reason (a duplicate counts under ``duplicate key (...)``)."""
    reasons: Counter[str] = Counter()
    for reason in quarantined["reason"].to_list():
        for part in reason.split("; "):
            reasons[part.split(" = ")[0] if part.startswith("duplicate key") else part] += 1
    return reasons


def curate_partition(
    lake: LakeResource,
    source: Source,
    partition_key: str,
    per_bucket: Callable[[pl.DataFrame], pl.DataFrame],
    *,
    bucket_rows: int,
) -> CuratedPartition:
    """Apply ``source``'s contract to one stored bronze partition in buckets of the key.

    Parameters
    ----------
    per_bucket
        Reduces one bucket's curated rows to what the caller keeps of them.
    bucket_rows
        Rows per bucket aimed at: the partition is split into
        ``ceil(rows / bucket_rows)`` buckets (one: no spilling).

    Raises
    ------
    Failure
        When bronze holds no rows for the partition.
    """
    bronze, rows_in = stored_bronze(lake, source, partition_key)
    buckets = math.ceil(rows_in / bucket_rows)
    if buckets == 1:
        curated, quarantined, rows_in = split_partition(lake, source, partition_key)
        return CuratedPartition(
            [per_bucket(curated)],
            quarantined,
            rows_in,
            curated.height,
            quarantined.height,
            quarantine_reasons(quarantined),
            buckets,
        )
    contract = source.contract(partition_key)
    scratch = tempfile.TemporaryDirectory(prefix=f"curate-{source.name}-")
    try:
        return _curate_in_buckets(
            bronze, contract, partition_key, per_bucket, rows_in, buckets, scratch
        )
    except BaseException:
        scratch.cleanup()
        raise


def _curate_in_buckets(
    bronze: pl.LazyFrame,
    contract: contracts.Contract,
    partition_key: str,
    per_bucket: Callable[[pl.DataFrame], pl.DataFrame],
    rows_in: int,
    buckets: int,
    scratch: tempfile.TemporaryDirectory,
) -> CuratedPartition:
    root = Path(scratch.name)
    spilled, rejected = root / "bronze", root / "quarantine"
    rejected.mkdir()
    bucket = pl.struct(contracts.typed_key(contract)).hash(seed=0) % buckets
    bronze.with_columns(bucket.alias(BUCKET_COLUMN)).sink_parquet(
        pl.PartitionBy(spilled, key=BUCKET_COLUMN, include_key=False),
        row_group_size=SPILL_ROW_GROUP_ROWS,
        mkdir=True,
    )
    parts, reasons = [], Counter()
    rows_curated = rows_quarantined = 0
    for folder in sorted(spilled.iterdir(), key=lambda f: int(f.name.split("=")[1])):
        rows = pl.read_parquet(folder / "*.parquet")
        curated, quarantined = contracts.apply_contract(rows, contract, partition_key=partition_key)
        del rows
        shutil.rmtree(folder)
        parts.append(per_bucket(curated))
        rows_curated += curated.height
        if quarantined.height:
            quarantined.write_parquet(rejected / f"{folder.name.split('=')[1]}.parquet")
            rows_quarantined += quarantined.height
            reasons.update(quarantine_reasons(quarantined))
    if rows_curated + rows_quarantined != rows_in:
        raise contracts.ContractError(
            f"{contract.table} partition {partition_key}: {rows_in} rows in but "
            f"{rows_curated} curated + {rows_quarantined} quarantined"
        )
    quarantine: Rows = (
        FrameStream.of_files(sorted(rejected.glob("*.parquet")))
        if rows_quarantined
        else contracts.empty_quarantine()
    )
    return CuratedPartition(
        parts, quarantine, rows_in, rows_curated, rows_quarantined, reasons, buckets, scratch
    )
