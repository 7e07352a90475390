"""The five upstream feeds: where they land, how bronze stores them, how curated splits them.

Bronze keeps every delivered value as text plus lineage columns, one Delta partition
per landing partition, including columns the contract does not declare (the bronze
drift check names them). Curated applies the source's contract
(:mod:`pipeline.domain.contracts`): typed, clean rows are published and every rejected
row goes to ``quarantine/<table>`` with its reason, file and row number. Both are
committed together (:meth:`pipeline.resources.lake.LakeResource.commit_outcome`):
readers see the curated rows and the quarantined rows of one batch, or neither.
"""

import datetime as dt
import json
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import polars as pl
from dagster import AssetKey, Failure, PartitionsDefinition

from pipeline import keys
from pipeline.domain import contracts
from pipeline.domain.landing import LandingFileError, unparseable
from pipeline.partitions import date_partitions, month_partitions, valuation_date_partitions
from pipeline.resources.lake import BatchCommit, LakeResource, PartitionWrite
from pipeline.resources.lake_stream import STREAM_BATCH_ROWS, FrameStream, Rows
from pipeline.resources.landing import LandingFile, LandingResource

BRONZE_PARTITION_COLUMN = "_partition_key"
LANDING_HASHES_METADATA = "landing_sha256"
"""Materialisation metadata of a bronze partition: JSON of file -> content hash read."""
FX_SPREAD_COLUMNS = ("symbol", "date", "ts", "bid", "ask", "spread")


@dataclass(frozen=True)
class Source:
    """One upstream feed: its landing folder, partitions and contract."""

    name: str
    key: AssetKey
    partitions_def: PartitionsDefinition
    contract: Callable[[str], contracts.Contract]
    description: str


SOURCES = {
    "claims": Source(
        "claims",
        keys.BRONZE_CLAIMS,
        month_partitions,
        contracts.claims_contract,
        "Policy-level claims per valuation month, as delivered (CSV or Parquet).",
    ),
    "fx_ticks": Source(
        "fx_ticks",
        keys.BRONZE_FX_TICKS,
        date_partitions,
        contracts.fx_ticks_contract,
        "Bid/ask ticks of every currency pair per UTC day, as delivered.",
    ),
    "fx_incidents": Source(
        "fx_incidents",
        keys.BRONZE_FX_INCIDENTS,
        date_partitions,
        contracts.fx_incidents_contract,
        "The FX desk's incident log per UTC day: reviewed windows and confirmed spread "
        "anomalies (symbol, start, end, label, reviewer, note), as delivered.",
    ),
    "loan_book": Source(
        "loan_book",
        keys.BRONZE_LOAN_BOOK,
        valuation_date_partitions,
        contracts.loan_book_contract,
        "Loan-level exposures (EAD, PD, LGD) per valuation date, as delivered.",
    ),
    "loan_scenarios": Source(
        "loan_scenarios",
        keys.BRONZE_LOAN_SCENARIOS,
        valuation_date_partitions,
        contracts.loan_scenarios_contract,
        "Macro scenarios (PD multiplier, asset correlation) per valuation date.",
    ),
}


LINEAGE_TYPES = {
    "_source_file": pl.String(),
    "_source_sha256": pl.String(),
    "_row_number": pl.Int64(),
    "_ingested_at": pl.Datetime("us"),
    "_delivered_at": pl.Datetime("us"),
    BRONZE_PARTITION_COLUMN: pl.String(),
}
"""The lineage columns bronze adds to every delivered row."""


@dataclass(frozen=True)
class Delivery:
    """What bronze stores for one partition, and what it was read from.

    Attributes
    ----------
    rows
        Every delivered column as text (the union over the partition's files) plus
        lineage columns, as a stream: the files are parsed batch by batch while
        bronze is written, so a drop of any size is ingested in bounded memory.
    sha256
        Relative file name to the content hash of the bytes read; the landing
        sensor compares it with what is in the landing folder now.
    undeclared
        Delivered columns the contract does not declare, in first-seen order.
    """

    rows: FrameStream
    sha256: dict[str, str]
    undeclared: list[str]

    @property
    def hashes_json(self) -> str:
        """:attr:`sha256` as sorted JSON (materialisation metadata)."""
        return json.dumps(self.sha256, sort_keys=True)


