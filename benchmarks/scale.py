"""FX training and scoring from one symbol to many: in process against Spark ``local[2]``.

Run ``python -m benchmarks.scale`` (1, 10, 50 and 200 symbols), ``--sizes 1,10,50`` (any
series of two or more sizes) or ``--quick`` (1 and 4); ``--skip-scoring`` runs the training
series only, ``--out`` writes the results elsewhere.
Data: :func:`benchmarks.fx_models.build_platform` (8 days, 4,000 ticks per symbol for
training), one fresh ``PIPELINE_HOME`` per path and size, so both paths register into empty
stores. One Spark ``local[2]`` session serves the whole run.

Measured and printed, in this order (results are written after each step, so an interrupted
run leaves what it measured):

c. scoring, first, on its own platform: 4 symbols x 48,000 ticks, the last 4 days scored
   (24,000 rows per symbol), champions trained in process. Both paths get the same ticks,
   the same champion versions, the same partitioning and
   ``spark.sql.execution.arrow.maxRecordsPerBatch`` = 1,000, so each symbol spans about 24
   Arrow batches: :func:`fx_spark._score_on_spark` (the project's task: each symbol's
   champion loaded once per task) against the migrated pattern (the champion loaded again
   for every Arrow batch; features over the whole symbol, as they must be). Their scores are
   checked equal. Each path runs once as a warm-up (reported, not judged), then
   ``SCORING_REPEATS`` times alternately; the best timed run counts. Then
   :func:`fx_spark.score_symbols` runs once, with its driver phases (champion lookup, Delta
   read, Spark scoring, one Delta commit per symbol and day) reported;
a. training, seconds per symbol, in process (``train_challenger`` per symbol) and on Spark
   (:func:`pipeline.jobs.fx_spark.train_challengers`, logging from the tasks), after a
   warm-up run of 2 symbols (one per core slot) that is reported but not counted;
b. the alternative the Spark path did not take, fitting in the tasks and logging from the
   driver: the fit-only tasks are timed, and the driver's serial share is the summed MLflow
   and champion phases the tasks reported (what the driver would have to do one by one).
   When the fit-only run fails (at 200 symbols the pickled models overflowed the driver's
   default JVM heap), its error is recorded instead and the series goes on.

Targets (exit status 1 when one fails): the cost per symbol at the largest size is within
1.3x of the cost at the second largest, on each path; scoring throughput >= 2x the
migrated pattern's. The claims-ingest growth series is :mod:`benchmarks.claims_scale`.
"""

import argparse
import json
import os
import pickle
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import polars as pl

from benchmarks import fx_models

RESULTS = Path(__file__).resolve().parent / "results" / "scale.json"
SIZES, QUICK_SIZES = (1, 10, 50, 200), (1, 4)
TICKS_PER_SYMBOL = 4_000
WARMUP_SYMBOLS = 2  # one per core slot of local[2], so every Python worker is warm
SCORING_SYMBOLS, SCORING_TICKS_PER_SYMBOL, SCORED_DAYS = 4, 48_000, 4  # 24,000 rows each
MAX_RECORDS_PER_BATCH = 1_000  # spark.sql.execution.arrow.maxRecordsPerBatch, both paths
SCORING_REPEATS = 2
GROWTH_TARGET, SCORING_TARGET = 1.3, 2.0


def spark_session() -> Any:
    from pipeline.resources.compute import ComputeResource

    # ``spark.pyspark.python`` in the session config is read by spark-submit only; a session
    # built inside a running interpreter starts its workers with $PYSPARK_PYTHON, else the
    # ``python3`` on PATH, which need not be this environment
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)

    return ComputeResource(backend="spark").spark_session()


def platform(
    root: Path, n: int, ticks: int = TICKS_PER_SYMBOL, name: str = "home"
) -> dict[str, Any]:
    fx_models.TICKS_PER_SYMBOL = ticks
    return fx_models.build_platform(root / f"{name}-{n}", n)


