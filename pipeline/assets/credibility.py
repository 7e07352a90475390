"""Claim-frequency credibility: posterior (gated) and the rating table.

``credibility_posterior`` fits the hierarchical Poisson model on a trailing
window of ``claims_by_district``, stores the ArviZ netCDF under
``gold/credibility_posterior/month=<month>/`` beside its diagnostics, and logs
both to MLflow. ``credibility_table`` writes the estimates only when the
convergence gate passed for that month, in this run or any earlier one, and only
from a posterior fitted on the claims now stored (a re-delivered month makes the
posterior stale until it is refitted).
"""

import datetime as dt
import hashlib
import json
import tempfile
from pathlib import Path

import polars as pl
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
from pipeline.assets.metadata import column_schema, markdown_table, png_markdown
from pipeline.automation import (
    MODEL_POOL,
    domain_errors_are_final,
    gated_eager,
    model_retry_policy,
)
from pipeline.checks.gates import require_gate
from pipeline.domain import contracts
from pipeline.partitions import month_partitions
from pipeline.resources.lake import LakeResource
from pipeline.resources.tracking import TrackingResource

EXPERIMENT = "claims_credibility"
MODEL_NAME = "claims_frequency_by_district"
MODEL_TYPE = "hierarchical_poisson"
WINDOW_MONTHS = 12
CLAIMS_WINDOW = TimeWindowPartitionMapping(
    start_offset=-(WINDOW_MONTHS - 1), end_offset=0, allow_nonexistent_upstream_partitions=True
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


def posterior_uri(lake: LakeResource, month: str, name: str = "posterior.nc") -> str:
    """Where the posterior of ``month`` (and its sidecar files) is stored."""
    return lake.file_uri("gold", "credibility_posterior", f"month={month}", name)


def window_months(month: str) -> list[str]:
    """The ``WINDOW_MONTHS`` month keys ending at ``month`` (oldest first)."""
    year, mon = (int(part) for part in month.split("-"))
    index = year * 12 + mon - 1
    return [f"{i // 12:04d}-{i % 12 + 1:02d}" for i in range(index - WINDOW_MONTHS + 1, index + 1)]


def read_claims_window(lake: LakeResource, month: str) -> pl.DataFrame:
    """Curated district statistics of the trailing window (one row per district and month)."""
    frame = lake.read("curated", "claims_by_district", {"month": window_months(month)})
    if frame.height == 0 or frame.filter(pl.col("month") == month).height == 0:
        raise contracts.ContractError(
            f"credibility partition {month}: curated/claims_by_district has no rows for {month}; "
            "materialise it first"
        )
    return frame.sort("month", "district")


def district_periods(window: pl.DataFrame) -> pl.DataFrame | None:
    """Per-month district frequencies for Bühlmann–Straub, or None with a single month.

    With one month the within-district variance cannot be estimated from the data;
    :func:`pipeline.domain.credibility.credibility_estimates` then takes it from the
    Poisson assumption instead.
    """
    if window["month"].n_unique() < 2:
        return None
    return window.select("district", pl.col("month").alias("period"), "exposure", "claim_count")


def claims_rule_failures(lake: LakeResource, month: str) -> list[str]:
    """The curated contract recomputed on the stored month (guard for later runs)."""
    stored = lake.read("curated", "claims_by_district", {"month": month})
    return contracts.contract_failures(
        stored, contracts.claims_by_district_contract(month), f"claims_by_district {month}"
    )


def data_fingerprint(window: pl.DataFrame) -> str:
    """SHA-256 of the stored ``claims_by_district`` rows a posterior is fitted on.

    Stored beside the posterior so that ``credibility_table`` can tell whether
    ``claims_by_district`` changed after the fit (a corrected delivery re-curates a
    month of the window and triggers the eager table before anyone refits). It hashes
    the rows as stored, not the per-district sums, with exposure rounded to 1e-6
    policy-years: a parallel group-by adds in no fixed order, so re-curating an
    identical delivery, or summing the window again, may change the last bit of a sum.
    """
    payload = (
        window.select("month", "district", pl.col("exposure").round(6), "claim_count")
        .sort("month", "district")
        .write_csv()
    )
    return hashlib.sha256(payload.encode()).hexdigest()


def stale_posterior_failures(diagnostics: dict, window: pl.DataFrame, month: str) -> list[str]:
    """Why the stored posterior cannot be paired with the current window (empty if it can)."""
    if not diagnostics:
        return []
    fitted_on = diagnostics.get("data_fingerprint")
    if fitted_on == data_fingerprint(window):
        return []
    months = ", ".join(diagnostics.get("window_months", [])) or "unknown"
    what = (
        "the stored posterior does not record the claims it was fitted on"
        if fitted_on is None
        else f"claims_by_district changed since the posterior was fitted on months {months}"
    )
    return [f"{what}; materialise {keys.CREDIBILITY_POSTERIOR.to_user_string()} for {month} again"]


def read_diagnostics(lake: LakeResource, month: str) -> dict:
    """Diagnostics stored beside the posterior (empty when never fitted)."""
    uri = posterior_uri(lake, month, "diagnostics.json")
    return json.loads(lake.read_bytes(uri)) if lake.file_exists(uri) else {}


@asset(
    key=keys.CREDIBILITY_POSTERIOR,
    partitions_def=month_partitions,
    deps=[AssetDep(keys.CLAIMS_BY_DISTRICT, partition_mapping=CLAIMS_WINDOW)],
    group_name="credibility",
    kinds={"pymc", "mlflow", "netcdf"},
    description=(
        "Hierarchical Poisson posterior of claim frequency by district, fitted on the "
        f"trailing {WINDOW_MONTHS} months of claims_by_district (ArviZ netCDF + MLflow run)."
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
    """Fit, store and log the posterior of one valuation month."""
    with domain_errors_are_final():
        return fit_posterior(context, config, lake, tracking)


def fit_posterior(
    context: AssetExecutionContext,
    config: CredibilityConfig,
    lake: LakeResource,
    tracking: TrackingResource,
) -> MaterializeResult:
    """Body of :func:`credibility_posterior` (domain errors are final, the rest retried)."""
    from pipeline.domain import credibility, plots

    month = context.partition_key
    require_gate(
        instance=context.instance,
        asset_key=keys.CLAIMS_BY_DISTRICT,
        check_names=(keys.CHECK_CURATED_CONTRACT, keys.CHECK_RECONCILES),
        partition_key=month,
        rule_failures=claims_rule_failures(lake, month),
        what="a posterior",
    )
    window = read_claims_window(lake, month)
    stats = credibility.aggregate_district_stats(window.select(credibility.DISTRICT_COLUMNS))
    idata = credibility.fit_hierarchical_poisson(
        stats,
        draws=config.draws,
        tune=config.tune,
        chains=config.chains,
        target_accept=config.target_accept,
        random_seed=config.random_seed,
        sampler=config.sampler,
        parameterization=config.parameterization,
    )
    summary = credibility.convergence_summary(idata)
    failures = credibility.convergence_failures(summary)
    attrs = dict(idata.posterior.attrs)
    sigma_mean = float(idata.posterior["sigma_district"].mean())
    grand_mean_rate = float(stats["claim_count"].sum() / stats["exposure"].sum())
    periods = district_periods(window)
    estimates = credibility.credibility_estimates(idata, stats, periods)

    with tempfile.TemporaryDirectory() as tmp:
        nc_path = Path(tmp) / "posterior.nc"
        idata.to_netcdf(str(nc_path))
        trace_png = plots.trace_plot_png(idata)
        shrinkage_png = plots.shrinkage_plot_png(estimates, grand_mean_rate)
        (Path(tmp) / "trace.png").write_bytes(trace_png)
        (Path(tmp) / "shrinkage.png").write_bytes(shrinkage_png)
        estimates.write_csv(Path(tmp) / "estimates.csv")
        with tracking.start_run(
            experiment=EXPERIMENT,
            run_name=f"credibility_{month}",
            dagster_run_id=context.run_id,
            asset_key=keys.CREDIBILITY_POSTERIOR.to_user_string(),
            partition_key=month,
            tags={"model_type": MODEL_TYPE, "gate": "passed" if not failures else "failed"},
        ) as run:
            import mlflow

            mlflow.log_params(
                {
                    **config.model_dump(),
                    "parameterization_used": attrs["parameterization"],
                    "window_months": ",".join(sorted(window["month"].unique())),
                }
            )
            mlflow.log_metrics(
                {
                    **{k: float(v) for k, v in summary.items()},
                    "n_districts": stats.height,
                    "n_policies": int(window["n_policies"].sum()),
                    "sigma_district_mean": sigma_mean,
                    "grand_mean_rate": grand_mean_rate,
                    "compile_seconds": attrs["compile_seconds"],
                    "sampling_seconds": attrs["sampling_seconds"],
                }
            )
            for name in ("posterior.nc", "trace.png", "shrinkage.png", "estimates.csv"):
                mlflow.log_artifact(str(Path(tmp) / name))
            run_id, experiment_id = run.info.run_id, run.info.experiment_id
        nc_uri = lake.write_bytes(posterior_uri(lake, month), nc_path.read_bytes())

    diagnostics = {
        **summary,
        "gate_failures": failures,
        "parameterization": attrs["parameterization"],
        "sampler": attrs["sampler"],
        "mlflow_run_id": run_id,
        "mlflow_experiment_id": experiment_id,
        "dagster_run_id": context.run_id,
        "n_districts": stats.height,
        "sigma_district_mean": sigma_mean,
        "grand_mean_rate": grand_mean_rate,
        "window_months": sorted(window["month"].unique().to_list()),
        "data_fingerprint": data_fingerprint(window),
    }
    lake.write_bytes(
        posterior_uri(lake, month, "diagnostics.json"), json.dumps(diagnostics).encode()
    )
    context.log.info(f"credibility {month}: {summary}; gate failures: {failures or 'none'}")
    return MaterializeResult(
        metadata={
            **{k: float(v) for k, v in summary.items() if k != "n_divergences"},
            "n_divergences": int(summary["n_divergences"]),
            "parameterization": attrs["parameterization"],
            "sampler": attrs["sampler"],
            "sampling_seconds": round(attrs["sampling_seconds"], 3),
            "compile_seconds": round(attrs["compile_seconds"], 3),
            "n_districts": stats.height,
            "sigma_district_mean": sigma_mean,
            "grand_mean_rate": grand_mean_rate,
            "netcdf": MetadataValue.path(nc_uri),
            "mlflow_run": MetadataValue.url(tracking.run_url(experiment_id, run_id)),
            "mlflow_run_id": run_id,
            "trace_plot": png_markdown(trace_png, "trace plot"),
            "shrinkage_plot": png_markdown(shrinkage_png, "shrinkage plot"),
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
    metadata={"partition_expr": "month"},
)
def credibility_table(
    context: AssetExecutionContext, lake: LakeResource, tracking: TrackingResource
) -> MaterializeResult:
    """Write the estimates of a converged posterior; refuse otherwise."""
    import arviz as az

    from pipeline.domain import credibility

    month = context.partition_key
    diagnostics = read_diagnostics(lake, month)
    window = read_claims_window(lake, month)
    stats = credibility.aggregate_district_stats(window.select(credibility.DISTRICT_COLUMNS))
    rule_failures = (
        credibility.convergence_failures(diagnostics)
        if diagnostics
        else [f"no stored posterior diagnostics for {month}"]
    )
    require_gate(
        instance=context.instance,
        asset_key=keys.CREDIBILITY_POSTERIOR,
        check_names=keys.CONVERGENCE_CHECKS,
        partition_key=month,
        rule_failures=[*rule_failures, *stale_posterior_failures(diagnostics, window, month)],
        what="the credibility table",
    )
    periods = district_periods(window)
    with tempfile.TemporaryDirectory() as tmp:
        nc_path = Path(tmp) / "posterior.nc"
        nc_path.write_bytes(lake.read_bytes(posterior_uri(lake, month)))
        idata = az.from_netcdf(str(nc_path))
        estimates = credibility.credibility_estimates(idata, stats, periods)
    table = estimates.with_columns(
        pl.lit(month).alias("month"),
        pl.lit(MODEL_NAME).alias("model_name"),
        pl.lit(MODEL_TYPE).alias("model_type"),
        pl.lit(dt.date.today()).alias("run_date"),
        pl.lit(float(diagnostics["max_rhat"])).alias("max_rhat"),
        pl.lit(int(diagnostics["n_divergences"])).alias("n_divergences"),
        pl.lit(float(diagnostics["min_ess_bulk"])).alias("min_ess_bulk"),
        pl.lit(diagnostics["mlflow_run_id"]).alias("mlflow_run_id"),
        pl.lit(context.run_id).alias("dagster_run_id"),
    )
    version = lake.overwrite_partition("gold", "credibility_table", table, {"month": month})
    with tempfile.TemporaryDirectory() as tmp:
        csv_path = Path(tmp) / f"credibility_table_{month}.csv"
        table.write_csv(csv_path)
        tracking.client().log_artifact(diagnostics["mlflow_run_id"], str(csv_path))
    return MaterializeResult(
        metadata={
            "dagster/row_count": table.height,
            "dagster/column_schema": column_schema(table),
            "delta_version": version,
            "mlflow_run": MetadataValue.url(
                tracking.run_url(diagnostics["mlflow_experiment_id"], diagnostics["mlflow_run_id"])
            ),
            "mean_bayes_credibility_weight": float(table["bayes_credibility_weight"].mean()),
            "mean_buhlmann_straub_z": float(table["buhlmann_straub_z"].mean()),
            "preview": MetadataValue.md(
                markdown_table(
                    table.select(
                        "district",
                        "exposure",
                        "claim_count",
                        "observed_rate",
                        "posterior_mean_rate",
                        "bayes_credibility_weight",
                        "buhlmann_straub_rate",
                    ).sort("exposure"),
                    max_rows=12,
                )
            ),
            "table_uri": MetadataValue.path(lake.table_uri("gold", "credibility_table")),
        }
    )


credibility_assets = [credibility_posterior, credibility_table]
