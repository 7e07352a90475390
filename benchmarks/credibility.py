"""Credibility posterior: speed against the notebook, and the gate's false-alarm rate.

Run as ``python -m benchmarks.credibility [--quick] [--part speed|gate|all]``.

**Gate** (``--part gate``): ``GATE_FITS`` (100) portfolios of ``--districts`` (40)
districts x 6 months drawn from the model itself (alpha ~ N(log 0.1, 0.3), sigma ~
U(0.1, 0.6), log rate_d ~ N(alpha, sigma), Poisson claims on lognormal exposures), each
fitted as ``credibility_posterior`` does (``fit_until_converged``: 4 chains after 1000
tuning steps, up to 3 rounds / 7000 draws per chain; then the posterior predictive check
on the district-month counts), in two settings of the first round: the asset's default
1000 draws per chain, and a short first sample of 250 draws, where the single-shot gate
raises many false alarms (R-hat and ESS within their noise), so the rounds must do the
work. Every gate failure on such data is a false alarm. Printed per setting: the final
gate's false-alarm rate (target <= 1 %, exit code 1 above) with a 95 % upper bound, per
rule; the rate the first sample alone would have had (the old single-shot gate); rounds
drawn; posterior predictive false alarms; wall time.

**Speed** (``--part speed``). One synthetic portfolio of 10,000,000
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

Speed targets (PASS/FAIL, exit code 1 on any FAIL):
1. project posterior time at 100,000 rows >= 50x faster than the baseline's, at equal or
   better min bulk ESS (if the project's 1000-draw run has the lower ESS, it is re-run with
   proportionally more draws and that measured run is compared);
2. project sampling time flat from 100,000 to 10,000,000 rows (max/min <= 1.5): the model
   only sees 200 districts whatever the number of policies.

``--quick`` skips the 100,000-row baseline and extrapolates it linearly in rows from the
20,000-row run (per-policy likelihood cost is linear in rows); such figures are labelled
``extrapolated``. Results are also written as JSON to ``benchmarks/results/credibility.json``
(a part run alone keeps the other part's last results).
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
    CONVERGENCE_RULES,
    aggregate_district_stats,
    choose_parameterization,
    clear_compiled_models,
    convergence_summary,
    fit_hierarchical_poisson,
    fit_until_converged,
    gate_failures,
    posterior_predictive_failure,
    posterior_predictive_summary,
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
GATE_FITS = 100
GATE_DISTRICTS = 40
GATE_FIRST_DRAWS = {"default": 1000, "short_first_sample": 250}
GATE_MONTHS = 6
GATE_FALSE_ALARM_TARGET = 0.01


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
        clear_compiled_models()  # every repeat compiles, as a new process would
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


def simulate_model_portfolio(
    seed: int, n_districts: int = GATE_DISTRICTS
) -> tuple[pl.DataFrame, dict[str, float]]:
    """District-month claims drawn from the hierarchical Poisson model itself."""
    rng = np.random.default_rng([SEED, seed])
    alpha = TRUE_ALPHA + 0.3 * rng.standard_normal()
    sigma = rng.uniform(0.1, 0.6)
    rates = np.exp(alpha + sigma * rng.standard_normal(n_districts))
    size = rng.lognormal(math.log(150.0), 1.0, n_districts)  # policy-years per district
    exposure = size[:, None] * rng.dirichlet(np.full(GATE_MONTHS, 5.0), n_districts)
    claims = rng.poisson(exposure * rates[:, None])
    names = [f"D{i:03d}" for i in range(n_districts)]
    cells = pl.DataFrame(
        {
            "district": np.repeat(names, GATE_MONTHS),
            "exposure": exposure.ravel(),
            "claim_count": claims.ravel(),
        }
    )
    return cells, {"alpha": alpha, "sigma": sigma}


def gate_fit(seed: int, n_districts: int, draws: int) -> dict[str, Any]:
    """One synthetic portfolio fitted and judged as ``credibility_posterior`` does."""
    cells, truth = simulate_model_portfolio(seed, n_districts)
    started = time.perf_counter()
    fit = fit_until_converged(aggregate_district_stats(cells), draws=draws, random_seed=42 + seed)
    ppc = posterior_predictive_summary(fit.idata, cells, random_seed=42 + seed)
    first = fit.rounds[0]
    return {
        "seed": seed,
        **truth,
        "parameterization": fit.idata.posterior.attrs["parameterization"],
        "rounds": len(fit.rounds),
        "total_draws": sum(r["draws"] for r in fit.rounds),
        "first_round_failed": {n: rule(first) is not None for n, rule in CONVERGENCE_RULES.items()},
        "final_failed": {n: rule(fit.summary) is not None for n, rule in CONVERGENCE_RULES.items()},
        "ppc_failed": posterior_predictive_failure(ppc) is not None,
        "gate_failures": gate_failures({**fit.summary, **ppc}),
        "first_round": {k: first[k] for k in ("max_rhat", "min_ess_bulk", "min_ess_tail")},
        **{k: fit.summary[k] for k in ("max_rhat", "min_ess_bulk", "min_ess_tail")},
        "n_divergences": fit.summary["n_divergences"],
        "ppc_pearson_p_value": ppc["ppc_pearson_p_value"],
        "ppc_share_outside_98": ppc["ppc_share_outside_98"],
        "seconds": time.perf_counter() - started,
    }


def upper_95(failures: int, n: int) -> float:
    """One-sided 95 % Clopper-Pearson upper bound of a rate observed as failures / n."""
    from scipy import stats

    return 1.0 if failures == n else float(stats.beta.ppf(0.95, failures + 1, n - failures))


def gate_benchmark(n_fits: int, n_districts: int, draws: int) -> dict[str, Any]:
    """False-alarm rates of the posterior's gate on data generated by the model."""
    load_start = os.getloadavg()
    started = time.perf_counter()
    fits = []
    for seed in range(n_fits):
        fits.append(gate_fit(seed, n_districts, draws))
        if (seed + 1) % 10 == 0:
            print(
                f"gate: {seed + 1}/{n_fits} fits, {time.perf_counter() - started:.0f} s", flush=True
            )
    wall = time.perf_counter() - started

    def rate(flags: list[bool]) -> float:
        return sum(flags) / len(flags)

    first_any = [any(f["first_round_failed"].values()) for f in fits]
    final_any = [any(f["final_failed"].values()) for f in fits]
    gate_any = [bool(f["gate_failures"]) for f in fits]
    summary = {
        "n_fits": n_fits,
        "n_districts": n_districts,
        "first_round_draws": draws,
        "n_months": GATE_MONTHS,
        "wall_seconds": wall,
        "seconds_per_fit": wall / n_fits,
        "load_average_start": load_start,
        "load_average_end": os.getloadavg(),
        "convergence_false_alarm_rate": rate(final_any),
        "convergence_false_alarm_upper_95": upper_95(sum(final_any), n_fits),
        "single_shot_false_alarm_rate": rate(first_any),
        "ppc_false_alarm_rate": rate([f["ppc_failed"] for f in fits]),
        "gate_false_alarm_rate": rate(gate_any),
        "gate_false_alarm_upper_95": upper_95(sum(gate_any), n_fits),
        "first_round_rule_rates": {
            n: rate([f["first_round_failed"][n] for f in fits]) for n in CONVERGENCE_RULES
        },
        "final_rule_rates": {
            n: rate([f["final_failed"][n] for f in fits]) for n in CONVERGENCE_RULES
        },
        "rounds_histogram": {
            str(k): sum(f["rounds"] == k for f in fits) for k in sorted({f["rounds"] for f in fits})
        },
        "mean_total_draws_per_chain": float(np.mean([f["total_draws"] for f in fits])),
        "fits": fits,
    }
    summary["target"] = {
        "name": f"gate false-alarm rate <= {GATE_FALSE_ALARM_TARGET:.0%} on {n_fits} fits of "
        f"data drawn from the model ({n_districts} districts, first round {draws} draws)",
        "value": summary["gate_false_alarm_rate"],
        "passed": summary["gate_false_alarm_rate"] <= GATE_FALSE_ALARM_TARGET,
    }
    print()
    print(
        f"gate on {n_fits} model-generated portfolios ({n_districts} districts x "
        f"{GATE_MONTHS} months, first round {draws} draws per chain), wall {wall:.0f} s "
        f"({wall / n_fits:.1f} s per fit, load {load_start[0]:.1f} -> {os.getloadavg()[0]:.1f})"
    )
    print(
        f"  single-shot convergence gate (first sample only): "
        f"{summary['single_shot_false_alarm_rate']:.1%} false alarms "
        + str({n: f"{r:.1%}" for n, r in summary["first_round_rule_rates"].items()})
    )
    print(
        f"  rounds drawn: {summary['rounds_histogram']}, mean draws per chain "
        f"{summary['mean_total_draws_per_chain']:.0f}"
    )
    print(
        f"  final convergence gate: {summary['convergence_false_alarm_rate']:.1%} false alarms "
        f"(95% upper bound {summary['convergence_false_alarm_upper_95']:.1%}) "
        + str({n: f"{r:.1%}" for n, r in summary["final_rule_rates"].items()})
    )
    print(f"  posterior predictive check: {summary['ppc_false_alarm_rate']:.1%} false alarms")
    print(
        f"  whole gate: {summary['gate_false_alarm_rate']:.1%} false alarms (95% upper bound "
        f"{summary['gate_false_alarm_upper_95']:.1%})"
    )
    target = summary["target"]
    print(f"{'PASS' if target['passed'] else 'FAIL'}: {target['name']} -> {target['value']:.3f}")
    return summary


