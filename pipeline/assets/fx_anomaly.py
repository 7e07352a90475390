"""Per-symbol FX spread anomaly models: challenger -> champion -> scores -> monitor.

Registry conventions (MLflow aliases on ``fx_spread_<symbol>``, or
``<catalog>.<schema>.fx_spread_<symbol>`` in Unity Catalog):

* ``challenger``: the latest trained version, not yet trusted;
* ``champion``: the version that scores production data;
* ``previous_champion``: the version ``champion`` replaced, kept for a revert.

Every gate decision is made from stored facts, so it holds across runs: the
challenger's evaluation is appended to ``gold/fx_model_evaluations``; the
``challenger_beats_champion`` check and the guard in ``fx_champion_model`` apply
:func:`pipeline.domain.fx_anomaly.promotion_failures` to that stored row.
"""

import datetime as dt
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import polars as pl
from dagster import (
    AssetDep,
    AssetExecutionContext,
    AutomationCondition,
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
from pipeline.assets.metadata import markdown_table, png_markdown
from pipeline.checks.gates import check_record_failures
from pipeline.domain import contracts
from pipeline.partitions import split_symbol_date, symbol_date_partitions, symbol_partitions
from pipeline.resources.lake import LakeResource
from pipeline.resources.landing import LandingResource
from pipeline.resources.tracking import TrackingResource

EXPERIMENT = "fx_spread_models"
CHALLENGER, CHAMPION, PREVIOUS_CHAMPION = "challenger", "champion", "previous_champion"
SKOPS_TRUSTED_TYPES = ["sklearn.tree._tree.Tree"]
LABELS_FILE = Path("_truth") / "fx_anomaly_labels.parquet"
REFERENCE_ARTIFACT = "reference_rel_spread_bps.npy"
PER_SYMBOL = MultiToSingleDimensionPartitionMapping(partition_dimension_name="symbol")
LOOKBACK_DAYS = 3  # calendar days searched for the warm-up tail of a scored day (weekends)


class ChallengerConfig(Config):
    """Training window and promotion bounds."""

    holdout_days: int = Field(default=3, description="latest days held out for the gate")
    contamination: float = Field(default=0.03, description="alarm budget of the forest")
    n_estimators: int = Field(default=100, description="trees per forest")
    random_state: int = Field(default=42, description="forest seed")
    ap_tolerance: float = Field(default=0.02, description="allowed AP shortfall vs champion")
    ap_floor: float = Field(default=0.5, description="minimum average precision")
    max_samples: int = Field(
        default=0,
        description="rows drawn per tree; 0 = sklearn's auto (min(256, n)); tiny values give a "
        "weak model, which gate drills use",
    )


class MonitorConfig(Config):
    """When a champion counts as regressed."""

    max_rate_ratio: float = Field(default=3.0, description="anomaly rate / rate at promotion")
    max_psi: float = Field(default=0.25, description="PSI of relative spread vs training")
    revert: bool = Field(default=True, description="move champion back on regression")


def pip_requirements() -> list[str]:
    """Exact requirements of a spread model (inferring them costs ~12 s per model).

    skops is pinned as well: it wrote the model file, and its format is only guaranteed
    to load with the version that wrote it.
    """
    from importlib.metadata import version

    return [f"{p}=={version(p)}" for p in ("scikit-learn", "numpy", "skops")]


def read_symbol_ticks(lake: LakeResource, symbol: str) -> pl.DataFrame:
    """All curated ticks of one symbol, oldest first."""
    ticks = lake.read("curated", "fx_spreads", {"symbol": symbol})
    if ticks.height == 0:
        raise Failure(f"fx symbol {symbol}: curated/fx_spreads has no rows; curate it first")
    return ticks.sort("ts")


def read_labels(landing: LandingResource, symbol: str) -> pl.DataFrame:
    """Confirmed anomalies of one symbol (the desk's incident log; demo: the truth file)."""
    path = landing.root / LABELS_FILE
    if not path.exists():
        raise Failure(f"fx symbol {symbol}: no anomaly labels at {path}")
    labels = pl.read_parquet(path).with_columns(
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


def _train_and_register(
    context: AssetExecutionContext,
    config: ChallengerConfig,
    lake: LakeResource,
    landing: LandingResource,
    tracking: TrackingResource,
    symbol: str,
) -> dict:
    """Fit, evaluate against the champion, log, register and alias one symbol's challenger.

    The returned dict is the stored evaluation row plus links and ``seconds``, the wall time
    of each phase (``fit``, the champion lookup, the MLflow ``run`` bookkeeping,
    ``log_model``, ``register``, ``alias``...), so a slow registry shows up in the
    materialisation's metadata, not only in a profiler. Only the fit time is also logged to
    MLflow (with the other metrics): logging the rest afterwards would cost a round trip.
    """
    import mlflow
    import mlflow.sklearn
    from mlflow.models import infer_signature

    from pipeline.domain import fx_anomaly

    clock = time.perf_counter
    seconds: dict[str, float] = {}
    started = clock()
    ticks = read_symbol_ticks(lake, symbol)
    dates = sorted(ticks["date"].unique().to_list())
    if len(dates) <= config.holdout_days:
        raise Failure(
            f"fx symbol {symbol}: {len(dates)} curated day(s), need more than "
            f"holdout_days={config.holdout_days} to train and hold out"
        )
    features = fx_anomaly.spread_features(ticks.select(fx_anomaly.TICK_COLUMNS))
    features = features.with_columns(ticks["date"])
    train_dates, holdout_dates = dates[: -config.holdout_days], dates[-config.holdout_days :]
    train = features.filter(pl.col("date").is_in(train_dates))
    holdout = features.filter(pl.col("date").is_in(holdout_dates))
    seconds["prepare"] = clock() - started
    lap = clock()
    model = fx_anomaly.fit_spread_model(
        train,
        random_state=config.random_state,
        contamination=config.contamination,
        n_estimators=config.n_estimators,
        max_samples=config.max_samples or "auto",
    )
    seconds["fit"] = clock() - lap
    lap = clock()
    labels = label_rows(holdout, read_labels(landing, symbol))
    challenger_metrics = fx_anomaly.evaluate_detector(model, holdout, labels)
    failures_contract = tick_contract_failures(ticks)
    train_matrix = fx_anomaly.feature_matrix(train)
    reference = train["rel_spread_bps"].to_numpy()
    seconds["evaluate"] = clock() - lap
    lap = clock()
    name = tracking.model_name(symbol)
    champion_version = tracking.alias_version(name, CHAMPION)
    champion_metrics = None
    if champion_version is not None:
        champion_model = tracking.load_sklearn(name, version=champion_version.version)
        champion_metrics = fx_anomaly.evaluate_detector(champion_model, holdout, labels)
    seconds["champion"] = clock() - lap

    lap = clock()
    with tracking.start_run(
        experiment=EXPERIMENT,
        run_name=f"fx_spread_{symbol.lower()}",
        dagster_run_id=context.run_id,
        asset_key=keys.FX_CHALLENGER_MODEL.to_user_string(),
        partition_key=symbol,
        tags={"symbol": symbol},
    ) as run:
        mlflow.log_params(
            {
                **config.model_dump(),
                "train_dates": f"{train_dates[0]}..{train_dates[-1]}",
                "holdout_dates": f"{holdout_dates[0]}..{holdout_dates[-1]}",
                "features": ",".join(fx_anomaly.FEATURE_COLUMNS),
            }
        )
        mlflow.log_metrics(
            {
                **{f"holdout_{k}": float(v) for k, v in challenger_metrics.items()},
                "train_rows": train.height,
                "fit_seconds": seconds["fit"],
                **(
                    {f"champion_holdout_{k}": float(v) for k, v in champion_metrics.items()}
                    if champion_metrics
                    else {}
                ),
            }
        )
        with tempfile.TemporaryDirectory() as tmp:
            np.save(Path(tmp) / REFERENCE_ARTIFACT, reference)
            mlflow.log_artifact(str(Path(tmp) / REFERENCE_ARTIFACT))
        example = train_matrix[:5]
        seconds["run"] = clock() - lap
        lap = clock()
        logged = mlflow.sklearn.log_model(
            model,
            name="model",
            signature=infer_signature(example, model.score_samples(example)),
            input_example=example,
            pip_requirements=pip_requirements(),
            skops_trusted_types=SKOPS_TRUSTED_TYPES,
        )
        seconds["log_model"] = clock() - lap
        lap = clock()
        # registered apart from log_model so the version is created with its tags in one
        # call (three set_model_version_tag calls cost more than the registration itself)
        version = str(
            mlflow.register_model(
                logged.model_uri,
                name,
                await_registration_for=0,
                tags={
                    "holdout_anomaly_rate": str(challenger_metrics["anomaly_rate"]),
                    "holdout_average_precision": str(challenger_metrics["average_precision"]),
                    "dagster_run_id": context.run_id,
                },
            ).version
        )
        seconds["register"] = clock() - lap
        lap = clock()
        tracking.set_alias(name, CHALLENGER, version)
        seconds["alias"] = clock() - lap
        lap = clock()
        run_id, experiment_id = run.info.run_id, run.info.experiment_id
    seconds["run"] += clock() - lap  # ending the run

    evaluation = {
        "symbol": symbol,
        "model_name": name,
        "model_version": version,
        "challenger_average_precision": float(challenger_metrics["average_precision"]),
        "challenger_precision": float(challenger_metrics["precision"]),
        "challenger_recall": float(challenger_metrics["recall"]),
        "challenger_anomaly_rate": float(challenger_metrics["anomaly_rate"]),
        "champion_version": str(champion_version.version) if champion_version else "",
        "champion_average_precision": float(champion_metrics["average_precision"])
        if champion_metrics
        else float("nan"),
        "ap_tolerance": config.ap_tolerance,
        "ap_floor": config.ap_floor,
        "contract_failures": "\n".join(failures_contract),
        "holdout_dates": ",".join(holdout_dates),
        "mlflow_run_id": run_id,
        "dagster_run_id": context.run_id,
        "evaluated_at": dt.datetime.now(dt.UTC).replace(tzinfo=None),
    }
    lap = clock()
    lake.append("gold", "fx_model_evaluations", pl.DataFrame([evaluation]))
    seconds["store_evaluation"] = clock() - lap
    seconds["total"] = clock() - started
    return {
        **evaluation,
        "mlflow_run_url": tracking.run_url(experiment_id, run_id),
        "model_version_url": tracking.model_version_url(name, version),
        "seconds": seconds,
    }


@asset(
    key=keys.FX_CHALLENGER_MODEL,
    partitions_def=symbol_partitions,
    deps=[AssetDep(keys.FX_SPREADS, partition_mapping=PER_SYMBOL)],
    group_name="fx_models",
    kinds={"sklearn", "mlflow"},
    description=(
        "IsolationForest of the symbol's spreads, trained on all curated days but the "
        "held-out window, logged and registered in MLflow with alias `challenger`."
    ),
    backfill_policy=BackfillPolicy.single_run(),
    pool="model_training",
)
def fx_challenger_model(
    context: AssetExecutionContext,
    config: ChallengerConfig,
    lake: LakeResource,
    landing: LandingResource,
    tracking: TrackingResource,
) -> MaterializeResult:
    """Train one challenger per requested symbol, all in this run."""
    evaluations = [
        _train_and_register(context, config, lake, landing, tracking, symbol)
        for symbol in context.partition_keys
    ]
    table = pl.DataFrame(
        [
            {
                "symbol": e["symbol"],
                "version": e["model_version"],
                "AP": e["challenger_average_precision"],
                "champion AP": e["champion_average_precision"],
                "precision": e["challenger_precision"],
                "recall": e["challenger_recall"],
            }
            for e in evaluations
        ]
    )
    seconds = Counter()
    for e in evaluations:
        seconds.update(e["seconds"])
    metadata: dict = {
        "models_trained": len(evaluations),
        "evaluations": MetadataValue.md(markdown_table(table, max_rows=60)),
        # summed over the symbols of the run: where the time went (fit, MLflow, lake)
        "seconds": MetadataValue.json({k: round(v, 4) for k, v in seconds.items()}),
    }
    if len(evaluations) == 1:
        (e,) = evaluations
        metadata.update(
            {
                "model_name": e["model_name"],
                "model_version": e["model_version"],
                "average_precision": e["challenger_average_precision"],
                "mlflow_run": MetadataValue.url(e["mlflow_run_url"]),
                "registered_model": MetadataValue.url(e["model_version_url"]),
            }
        )
    return MaterializeResult(metadata=metadata)


@asset(
    key=keys.FX_CHAMPION_MODEL,
    partitions_def=symbol_partitions,
    deps=[keys.FX_CHALLENGER_MODEL],
    group_name="fx_models",
    kinds={"mlflow"},
    description=(
        "Moves alias `champion` to the challenger's version (the former one becomes "
        "`previous_champion`) only when `challenger_beats_champion` passed for the symbol."
    ),
    automation_condition=(
        AutomationCondition.eager() & AutomationCondition.all_deps_blocking_checks_passed()
    ),
    # the challenger's policy: a backfill of both is one run, not one run per symbol
    backfill_policy=BackfillPolicy.single_run(),
)
def fx_champion_model(
    context: AssetExecutionContext, lake: LakeResource, tracking: TrackingResource
) -> MaterializeResult:
    """Promote the gated challenger of each requested symbol."""
    from pipeline.checks.gates import GateClosedError

    promoted = []
    for symbol in context.partition_keys:
        name = tracking.model_name(symbol)
        challenger = tracking.alias_version(name, CHALLENGER)
        evaluation = latest_evaluation(lake, symbol)
        failures = promotion_rule_failures(evaluation)
        if challenger is None:
            failures.append(f"model {name} has no `challenger` alias")
        elif evaluation and evaluation["model_version"] != str(challenger.version):
            failures.append(
                f"latest evaluation is of version {evaluation['model_version']}, but "
                f"`challenger` points at {challenger.version}"
            )
        failures += check_record_failures(
            context.instance,
            keys.FX_CHALLENGER_MODEL,
            [keys.CHECK_CHALLENGER_BEATS_CHAMPION],
            symbol,
            per_partition_rule=True,  # the stored evaluation above is judged per symbol
        )
        if failures:
            raise GateClosedError(
                description=(
                    f"refusing to promote {name} for symbol {symbol}: " + "; ".join(failures)
                ),
                allow_retries=False,
            )
        current = tracking.alias_version(name, CHAMPION)
        new_version = str(challenger.version)
        if current is not None and str(current.version) == new_version:
            context.log.info(f"{name}: version {new_version} is already champion")
            promoted.append((symbol, new_version, new_version, "unchanged"))
            continue
        if current is not None:
            tracking.set_alias(name, PREVIOUS_CHAMPION, current.version)
        tracking.set_alias(name, CHAMPION, new_version)
        record_model_event(
            lake,
            symbol=symbol,
            model_name=name,
            event="promoted",
            from_version=str(current.version) if current else "",
            to_version=new_version,
            reason=(
                f"challenger AP {evaluation['challenger_average_precision']:.3f} passed the gate"
            ),
            dagster_run_id=context.run_id,
        )
        promoted.append((symbol, str(current.version) if current else "", new_version, "promoted"))
    table = pl.DataFrame(promoted, schema=["symbol", "from", "to", "action"], orient="row")
    metadata: dict = {"promotions": MetadataValue.md(markdown_table(table, max_rows=60))}
    if len(promoted) == 1:
        metadata["champion_version"] = promoted[0][2]
        metadata["registered_model"] = MetadataValue.url(
            tracking.model_version_url(tracking.model_name(promoted[0][0]), promoted[0][2])
        )
    return MaterializeResult(metadata=metadata)


def record_model_event(lake: LakeResource, **event: str) -> None:
    """Append an alias move to ``gold/model_events`` (the audit trail of the registry)."""
    lake.append(
        "gold",
        "model_events",
        pl.DataFrame([{**event, "at": dt.datetime.now(dt.UTC).replace(tzinfo=None)}]),
    )


@asset(
    key=keys.FX_ANOMALY_SCORES,
    partitions_def=symbol_date_partitions,
    deps=[keys.FX_SPREADS, AssetDep(keys.FX_CHAMPION_MODEL, partition_mapping=PER_SYMBOL)],
    group_name="fx_models",
    kinds={"delta", "sklearn"},
    description="Ticks scored by the symbol's `champion` model (loaded once per symbol per run).",
    backfill_policy=BackfillPolicy.single_run(),
    metadata={"partition_expr": {"date": "date", "symbol": "symbol"}},
)
def fx_anomaly_scores(
    context: AssetExecutionContext, lake: LakeResource, tracking: TrackingResource
) -> MaterializeResult:
    """Score every requested (symbol, date) with the champion of its symbol.

    Each symbol's champion is resolved and loaded once, and all its requested days are read
    and scored together; only the writes are per partition.
    """
    from pipeline.domain import fx_anomaly, plots

    clock = time.perf_counter
    seconds: Counter = Counter()
    by_symbol: dict[str, list[str]] = {}
    for key in context.partition_keys:
        symbol, date = split_symbol_date(key)
        by_symbol.setdefault(symbol, []).append(date)
    champions: dict[str, str] = {}
    flagged = rows = 0
    last_scored = None
    for symbol, dates in by_symbol.items():
        lap = clock()
        name = tracking.model_name(symbol)
        version = tracking.alias_version(name, CHAMPION)
        if version is None:
            raise Failure(f"fx symbol {symbol}: model {name} has no `champion`; promote one")
        champions[symbol] = str(version.version)
        model = tracking.load_sklearn(name, version=version.version)
        seconds["load_model"] += clock() - lap
        lap = clock()
        ticks = scoring_ticks(lake, symbol, dates)
        seconds["read"] += clock() - lap
        lap = clock()
        features = fx_anomaly.spread_features(ticks.select(fx_anomaly.TICK_COLUMNS))
        features = features.with_columns(ticks["date"]).filter(pl.col("date").is_in(dates))
        seconds["features"] += clock() - lap
        lap = clock()
        scored = fx_anomaly.score_spreads(model, features)
        seconds["score"] += clock() - lap
        lap = clock()
        out = scored.select(
            "symbol",
            "date",
            "ts",
            "bid",
            "ask",
            "spread",
            "rel_spread_bps",
            "anomaly_score",
            "is_anomaly",
            pl.lit(champions[symbol]).alias("model_version"),
        )
        # all requested days of the symbol in one atomic commit
        lake.overwrite_partitions(
            "gold",
            "fx_anomaly_scores",
            out,
            [{"symbol": symbol, "date": date} for date in dates],
        )
        flagged += int(out["is_anomaly"].sum())
        rows += out.height
        last_scored = (symbol, dates[-1], out.filter(pl.col("date") == dates[-1]))
        seconds["write"] += clock() - lap
    metadata: dict = {
        "dagster/row_count": rows,
        "flagged": flagged,
        "anomaly_rate": flagged / rows if rows else 0.0,
        "champion_versions": MetadataValue.json(champions),
        "seconds": MetadataValue.json({k: round(v, 4) for k, v in seconds.items()}),
    }
    if len(context.partition_keys) == 1 and last_scored is not None:
        symbol, date, out = last_scored
        metadata["spreads"] = png_markdown(
            plots.score_plot_png(out, title=f"{symbol} {date}"), "scored spreads"
        )
    return MaterializeResult(metadata=metadata)


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


def reference_spreads(tracking: TrackingResource, run_id: str) -> np.ndarray:
    """Training distribution of relative spreads stored with a model's run."""
    import mlflow.artifacts

    tracking.client()
    with tempfile.TemporaryDirectory() as tmp:
        path = mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path=REFERENCE_ARTIFACT, dst_path=tmp
        )
        return np.load(path)


@asset(
    key=keys.FX_MODEL_MONITOR,
    partitions_def=symbol_date_partitions,
    deps=[keys.FX_ANOMALY_SCORES],
    group_name="fx_models",
    kinds={"delta", "mlflow"},
    description=(
        "Champion KPI (anomaly rate against the rate at promotion) and drift (PSI, KS of "
        "relative spread against training). Past the bounds it reverts `champion` to "
        "`previous_champion` and records the event."
    ),
    metadata={"partition_expr": {"date": "date", "symbol": "symbol"}},
    backfill_policy=BackfillPolicy.single_run(),
)
def fx_model_monitor(
    context: AssetExecutionContext,
    config: MonitorConfig,
    lake: LakeResource,
    tracking: TrackingResource,
) -> MaterializeResult:
    """Measure the serving model on each requested day; revert it when it regressed."""
    rows = [
        monitor_partition(context, config, lake, tracking, *split_symbol_date(key))
        for key in sorted(context.partition_keys, key=lambda k: split_symbol_date(k)[::-1])
    ]
    table = pl.DataFrame(rows)
    regressions = table.filter(pl.col("failures") != "")
    metadata: dict = {
        "partitions_monitored": table.height,
        "regressions": regressions.height,
        "monitor": MetadataValue.md(
            markdown_table(
                table.select("symbol", "date", "model_version", "anomaly_rate", "psi", "action"),
                max_rows=40,
            )
        ),
    }
    if table.height == 1:
        row = rows[0]
        metadata.update(
            {
                k: row[k]
                for k in ("model_version", "anomaly_rate", "promotion_anomaly_rate", "psi", "ks")
            }
        )
        metadata["regression"] = MetadataValue.md(
            "\n".join(f"- {f}" for f in row["failures"].split("\n") if f) or "_none_"
        )
        metadata["action"] = row["action"]
    return MaterializeResult(metadata=metadata)


def monitor_partition(
    context: AssetExecutionContext,
    config: MonitorConfig,
    lake: LakeResource,
    tracking: TrackingResource,
    symbol: str,
    date: str,
) -> dict:
    """KPI and drift of one (symbol, date), the revert if needed, and the stored row."""
    from pipeline.domain import fx_anomaly

    scores = lake.read("gold", "fx_anomaly_scores", {"symbol": symbol, "date": date})
    if scores.height == 0:
        raise Failure(f"fx_anomaly_scores {symbol} {date}: nothing scored to monitor")
    name = tracking.model_name(symbol)
    scored_version = scores["model_version"][0]
    version = tracking.client().get_model_version(name, scored_version)
    promotion_rate = float(version.tags.get("holdout_anomaly_rate", "nan"))
    reference = reference_spreads(tracking, version.run_id)
    current = scores["rel_spread_bps"].to_numpy()
    rate = float(scores["is_anomaly"].mean())
    psi = fx_anomaly.population_stability_index(reference, current)
    ks = fx_anomaly.ks_statistic(reference, current)
    failures = fx_anomaly.monitor_failures(
        anomaly_rate=rate,
        promotion_anomaly_rate=promotion_rate,
        psi=psi,
        max_rate_ratio=config.max_rate_ratio,
        max_psi=config.max_psi,
    )
    action = "none"
    if failures:
        action = revert_champion(
            context,
            lake,
            tracking,
            symbol=symbol,
            scored_version=scored_version,
            reason="; ".join(failures),
            enabled=config.revert,
        )
    row = {
        "symbol": symbol,
        "date": date,
        "model_version": scored_version,
        "anomaly_rate": rate,
        "promotion_anomaly_rate": promotion_rate,
        "psi": psi,
        "ks": ks,
        "max_rate_ratio": config.max_rate_ratio,
        "max_psi": config.max_psi,
        "failures": "\n".join(failures),
        "action": action,
        "dagster_run_id": context.run_id,
    }
    lake.overwrite_partition(
        "gold", "fx_model_monitor", pl.DataFrame([row]), {"symbol": symbol, "date": date}
    )
    return row


def revert_champion(
    context: AssetExecutionContext,
    lake: LakeResource,
    tracking: TrackingResource,
    *,
    symbol: str,
    scored_version: str,
    reason: str,
    enabled: bool,
) -> str:
    """Move ``champion`` back to ``previous_champion``; return what was done."""
    name = tracking.model_name(symbol)
    champion = tracking.alias_version(name, CHAMPION)
    previous = tracking.alias_version(name, PREVIOUS_CHAMPION)
    if not enabled:
        return "regression (revert disabled)"
    if champion is None or str(champion.version) != scored_version:
        return f"regression of version {scored_version}, which is no longer champion"
    if previous is None:
        context.log.warning(f"{name}: champion {scored_version} regressed; nothing to revert to")
        return "regression (no previous champion)"
    tracking.set_alias(name, CHAMPION, previous.version)
    tracking.delete_alias(name, PREVIOUS_CHAMPION)
    client = tracking.client()
    client.set_model_version_tag(name, scored_version, "reverted", reason[:500])
    client.set_registered_model_tag(
        name, "last_revert", f"{scored_version}->{previous.version} by run {context.run_id}"
    )
    record_model_event(
        lake,
        symbol=symbol,
        model_name=name,
        event="reverted",
        from_version=scored_version,
        to_version=str(previous.version),
        reason=reason,
        dagster_run_id=context.run_id,
    )
    context.log.warning(f"{name}: reverted champion {scored_version} -> {previous.version}")
    return f"reverted {scored_version} -> {previous.version}"


fx_assets = [fx_challenger_model, fx_champion_model, fx_anomaly_scores, fx_model_monitor]