def train_local(plat: dict[str, Any]) -> tuple[float, list[dict]]:
    from pipeline.jobs import fx_training
    from pipeline.stores import fx as store

    r, params = plat["resources"], fx_training.TrainingParams()
    started = time.perf_counter()
    rows = [
        fx_training.train_challenger(
            store.read_symbol_ticks(r["lake"], s),
            store.read_incidents(r["lake"], s),
            symbol=s,
            params=params,
            tracking=r["tracking"],
            dagster_run_id="bench-local",
        )
        for s in plat["symbols"]
    ]
    return time.perf_counter() - started, rows


def train_spark(plat: dict[str, Any], spark: Any) -> tuple[float, list[dict]]:
    from pipeline.jobs import fx_spark, fx_training

    r = plat["resources"]
    started = time.perf_counter()
    rows = fx_spark.train_challengers(
        spark,
        plat["symbols"],
        lake=r["lake"],
        params=fx_training.TrainingParams(),
        tracking=r["tracking"],
        dagster_run_id="bench-spark",
    )
    return time.perf_counter() - started, rows


def fit_only_spark(plat: dict[str, Any], spark: Any) -> float:
    """Features, fit and evaluation in the tasks; the pickled model back to the driver."""
    import pandas as pd

    from pipeline.domain import fx_anomaly
    from pipeline.jobs import fx_spark
    from pipeline.stores import fx as store

    r = plat["resources"]
    ticks = pl.concat([store.read_symbol_ticks(r["lake"], s) for s in plat["symbols"]])
    pdf, schema = fx_spark.encode(ticks)

    def fit(key: tuple, group: Any) -> Any:
        frame = fx_spark.decode(group, schema).sort("ts")
        features = fx_anomaly.spread_features(frame.select(fx_anomaly.TICK_COLUMNS))
        dates = sorted(frame["date"].unique().to_list())
        train = features.with_columns(frame["date"]).filter(pl.col("date").is_in(dates[:-3]))
        model = fx_anomaly.fit_spread_model(train)
        return pd.DataFrame({"symbol": [key[0]], "model": [pickle.dumps(model)]})

    started = time.perf_counter()
    frame = spark.createDataFrame(pdf).repartition(
        fx_spark._partitions(spark, len(plat["symbols"])), "symbol"
    )
    frame.groupBy("symbol").applyInPandas(fit, schema="symbol string, model binary").collect()
    return time.perf_counter() - started


def promote_all(plat: dict[str, Any]) -> None:
    tracking = plat["resources"]["tracking"]
    for s in plat["symbols"]:
        name = tracking.model_name(s)
        tracking.set_alias(name, "champion", tracking.alias_version(name, "challenger").version)


def scoring_inputs(plat: dict[str, Any]) -> tuple[pl.DataFrame, dict, dict]:
    """The scoring ticks (with their warm-up tail), requested days and champion versions."""
    from pipeline.jobs import fx_spark
    from pipeline.stores import fx as store

    r = plat["resources"]
    tracking = r["tracking"]
    by_symbol = {s: list(fx_models.DAYS[-SCORED_DAYS:]) for s in plat["symbols"]}
    versions = {
        s: str(tracking.alias_version(tracking.model_name(s), "champion").version)
        for s in plat["symbols"]
    }
    ticks = pl.concat(
        [store.scoring_ticks(r["lake"], s, d).select(fx_spark._INPUT) for s, d in by_symbol.items()]
    )
    return ticks, by_symbol, versions


def score_ours(plat: dict[str, Any], spark: Any, inputs: tuple) -> tuple[float, pl.DataFrame]:
    """The project's scoring task (:func:`fx_spark._score_on_spark`): one load per task, symbol."""
    from pipeline.jobs import fx_spark

    ticks, by_symbol, versions = inputs
    started = time.perf_counter()
    out = fx_spark._score_on_spark(spark, ticks, by_symbol, versions, plat["resources"]["tracking"])
    return time.perf_counter() - started, out.select("symbol", "ts", "anomaly_score")


