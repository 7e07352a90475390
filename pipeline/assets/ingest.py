"""Bronze and curated assets: landing files -> Delta, with quarantine.

The feeds, their contracts and the readers live in :mod:`pipeline.stores.sources`;
these definitions only read, call, write and attach metadata. Curated rows and their
quarantine are committed together (one batch, one commit record): a failed write
leaves the previous outcome of the partition visible, never half of the new one.
"""

from collections import Counter
from collections.abc import Callable

import polars as pl
from dagster import (
    AssetDep,
    AssetExecutionContext,
    AssetKey,
    AssetsDefinition,
    BackfillPolicy,
    Config,
    Failure,
    MaterializeResult,
    MetadataValue,
    MultiToSingleDimensionPartitionMapping,
    asset,
)
from pydantic import Field

from pipeline import keys
from pipeline.domain import contracts
from pipeline.metadata import attach_per_partition, column_schema, markdown_table
from pipeline.partitions import split_symbol_date, symbol_date_key, symbol_date_partitions
from pipeline.resources.lake import LakeResource
from pipeline.resources.landing import LandingResource
from pipeline.settings import get_settings
from pipeline.stores.curation import curate_partition
from pipeline.stores.sources import (
    BRONZE_PARTITION_COLUMN,
    LANDING_HASHES_METADATA,
    SOURCES,
    Source,
    curate_fx_day,
    publish_partition,
    quarantine_fx_day_without_symbols,
    read_delivery,
)


def _bronze_asset(source: Source) -> AssetsDefinition:
    @asset(
        key=source.key,
        partitions_def=source.partitions_def,
        description=source.description,
        group_name="ingest",
        kinds={"delta", "polars"},
        metadata={"layer": "bronze"},
    )
    def bronze(
        context: AssetExecutionContext, lake: LakeResource, landing: LandingResource
    ) -> MaterializeResult:
        partition_key = context.partition_key
        delivery = read_delivery(landing, source, partition_key)
        partition = {BRONZE_PARTITION_COLUMN: partition_key}
        version = lake.overwrite_partition("bronze", source.name, delivery.rows, partition)
        rows_stored = lake.count("bronze", source.name, partition)
        metadata = {}
        if delivery.undeclared:
            context.log.warning(
                f"{source.name} {partition_key}: columns {delivery.undeclared} are not in the "
                "contract; bronze keeps them as delivered"
            )
        if source.name == "fx_ticks":
            orphaned = quarantine_fx_day_without_symbols(lake, partition_key)
            if orphaned is not None:
                context.log.warning(
                    f"fx_ticks {partition_key}: no tick has a valid symbol; all {orphaned} "
                    "rows quarantined in quarantine/fx_spreads"
                )
                metadata["rows_quarantined_without_symbol"] = orphaned
        files = sorted(delivery.sha256)
        return MaterializeResult(
            metadata={
                "dagster/row_count": rows_stored,
                "dagster/column_schema": column_schema(delivery.rows),
                "files": MetadataValue.md("\n".join(f"- `{f}`" for f in files)),
                LANDING_HASHES_METADATA: MetadataValue.text(delivery.hashes_json),
                "undeclared_columns": MetadataValue.text(", ".join(delivery.undeclared)),
                "delta_version": version,
                "table_uri": MetadataValue.path(lake.table_uri("bronze", source.name)),
                **metadata,
            }
        )

    return bronze


bronze_assets = [_bronze_asset(source) for source in SOURCES.values()]


class CurationConfig(Config):
    """How a curated partition is split while its contract is applied."""

    bucket_rows: int | None = Field(
        default=None,
        ge=1,
        description=(
            "Rows per key bucket: a partition with more rows is spilled to local Parquet "
            "and curated bucket by bucket, which bounds memory. Unset: "
            "PIPELINE_CURATE_BUCKET_ROWS (1,000,000)."
        ),
    )


