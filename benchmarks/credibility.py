"""Credibility posterior: the notebook's per-policy fit against the project's path.

Run as ``python -m benchmarks.credibility [--quick]``. One synthetic portfolio of 10,000,000
policies over 200 districts is generated once with numpy; every size below is a prefix of it
(districts are assigned independently per policy, so a prefix is a random sample).

* Baseline, "the notebook's configuration": a Poisson likelihood per policy row with an
  exposure offset, sampled by PyMC's default NUTS with
  ``pm.sample(draws=1000, tune=1000, chains=4, target_accept=0.9, random_seed=42)``, at
  20,000 and 100,000 rows. It uses the same priors and the same parameterisation as the
  project's path (chosen by ``choose_parameterization``), and the same number of parallel
  chains (``cores=min(4, cpu_count)``; PyMC's own default, half the CPUs, would run the
  chains one after another on a 2-CPU machine and flatter the project), so the comparison
  isolates the likelihood (per policy vs sufficient statistics) and the sampler.
* Project: ``aggregate_district_stats`` (validation + group-by to 200 rows, timed) and
  ``fit_hierarchical_poisson`` with nutpie at its defaults (same draws, tune, chains,
  target_accept, seed), at 100,000, 1,000,000 and 10,000,000 rows.

"Posterior time" is the part that scales with data and runs on every materialisation:
aggregation + sampling for the project, sampling for the baseline (PyMC's ``sampling_time``).
Compilation (numba for nutpie, C for PyMC) is reported apart, and an end-to-end ratio that
includes it is printed for information.

Targets (PASS/FAIL, exit code 1 on any FAIL):
1. project posterior time at 100,000 rows >= 50x faster than the baseline's, at equal or
   better min bulk ESS (if the project's 1000-draw run has the lower ESS, it is re-run with
   proportionally more draws and that measured run is compared);
2. project sampling time flat from 100,000 to 10,000,000 rows (max/min <= 1.5): the model
   only sees 200 districts whatever the number of policies.

``--quick`` skips the 100,000-row baseline and extrapolates it linearly in rows from the
20,000-row run (per-policy likelihood cost is linear in rows); such figures are labelled
``extrapolated``. Results are also written as JSON to ``benchmarks/results/credibility.json``.
"""

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from pipeline.domain.credibility import (
    aggregate_district_stats,
    choose_parameterization,
    convergence_summary,
    fit_hierarchical_poisson,
)

N_DISTRICTS = 200
TRUE_ALPHA = math.log(0.1)
TRUE_SIGMA = 0.3
SEED = 20240601
BASELINE_ROWS = (20_000, 100_000)
PROJECT_ROWS = (100_000, 1_000_000, 10_000_000)
SPEEDUP_TARGET = 50.0
FLATNESS_TARGET = 1.5
PROJECT_REPEATS = 3
RESULTS = Path(__file__).parent / "results" / "credibility.json"


def simulate_policies(n_rows: int, seed: int = SEED) -> pl.DataFrame:
    """Policy rows: district (uneven shares), exposure U(0.2, 1) years, Poisson claims."""
    rng = np.random.default_rng(seed)
    names = np.array([f"D{i:03d}" for i in range(N_DISTRICTS)])
    share = rng.dirichlet(np.full(N_DISTRICTS, 2.0))
    rates = np.exp(TRUE_ALPHA + TRUE_SIGMA * rng.standard_normal(N_DISTRICTS))
    district = rng.choice(N_DISTRICTS, size=n_rows, p=share)
    exposure = rng.uniform(0.2, 1.0, size=n_rows)
    claims = rng.poisson(exposure * rates[district])
    return pl.DataFrame(
        {
            "district": pl.Series(names).gather(district),
            "exposure": exposure,
            "claim_count": claims,
        }
    )


def baseline_fit(policies: pl.DataFrame, parameterization: str) -> dict[str, Any]:
    """The notebook's fit: one Poisson term per policy, PyMC's default sampler."""
    import pymc as pm

    stats = aggregate_district_stats(policies)  # priors only: pooled rate, district list
    districts = stats["district"].to_list()
    index = policies["district"].cast(pl.Enum(districts)).to_physical().to_numpy()
    pooled = (float(stats["claim_count"].sum()) + 0.5) / float(stats["exposure"].sum())
    started = time.perf_counter()
    with pm.Model(coords={"district": districts}):
        alpha = pm.Normal("alpha", mu=math.log(pooled), sigma=1.0)
        sigma = pm.HalfNormal("sigma_district", sigma=1.0)
        if parameterization == "centered":
            log_rate = pm.Normal("log_rate_district", mu=alpha, sigma=sigma, dims="district")
        else:
            z = pm.Normal("z_district", mu=0.0, sigma=1.0, dims="district")
            log_rate = alpha + sigma * z
        pm.Deterministic("rate_district", pm.math.exp(log_rate), dims="district")
        pm.Poisson(
            "claim_count",
            mu=pm.math.exp(np.log(policies["exposure"].to_numpy()) + log_rate[index]),
            observed=policies["claim_count"].to_numpy(),
        )
        idata = pm.sample(
            draws=1000,
            tune=1000,
            chains=4,
            target_accept=0.9,
            random_seed=42,
            cores=min(4, os.cpu_count() or 1),
            progressbar=False,
            compute_convergence_checks=False,
        )
    wall = time.perf_counter() - started
    sampling = float(idata.posterior.attrs["sampling_time"])
    summary = convergence_summary(idata)
    return {
        "rows": policies.height,
        "path": "baseline",
        "draws": 1000,
        "extrapolated": False,
        "parameterization": parameterization,
        "compile_seconds": wall - sampling,
        "sampling_seconds": sampling,
        "posterior_seconds": sampling,
        "wall_seconds": wall,
        **summary,
        "ess_per_second": summary["min_ess_bulk"] / sampling,
    }


