"""Monte Carlo loan-loss distribution per valuation date and macro scenario.

What users read is the distribution, not rows: one summary row per scenario in
``gold/loan_loss_summary`` (with the Delta versions of the inputs, the seed and
``n_sims``), and the loss samples in one compressed ``.npz`` per valuation date. The
simulation itself is :func:`pipeline.jobs.loan_loss_simulation.simulate_valuation_date`,
on the configured compute backend (local, Spark or Databricks).
"""

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
from pipeline.gates import require_gate
from pipeline.jobs.loan_loss_simulation import (
    SimulatedDate,
    SimulationSettings,
    simulate_valuation_date,
)
from pipeline.metadata import column_schema, markdown_table, png_markdown
from pipeline.partitions import valuation_date_partitions
from pipeline.policies import MODEL_POOL, domain_errors_are_final, gated_eager, model_retry_policy
from pipeline.resources.compute import ComputeError, ComputeResource
from pipeline.resources.lake import LakeResource
from pipeline.resources.tracking import TrackingResource
from pipeline.stores.loan_loss import LOAN_INPUTS, input_rule_failures

SUMMARY_PREVIEW = ("scenario", "expected_loss", "p10", "p50", "p90", "var_99", "es_99")


class LoanLossConfig(Config):
    """Simulation size and seed.

    Raise ``n_sims`` when ``mc_error_within_bound`` fails: the check's message
    states how many simulations the bound needs (the error falls as 1/sqrt(n)).
    """

    n_sims: int = Field(default=100_000, description="simulations per scenario")
    seed: int = Field(default=20260930, description="seed of the whole run")
    chunk_size: int = Field(default=16_384, description="simulations per chunk / Spark task")


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
    valuation_date = context.partition_key
    with domain_errors_are_final():
        for upstream in LOAN_INPUTS:
            require_gate(
                instance=context.instance,
                asset_key=upstream,
                check_names=(keys.CHECK_CURATED_CONTRACT, keys.CHECK_RECONCILES),
                partition_key=valuation_date,
                rule_failures=input_rule_failures(lake, upstream, valuation_date),
                what="a loss distribution",
            )
        where = {"valuation_date": valuation_date}
        versions = {t: lake.version("curated", t) for t in ("loan_book", "loan_scenarios")}
        try:
            result = simulate_valuation_date(
                lake.read("curated", "loan_book", where),
                lake.read("curated", "loan_scenarios", where),
                valuation_date=valuation_date,
                settings=SimulationSettings(**config.model_dump()),
                input_versions=versions,
                compute=compute,
                lake=lake,
                tracking=tracking,
                dagster_run_id=context.run_id,
                pipes_context=context,
            )
        except ComputeError as exc:
            # A Databricks run that ran and failed (task error, lost cluster) or was refused
            # credentials is reported, not resubmitted: each attempt costs a cluster run.
            # Network errors reaching the workspace are still retried.
            raise Failure(description=str(exc), allow_retries=False) from exc
    return MaterializeResult(metadata=distribution_metadata(result, n_sims=config.n_sims))


def distribution_metadata(result: SimulatedDate, *, n_sims: int) -> dict:
    """What the UI shows for one valuation date: summary table, histogram, links, versions."""
    summary = result.summary
    shown = "baseline" if "baseline" in result.histograms else next(iter(result.histograms))
    return {
        "dagster/row_count": summary.height,
        "dagster/column_schema": column_schema(summary),
        "scenarios": summary.height,
        "n_sims": n_sims,
        "summary": MetadataValue.md(
            markdown_table(
                summary.select(*SUMMARY_PREVIEW, "se_expected_loss"), float_fmt="{:,.0f}"
            )
        ),
        f"histogram_{shown}": png_markdown(result.histograms[shown], f"{shown} histogram"),
        "samples": MetadataValue.path(result.samples_uri),
        "delta_version": result.delta_version,
        "loan_book_version": int(summary["loan_book_version"][0]),
        "scenario_version": int(summary["scenario_version"][0]),
        "mlflow_run": MetadataValue.url(result.mlflow_run_url),
    }


loan_loss_assets = [loan_loss_distribution]
