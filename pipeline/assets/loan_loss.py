"""Monte Carlo loan-loss distribution per valuation date and macro scenario.

What users read is the distribution, not rows: one summary row per scenario in
``gold/loan_loss_summary`` (every figure with its Monte Carlo standard error and bound,
the Delta versions of the inputs, the seed, ``n_sims`` and the rounds it took), the Euler
contributions to the 99% VaR and ES per segment and for the top loans in
``gold/loan_loss_contributions``, and the loss samples in one compressed ``.npz`` per
valuation date. The simulation itself is
:func:`pipeline.jobs.loan_loss_simulation.simulate_valuation_date`, on the configured
compute backend (local, Spark or Databricks).
"""

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
from pipeline.gates import require_gate
from pipeline.jobs.loan_loss_simulation import (
    SE_COLUMNS,
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
CONTRIBUTION_PREVIEW = (
    "segment",
    "loan_id",
    "es_contribution",
    "se_es_contribution",
    "var_contribution",
    "se_var_contribution",
    "es_share",
)


class McErrorBounds(Config):
    """Largest acceptable relative Monte Carlo standard error, ``se / |value|``, per figure.

    Stored on every summary row (``max_rel_se_<figure>``), where ``mc_error_within_bound``
    reads them: the check judges the bounds the run was made for.
    """

    expected_loss: float = Field(default=0.005, description="bound on se / expected loss")
    p10: float = Field(default=0.02, description="bound on se / P10")
    p50: float = Field(default=0.01, description="bound on se / P50")
    p90: float = Field(default=0.01, description="bound on se / P90")
    var_99: float = Field(default=0.015, description="bound on se / VaR 99%")
    var_999: float = Field(default=0.03, description="bound on se / VaR 99.9%")
    es_99: float = Field(default=0.015, description="bound on se / ES 99%")
    es_999: float = Field(default=0.03, description="bound on se / ES 99.9%")


class LoanLossConfig(Config):
    """Simulation size, seed, error bounds and automatic sizing.

    When ``mc_error_within_bound`` fails, raise ``n_sims`` (the check's message states how
    many simulations each failing figure needs: the error falls as 1/sqrt(n)) or set
    ``auto_n_sims``, which doubles the simulations until every bound holds or
    ``max_n_sims`` is reached.
    """

    n_sims: int = Field(default=100_000, description="simulations per scenario (first round)")
    seed: int = Field(default=20260930, description="seed of the whole run")
    chunk_size: int = Field(default=16_384, description="simulations per chunk / Spark task")
    auto_n_sims: bool = Field(
        default=False, description="double n_sims until every figure meets its bound"
    )
    max_n_sims: int = Field(default=1_600_000, description="budget per scenario for auto_n_sims")
    max_relative_se: McErrorBounds = Field(
        default_factory=McErrorBounds, description="relative SE bound per figure"
    )
    top_loans: int = Field(default=10, description="loans listed in the contributions table")


@asset(
    key=keys.LOAN_LOSS_DISTRIBUTION,
    partitions_def=valuation_date_partitions,
    deps=[keys.LOAN_BOOK, keys.LOAN_SCENARIOS],
    group_name="loan_loss",
    kinds={"numpy", "delta", "mlflow"},
    description=(
        "Portfolio loss distribution per macro scenario (one-factor Gaussian copula): "
        "expected loss, P10/P50/P90, VaR and expected shortfall at 99% and 99.9%, "
        "with Monte Carlo standard errors; Euler contributions to the 99% VaR and ES "
        "per segment and top loan in gold/loan_loss_contributions."
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
                dagster_run_id=context.run.run_id,
                pipes_context=context,
            )
        except ComputeError as exc:
            # A Databricks run that ran and failed (task error, lost cluster) or was refused
            # credentials is reported, not resubmitted: each attempt costs a cluster run.
            # Network errors reaching the workspace are still retried.
            raise Failure(description=str(exc), allow_retries=False) from exc
    return MaterializeResult(metadata=distribution_metadata(result, n_sims=config.n_sims))


def distribution_metadata(result: SimulatedDate, *, n_sims: int) -> dict:
    """What the UI shows for one valuation date: summaries, contributions, plots, links."""
    summary = result.summary
    shown = "baseline" if "baseline" in result.histograms else next(iter(result.histograms))
    contributions = result.contributions.filter(pl.col("scenario") == shown)
    return {
        "dagster/row_count": summary.height,
        "dagster/column_schema": column_schema(summary),
        "scenarios": summary.height,
        "n_sims": n_sims,
        "n_sims_used": MetadataValue.json(dict(summary.select("scenario", "n_sims").iter_rows())),
        "n_sims_rounds": MetadataValue.json(
            dict(summary.select("scenario", "n_sims_rounds").iter_rows())
        ),
        "summary": MetadataValue.md(
            markdown_table(summary.select(*SUMMARY_PREVIEW, *SE_COLUMNS), float_fmt="{:,.0f}")
        ),
        f"histogram_{shown}": png_markdown(result.histograms[shown], f"{shown} histogram"),
        f"contributions_{shown}": MetadataValue.md(
            markdown_table(contributions.select(*CONTRIBUTION_PREVIEW), float_fmt="{:,.4g}")
        ),
        f"contributions_chart_{shown}": png_markdown(
            result.contribution_charts[shown], f"{shown} 99% VaR and ES contributions"
        ),
        "samples": MetadataValue.path(result.samples_uri),
        "delta_version": result.delta_version,
        "contributions_delta_version": result.contributions_version,
        "loan_book_version": int(summary["loan_book_version"][0]),
        "scenario_version": int(summary["scenario_version"][0]),
        "mlflow_run": MetadataValue.url(result.mlflow_run_url),
    }


loan_loss_assets = [loan_loss_distribution]
