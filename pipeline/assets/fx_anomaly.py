"""Per-symbol FX spread anomaly models: challenger -> champion -> scores -> monitor.

Registry conventions (MLflow aliases on ``fx_spread_<symbol>``, or
``<catalog>.<schema>.fx_spread_<symbol>`` in Unity Catalog):

* ``challenger``: the latest trained version, not yet trusted;
* ``champion``: the version that scores production data;
* ``previous_champion``: the version ``champion`` replaced, kept for a revert.

The work is done by :mod:`pipeline.jobs.fx_training`, :mod:`pipeline.jobs.fx_promotion`
and :mod:`pipeline.jobs.fx_scoring`; the gate's stored facts are read through
:mod:`pipeline.stores.fx`.
"""

from collections.abc import Iterator

import polars as pl
from dagster import (
    AllPartitionMapping,
    AssetDep,
    AssetExecutionContext,
    AssetMaterialization,
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
from pipeline.audit import input_versions
from pipeline.gates import GateClosedError, check_record_failures
from pipeline.jobs import fx_databricks, fx_promotion, fx_scoring, fx_spark, fx_training
from pipeline.metadata import attach_per_partition, markdown_table, png_markdown
from pipeline.partitions import (
    split_symbol_date,
    symbol_date_key,
    symbol_date_partitions,
    symbol_partitions,
)
from pipeline.policies import domain_errors_are_final, gated_eager
from pipeline.resources.compute import ComputeResource
from pipeline.resources.lake import LakeResource
from pipeline.resources.tracking import TrackingResource
from pipeline.stores import fx as store
from pipeline.timing import Stopwatch

PER_SYMBOL = MultiToSingleDimensionPartitionMapping(partition_dimension_name="symbol")


class GridCandidate(Config):
    """One hyper-parameter candidate; an unset field keeps the challenger's own setting."""

    n_estimators: int | None = Field(default=None, description="trees per forest")
    max_samples: int | None = Field(default=None, description="rows drawn per tree; 0 = auto")
    contamination: float | None = Field(default=None, description="alarm budget")


class ChallengerConfig(Config):
    """Training window, forest (or grid of forests) and promotion bounds."""

    holdout_days: int = Field(default=3, description="latest days held out for the gate")
    contamination: float = Field(default=0.03, description="alarm budget of the forest")
    n_estimators: int = Field(default=100, description="trees per forest")
    random_state: int = Field(default=42, description="forest seed")
    ap_tolerance: float = Field(
        default=0.02, description="allowed AP shortfall vs champion beyond the bootstrap interval"
    )
    ap_floor: float = Field(
        default=0.3,
        description="minimum average precision on the reviewed holdout ticks (a random "
        "ranking scores the anomaly rate, about 0.05)",
    )
    max_samples: int = Field(
        default=0,
        description="rows drawn per tree; 0 = sklearn's auto (min(256, n)); tiny values give a "
        "weak model, which gate drills use",
    )
    bootstrap_resamples: int = Field(
        default=1_000, description="resamples of the paired bootstrap over anomaly bursts"
    )
    interval_level: float = Field(default=0.9, description="level of the AP-difference interval")
    label_free_rate_ratio: float = Field(
        default=3.0,
        description="label-free gate: flag rate within [r / ratio, r * ratio] of the champion's "
        "(or of the alarm budget for a first model)",
    )
    min_rank_agreement: float = Field(
        default=0.5, description="label-free gate: Spearman of scores with the champion"
    )
    grid: list[GridCandidate] = Field(
        default=[],
        description="candidates compared as nested MLflow runs; the best holdout AP becomes "
        "the challenger (label-free: the first). Empty = one candidate, the settings above",
    )


class MonitorConfig(Config):
    """When a champion counts as regressed (reverts), and when its inputs drifted (warns)."""

    max_rate_ratio: float = Field(
        default=3.0, description="KPI: anomaly rate / rate at promotion; beyond it, revert"
    )
    max_psi: float = Field(
        default=0.25, description="drift warning: PSI of any model feature vs training"
    )
    max_ks: float = Field(
        default=0.25, description="drift warning: KS statistic of any model feature vs training"
    )
    min_reviewed_precision: float = Field(
        default=0.3,
        description="KPI: precision of the day's flags on ticks inside reviewed windows of "
        "curated/fx_incidents (confirmed anomalies / flags); below it, revert",
    )
    min_reviewed_flags: int = Field(
        default=5,
        description="the precision KPI is judged only when at least this many reviewed ticks "
        "were flagged",
    )
    revert: bool = Field(default=True, description="move champion back on a KPI regression")


@asset(
    key=keys.FX_CHALLENGER_MODEL,
    partitions_def=symbol_partitions,
    deps=[
        AssetDep(keys.FX_SPREADS, partition_mapping=PER_SYMBOL),
        AssetDep(keys.FX_INCIDENTS, partition_mapping=AllPartitionMapping()),
    ],
    group_name="fx_models",
    kinds={"sklearn", "mlflow"},
    description=(
        "IsolationForest of the symbol's spreads, trained on all curated days but the "
        "held-out window, logged and registered in MLflow with alias `challenger`. Judged "
        "against the champion on the held-out ticks inside reviewed windows of "
        "`curated/fx_incidents` (AP difference with a burst-bootstrap interval), or by the "
        "label-free rule when no reviewed anomaly lies in the holdout."
    ),
    backfill_policy=BackfillPolicy.single_run(),
    pool="model_training",
)
def fx_challenger_model(
    context: AssetExecutionContext,
    config: ChallengerConfig,
    lake: LakeResource,
    tracking: TrackingResource,
    compute: ComputeResource,
) -> MaterializeResult:
    """Train one challenger per requested symbol, all in this run, on the compute backend."""
    params = fx_training.TrainingParams(**config.model_dump())
    evaluations, inputs = [], input_versions(lake, "curated/fx_spreads", "curated/fx_incidents")
    with domain_errors_are_final():
        if compute.backend == "spark":  # one applyInPandas group (task) per symbol
            evaluations = fx_spark.train_challengers(
                compute.spark_session(),
                context.partition_keys,
                lake=lake,
                params=params,
                tracking=tracking,
                dagster_run_id=context.run.run_id,
            )
        elif compute.backend == "databricks":  # one Databricks job run, from the wheel
            evaluations = fx_databricks.train_challengers(
                context, compute, lake=lake, params=params, tracking=tracking
            )
        else:
            fx_spark.require_local_or_spark(compute.backend, "fx_challenger_model")
        for symbol in context.partition_keys if compute.backend == "local" else ():
            evaluations.append(
                fx_training.train_challenger(
                    store.read_symbol_ticks(lake, symbol),
                    store.read_incidents(lake, symbol),
                    symbol=symbol,
                    params=params,
                    tracking=tracking,
                    dagster_run_id=context.run.run_id,
                )
            )
    fx_training.store_evaluations(lake, evaluations, inputs=inputs)
    attach_per_partition(context, {e["symbol"]: challenger_links(e) for e in evaluations})
    return MaterializeResult(metadata=challenger_metadata(evaluations))


def challenger_links(evaluation: dict) -> dict:
    """What one symbol's materialisation shows: version, gate basis, AP, difference, links."""
    return {
        "model_name": evaluation["model_name"],
        "model_version": evaluation["model_version"],
        "gate": evaluation["gate"],
        "average_precision": evaluation["challenger_average_precision"],
        "champion_average_precision": evaluation["champion_average_precision"],
        "ap_difference": MetadataValue.text(fx_training.difference_text(evaluation)),
        "reviewed_ticks": int(evaluation["reviewed_ticks"]),
        "reviewed_anomalies": int(evaluation["n_positive"]),
        "mlflow_run": MetadataValue.url(evaluation["mlflow_run_url"]),
        "registered_model": MetadataValue.url(evaluation["model_version_url"]),
    }


def challenger_metadata(evaluations: list[dict]) -> dict:
    """The run's evaluations of every symbol and where the time went."""
    table = pl.DataFrame(evaluations).select(
        "symbol",
        pl.col("model_version").alias("version"),
        "gate",
        pl.col("challenger_average_precision").alias("AP"),
        pl.col("champion_average_precision").alias("champion AP"),
        pl.Series(
            "AP difference [interval]", [fx_training.difference_text(e) for e in evaluations]
        ),
        pl.col("challenger_precision").alias("precision"),
        pl.col("challenger_recall").alias("recall"),
        pl.col("rank_agreement").alias("rank agreement"),
    )
    watch = Stopwatch()
    for e in evaluations:
        watch.add(e["seconds"])
    metadata: dict = {
        "models_trained": len(evaluations),
        "evaluations": MetadataValue.md(markdown_table(table, max_rows=60)),
        # summed over the symbols of the run: where the time went (fit, MLflow, lake)
        "seconds": MetadataValue.json(watch.seconds()),
    }
    return metadata


@asset(
    key=keys.FX_CHAMPION_MODEL,
    partitions_def=symbol_partitions,
    deps=[keys.FX_CHALLENGER_MODEL],
    group_name="fx_models",
    kinds={"mlflow"},
    description=(
        "Moves alias `champion` to the challenger's version (the former one becomes "
        "`previous_champion`) only when `challenger_beats_champion` passed for the symbol. "
        "A refused symbol keeps its champion and fails the step after the others moved."
    ),
    automation_condition=gated_eager(),
    # the challenger's policy: a backfill of both is one run, not one run per symbol
    backfill_policy=BackfillPolicy.single_run(),
)
def fx_champion_model(
    context: AssetExecutionContext, lake: LakeResource, tracking: TrackingResource
) -> Iterator[MaterializeResult | AssetMaterialization]:
    """Decide every requested symbol, then promote those that passed; fail the others visibly.

    A refused symbol keeps its champion and does not stop the others. When a symbol is
    refused (or MLflow failed while moving its aliases, which are then rolled back), the
    promoted symbols are recorded as materialised, each with its own metadata, and the step
    fails naming the others: those partitions show as failed in Dagster, never as promoted.
    """
    refused = {}
    for symbol in context.partition_keys:
        failures = fx_promotion.stored_gate_failures(symbol, lake=lake, tracking=tracking)
        failures += check_record_failures(
            context.instance,
            keys.FX_CHALLENGER_MODEL,
            [keys.CHECK_CHALLENGER_BEATS_CHAMPION],
            symbol,
            per_partition_rule=True,  # the stored evaluation above is judged per symbol
        )
        if failures:
            refused[symbol] = failures
    outcomes = fx_promotion.promote_passing(
        list(context.partition_keys),
        refused,
        lake=lake,
        tracking=tracking,
        dagster_run_id=context.run.run_id,
    )
    table = pl.DataFrame(
        [(o.symbol, o.from_version, o.to_version, o.action, o.reason) for o in outcomes],
        schema=["symbol", "champion before", "champion after", "action", "reason"],
        orient="row",
    )
    metadata: dict = {"promotions": MetadataValue.md(markdown_table(table, max_rows=60))}
    facts = {o.symbol: champion_facts(o, tracking) for o in outcomes if o.ok}
    failed = [o for o in outcomes if not o.ok]
    if not failed:
        attach_per_partition(context, facts)
        yield MaterializeResult(metadata=metadata)
        return
    for symbol, shown in facts.items():  # the step fails below: record what did move
        yield AssetMaterialization(
            keys.FX_CHAMPION_MODEL, partition=symbol, metadata={**metadata, **shown}
        )
    raise promotion_failure(failed, promoted=list(facts), tracking=tracking)


def champion_facts(outcome: fx_promotion.Promotion, tracking: TrackingResource) -> dict:
    """One promoted (or unchanged) symbol's champion version, action and MLflow link."""
    name = tracking.model_name(outcome.symbol)
    return {
        "champion_version": outcome.to_version,
        "action": outcome.action,
        "registered_model": MetadataValue.url(tracking.model_version_url(name, outcome.to_version)),
    }


def promotion_failure(
    failed: list[fx_promotion.Promotion], *, promoted: list[str], tracking: TrackingResource
) -> Failure:
    """The step's error: every refused or failed symbol, with why, and what was promoted.

    Refusals alone are final (a retry would refuse again); an MLflow error is retried.
    """
    parts = [
        (
            f"refusing to promote {tracking.model_name(o.symbol)} for symbol {o.symbol}: "
            if o.action == "refused"
            else f"could not promote {tracking.model_name(o.symbol)} for symbol {o.symbol} "
            "(its aliases were left as they were): "
        )
        + o.reason
        for o in failed
    ]
    errors = any(o.action == "error" for o in failed)
    description = "; ".join(parts) + (
        f" -- promoted or already champion: {', '.join(promoted)}" if promoted else ""
    )
    if errors:
        return Failure(description=description, allow_retries=True)
    return GateClosedError(description=description, allow_retries=False)


@asset(
    key=keys.FX_ANOMALY_SCORES,
    partitions_def=symbol_date_partitions,
    deps=[keys.FX_SPREADS, AssetDep(keys.FX_CHAMPION_MODEL, partition_mapping=PER_SYMBOL)],
    group_name="fx_models",
    kinds={"delta", "sklearn"},
    description="Ticks scored by the symbol's `champion` model (loaded once per symbol per run).",
    backfill_policy=BackfillPolicy.single_run(),
)
def fx_anomaly_scores(
    context: AssetExecutionContext,
    lake: LakeResource,
    tracking: TrackingResource,
    compute: ComputeResource,
) -> MaterializeResult:
    """Score every requested (symbol, date) with the champion of its symbol.

    Each symbol's champion is resolved and loaded once, and all its requested days are read,
    scored and written together (one atomic commit per symbol).
    """
    by_symbol: dict[str, list[str]] = {}
    for key in context.partition_keys:
        symbol, date = split_symbol_date(key)
        by_symbol.setdefault(symbol, []).append(date)
    watch, champions, scored = Stopwatch(), {}, {}
    io = {"lake": lake, "tracking": tracking, "dagster_run_id": context.run.run_id, "watch": watch}
    with domain_errors_are_final():
        if compute.backend == "spark":  # mapInPandas over the ticks repartitioned by symbol
            champions, scored = fx_spark.score_symbols(compute.spark_session(), by_symbol, **io)
        elif compute.backend == "databricks":  # one Databricks job run, from the wheel
            champions, scored = fx_databricks.score_symbols(context, compute, by_symbol, **io)
        else:
            fx_spark.require_local_or_spark(compute.backend, "fx_anomaly_scores")
        for symbol, dates in by_symbol.items() if compute.backend == "local" else ():
            champions[symbol], scored[symbol] = fx_scoring.score_symbol_days(symbol, dates, **io)
    attach_per_partition(
        context,
        {
            symbol_date_key(symbol, date): score_facts(
                scored[symbol], symbol, date, version, plot=len(context.partition_keys) <= MAX_PLOTS
            )
            for symbol, version in champions.items()
            for date in by_symbol[symbol]
        },
    )
    rows = sum(out.height for out in scored.values())
    return MaterializeResult(
        metadata={
            "rows_in_run": rows,
            "champion_versions": MetadataValue.json(champions),
            "seconds": MetadataValue.json(watch.seconds()),
        }
    )


MAX_PLOTS = 10
"""Runs of up to this many partitions draw each one's plot (about 0.3 s and 120 kB each)."""


def score_facts(scored: pl.DataFrame, symbol: str, date: str, version: str, *, plot: bool) -> dict:
    """One (symbol, date) partition's rows, flag rate, model version and plot."""
    from pipeline.domain import plots

    day = scored.filter(pl.col("date") == date)
    flagged = int(day["is_anomaly"].sum())
    return {
        "dagster/row_count": day.height,
        "flagged": flagged,
        "anomaly_rate": flagged / day.height if day.height else 0.0,
        "champion_version": version,
        "spreads": png_markdown(
            plots.score_plot_png(day, title=f"{symbol} {date}"), "scored spreads"
        )
        if plot
        else MetadataValue.md(
            f"_not drawn: runs of more than {MAX_PLOTS} partitions skip the plots; "
            "materialise this partition alone to draw it_"
        ),
    }


@asset(
    key=keys.FX_MODEL_MONITOR,
    partitions_def=symbol_date_partitions,
    deps=[keys.FX_ANOMALY_SCORES],
    group_name="fx_models",
    kinds={"delta", "mlflow"},
    description=(
        "Champion KPIs (anomaly rate against the rate at promotion; precision of the flags "
        "on ticks the desk reviewed, when there are any) and drift (PSI, KS of "
        "each model feature against training). A KPI regression reverts `champion` to a "
        "sound `previous_champion` and records the event; drift only warns."
    ),
    backfill_policy=BackfillPolicy.single_run(),
)
def fx_model_monitor(
    context: AssetExecutionContext,
    config: MonitorConfig,
    lake: LakeResource,
    tracking: TrackingResource,
) -> MaterializeResult:
    """Measure the serving model on each requested day; revert it when it regressed."""
    with domain_errors_are_final():
        rows = [
            fx_scoring.monitor_day(
                *split_symbol_date(key),
                max_rate_ratio=config.max_rate_ratio,
                max_psi=config.max_psi,
                max_ks=config.max_ks,
                revert=config.revert,
                min_reviewed_precision=config.min_reviewed_precision,
                min_reviewed_flags=config.min_reviewed_flags,
                lake=lake,
                tracking=tracking,
                dagster_run_id=context.run.run_id,
                log=context.log,
            )
            for key in sorted(context.partition_keys, key=lambda k: split_symbol_date(k)[::-1])
        ]
    table = pl.DataFrame(rows)
    metadata: dict = {
        "partitions_monitored": table.height,
        "regressions": table.filter(pl.col("failures") != "").height,
        "drift_warnings": table.filter(pl.col("drift_warnings") != "").height,
        "monitor": MetadataValue.md(
            markdown_table(
                table.select(
                    "symbol", "date", "model_version", "anomaly_rate", "psi", "ks", "action"
                ),
                max_rows=40,
            )
        ),
    }
    attach_per_partition(
        context, {symbol_date_key(r["symbol"], r["date"]): monitor_facts(r) for r in rows}
    )
    return MaterializeResult(metadata=metadata)


def monitor_facts(row: dict) -> dict:
    """One (symbol, date) partition's KPI, drift and action."""
    facts = (
        "model_version",
        "anomaly_rate",
        "promotion_anomaly_rate",
        "reviewed_flags",
        "reviewed_precision",
        "psi",
        "ks",
        "action",
    )
    return {
        **{k: row[k] for k in facts},
        "regression": MetadataValue.md(
            "\n".join(f"- {f}" for f in row["failures"].split("\n") if f) or "_none_"
        ),
        "drift": MetadataValue.md(
            "\n".join(f"- {w}" for w in row["drift_warnings"].split("\n") if w) or "_none_"
        ),
    }


fx_assets = [fx_challenger_model, fx_champion_model, fx_anomaly_scores, fx_model_monitor]
