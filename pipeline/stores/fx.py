"""What the FX model lifecycle stores, and the promotion rule applied to it.

Every gate decision is made from stored facts, so it holds across runs: the
challenger's evaluation is appended to ``gold/fx_model_evaluations``; the
``challenger_beats_champion`` check and the guard in ``fx_champion_model`` apply
:func:`promotion_rule_failures` to that stored row. Alias moves are appended to
``gold/model_events``, the audit trail of the registry.
"""

import datetime as dt
import io

import polars as pl
from dagster import Failure

from pipeline.domain import contracts
from pipeline.resources.lake import LakeResource
from pipeline.resources.landing import LandingResource

CHALLENGER, CHAMPION, PREVIOUS_CHAMPION = "challenger", "champion", "previous_champion"
LABELS_FILE = "_truth/fx_anomaly_labels.parquet"
LOOKBACK_DAYS = 3  # calendar days searched for the warm-up tail of a scored day (weekends)


def read_symbol_ticks(lake: LakeResource, symbol: str) -> pl.DataFrame:
    """All curated ticks of one symbol, oldest first."""
    ticks = lake.read("curated", "fx_spreads", {"symbol": symbol})
    if ticks.height == 0:
        raise Failure(f"fx symbol {symbol}: curated/fx_spreads has no rows; curate it first")
    return ticks.sort("ts")


def read_labels(landing: LandingResource, symbol: str) -> pl.DataFrame:
    """Confirmed anomalies of one symbol (the desk's incident log; demo: the truth file)."""
    if not landing.exists(LABELS_FILE):
        raise Failure(f"fx symbol {symbol}: no anomaly labels at {landing.uri(LABELS_FILE)}")
    labels = pl.read_parquet(io.BytesIO(landing.read_bytes(LABELS_FILE))).with_columns(
        pl.col("symbol").map_batches(contracts.normalise_symbols, return_dtype=pl.String),
        pl.col("ts").cast(pl.Datetime("us")),
    )
    return labels.filter(pl.col("symbol") == symbol).select("ts").unique()


def label_rows(features: pl.DataFrame, anomalous_ts: pl.DataFrame) -> pl.DataFrame:
    """One label per feature row: ticks absent from the incident log are normal."""
    flagged = anomalous_ts.with_columns(pl.lit(True).alias("is_anomaly"))
    return (
        features.select("ts")
        .join(flagged, on="ts", how="left")
        .with_columns(pl.col("is_anomaly").fill_null(False))
    )


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
    """The promotion rule applied to a stored evaluation row."""
    from pipeline.domain.fx_anomaly import promotion_failures

    if evaluation is None:
        return ["no stored challenger evaluation"]
    champion = (
        {"average_precision": evaluation["champion_average_precision"]}
        if evaluation["champion_version"]
        else None
    )
    failures = promotion_failures(
        {"average_precision": evaluation["challenger_average_precision"]},
        champion,
        tolerance=evaluation["ap_tolerance"],
        floor=evaluation["ap_floor"],
    )
    contract = [f for f in evaluation["contract_failures"].split("\n") if f]
    return contract + failures


def record_model_event(lake: LakeResource, **event: str) -> None:
    """Append an alias move to ``gold/model_events`` (the audit trail of the registry)."""
    lake.append(
        "gold",
        "model_events",
        pl.DataFrame([{**event, "at": dt.datetime.now(dt.UTC).replace(tzinfo=None)}]),
    )


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
