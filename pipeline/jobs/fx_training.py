"""Train, evaluate, log, register and alias one symbol's challenger spread model.

:func:`train_challenger` is a plain function of one symbol's curated ticks, its
incident log (``curated/fx_incidents``) and the tracking resource: the challenger
asset calls it once per symbol, and a Spark task (``groupBy("symbol").applyInPandas``)
or a Databricks job can call it unchanged. It returns the evaluation row that the
promotion gate judges; :func:`store_evaluations` appends such rows to
``gold/fx_model_evaluations``.
"""

import dataclasses
import datetime as dt
import io
import math
from dataclasses import dataclass

import numpy as np
import polars as pl

from pipeline import keys
from pipeline.audit import with_audit
from pipeline.domain.errors import DomainError
from pipeline.resources.lake import LakeResource
from pipeline.resources.tracking import TrackingResource
from pipeline.stores import fx as store
from pipeline.timing import Stopwatch

EXPERIMENT = "fx_spread_models"
SKOPS_TRUSTED_TYPES = ["sklearn.tree._tree.Tree"]
REFERENCE_ARTIFACT = "reference_features.npz"
"""The training sample of every model feature, one array per feature (drift reference)."""
LEGACY_REFERENCE_ARTIFACT = "reference_rel_spread_bps.npy"
"""What models trained before drift moved to the features logged: relative spreads only."""


class TrainingDataError(DomainError):
    """A symbol's curated history cannot be split into training and held-out days."""


@dataclass(frozen=True)
class TrainingParams:
    """Training window, forest and promotion bounds (the asset's run config, as plain data)."""

    holdout_days: int = 3
    contamination: float = 0.03
    n_estimators: int = 100
    random_state: int = 42
    ap_tolerance: float = 0.02  # allowed shortfall beyond the bootstrap interval
    ap_floor: float = 0.3
    max_samples: int = 0  # 0 = sklearn's auto (min(256, n))
    bootstrap_resamples: int = 1_000  # paired bootstrap over anomaly bursts
    interval_level: float = 0.9  # two-sided level of the AP-difference interval
    label_free_rate_ratio: float = 3.0  # label-free: rate within [r / ratio, r * ratio]
    min_rank_agreement: float = 0.5  # label-free: Spearman of scores with the champion


def pip_requirements() -> list[str]:
    """Exact requirements of a spread model (inferring them costs ~12 s per model).

    skops is pinned as well: it wrote the model file, and its format is only guaranteed
    to load with the version that wrote it.
    """
    from importlib.metadata import version

    return [f"{p}=={version(p)}" for p in ("scikit-learn", "numpy", "skops")]