@dataclass(frozen=True)
class _DeliveredFile:
    file: LandingFile
    rows: pl.LazyFrame
    columns: list[str]
    lineage: dict[str, object]


def read_delivery(landing: LandingResource, source: Source, partition_key: str) -> Delivery:
    """All files of one landing partition as a stream of text rows with lineage columns.

    Each file is hashed and its header checked before any row is read; its rows are
    read when bronze is written.

    Raises
    ------
    Failure
        When no file was delivered, or a file is empty, not UTF-8, unreadable, lacks a
        contract column or has column names bronze cannot store; the message names the
        file and the problem. Raised by the stream (so no row is committed) when a file
        stops parsing part of the way through, or changes while it is read.
    """
    files = landing.partition_files(source.name, partition_key)
    if not files:
        raise Failure(
            f"{source.name} partition {partition_key}: no landing file "
            f"{source.name}_{partition_key}*.csv|parquet under {landing.uri(source.name)}"
        )
    contract = source.contract(partition_key)
    delivered, hashes, undeclared = [], {}, {}
    ingested_at = dt.datetime.now(dt.UTC).replace(tzinfo=None)
    for file in files:
        try:
            hashes[file.relative] = landing.digest(file.relative)  # also on each row
            rows = landing.scan_as_text(file.relative)
            columns = _delivered_columns(landing, file, rows)
            contracts.check_required_columns(columns, contract, file.relative)
            contracts.check_storable_columns(columns, file.relative)
        except (LandingFileError, contracts.ContractError) as exc:
            raise _file_failure(source, partition_key, file, exc) from exc
        undeclared.update(dict.fromkeys(contracts.undeclared_columns(columns, contract)))
        delivered_at = dt.datetime.fromtimestamp(file.mtime_ns / 1e9, dt.UTC).replace(tzinfo=None)
        lineage = {
            "_source_file": file.relative,
            "_source_sha256": hashes[file.relative],
            "_ingested_at": ingested_at,
            "_delivered_at": delivered_at,
            BRONZE_PARTITION_COLUMN: partition_key,
        }
        delivered.append(_DeliveredFile(file, rows, columns, lineage))
    union = list(dict.fromkeys(c for d in delivered for c in (*d.columns, *LINEAGE_TYPES)))
    declared = list(contract.required_columns)
    extra = list(undeclared)
    order = [*declared, *extra, *[c for c in union if c not in (*declared, *extra)]]
    schema = pl.Schema({c: LINEAGE_TYPES.get(c, pl.String()) for c in order})

    def batches() -> Iterator[pl.DataFrame]:
        for one in delivered:
            yield from _file_batches(landing, source, partition_key, one, schema)

    return Delivery(FrameStream(schema, batches), hashes, extra)


def _delivered_columns(
    landing: LandingResource, file: LandingFile, rows: pl.LazyFrame
) -> list[str]:
    try:
        columns = rows.collect_schema().names()
    except Exception as exc:  # polars raises several unrelated types for broken files
        raise unparseable(landing.uri(file.relative), exc) from exc
    if not columns:
        raise LandingFileError(f"{landing.uri(file.relative)}: no columns")
    return columns


def _file_failure(source: Source, partition_key: str, file: LandingFile, exc: Exception) -> Failure:
    return Failure(
        f"{source.name} partition {partition_key}: {exc}", metadata={"file": file.relative}
    )


