"""What the FX model lifecycle stores, and the promotion rule applied to it.

Every gate decision is made from stored facts, so it holds across runs: the
challenger's evaluation is appended to ``gold/fx_model_evaluations``; the
``challenger_beats_champion`` check and the guard in ``fx_champion_model`` apply
:func:`promotion_rule_failures` to that stored row. Alias moves are appended to
``gold/model_events``, the audit trail of the registry, after the aliases moved;
:func:`champion_on` reads it back ("which version was champion for EURUSD on that day").
The labels the gate scores against are the desk's incident log,
``curated/fx_incidents``, read through the lake like every other curated table.
"""

import datetime as dt

import polars as pl
from dagster import Failure

from pipeline.audit import with_audit
from pipeline.domain import contracts
from pipeline.resources.lake import LakeResource

CHALLENGER, CHAMPION, PREVIOUS_CHAMPION = "challenger", "champion", "previous_champion"
INCIDENT_COLUMNS = ("symbol", "start", "end", "label")
REVERTED_TAG = "reverted"
"""Model-version tag: the monitor moved ``champion`` away from this version (the reason)."""
KPI_REGRESSION_TAG = "kpi_regression"
"""Model-version tag: this version failed its KPI while serving (the reason), reverted or not."""
LOOKBACK_DAYS = 3  # calendar days searched for the warm-up tail of a scored day (weekends)


def read_symbol_ticks(lake: LakeResource, symbol: str) -> pl.DataFrame:
    """All curated ticks of one symbol, oldest first."""
    ticks = lake.read("curated", "fx_spreads", {"symbol": symbol})
    if ticks.height == 0:
        raise Failure(f"fx symbol {symbol}: curated/fx_spreads has no rows; curate it first")
    return ticks.sort("ts")


def read_incidents(lake: LakeResource, symbol: str) -> pl.DataFrame:
    """The curated incident-log rows of one symbol (reviewed windows and anomalies).

    Empty (with the incident columns) when the desk never reviewed the symbol, or no
    incident log was ever curated: the gate then follows its label-free rule.
    """
    rows = lake.read("curated", "fx_incidents", {"symbol": symbol})
    if rows.height == 0:
        return pl.DataFrame(
            schema={
                "symbol": pl.String,
                "start": pl.Datetime("us"),
                "end": pl.Datetime("us"),
                "label": pl.String,
            }
        )
    return rows.select(INCIDENT_COLUMNS).sort("start")


def tick_contract_failures(ticks: pl.DataFrame) -> list[str]:
    """The tick contract recomputed on every stored date of the symbol."""
    failures = []
    for (date,), day in ticks.group_by("date", maintain_order=True):
        failures += contracts.contract_failures(
            day, contracts.fx_ticks_contract(str(date)), f"fx_spreads {date}"
        )
    return failures


def latest_evaluation(lake: LakeResource, symbol: str) -> dict | None:
    """The latest stored challenger evaluation of ``symbol``."""
    rows = lake.read("gold", "fx_model_evaluations", {"symbol": symbol})
    if rows.height == 0:
        return None
    return rows.sort("evaluated_at").row(-1, named=True)


def promotion_rule_failures(evaluation: dict | None) -> list[str]:
    """The promotion rule applied to a stored evaluation row.

    A ``labelled`` row (reviewed anomalies in the holdout) is judged by
    :func:`~pipeline.domain.fx_anomaly.promotion_failures` with the stored bootstrap
    interval of the AP difference; a ``label-free`` row by
    :func:`~pipeline.domain.fx_anomaly.label_free_failures`.
    """
    from pipeline.domain import fx_anomaly

    if evaluation is None:
        return ["no stored challenger evaluation"]
    has_champion = bool(evaluation["champion_version"])
    if evaluation.get("gate", fx_anomaly.LABELLED) == fx_anomaly.LABEL_FREE:
        failures = fx_anomaly.label_free_failures(
            challenger_rate=evaluation["challenger_anomaly_rate"],
            champion_rate=evaluation["champion_anomaly_rate"] if has_champion else None,
            rank_agreement=evaluation["rank_agreement"] if has_champion else None,
            contamination=evaluation["contamination"],
            max_rate_ratio=evaluation["label_free_rate_ratio"],
            min_rank_agreement=evaluation["min_rank_agreement"],
        )
    else:
        failures = fx_anomaly.promotion_failures(
            {"average_precision": evaluation["challenger_average_precision"]},
            {"average_precision": evaluation["champion_average_precision"]}
            if has_champion
            else None,
            tolerance=evaluation["ap_tolerance"],
            floor=evaluation["ap_floor"],
            difference={k: evaluation[k] for k in fx_anomaly.DIFFERENCE_KEYS}
            if "ap_difference" in evaluation
            else None,
        )
    contract = [f for f in evaluation["contract_failures"].split("\n") if f]
    return contract + failures


