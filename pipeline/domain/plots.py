"""Small PNG plots for materialisation metadata and MLflow artefacts.

Plots are rendered off-screen (Agg) to bytes, so the same picture can be
embedded in the Dagster UI and logged to MLflow without touching a display.
"""

import io
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl

if TYPE_CHECKING:
    import arviz


def _figure(width: float = 7.0, height: float = 4.0) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(width, height), dpi=90)


def _png(fig: Any) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def trace_plot_png(
    idata: "arviz.InferenceData", var_names: tuple[str, ...] = ("alpha", "sigma_district")
) -> bytes:
    """ArviZ trace plot of the hyper-parameters (one row per variable)."""
    import arviz as az
    import matplotlib

    matplotlib.use("Agg")
    axes = az.plot_trace(
        idata, var_names=list(var_names), compact=True, figsize=(8, 2.2 * len(var_names))
    )
    return _png(np.asarray(axes).ravel()[0].figure)


def shrinkage_plot_png(estimates: pl.DataFrame, grand_mean_rate: float) -> bytes:
    """Observed against posterior district rates, with 90 % intervals.

    Points below the diagonal for high observed rates (and above it for low
    ones) show the shrinkage towards the portfolio rate; sparse districts, drawn
    small, shrink most.
    """
    fig, ax = _figure(6.5, 5.0)
    observed = estimates["observed_rate"].to_numpy()
    posterior = estimates["posterior_mean_rate"].to_numpy()
    lower = posterior - estimates["rate_q05"].to_numpy()
    upper = estimates["rate_q95"].to_numpy() - posterior
    size = 8 + 60 * estimates["exposure"].to_numpy() / max(estimates["exposure"].max(), 1e-12)
    ax.errorbar(observed, posterior, yerr=[lower, upper], fmt="none", alpha=0.25, lw=0.8)
    ax.scatter(observed, posterior, s=size, alpha=0.7, label="district (size ~ exposure)")
    lim = [0.0, float(max(observed.max(), estimates["rate_q95"].max()) * 1.05)]
    ax.plot(lim, lim, color="grey", lw=1, ls="--", label="no shrinkage")
    ax.axhline(grand_mean_rate, color="tab:red", lw=1, label="portfolio rate")
    ax.set_xlim(lim)
    ax.set_ylim(lim)
    ax.set_xlabel("observed claim frequency")
    ax.set_ylabel("posterior mean frequency (90% interval)")
    ax.legend(loc="upper left", fontsize=8)
    return _png(fig)


def loss_histogram_png(losses: np.ndarray, summary: dict, *, title: str) -> bytes:
    """Histogram of simulated portfolio losses with P10/P50/P90 and VaR 99 % marked."""
    fig, ax = _figure()
    ax.hist(losses, bins=80, color="tab:blue", alpha=0.75)
    for key, colour in (
        ("p10", "tab:green"),
        ("p50", "black"),
        ("p90", "tab:orange"),
        ("var_99", "tab:red"),
    ):
        if key in summary:
            ax.axvline(
                summary[key], color=colour, lw=1.2, label=f"{key.upper()} {summary[key]:,.0f}"
            )
    ax.set_xlabel("portfolio loss")
    ax.set_ylabel("simulations")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return _png(fig)


def score_plot_png(scored: pl.DataFrame, *, title: str) -> bytes:
    """Relative spread over time with flagged anomalies highlighted."""
    fig, ax = _figure(8.0, 3.2)
    ts = scored["ts"].to_numpy()
    spread = scored["spread"].to_numpy()
    flagged = scored["is_anomaly"].to_numpy()
    ax.plot(ts, spread, lw=0.6, color="tab:blue", label="spread")
    ax.scatter(ts[flagged], spread[flagged], s=10, color="tab:red", label="flagged", zorder=3)
    ax.set_ylabel("ask - bid")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return _png(fig)