def score_per_batch(
    plat: dict[str, Any], spark: Any, inputs: tuple
) -> tuple[float, pl.DataFrame, int]:
    """The migrated pattern: the champion is loaded again for every Arrow batch.

    Same input, same partitioning and the same features as :func:`score_ours` (a symbol's
    features need all its rows, so they are computed over the whole symbol); the only
    difference is that the rows of each incoming Arrow batch are scored with a model
    loaded for that batch. Returns seconds, the scored rows and the number of model loads.
    """
    import pandas as pd

    from pipeline.jobs import fx_spark

    ticks, by_symbol, versions = inputs
    tracking = plat["resources"]["tracking"]
    fields, cls = fx_spark.tracking_fields(tracking), type(tracking)
    dates = {s: list(d) for s, d in by_symbol.items()}
    pdf, schema = fx_spark.encode(ticks)

    def score(batches: Any) -> Any:
        from pipeline.domain import fx_anomaly

        task_tracking = cls(**fields)
        parts = [b.assign(_batch=i) for i, b in enumerate(batches)]
        if not parts:
            return
        whole = pd.concat(parts, ignore_index=True)
        frame = fx_spark.decode(whole, schema).with_columns(pl.Series("_batch", whole["_batch"]))
        for (symbol,), ticks_ in frame.group_by("symbol", maintain_order=True):
            ticks_ = ticks_.sort("ts")
            features = fx_anomaly.spread_features(ticks_.select(fx_anomaly.TICK_COLUMNS))
            features = features.with_columns(ticks_["date"], ticks_["_batch"]).filter(
                pl.col("date").is_in(dates[str(symbol)])
            )
            for (_,), part in features.group_by("_batch", maintain_order=True):
                # once per Arrow batch and symbol
                model = task_tracking.load_sklearn(
                    task_tracking.model_name(str(symbol)), version=versions[str(symbol)]
                )
                out = fx_anomaly.score_spreads(model, part.drop("_batch"))
                out = out.select("symbol", pl.col("ts").cast(pl.Int64), "anomaly_score")
                yield out.with_columns(loads=pl.lit(1) * (pl.int_range(pl.len()) == 0)).to_pandas()

    started = time.perf_counter()
    frame = spark.createDataFrame(pdf).repartition(
        fx_spark._partitions(spark, len(dates)), "symbol"
    )
    result = frame.mapInPandas(
        score, schema="symbol string, ts long, anomaly_score double, loads int"
    ).toPandas()
    seconds = time.perf_counter() - started
    out = pl.from_pandas(result).with_columns(pl.col("ts").cast(pl.Datetime("us")))
    return seconds, out.drop("loads"), int(out["loads"].sum())


def max_score_difference(a: pl.DataFrame, b: pl.DataFrame) -> float:
    """Largest absolute score difference of two scorings of the same rows (raises if not)."""
    a, b = a.sort("symbol", "ts"), b.sort("symbol", "ts")
    if a.height != b.height or not a["ts"].equals(b["ts"]) or not a["symbol"].equals(b["symbol"]):
        raise AssertionError("the two scoring paths did not score the same rows")
    return float((a["anomaly_score"] - b["anomaly_score"]).abs().max())


