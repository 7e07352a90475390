"""Monte Carlo loan-loss distribution per valuation date and macro scenario.

For each scenario of ``loan_scenarios`` the book of ``loan_book`` is simulated
under the one-factor Gaussian copula (:mod:`pipeline.domain.loan_loss`). What
users read is the distribution, not rows: one summary row per scenario in
``gold/loan_loss_summary`` (with the Delta versions of the inputs, the seed and
``n_sims``), and the loss samples in one compressed ``.npz`` per valuation date.
With ``COMPUTE=spark`` chunks of simulations run as Spark tasks through the same
domain function, so results are identical for the same seed. With
``COMPUTE=databricks`` each scenario is one Databricks run of
:mod:`pipeline.jobs.loan_loss_job` through Dagster Pipes, again over the same chunks.
"""

import datetime as dt
import io
import tempfile
from pathlib import Path

import numpy as np
import polars as pl
from dagster import (
    AssetExecutionContext,
    Config,
    Failure,
    MaterializeResult,
    MetadataValue,
    asset,
)
from pydantic import Field

from pipeline import keys
from pipeline.assets.metadata import column_schema, markdown_table, png_markdown
from pipeline.automation import (
    MODEL_POOL,
    domain_errors_are_final,
    gated_eager,
    model_retry_policy,
)
from pipeline.checks.gates import require_gate
from pipeline.domain import contracts
from pipeline.partitions import valuation_date_partitions
from pipeline.resources.compute import ComputeError, ComputeResource
from pipeline.resources.lake import LakeResource
from pipeline.resources.tracking import TrackingResource

EXPERIMENT = "loan_loss"
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


class LoanLossConfig(Config):
    """Simulation size and seed.

    Raise ``n_sims`` when ``mc_error_within_bound`` fails: the check's message
    states how many simulations the bound needs (the error falls as 1/sqrt(n)).
    """

    n_sims: int = Field(default=100_000, description="simulations per scenario")
    seed: int = Field(default=20260930, description="seed of the whole run")
    chunk_size: int = Field(default=16_384, description="simulations per chunk / Spark task")


def samples_uri(lake: LakeResource, valuation_date: str, run_id: str) -> str:
    """Where one run's loss samples of a valuation date are stored.

    Each run writes its own file and the summary row (one atomic Delta commit)
    names it in ``samples_uri``, so the summary is the commit point: a run that
    fails after writing its samples leaves the previous summary and samples
    consistent. Read samples through :func:`committed_samples_uri`.
    """
    return lake.file_uri(
        "gold",
        "loan_loss_distribution",
        f"valuation_date={valuation_date}",
        f"losses_{run_id}.npz",
    )


def committed_samples_uri(lake: LakeResource, valuation_date: str) -> str | None:
    """Samples file named by the stored summary of ``valuation_date`` (None if never written)."""
    summary = read_summary(lake, valuation_date)
    return summary["samples_uri"][0] if summary.height else None


LOAN_INPUTS = {
    keys.LOAN_BOOK: ("loan_book", contracts.loan_book_contract),
    keys.LOAN_SCENARIOS: ("loan_scenarios", contracts.loan_scenarios_contract),
}


def input_rule_failures(lake: LakeResource, upstream, valuation_date: str) -> list[str]:
    """The contract of one input recomputed on what is stored for the date."""
    table, contract = LOAN_INPUTS[upstream]
    stored = lake.read("curated", table, {"valuation_date": valuation_date})
    if stored.height == 0:
        return [f"curated/{table} has no rows for {valuation_date}"]
    return contracts.contract_failures(
        stored, contract(valuation_date), f"{table} {valuation_date}"
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
) -> np.ndarray:
    """Losses of one scenario, chunked over the configured compute backend."""
    from pipeline.domain import loan_loss

    if compute.backend == "databricks":
        return databricks_simulate(
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
    compute: ComputeResource,
    book: "object",
    *,
    pd_multiplier: float,
    rho: float,
    n_sims: int,
    seed: int,
    chunk_size: int,
) -> np.ndarray:
    """One scenario as one Databricks run of :mod:`pipeline.jobs.loan_loss_job`, via Pipes.

    The book goes to the cluster as a DBFS file and the losses come back as one, checked
    against the digest the job reports (the job module says why files, not messages). The
    job runs ``simulate_chunk`` over the same ``chunk_ranges``, so the losses equal the
    local backend's bit for bit when both sides have the same numpy and scipy: the job
    reports its versions, and a difference is logged as a warning because random streams
    and special functions may change between releases.
    """
    import scipy

    from pipeline.jobs import loan_loss_job as job

    context = AssetExecutionContext.get()
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


@asset(
    key=keys.LOAN_LOSS_DISTRIBUTION,
    partitions_def=valuation_date_partitions,
    deps=[keys.LOAN_BOOK, keys.LOAN_SCENARIOS],
    group_name="loan_loss",
    kinds={"numpy", "delta", "mlflow"},
    description=(
        "Portfolio loss distribution per macro scenario (one-factor Gaussian copula): "
        "expected loss, P10/P50/P90, VaR and expected shortfall at 99% and 99.9%, "
        "with Monte Carlo standard errors."
    ),
    metadata={"partition_expr": "valuation_date"},
    pool=MODEL_POOL,
    retry_policy=model_retry_policy,
    automation_condition=gated_eager(),
)
def loan_loss_distribution(
    context: AssetExecutionContext,
    config: LoanLossConfig,
    lake: LakeResource,
    tracking: TrackingResource,
    compute: ComputeResource,
) -> MaterializeResult:
    """Simulate every scenario of the valuation date and store the distribution."""
    with domain_errors_are_final():
        try:
            return simulate_distribution(context, config, lake, tracking, compute)
        except ComputeError as exc:
            # A Databricks run that ran and failed (task error, lost cluster) or was refused
            # credentials is reported, not resubmitted behind the user's back: each attempt
            # costs a cluster run. Network errors reaching the workspace are still retried.
            raise Failure(description=str(exc), allow_retries=False) from exc


