"""Score a symbol's days with its champion, and watch the champion afterwards.

:func:`score_symbol_days` reads, scores and writes all requested days of one symbol
with one model version (resolved once, loaded by version, never by a moving alias);
:func:`monitor_day` measures the serving model on one scored day and reverts the alias
when its KPI regressed (input drift is measured on the model's features and only
warns). Both are plain functions of the lake and tracking resources. Their parts,
:func:`champion_version`, :func:`score_days` and :func:`write_scores`, are what the
Databricks path (:mod:`pipeline.jobs.fx_databricks`) splits between driver and job.
"""

import json
import logging
from typing import Any

import polars as pl

from pipeline.audit import input_versions, with_audit
from pipeline.domain.errors import DomainError
from pipeline.jobs.fx_training import reference_features
from pipeline.resources.lake import LakeResource
from pipeline.resources.tracking import TrackingResource
from pipeline.stores import fx as store
from pipeline.timing import Stopwatch

SCORE_COLUMNS = (
    "symbol",
    "date",
    "ts",
    "bid",
    "ask",
    "spread",
    "rel_spread_bps",
    "anomaly_score",
    "is_anomaly",
)


class NoChampionError(DomainError):
    """A symbol has no ``champion`` model to score with."""


def score_symbol_days(
    symbol: str,
    dates: list[str],
    *,
    lake: LakeResource,
    tracking: TrackingResource,
    dagster_run_id: str,
    watch: Stopwatch | None = None,
) -> tuple[str, pl.DataFrame]:
    """Score the requested days of one symbol with its champion, in one atomic commit.

    Every row carries the audit columns (:func:`pipeline.audit.with_audit`), with the
    MLflow run that trained the champion.

    Returns
    -------
    tuple of (model version, scored rows)

    Raises
    ------
    NoChampionError
        When the symbol has no champion.
    """
    watch = watch or Stopwatch()
    with watch("load_model"):
        version, run_id = champion_version(tracking, symbol)
        model = tracking.load_sklearn(tracking.model_name(symbol), version=version)
    with watch("read"):
        inputs = input_versions(lake, "curated/fx_spreads")
        ticks = store.scoring_ticks(lake, symbol, dates)
    scored = score_days(model, ticks, dates, watch=watch)  # timed as features, score
    with watch("write"):
        out = write_scores(
            lake,
            symbol,
            dates,
            scored,
            version=version,
            mlflow_run_id=run_id,
            inputs=inputs,
            dagster_run_id=dagster_run_id,
        )
    return version, out


def champion_version(tracking: TrackingResource, symbol: str) -> tuple[str, str]:
    """The version behind the symbol's ``champion`` alias now, and its MLflow run id.

    Callers load the model by this version, never by the alias again (it may move).

    Raises
    ------
    NoChampionError
        When the symbol has no champion.
    """
    name = tracking.model_name(symbol)
    champion = tracking.alias_version(name, store.CHAMPION)
    if champion is None:
        raise NoChampionError(f"fx symbol {symbol}: model {name} has no `champion`; promote one")
    return str(champion.version), champion.run_id


def score_days(
    model: Any, ticks: pl.DataFrame, dates: list[str], *, watch: Stopwatch | None = None
) -> pl.DataFrame:
    """The :data:`SCORE_COLUMNS` of the requested days, scored by ``model``.

    ``ticks`` are :func:`pipeline.stores.fx.scoring_ticks` (with the warm-up tail), so the
    features equal those of training. A Databricks job calls this unchanged.
    """
    from pipeline.domain import fx_anomaly

    watch = watch or Stopwatch()
    with watch("features"):
        features = day_features(ticks, dates)
    with watch("score"):
        scored = fx_anomaly.score_spreads(model, features)
    return scored.select(*SCORE_COLUMNS)


def write_scores(
    lake: LakeResource,
    symbol: str,
    dates: list[str],
    scored: pl.DataFrame,
    *,
    version: str,
    mlflow_run_id: str,
    inputs: dict[str, int | None],
    dagster_run_id: str,
) -> pl.DataFrame:
    """Overwrite the symbol's requested days in ``gold/fx_anomaly_scores`` in one commit.

    Returns the rows written: ``scored`` with ``model_version`` and the audit columns.
    """
    out = with_audit(
        scored.select(*SCORE_COLUMNS, pl.lit(version).alias("model_version")),
        dagster_run_id=dagster_run_id,
        inputs=inputs,
        mlflow_run_id=mlflow_run_id,
    )
    lake.overwrite_partitions(
        "gold", "fx_anomaly_scores", out, [{"symbol": symbol, "date": d} for d in dates]
    )
    return out


def day_features(ticks: pl.DataFrame, dates: list[str]) -> pl.DataFrame:
    """Model features of the requested days, from :func:`store.scoring_ticks` (warm-up tail)."""
    from pipeline.domain import fx_anomaly

    features = fx_anomaly.spread_features(ticks.select(fx_anomaly.TICK_COLUMNS))
    return features.with_columns(ticks["date"]).filter(pl.col("date").is_in(dates))