def train_challenger(
    ticks: pl.DataFrame,
    incidents: pl.DataFrame,
    *,
    symbol: str,
    params: TrainingParams,
    tracking: TrackingResource,
    dagster_run_id: str,
) -> dict:
    """Fit on all days but the latest ``holdout_days``, evaluate, log, register, alias.

    Parameters
    ----------
    ticks
        The symbol's curated ticks, oldest first.
    incidents
        The symbol's incident-log rows (``start``, ``end``, ``label``): reviewed windows
        and confirmed anomalies. Only held-out ticks inside a reviewed window are scored;
        without a reviewed anomaly in the holdout the gate is label-free.

    Returns
    -------
    dict
        The evaluation row (:func:`pipeline.domain.fx_anomaly.holdout_comparison` of the
        challenger and the champion on the same held-out days, versions, bounds, MLflow
        run id), plus ``mlflow_run_url``, ``model_version_url`` and ``seconds``, the wall
        time of each phase.

    Raises
    ------
    TrainingDataError
        When the symbol has too few curated days to train and hold out.
    """
    from pipeline.domain import fx_anomaly

    watch = Stopwatch()
    with watch("prepare"):
        dates = sorted(ticks["date"].unique().to_list())
        if len(dates) <= params.holdout_days:
            raise TrainingDataError(
                f"fx symbol {symbol}: {len(dates)} curated day(s), need more than "
                f"holdout_days={params.holdout_days} to train and hold out"
            )
        features = fx_anomaly.spread_features(ticks.select(fx_anomaly.TICK_COLUMNS))
        features = features.with_columns(ticks["date"])
        train_dates, holdout_dates = dates[: -params.holdout_days], dates[-params.holdout_days :]
        train = features.filter(pl.col("date").is_in(train_dates))
        holdout = features.filter(pl.col("date").is_in(holdout_dates))
    with watch("fit"):
        model = fx_anomaly.fit_spread_model(
            train,
            random_state=params.random_state,
            contamination=params.contamination,
            n_estimators=params.n_estimators,
            max_samples=params.max_samples or "auto",
        )
    with watch("champion"):
        name = tracking.model_name(symbol)
        champion_version = tracking.alias_version(name, store.CHAMPION)
        champion_scored = None
        if champion_version is not None:
            loaded = tracking.load_sklearn(name, version=champion_version.version)
            champion_scored = fx_anomaly.score_spreads(loaded, holdout)
    with watch("evaluate"):
        compared = fx_anomaly.holdout_comparison(
            fx_anomaly.score_spreads(model, holdout),
            champion_scored,
            fx_anomaly.reviewed_labels(holdout, incidents),
            n_resamples=params.bootstrap_resamples,
            level=params.interval_level,
            seed=params.random_state,
        )
    challenger = {k.removeprefix("challenger_"): v for k, v in compared.items()}
    logged = _log_and_register(
        model,
        train,
        symbol=symbol,
        params=params,
        metrics=_measured(
            {
                **{
                    f"holdout_{k}": v
                    for k, v in challenger.items()
                    if k != "gate" and not k.startswith("champion_")
                },
                **{
                    f"champion_holdout_{k.removeprefix('champion_')}": v
                    for k, v in compared.items()
                    if k.startswith("champion_")
                },
                "train_rows": train.height,
                "fit_seconds": watch.seconds()["fit"],
            }
        ),
        windows={
            "train_dates": f"{train_dates[0]}..{train_dates[-1]}",
            "holdout_dates": f"{holdout_dates[0]}..{holdout_dates[-1]}",
        },
        version_tags={
            "holdout_anomaly_rate": str(challenger["anomaly_rate"]),
            "holdout_average_precision": str(challenger["average_precision"]),
            "gate": str(compared["gate"]),
            "dagster_run_id": dagster_run_id,
        },
        tracking=tracking,
        dagster_run_id=dagster_run_id,
        watch=watch,
    )
    evaluation = {
        "symbol": symbol,
        "model_name": name,
        "model_version": logged["version"],
        "champion_version": str(champion_version.version) if champion_version else "",
        **{k: v if k == "gate" else float(v) for k, v in compared.items()},
        "ap_tolerance": params.ap_tolerance,
        "ap_floor": params.ap_floor,
        "interval_level": params.interval_level,
        "contamination": params.contamination,
        "label_free_rate_ratio": params.label_free_rate_ratio,
        "min_rank_agreement": params.min_rank_agreement,
        "contract_failures": "\n".join(store.tick_contract_failures(ticks)),
        "holdout_dates": ",".join(holdout_dates),
        "mlflow_run_id": logged["run_id"],
        "dagster_run_id": dagster_run_id,
        "evaluated_at": dt.datetime.now(dt.UTC).replace(tzinfo=None),
    }
    return {
        **evaluation,
        "mlflow_run_url": logged["run_url"],
        "model_version_url": tracking.model_version_url(name, logged["version"]),
        "seconds": watch.seconds(),
    }


