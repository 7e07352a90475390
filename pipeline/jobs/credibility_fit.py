"""Fit, store and log one month's credibility posterior."""

import dataclasses
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
from dagster import MetadataValue

from pipeline import keys
from pipeline.audit import with_audit
from pipeline.metadata import markdown_table, png_markdown
from pipeline.resources.lake import LakeResource
from pipeline.resources.tracking import TrackingResource
from pipeline.stores import credibility as store


@dataclass(frozen=True)
class SamplerSettings:
    """How the posterior is sampled (the asset's run config, as plain data)."""

    draws: int = 1000
    tune: int = 1000
    chains: int = 4
    target_accept: float = 0.9
    random_seed: int = 42
    sampler: str = "nutpie"
    parameterization: str = "auto"
    max_draw_rounds: int = 3
    max_total_draws: int = 7000


@dataclass(frozen=True)
class FittedPosterior:
    """What one fit stored and logged: diagnostics (also beside the netCDF) and pictures."""

    diagnostics: dict
    netcdf_uri: str
    mlflow_run_url: str
    trace_png: bytes
    shrinkage_png: bytes


def fit_month(
    window: pl.DataFrame,
    *,
    month: str,
    settings: SamplerSettings,
    lake: LakeResource,
    tracking: TrackingResource,
    dagster_run_id: str,
) -> FittedPosterior:
    """Fit the hierarchical Poisson model on a claims window, then store and log it.

    The fit draws longer samples while R-hat or ESS fall short (within the settings'
    budget, :func:`pipeline.domain.credibility.fit_until_converged`); the final sample is
    stored and judged, every round is recorded. The posterior predictive statistics are
    computed on the window's district-month counts. The netCDF and ``diagnostics.json``
    go under the month's folder of ``gold/credibility_posterior``; the MLflow run holds
    parameters, convergence and posterior predictive metrics (per round too), the
    netCDF, the trace and shrinkage plots and the estimates. The gate is not applied
    here: the diagnostics record its failures, and the checks and the table's guard
    decide.
    """
    from pipeline.domain import credibility, plots

    stats = credibility.aggregate_district_stats(window.select(credibility.DISTRICT_COLUMNS))
    fit = credibility.fit_until_converged(stats, **dataclasses.asdict(settings))
    idata, summary, rounds = fit.idata, fit.summary, fit.rounds
    ppc = credibility.posterior_predictive_summary(
        idata, window.select(credibility.DISTRICT_COLUMNS), random_seed=settings.random_seed
    )
    failures = credibility.gate_failures({**summary, **ppc})
    attrs = dict(idata.posterior.attrs)
    estimates = credibility.credibility_estimates(idata, stats, store.district_periods(window))
    facts = {
        "n_districts": stats.height,
        "sigma_district_mean": float(idata.posterior["sigma_district"].mean()),
        "grand_mean_rate": float(stats["claim_count"].sum() / stats["exposure"].sum()),
        "draws_per_chain": int(attrs["draws"]),
        "total_draws_per_chain": int(attrs["total_draws"]),
    }
    trace_png = plots.trace_plot_png(idata)
    shrinkage_png = plots.shrinkage_plot_png(estimates, facts["grand_mean_rate"])
    with tempfile.TemporaryDirectory() as tmp:
        nc_path = Path(tmp) / "posterior.nc"
        idata.to_netcdf(str(nc_path))
        netcdf = nc_path.read_bytes()
    with tracking.start_run(
        experiment=store.EXPERIMENT,
        run_name=f"credibility_{month}",
        dagster_run_id=dagster_run_id,
        asset_key=keys.CREDIBILITY_POSTERIOR.to_user_string(),
        partition_key=month,
        tags={"model_type": store.MODEL_TYPE, "gate": "passed" if not failures else "failed"},
    ) as run:
        run.log_params(
            {
                **dataclasses.asdict(settings),
                "parameterization_used": attrs["parameterization"],
                "random_seed_used": attrs["random_seed"],
                "window_months": ",".join(sorted(window["month"].unique())),
            }
        )
        run.log_metrics(
            {
                **{k: float(v) for k, v in summary.items()},
                **{k: float(v) for k, v in ppc.items()},
                **facts,
                **round_metrics(rounds),
                "n_policies": int(window["n_policies"].sum()),
                "compile_seconds": attrs["compile_seconds"],
                "sampling_seconds": attrs["sampling_seconds"],
            }
        )
        run.log_files(
            {
                "posterior.nc": netcdf,
                "trace.png": trace_png,
                "shrinkage.png": shrinkage_png,
                "estimates.csv": estimates.write_csv().encode(),
            }
        )
    nc_uri = lake.write_bytes(store.posterior_uri(lake, month), netcdf)
    diagnostics = {
        **summary,
        **ppc,
        **facts,
        "draw_rounds": rounds,
        "gate_failures": failures,
        "parameterization": attrs["parameterization"],
        "sampler": attrs["sampler"],
        "sampling_seconds": attrs["sampling_seconds"],
        "compile_seconds": attrs["compile_seconds"],
        "mlflow_run_id": run.run_id,
        "mlflow_experiment_id": run.experiment_id,
        "dagster_run_id": dagster_run_id,
        "window_months": sorted(window["month"].unique().to_list()),
        "data_fingerprint": store.data_fingerprint(window),
    }
    store.write_diagnostics(lake, month, diagnostics)
    return FittedPosterior(
        diagnostics=diagnostics,
        netcdf_uri=nc_uri,
        mlflow_run_url=tracking.run_url(run.experiment_id, run.run_id),
        trace_png=trace_png,
        shrinkage_png=shrinkage_png,
    )