def speed_benchmark(quick: bool) -> dict[str, Any]:
    """The notebook's fit against the project's path (see the module docstring)."""
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
    baseline_rows = BASELINE_ROWS[:1] if quick else BASELINE_ROWS
    for rows in baseline_rows:
        r = baseline_fit(all_policies.head(rows), parameterization)
        results.append(r)
        print(f"baseline {rows:>11,}: done ({r['sampling_seconds']:.1f} s sampling)", flush=True)
    if quick:
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

    return {
        "quick": quick,
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
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="skip the 100,000-row baseline; extrapolate it linearly from 20,000 rows",
    )
    parser.add_argument("--part", choices=("all", "speed", "gate"), default="all")
    parser.add_argument(
        "--fits", type=int, default=GATE_FITS, help="gate fits (at least 100 for the target)"
    )
    parser.add_argument(
        "--districts", type=int, default=GATE_DISTRICTS, help="districts per gate portfolio"
    )
    parser.add_argument("--output", type=Path, default=RESULTS, help="JSON results path")
    args = parser.parse_args(argv)

    stored = json.loads(args.output.read_text()) if args.output.exists() else {}
    passed = []
    if args.part in ("all", "speed"):
        speed = speed_benchmark(args.quick)
        stored = {**stored, **speed}
        passed += [t["passed"] for t in speed["targets"]]
    if args.part in ("all", "gate"):
        gates = {  # earlier settings' results are kept
            k: v
            for k, v in stored.get("gate_false_alarm", {}).items()
            if isinstance(v, dict) and "n_fits" in v
        }
        for setting, draws in GATE_FIRST_DRAWS.items():
            gate = gate_benchmark(args.fits, args.districts, draws)
            gates[f"{setting}_{args.districts}_districts"] = gate
            passed.append(gate["target"]["passed"] and args.fits >= GATE_FITS)
        stored["gate_false_alarm"] = gates
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"benchmark": "credibility", **stored}, indent=2) + "\n")
    print(f"results written to {args.output}")
    return 0 if all(passed) else 1


if __name__ == "__main__":
    sys.exit(main())