def simulate_distribution(
    context: AssetExecutionContext,
    config: LoanLossConfig,
    lake: LakeResource,
    tracking: TrackingResource,
    compute: ComputeResource,
) -> MaterializeResult:
    """Body of :func:`loan_loss_distribution` (domain errors are final, the rest retried)."""
    import mlflow

    from pipeline.domain import loan_loss, plots

    valuation_date = context.partition_key
    for upstream in LOAN_INPUTS:
        require_gate(
            instance=context.instance,
            asset_key=upstream,
            check_names=(keys.CHECK_CURATED_CONTRACT, keys.CHECK_RECONCILES),
            partition_key=valuation_date,
            rule_failures=input_rule_failures(lake, upstream, valuation_date),
            what="a loss distribution",
        )
    loans = lake.read("curated", "loan_book", {"valuation_date": valuation_date})
    scenarios = lake.read("curated", "loan_scenarios", {"valuation_date": valuation_date})
    book = loan_loss.loan_arrays(loans.select("loan_id", "ead", "pd", "lgd"))
    book_version = lake.version("curated", "loan_book")
    scenario_version = lake.version("curated", "loan_scenarios")

    rows, samples, pictures = [], {}, {}
    for scenario in scenarios.sort("scenario").iter_rows(named=True):
        name = scenario["scenario"]
        losses = simulate_scenario(
            compute,
            book,
            pd_multiplier=scenario["pd_multiplier"],
            rho=scenario["asset_correlation"],
            n_sims=config.n_sims,
            seed=config.seed,
            chunk_size=config.chunk_size,
        )
        summary = loan_loss.summarise_losses(losses)
        analytic = loan_loss.analytic_expected_loss(book, scenario["pd_multiplier"])
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
                "analytic_expected_loss": float(analytic),
                "n_loans": len(book.pd),
                "total_exposure": float(np.sum(book.ead * book.lgd)),
                "seed": config.seed,
                "loan_book_version": book_version,
                "scenario_version": scenario_version,
                "dagster_run_id": context.run_id,
            }
        )
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **samples)
    npz_uri = lake.write_bytes(samples_uri(lake, valuation_date, context.run_id), buffer.getvalue())

    with tracking.start_run(
        experiment=EXPERIMENT,
        run_name=f"loan_loss_{valuation_date}",
        dagster_run_id=context.run_id,
        asset_key=keys.LOAN_LOSS_DISTRIBUTION.to_user_string(),
        partition_key=valuation_date,
    ) as run:
        mlflow.log_params(
            {
                **config.model_dump(),
                "loan_book_version": book_version,
                "scenario_version": scenario_version,
                "n_loans": len(book.pd),
            }
        )
        for row in rows:
            mlflow.log_metrics(
                {f"{row['scenario']}.{k}": row[k] for k in (*SUMMARY_COLUMNS, "se_expected_loss")}
            )
        with tempfile.TemporaryDirectory() as tmp:
            for name, png in pictures.items():
                (Path(tmp) / f"histogram_{name}.png").write_bytes(png)
            mlflow.log_artifacts(tmp, artifact_path="histograms")
        run_id, experiment_id = run.info.run_id, run.info.experiment_id

    summary_table = pl.DataFrame(rows).with_columns(
        pl.lit(npz_uri).alias("samples_uri"),
        pl.lit(run_id).alias("mlflow_run_id"),
        pl.lit(dt.datetime.now(dt.UTC).replace(tzinfo=None)).alias("computed_at"),
    )
    version = lake.overwrite_partition(
        "gold", "loan_loss_summary", summary_table, {"valuation_date": valuation_date}
    )
    shown = "baseline" if "baseline" in pictures else next(iter(pictures))
    return MaterializeResult(
        metadata={
            "dagster/row_count": summary_table.height,
            "dagster/column_schema": column_schema(summary_table),
            "scenarios": summary_table.height,
            "n_sims": config.n_sims,
            "summary": MetadataValue.md(
                markdown_table(
                    summary_table.select(
                        "scenario",
                        "expected_loss",
                        "p10",
                        "p50",
                        "p90",
                        "var_99",
                        "es_99",
                        "se_expected_loss",
                    ),
                    float_fmt="{:,.0f}",
                )
            ),
            f"histogram_{shown}": png_markdown(pictures[shown], f"{shown} loss histogram"),
            "samples": MetadataValue.path(npz_uri),
            "delta_version": version,
            "loan_book_version": book_version,
            "scenario_version": scenario_version,
            "mlflow_run": MetadataValue.url(tracking.run_url(experiment_id, run_id)),
        }
    )


def read_summary(lake: LakeResource, valuation_date: str) -> pl.DataFrame:
    """Stored per-scenario summaries of a valuation date."""
    return lake.read("gold", "loan_loss_summary", {"valuation_date": valuation_date})


loan_loss_assets = [loan_loss_distribution]