def round_metrics(rounds: list[dict[str, Any]]) -> dict[str, float]:
    """MLflow metrics of the sampling rounds: their number, and each round's figures."""
    metrics: dict[str, float] = {"draw_rounds": float(len(rounds))}
    for entry in rounds:
        for name in ("draws", "max_rhat", "min_ess_bulk", "min_ess_tail", "n_divergences"):
            metrics[f"round{entry['round']}_{name}"] = float(entry[name])
    return metrics


def rounds_table(rounds: list[dict[str, Any]]) -> str:
    """Markdown table of the sampling rounds (the last one is the sample that was judged)."""
    frame = pl.DataFrame(
        [
            {
                **{k: r[k] for k in ("round", "draws", "random_seed", "max_rhat")},
                **{k: r[k] for k in ("min_ess_bulk", "min_ess_tail", "n_divergences")},
                "failures": "; ".join(r["failures"]) or "none",
            }
            for r in rounds
        ]
    )
    return markdown_table(frame)


def posterior_metadata(fitted: FittedPosterior) -> dict[str, Any]:
    """What the UI shows for one month's posterior: gate figures, rounds, links, plots."""
    d = fitted.diagnostics
    floats = ("max_rhat", "min_ess_bulk", "min_ess_tail", "sigma_district_mean", "grand_mean_rate")
    return {
        **{k: float(d[k]) for k in floats},
        **{k: float(d[k]) for k in ("ppc_pearson_p_value", "ppc_share_outside_98")},
        **{k: int(d[k]) for k in ("n_divergences", "draws_per_chain", "total_draws_per_chain")},
        "draw_rounds": len(d["draw_rounds"]),
        "draw_rounds_table": MetadataValue.md(rounds_table(d["draw_rounds"])),
        **{k: d[k] for k in ("parameterization", "sampler", "n_districts")},
        "sampling_seconds": round(d["sampling_seconds"], 3),
        "compile_seconds": round(d["compile_seconds"], 3),
        "netcdf": MetadataValue.path(fitted.netcdf_uri),
        "mlflow_run": MetadataValue.url(fitted.mlflow_run_url),
        "mlflow_run_id": d["mlflow_run_id"],
        "trace_plot": png_markdown(fitted.trace_png, "trace plot"),
        "shrinkage_plot": png_markdown(fitted.shrinkage_png, "shrinkage plot"),
    }


def credibility_table_rows(
    lake: LakeResource,
    *,
    month: str,
    window: pl.DataFrame,
    diagnostics: dict,
    dagster_run_id: str,
    inputs: dict[str, int | None],
) -> pl.DataFrame:
    """The rating-table rows of a month from its stored posterior (no gate applied here).

    ``inputs`` are the Delta versions the window was read at (audit columns).
    """
    import datetime as dt

    import arviz as az

    from pipeline.domain import credibility

    stats = credibility.aggregate_district_stats(window.select(credibility.DISTRICT_COLUMNS))
    with tempfile.TemporaryDirectory() as tmp:
        nc_path = Path(tmp) / "posterior.nc"
        nc_path.write_bytes(lake.read_bytes(store.posterior_uri(lake, month)))
        idata = az.from_netcdf(str(nc_path))
        estimates = credibility.credibility_estimates(idata, stats, store.district_periods(window))
    rows = estimates.with_columns(
        pl.lit(month).alias("month"),
        pl.lit(store.MODEL_NAME).alias("model_name"),
        pl.lit(store.MODEL_TYPE).alias("model_type"),
        pl.lit(dt.date.today()).alias("run_date"),
        pl.lit(float(diagnostics["max_rhat"])).alias("max_rhat"),
        pl.lit(int(diagnostics["n_divergences"])).alias("n_divergences"),
        pl.lit(float(diagnostics["min_ess_bulk"])).alias("min_ess_bulk"),
    )
    return with_audit(
        rows,
        dagster_run_id=dagster_run_id,
        inputs=inputs,
        mlflow_run_id=diagnostics["mlflow_run_id"],
    )
