"""Data-contract checks on bronze and curated assets.

Each check re-reads what was *stored* for the partition and applies the same
rules as the ingestion code (:mod:`pipeline.domain.contracts`), so a check can
catch a bug in the writer, not only in the delivery. Curated checks are
blocking: a partition that breaks its contract or fails to reconcile stops every
downstream model in the same run, and the model assets' own guards hold the line
in later runs. Curated and quarantine rows are read through the lake's commit
point, so a check sees one committed outcome of a partition, never half of one.

Schema drift (columns the contract does not declare) is a **warning**, not a
failure: bronze keeps such columns as delivered and curated never reads them, so
the models are unaffected, while the data owner learns which columns appeared.
A missing declared column fails the blocking schema check.
"""

import datetime as dt
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import polars as pl
from dagster import (
    AssetCheckExecutionContext,
    AssetChecksDefinition,
    AssetCheckSeverity,
    AssetKey,
    MetadataValue,
    PartitionsDefinition,
    asset_check,
)

from pipeline import keys
from pipeline.check_outcomes import CheckEvent, Verdict, check_outcomes
from pipeline.domain import contracts
from pipeline.metadata import counts_table
from pipeline.partitions import split_symbol_date, symbol_date_partitions
from pipeline.resources.lake import LakeResource
from pipeline.stores.sources import (
    BRONZE_PARTITION_COLUMN,
    SOURCES,
    Source,
    count_rows,
    quarantined_symbol,
    scan_bronze,
    undeclared_in_bronze,
)

MAX_INGEST_LAG = dt.timedelta(hours=24)


def _judge(
    context: AssetCheckExecutionContext,
    evaluate: Callable[[str], Verdict],
    severity: AssetCheckSeverity = AssetCheckSeverity.ERROR,
) -> Iterator[CheckEvent]:
    """Evaluate every partition of the run (one, or a range in a single-run backfill)."""
    verdicts = {key: evaluate(key) for key in context.partition_keys}
    yield from check_outcomes(context, verdicts, severity=severity)


BronzeVerdict = Callable[[pl.LazyFrame, Source, str], Verdict]
"""Judges one stored bronze partition, read lazily (it may hold tens of millions of rows):
``(stored rows, source, partition key) -> verdict``."""


def _schema_verdict(stored: pl.LazyFrame, source: Source, partition_key: str) -> Verdict:
    required = source.contract(partition_key).required_columns
    columns = stored.collect_schema().names()
    missing = [c for c in required if c not in columns]
    rows = count_rows(stored)
    if rows == 0:
        return Verdict(False, "no rows stored", {"rows": 0})
    if missing:
        return Verdict(False, f"missing columns {missing}", {"missing": str(missing)})
    return Verdict(True, f"{rows} rows, all columns", {"rows": rows})


def _ingest_lag_verdict(stored: pl.LazyFrame, source: Source, partition_key: str) -> Verdict:
    if count_rows(stored) == 0:
        return Verdict(False, "no rows stored", {})
    lag = stored.select((pl.col("_ingested_at") - pl.col("_delivered_at")).max()).collect().item()
    hours = lag.total_seconds() / 3600
    return Verdict(
        lag <= MAX_INGEST_LAG,
        f"max ingest lag {hours:.2f} h (bound 24 h)",
        {"max_ingest_lag_hours": round(hours, 3)},
    )


def _drift_verdict(stored: pl.LazyFrame, source: Source, partition_key: str) -> Verdict:
    extra = undeclared_in_bronze(stored, source, partition_key) if count_rows(stored) else []
    if not extra:
        return Verdict(True, "every delivered column is declared", {"undeclared": ""})
    files = (
        stored.filter(pl.any_horizontal(pl.col(extra).is_not_null()))
        .select(pl.col("_source_file").unique())
        .collect()
    )
    named = ", ".join(sorted(files["_source_file"].to_list()))
    return Verdict(
        False,
        f"undeclared column(s) {', '.join(extra)} in {named}; kept in bronze",
        {"undeclared": ", ".join(extra)},
    )


