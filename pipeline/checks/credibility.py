"""Convergence gate on ``credibility_posterior``: three blocking, per-month checks.

Each check applies one rule of :data:`pipeline.domain.credibility.GATE_RULES` to
the diagnostics stored beside the posterior, so the check, the guard in
``credibility_table`` and a user re-running the check later all judge the same
numbers.
"""

from dagster import AssetCheckExecutionContext, AssetCheckResult, AssetChecksDefinition, asset_check

from pipeline import keys
from pipeline.partitions import month_partitions
from pipeline.resources.lake import LakeResource
from pipeline.stores.credibility import read_diagnostics

_DESCRIPTIONS = {
    keys.CHECK_RHAT: "Max rank-normalised split R-hat over alpha, sigma and district rates ≤ 1.01.",
    keys.CHECK_DIVERGENCES: "No divergent transitions after tuning.",
    keys.CHECK_ESS: "Min bulk effective sample size over all model variables ≥ 400.",
}


def _convergence_check(name: str) -> AssetChecksDefinition:
    @asset_check(
        asset=keys.CREDIBILITY_POSTERIOR,
        name=name,
        partitions_def=month_partitions,
        blocking=True,
        description=_DESCRIPTIONS[name],
    )
    def convergence_check(
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
            metadata={
                "max_rhat": float(diagnostics["max_rhat"]),
                "min_ess_bulk": float(diagnostics["min_ess_bulk"]),
                "min_ess_tail": float(diagnostics["min_ess_tail"]),
                "n_divergences": int(diagnostics["n_divergences"]),
                "parameterization": diagnostics.get("parameterization", ""),
            },
        )

    return convergence_check


credibility_checks = [_convergence_check(name) for name in keys.CONVERGENCE_CHECKS]
