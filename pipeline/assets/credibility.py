"""Claim-frequency credibility: posterior (gated) and the rating table.

``credibility_posterior`` fits the hierarchical Poisson model on a trailing
window of ``claims_by_district`` (:mod:`pipeline.jobs.credibility_fit`), stores the
ArviZ netCDF under ``gold/credibility_posterior/month=<month>/`` beside its
diagnostics, and logs both to MLflow. ``credibility_table`` writes the estimates only
when the convergence gate passed for that month, in this run or any earlier one, and
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
from pipeline.gates import require_gate
from pipeline.jobs.credibility_fit import SamplerSettings, credibility_table_rows, fit_month
from pipeline.metadata import column_schema, markdown_table, png_markdown
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
    """Sampler settings; the defaults are the notebook's, which pass the gate on demo data."""

    draws: int = Field(default=1000, description="posterior draws per chain")
    tune: int = Field(default=1000, description="tuning steps per chain")
    chains: int = Field(default=4, description="number of chains")
    target_accept: float = Field(default=0.9, description="NUTS target acceptance")
    random_seed: int = Field(default=42, description="sampler seed")
    sampler: str = Field(default="nutpie", description="nutpie or pymc")
    parameterization: str = Field(
        default="auto", description="auto (chosen from the data), centered or non_centered"
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
            dagster_run_id=context.run_id,
        )
    d = fitted.diagnostics
    context.log.info(f"credibility {month}: gate failures: {d['gate_failures'] or 'none'}")
    return MaterializeResult(
        metadata={
            **{k: float(d[k]) for k in ("max_rhat", "min_ess_bulk", "min_ess_tail")},
            "n_divergences": int(d["n_divergences"]),
            **{k: d[k] for k in ("parameterization", "sampler", "n_districts")},
            **{k: float(d[k]) for k in ("sigma_district_mean", "grand_mean_rate")},
            "sampling_seconds": round(d["sampling_seconds"], 3),
            "compile_seconds": round(d["compile_seconds"], 3),
            "netcdf": MetadataValue.path(fitted.netcdf_uri),
            "mlflow_run": MetadataValue.url(fitted.mlflow_run_url),
            "mlflow_run_id": d["mlflow_run_id"],
            "trace_plot": png_markdown(fitted.trace_png, "trace plot"),
            "shrinkage_plot": png_markdown(fitted.shrinkage_png, "shrinkage plot"),
        }
    )


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
        "only when the posterior of the same month passed every convergence check."
    ),
    automation_condition=gated_eager(),
)
def credibility_table(
    context: AssetExecutionContext, lake: LakeResource, tracking: TrackingResource
) -> MaterializeResult:
    """Write the estimates of a converged posterior; refuse otherwise."""
    from pipeline.domain.credibility import convergence_failures

    month = context.partition_key
    diagnostics = store.read_diagnostics(lake, month)
    window = store.read_claims_window(lake, month)
    rule_failures = (
        convergence_failures(diagnostics)
        if diagnostics
        else [f"no stored posterior diagnostics for {month}"]
    )
    require_gate(
        instance=context.instance,
        asset_key=keys.CREDIBILITY_POSTERIOR,
        check_names=keys.CONVERGENCE_CHECKS,
        partition_key=month,
        rule_failures=[*rule_failures, *store.stale_posterior_failures(diagnostics, window, month)],
        what="the credibility table",
    )
    table = credibility_table_rows(
        lake, month=month, window=window, diagnostics=diagnostics, dagster_run_id=context.run_id
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
