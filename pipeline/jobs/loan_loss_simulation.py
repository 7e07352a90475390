"""Simulate one valuation date's loss distribution under every macro scenario.

For each scenario the book is simulated under the one-factor Gaussian copula
(:mod:`pipeline.domain.loan_loss`), in chunks on the configured compute backend: in
this process, as Spark tasks (``mapInPandas`` over chunk ids) or as one Databricks run
of :mod:`pipeline.remote.loan_loss_job` through Dagster Pipes, always over the same
chunks, so the same seed gives the same losses.
"""

import dataclasses
import datetime as dt
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from pipeline import keys
from pipeline.resources.compute import ComputeError, ComputeResource
from pipeline.resources.lake import LakeResource
from pipeline.resources.tracking import TrackingResource
from pipeline.stores import loan_loss as store

SUMMARY_COLUMNS = (
    "expected_loss",
    "std",
    "p10",
    "p50",
    "p90",
    "var_99",
    "var_999",
    "es_99",
    "es_999",
)


def simulate_scenario(
    compute: ComputeResource,
    book: "object",
    *,
    pd_multiplier: float,
    rho: float,
    n_sims: int,
    seed: int,
    chunk_size: int,
    pipes_context: Any = None,
) -> np.ndarray:
    """Losses of one scenario, chunked over the configured compute backend.

    ``pipes_context`` is the Dagster execution context that launches and watches a
    Databricks run; only ``COMPUTE=databricks`` needs it.
    """
    from pipeline.domain import loan_loss

    if compute.backend == "databricks":
        return databricks_simulate(
            pipes_context,
            compute,
            book,
            pd_multiplier=pd_multiplier,
            rho=rho,
            n_sims=n_sims,
            seed=seed,
            chunk_size=chunk_size,
        )
    ranges = loan_loss.chunk_ranges(n_sims, chunk_size)

    def local_chunk(chunk_id: int) -> np.ndarray:
        start, stop = ranges[chunk_id]
        return loan_loss.simulate_chunk(
            book, pd_multiplier=pd_multiplier, rho=rho, seed=seed, start=start, stop=stop
        )

    def spark_chunks(session, chunk_ids):
        return spark_simulate(
            session, book, ranges, chunk_ids, pd_multiplier=pd_multiplier, rho=rho, seed=seed
        )

    parts = compute.map_chunks(local_chunk, range(len(ranges)), spark_fn=spark_chunks)
    return np.concatenate(parts)


def databricks_simulate(
    context: Any,
    compute: ComputeResource,
    book: "object",
    *,
    pd_multiplier: float,
    rho: float,
    n_sims: int,
    seed: int,
    chunk_size: int,
) -> np.ndarray:
    """One scenario as one Databricks run of :mod:`pipeline.remote.loan_loss_job`, via Pipes.

    The book goes to the cluster as a DBFS file and the losses come back as one, checked
    against the digest the job reports (the job module says why files, not messages). The
    job runs ``simulate_chunk`` over the same ``chunk_ranges``, so the losses equal the
    local backend's bit for bit when both sides have the same numpy and scipy: the job
    reports its versions, and a difference is logged as a warning because random streams
    and special functions may change between releases.
    """
    import scipy

    from pipeline.remote import loan_loss_job as job

    if context is None:
        raise ComputeError("COMPUTE=databricks needs the Dagster context that launches the run")
    partition = context.partition_key if context.has_partition_key else "unpartitioned"
    result = compute.run_databricks_job(
        context,
        script=Path(job.__file__).name,
        run_name=(
            f"{keys.LOAN_LOSS_DISTRIBUTION.to_user_string()} {partition} "
            f"m={pd_multiplier:g} rho={rho:g}"
        ),
        inputs={job.BOOK_FILE: job.encode_book(book.loan_id, book.pd, book.ead, book.lgd)},
        outputs=(job.LOSSES_FILE,),
        extras={
            "pd_multiplier": float(pd_multiplier),
            "rho": float(rho),
            "seed": int(seed),
            "n_sims": int(n_sims),
            "chunk_size": int(chunk_size),
        },
    )
    remote = result.message.get("versions") or {}
    local = {"numpy": np.__version__, "scipy": scipy.__version__}
    differs = {name: (remote.get(name), here) for name, here in local.items()}
    differs = {name: pair for name, pair in differs.items() if pair[0] != pair[1]}
    if differs:
        context.log.warning(
            f"Databricks run {result.run_id} used "
            + ", ".join(f"{n} {r} (here {h})" for n, (r, h) in differs.items())
            + "; losses may differ from COMPUTE=local for the same seed"
        )
    context.log.info(
        f"Databricks run {result.run_id}: {result.message.get('n_sims')} losses on "
        f"{result.message.get('engine')} in {result.message.get('seconds')} s "
        f"(domain code from {result.message.get('code_origin')})"
    )
    return job.decode_losses(result.outputs[job.LOSSES_FILE], int(n_sims))


