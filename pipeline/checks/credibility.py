"""The gate on ``credibility_posterior``: five blocking, per-month checks.

Four convergence checks (R-hat, divergences, bulk and tail ESS) and a posterior
predictive check of the observed claim counts. Each applies one rule of
:data:`pipeline.domain.credibility.GATE_RULES` to the diagnostics stored beside the
posterior (the final sample of the fit's sampling rounds), so the check, the guard in
``credibility_table`` and a user re-running the check later all judge the same numbers.
"""

from dagster import AssetCheckExecutionContext, AssetCheckResult, AssetChecksDefinition, asset_check

from pipeline import keys
from pipeline.partitions import month_partitions
from pipeline.resources.lake import LakeResource
from pipeline.stores.credibility import check_metadata, read_diagnostics

_DESCRIPTIONS = {
    keys.CHECK_RHAT: "Max rank-normalised split R-hat over alpha, sigma and district rates ≤ 1.01, "
    "judged on the final sample after drawing more while it fell short.",
    keys.CHECK_DIVERGENCES: "No divergent transitions after tuning.",
    keys.CHECK_ESS: "Min bulk effective sample size over all model variables ≥ 400.",
    keys.CHECK_ESS_TAIL: "Min tail effective sample size (5 % and 95 % quantiles) over all model "
    "variables ≥ 400.",
    keys.CHECK_POSTERIOR_PREDICTIVE: "Observed district-month claim counts against the posterior "
    "predictive distribution: Pearson dispersion p-value ≥ 0.01 and no more counts outside "
    "their 98 % predictive interval than a fitting model leaves there with 99.9 % probability.",
}


def _posterior_check(name: str) -> AssetChecksDefinition:
    @asset_check(
        asset=keys.CREDIBILITY_POSTERIOR,
        name=name,
        partitions_def=month_partitions,
        blocking=True,
        description=_DESCRIPTIONS[name],
    )
    def posterior_check(
        context: AssetCheckExecutionContext, lake: LakeResource
    ) -> AssetCheckResult:
        from pipeline.domain.credibility import GATE_RULES

        month = context.partition_key
        diagnostics = read_diagnostics(lake, month)
        if not diagnostics:
            return AssetCheckResult(passed=False, description=f"{month}: no stored diagnostics")
        failure = GATE_RULES[name](diagnostics)
        return AssetCheckResult(
            passed=failure is None,
            description=failure or f"{month}: passed",
            metadata=check_metadata(diagnostics),
        )

    return posterior_check


credibility_checks = [_posterior_check(name) for name in keys.CREDIBILITY_POSTERIOR_CHECKS]