def _bronze_check(
    source: Source,
    name: str,
    verdict: BronzeVerdict,
    *,
    description: str,
    blocking: bool = False,
    severity: AssetCheckSeverity = AssetCheckSeverity.ERROR,
) -> AssetChecksDefinition:
    """One check of a bronze source: ``verdict`` on each stored partition of the run."""

    @asset_check(
        asset=source.key,
        name=name,
        partitions_def=source.partitions_def,
        blocking=blocking,
        description=description,
    )
    def bronze_check(
        context: AssetCheckExecutionContext, lake: LakeResource
    ) -> Iterator[CheckEvent]:
        def evaluate(partition_key: str) -> Verdict:
            return verdict(scan_bronze(lake, source, partition_key), source, partition_key)

        yield from _judge(context, evaluate, severity=severity)

    return bronze_check


def _bronze_checks(source: Source) -> list[AssetChecksDefinition]:
    return [
        _bronze_check(
            source,
            keys.CHECK_FILE_SCHEMA,
            _schema_verdict,
            blocking=True,
            description="The stored partition has rows and every column the contract requires.",
        ),
        _bronze_check(
            source,
            keys.CHECK_INGEST_LAG,
            _ingest_lag_verdict,
            severity=AssetCheckSeverity.WARN,
            description="Files were ingested within 24 h of their delivery (file time).",
        ),
        _bronze_check(
            source,
            keys.CHECK_NO_UNDECLARED_COLUMNS,
            _drift_verdict,
            severity=AssetCheckSeverity.WARN,
            description=(
                "Warns when a delivery carries columns the contract does not declare "
                "(kept in bronze as delivered, never curated)."
            ),
        ),
    ]


@dataclass(frozen=True)
class CuratedSpec:
    """How to read one curated partition and reconcile it with bronze."""

    key: AssetKey
    source: Source
    partitions_def: PartitionsDefinition
    contract: Callable[[str], contracts.Contract]
    read: Callable[[LakeResource, str], pl.DataFrame]
    delivered_rows: Callable[[LakeResource, str], int]
    curated_rows: Callable[[pl.DataFrame], int]
    quarantined_rows: Callable[[LakeResource, str], int]


def _quarantine_count(table: str) -> Callable[[LakeResource, str], int]:
    return lambda lake, pk: lake.count("quarantine", table, {"partition_key": pk})


def _bronze_count(source: Source) -> Callable[[LakeResource, str], int]:
    return lambda lake, pk: lake.count("bronze", source.name, {BRONZE_PARTITION_COLUMN: pk})


def _fx_delivered(lake: LakeResource, partition_key: str) -> int:
    symbol, date = split_symbol_date(partition_key)
    raw = lake.read("bronze", "fx_ticks", {BRONZE_PARTITION_COLUMN: date}, columns=["symbol"])
    if raw.height == 0:
        return 0
    normalised = contracts.normalise_symbols(raw["symbol"])
    return int((normalised == symbol).sum())


def _fx_quarantined(lake: LakeResource, partition_key: str) -> int:
    symbol, date = split_symbol_date(partition_key)
    rows = lake.read("quarantine", "fx_spreads", {"partition_key": date})
    return 0 if rows.height == 0 else int((quarantined_symbol(rows) == symbol).sum())


def _fx_read(lake: LakeResource, partition_key: str) -> pl.DataFrame:
    symbol, date = split_symbol_date(partition_key)
    return lake.read("curated", "fx_spreads", {"symbol": symbol, "date": date})


