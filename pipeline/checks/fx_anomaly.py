"""Gates of the FX model lifecycle.

``challenger_beats_champion`` (blocking) judges the stored evaluation of the
symbol's latest challenger with :func:`pipeline.domain.fx_anomaly.promotion_failures`
and the recomputed tick contract; ``fx_champion_model`` applies the same rule
again before it moves an alias. ``champion_kpi_within_bounds`` shows a
regression found by the monitor in the UI.
"""

import polars as pl
from dagster import (
    AssetCheckExecutionContext,
    AssetCheckResult,
    AssetCheckSeverity,
    MetadataValue,
    asset_check,
)

from pipeline import keys
from pipeline.metadata import markdown_table
from pipeline.partitions import split_symbol_date, symbol_date_partitions, symbol_partitions
from pipeline.resources.lake import LakeResource
from pipeline.stores.fx import latest_evaluation, promotion_rule_failures


@asset_check(
    asset=keys.FX_CHALLENGER_MODEL,
    name=keys.CHECK_CHALLENGER_BEATS_CHAMPION,
    partitions_def=symbol_partitions,
    blocking=True,
    description=(
        "On the held-out labelled window the challenger's average precision is above the "
        "floor and at least the champion's minus the tolerance, and the input ticks satisfy "
        "their contract. A symbol's first model is judged by the floor alone."
    ),
)
def challenger_beats_champion(
    context: AssetCheckExecutionContext, lake: LakeResource
) -> AssetCheckResult:
    """Apply the promotion rule to every symbol of the run."""
    verdicts = {}
    for symbol in context.partition_keys:
        evaluation = latest_evaluation(lake, symbol)
        verdicts[symbol] = (evaluation, promotion_rule_failures(evaluation))
    failed = {s: f for s, (_, f) in verdicts.items() if f}
    rows = [
        {
            "symbol": s,
            "challenger_version": e["model_version"] if e else "",
            "challenger_ap": e["challenger_average_precision"] if e else float("nan"),
            "champion_version": e["champion_version"] if e else "",
            "champion_ap": e["champion_average_precision"] if e else float("nan"),
            "verdict": "; ".join(f) or "passed",
        }
        for s, (e, f) in verdicts.items()
    ]
    metadata: dict = {
        "symbols_checked": len(verdicts),
        "symbols_failed": len(failed),
        "verdicts": MetadataValue.md(
            markdown_table(pl.DataFrame(rows), max_rows=60) if rows else "_none_"
        ),
    }
    if len(verdicts) == 1:
        ((evaluation, _),) = verdicts.values()
        if evaluation:
            metadata["challenger_average_precision"] = evaluation["challenger_average_precision"]
            metadata["champion_average_precision"] = evaluation["champion_average_precision"]
            metadata["ap_floor"] = evaluation["ap_floor"]
            metadata["ap_tolerance"] = evaluation["ap_tolerance"]
    description = "; ".join(f"{s}: {'; '.join(f)}" for s, f in failed.items()) or "passed"
    return AssetCheckResult(passed=not failed, metadata=metadata, description=description[:500])


@asset_check(
    asset=keys.FX_MODEL_MONITOR,
    name=keys.CHECK_CHAMPION_KPI,
    partitions_def=symbol_date_partitions,
    description=(
        "The serving model's anomaly rate stays within the configured ratio of its rate at "
        "promotion, and the spread distribution has not drifted (PSI) from training."
    ),
)
def champion_kpi_within_bounds(
    context: AssetCheckExecutionContext, lake: LakeResource
) -> AssetCheckResult:
    """Show the monitor's verdict for every partition of the run."""
    rows, failed = [], []
    for key in context.partition_keys:
        symbol, date = split_symbol_date(key)
        stored = lake.read("gold", "fx_model_monitor", {"symbol": symbol, "date": date})
        if stored.height == 0:
            failed.append(f"{symbol} {date}: not monitored")
            continue
        record = stored.row(0, named=True)
        rows.append(record)
        failed += [f"{symbol} {date}: {f}" for f in record["failures"].split("\n") if f]
    metadata: dict = {"partitions_checked": len(context.partition_keys)}
    if len(rows) == 1:
        metadata.update(
            {
                k: rows[0][k]
                for k in (
                    "anomaly_rate",
                    "promotion_anomaly_rate",
                    "psi",
                    "ks",
                    "action",
                    "model_version",
                )
            }
        )
    elif rows:
        metadata["monitor"] = MetadataValue.md(
            markdown_table(
                pl.DataFrame(rows).select("symbol", "date", "anomaly_rate", "psi", "action")
            )
        )
    actions = sorted({r["action"] for r in rows if r["action"] != "none"})
    return AssetCheckResult(
        passed=not failed,
        severity=AssetCheckSeverity.ERROR,
        description=("; ".join(failed) or "within bounds")[:450]
        + (f" (actions: {', '.join(actions)})" if actions else ""),
        metadata=metadata,
    )


fx_checks = [challenger_beats_champion, champion_kpi_within_bounds]
