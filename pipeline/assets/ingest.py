"""Bronze and curated assets: landing files -> Delta, with quarantine.

Bronze keeps every delivered value as text plus lineage columns, one Delta
partition per landing partition. Curated applies the source's contract
(:mod:`pipeline.domain.contracts`): typed, clean rows are published and every
rejected row goes to ``quarantine/<table>`` with its reason, file and row number.
"""

import datetime as dt
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import polars as pl
from dagster import (
    AssetDep,
    AssetExecutionContext,
    AssetKey,
    AssetsDefinition,
    BackfillPolicy,
    Failure,
    MaterializeResult,
    MetadataValue,
    MultiToSingleDimensionPartitionMapping,
    PartitionsDefinition,
    asset,
)

from pipeline import keys
from pipeline.assets.metadata import column_schema, counts_table, markdown_table
from pipeline.domain import contracts
from pipeline.domain.landing import LandingFileError, landing_files, read_as_text
from pipeline.partitions import (
    date_partitions,
    month_partitions,
    split_symbol_date,
    symbol_date_partitions,
    valuation_date_partitions,
)
from pipeline.resources.lake import LakeResource
from pipeline.resources.landing import LandingResource

BRONZE_PARTITION_COLUMN = "_partition_key"


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
    files = landing_files(landing.root, source.name, partition_key)
    if not files:
        raise Failure(
            f"{source.name} partition {partition_key}: no landing file "
            f"{source.name}_{partition_key}*.csv|parquet under {landing.root / source.name}"
        )
    contract = source.contract(partition_key)
    frames = []
    ingested_at = dt.datetime.now(dt.UTC).replace(tzinfo=None)
    for path in files:
        relative = str(path.relative_to(landing.root))
        try:
            frame = read_as_text(path)
            contracts.check_required_columns(frame, contract, relative)
        except (LandingFileError, contracts.ContractError) as exc:
            raise Failure(
                f"{source.name} partition {partition_key}: {exc}",
                metadata={"file": relative},
            ) from exc
        delivered_at = dt.datetime.fromtimestamp(path.stat().st_mtime, dt.UTC).replace(tzinfo=None)
        frames.append(
            frame.select(contract.required_columns).with_columns(
                pl.lit(relative).alias("_source_file"),
                pl.int_range(1, frame.height + 1, dtype=pl.Int64).alias("_row_number"),
                pl.lit(ingested_at).alias("_ingested_at"),
                pl.lit(delivered_at).alias("_delivered_at"),
                pl.lit(partition_key).alias(BRONZE_PARTITION_COLUMN),
            )
        )
    return pl.concat(frames)


def _bronze_asset(source: Source) -> AssetsDefinition:
    @asset(
        key=source.key,
        partitions_def=source.partitions_def,
        description=source.description,
        group_name="ingest",
        kinds={"delta", "polars"},
        metadata={"layer": "bronze", "partition_expr": BRONZE_PARTITION_COLUMN},
    )
    def bronze(
        context: AssetExecutionContext, lake: LakeResource, landing: LandingResource
    ) -> MaterializeResult:
        partition_key = context.partition_key
        delivered = read_delivery(landing, source, partition_key)
        version = lake.overwrite_partition(
            "bronze", source.name, delivered, {BRONZE_PARTITION_COLUMN: partition_key}
        )
        files = sorted(delivered["_source_file"].unique().to_list())
        return MaterializeResult(
            metadata={
                "dagster/row_count": delivered.height,
                "dagster/column_schema": column_schema(delivered),
                "files": MetadataValue.md("\n".join(f"- `{f}`" for f in files)),
                "delta_version": version,
                "table_uri": MetadataValue.path(lake.table_uri("bronze", source.name)),
            }
        )

    return bronze


bronze_assets = [_bronze_asset(source) for source in SOURCES.values()]


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


def _curated_asset(
    *,
    key: AssetKey,
    source: Source,
    description: str,
    transform: Callable[[pl.DataFrame, str], pl.DataFrame],
    partition_column: str,
) -> AssetsDefinition:
    """A curated asset with the same partitions as its bronze source."""

    @asset(
        key=key,
        partitions_def=source.partitions_def,
        deps=[source.key],
        description=description,
        group_name="curated",
        kinds={"delta", "polars"},
        metadata={"layer": "curated", "partition_expr": partition_column},
    )
    def curated(context: AssetExecutionContext, lake: LakeResource) -> MaterializeResult:
        partition_key = context.partition_key
        rows, quarantined, rows_in = split_partition(lake, source, partition_key)
        published = transform(rows, partition_key)
        table = key.path[-1]
        version = lake.overwrite_partition(
            "curated", table, published, {partition_column: partition_key}
        )
        lake.overwrite_partition("quarantine", table, quarantined, {"partition_key": partition_key})
        context.log.info(
            f"{table} {partition_key}: {rows_in} rows in, {rows.height} curated, "
            f"{quarantined.height} quarantined"
        )
        return MaterializeResult(
            metadata={
                "dagster/row_count": published.height,
                "dagster/column_schema": column_schema(published),
                **reconciliation_metadata(rows_in, rows.height, quarantined),
                "preview": MetadataValue.md(markdown_table(published, max_rows=10)),
                "delta_version": version,
                "table_uri": MetadataValue.path(lake.table_uri("curated", table)),
            }
        )

    return curated