CURATED_SPECS = (
    CuratedSpec(
        keys.CLAIMS_BY_DISTRICT,
        SOURCES["claims"],
        SOURCES["claims"].partitions_def,
        contracts.claims_by_district_contract,
        lambda lake, pk: lake.read("curated", "claims_by_district", {"month": pk}),
        _bronze_count(SOURCES["claims"]),
        lambda frame: int(frame["n_policies"].sum()) if frame.height else 0,
        _quarantine_count("claims_by_district"),
    ),
    CuratedSpec(
        keys.FX_SPREADS,
        SOURCES["fx_ticks"],
        symbol_date_partitions,
        lambda pk: contracts.fx_ticks_contract(split_symbol_date(pk)[1]),
        _fx_read,
        _fx_delivered,
        lambda frame: frame.height,
        _fx_quarantined,
    ),
    CuratedSpec(
        keys.FX_INCIDENTS,
        SOURCES["fx_incidents"],
        SOURCES["fx_incidents"].partitions_def,
        contracts.fx_incidents_contract,
        lambda lake, pk: lake.read("curated", "fx_incidents", {"date": pk}),
        _bronze_count(SOURCES["fx_incidents"]),
        lambda frame: frame.height,
        _quarantine_count("fx_incidents"),
    ),
    CuratedSpec(
        keys.LOAN_BOOK,
        SOURCES["loan_book"],
        SOURCES["loan_book"].partitions_def,
        contracts.loan_book_contract,
        lambda lake, pk: lake.read("curated", "loan_book", {"valuation_date": pk}),
        _bronze_count(SOURCES["loan_book"]),
        lambda frame: frame.height,
        _quarantine_count("loan_book"),
    ),
    CuratedSpec(
        keys.LOAN_SCENARIOS,
        SOURCES["loan_scenarios"],
        SOURCES["loan_scenarios"].partitions_def,
        contracts.loan_scenarios_contract,
        lambda lake, pk: lake.read("curated", "loan_scenarios", {"valuation_date": pk}),
        _bronze_count(SOURCES["loan_scenarios"]),
        lambda frame: frame.height,
        _quarantine_count("loan_scenarios"),
    ),
)


def _curated_checks(spec: CuratedSpec) -> list[AssetChecksDefinition]:
    @asset_check(
        asset=spec.key,
        name=keys.CHECK_CURATED_CONTRACT,
        partitions_def=spec.partitions_def,
        blocking=True,
        description=(
            "Stored rows satisfy the contract: types, ranges (exposure ≥ 0, counts ≥ 0, "
            "bid ≤ ask, PD and LGD in [0, 1]), no NaN/inf, unique keys."
        ),
    )
    def contract_check(
        context: AssetCheckExecutionContext, lake: LakeResource
    ) -> Iterator[CheckEvent]:
        def evaluate(partition_key: str) -> Verdict:
            stored = spec.read(lake, partition_key)
            if stored.height == 0:
                return Verdict(False, "no curated rows stored", {"rows": 0})
            violations = contracts.rule_violations(stored, spec.contract(partition_key))
            return Verdict(
                not violations,
                "no violations" if not violations else f"violations {violations}",
                {"rows": stored.height, "violations": MetadataValue.md(counts_table(violations))},
            )

        yield from _judge(context, evaluate)

    @asset_check(
        asset=spec.key,
        name=keys.CHECK_RECONCILES,
        partitions_def=spec.partitions_def,
        blocking=True,
        description="Every delivered row is either curated or quarantined: nothing is lost.",
    )
    def reconciliation_check(
        context: AssetCheckExecutionContext, lake: LakeResource
    ) -> Iterator[CheckEvent]:
        def evaluate(partition_key: str) -> Verdict:
            rows_in = spec.delivered_rows(lake, partition_key)
            curated = spec.curated_rows(spec.read(lake, partition_key))
            quarantined = spec.quarantined_rows(lake, partition_key)
            return Verdict(
                rows_in == curated + quarantined and rows_in > 0,
                f"{rows_in} in = {curated} curated + {quarantined} quarantined",
                {"rows_in": rows_in, "rows_curated": curated, "rows_quarantined": quarantined},
            )

        yield from _judge(context, evaluate)

    return [contract_check, reconciliation_check]


contract_checks = [
    *[c for source in SOURCES.values() for c in _bronze_checks(source)],
    *[c for spec in CURATED_SPECS for c in _curated_checks(spec)],
]