def scoring(spark: Any, root: Path) -> dict[str, Any]:
    """Both scoring paths on the same rows: a warm-up run each, then ``SCORING_REPEATS`` timed."""
    from pipeline.jobs import fx_spark
    from pipeline.timing import Stopwatch

    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", str(MAX_RECORDS_PER_BATCH))
    plat = platform(root, SCORING_SYMBOLS, SCORING_TICKS_PER_SYMBOL, name="scoring")
    train_local(plat)
    promote_all(plat)
    inputs = scoring_inputs(plat)
    results: dict[str, Any] = {
        "symbols": SCORING_SYMBOLS,
        "ticks_per_symbol": SCORING_TICKS_PER_SYMBOL,
        "scored_days": SCORED_DAYS,
        "input_rows_with_warmup_tail": inputs[0].height,
        "max_records_per_batch": MAX_RECORDS_PER_BATCH,
        "load_before": os.getloadavg(),
    }
    warm_ours, ours = score_ours(plat, spark, inputs)
    warm_theirs, theirs, loads = score_per_batch(plat, spark, inputs)
    rows = ours.height
    results["rows"] = rows
    results["warmup_s"] = {"ours": warm_ours, "per_batch": warm_theirs}
    timed: dict[str, list[float]] = {"ours": [], "per_batch": []}
    diff = max_score_difference(ours, theirs)
    for _ in range(SCORING_REPEATS):
        seconds, again = score_ours(plat, spark, inputs)
        timed["ours"].append(seconds)
        diff = max(diff, max_score_difference(ours, again))
        seconds, again, loads = score_per_batch(plat, spark, inputs)
        timed["per_batch"].append(seconds)
        diff = max(diff, max_score_difference(ours, again))
    best = {k: min(v) for k, v in timed.items()}
    results["timed_s"] = timed
    results["model_loads"] = {"ours": SCORING_SYMBOLS, "per_batch": loads}
    results["max_abs_score_difference"] = diff
    results["warmup_rows_per_s"] = {k: rows / v for k, v in results["warmup_s"].items()}
    results["rows_per_s"] = rows / best["ours"]
    results["per_batch_rows_per_s"] = rows / best["per_batch"]
    results["ratio"] = best["per_batch"] / best["ours"]
    # where the old end-to-end figure went: the asset's path with its driver phases
    watch = Stopwatch()
    fx_spark.score_symbols(
        spark,
        inputs[1],
        lake=plat["resources"]["lake"],
        tracking=plat["resources"]["tracking"],
        dagster_run_id="benchmark",
        watch=watch,
    )
    results["score_symbols_phases_s"] = watch.seconds()
    results["load_after"] = os.getloadavg()
    return results


def training(spark: Any, root: Path, n: int) -> dict[str, Any]:
    """Training of ``n`` symbols in process and on Spark; the driver-logging alternative."""
    local, sparked = platform(root / "local", n), platform(root / "spark", n)
    load_before = os.getloadavg()
    local_s, _ = train_local(local)
    spark_s, rows = train_spark(sparked, spark)
    serial = sum(
        row["seconds"].get("mlflow", 0) + row["seconds"].get("champion", 0) for row in rows
    )
    try:
        fit: float | None = fit_only_spark(sparked, spark)
    except Exception as exc:  # e.g. the driver's JVM heap, collecting every pickled model
        fit, fit_error = None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
    else:
        fit_error = None
    return {
        "local_s": local_s,
        "spark_s": spark_s,
        "local_s_per_symbol": local_s / n,
        "spark_s_per_symbol": spark_s / n,
        "driver_logging": {
            "tasks_log_s": spark_s,
            "fit_only_tasks_s": fit,
            "fit_only_error": fit_error,
            "driver_serial_logging_s": serial,
            "driver_logging_total_s": None if fit is None else fit + serial,
        },
        "load_before": load_before,
        "load_after": os.getloadavg(),
    }


