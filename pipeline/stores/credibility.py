"""What the credibility model stores, and the rules that judge it in later runs.

The posterior of a month lives under ``gold/credibility_posterior/month=<month>/``
(ArviZ netCDF plus ``diagnostics.json``); the checks, the table's guard and the
fitting job all read it through these functions.
"""

import hashlib
import json

import polars as pl

from pipeline import keys
from pipeline.domain import contracts
from pipeline.resources.lake import LakeResource

EXPERIMENT = "claims_credibility"
MODEL_NAME = "claims_frequency_by_district"
MODEL_TYPE = "hierarchical_poisson"
WINDOW_MONTHS = 12


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


def table_rule_failures(diagnostics: dict, window: pl.DataFrame, month: str) -> list[str]:
    """Why the credibility table of ``month`` may not be written from the stored posterior.

    The gate recomputed on the stored diagnostics, and staleness against ``window``.
    """
    from pipeline.domain.credibility import gate_failures

    if not diagnostics:
        return [f"no stored posterior diagnostics for {month}"]
    return [*gate_failures(diagnostics), *stale_posterior_failures(diagnostics, window, month)]


def check_metadata(diagnostics: dict) -> dict[str, float | int | str]:
    """The stored facts every check on the posterior shows beside its verdict.

    Posterior predictive figures are left out for a posterior stored before the check
    existed (its check fails and says so).
    """
    ppc = {
        key: diagnostics[key]
        for key in ("ppc_pearson_p_value", "ppc_share_outside_98", "ppc_n_outside_98")
        if key in diagnostics
    }
    return {
        "max_rhat": float(diagnostics["max_rhat"]),
        "min_ess_bulk": float(diagnostics["min_ess_bulk"]),
        "min_ess_tail": float(diagnostics["min_ess_tail"]),
        "n_divergences": int(diagnostics["n_divergences"]),
        "draw_rounds": len(diagnostics.get("draw_rounds", [])) or 1,
        "draws_per_chain": int(diagnostics.get("draws_per_chain", 0)),
        "parameterization": diagnostics.get("parameterization", ""),
        **ppc,
    }


def read_diagnostics(lake: LakeResource, month: str) -> dict:
    """Diagnostics stored beside the posterior (empty when never fitted)."""
    uri = posterior_uri(lake, month, "diagnostics.json")
    return json.loads(lake.read_bytes(uri)) if lake.file_exists(uri) else {}


def write_diagnostics(lake: LakeResource, month: str, diagnostics: dict) -> None:
    """Store diagnostics beside the posterior: what checks and guards judge later."""
    lake.write_bytes(
        posterior_uri(lake, month, "diagnostics.json"), json.dumps(diagnostics).encode()
    )
