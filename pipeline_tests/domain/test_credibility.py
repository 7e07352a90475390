"""Hierarchical Poisson credibility: recovery of simulated truth, the gate, bad input.

Every fit is seeded, so the assertions are deterministic; the tolerances are the ones a
correct posterior meets with high probability over seeds (90% intervals covering at least
80% of 200 true rates, 94% intervals covering the hyper-parameters).
"""

import math
from dataclasses import dataclass

import numpy as np
import polars as pl
import pytest

from pipeline.domain.credibility import (
    CENTERED_MIN_MEDIAN_INFORMATION_RATIO,
    GATE_RULES,
    CredibilityConfigError,
    CredibilityInputError,
    aggregate_district_stats,
    bayes_credibility_weight,
    choose_parameterization,
    convergence_failures,
    convergence_summary,
    credibility_estimates,
    fit_hierarchical_poisson,
    information_ratios,
)

N_DISTRICTS = 200


@dataclass(frozen=True)
class Portfolio:
    """Simulated claims with the truth that generated them."""

    policies: pl.DataFrame  # one row per policy: district, exposure, claim_count
    stats: pl.DataFrame  # one row per district
    alpha: float
    sigma: float
    rates: dict[str, float]

    def truth(self) -> str:
        return f"alpha={self.alpha:.4f} sigma={self.sigma:.4f} n_policies={self.policies.height}"


def simulate_portfolio(
    n_policies: int,
    *,
    n_districts: int = N_DISTRICTS,
    alpha: float = math.log(0.1),
    sigma: float = 0.3,
    seed: int = 20240601,
) -> Portfolio:
    """Policies spread unevenly over districts, exposure U(0.2, 1) years, Poisson claims."""
    rng = np.random.default_rng(seed)
    names = np.array([f"D{i:03d}" for i in range(n_districts)])
    share = rng.dirichlet(np.full(n_districts, 2.0))
    # Every district gets at least one policy so that every true rate is estimable.
    district = np.concatenate(
        [np.arange(n_districts), rng.choice(n_districts, size=n_policies - n_districts, p=share)]
    )
    exposure = rng.uniform(0.2, 1.0, size=n_policies)
    rates = np.exp(alpha + sigma * rng.standard_normal(n_districts))
    claims = rng.poisson(exposure * rates[district])
    policies = pl.DataFrame(
        {"district": names[district], "exposure": exposure, "claim_count": claims}
    )
    stats = pl.DataFrame(
        {
            "district": names,
            "exposure": np.bincount(district, weights=exposure, minlength=n_districts),
            "claim_count": np.bincount(district, weights=claims, minlength=n_districts).astype(
                np.int64
            ),
        }
    )
    return Portfolio(policies, stats, alpha, sigma, dict(zip(names, rates, strict=True)))


@pytest.fixture(scope="module")
def dense() -> Portfolio:
    return simulate_portfolio(1_000_000)


@pytest.fixture(scope="module")
def sparse() -> Portfolio:
    # About four claims per district: the prior dominates most districts.
    return simulate_portfolio(20_000, seed=7)


@pytest.fixture(scope="module")
def dense_fit(dense: Portfolio):
    return fit_hierarchical_poisson(dense.stats)


@pytest.fixture(scope="module")
def sparse_fit(sparse: Portfolio):
    return fit_hierarchical_poisson(sparse.stats)


# --- sufficient statistics and the parameterisation rule ------------------------------


def test_per_policy_rows_reduce_to_district_totals(dense: Portfolio) -> None:
    reduced = aggregate_district_stats(dense.policies)
    assert reduced["district"].to_list() == dense.stats["district"].to_list()
    np.testing.assert_allclose(reduced["exposure"], dense.stats["exposure"], rtol=1e-9)
    assert reduced["claim_count"].to_list() == dense.stats["claim_count"].to_list()
    assert reduced["claim_count"].dtype == pl.Int64