def _file_batches(
    landing: LandingResource,
    source: Source,
    partition_key: str,
    delivered: _DeliveredFile,
    schema: pl.Schema,
) -> Iterator[pl.DataFrame]:
    """The rows of one file, batch by batch, numbered from 1 and aligned to ``schema``."""
    file, read = delivered.file, 0
    constants = [pl.lit(v, dtype=LINEAGE_TYPES[c]).alias(c) for c, v in delivered.lineage.items()]
    try:
        for batch in delivered.rows.collect_batches(chunk_size=STREAM_BATCH_ROWS, lazy=True):
            numbered = batch.with_columns(
                *constants,
                pl.int_range(read + 1, read + batch.height + 1, dtype=pl.Int64).alias(
                    "_row_number"
                ),
            )
            read += batch.height
            yield numbered.select(
                pl.col(c) if c in numbered.columns else pl.lit(None, dtype=t).alias(c)
                for c, t in schema.items()
            )
    except Failure:
        raise
    except Exception as exc:  # polars raises several unrelated types for broken files
        problem = unparseable(landing.uri(file.relative), exc)
        raise _file_failure(source, partition_key, file, problem) from exc
    if landing.signature(file.relative) != (file.size, file.mtime_ns):
        problem = LandingFileError(
            f"{landing.uri(file.relative)}: changed while it was ingested (size or "
            "modification time differs from when it was listed); nothing is stored, the "
            "landing sensor ingests it again once it settles"
        )
        raise _file_failure(source, partition_key, file, problem)


def undeclared_in_bronze(stored: pl.LazyFrame, source: Source, partition_key: str) -> list[str]:
    """Undeclared columns holding a value in a stored bronze partition.

    The bronze table's schema is the union over every partition ever stored, so a
    column is drift *for this partition* only where one of its rows has a value.
    """
    contract = source.contract(partition_key)
    candidates = contracts.undeclared_columns(stored.collect_schema().names(), contract)
    if not candidates:
        return []
    held = stored.select(pl.col(c).is_not_null().any() for c in candidates).collect()
    return [c for c in candidates if held[c].item()]


def read_bronze(lake: LakeResource, source: Source, partition_key: str) -> pl.DataFrame:
    """The stored bronze rows of one partition (empty when never ingested)."""
    return lake.read("bronze", source.name, {BRONZE_PARTITION_COLUMN: partition_key})


def no_bronze_rows(source: Source, partition_key: str) -> Failure:
    """The failure of a step that needs a bronze partition which holds no rows."""
    return Failure(
        f"{source.name} partition {partition_key}: bronze has no rows; "
        f"materialise {source.key.to_user_string()} for this partition first"
    )


def stored_bronze(
    lake: LakeResource, source: Source, partition_key: str
) -> tuple[pl.LazyFrame, int]:
    """A stored bronze partition read lazily, and its row count.

    Raises
    ------
    Failure
        When the partition holds no rows (:func:`no_bronze_rows`).
    """
    bronze = scan_bronze(lake, source, partition_key)
    rows = count_rows(bronze)
    if rows == 0:
        raise no_bronze_rows(source, partition_key)
    return bronze, rows


def count_rows(stored: pl.LazyFrame) -> int:
    """Rows of a lazy read such as :func:`scan_bronze` (0 for a partition never stored)."""
    return int(stored.select(pl.len()).collect().item()) if stored.collect_schema() else 0


def scan_bronze(lake: LakeResource, source: Source, partition_key: str) -> pl.LazyFrame:
    """The stored bronze rows of one partition, lazily (no rows when never ingested).

    For what a partition of any size allows: counts, maxima, a streamed pass.
    """
    lazy = lake.scan("bronze", source.name, {BRONZE_PARTITION_COLUMN: partition_key})
    return pl.LazyFrame() if lazy is None else lazy


def split_partition(
    lake: LakeResource, source: Source, partition_key: str
) -> tuple[pl.DataFrame, pl.DataFrame, int]:
    """Apply the source contract to a stored bronze partition.

    Returns ``(curated, quarantined, rows_in)``.
    """
    bronze = read_bronze(lake, source, partition_key)
    if bronze.height == 0:
        raise no_bronze_rows(source, partition_key)
    curated, quarantined = contracts.apply_contract(
        bronze, source.contract(partition_key), partition_key=partition_key
    )
    return curated, quarantined, bronze.height