claims_by_district = _curated_asset(
    key=keys.CLAIMS_BY_DISTRICT,
    source=SOURCES["claims"],
    description="Exposure (policy-years), claim counts and policy counts by district and month.",
    transform=lambda rows, month: contracts.aggregate_claims(rows, month),
    partition_column="month",
)

loan_book = _curated_asset(
    key=keys.LOAN_BOOK,
    source=SOURCES["loan_book"],
    description="Validated loan book (EAD, PD, LGD, rate, segment) per valuation date.",
    transform=lambda rows, _: rows.select(
        "valuation_date", "loan_id", "ead", "pd", "lgd", "rate", "segment"
    ),
    partition_column="valuation_date",
)

loan_scenarios = _curated_asset(
    key=keys.LOAN_SCENARIOS,
    source=SOURCES["loan_scenarios"],
    description="Validated macro scenarios per valuation date.",
    transform=lambda rows, _: rows.select(
        "valuation_date", "scenario", "pd_multiplier", "asset_correlation"
    ),
    partition_column="valuation_date",
)

FX_SPREAD_COLUMNS = ("symbol", "date", "ts", "bid", "ask", "spread")


def quarantined_symbol(quarantined: pl.DataFrame) -> pl.Series:
    """Normalised symbol of each quarantined tick (null when not normalisable)."""
    raw = quarantined["record"].str.json_path_match("$.symbol")
    return contracts.normalise_symbols(raw)


@asset(
    key=keys.FX_SPREADS,
    partitions_def=symbol_date_partitions,
    deps=[
        AssetDep(
            keys.BRONZE_FX_TICKS,
            partition_mapping=MultiToSingleDimensionPartitionMapping(
                partition_dimension_name="date"
            ),
        )
    ],
    description=(
        "Bid/ask ticks and spread per symbol and UTC day. Rows breaking the tick contract "
        "(crossed quotes, bad symbols, unparseable values) go to quarantine/fx_spreads, "
        "keyed by date."
    ),
    group_name="curated",
    kinds={"delta", "polars"},
    metadata={"layer": "curated", "partition_expr": {"date": "date", "symbol": "symbol"}},
    backfill_policy=BackfillPolicy.single_run(),
)
def fx_spreads(context: AssetExecutionContext, lake: LakeResource) -> MaterializeResult:
    """Curate every requested (symbol, date) partition, reading each day's ticks once."""
    by_date: dict[str, list[str]] = {}
    for key in context.partition_keys:
        symbol, date = split_symbol_date(key)
        if contracts.try_normalise_symbol(symbol) != symbol:
            # dynamic partitions can be added by hand or by API: a key such as
            # ``..`` or ``eur/usd`` must never become a folder or a predicate
            raise Failure(
                f"fx_spreads partition {key}: symbol {symbol!r} is not a normalised "
                "partition key ([A-Z0-9]{3,12})"
            )
        by_date.setdefault(date, []).append(symbol)
    totals = Counter()
    for date, symbols in sorted(by_date.items()):
        rows, quarantined, rows_in = split_partition(lake, SOURCES["fx_ticks"], date)
        lake.overwrite_partition("quarantine", "fx_spreads", quarantined, {"partition_key": date})
        q_symbols = quarantined_symbol(quarantined)
        # every requested symbol of the day in one atomic commit
        published = (
            rows.filter(pl.col("symbol").is_in(symbols))
            .select(FX_SPREAD_COLUMNS)
            .sort("symbol", "ts")
        )
        lake.overwrite_partitions(
            "curated",
            "fx_spreads",
            published,
            [{"symbol": symbol, "date": date} for symbol in symbols],
        )
        for symbol in symbols:
            n = published.filter(pl.col("symbol") == symbol).height
            totals["rows_curated"] += n
            totals["rows_quarantined_for_symbol"] += int((q_symbols == symbol).sum())
            context.log.info(f"fx_spreads {symbol} {date}: {n} ticks")
        totals["rows_in_days"] += rows_in
        totals["rows_quarantined_days"] += quarantined.height
    metadata = {
        "dagster/row_count": totals["rows_curated"],
        "partitions_written": len(context.partition_keys),
        "rows_curated": totals["rows_curated"],
        "rows_quarantined_for_symbol": totals["rows_quarantined_for_symbol"],
        "rows_in_days_all_symbols": totals["rows_in_days"],
        "rows_quarantined_days_all_symbols": totals["rows_quarantined_days"],
        "table_uri": MetadataValue.path(lake.table_uri("curated", "fx_spreads")),
    }
    if len(context.partition_keys) == 1:
        metadata["preview"] = MetadataValue.md(markdown_table(published, max_rows=10))
    return MaterializeResult(metadata=metadata)


curated_assets = [claims_by_district, fx_spreads, loan_book, loan_scenarios]
