"""FX training and scoring on Databricks: the local functions, run as one Databricks job.

Each asset run is one Databricks run of :mod:`pipeline.remote.fx_job` through Dagster
Pipes (:meth:`pipeline.resources.compute.ComputeResource.run_databricks_job`), with the
project's wheel installed on the cluster (``DATABRICKS_WHEEL``: a path from ``pipeline
deploy``, or ``build``). The job calls :func:`pipeline.jobs.fx_training.train_challenger`
per symbol, or :func:`pipeline.jobs.fx_scoring.score_days` per symbol and model version,
exactly as the local path does; this module reads the inputs from the lake on the
driver, hands them over as parquet files, and writes what comes back through the lake as
the local path writes it.

For scoring, every champion is resolved to a version here, on the driver, and the job
loads that version: the moving alias is never read inside the job.
"""

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import polars as pl

from pipeline import keys
from pipeline.audit import input_versions
from pipeline.domain.errors import DomainError
from pipeline.jobs import fx_scoring, fx_training
from pipeline.resources.compute import ComputeError, ComputeResource
from pipeline.resources.lake import LakeResource
from pipeline.resources.tracking import TrackingResource
from pipeline.stores import fx as store
from pipeline.timing import Stopwatch


class DatabricksJobDomainError(DomainError):
    """A domain error raised inside the Databricks job, re-raised here with its text."""


def _job() -> Any:
    from pipeline.remote import fx_job

    return fx_job


def _require_wheel(compute: ComputeResource, asset: str) -> None:
    if not compute.databricks_wheel:
        raise ComputeError(
            f"{asset} on COMPUTE=databricks runs from the project's wheel (it needs MLflow "
            "and scikit-learn on the cluster, which the code bundle does not carry): set "
            "DATABRICKS_WHEEL to a path from `pipeline deploy`, or to `build`"
        )


def train_challengers(
    context: Any,
    compute: ComputeResource,
    *,
    lake: LakeResource,
    params: fx_training.TrainingParams,
    tracking: TrackingResource,
) -> list[dict]:
    """Train one challenger per symbol of the run, all in one Databricks run.

    Returns
    -------
    list of dict
        :func:`~pipeline.jobs.fx_training.train_challenger`'s result per symbol, in the
        order of ``context.partition_keys``.

    Raises
    ------
    DatabricksJobDomainError
        Naming every symbol whose training raised a domain error in the job.
    ComputeError
        When the run cannot be started, fails, or returns no (or a corrupt) output.
    """
    job, symbols = _job(), list(context.partition_keys)
    asset = keys.FX_CHALLENGER_MODEL.to_user_string()
    _require_wheel(compute, asset)
    tracking.experiment_id(fx_training.EXPERIMENT)  # created once here, as on Spark
    inputs = {}
    for symbol in symbols:
        inputs[job.ticks_file(symbol)] = job.encode_frame(store.read_symbol_ticks(lake, symbol))
        inputs[job.incidents_file(symbol)] = job.encode_frame(store.read_incidents(lake, symbol))
    result = compute.run_databricks_job(
        context,
        script=Path(job.__file__).name,
        run_name=f"{asset} {_names(symbols)}",
        inputs=inputs,
        outputs=(job.EVALUATIONS_FILE,),
        extras={
            "mode": "train",
            "symbols": list(symbols),
            "params": dataclasses.asdict(params),
            "tracking": job.tracking_settings(tracking),
        },
    )
    _log_run(context, result)
    evaluations, errors = job.decode_evaluations(result.outputs[job.EVALUATIONS_FILE])
    if errors:
        raise DatabricksJobDomainError(
            f"Databricks run {result.run_id}: "
            + "; ".join(f"fx symbol {s}: {m}" for s, m in sorted(errors.items()))
        )
    by_symbol = {e["symbol"]: e for e in evaluations}
    missing = [s for s in symbols if s not in by_symbol]
    if missing:
        raise ComputeError(f"Databricks run {result.run_id} returned no evaluation of {missing}")
    return [by_symbol[s] for s in symbols]


def score_symbols(
    context: Any,
    compute: ComputeResource,
    by_symbol: Mapping[str, Sequence[str]],
    *,
    lake: LakeResource,
    tracking: TrackingResource,
    dagster_run_id: str,
    watch: Stopwatch | None = None,
) -> tuple[dict[str, str], dict[str, pl.DataFrame]]:
    """Score the requested days of every symbol with its champion, in one Databricks run.

    Returns
    -------
    tuple of (champion version per symbol, scored rows per symbol)
        As :func:`pipeline.jobs.fx_scoring.score_symbol_days` returns them, written to
        ``gold/fx_anomaly_scores`` with one commit per symbol.

    Raises
    ------
    NoChampionError
        When a symbol has no champion (before anything is submitted).
    """
    job, watch = _job(), watch or Stopwatch()
    asset = keys.FX_ANOMALY_SCORES.to_user_string()
    _require_wheel(compute, asset)
    with watch("load_model"):  # resolved here; the job loads these versions
        champions = {s: fx_scoring.champion_version(tracking, s) for s in by_symbol}
    with watch("read"):
        inputs = input_versions(lake, "curated/fx_spreads")
        ticks = {
            job.ticks_file(s): job.encode_frame(store.scoring_ticks(lake, s, list(d)))
            for s, d in by_symbol.items()
        }
    with watch("score"):
        result = compute.run_databricks_job(
            context,
            script=Path(job.__file__).name,
            run_name=f"{asset} {_names(by_symbol)}",
            inputs=ticks,
            outputs=(job.SCORES_FILE,),
            extras={
                "mode": "score",
                "symbols": list(by_symbol),
                "dates": {s: list(d) for s, d in by_symbol.items()},
                "versions": {s: version for s, (version, _) in champions.items()},
                "tracking": job.tracking_settings(tracking),
            },
        )
        _log_run(context, result)
        scored = job.decode_frame(result.outputs[job.SCORES_FILE])
    out = {}
    with watch("write"):
        for symbol, dates in by_symbol.items():
            version, run_id = champions[symbol]
            out[symbol] = fx_scoring.write_scores(
                lake,
                symbol,
                list(dates),
                scored.filter(pl.col("symbol") == symbol),
                version=version,
                mlflow_run_id=run_id,
                inputs=inputs,
                dagster_run_id=dagster_run_id,
            )
    return {s: version for s, (version, _) in champions.items()}, out


def _names(symbols: Sequence[str] | Mapping[str, Any]) -> str:
    names = list(symbols)
    return ",".join(names) if len(names) <= 5 else f"{names[0]}..{names[-1]} ({len(names)})"


def _log_run(context: Any, result: Any) -> None:
    message = result.message
    context.log.info(
        f"Databricks run {result.run_id} ({result.run_page_url}): fx {message.get('mode')} "
        f"of {len(message.get('symbols') or [])} symbol(s) in {message.get('seconds')} s, "
        f"platform from {message.get('pipeline_origin')}"
    )