def project_fit(policies: pl.DataFrame, draws: int = 1000) -> dict[str, Any]:
    """Aggregate to sufficient statistics, then nutpie; timings are the best of repeats.

    The best (minimum) of ``PROJECT_REPEATS`` runs is reported because other processes on
    the machine can only add time to a sub-second measurement; the draws are identical
    across repeats (same seed).
    """
    runs = []
    for _ in range(PROJECT_REPEATS):
        started = time.perf_counter()
        stats = aggregate_district_stats(policies)
        aggregation = time.perf_counter() - started
        idata = fit_hierarchical_poisson(stats, draws=draws)
        attrs = idata.posterior.attrs
        runs.append((aggregation, attrs["compile_seconds"], attrs["sampling_seconds"], idata))
    aggregation = min(r[0] for r in runs)
    compile_seconds = min(r[1] for r in runs)
    sampling = min(r[2] for r in runs)
    idata = runs[-1][3]
    summary = convergence_summary(idata)
    return {
        "rows": policies.height,
        "path": "project",
        "draws": draws,
        "extrapolated": False,
        "parameterization": idata.posterior.attrs["parameterization"],
        "aggregation_seconds": aggregation,
        "compile_seconds": compile_seconds,
        "sampling_seconds": sampling,
        "posterior_seconds": aggregation + sampling,
        "wall_seconds": aggregation + compile_seconds + sampling,
        "first_compile_seconds": runs[0][1],
        **summary,
        "ess_per_second": summary["min_ess_bulk"] / (aggregation + sampling),
    }


def extrapolate(measured: dict[str, Any], rows: int) -> dict[str, Any]:
    """Scale a baseline run's data-dependent times linearly in rows; ESS is carried over."""
    factor = rows / measured["rows"]
    result = dict(measured)
    result.update(
        rows=rows,
        extrapolated=True,
        sampling_seconds=measured["sampling_seconds"] * factor,
        posterior_seconds=measured["posterior_seconds"] * factor,
        wall_seconds=measured["compile_seconds"] + measured["sampling_seconds"] * factor,
    )
    result["ess_per_second"] = result["min_ess_bulk"] / result["sampling_seconds"]
    return result