def publish_partition(
    lake: LakeResource,
    table: str,
    published: pl.DataFrame,
    partition: dict[str, str],
    quarantined: Rows,
    partition_key: str,
) -> BatchCommit:
    """Commit one curated partition and its quarantine together (all or nothing)."""
    return lake.commit_outcome(
        [
            PartitionWrite("curated", table, published, [partition]),
            PartitionWrite("quarantine", table, quarantined, [{"partition_key": partition_key}]),
        ]
    )


def quarantined_symbol(quarantined: pl.DataFrame) -> pl.Series:
    """Normalised symbol of each quarantined tick (null when not normalisable)."""
    raw = quarantined["record"].str.json_path_match("$.symbol")
    return contracts.normalise_symbols(raw)


def bronze_symbols(lake: LakeResource, date: str) -> list[str]:
    """Distinct raw ``symbol`` values stored in bronze for one FX day."""
    raw = lake.read("bronze", "fx_ticks", {BRONZE_PARTITION_COLUMN: date}, columns=["symbol"])
    return [] if raw.height == 0 else raw["symbol"].drop_nulls().unique().to_list()


def curate_fx_day(
    lake: LakeResource, date: str, symbols: list[str]
) -> tuple[pl.DataFrame, Counter, BatchCommit]:
    """Curate the requested symbols of one FX day and its quarantine in one commit point.

    The day's ticks are read and split once for all its symbols. With no symbol
    (a day none of whose ticks carries a valid symbol), only the quarantine is
    committed: every row is still accounted for.

    Returns
    -------
    tuple of (published rows, counts, commit)
        ``counts`` has ``rows_curated`` and ``rows_quarantined_for_symbol`` (requested
        symbols only), ``rows_in_days`` and ``rows_quarantined_days`` (whole day), and
        ``rows_curated:<symbol>`` and ``rows_quarantined:<symbol>`` for each symbol.
    """
    rows, quarantined, rows_in = split_partition(lake, SOURCES["fx_ticks"], date)
    published = (
        rows.filter(pl.col("symbol").is_in(symbols)).select(FX_SPREAD_COLUMNS).sort("symbol", "ts")
    )
    writes = [PartitionWrite("quarantine", "fx_spreads", quarantined, [{"partition_key": date}])]
    if symbols:
        curated = [{"symbol": s, "date": date} for s in symbols]
        writes.insert(0, PartitionWrite("curated", "fx_spreads", published, curated))
    commit = lake.commit_outcome(writes)
    q_symbols = quarantined_symbol(quarantined)
    counts = Counter(
        rows_curated=published.height,
        rows_quarantined_for_symbol=int(q_symbols.is_in(symbols).sum()),
        rows_in_days=rows_in,
        rows_quarantined_days=quarantined.height,
    )
    for symbol in symbols:
        counts[f"rows_curated:{symbol}"] = int((published["symbol"] == symbol).sum())
        counts[f"rows_quarantined:{symbol}"] = int((q_symbols == symbol).sum())
    return published, counts, commit


def quarantine_fx_day_without_symbols(lake: LakeResource, date: str) -> int | None:
    """Quarantine a bronze FX day none of whose ticks has a valid symbol.

    No ``(symbol, date)`` partition exists for such a day, so no fx_spreads run
    would ever account for its rows; the bronze run commits their quarantine
    instead. Returns the number of rows quarantined, or ``None`` when the day has a
    valid symbol (its fx_spreads runs quarantine the rest).
    """
    raw = bronze_symbols(lake, date)
    if any(contracts.try_normalise_symbol(s) for s in raw):
        return None
    _, counts, _ = curate_fx_day(lake, date, [])
    return counts["rows_quarantined_days"]
