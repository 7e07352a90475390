"""Accuracy gates of ``loan_loss_distribution``.

* ``mc_error_within_bound`` (blocking): the standard error of the expected loss
  is at most 0.5 % of it, for every scenario;
* ``expected_loss_matches_analytic``: the simulated mean lies within 3 standard
  errors of sum(EAD × LGD × PD × multiplier), which is known exactly;
* ``quantiles_match_vasicek_reference``: a homogeneous reference book with each
  scenario's average stressed PD and correlation reproduces the Vasicek
  large-portfolio quantiles, validating the simulator under those parameters.
"""

import math

import polars as pl
from dagster import AssetCheckExecutionContext, AssetCheckResult, MetadataValue, asset_check

from pipeline import keys
from pipeline.metadata import markdown_table
from pipeline.partitions import valuation_date_partitions
from pipeline.resources.lake import LakeResource
from pipeline.stores.loan_loss import read_summary

REFERENCE_LOANS = 5_000
REFERENCE_SIMS = 20_000
MAX_RELATIVE_SE = 0.005


def _result(
    context: AssetCheckExecutionContext,
    verdicts: list[dict],
    *,
    headline: str | None = None,
    metadata: dict | None = None,
) -> AssetCheckResult:
    """One result over every scenario; ``headline`` leads a failure's description.

    The description is cut to 500 characters for the UI, so whatever a user must
    act on goes into ``headline`` rather than into a scenario's message that the
    cut may drop.
    """
    failed = [v for v in verdicts if v["failure"]]
    if not verdicts:
        return AssetCheckResult(passed=False, description=f"{context.partition_key}: no summary")
    table = pl.DataFrame(verdicts).with_columns(pl.col("failure").fill_null("passed"))
    details = "; ".join(f"{v['scenario']}: {v['failure']}" for v in failed)
    if failed and headline:
        details = f"{headline}; {details}"
    return AssetCheckResult(
        passed=not failed,
        description=details[:500] or "all scenarios passed",
        metadata={
            "scenarios": MetadataValue.md(markdown_table(table)),
            "failed": len(failed),
            **(metadata or {}),
        },
    )


def _n_sims_needed(row: dict) -> int | None:
    """Simulations for the expected loss's relative SE to meet the bound (SE ~ 1/sqrt(n)).

    ``None`` when the expected loss is 0 or exact, where the ratio says nothing.
    """
    value, se = abs(row["expected_loss"]), row["se_expected_loss"]
    if not value or not se:
        return None
    return max(int(row["n_sims"]), math.ceil(row["n_sims"] * (se / value / MAX_RELATIVE_SE) ** 2))


@asset_check(
    asset=keys.LOAN_LOSS_DISTRIBUTION,
    name=keys.CHECK_MC_ERROR,
    partitions_def=valuation_date_partitions,
    blocking=True,
    description=(
        "Standard error of the expected loss ≤ 0.5% of it for every scenario. To fix a "
        "failure, raise n_sims in the run config (the message gives the number needed)."
    ),
)
def mc_error_within_bound(
    context: AssetCheckExecutionContext, lake: LakeResource
) -> AssetCheckResult:
    """Apply the Monte Carlo error bound to the stored summaries."""
    from pipeline.domain.loan_loss import mc_error_failure

    rows = list(read_summary(lake, context.partition_key).iter_rows(named=True))
    verdicts = [
        {
            "scenario": r["scenario"],
            "relative_se": r["se_expected_loss"] / r["expected_loss"]
            if r["expected_loss"]
            else 0.0,
            "failure": mc_error_failure(r, {"expected_loss": MAX_RELATIVE_SE}),
        }
        for r in rows
    ]
    # every scenario must meet the bound, so the number to act on is the largest one
    needed = [n for r in rows if (n := _n_sims_needed(r)) is not None]
    n_sims = max((int(r["n_sims"]) for r in rows), default=0)
    n_needed = max(needed, default=n_sims)
    return _result(
        context,
        verdicts,
        headline=f"raise n_sims from {n_sims:,} to at least {n_needed:,} "
        "(the most any scenario needs)"
        if n_needed > n_sims
        else None,
        metadata={"n_sims": n_sims, "n_sims_needed": n_needed},
    )


@asset_check(
    asset=keys.LOAN_LOSS_DISTRIBUTION,
    name=keys.CHECK_EL_ANALYTIC,
    partitions_def=valuation_date_partitions,
    description="Simulated expected loss within 3 standard errors of the analytic value.",
)
def expected_loss_matches_analytic(
    context: AssetCheckExecutionContext, lake: LakeResource
) -> AssetCheckResult:
    """Compare simulated and analytic expected losses."""
    from pipeline.domain.loan_loss import expected_loss_within_se

    rows = read_summary(lake, context.partition_key).iter_rows(named=True)
    return _result(
        context,
        [
            {
                "scenario": r["scenario"],
                "simulated": r["expected_loss"],
                "analytic": r["analytic_expected_loss"],
                "failure": expected_loss_within_se(r, r["analytic_expected_loss"], 3.0),
            }
            for r in rows
        ],
    )


@asset_check(
    asset=keys.LOAN_LOSS_DISTRIBUTION,
    name=keys.CHECK_VASICEK,
    partitions_def=valuation_date_partitions,
    description=(
        "A homogeneous reference book at each scenario's average stressed PD and correlation "
        "reproduces the Vasicek large-portfolio quantiles (P10, P50, P90, P99)."
    ),
)
def quantiles_match_vasicek_reference(
    context: AssetCheckExecutionContext, lake: LakeResource
) -> AssetCheckResult:
    """Run the reference-portfolio comparison for every scenario."""
    from pipeline.domain.loan_loss import reference_portfolio_check, vasicek_agreement_failure

    summary = read_summary(lake, context.partition_key)
    loans = lake.read("curated", "loan_book", {"valuation_date": context.partition_key})
    mean_pd = float(loans["pd"].mean()) if loans.height else float("nan")
    verdicts = []
    for r in summary.iter_rows(named=True):
        pd_ref = min(mean_pd * r["pd_multiplier"], 1.0)
        check = reference_portfolio_check(
            pd_ref,
            r["asset_correlation"],
            n_loans=REFERENCE_LOANS,
            n_sims=REFERENCE_SIMS,
            seed=int(r["seed"]),
        )
        verdicts.append(
            {
                "scenario": r["scenario"],
                "reference_pd": pd_ref,
                "rho": r["asset_correlation"],
                "failure": vasicek_agreement_failure(check),
            }
        )
    return _result(context, verdicts)


loan_loss_checks = [
    mc_error_within_bound,
    expected_loss_matches_analytic,
    quantiles_match_vasicek_reference,
]