def _log_and_register(
    model: object,
    train: pl.DataFrame,
    *,
    symbol: str,
    params: TrainingParams,
    metrics: dict[str, float],
    windows: dict[str, str],
    version_tags: dict[str, str],
    tracking: TrackingResource,
    dagster_run_id: str,
    watch: Stopwatch,
) -> dict[str, str]:
    """One MLflow run: parameters, metrics, training reference, model; then register and alias.

    ``watch`` times the whole MLflow block as ``mlflow`` and, within it, ``log_model``,
    ``register`` and ``alias``, so a slow registry shows up in the materialisation's
    metadata.
    """
    from pipeline.domain import fx_anomaly

    name = tracking.model_name(symbol)
    reference = io.BytesIO()
    np.savez_compressed(reference, **{c: train[c].to_numpy() for c in fx_anomaly.FEATURE_COLUMNS})
    with (
        watch("mlflow"),
        tracking.start_run(
            experiment=EXPERIMENT,
            run_name=f"fx_spread_{symbol.lower()}",
            dagster_run_id=dagster_run_id,
            asset_key=keys.FX_CHALLENGER_MODEL.to_user_string(),
            partition_key=symbol,
            tags={"symbol": symbol},
        ) as run,
    ):
        run.log_params(
            {
                **dataclasses.asdict(params),
                **windows,
                "features": ",".join(fx_anomaly.FEATURE_COLUMNS),
            }
        )
        run.log_metrics(metrics)
        run.log_files({REFERENCE_ARTIFACT: reference.getvalue()})
        with watch("log_model"):
            source = run.log_sklearn_model(
                model,
                input_example=fx_anomaly.feature_matrix(train)[:5],
                pip_requirements=pip_requirements(),
                skops_trusted_types=SKOPS_TRUSTED_TYPES,
            )
        with watch("register"):
            version = tracking.register_version(
                name, source=source, run_id=run.run_id, tags=version_tags
            )
        with watch("alias"):
            tracking.set_alias(name, store.CHALLENGER, version)
    return {
        "version": version,
        "run_id": run.run_id,
        "run_url": tracking.run_url(run.experiment_id, run.run_id),
    }


def _measured(metrics: dict[str, float]) -> dict[str, float]:
    """Keep the finite metrics only.

    What could not be measured (no champion, a label-free gate) is not logged to MLflow
    as NaN; the evaluation row keeps it as NaN.
    """
    return {k: float(v) for k, v in metrics.items() if math.isfinite(float(v))}


def difference_text(evaluation: dict) -> str:
    """``AP(challenger) - AP(champion)`` with its interval, or why there is none."""
    if evaluation["gate"] != "labelled":
        return "label-free (no reviewed anomaly in the holdout)"
    if not evaluation["champion_version"]:
        return "no champion"
    level = round(100 * evaluation["interval_level"])
    return (
        f"{evaluation['ap_difference']:+.3f} (SE {evaluation['ap_difference_se']:.3f}, "
        f"{level}% interval [{evaluation['ap_difference_lower']:+.3f}, "
        f"{evaluation['ap_difference_upper']:+.3f}], {int(evaluation['n_bursts'])} bursts)"
    )


def store_evaluations(
    lake: LakeResource, results: list[dict], *, inputs: dict[str, int | None]
) -> int:
    """Append the evaluation rows of :func:`train_challenger` results in one commit.

    ``inputs`` are the Delta versions training read (audit columns); each row keeps the
    MLflow run of its symbol's challenger.
    """
    if not results:
        return lake.version("gold", "fx_model_evaluations") or -1
    links = ("mlflow_run_url", "model_version_url", "seconds")
    rows = [{k: v for k, v in r.items() if k not in links} for r in results]
    frame = with_audit(pl.DataFrame(rows), dagster_run_id=rows[0]["dagster_run_id"], inputs=inputs)
    return lake.append("gold", "fx_model_evaluations", frame)


def reference_features(tracking: TrackingResource, run_id: str) -> dict[str, np.ndarray]:
    """Training sample of each model feature stored with a model's run.

    A model logged before the features were stored has only its relative spreads, which
    are returned alone (drift of that model is measured on that one feature).
    """
    from mlflow.exceptions import MlflowException

    try:
        payload = tracking.download_artifact(run_id, REFERENCE_ARTIFACT)
    except (OSError, MlflowException):
        legacy = tracking.download_artifact(run_id, LEGACY_REFERENCE_ARTIFACT)
        return {"rel_spread_bps": np.load(io.BytesIO(legacy))}
    with np.load(io.BytesIO(payload)) as stored:
        return {name: stored[name] for name in stored.files}
