"""FX training and scoring from one symbol to many: in process against Spark ``local[2]``.

Run ``python -m benchmarks.scale`` (1, 10, 50 and 200 symbols) or ``--quick`` (1 and 4).
Data: :func:`benchmarks.fx_models.build_platform` (8 days, 4,000 ticks per symbol here),
one fresh ``PIPELINE_HOME`` per path and size, so both paths register into empty stores.

Measured and printed:

a. training, seconds per symbol, in process (``train_challenger`` per symbol) and on Spark
   (:func:`pipeline.jobs.fx_spark.train_challengers`, logging from the tasks);
b. the alternative the Spark path did not take, fitting in the tasks and logging from the
   driver: the fit-only tasks are timed, and the driver's serial share is the summed MLflow
   and champion phases the tasks reported (what the driver would have to do one by one);
c. scoring every symbol's last 2 days with its champion: :func:`fx_spark.score_symbols`
   (model loaded once per task and symbol) against the migrated pattern (model loaded in
   every Arrow batch), rows per second.

Targets (exit status 1 when one fails): the cost per symbol at the largest size is within
1.3x of the cost at the second largest, on each path; scoring throughput >= 2x the
migrated pattern's. The claims-ingest growth series is not measured here (see the README).
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
GROWTH_TARGET, SCORING_TARGET = 1.3, 2.0


def spark_session() -> Any:
    from pipeline.resources.compute import ComputeResource

    return ComputeResource(backend="spark").spark_session()


def platform(root: Path, n: int) -> dict[str, Any]:
    fx_models.TICKS_PER_SYMBOL = TICKS_PER_SYMBOL
    return fx_models.build_platform(root / f"home-{n}", n)


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
    frame = spark.createDataFrame(pdf).repartition(4, "symbol")
    frame.groupBy("symbol").applyInPandas(fit, schema="symbol string, model binary").collect()
    return time.perf_counter() - started


def promote_all(plat: dict[str, Any]) -> None:
    tracking = plat["resources"]["tracking"]
    for s in plat["symbols"]:
        name = tracking.model_name(s)
        tracking.set_alias(name, "champion", tracking.alias_version(name, "challenger").version)


def score_spark(plat: dict[str, Any], spark: Any) -> tuple[float, int]:
    from pipeline.jobs import fx_spark

    r = plat["resources"]
    by_symbol = {s: list(fx_models.DAYS[-2:]) for s in plat["symbols"]}
    started = time.perf_counter()
    _, scored = fx_spark.score_symbols(
        spark, by_symbol, lake=r["lake"], tracking=r["tracking"], dagster_run_id="benchmark"
    )
    return time.perf_counter() - started, sum(f.height for f in scored.values())


def score_per_batch(plat: dict[str, Any], spark: Any) -> tuple[float, int]:
    """The migrated pattern: every Arrow batch loads its symbols' champions again."""
    from pipeline.domain import fx_anomaly
    from pipeline.jobs import fx_spark
    from pipeline.stores import fx as store

    r = plat["resources"]
    tracking = r["tracking"]
    fields, cls = fx_spark.tracking_fields(tracking), type(tracking)
    versions = {
        s: str(tracking.alias_version(tracking.model_name(s), "champion").version)
        for s in plat["symbols"]
    }
    ticks = pl.concat(
        [
            store.scoring_ticks(r["lake"], s, list(fx_models.DAYS[-2:])).select(fx_spark._INPUT)
            for s in plat["symbols"]
        ]
    )
    pdf, schema = fx_spark.encode(ticks)

    def score(batches: Any) -> Any:
        task_tracking = cls(**fields)
        for batch in batches:
            frame = fx_spark.decode(batch, schema)
            for (symbol,), part in frame.group_by("symbol"):
                model = task_tracking.load_sklearn(
                    task_tracking.model_name(symbol), version=versions[symbol]
                )
                features = fx_anomaly.spread_features(
                    part.sort("ts").select(fx_anomaly.TICK_COLUMNS)
                )
                out = fx_anomaly.score_spreads(model, features)
                yield out.select("symbol", "anomaly_score").to_pandas()

    started = time.perf_counter()
    frame = spark.createDataFrame(pdf).repartition(4, "symbol")
    rows = frame.mapInPandas(score, schema="symbol string, anomaly_score double").count()
    return time.perf_counter() - started, rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scale")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    sizes = QUICK_SIZES if args.quick else SIZES
    spark = spark_session()
    results: dict[str, Any] = {"sizes": list(sizes), "load_start": os.getloadavg()}
    training: dict[str, dict[str, float]] = {"local": {}, "spark": {}}
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        for n in sizes:
            local, sparked = platform(Path(tmp) / "local", n), platform(Path(tmp) / "spark", n)
            seconds, _ = train_local(local)
            training["local"][str(n)] = seconds / n
            seconds, rows = train_spark(sparked, spark)
            training["spark"][str(n)] = seconds / n
            serial = sum(
                row["seconds"].get("mlflow", 0) + row["seconds"].get("champion", 0) for row in rows
            )
            fit = fit_only_spark(sparked, spark)
            results.setdefault("driver_logging", {})[str(n)] = {
                "tasks_log_s": seconds,
                "fit_only_tasks_s": fit,
                "driver_serial_logging_s": serial,
                "driver_logging_total_s": fit + serial,
            }
            print(
                f"{n:>4} symbols: local {training['local'][str(n)]:.2f} s/symbol, "
                f"spark {training['spark'][str(n)]:.2f} s/symbol; driver-logging variant "
                f"{fit + serial:.1f} s vs tasks logging {seconds:.1f} s",
                flush=True,
            )
        promote_all(sparked)
        ours, rows = score_spark(sparked, spark)
        theirs, rows_theirs = score_per_batch(sparked, spark)
    results["training_s_per_symbol"] = training
    results["scoring"] = {
        "symbols": sizes[-1],
        "rows": rows,
        "rows_per_s": rows / ours,
        "per_batch_rows_per_s": rows_theirs / theirs,
        "ratio": (rows / ours) / (rows_theirs / theirs),
    }
    big, second = str(sizes[-1]), str(sizes[-2])
    growth = {p: training[p][big] / training[p][second] for p in training}
    results["growth"] = growth
    results["load_end"] = os.getloadavg()
    print(f"scoring {rows:,} rows: {results['scoring']}")
    print(f"cost per symbol {big} vs {second}: {growth}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    failed = [p for p, g in growth.items() if g > GROWTH_TARGET]
    if results["scoring"]["ratio"] < SCORING_TARGET:
        failed.append("scoring")
    print("PASS" if not failed else f"FAIL: {failed}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