def monitor_day(
    symbol: str,
    date: str,
    *,
    max_rate_ratio: float,
    max_psi: float,
    max_ks: float,
    revert: bool,
    min_reviewed_precision: float = 0.3,
    min_reviewed_flags: int = 5,
    lake: LakeResource,
    tracking: TrackingResource,
    dagster_run_id: str,
    log: Any = None,
) -> dict:
    """KPI and feature drift of one scored (symbol, date), the revert if needed, the row.

    Two KPIs: the flag rate against the rate at promotion, and, when reviewed windows of
    ``curated/fx_incidents`` cover scored ticks of the day and at least
    ``min_reviewed_flags`` of them are flagged, the precision of those flags (at least
    ``min_reviewed_precision``). ``failures`` lists KPI regressions (they revert the alias);
    ``drift_warnings`` lists
    features whose PSI or KS against the model's training sample is past its bound (they
    only warn). ``psi`` and ``ks`` are the largest over the features; ``drift`` has each.
    """
    from pipeline.domain import fx_anomaly

    inputs = input_versions(
        lake, "gold/fx_anomaly_scores", "curated/fx_spreads", "curated/fx_incidents"
    )
    scores = lake.read("gold", "fx_anomaly_scores", {"symbol": symbol, "date": date})
    if scores.height == 0:
        raise DomainError(f"fx_anomaly_scores {symbol} {date}: nothing scored to monitor")
    name = tracking.model_name(symbol)
    scored_version = scores["model_version"][0]
    version = tracking.client().get_model_version(name, scored_version)
    promotion_rate = float(version.tags.get("holdout_anomaly_rate", "nan"))
    rate = float(scores["is_anomaly"].mean())
    drift = fx_anomaly.feature_drift(
        reference_features(tracking, version.run_id),
        day_features(store.scoring_ticks(lake, symbol, [date]), [date]),
    )
    warnings = fx_anomaly.drift_warnings(drift, max_psi=max_psi, max_ks=max_ks)
    failures = fx_anomaly.kpi_failures(
        anomaly_rate=rate, promotion_anomaly_rate=promotion_rate, max_rate_ratio=max_rate_ratio
    )
    reviewed = fx_anomaly.reviewed_precision(
        scores, fx_anomaly.reviewed_labels(scores, store.read_incidents(lake, symbol))
    )
    failures += fx_anomaly.precision_failures(
        reviewed, min_precision=min_reviewed_precision, min_flags=min_reviewed_flags
    )
    action = "none"
    if failures:
        action = revert_champion(
            lake,
            tracking,
            symbol=symbol,
            scored_version=scored_version,
            reason="; ".join(failures),
            enabled=revert,
            dagster_run_id=dagster_run_id,
            log=log or logging.getLogger(__name__),
        )
    row = {
        "symbol": symbol,
        "date": date,
        "model_version": scored_version,
        "anomaly_rate": rate,
        "promotion_anomaly_rate": promotion_rate,
        "reviewed_ticks": int(reviewed["reviewed_ticks"]),
        "reviewed_flags": int(reviewed["reviewed_flags"]),
        "confirmed_flags": int(reviewed["confirmed_flags"]),
        "reviewed_precision": reviewed["reviewed_precision"],
        "min_reviewed_precision": min_reviewed_precision,
        "min_reviewed_flags": min_reviewed_flags,
        "psi": max(m["psi"] for m in drift.values()),
        "ks": max(m["ks"] for m in drift.values()),
        "drift": json.dumps(drift),
        "max_rate_ratio": max_rate_ratio,
        "max_psi": max_psi,
        "max_ks": max_ks,
        "failures": "\n".join(failures),
        "drift_warnings": "\n".join(warnings),
        "action": action,
        "dagster_run_id": dagster_run_id,
    }
    frame = with_audit(
        pl.DataFrame([row]),
        dagster_run_id=dagster_run_id,
        inputs=inputs,
        mlflow_run_id=version.run_id,
    )
    lake.overwrite_partition("gold", "fx_model_monitor", frame, {"symbol": symbol, "date": date})
    return row


def revert_champion(
    lake: LakeResource,
    tracking: TrackingResource,
    *,
    symbol: str,
    scored_version: str,
    reason: str,
    enabled: bool,
    dagster_run_id: str,
    log: Any,
) -> str:
    """Tag the regressed version; move ``champion`` back to a sound ``previous_champion``.

    The regressed version is tagged ``kpi_regression`` whatever happens next, so it is never
    restored or promoted again. A ``previous_champion`` that itself failed in service is
    not restored: the regressed champion keeps serving and the action says why. The
    ``champion`` alias moves first (after it, ``previous_champion`` names the serving
    version: a valid state), then ``previous_champion`` is removed; the event is recorded
    after both. Returns what was done.
    """
    name = tracking.model_name(symbol)
    client = tracking.client()
    client.set_model_version_tag(name, scored_version, store.KPI_REGRESSION_TAG, reason[:500])
    champion = tracking.alias_version(name, store.CHAMPION)
    previous = tracking.alias_version(name, store.PREVIOUS_CHAMPION)
    if not enabled:
        return "regression (revert disabled)"
    if champion is None or str(champion.version) != scored_version:
        return f"regression of version {scored_version}, which is no longer champion"
    if previous is None:
        log.warning(f"{name}: champion {scored_version} regressed; nothing to revert to")
        return "regression (no previous champion)"
    failed = store.failed_in_service(previous)
    if failed:
        log.warning(f"{name}: champion {scored_version} regressed; not restoring {failed}")
        return f"regression (previous champion {previous.version} not restored: it failed)"
    tracking.set_alias(name, store.CHAMPION, previous.version)
    tracking.delete_alias(name, store.PREVIOUS_CHAMPION)
    client.set_model_version_tag(name, scored_version, store.REVERTED_TAG, reason[:500])
    client.set_registered_model_tag(
        name, "last_revert", f"{scored_version}->{previous.version} by run {dagster_run_id}"
    )
    store.record_model_event(
        lake,
        symbol=symbol,
        model_name=name,
        event="reverted",
        from_version=scored_version,
        to_version=str(previous.version),
        reason=reason,
        dagster_run_id=dagster_run_id,
    )
    log.warning(f"{name}: reverted champion {scored_version} -> {previous.version}")
    return f"reverted {scored_version} -> {previous.version}"
