"""Train, evaluate, log, register and alias one symbol's challenger spread model.

:func:`train_challenger` is a plain function of one symbol's curated ticks, its
incident log (``curated/fx_incidents``) and the tracking resource: the challenger
asset calls it once per symbol, and a Spark task (``groupBy("symbol").applyInPandas``)
or a Databricks job can call it unchanged. It returns the evaluation row that the
promotion gate judges; :func:`store_evaluations` appends such rows to
``gold/fx_model_evaluations``.
"""

import contextlib
import dataclasses
import datetime as dt
import io
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl

from pipeline import keys
from pipeline.audit import with_audit
from pipeline.domain.errors import DomainError
from pipeline.resources.lake import LakeResource
from pipeline.resources.tracking import TrackedRun, TrackingResource
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


class TrainingConfigError(DomainError):
    """The challenger's run config names something training does not know."""


class CandidateSearchError(RuntimeError):
    """MLflow did not return the candidate runs that were just logged under a parent run."""


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
    grid: tuple[Mapping[str, Any], ...] = ()  # candidates; () = one, the settings above

    def __post_init__(self) -> None:
        """Hold the grid as a tuple of plain dicts (run config hands over a list)."""
        object.__setattr__(self, "grid", tuple(dict(c) for c in self.grid))

    def candidates(self) -> list["Candidate"]:
        """The hyper-parameter candidates, in grid order.

        Each grid entry overrides ``n_estimators``, ``max_samples`` and ``contamination``
        of the settings above (an entry's ``None`` or missing key keeps the setting); an
        empty grid is one candidate, those settings.
        """
        default = Candidate(self.n_estimators, self.max_samples, self.contamination)
        out = []
        for i, entry in enumerate(self.grid or ({},)):
            unknown = set(entry) - set(CANDIDATE_KEYS)
            if unknown:
                raise TrainingConfigError(
                    f"grid candidate {i}: unknown key(s) {sorted(unknown)}; "
                    f"a candidate sets {list(CANDIDATE_KEYS)}"
                )
            out.append(
                dataclasses.replace(default, **{k: v for k, v in entry.items() if v is not None})
            )
        return out


CANDIDATE_KEYS = ("n_estimators", "max_samples", "contamination")


@dataclass(frozen=True)
class Candidate:
    """One point of the challenger's hyper-parameter grid."""

    n_estimators: int
    max_samples: int  # 0 = sklearn's auto (min(256, n))
    contamination: float