def test_parameterization_follows_information_ratio(dense: Portfolio, sparse: Portfolio) -> None:
    dense_ratio = float(np.median(information_ratios(dense.stats)))
    sparse_ratio = float(np.median(information_ratios(sparse.stats)))
    assert dense_ratio > 10 * CENTERED_MIN_MEDIAN_INFORMATION_RATIO, dense.truth()
    assert sparse_ratio < CENTERED_MIN_MEDIAN_INFORMATION_RATIO, sparse.truth()
    assert choose_parameterization(dense.stats) == "centered"
    assert choose_parameterization(sparse.stats) == "non_centered"
    # Dense data with almost no spread between districts: the prior dominates, so the
    # centred form would be a funnel.
    flat = simulate_portfolio(1_000_000, sigma=0.01, seed=3)
    assert choose_parameterization(flat.stats) == "non_centered"


# --- recovery and the gate on dense data ------------------------------------------------


def test_dense_fit_recovers_truth(dense: Portfolio, dense_fit) -> None:
    post = dense_fit.posterior
    rates = post["rate_district"].sel(district=list(dense.rates)).stack(s=("chain", "draw"))
    lo, hi = np.quantile(rates.values, [0.05, 0.95], axis=1)
    truth = np.array(list(dense.rates.values()))
    coverage = float(np.mean((truth >= lo) & (truth <= hi)))
    assert coverage >= 0.8, f"90% intervals cover {coverage:.2%} of true rates; {dense.truth()}"
    for name, true_value in (("alpha", dense.alpha), ("sigma_district", dense.sigma)):
        low, high = np.quantile(post[name].values, [0.03, 0.97])
        assert low <= true_value <= high, f"{name} 94% interval [{low:.4f}, {high:.4f}]; " + (
            dense.truth()
        )


def test_dense_fit_passes_gate_with_chosen_form(dense_fit) -> None:
    attrs = dense_fit.posterior.attrs
    assert attrs["parameterization"] == "centered"
    assert attrs["sampler"] == "nutpie"
    assert attrs["compile_seconds"] > 0 and attrs["sampling_seconds"] > 0
    assert isinstance(attrs["sampling_seconds"], float)
    summary = convergence_summary(dense_fit)
    assert summary["max_rhat"] <= 1.01
    assert summary["min_ess_bulk"] >= 400
    assert summary["n_divergences"] == 0
    assert convergence_failures(summary) == []
    assert all(type(v) in (float, int) for v in summary.values())
    assert isinstance(summary["n_divergences"], int)
    assert dense_fit.sample_stats["diverging"].shape == (4, 1000)


def test_sparse_fit_passes_gate_with_chosen_form(sparse: Portfolio, sparse_fit) -> None:
    assert sparse_fit.posterior.attrs["parameterization"] == "non_centered"
    summary = convergence_summary(sparse_fit)
    assert convergence_failures(summary) == [], (summary, sparse.truth())


@pytest.mark.parametrize(("case", "other"), [("dense", "non_centered"), ("sparse", "centered")])
def test_chosen_form_mixes_better_than_the_other(
    case: str, other: str, request: pytest.FixtureRequest
) -> None:
    portfolio: Portfolio = request.getfixturevalue(case)
    chosen = request.getfixturevalue(f"{case}_fit")
    alternative = fit_hierarchical_poisson(portfolio.stats, parameterization=other)
    assert alternative.posterior.attrs["parameterization"] == other
    chosen_ess = convergence_summary(chosen)["min_ess_bulk"]
    other_ess = convergence_summary(alternative)["min_ess_bulk"]
    # Measured: dense about 8,000 vs 280, sparse about 1,500 vs 500.
    assert chosen_ess > 2 * other_ess, (chosen_ess, other_ess, portfolio.truth())


def test_starved_sampler_fails_gate(dense: Portfolio) -> None:
    # The deliberately non-converging configuration: 2 chains x 20 draws after 5 tuning
    # steps. ArviZ caps bulk ESS at N log10(N) = 40 * 1.6 draws, so ESS >= 400 is impossible.
    idata = fit_hierarchical_poisson(dense.stats, draws=20, tune=5, chains=2)
    failures = convergence_failures(convergence_summary(idata))
    assert any("min bulk ESS" in f and "below the bound 400.0" in f for f in failures), failures


# --- the credibility table ---------------------------------------------------------------


