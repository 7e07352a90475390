"""The four upstream feeds: where they land, how bronze stores them, how curated splits them.

Bronze keeps every delivered value as text plus lineage columns, one Delta partition
per landing partition. Curated applies the source's contract
(:mod:`pipeline.domain.contracts`): typed, clean rows are published and every rejected
row goes to ``quarantine/<table>`` with its reason, file and row number.
"""

import datetime as dt
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import polars as pl
from dagster import AssetKey, Failure, MetadataValue, PartitionsDefinition

from pipeline import keys
from pipeline.domain import contracts
from pipeline.domain.landing import LandingFileError
from pipeline.metadata import counts_table
from pipeline.partitions import date_partitions, month_partitions, valuation_date_partitions
from pipeline.resources.lake import LakeResource
from pipeline.resources.landing import LandingResource

BRONZE_PARTITION_COLUMN = "_partition_key"
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


def read_delivery(landing: LandingResource, source: Source, partition_key: str) -> pl.DataFrame:
    """All files of one landing partition as text, with lineage columns.

    Raises
    ------
    Failure
        When no file was delivered, or a file is unreadable or lacks a contract
        column; the message names the file and the problem.
    """
    files = landing.partition_files(source.name, partition_key)
    if not files:
        raise Failure(
            f"{source.name} partition {partition_key}: no landing file "
            f"{source.name}_{partition_key}*.csv|parquet under {landing.uri(source.name)}"
        )
    contract = source.contract(partition_key)
    frames = []
    ingested_at = dt.datetime.now(dt.UTC).replace(tzinfo=None)
    for file in files:
        try:
            frame = landing.read_as_text(file)
            contracts.check_required_columns(frame, contract, file.relative)
        except (LandingFileError, contracts.ContractError) as exc:
            raise Failure(
                f"{source.name} partition {partition_key}: {exc}",
                metadata={"file": file.relative},
            ) from exc
        delivered_at = dt.datetime.fromtimestamp(file.mtime_ns / 1e9, dt.UTC).replace(tzinfo=None)
        frames.append(
            frame.select(contract.required_columns).with_columns(
                pl.lit(file.relative).alias("_source_file"),
                pl.int_range(1, frame.height + 1, dtype=pl.Int64).alias("_row_number"),
                pl.lit(ingested_at).alias("_ingested_at"),
                pl.lit(delivered_at).alias("_delivered_at"),
                pl.lit(partition_key).alias(BRONZE_PARTITION_COLUMN),
            )
        )
    return pl.concat(frames)


def read_bronze(lake: LakeResource, source: Source, partition_key: str) -> pl.DataFrame:
    """The stored bronze rows of one partition (empty when never ingested)."""
    return lake.read("bronze", source.name, {BRONZE_PARTITION_COLUMN: partition_key})


def split_partition(
    lake: LakeResource, source: Source, partition_key: str
) -> tuple[pl.DataFrame, pl.DataFrame, int]:
    """Apply the source contract to a stored bronze partition.

    Returns ``(curated, quarantined, rows_in)``.
    """
    bronze = read_bronze(lake, source, partition_key)
    if bronze.height == 0:
        raise Failure(
            f"{source.name} partition {partition_key}: bronze has no rows; "
            f"materialise {source.key.to_user_string()} for this partition first"
        )
    curated, quarantined = contracts.apply_contract(
        bronze, source.contract(partition_key), partition_key=partition_key
    )
    return curated, quarantined, bronze.height


def reconciliation_metadata(rows_in: int, curated_rows: int, quarantined: pl.DataFrame) -> dict:
    """Metadata showing that every delivered row is accounted for."""
    reasons = Counter()
    for reason in quarantined["reason"].to_list():
        for part in reason.split("; "):
            reasons[part.split(" = ")[0] if part.startswith("duplicate key") else part] += 1
    return {
        "rows_in": rows_in,
        "rows_curated": curated_rows,
        "rows_quarantined": quarantined.height,
        "quarantine_reasons": MetadataValue.md(counts_table(reasons)),
    }


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
) -> tuple[pl.DataFrame, Counter]:
    """Curate the requested symbols of one FX day: quarantine, then one atomic commit.

    The day's ticks are read and split once for all its symbols.

    Returns
    -------
    tuple of (published rows, counts)
        ``counts`` has ``rows_curated`` and ``rows_quarantined_for_symbol`` (requested
        symbols only), ``rows_in_days`` and ``rows_quarantined_days`` (whole day).
    """
    rows, quarantined, rows_in = split_partition(lake, SOURCES["fx_ticks"], date)
    lake.overwrite_partition("quarantine", "fx_spreads", quarantined, {"partition_key": date})
    published = (
        rows.filter(pl.col("symbol").is_in(symbols)).select(FX_SPREAD_COLUMNS).sort("symbol", "ts")
    )
    lake.overwrite_partitions(
        "curated", "fx_spreads", published, [{"symbol": s, "date": date} for s in symbols]
    )
    q_symbols = quarantined_symbol(quarantined)
    return published, Counter(
        rows_curated=published.height,
        rows_quarantined_for_symbol=int(q_symbols.is_in(symbols).sum()),
        rows_in_days=rows_in,
        rows_quarantined_days=quarantined.height,
    )