def write(results: dict[str, Any], path: Path = RESULTS) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scale")
    parser.add_argument("--quick", action="store_true", help="sizes 1 and 4")
    parser.add_argument(
        "--sizes", help="comma-separated symbol counts, e.g. 1,10,50 (default 1,10,50,200)"
    )
    parser.add_argument("--skip-scoring", action="store_true", help="training series only")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"default {RESULTS}")
    args = parser.parse_args(argv)
    if args.sizes:
        sizes = tuple(sorted({int(x) for x in args.sizes.split(",") if x.strip()}))
    else:
        sizes = QUICK_SIZES if args.quick else SIZES
    if len(sizes) < 2 or sizes[0] < 1:
        parser.error("--sizes needs at least two positive symbol counts")
    results: dict[str, Any] = {
        "sizes": list(sizes),
        "completed_sizes": [],
        "load_start": os.getloadavg(),
    }
    started = time.perf_counter()
    spark = spark_session()
    spark.range(1).collect()
    results["spark_session_start_s"] = time.perf_counter() - started
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        root = Path(tmp)
        sc = None if args.skip_scoring else scoring(spark, root / "scoring")
        results["scoring"] = sc
        write(results, args.out)
        if sc:
            print(
                f"scoring {sc['rows']:,} rows ({sc['symbols']} symbols, maxRecordsPerBatch "
                f"{sc['max_records_per_batch']:,}; model loads {sc['model_loads']['ours']} vs "
                f"{sc['model_loads']['per_batch']}; max |score difference| "
                f"{sc['max_abs_score_difference']:.3g}): warm-up run "
                f"{sc['warmup_s']['ours']:.1f} s "
                f"vs {sc['warmup_s']['per_batch']:.1f} s; timed (best of {SCORING_REPEATS}) "
                f"{sc['rows_per_s']:,.0f} rows/s vs per-batch {sc['per_batch_rows_per_s']:,.0f} "
                f"rows/s, ratio {sc['ratio']:.2f}; score_symbols phases "
                f"{sc['score_symbols_phases_s']}; load {sc['load_before'][0]:.1f}",
                flush=True,
            )
        # warm-up, not counted: imports and the first MLflow store opens, in process and
        # in one Python worker per core slot of local[2]
        warm = training(spark, root / "warmup", WARMUP_SYMBOLS)
        results["training_warmup"] = warm
        print(
            f"warm-up ({WARMUP_SYMBOLS} symbols, not counted): local {warm['local_s']:.1f} s, "
            f"spark {warm['spark_s']:.1f} s",
            flush=True,
        )
        per_size: dict[str, Any] = {}
        results["training"] = per_size
        for n in sizes:
            per_size[str(n)] = t = training(spark, root / f"n{n}", n)
            results["completed_sizes"].append(n)
            write(results, args.out)
            d = t["driver_logging"]
            variant = (
                f"failed ({d['fit_only_error']})"
                if d["fit_only_tasks_s"] is None
                else f"{d['driver_logging_total_s']:.1f} s (fit-only tasks "
                f"{d['fit_only_tasks_s']:.1f} s + serial logging "
                f"{d['driver_serial_logging_s']:.1f} s)"
            )
            print(
                f"{n:>4} symbols: local {t['local_s_per_symbol']:.2f} s/symbol, "
                f"spark {t['spark_s_per_symbol']:.2f} s/symbol; driver-logging variant "
                f"{variant} vs tasks logging {d['tasks_log_s']:.1f} s; "
                f"load {t['load_before'][0]:.1f}",
                flush=True,
            )
    results["training_s_per_symbol"] = {
        p: {k: v[f"{p}_s_per_symbol"] for k, v in per_size.items()} for p in ("local", "spark")
    }
    big, second = str(sizes[-1]), str(sizes[-2])
    growth = {p: v[big] / v[second] for p, v in results["training_s_per_symbol"].items()}
    results["growth"] = growth
    results["load_end"] = os.getloadavg()
    print(f"cost per symbol {big} vs {second}: {growth} (target <= {GROWTH_TARGET})")
    write(results, args.out)
    failed = [p for p, g in growth.items() if g > GROWTH_TARGET]
    if sc and sc["ratio"] < SCORING_TARGET:
        failed.append("scoring")
    print("PASS" if not failed else f"FAIL: {failed}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