def spark_simulate(
    session, book, ranges, chunk_ids, *, pd_multiplier: float, rho: float, seed: int
) -> list[np.ndarray]:
    """Run chunks as Spark tasks: ``mapInPandas`` over a frame of chunk ids."""
    import pandas as pd

    def run_chunks(batches):
        from pipeline.domain.loan_loss import simulate_chunk

        for batch in batches:
            for chunk_id in batch["chunk_id"]:
                start, stop = ranges[int(chunk_id)]
                losses = simulate_chunk(
                    book, pd_multiplier=pd_multiplier, rho=rho, seed=seed, start=start, stop=stop
                )
                yield pd.DataFrame(
                    {"chunk_id": int(chunk_id), "sim": np.arange(start, stop), "loss": losses}
                )

    ids = session.createDataFrame([(int(c),) for c in chunk_ids], "chunk_id int").repartition(
        max(len(chunk_ids), 1), "chunk_id"
    )
    result = ids.mapInPandas(run_chunks, schema="chunk_id int, sim long, loss double")
    frame = result.toPandas().sort_values("sim")
    return [frame.loc[frame["chunk_id"] == c, "loss"].to_numpy(dtype=np.float64) for c in chunk_ids]


@dataclass(frozen=True)
class SimulationSettings:
    """Simulation size and seed (the asset's run config, as plain data)."""

    n_sims: int = 100_000
    seed: int = 20260930
    chunk_size: int = 16_384


@dataclass(frozen=True)
class SimulatedDate:
    """What one valuation date's simulation stored and logged."""

    summary: pl.DataFrame
    delta_version: int
    samples_uri: str
    mlflow_run_url: str
    histograms: dict[str, bytes]


def simulate_valuation_date(
    loans: pl.DataFrame,
    scenarios: pl.DataFrame,
    *,
    valuation_date: str,
    settings: SimulationSettings,
    input_versions: dict[str, int | None],
    compute: ComputeResource,
    lake: LakeResource,
    tracking: TrackingResource,
    dagster_run_id: str,
    pipes_context: Any = None,
) -> SimulatedDate:
    """Simulate every scenario, store the samples and the summary rows, log to MLflow.

    The samples file is written first and the summary (one Delta commit naming it) last,
    so the summary is the commit point of the date.

    Parameters
    ----------
    input_versions
        Delta versions of ``loan_book`` and ``loan_scenarios`` the inputs were read at,
        recorded on every summary row.
    """
    from pipeline.domain import loan_loss, plots

    book = loan_loss.loan_arrays(loans.select("loan_id", "ead", "pd", "lgd"))
    rows, samples, pictures = [], {}, {}
    for scenario in scenarios.sort("scenario").iter_rows(named=True):
        name = scenario["scenario"]
        losses = simulate_scenario(
            compute,
            book,
            pd_multiplier=scenario["pd_multiplier"],
            rho=scenario["asset_correlation"],
            n_sims=settings.n_sims,
            seed=settings.seed,
            chunk_size=settings.chunk_size,
            pipes_context=pipes_context,
        )
        summary = loan_loss.summarise_losses(losses)
        samples[name] = losses
        pictures[name] = plots.loss_histogram_png(losses, summary, title=f"{valuation_date} {name}")
        rows.append(
            {
                "valuation_date": valuation_date,
                "scenario": name,
                "pd_multiplier": scenario["pd_multiplier"],
                "asset_correlation": scenario["asset_correlation"],
                **{k: float(v) for k, v in summary.items() if k != "n_sims"},
                "n_sims": int(summary["n_sims"]),
                "analytic_expected_loss": float(
                    loan_loss.analytic_expected_loss(book, scenario["pd_multiplier"])
                ),
                "n_loans": len(book.pd),
                "total_exposure": float(np.sum(book.ead * book.lgd)),
                "seed": settings.seed,
                "loan_book_version": input_versions["loan_book"],
                "scenario_version": input_versions["loan_scenarios"],
                "dagster_run_id": dagster_run_id,
            }
        )
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **samples)
    npz_uri = lake.write_bytes(
        store.samples_uri(lake, valuation_date, dagster_run_id), buffer.getvalue()
    )
    with tracking.start_run(
        experiment=store.EXPERIMENT,
        run_name=f"loan_loss_{valuation_date}",
        dagster_run_id=dagster_run_id,
        asset_key=keys.LOAN_LOSS_DISTRIBUTION.to_user_string(),
        partition_key=valuation_date,
    ) as run:
        run.log_params(
            {
                **dataclasses.asdict(settings),
                "loan_book_version": input_versions["loan_book"],
                "scenario_version": input_versions["loan_scenarios"],
                "n_loans": len(book.pd),
            }
        )
        run.log_metrics(
            {
                f"{row['scenario']}.{k}": row[k]
                for row in rows
                for k in (*SUMMARY_COLUMNS, "se_expected_loss")
            }
        )
        run.log_files(
            {f"histogram_{name}.png": png for name, png in pictures.items()},
            artifact_path="histograms",
        )
    summary_table = pl.DataFrame(rows).with_columns(
        pl.lit(npz_uri).alias("samples_uri"),
        pl.lit(run.run_id).alias("mlflow_run_id"),
        pl.lit(dt.datetime.now(dt.UTC).replace(tzinfo=None)).alias("computed_at"),
    )
    version = lake.overwrite_partition(
        "gold", "loan_loss_summary", summary_table, {"valuation_date": valuation_date}
    )
    return SimulatedDate(
        summary=summary_table,
        delta_version=version,
        samples_uri=npz_uri,
        mlflow_run_url=tracking.run_url(run.experiment_id, run.run_id),
        histograms=pictures,
    )