def test_credibility_estimates_table(dense: Portfolio, dense_fit) -> None:
    table = credibility_estimates(dense_fit, dense.policies)
    assert table.columns == [
        "district",
        "exposure",
        "claim_count",
        "observed_rate",
        "posterior_mean_rate",
        "rate_q05",
        "rate_q50",
        "rate_q95",
        "bayes_credibility_weight",
        "buhlmann_straub_rate",
        "buhlmann_straub_z",
    ]
    assert table.height == N_DISTRICTS
    assert table.null_count().sum_horizontal().item() == 0
    assert (table["rate_q05"] <= table["rate_q50"]).all()
    assert (table["rate_q50"] <= table["rate_q95"]).all()
    z = table["bayes_credibility_weight"].to_numpy()
    assert np.all((z >= 0) & (z <= 1))
    # Z approximates the shrinkage of the posterior log-rate towards alpha:
    # log(post mean) - alpha ~ Z (log(observed) - alpha). Checked where the observed rate is
    # far enough from alpha for the ratio to be well defined.
    alpha = float(dense_fit.posterior["alpha"].mean())
    observed = np.log(table["observed_rate"].to_numpy())
    shrunk = np.log(table["posterior_mean_rate"].to_numpy())
    far = np.abs(observed - alpha) > 0.2
    empirical = (shrunk[far] - alpha) / (observed[far] - alpha)
    assert np.median(np.abs(empirical - z[far])) < 0.05
    # Dense data: both credibility estimators stay close to each other.
    relative = np.abs(table["buhlmann_straub_rate"] / table["posterior_mean_rate"] - 1)
    assert float(relative.median()) < 0.02
    bs_z = table.sort("exposure")["buhlmann_straub_z"].to_numpy()
    assert np.all(np.diff(bs_z) >= 0) and np.all((bs_z >= 0) & (bs_z <= 1))


def test_credibility_estimates_with_periods(dense: Portfolio, dense_fit) -> None:
    rng = np.random.default_rng(11)
    periods = dense.policies.with_columns(
        pl.Series("period", rng.integers(1, 5, dense.policies.height))
    )
    per_period = periods.group_by(["district", "period"]).agg(
        pl.col("exposure").sum(), pl.col("claim_count").sum()
    )
    table = credibility_estimates(dense_fit, dense.stats, district_periods=per_period)
    bs_z = table.sort("exposure")["buhlmann_straub_z"].to_numpy()
    assert np.all((bs_z >= 0) & (bs_z <= 1))
    assert np.all(np.diff(bs_z) >= 0)
    relative = np.abs(table["buhlmann_straub_rate"] / table["posterior_mean_rate"] - 1)
    assert float(relative.median()) < 0.05


def test_credibility_estimates_rejects_other_districts(dense: Portfolio, dense_fit) -> None:
    other = dense.stats.with_columns(pl.col("district").str.replace("D000", "X000"))
    with pytest.raises(CredibilityInputError, match="X000"):
        credibility_estimates(dense_fit, other)


def test_bayes_credibility_weight_bounds_and_monotone() -> None:
    claims = np.array([0.0, 0.5, 3.0, 30.0, 3000.0])
    z = np.asarray(bayes_credibility_weight(claims, 0.09))
    assert z[0] == 0.0 and np.all(np.diff(z) > 0) and z[-1] < 1
    assert z[2] == pytest.approx(0.27 / 1.27, rel=1e-12)
    assert np.all(np.asarray(bayes_credibility_weight(claims, 0.0)) == 0)


# --- the gate rule on its own -------------------------------------------------------------


def test_gate_rules_name_the_checks() -> None:
    assert set(GATE_RULES) == {
        "posterior_rhat_below_1_01",
        "no_divergent_transitions",
        "posterior_ess_bulk_above_400",
    }
    passing = {"max_rhat": 1.005, "min_ess_bulk": 900.0, "min_ess_tail": 800.0, "n_divergences": 0}
    assert all(rule(passing) is None for rule in GATE_RULES.values())
    failing = {"max_rhat": 1.02, "min_ess_bulk": 120.0, "min_ess_tail": 50.0, "n_divergences": 3}
    messages = {name: rule(failing) for name, rule in GATE_RULES.items()}
    assert messages == {
        "posterior_rhat_below_1_01": "max R-hat 1.0200 is above the bound 1.01",
        "no_divergent_transitions": "3 divergent transitions, more than the bound 0",
        "posterior_ess_bulk_above_400": "min bulk ESS 120.0 is below the bound 400.0",
    }
    assert convergence_failures(failing) == list(messages.values())
    assert convergence_failures(failing, max_rhat=1.05, min_ess_bulk=100, max_divergences=5) == []


