"""Gates of the FX model lifecycle.

``challenger_beats_champion`` (blocking) judges the stored evaluation of the
symbol's latest challenger with :func:`pipeline.domain.fx_anomaly.promotion_failures`
and the recomputed tick contract; ``fx_champion_model`` applies the same rule
again before it moves an alias. ``champion_kpi_within_bounds`` shows a KPI
regression found by the monitor (the one reason it reverts the alias);
``model_features_within_drift_bounds`` (severity WARN, non-blocking) shows drift of
the model's features against its training sample, which warns and reverts nothing.
"""

import json
from collections.abc import Callable, Iterator, Sequence

from dagster import AssetCheckExecutionContext, AssetCheckSeverity, MetadataValue, asset_check

from pipeline import keys
from pipeline.check_outcomes import CheckEvent, Verdict, check_outcomes
from pipeline.partitions import split_symbol_date, symbol_date_partitions, symbol_partitions
from pipeline.resources.lake import LakeResource
from pipeline.stores.fx import latest_evaluation, promotion_rule_failures

MONITOR_METADATA = (
    "anomaly_rate",
    "promotion_anomaly_rate",
    "max_rate_ratio",
    "action",
    "model_version",
)
"""Monitor columns shown on each partition's KPI check."""

DRIFT_METADATA = ("psi", "ks", "max_psi", "max_ks", "model_version")
"""Monitor columns shown on each partition's drift check (plus each feature's measures)."""


@asset_check(
    asset=keys.FX_CHALLENGER_MODEL,
    name=keys.CHECK_CHALLENGER_BEATS_CHAMPION,
    partitions_def=symbol_partitions,
    blocking=True,
    description=(
        "On the held-out ticks inside reviewed windows of the incident log the challenger's "
        "average precision is above the floor and it is not worse than the champion beyond "
        "the burst-bootstrap interval of the AP difference; without a reviewed anomaly in the "
        "holdout, the label-free rule (flag rate within bounds of the champion's, rank "
        "agreement of scores). The input ticks satisfy their contract."
    ),
)
def challenger_beats_champion(
    context: AssetCheckExecutionContext, lake: LakeResource
) -> Iterator[CheckEvent]:
    """Apply the promotion rule to every symbol of the run."""
    verdicts = {}
    for symbol in context.partition_keys:
        evaluation = latest_evaluation(lake, symbol)
        failures = promotion_rule_failures(evaluation)
        metadata = (
            {
                "gate": evaluation["gate"],
                "challenger_version": evaluation["model_version"],
                "challenger_average_precision": evaluation["challenger_average_precision"],
                "champion_version": evaluation["champion_version"],
                "champion_average_precision": evaluation["champion_average_precision"],
                "ap_difference": evaluation["ap_difference"],
                "ap_difference_lower": evaluation["ap_difference_lower"],
                "ap_difference_upper": evaluation["ap_difference_upper"],
                "challenger_anomaly_rate": evaluation["challenger_anomaly_rate"],
                "champion_anomaly_rate": evaluation["champion_anomaly_rate"],
                "rank_agreement": evaluation["rank_agreement"],
                "ap_floor": evaluation["ap_floor"],
                "ap_tolerance": evaluation["ap_tolerance"],
            }
            if evaluation
            else {}
        )
        verdicts[symbol] = Verdict(not failures, "; ".join(failures) or "passed", metadata)
    yield from check_outcomes(context, verdicts)


@asset_check(
    asset=keys.FX_MODEL_MONITOR,
    name=keys.CHECK_CHAMPION_KPI,
    partitions_def=symbol_date_partitions,
    description=(
        "The serving model's anomaly (flag) rate stays within the configured ratio of its "
        "rate at promotion, and the precision of its flags on ticks inside reviewed windows "
        "of the incident log stays above its bound (when enough are flagged). A regression "
        "reverts `champion` to a `previous_champion` that has not failed itself."
    ),
)
def champion_kpi_within_bounds(
    context: AssetCheckExecutionContext, lake: LakeResource
) -> Iterator[CheckEvent]:
    """Show the monitor's KPI verdict for every partition of the run."""

    def judge(record: dict) -> Verdict:
        failures = [f for f in record["failures"].split("\n") if f]
        action = f" (action: {record['action']})" if record["action"] != "none" else ""
        return Verdict(
            not failures,
            ("; ".join(failures) or "within bounds") + action,
            {name: record[name] for name in MONITOR_METADATA},
        )

    yield from check_outcomes(context, monitor_verdicts(lake, context.partition_keys, judge))


@asset_check(
    asset=keys.FX_MODEL_MONITOR,
    name=keys.CHECK_FEATURE_DRIFT,
    partitions_def=symbol_date_partitions,
    blocking=False,
    description=(
        "Warning only: the PSI and KS statistic of each model feature on the day stay within "
        "their bounds against the model's training sample. Drift never reverts the model."
    ),
)
def model_features_within_drift_bounds(
    context: AssetCheckExecutionContext, lake: LakeResource
) -> Iterator[CheckEvent]:
    """Show the monitor's drift warnings for every partition of the run (severity WARN)."""

    def judge(record: dict) -> Verdict:
        warnings = [w for w in record["drift_warnings"].split("\n") if w]
        drift = json.loads(record["drift"])
        return Verdict(
            not warnings,
            f"{len(warnings)} drift warning(s): " + "; ".join(warnings)
            if warnings
            else f"{len(drift)} features within bounds",
            {
                **{name: record[name] for name in DRIFT_METADATA},
                "drift_by_feature": MetadataValue.json(drift),
            },
        )

    verdicts = monitor_verdicts(lake, context.partition_keys, judge)
    yield from check_outcomes(context, verdicts, severity=AssetCheckSeverity.WARN)


def monitor_verdicts(
    lake: LakeResource, partition_keys: Sequence[str], judge: Callable[[dict], Verdict]
) -> dict[str, Verdict]:
    """Partition key -> ``judge`` of its stored ``gold/fx_model_monitor`` row.

    A partition with no stored row fails as "not monitored", whichever check asks.
    """
    verdicts: dict[str, Verdict] = {}
    for key in partition_keys:
        symbol, date = split_symbol_date(key)
        stored = lake.read("gold", "fx_model_monitor", {"symbol": symbol, "date": date})
        verdicts[key] = (
            judge(stored.row(0, named=True)) if stored.height else Verdict(False, "not monitored")
        )
    return verdicts


fx_checks = [
    challenger_beats_champion,
    champion_kpi_within_bounds,
    model_features_within_drift_bounds,
]