def _curated_asset(
    *,
    key: AssetKey,
    source: Source,
    description: str,
    per_bucket: Callable[[pl.DataFrame], pl.DataFrame],
    publish: Callable[[list[pl.DataFrame], str], pl.DataFrame],
    partition_column: str,
) -> AssetsDefinition:
    """A curated asset with the same partitions as its bronze source.

    The contract runs per key bucket (:mod:`pipeline.stores.curation`): ``per_bucket``
    reduces a bucket's curated rows and ``publish`` merges the parts into the rows
    published for the partition.
    """

    @asset(
        key=key,
        partitions_def=source.partitions_def,
        deps=[source.key],
        description=description,
        group_name="curated",
        kinds={"delta", "polars"},
        metadata={"layer": "curated"},
    )
    def curated(
        context: AssetExecutionContext, config: CurationConfig, lake: LakeResource
    ) -> MaterializeResult:
        partition_key = context.partition_key
        bucket_rows = config.bucket_rows or get_settings().curate_bucket_rows
        outcome = curate_partition(lake, source, partition_key, per_bucket, bucket_rows=bucket_rows)
        try:
            published = publish(outcome.parts, partition_key)
            table = key.path[-1]
            commit = publish_partition(
                lake,
                table,
                published,
                {partition_column: partition_key},
                outcome.quarantined,
                partition_key,
            )
        finally:
            outcome.cleanup()
        for leftover in commit.leftovers:
            context.log.warning(leftover)
        context.log.info(
            f"{table} {partition_key}: {outcome.rows_in} rows in, {outcome.rows_curated} "
            f"curated, {outcome.rows_quarantined} quarantined in {outcome.buckets} key "
            f"bucket(s) (batch {commit.batch_id})"
        )
        return MaterializeResult(
            metadata={
                "dagster/row_count": published.height,
                "dagster/column_schema": column_schema(published),
                **outcome.reconciliation_metadata(),
                "preview": MetadataValue.md(markdown_table(published, max_rows=10)),
                "delta_version": commit.versions[f"curated/{table}"],
                "batch_id": commit.batch_id,
                "table_uri": MetadataValue.path(lake.table_uri("curated", table)),
            }
        )

    return curated


def _rows_as_curated(*columns: str) -> dict:
    """``per_bucket`` and ``publish`` of a source whose curated rows are published as rows."""
    return {
        "per_bucket": lambda rows: rows.select(columns),
        "publish": lambda parts, _: pl.concat(parts),
    }


claims_by_district = _curated_asset(
    key=keys.CLAIMS_BY_DISTRICT,
    source=SOURCES["claims"],
    description="Exposure (policy-years), claim counts and policy counts by district and month.",
    per_bucket=contracts.claims_statistics,
    publish=contracts.merge_claims_statistics,
    partition_column="month",
)

FX_INCIDENT_COLUMNS = ("date", "symbol", "start", "end", "label", "reviewer", "note")

fx_incidents = _curated_asset(
    key=keys.FX_INCIDENTS,
    source=SOURCES["fx_incidents"],
    description=(
        "The FX desk's reviewed incident log per UTC day: `reviewed_window` rows (spans a "
        "reviewer went through) and `anomaly` rows (confirmed incidents). The promotion gate "
        "scores only ticks inside reviewed windows."
    ),
    per_bucket=lambda rows: rows.select(FX_INCIDENT_COLUMNS),
    publish=lambda parts, _: pl.concat(parts).sort("symbol", "start"),
    partition_column="date",
)

loan_book = _curated_asset(
    key=keys.LOAN_BOOK,
    source=SOURCES["loan_book"],
    description="Validated loan book (EAD, PD, LGD, rate, segment) per valuation date.",
    **_rows_as_curated("valuation_date", "loan_id", "ead", "pd", "lgd", "rate", "segment"),
    partition_column="valuation_date",
)

loan_scenarios = _curated_asset(
    key=keys.LOAN_SCENARIOS,
    source=SOURCES["loan_scenarios"],
    description="Validated macro scenarios per valuation date.",
    **_rows_as_curated("valuation_date", "scenario", "pd_multiplier", "asset_correlation"),
    partition_column="valuation_date",
)


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
    metadata={"layer": "curated"},
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
    totals, published, per_partition = Counter(), pl.DataFrame(), {}
    for date, symbols in sorted(by_date.items()):
        published, counts, commit = curate_fx_day(lake, date, symbols)
        totals.update(counts)
        per_partition.update(
            {
                symbol_date_key(s, date): {
                    "dagster/row_count": counts[f"rows_curated:{s}"],
                    "rows_curated": counts[f"rows_curated:{s}"],
                    "rows_quarantined_for_symbol": counts[f"rows_quarantined:{s}"],
                }
                for s in symbols
            }
        )
        for leftover in commit.leftovers:
            context.log.warning(leftover)
        context.log.info(f"fx_spreads {date}: {counts['rows_curated']} ticks of {symbols}")
    attach_per_partition(context, per_partition)
    metadata = {
        "partitions_written": len(context.partition_keys),
        "rows_curated_in_run": totals["rows_curated"],
        "rows_in_days_all_symbols": totals["rows_in_days"],
        "rows_quarantined_days_all_symbols": totals["rows_quarantined_days"],
        "table_uri": MetadataValue.path(lake.table_uri("curated", "fx_spreads")),
    }
    if len(context.partition_keys) == 1:
        metadata["preview"] = MetadataValue.md(markdown_table(published, max_rows=10))
    return MaterializeResult(metadata=metadata)


curated_assets = [claims_by_district, fx_spreads, fx_incidents, loan_book, loan_scenarios]
