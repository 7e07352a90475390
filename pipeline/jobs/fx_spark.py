"""FX training and scoring on Spark: the local functions, run as Spark tasks.

Training is ``groupBy("symbol").applyInPandas``: one group per symbol, and the group's
task calls :func:`pipeline.jobs.fx_training.train_challenger` unchanged (fit, evaluate
against the champion on the held-out days, log with signature and input example,
register, alias ``challenger``). The task builds its own :class:`TrackingResource` from
the driver's fields, so it logs straight to the tracking server; the evaluation row comes
back to the driver as JSON. Logging from the tasks keeps one function on every path and
the driver free of per-symbol MLflow work; the comparison with fitting in the tasks and
logging from the driver is ``benchmarks.scale`` (README, "From laptop to cluster"): from 10
symbols on the driver's serial logging alone takes longer than the whole task-logging run,
and at 200 symbols collecting the fitted models overran the driver's default heap.

Scoring is ``mapInPandas`` over the scoring ticks repartitioned by symbol. Each symbol's
champion is resolved to a version on the driver (never a moving alias in a task); a task
loads each of its symbols' models once, by that version, computes the training-identical
features (the warm-up tail of :func:`pipeline.stores.fx.scoring_ticks` is shipped with the
ticks) and scores. Results are written by the driver exactly as the local path writes them.

Timestamps travel through Spark as int64 epoch values and are rebuilt with the driver's
polars schema in the task, so no session time zone can shift a feature (the hour of day
is one) and results equal the local path's.
"""

import datetime as dt
import json
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import polars as pl

from pipeline.audit import input_versions, with_audit
from pipeline.domain.errors import DomainError
from pipeline.jobs import fx_scoring, fx_training
from pipeline.resources.lake import LakeResource
from pipeline.resources.tracking import TrackingResource
from pipeline.stores import fx as store
from pipeline.timing import Stopwatch

_SCORED_SCHEMA = {
    "symbol": pl.String(),
    "date": pl.String(),
    "ts": pl.Datetime("us"),
    "bid": pl.Float64(),
    "ask": pl.Float64(),
    "spread": pl.Float64(),
    "rel_spread_bps": pl.Float64(),
    "anomaly_score": pl.Float64(),
    "is_anomaly": pl.Boolean(),
}


_INPUT = ("symbol", "date", "ts", "bid", "ask", "spread")


class SparkTaskDomainError(DomainError):
    """A domain error raised inside a Spark task, re-raised on the driver with its text."""


class UnsupportedBackendError(DomainError):
    """The FX assets run in process, on Spark or as a Databricks job; nothing else."""


def require_local_or_spark(backend: str, asset: str) -> None:
    """Raise :class:`UnsupportedBackendError` unless ``backend`` is ``local`` or ``spark``.

    The assets send ``databricks`` to :mod:`pipeline.jobs.fx_databricks` before asking.
    """
    if backend not in ("local", "spark"):
        raise UnsupportedBackendError(
            f"{asset} runs with COMPUTE=local, COMPUTE=spark or COMPUTE=databricks, not {backend!r}"
        )


def tracking_fields(tracking: TrackingResource) -> dict[str, Any]:
    """The configuration of a tracking resource, to rebuild it inside a task."""
    return {name: getattr(tracking, name) for name in type(tracking).model_fields}


def encode(frame: pl.DataFrame) -> tuple[Any, dict[str, pl.DataType]]:
    """A pandas frame Spark can carry unchanged, and the polars schema to decode it with.

    Datetime columns become their int64 epoch values in their own unit.
    """
    schema = dict(frame.schema)
    plain = frame.with_columns(
        pl.col(c).cast(pl.Int64) for c, t in schema.items() if isinstance(t, pl.Datetime)
    )
    return plain.to_pandas(), schema


def decode(pdf: Any, schema: Mapping[str, pl.DataType]) -> pl.DataFrame:
    """The polars frame :func:`encode` was given (columns of ``schema`` only)."""
    frame = (
        pl.from_pandas(pdf[list(schema)], nan_to_null=False)
        if len(pdf)
        else pl.DataFrame(schema=schema)
    )
    return frame.with_columns(
        pl.col(c).cast(pl.Int64).cast(t) if isinstance(t, pl.Datetime) else pl.col(c).cast(t)
        for c, t in schema.items()
    )


def _partitions(spark: Any, n_keys: int) -> int:
    try:
        parallelism = int(spark.sparkContext.defaultParallelism)
    except Exception:  # Spark Connect has no SparkContext
        parallelism = 8
    return max(1, min(n_keys, 2 * parallelism))