@dataclass(frozen=True)
class Selection:
    """The candidate that became the challenger, and why."""

    index: int
    params: TrainingParams
    model: Any
    scored: pl.DataFrame
    rule: str


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

    The symbol's MLflow run is opened first; every candidate of ``params.grid`` is fitted
    and, when there are several, logged as a nested run under it (:func:`select_candidate`).
    Only the winner is compared with the champion, logged as a model, registered and
    aliased ``challenger``; the run's parameters are the winner's. The Spark path calls
    this function unchanged, so a grid works there too.

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
        labels = fx_anomaly.reviewed_labels(holdout, incidents)
    with watch("champion"):
        name = tracking.model_name(symbol)
        champion_version = tracking.alias_version(name, store.CHAMPION)
        champion_scored = None
        if champion_version is not None:
            loaded = tracking.load_sklearn(name, version=champion_version.version)
            champion_scored = fx_anomaly.score_spreads(loaded, holdout)
    with contextlib.ExitStack() as stack:
        with watch("mlflow"):
            run = stack.enter_context(
                tracking.start_run(
                    experiment=EXPERIMENT,
                    run_name=f"fx_spread_{symbol.lower()}",
                    dagster_run_id=dagster_run_id,
                    asset_key=keys.FX_CHALLENGER_MODEL.to_user_string(),
                    partition_key=symbol,
                    tags={"symbol": symbol},
                )
            )
        chosen = select_candidate(
            train,
            holdout,
            labels,
            params=params,
            parent=run,
            tracking=tracking,
            symbol=symbol,
            dagster_run_id=dagster_run_id,
            watch=watch,
        )
        winner = chosen.params
        with watch("evaluate"):
            compared = fx_anomaly.holdout_comparison(
                chosen.scored,
                champion_scored,
                labels,
                n_resamples=params.bootstrap_resamples,
                level=params.interval_level,
                seed=params.random_state,
            )
        challenger = {k.removeprefix("challenger_"): v for k, v in compared.items()}
        logged = _log_and_register(
            run,
            chosen.model,
            train,
            symbol=symbol,
            params={
                **{k: v for k, v in dataclasses.asdict(winner).items() if k != "grid"},
                "grid": json.dumps([dataclasses.asdict(c) for c in params.candidates()]),
                "candidate_index": chosen.index,
                "selected_by": chosen.rule,
            },
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
                    "candidates": len(params.candidates()),
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
        "contamination": winner.contamination,
        "n_estimators": winner.n_estimators,
        "max_samples": winner.max_samples,
        "candidate_index": chosen.index,
        "candidates": len(params.candidates()),
        "selected_by": chosen.rule,
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


FIRST_CANDIDATE_RULE = (
    "first candidate: no reviewed anomaly in the holdout, so the grid cannot be ranked by "
    "average precision"
)
SEARCH_RULE = "highest holdout average precision of the nested candidate runs (search_runs)"
SINGLE_RULE = "single candidate"


def select_candidate(
    train: pl.DataFrame,
    holdout: pl.DataFrame,
    labels: pl.DataFrame,
    *,
    params: TrainingParams,
    parent: TrackedRun,
    tracking: TrackingResource,
    symbol: str,
    dagster_run_id: str,
    watch: Stopwatch,
) -> Selection:
    """Fit every candidate of the grid; the best one on the reviewed holdout wins.

    With more than one candidate, each is logged as a nested MLflow run under ``parent``
    (tag ``mlflow.parentRunId``) with its parameters and holdout metrics, and the winner is
    the first run of ``MlflowClient.search_runs`` on that parent ordered by holdout average
    precision, descending, then by candidate index (ties go to the earlier candidate).
    Without a reviewed anomaly in the holdout (label-free) no AP can rank them: the first
    candidate wins (:data:`FIRST_CANDIDATE_RULE`). A grid of one is fitted and chosen
    without a nested run, so the default costs what a single fit costs.
    """
    from pipeline.domain import fx_anomaly

    grid = params.candidates()
    fitted = []
    for index, candidate in enumerate(grid):
        trial = dataclasses.replace(params, grid=(), **dataclasses.asdict(candidate))
        with watch("fit"):
            model = fx_anomaly.fit_spread_model(
                train,
                random_state=trial.random_state,
                contamination=trial.contamination,
                n_estimators=trial.n_estimators,
                max_samples=trial.max_samples or "auto",
            )
        with watch("evaluate"):
            scored = fx_anomaly.score_spreads(model, holdout)
            measured = fx_anomaly.holdout_comparison(scored, None, labels)
        fitted.append((trial, model, scored))
        if len(grid) > 1:
            with watch("mlflow"):
                _log_candidate(
                    index,
                    candidate,
                    measured,
                    parent=parent,
                    tracking=tracking,
                    symbol=symbol,
                    dagster_run_id=dagster_run_id,
                )
    if len(grid) == 1:
        return Selection(0, *fitted[0], rule=SINGLE_RULE)
    if measured["gate"] == fx_anomaly.LABEL_FREE:  # the labels are the same for every one
        return Selection(0, *fitted[0], rule=FIRST_CANDIDATE_RULE)
    with watch("mlflow"):
        best = best_candidate(tracking, parent, expected=len(grid))
    return Selection(best, *fitted[best], rule=SEARCH_RULE)


def _log_candidate(
    index: int,
    candidate: Candidate,
    measured: Mapping[str, float | str],
    *,
    parent: TrackedRun,
    tracking: TrackingResource,
    symbol: str,
    dagster_run_id: str,
) -> None:
    """One nested run under ``parent``: the candidate's parameters and holdout metrics."""
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    with tracking.start_run(
        experiment=EXPERIMENT,
        run_name=f"fx_spread_{symbol.lower()}_candidate_{index}",
        dagster_run_id=dagster_run_id,
        asset_key=keys.FX_CHALLENGER_MODEL.to_user_string(),
        partition_key=symbol,
        tags={"symbol": symbol, MLFLOW_PARENT_RUN_ID: parent.run_id, "candidate_index": str(index)},
    ) as run:
        run.log_params({**dataclasses.asdict(candidate), "candidate_index": index})
        run.log_metrics(
            _measured(
                {
                    "candidate_index": index,
                    **{
                        f"holdout_{k.removeprefix('challenger_')}": measured[k]
                        for k in (
                            "challenger_average_precision",
                            "challenger_precision",
                            "challenger_recall",
                            "challenger_anomaly_rate",
                        )
                    },
                }
            )
        )


def best_candidate(tracking: TrackingResource, parent: TrackedRun, *, expected: int) -> int:
    """Index of the nested run of ``parent`` with the highest holdout AP (ties: lowest index).

    Raises
    ------
    CandidateSearchError
        When MLflow does not return ``expected`` nested runs with a holdout AP.
    """
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    runs = tracking.client().search_runs(
        [parent.experiment_id],
        filter_string=f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent.run_id}'",
        order_by=["metrics.holdout_average_precision DESC", "metrics.candidate_index ASC"],
        max_results=max(expected, 1) + 10,
    )
    ranked = [r for r in runs if "holdout_average_precision" in r.data.metrics]
    if len(runs) != expected or len(ranked) != expected:
        raise CandidateSearchError(
            f"MLflow run {parent.run_id}: found {len(runs)} nested candidate run(s), "
            f"{len(ranked)} with a holdout average precision; logged {expected}"
        )
    return int(ranked[0].data.tags["candidate_index"])


def _log_and_register(
    run: TrackedRun,
    model: object,
    train: pl.DataFrame,
    *,
    symbol: str,
    params: dict[str, object],
    metrics: dict[str, float],
    windows: dict[str, str],
    version_tags: dict[str, str],
    tracking: TrackingResource,
    watch: Stopwatch,
) -> dict[str, str]:
    """Log into the open challenger run, then register the model and alias it ``challenger``.

    Parameters, metrics, the training reference and the model go into ``run``.

    ``watch`` times the MLflow block as ``mlflow`` and, within it, ``log_model``,
    ``register`` and ``alias``, so a slow registry shows up in the materialisation's
    metadata.
    """
    from pipeline.domain import fx_anomaly

    name = tracking.model_name(symbol)
    reference = io.BytesIO()
    np.savez_compressed(reference, **{c: train[c].to_numpy() for c in fx_anomaly.FEATURE_COLUMNS})
    with watch("mlflow"):
        run.log_params({**params, **windows, "features": ",".join(fx_anomaly.FEATURE_COLUMNS)})
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