def test_gate_fails_on_nan() -> None:
    summary = {"max_rhat": float("nan"), "min_ess_bulk": 900.0, "n_divergences": 0}
    assert convergence_failures(summary) == ["max R-hat nan is above the bound 1.01"]


# --- bad input ----------------------------------------------------------------------------


def frame(districts: list[str], exposure: list[float], claims: list[float]) -> pl.DataFrame:
    return pl.DataFrame({"district": districts, "exposure": exposure, "claim_count": claims})


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (frame(["north", "south"], [10.0, 0.0], [1, 0]), "district 'south' has total exposure 0.0"),
        (frame(["north", "south"], [10.0, -2.0], [1, 0]), "district 'south' has negative exposure"),
        (frame(["north", "south"], [10.0, 5.0], [1, -1]), "district 'south' has negative claim"),
        (frame(["north", "south"], [10.0, 5.0], [1.5, 1]), "district 'north' has non-integral"),
        (
            frame(["north", "south"], [float("nan"), 5.0], [1, 1]),
            "district 'north' has non-finite exposure nan",
        ),
        (
            frame(["north", "south"], [1.0, float("inf")], [1, 1]),
            "district 'south' has non-finite exposure inf",
        ),
        (
            frame(["north", "south"], [1.0, 2.0], [float("nan"), 1]),
            "district 'north' has non-finite claim_count",
        ),
        (frame(["north", "north"], [1.0, 2.0], [0, 1]), "1 district (['north'])"),
        (frame([], [], []), "empty"),
        (pl.DataFrame({"district": ["a", "b"], "exposure": [1.0, 2.0]}), "['claim_count']"),
    ],
)
def test_bad_input_is_rejected(data: pl.DataFrame, fragment: str) -> None:
    with pytest.raises(CredibilityInputError) as excinfo:
        fit_hierarchical_poisson(data)
    assert fragment in str(excinfo.value)
    assert type(excinfo.value) is CredibilityInputError
    assert isinstance(excinfo.value, ValueError)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"sampler": "numpyro"},
        {"parameterization": "funnel"},
        {"draws": 0},
        {"target_accept": 1.0},
        {"cores": 0},
    ],
)
def test_bad_config_is_rejected(dense: Portfolio, kwargs: dict) -> None:
    with pytest.raises(CredibilityConfigError):
        fit_hierarchical_poisson(dense.stats, **kwargs)


# --- PyMC's own sampler -------------------------------------------------------------------


@pytest.mark.slow
def test_pymc_sampler_fits_same_model() -> None:
    portfolio = simulate_portfolio(50_000, n_districts=30, seed=5)
    idata = fit_hierarchical_poisson(
        portfolio.stats, sampler="pymc", draws=300, tune=300, chains=2, cores=1
    )
    attrs = idata.posterior.attrs
    assert attrs["sampler"] == "pymc" and attrs["parameterization"] == "centered"
    assert attrs["sampling_seconds"] > 0
    assert idata.posterior["rate_district"].shape == (2, 300, 30)
    assert idata.sample_stats["diverging"].shape == (2, 300)
    summary = convergence_summary(idata)
    assert summary["n_divergences"] == 0
    assert summary["max_rhat"] < 1.05
    rates = idata.posterior["rate_district"].sel(district=list(portfolio.rates))
    lo, hi = np.quantile(rates.stack(s=("chain", "draw")).values, [0.05, 0.95], axis=1)
    truth = np.array(list(portfolio.rates.values()))
    assert np.mean((truth >= lo) & (truth <= hi)) >= 0.8, portfolio.truth()