def train_challengers(
    spark: Any,
    symbols: Sequence[str],
    *,
    lake: LakeResource,
    params: fx_training.TrainingParams,
    tracking: TrackingResource,
    dagster_run_id: str,
) -> list[dict]:
    """Train one challenger per symbol, one Spark group (task) per symbol.

    Returns
    -------
    list of dict
        :func:`~pipeline.jobs.fx_training.train_challenger`'s result per symbol, in the
        order of ``symbols``.

    Raises
    ------
    SparkTaskDomainError
        Naming every symbol whose task raised a domain error, with its message.
    """
    import pandas as pd

    ticks = pl.concat([store.read_symbol_ticks(lake, s) for s in symbols], how="vertical")
    incidents = {s: store.read_incidents(lake, s) for s in symbols}
    pdf, schema = encode(ticks)
    fields, tracking_class = tracking_fields(tracking), type(tracking)
    tracking.experiment_id(fx_training.EXPERIMENT)  # created once, not raced by tasks

    def train_group(key: tuple, group: Any) -> Any:
        symbol = str(key[0])
        try:
            row = fx_training.train_challenger(
                decode(group, schema).sort("ts"),
                incidents[symbol],
                symbol=symbol,
                params=params,
                tracking=tracking_class(**fields),
                dagster_run_id=dagster_run_id,
            )
        except DomainError as exc:
            return pd.DataFrame({"symbol": [symbol], "result": [""], "error": [str(exc)]})
        row = {**row, "evaluated_at": row["evaluated_at"].isoformat()}
        return pd.DataFrame({"symbol": [symbol], "result": [json.dumps(row)], "error": [""]})

    frame = spark.createDataFrame(pdf).repartition(_partitions(spark, len(symbols)), "symbol")
    rows = (
        frame.groupBy("symbol")
        .applyInPandas(train_group, schema="symbol string, result string, error string")
        .collect()
    )
    errors = [f"fx symbol {r['symbol']}: {r['error']}" for r in rows if r["error"]]
    if errors:
        raise SparkTaskDomainError("; ".join(sorted(errors)))
    results = {r["symbol"]: json.loads(r["result"]) for r in rows}
    for result in results.values():
        result["evaluated_at"] = dt.datetime.fromisoformat(result["evaluated_at"])
    return [results[s] for s in symbols]


def score_symbols(
    spark: Any,
    by_symbol: Mapping[str, Sequence[str]],
    *,
    lake: LakeResource,
    tracking: TrackingResource,
    dagster_run_id: str,
    watch: Stopwatch | None = None,
) -> tuple[dict[str, str], dict[str, pl.DataFrame]]:
    """Score the requested days of every symbol with its champion, as Spark tasks.

    Parameters
    ----------
    by_symbol
        Requested dates per symbol.

    Returns
    -------
    tuple of (champion version per symbol, scored rows per symbol)
        Both as :func:`pipeline.jobs.fx_scoring.score_symbol_days` returns them, written
        to ``gold/fx_anomaly_scores`` with one commit per symbol.

    Raises
    ------
    NoChampionError
        When a symbol has no champion.
    """
    watch = watch or Stopwatch()
    with watch("load_model"):
        versions, run_ids = {}, {}
        for symbol in by_symbol:
            champion = tracking.alias_version(tracking.model_name(symbol), store.CHAMPION)
            if champion is None:
                raise fx_scoring.NoChampionError(
                    f"fx symbol {symbol}: model {tracking.model_name(symbol)} has no "
                    "`champion`; promote one"
                )
            versions[symbol], run_ids[symbol] = str(champion.version), champion.run_id
    with watch("read"):
        inputs = input_versions(lake, "curated/fx_spreads")
        ticks = pl.concat(
            [store.scoring_ticks(lake, s, list(d)).select(_INPUT) for s, d in by_symbol.items()]
        )
    with watch("score"):
        scored = _score_on_spark(spark, ticks, by_symbol, versions, tracking)
    out: dict[str, pl.DataFrame] = {}
    with watch("write"):
        for symbol, dates in by_symbol.items():
            rows = scored.filter(pl.col("symbol") == symbol).sort("ts")
            out[symbol] = with_audit(
                rows.select(
                    *fx_scoring.SCORE_COLUMNS, pl.lit(versions[symbol]).alias("model_version")
                ),
                dagster_run_id=dagster_run_id,
                inputs=inputs,
                mlflow_run_id=run_ids[symbol],
            )
            lake.overwrite_partitions(
                "gold",
                "fx_anomaly_scores",
                out[symbol],
                [{"symbol": symbol, "date": d} for d in dates],
            )
    return versions, out


def _score_on_spark(
    spark: Any,
    ticks: pl.DataFrame,
    by_symbol: Mapping[str, Sequence[str]],
    versions: Mapping[str, str],
    tracking: TrackingResource,
) -> pl.DataFrame:
    """``mapInPandas`` over the ticks repartitioned by symbol; scored rows of requested days."""
    pdf, schema = encode(ticks)
    fields, tracking_class = tracking_fields(tracking), type(tracking)
    dates = {s: list(d) for s, d in by_symbol.items()}
    versions = dict(versions)
    out_schema = ", ".join(f"{c} {_SPARK_TYPES[type(t)]}" for c, t in _SCORED_SCHEMA.items())

    def score_partition(batches: Iterator[Any]) -> Iterator[Any]:
        import pandas as pd

        from pipeline.domain import fx_anomaly

        task_tracking = tracking_class(**fields)
        # a symbol's rows may span several Arrow batches; its features need them all
        parts = list(batches)
        if not parts:
            return
        frame = decode(pd.concat(parts, ignore_index=True), schema)
        for (symbol,), ticks_ in frame.group_by("symbol", maintain_order=True):
            ticks_ = ticks_.sort("ts")
            # once per task and symbol, by the version the driver resolved
            model = task_tracking.load_sklearn(
                task_tracking.model_name(str(symbol)), version=versions[str(symbol)]
            )
            features = fx_anomaly.spread_features(ticks_.select(fx_anomaly.TICK_COLUMNS))
            features = features.with_columns(ticks_["date"]).filter(
                pl.col("date").is_in(dates[str(symbol)])
            )
            scored = fx_anomaly.score_spreads(model, features)
            yield encode(scored.select(list(_SCORED_SCHEMA)))[0]

    frame = spark.createDataFrame(pdf).repartition(_partitions(spark, len(dates)), "symbol")
    result = frame.mapInPandas(score_partition, schema=out_schema).toPandas()
    return decode(result, _SCORED_SCHEMA)


_SPARK_TYPES = {
    pl.String: "string",
    pl.Datetime: "long",
    pl.Float64: "double",
    pl.Boolean: "boolean",
}