def promotion_reason(evaluation: dict) -> str:
    """Why a promoted challenger passed, for ``gold/model_events``.

    A labelled gate states the challenger's holdout AP; a label-free gate, which measured
    no AP, states its own rule's values (flag-rate ratio and rank agreement).
    """
    from pipeline.domain import fx_anomaly

    if evaluation.get("gate", fx_anomaly.LABELLED) == fx_anomaly.LABEL_FREE:
        has_champion = bool(evaluation["champion_version"])
        return "label-free gate passed: " + fx_anomaly.label_free_summary(
            challenger_rate=evaluation["challenger_anomaly_rate"],
            champion_rate=evaluation["champion_anomaly_rate"] if has_champion else None,
            rank_agreement=evaluation["rank_agreement"] if has_champion else None,
            contamination=evaluation["contamination"],
            max_rate_ratio=evaluation["label_free_rate_ratio"],
            min_rank_agreement=evaluation["min_rank_agreement"],
        )
    ap = evaluation.get("challenger_average_precision", float("nan"))
    return f"challenger AP {ap:.3f} passed the gate"


def record_model_event(lake: LakeResource, **event: str) -> None:
    """Append an alias move to ``gold/model_events`` (the audit trail of the registry).

    ``event`` names the ``dagster_run_id``; the audit columns are added (no input table,
    and no MLflow run: the model versions are named by ``from_version``/``to_version``).
    """
    frame = pl.DataFrame([{**event, "at": dt.datetime.now(dt.UTC).replace(tzinfo=None)}])
    lake.append(
        "gold",
        "model_events",
        with_audit(frame, dagster_run_id=event.get("dagster_run_id", ""), inputs={}),
    )


def failed_in_service(version: object) -> str:
    """Why a registered model version must not serve again ("" when nothing is known).

    A version the monitor reverted, or whose KPI regressed while it served, is neither
    restored by a later revert nor promoted again; a new challenger must replace it.
    """
    tags = getattr(version, "tags", None) or {}
    for tag in (REVERTED_TAG, KPI_REGRESSION_TAG):
        if tags.get(tag):
            return f"version {getattr(version, 'version', '?')} has tag {tag}: {tags[tag]}"
    return ""


def champion_on(lake: LakeResource, symbol: str, when: dt.date | dt.datetime) -> str | None:
    """The version that was ``champion`` of ``symbol`` at ``when``, from ``gold/model_events``.

    A date means the end of that day (UTC): the version serving at the close, after any
    promotion or revert during the day. ``None`` when no alias move of the symbol was
    recorded by then (no champion yet).
    """
    if isinstance(when, dt.datetime):
        cutoff = when.astimezone(dt.UTC).replace(tzinfo=None) if when.tzinfo else when
        inclusive = True
    else:
        cutoff, inclusive = dt.datetime.combine(when + dt.timedelta(days=1), dt.time()), False
    events = lake.read("gold", "model_events")
    if events.height == 0:
        return None
    before = pl.col("at") <= cutoff if inclusive else pl.col("at") < cutoff
    moves = events.filter((pl.col("symbol") == symbol) & before).sort("at")
    return moves["to_version"][-1] if moves.height else None


def scoring_ticks(lake: LakeResource, symbol: str, dates: list[str]) -> pl.DataFrame:
    """Curated ticks of the requested days, preceded by the warm-up tail features need.

    A feature looks back up to twice ``ROLLING_WINDOW`` ticks (a trailing median of
    deviations that are themselves taken from a trailing median), and training computes
    features over the symbol's whole history, so a day scored from a cold start would give
    its first few hundred ticks other features than the model was trained and evaluated on.
    The last ``2 * ROLLING_WINDOW + 1`` ticks of the :data:`LOOKBACK_DAYS` calendar days
    before the first requested day are prepended: with that many there (or the symbol's
    whole history, when shorter), every scored feature equals the one training computes.
    Days between requested days are read too, so a sparse selection keeps the same
    continuity as training.

    Raises
    ------
    Failure
        When a requested day has no curated ticks.
    """
    from pipeline.domain.fx_anomaly import ROLLING_WINDOW

    first, last = dt.date.fromisoformat(min(dates)), dt.date.fromisoformat(max(dates))
    span = [
        (first + dt.timedelta(days=i)).isoformat()
        for i in range(-LOOKBACK_DAYS, (last - first).days + 1)
    ]
    ticks = lake.read("curated", "fx_spreads", {"symbol": symbol, "date": span}).sort("ts")
    present = set(ticks["date"].unique().to_list()) if ticks.height else set()
    missing = sorted(set(dates) - present)
    if missing:
        raise Failure(f"fx_spreads {symbol} {', '.join(missing)}: no curated ticks to score")
    earlier = ticks.filter(pl.col("date") < min(dates)).tail(2 * ROLLING_WINDOW + 1)
    return pl.concat([earlier, ticks.filter(pl.col("date") >= min(dates))])