def fmt_row(r: dict[str, Any]) -> str:
    label = "baseline (extrapolated)" if r["extrapolated"] else r["path"]
    if r["draws"] != 1000:
        label = f"{label} {r['draws']} draws"
    aggregation = r.get("aggregation_seconds")
    return (
        f"{label:<24} {r['rows']:>11,} {r['parameterization']:<13} "
        f"{(f'{aggregation:8.3f}' if aggregation is not None else '       -')} "
        f"{r['compile_seconds']:8.2f} {r['sampling_seconds']:9.2f} {r['posterior_seconds']:9.2f} "
        f"{r['min_ess_bulk']:9.0f} {r['max_rhat']:7.4f} {r['n_divergences']:5d} "
        f"{r['ess_per_second']:10.1f}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="skip the 100,000-row baseline; extrapolate it linearly from 20,000 rows",
    )
    parser.add_argument("--output", type=Path, default=RESULTS, help="JSON results path")
    args = parser.parse_args(argv)

    load_start = os.getloadavg()
    print(f"load average at start: {load_start[0]:.1f} on {os.cpu_count()} CPUs", flush=True)
    started = time.perf_counter()
    all_policies = simulate_policies(max(PROJECT_ROWS))
    generation = time.perf_counter() - started
    print(f"generated {all_policies.height:,} policy rows in {generation:.1f} s", flush=True)

    results: list[dict[str, Any]] = []
    for rows in PROJECT_ROWS:
        r = project_fit(all_policies.head(rows))
        results.append(r)
        print(f"project  {rows:>11,}: done ({r['posterior_seconds']:.2f} s posterior)", flush=True)

    parameterization = choose_parameterization(all_policies.head(BASELINE_ROWS[-1]))
    baseline_rows = BASELINE_ROWS[:1] if args.quick else BASELINE_ROWS
    for rows in baseline_rows:
        r = baseline_fit(all_policies.head(rows), parameterization)
        results.append(r)
        print(f"baseline {rows:>11,}: done ({r['sampling_seconds']:.1f} s sampling)", flush=True)
    if args.quick:
        results.append(extrapolate(results[-1], BASELINE_ROWS[-1]))

    print()
    print(
        f"{'path':<24} {'rows':>11} {'form':<13} {'agg s':>8} {'compile':>8} {'sample s':>9} "
        f"{'post. s':>9} {'min ESS':>9} {'R-hat':>7} {'div':>5} {'ESS/s':>10}"
    )
    for r in sorted(results, key=lambda r: (r["path"], r["rows"])):
        print(fmt_row(r))

    project = {r["rows"]: r for r in results if r["path"] == "project"}
    baseline = {r["rows"]: r for r in results if r["path"] == "baseline"}
    ref_rows = BASELINE_ROWS[-1]
    base, ours = baseline[ref_rows], project[ref_rows]
    # "At equal or better min bulk ESS": the two samplers land within noise of each other at
    # 1000 draws (both near the 4000-draw ceiling for sigma_district), so when the project's
    # run has the lower ESS it is run again with proportionally more draws and that run,
    # not an extrapolation, is what the speed target compares.
    for _ in range(3):
        if ours["min_ess_bulk"] >= base["min_ess_bulk"]:
            break
        draws = math.ceil(ours["draws"] * 1.15 * base["min_ess_bulk"] / ours["min_ess_bulk"])
        ours = project_fit(all_policies.head(ref_rows), draws=draws)
        results.append({**ours, "path": "project (equal ESS)"})
        print(fmt_row(results[-1]))
    speedup = base["posterior_seconds"] / ours["posterior_seconds"]
    wall_speedup = base["wall_seconds"] / ours["wall_seconds"]
    ess_ratio = ours["min_ess_bulk"] / base["min_ess_bulk"]
    ess_rate_ratio = ours["ess_per_second"] / base["ess_per_second"]
    samplings = [project[n]["sampling_seconds"] for n in PROJECT_ROWS]
    posteriors = [project[n]["posterior_seconds"] for n in PROJECT_ROWS]
    flatness = max(samplings) / min(samplings)
    posterior_growth = max(posteriors) / min(posteriors)
    note = " (baseline extrapolated from 20,000 rows)" if base["extrapolated"] else ""

    targets = [
        {
            "name": f"posterior time >= {SPEEDUP_TARGET:.0f}x faster than notebook at "
            f"{ref_rows:,} rows, at equal or better min bulk ESS ({ours['draws']} draws)",
            "value": speedup,
            "ess_ratio": ess_ratio,
            "extrapolated": base["extrapolated"],
            "passed": speedup >= SPEEDUP_TARGET and ess_ratio >= 1.0,
        },
        {
            "name": f"sampling time flat (max/min <= {FLATNESS_TARGET}) from "
            f"{PROJECT_ROWS[0]:,} to {PROJECT_ROWS[-1]:,} rows",
            "value": flatness,
            "passed": flatness <= FLATNESS_TARGET,
        },
    ]
    print()
    print(
        f"speedup, posterior time at {ref_rows:,} rows: {speedup:.0f}x{note}; project run with "
        f"{ours['draws']} draws per chain, min bulk ESS {ours['min_ess_bulk']:.0f} vs "
        f"{base['min_ess_bulk']:.0f}"
    )
    print(f"speedup, end-to-end wall incl. compilation: {wall_speedup:.1f}x{note}")
    print(
        f"min bulk ESS ratio project/baseline: {ess_ratio:.2f}; ESS/s ratio: {ess_rate_ratio:.0f}x"
    )
    print(
        f"project sampling max/min over {PROJECT_ROWS[0]:,}..{PROJECT_ROWS[-1]:,} rows: "
        f"{flatness:.2f}; posterior time incl. aggregation max/min: {posterior_growth:.2f}"
    )
    print(f"load average at end: {os.getloadavg()[0]:.1f} (wall times include other processes)")
    for t in targets:
        print(f"{'PASS' if t['passed'] else 'FAIL'}: {t['name']} -> {t['value']:.2f}")

    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(
        json.dumps(
            {
                "benchmark": "credibility",
                "quick": args.quick,
                "machine": {
                    "python": platform.python_version(),
                    "cpus": os.cpu_count(),
                    "platform": platform.platform(),
                    "load_average_start": load_start,
                    "load_average_end": os.getloadavg(),
                },
                "n_districts": N_DISTRICTS,
                "generation_seconds": generation,
                "results": results,
                "speedup_posterior": speedup,
                "speedup_wall": wall_speedup,
                "ess_ratio": ess_ratio,
                "ess_per_second_ratio": ess_rate_ratio,
                "sampling_flatness": flatness,
                "posterior_growth": posterior_growth,
                "targets": targets,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"results written to {args.output}")
    return 0 if all(t["passed"] for t in targets) else 1


if __name__ == "__main__":
    sys.exit(main())
