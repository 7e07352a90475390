"""Accuracy gates of ``loan_loss_distribution``.

* ``mc_error_within_bound`` (blocking): the Monte Carlo standard error of every
  published figure (expected loss, P10/P50/P90, VaR and ES at 99% and 99.9%) is
  within the relative bound the run was configured with (stored on each summary
  row), for every scenario; the message names each failing figure and the
  simulations it needs;
* ``expected_loss_matches_analytic``: the simulated mean lies within 3 standard
  errors of sum(EAD × LGD × PD × multiplier), which is known exactly;
* ``quantiles_match_vasicek_reference``: a homogeneous reference book with each
  scenario's average stressed PD and correlation reproduces the Vasicek
  large-portfolio quantiles, validating the simulator under those parameters;
* ``contributions_add_up_to_var_and_es``: the stored segment contributions of
  each scenario come from the same run as its summary and add up to its 99% VaR
  and ES.
"""

import math

import polars as pl
from dagster import AssetCheckExecutionContext, AssetCheckResult, MetadataValue, asset_check

from pipeline import keys
from pipeline.metadata import markdown_table
from pipeline.partitions import valuation_date_partitions
from pipeline.resources.lake import LakeResource
from pipeline.stores.loan_loss import read_contributions, read_summary, stored_bounds

REFERENCE_LOANS = 5_000
REFERENCE_SIMS = 20_000
LEGACY_BOUNDS = {"expected_loss": 0.005}
"""The bound of summary rows written before bounds were stored: the expected loss's only."""


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


def mc_error_verdicts(rows: list[dict]) -> tuple[list[dict], str | None, dict]:
    """Per-scenario verdicts, the headline a user acts on, and metadata for the MC gate.

    Every scenario must meet every bound, so the headline names each failing figure with
    the most simulations any scenario needs for it (SE ~ 1/sqrt(n)), and the largest of
    those as the ``n_sims`` to set.
    """
    from pipeline.domain.loan_loss import mc_error_failure, mc_error_shortfalls

    verdicts, need = [], {}
    for r in rows:
        bounds = stored_bounds(r) or LEGACY_BOUNDS
        failing = mc_error_shortfalls(r, bounds)
        for f in failing:
            n = f["n_sims_needed"]
            need[f["figure"]] = max(need.get(f["figure"], 0), math.inf if n is None else n)
        verdicts.append(
            {
                "scenario": r["scenario"],
                "n_sims": int(r["n_sims"]),
                "n_sims_rounds": r.get("n_sims_rounds"),
                **{
                    f"rel_se_{k}": r[f"se_{k}"] / abs(r[k]) if r[k] else 0.0
                    for k in bounds
                    if f"se_{k}" in r
                },
                "failure": mc_error_failure(r, bounds),
            }
        )
    n_sims = max((int(r["n_sims"]) for r in rows), default=0)
    finite = [n for n in need.values() if math.isfinite(n)]
    n_needed = max([n_sims, *finite])
    metadata = {"n_sims": n_sims, "n_sims_needed": n_needed, "failing_figures": len(need)}
    if not need:
        return verdicts, None, metadata
    figures = ", ".join(
        f"{k} needs {'more (it is 0 with a positive SE)' if math.isinf(n) else f'{n:,}'}"
        for k, n in need.items()
    )
    headline = (
        f"raise n_sims from {n_sims:,} to at least {n_needed:,} (the most any scenario "
        f"needs) or set auto_n_sims: {figures}"
    )
    return verdicts, headline, metadata


@asset_check(
    asset=keys.LOAN_LOSS_DISTRIBUTION,
    name=keys.CHECK_MC_ERROR,
    partitions_def=valuation_date_partitions,
    blocking=True,
    description=(
        "Monte Carlo standard error of every figure (expected loss, P10/P50/P90, VaR and ES "
        "at 99% and 99.9%) within its relative bound (run config max_relative_se, stored on "
        "each summary row) for every scenario. To fix a failure, raise n_sims (the message "
        "gives the number each figure needs) or set auto_n_sims."
    ),
)
def mc_error_within_bound(
    context: AssetCheckExecutionContext, lake: LakeResource
) -> AssetCheckResult:
    """Apply each stored figure's Monte Carlo error bound to the stored summaries."""
    rows = list(read_summary(lake, context.partition_key).iter_rows(named=True))
    verdicts, headline, metadata = mc_error_verdicts(rows)
    return _result(context, verdicts, headline=headline, metadata=metadata)


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


@asset_check(
    asset=keys.LOAN_LOSS_DISTRIBUTION,
    name=keys.CHECK_CONTRIBUTIONS,
    partitions_def=valuation_date_partitions,
    description=(
        "Segment Euler contributions in gold/loan_loss_contributions come from the same run "
        "as the summary and add up to each scenario's 99% VaR and ES."
    ),
)
def contributions_add_up_to_var_and_es(
    context: AssetCheckExecutionContext, lake: LakeResource
) -> AssetCheckResult:
    """Compare the stored contributions with the stored summary, scenario by scenario."""
    from pipeline.domain.loan_loss import contributions_failure

    summary = read_summary(lake, context.partition_key)
    stored = read_contributions(lake, context.partition_key)
    verdicts = []
    for r in summary.iter_rows(named=True):
        mine = (
            stored.filter(
                (pl.col("scenario") == r["scenario"])
                & (pl.col("dagster_run_id") == r["dagster_run_id"])
            )
            if stored.height
            else stored
        )
        failure = (
            contributions_failure(r, mine)
            if mine.height
            else f"no contributions stored by run {r['dagster_run_id']}"
        )
        verdicts.append(
            {
                "scenario": r["scenario"],
                "es_99": r["es_99"],
                "var_99": r["var_99"],
                "failure": failure,
            }
        )
    return _result(context, verdicts)


loan_loss_checks = [
    mc_error_within_bound,
    expected_loss_matches_analytic,
    quantiles_match_vasicek_reference,
    contributions_add_up_to_var_and_es,
]
