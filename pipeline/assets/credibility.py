"""Claim-frequency credibility: posterior (gated) and the rating table.

``credibility_posterior`` fits the hierarchical Poisson model on a trailing
window of ``claims_by_district`` (:mod:`pipeline.jobs.credibility_fit`), stores the
ArviZ netCDF under ``gold/credibility_posterior/month=<month>/`` beside its
diagnostics, and logs both to MLflow; it draws longer samples while R-hat or ESS fall
short (run config ``max_draw_rounds`` / ``max_total_draws``). ``credibility_table``
writes the estimates only when the gate (convergence and the posterior predictive
check) passed for that month, in this run or any earlier one, and
only from a posterior fitted on the claims now stored (a re-delivered month makes the
posterior stale until it is refitted).
"""

from dagster import (
    AssetDep,
    AssetExecutionContext,
    Config,
    MaterializeResult,
    MetadataValue,
    TimeWindowPartitionMapping,
    asset,
)
from pydantic import Field

from pipeline import keys
from pipeline.audit import input_versions
from pipeline.gates import require_gate
from pipeline.jobs.credibility_fit import (
    SamplerSettings,
    credibility_table_rows,
    fit_month,
    posterior_metadata,
)
from pipeline.metadata import column_schema, markdown_table
from pipeline.partitions import month_partitions
from pipeline.policies import MODEL_POOL, domain_errors_are_final, gated_eager, model_retry_policy
from pipeline.resources.lake import LakeResource
from pipeline.resources.tracking import TrackingResource
from pipeline.stores import credibility as store

CLAIMS_WINDOW = TimeWindowPartitionMapping(
    start_offset=-(store.WINDOW_MONTHS - 1),
    end_offset=0,
    allow_nonexistent_upstream_partitions=True,
)
PREVIEW_COLUMNS = (
    "district",
    "exposure",
    "claim_count",
    "observed_rate",
    "posterior_mean_rate",
    "bayes_credibility_weight",
    "buhlmann_straub_rate",
)


class CredibilityConfig(Config):
    """Sampler settings and the budget of draws; the defaults pass the gate on demo data."""

    draws: int = Field(default=1000, description="posterior draws per chain (first round)")
    tune: int = Field(default=1000, description="tuning steps per chain (every round)")
    chains: int = Field(default=4, description="number of chains")
    target_accept: float = Field(default=0.9, description="NUTS target acceptance")
    random_seed: int = Field(default=42, description="sampler seed (first round)")
    sampler: str = Field(default="nutpie", description="nutpie or pymc")
    parameterization: str = Field(
        default="auto", description="auto (chosen from the data), centered or non_centered"
    )
    max_draw_rounds: int = Field(
        default=3,
        description="most sampling rounds: while R-hat or ESS fall short without divergences, "
        "a fresh sample at least twice as long is drawn and judged instead",
    )
    max_total_draws: int = Field(
        default=7000, description="most draws per chain over all sampling rounds together"
    )


@asset(
    key=keys.CREDIBILITY_POSTERIOR,
    partitions_def=month_partitions,
    deps=[AssetDep(keys.CLAIMS_BY_DISTRICT, partition_mapping=CLAIMS_WINDOW)],
    group_name="credibility",
    kinds={"pymc", "mlflow", "netcdf"},
    description=(
        "Hierarchical Poisson posterior of claim frequency by district, fitted on the "
        f"trailing {store.WINDOW_MONTHS} months of claims_by_district (ArviZ netCDF + MLflow "
        "run)."
    ),
    pool=MODEL_POOL,
    retry_policy=model_retry_policy,
)
def credibility_posterior(
    context: AssetExecutionContext,
    config: CredibilityConfig,
    lake: LakeResource,
    tracking: TrackingResource,
) -> MaterializeResult:
    """Fit, store and log the posterior of one valuation month (domain errors are final)."""
    month = context.partition_key
    with domain_errors_are_final():
        require_gate(
            instance=context.instance,
            asset_key=keys.CLAIMS_BY_DISTRICT,
            check_names=(keys.CHECK_CURATED_CONTRACT, keys.CHECK_RECONCILES),
            partition_key=month,
            rule_failures=store.claims_rule_failures(lake, month),
            what="a posterior",
        )
        fitted = fit_month(
            store.read_claims_window(lake, month),
            month=month,
            settings=SamplerSettings(**config.model_dump()),
            lake=lake,
            tracking=tracking,
            dagster_run_id=context.run.run_id,
        )
    failures = fitted.diagnostics["gate_failures"]
    rounds = len(fitted.diagnostics["draw_rounds"])
    context.log.info(
        f"credibility {month}: {rounds} sampling round(s); gate failures: {failures or 'none'}"
    )
    return MaterializeResult(metadata=posterior_metadata(fitted))


@asset(
    key=keys.CREDIBILITY_TABLE,
    partitions_def=month_partitions,
    deps=[
        keys.CREDIBILITY_POSTERIOR,
        AssetDep(keys.CLAIMS_BY_DISTRICT, partition_mapping=CLAIMS_WINDOW),
    ],
    group_name="credibility",
    kinds={"delta", "polars"},
    description=(
        "Credibility-weighted claim frequencies by district for the rating table. Written "
        "only when the posterior of the same month passed every convergence check and its "
        "posterior predictive check."
    ),
    automation_condition=gated_eager(),
)
def credibility_table(
    context: AssetExecutionContext, lake: LakeResource, tracking: TrackingResource
) -> MaterializeResult:
    """Write the estimates of a posterior that passed its gate; refuse otherwise."""
    month = context.partition_key
    diagnostics = store.read_diagnostics(lake, month)
    inputs = input_versions(lake, "curated/claims_by_district")
    window = store.read_claims_window(lake, month)
    require_gate(
        instance=context.instance,
        asset_key=keys.CREDIBILITY_POSTERIOR,
        check_names=keys.CREDIBILITY_POSTERIOR_CHECKS,
        partition_key=month,
        rule_failures=store.table_rule_failures(diagnostics, window, month),
        what="the credibility table",
    )
    table = credibility_table_rows(
        lake,
        month=month,
        window=window,
        diagnostics=diagnostics,
        dagster_run_id=context.run.run_id,
        inputs=inputs,
    )
    version = lake.overwrite_partition("gold", "credibility_table", table, {"month": month})
    run_id = diagnostics["mlflow_run_id"]
    tracking.existing_run(run_id).log_files(
        {f"credibility_table_{month}.csv": table.write_csv().encode()}
    )
    return MaterializeResult(
        metadata={
            "dagster/row_count": table.height,
            "dagster/column_schema": column_schema(table),
            "delta_version": version,
            "mlflow_run": MetadataValue.url(
                tracking.run_url(diagnostics["mlflow_experiment_id"], run_id)
            ),
            "mean_bayes_credibility_weight": float(table["bayes_credibility_weight"].mean()),
            "mean_buhlmann_straub_z": float(table["buhlmann_straub_z"].mean()),
            "preview": MetadataValue.md(
                markdown_table(table.select(PREVIEW_COLUMNS).sort("exposure"), max_rows=12)
            ),
            "table_uri": MetadataValue.path(lake.table_uri("gold", "credibility_table")),
        }
    )


credibility_assets = [credibility_posterior, credibility_table]
