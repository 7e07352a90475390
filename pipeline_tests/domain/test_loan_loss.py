"""Tests of the Monte Carlo loan-loss simulator against exact laws and closed forms.

Every stochastic test is seeded, so a pass or a fail is reproducible; tolerances are stated
in standard errors of the quantity compared, chosen so that a correct simulator fails with
probability well below 1e-4 per assertion while the bugs they target (a wrong correlation, a
missing default, a biased acceptance step) move the statistic by many standard errors.
"""

import functools
import itertools
import math
import tracemalloc

import numpy as np
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from pipeline.domain import loan_loss as ll
from pipeline.domain.errors import DomainError


def make_book(pd, ead, lgd, ids=None) -> pl.DataFrame:
    n = len(pd)
    return pl.DataFrame(
        {
            "loan_id": ids if ids is not None else [f"L{i:04d}" for i in range(n)],
            "pd": np.asarray(pd, dtype=float),
            "ead": np.asarray(ead, dtype=float),
            "lgd": np.asarray(lgd, dtype=float),
        }
    )


def heterogeneous_book(n: int, seed: int, pd_high: float = 0.3) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    pd = np.clip(np.exp(rng.normal(np.log(0.02), 1.0, n)), 0.001, pd_high)
    return make_book(pd, rng.lognormal(10.0, 1.0, n), rng.uniform(0.2, 0.6, n))


# Loans whose EAD are distinct powers of two: a portfolio loss is then an exact integer whose
# binary digits say which loans defaulted, so per-loan and pairwise default frequencies can be
# checked against the copula. PDs are clustered so that buckets hold several loans with
# different thresholds (exercising the squeeze and the exact acceptance step), and range up to
# 0.8 so that the dense branch runs too; PD 0 and a stressed PD of 1 are included.
BITS_PD = np.array(
    [
        *(0.0, 0.004, 0.0045, 0.005, 0.02, 0.022, 0.025, 0.028, 0.06, 0.065),
        *(0.07, 0.15, 0.16, 0.18, 0.3, 0.32, 0.45, 0.5, 0.7, 0.8),
    ]
)
BITS_MULT = 1.3  # 0.8 * 1.3 > 1: the last loan defaults always


def bits_book() -> pl.DataFrame:
    n = BITS_PD.size
    return make_book(BITS_PD, 2.0 ** np.arange(n), np.ones(n))


def decode_defaults(losses: np.ndarray, n_loans: int) -> np.ndarray:
    as_int = losses.astype(np.int64)
    assert np.array_equal(as_int, losses)  # sums of distinct powers of two are exact
    return ((as_int[:, None] >> np.arange(n_loans)) & 1).astype(bool)


# --------------------------------------------------------------------------- reproducibility


def test_losses_identical_whatever_the_chunk_size():
    book = heterogeneous_book(60, seed=1)
    runs = [
        ll.simulate_portfolio_loss(
            book, pd_multiplier=1.7, rho=0.2, n_sims=3_000, seed=11, chunk_size=size
        )
        for size in (1, 7, 1_000, 10_000, 1_000_000)
    ]
    for other in runs[1:]:
        assert np.array_equal(runs[0], other)
    assert runs[0].dtype == np.float64 and runs[0].shape == (3_000,)


def test_prefix_of_a_longer_run_is_the_shorter_run_and_seeds_differ():
    book = heterogeneous_book(40, seed=2)
    kw = {"pd_multiplier": 2.0, "rho": 0.25, "seed": 5}
    long = ll.simulate_portfolio_loss(book, n_sims=2_500, **kw)
    short = ll.simulate_portfolio_loss(book, n_sims=700, **kw)
    assert np.array_equal(long[:700], short)
    other = ll.simulate_portfolio_loss(book, n_sims=700, **{**kw, "seed": 6})
    assert not np.array_equal(short, other)


@settings(max_examples=20, deadline=None)
@given(
    n_sims=st.integers(1, 2_600),
    cuts=st.lists(st.floats(0.0, 1.0), max_size=6),
)
def test_any_split_of_simulate_chunk_concatenates_to_the_full_run(n_sims, cuts):
    book = ll.loan_arrays(heterogeneous_book(25, seed=3))
    kw = {"pd_multiplier": 1.2, "rho": 0.15, "seed": 3}
    full = ll.simulate_portfolio_loss(book, n_sims=n_sims, **kw)
    bounds = sorted({0, n_sims, *(int(c * n_sims) for c in cuts)})
    pieces = [ll.simulate_chunk(book, start=a, stop=b, **kw) for a, b in itertools.pairwise(bounds)]
    assert np.array_equal(np.concatenate(pieces), full)


def test_chunk_ranges_are_block_aligned_and_cover_the_run():
    ranges = ll.chunk_ranges(5_000, 1_500)
    assert ranges[0] == (0, 2 * ll.SIMULATION_BLOCK)
    assert ranges[-1][1] == 5_000
    assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))
    assert all(lo % ll.SIMULATION_BLOCK == 0 for lo, _ in ranges)


def test_latent_reference_is_chunk_invariant_and_uses_its_own_stream():
    book = heterogeneous_book(30, seed=4)
    kw = {"pd_multiplier": 1.0, "rho": 0.2, "n_sims": 2_100, "seed": 9}
    a = ll.simulate_portfolio_loss_latent(book, chunk_size=7, **kw)
    b = ll.simulate_portfolio_loss_latent(book, chunk_size=100_000, **kw)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, ll.simulate_portfolio_loss(book, **kw))


# --------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("rho", [0.0, 0.05, 0.3, 0.999])
def test_per_loan_and_pairwise_default_frequencies_match_the_copula(rho):
    n_sims = 100_000
    book = bits_book()
    losses = ll.simulate_portfolio_loss(
        book, pd_multiplier=BITS_MULT, rho=rho, n_sims=n_sims, seed=21
    )
    defaults = decode_defaults(losses, BITS_PD.size)
    p = np.minimum(BITS_PD * BITS_MULT, 1.0)
    freq = defaults.mean(axis=0)
    # PD 0 never defaults, stressed PD 1 always does: exactly, not statistically
    assert not defaults[:, p == 0.0].any()
    assert defaults[:, p == 1.0].all()
    se = np.sqrt(p * (1 - p) / n_sims)
    inner = (p > 0) & (p < 1)
    z = np.abs(freq - p)[inner] / se[inner]
    assert z.max() < 4.5, f"marginal default frequency off by {z.max():.2f} SE"
    c = stats.norm.ppf(p)
    worst = 0.0
    for i in np.flatnonzero(inner)[::2]:
        for j in np.flatnonzero(inner):
            if j <= i:
                continue
            exact = stats.multivariate_normal(cov=[[1.0, rho], [rho, 1.0]]).cdf([c[i], c[j]])
            joint = np.mean(defaults[:, i] & defaults[:, j])
            worst = max(worst, abs(joint - exact) / math.sqrt(exact * (1 - exact) / n_sims))
    assert worst < 4.5, f"pairwise joint default frequency off by {worst:.2f} SE"


def test_bits_book_exercises_shared_buckets_and_the_dense_branch():
    plan = ll._make_plan(ll.loan_arrays(bits_book()), BITS_MULT, 0.3)
    assert plan.sizes.max() >= 3  # several thresholds per bucket: squeeze + exact acceptance
    assert plan.certain_loss == 2.0 ** (BITS_PD.size - 1)
    # the riskiest buckets exceed the dense intensity at moderate Z, so the dense branch runs
    # in a good share of simulations
    lam = -np.log(stats.norm.cdf(-plan.c_hi[-1] / plan.s))
    assert lam > ll._DENSE_LAMBDA


@pytest.mark.parametrize(("rho", "mult"), [(0.1, 1.3), (0.4, 2.5)])
def test_distribution_matches_brute_force_latent_simulation(rho, mult):
    book = heterogeneous_book(300, seed=7, pd_high=0.4)
    n = 40_000
    fast = ll.simulate_portfolio_loss(book, pd_multiplier=mult, rho=rho, n_sims=n, seed=1)
    brute = ll.simulate_portfolio_loss_latent(book, pd_multiplier=mult, rho=rho, n_sims=n, seed=2)
    # two-sample KS on independent samples; the loss law has atoms, which makes KS conservative
    assert stats.ks_2samp(fast, brute).pvalue > 1e-3
    se_diff = math.sqrt((fast.var() + brute.var()) / n)
    assert abs(fast.mean() - brute.mean()) < 4.0 * se_diff
    # standard deviations: SE of a sample sd is about sd * sqrt((kurtosis - 1) / (4 n))
    kurt = stats.kurtosis(brute, fisher=False)
    se_sd = brute.std() * math.sqrt((kurt - 1.0) / (4.0 * n)) * math.sqrt(2.0)
    assert abs(fast.std() - brute.std()) < 4.0 * se_sd
    for q in (0.5, 0.9, 0.99):
        sf, sb = ll.summarise_losses(fast), ll.summarise_losses(brute)
        key = {0.5: "p50", 0.9: "p90", 0.99: "var_99"}[q]
        assert abs(sf[key] - sb[key]) < 4.0 * math.hypot(sf["se_" + key], sb["se_" + key])


def test_independent_defaults_follow_the_poisson_binomial_law():
    pd = np.linspace(0.01, 0.5, 30)
    book = make_book(pd, np.ones(30), np.ones(30))
    n = 100_000
    counts = ll.simulate_portfolio_loss(book, pd_multiplier=1.0, rho=0.0, n_sims=n, seed=3)
    pmf = np.array([1.0])
    for p in pd:  # exact Poisson-binomial law by convolution
        pmf = np.convolve(pmf, [1.0 - p, p])
    observed = np.bincount(counts.astype(np.int64), minlength=pmf.size)
    expected = pmf * n
    keep = expected >= 5
    obs = np.r_[observed[keep], observed[~keep].sum()]
    exp = np.r_[expected[keep], expected[~keep].sum()]
    chi2 = float(((obs - exp) ** 2 / exp).sum())
    assert stats.chi2.sf(chi2, obs.size - 1) > 1e-3


def test_near_comonotone_defaults_are_nested_by_pd():
    # at rho = 0.999 a loan with a higher PD defaults whenever a safer one does, unless their
    # thresholds are within a few sqrt(1 - rho) = 0.03 of each other
    pd = np.array([0.01, 0.03, 0.08, 0.2, 0.4])
    book = make_book(pd, 2.0 ** np.arange(5), np.ones(5))
    losses = ll.simulate_portfolio_loss(book, pd_multiplier=1.0, rho=0.999, n_sims=50_000, seed=8)
    d = decode_defaults(losses, 5)
    nested = np.all(d[:, :-1] <= d[:, 1:], axis=1)
    assert nested.mean() > 0.995
    assert np.all(np.abs(d.mean(axis=0) - pd) < 4.5 * np.sqrt(pd * (1 - pd) / 50_000))


def test_homogeneous_book_matches_the_exact_finite_portfolio_law():
    n_loans, pd, rho, n = 2_000, 0.03, 0.15, 20_000
    book = make_book(np.full(n_loans, pd), np.ones(n_loans), np.ones(n_loans))
    counts = ll.simulate_portfolio_loss(book, pd_multiplier=1.0, rho=rho, n_sims=n, seed=4)
    for k in (20, 40, 60, 100, 150, 250):
        exact = ll.finite_portfolio_default_cdf(k, pd, rho, n_loans=n_loans)
        empirical = np.mean(counts <= k)
        assert abs(empirical - exact) < 4.5 * math.sqrt(exact * (1 - exact) / n) + 1e-12


# --------------------------------------------------------------------------- expected loss


def test_expected_loss_within_three_standard_errors_of_the_analytic_value():
    book = heterogeneous_book(200, seed=5)
    for i, (mult, rho) in enumerate([(0.8, 0.05), (1.5, 0.15), (3.0, 0.3), (1.0, 0.0)]):
        losses = ll.simulate_portfolio_loss(
            book, pd_multiplier=mult, rho=rho, n_sims=30_000, seed=100 + i
        )
        summary = ll.summarise_losses(losses)
        analytic = ll.analytic_expected_loss(book, mult)
        assert ll.expected_loss_within_se(summary, analytic) is None
        shifted = analytic + 10.0 * summary["se_expected_loss"]
        message = ll.expected_loss_within_se(summary, shifted)
        assert message is not None and "standard errors" in message and f"{shifted:.6g}" in message


def test_analytic_expected_loss_caps_stressed_pd_at_one():
    book = make_book([0.5, 0.1, 0.0], [100.0, 200.0, 1e9], [0.5, 1.0, 1.0])
    assert ll.analytic_expected_loss(book, 3.0) == pytest.approx(100 * 0.5 * 1.0 + 200 * 0.3)


def test_deterministic_book_has_exact_losses_and_passes_the_gates():
    # every stressed PD is 0 or 1: the loss is the same number in every simulation
    book = make_book([0.0, 0.6, 1.0], [1e6, 250.0, 40.0], [1.0, 0.4, 0.5])
    losses = ll.simulate_portfolio_loss(book, pd_multiplier=2.0, rho=0.3, n_sims=500, seed=1)
    assert np.all(losses == 250.0 * 0.4 + 40.0 * 0.5)
    summary = ll.summarise_losses(losses)
    assert summary["se_expected_loss"] == 0.0 and summary["se_var_999"] == 0.0
    assert ll.expected_loss_within_se(summary, ll.analytic_expected_loss(book, 2.0)) is None
    assert ll.mc_error_failure(summary) is None


def test_zero_pd_book_never_loses():
    book = make_book([0.0, 0.0], [1e6, 5.0], [1.0, 1.0])
    assert np.all(
        ll.simulate_portfolio_loss(book, pd_multiplier=3.0, rho=0.5, n_sims=50, seed=0) == 0
    )


# --------------------------------------------------------------------------- Vasicek


def test_vasicek_quantile_inverts_the_cdf_and_integrates_to_pd():
    from scipy import integrate

    for pd, rho in [(0.01, 0.12), (0.05, 0.3), (0.2, 0.6)]:
        for q in (0.001, 0.1, 0.5, 0.9, 0.999):
            x = ll.vasicek_loss_quantile(pd, rho, q)
            assert ll.vasicek_loss_cdf(x, pd, rho) == pytest.approx(q, abs=1e-10)
        # the mean of the loss fraction is pd, whatever rho
        quantile = functools.partial(ll.vasicek_loss_quantile, pd, rho)
        mean, _ = integrate.quad(quantile, 0.0, 1.0, limit=200)
        assert mean == pytest.approx(pd, rel=1e-6)
    # median: Z = 0, so x = Phi(Phi^-1(pd) / sqrt(1 - rho))
    expected = stats.norm.cdf(stats.norm.ppf(0.02) / math.sqrt(0.8))
    assert ll.vasicek_loss_quantile(0.02, 0.2, 0.5) == pytest.approx(expected, rel=1e-12)
    assert ll.vasicek_loss_quantile(0.02, 0.0, 0.99) == pytest.approx(0.02, rel=1e-12)
    assert ll.vasicek_loss_quantile(0.0, 0.3, 0.99) == 0.0
    assert ll.vasicek_loss_quantile(1.0, 0.3, 0.01) == 1.0
    cdf = ll.vasicek_loss_cdf(np.array([0.0, 0.019, 0.02, 1.0]), 0.02, 0.0)
    assert np.array_equal(cdf, [0.0, 0.0, 1.0, 1.0])


def test_finite_portfolio_quantile_converges_to_vasicek():
    closed = ll.vasicek_loss_quantile(0.02, 0.1, 0.99)
    gaps = [
        abs(ll.finite_portfolio_loss_quantile(0.02, 0.1, 0.99, n_loans=n) - closed)
        for n in (500, 50_000)
    ]
    assert gaps[1] < gaps[0] and gaps[1] < 5e-4
    # rho = 0: the count is binomial, so the quantile is the binomial one
    assert ll.finite_portfolio_loss_quantile(0.1, 0.0, 0.9, n_loans=1_000) == pytest.approx(
        stats.binom.ppf(0.9, 1_000, 0.1) / 1_000
    )


def test_reference_portfolio_agrees_with_vasicek_and_wrong_rho_is_caught():
    check = ll.reference_portfolio_check(0.02, 0.1, n_loans=5_000, n_sims=20_000, seed=3)
    assert check["passed"], check
    assert ll.vasicek_agreement_failure(check) is None
    assert [r["q"] for r in check["quantiles"]] == [0.1, 0.5, 0.9, 0.99]
    # a simulator with the wrong correlation (0.13 instead of 0.1) must fail the same gate
    book = ll.LoanArrays(
        loan_id=np.arange(5_000), pd=np.full(5_000, 0.02), ead=np.ones(5_000), lgd=np.ones(5_000)
    )
    wrong = ll.simulate_portfolio_loss(book, pd_multiplier=1.0, rho=0.13, n_sims=20_000, seed=3)
    bad = ll.vasicek_comparison(wrong / 5_000, 0.02, 0.1, n_loans=5_000)
    assert not bad["passed"]
    message = ll.vasicek_agreement_failure(bad)
    assert message is not None and "tolerance" in message and "q=0.99" in message


# --------------------------------------------------------------------------- summaries


def test_standard_errors_match_the_spread_over_repeated_seeds():
    book = heterogeneous_book(150, seed=6, pd_high=0.15)
    summaries = [
        ll.summarise_losses(
            ll.simulate_portfolio_loss(book, pd_multiplier=2.0, rho=0.15, n_sims=2_048, seed=s)
        )
        for s in range(300)
    ]
    for key, low, high in [("expected_loss", 0.85, 1.15), ("p90", 0.75, 1.3), ("var_99", 0.7, 1.4)]:
        spread = np.std([s[key] for s in summaries], ddof=1)
        predicted = np.mean([s["se_" + key] for s in summaries])
        assert low < predicted / spread < high, (key, predicted, spread)


LOSS_AMOUNTS = st.one_of(st.just(0.0), st.floats(1e-3, 1e9, allow_nan=False, allow_infinity=False))
"""Losses in currency units: no loss, or at least a tenth of a cent (a subnormal float such as
5e-324 is no amount, and the reference sum below underflows on it)."""


@settings(max_examples=60, deadline=None)
@given(st.lists(LOSS_AMOUNTS, min_size=2, max_size=3_000))
def test_summary_definitions_hold_for_any_sample(values):
    x = np.array(values)
    s = ll.summarise_losses(x)
    for key, q in ll.SUMMARY_QUANTILES.items():
        assert s[key] == np.quantile(x, q, method="inverted_cdf")
    assert s["p10"] <= s["p50"] <= s["p90"] <= s["var_99"] <= s["var_999"] <= x.max()
    assert s["var_99"] <= s["es_99"] <= x.max() and s["var_999"] <= s["es_999"] <= x.max()
    assert s["es_99"] <= s["es_999"] * (1 + 1e-12)
    # ES is the mean of the worst share 1 - q: (1 / (1 - q)) * integral_q^1 F_n^-1(u) du, the
    # k-th smallest loss holding u in ((k - 1) / n, k / n]
    ordered, n = np.sort(x), x.size
    for key, q in ll.ES_LEVELS.items():
        lengths = np.clip(np.arange(1, n + 1) / n - q, 0.0, 1.0 / n)
        expected = math.fsum((ordered * lengths).tolist()) / (1.0 - q)
        assert s[key] == pytest.approx(expected, rel=1e-9, abs=1e-9 * ordered[-1])
    assert all(s[k] >= 0 for k in s if k.startswith("se_"))
    assert s["n_sims"] == x.size and isinstance(s["n_sims"], int)
    assert all(type(v) is float for k, v in s.items() if k != "n_sims")


def test_mc_error_gate_reports_the_simulations_needed():
    book = heterogeneous_book(200, seed=8)
    kw = {"pd_multiplier": 1.0, "rho": 0.1, "seed": 4}
    summary = ll.summarise_losses(ll.simulate_portfolio_loss(book, n_sims=2_000, **kw))
    relative = summary["se_expected_loss"] / summary["expected_loss"]
    assert relative > 0.005
    only_el = {"expected_loss": 0.005}
    message = ll.mc_error_failure(summary, only_el)
    needed = math.ceil(2_000 * (relative / 0.005) ** 2)
    assert message is not None and f"{needed:,}" in message and "0.500%" in message
    assert ll.n_sims_needed(summary, only_el) == needed
    rerun = ll.summarise_losses(ll.simulate_portfolio_loss(book, n_sims=needed, **kw))
    assert rerun["se_expected_loss"] / rerun["expected_loss"] < 0.005 * 1.1
    assert ll.mc_error_failure(rerun, {"expected_loss": 0.0055}) is None
    # every figure is gated by its own bound, and each failing one is named with its need
    bounds = dict.fromkeys(ll.SUMMARY_FIGURES, 0.001)
    failing = ll.mc_error_shortfalls(summary, bounds)
    assert [f["figure"] for f in failing] == [
        k for k in ll.SUMMARY_FIGURES if summary["se_" + k] > 0.0
    ]
    everything = ll.mc_error_failure(summary, bounds)
    for f in failing:
        assert f"{f['figure']}: relative standard error" in everything
        assert f["n_sims_needed"] == math.ceil(2_000 * (f["relative_se"] / 0.001) ** 2)
        assert f"needs n_sims >= {f['n_sims_needed']:,}" in everything
    assert ll.n_sims_needed(summary, bounds) == max(f["n_sims_needed"] for f in failing)
    # an infinite bound leaves a figure ungated
    assert ll.mc_error_failure(summary, dict.fromkeys(ll.SUMMARY_FIGURES, math.inf)) is None


def test_mc_error_gate_on_zero_figures_and_bad_bounds():
    zero_with_error = {"n_sims": 1_000, "p10": 0.0, "se_p10": 12.0}
    message = ll.mc_error_failure(zero_with_error, {"p10": 0.02})
    assert message is not None and "p10 is 0" in message and "unbounded" in message
    assert ll.n_sims_needed(zero_with_error, {"p10": 0.02}) is None
    exact_zero = {"n_sims": 1_000, "var_99": 0.0, "se_var_99": 0.0}
    assert ll.mc_error_failure(exact_zero, {"var_99": 0.01}) is None
    with pytest.raises(ll.LoanBookError, match="must be > 0"):
        ll.mc_error_failure(exact_zero, {"var_99": 0.0})
    with pytest.raises(ll.LoanBookError, match="no Monte Carlo error bound"):
        ll.mc_error_failure(exact_zero, {"var_95": 0.01})


def test_next_n_sims_doubles_within_the_budget():
    assert ll.next_n_sims(10_000, 1_000_000) == 20_000
    assert ll.next_n_sims(600_000, 1_000_000) == 1_000_000
    assert ll.next_n_sims(1_000_000, 1_000_000) == 1_000_000
    with pytest.raises(ll.LoanBookError, match="budget"):
        ll.next_n_sims(1_000, 999)


# --------------------------------------------------------------------------- properties


@settings(max_examples=40, deadline=None)
@given(
    loans=st.lists(
        st.tuples(st.floats(0.0, 1.0), st.floats(0.0, 1e6), st.floats(0.0, 1.0)),
        min_size=1,
        max_size=40,
    ),
    mult=st.floats(0.0, 5.0),
    rho=st.floats(0.0, 0.999),
    seed=st.integers(0, 2**32),
)
def test_losses_lie_between_the_certain_loss_and_the_total_exposure(loans, mult, rho, seed):
    pd, ead, lgd = (np.array(v) for v in zip(*loans, strict=True))
    losses = ll.simulate_portfolio_loss(
        make_book(pd, ead, lgd), pd_multiplier=mult, rho=rho, n_sims=300, seed=seed
    )
    loss = ead * lgd
    certain = math.fsum(loss[np.minimum(pd * mult, 1.0) >= 1.0].tolist())
    total = math.fsum(loss.tolist())
    assert np.all(losses >= certain * (1 - 1e-12))
    assert np.all(losses <= total * (1 + 1e-12))


def test_working_memory_is_flat_in_the_number_of_simulations():
    book = ll.loan_arrays(heterogeneous_book(1_000, seed=9))
    peaks = {}
    for n_sims in (10_000, 200_000):
        tracemalloc.start()
        losses = ll.simulate_portfolio_loss(
            book, pd_multiplier=3.0, rho=0.3, n_sims=n_sims, seed=1, chunk_size=10_000
        )
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        peaks[n_sims] = (peak, losses.nbytes)
    # the returned array (8 bytes per simulation) is the deliverable; everything else is
    # working memory and must not grow with n_sims
    working = {n: peak - out for n, (peak, out) in peaks.items()}
    assert working[200_000] / working[10_000] < 1.5, peaks
    growth = peaks[200_000][0] - peaks[10_000][0]
    assert growth < 1.2 * (peaks[200_000][1] - peaks[10_000][1]) + 512 * 1024, peaks


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("pd", "ead", "lgd", "fragment"),
    [
        ([0.01, 1.2], [1.0, 1.0], [0.5, 0.5], "loan 'L0001': 1.2"),
        ([0.01, -0.1], [1.0, 1.0], [0.5, 0.5], "pd outside [0, 1]"),
        ([0.01, 0.02], [1.0, -5.0], [0.5, 0.5], "negative ead"),
        ([0.01, 0.02], [1.0, 1.0], [0.5, 1.5], "lgd outside [0, 1]"),
        ([0.01, float("nan")], [1.0, 1.0], [0.5, 0.5], "pd missing, NaN or infinite"),
        ([0.01, 0.02], [1.0, float("inf")], [0.5, 0.5], "ead missing, NaN or infinite"),
    ],
)
def test_invalid_loans_are_named(pd, ead, lgd, fragment):
    with pytest.raises(ll.LoanBookError, match=None) as info:
        ll.simulate_portfolio_loss(
            make_book(pd, ead, lgd), pd_multiplier=1.0, rho=0.1, n_sims=10, seed=0
        )
    assert fragment in str(info.value)
    assert "L0001" in str(info.value)
    assert isinstance(info.value, DomainError) and isinstance(info.value, ValueError)


def test_book_level_errors():
    empty = make_book([], [], [])
    with pytest.raises(ll.LoanBookError, match="empty"):
        ll.simulate_portfolio_loss(empty, pd_multiplier=1.0, rho=0.1, n_sims=10, seed=0)
    with pytest.raises(ll.LoanBookError, match="lacks column"):
        ll.loan_arrays(make_book([0.1], [1.0], [1.0]).drop("lgd"))
    with pytest.raises(ll.LoanBookError, match="duplicated: 'A'"):
        ll.loan_arrays(make_book([0.1, 0.2], [1.0, 1.0], [1.0, 1.0], ids=["A", "A"]))
    nulls = make_book([0.1, 0.2], [1.0, 1.0], [1.0, 1.0]).with_columns(
        pl.when(pl.col("loan_id") == "L0001").then(None).otherwise(pl.col("pd")).alias("pd")
    )
    with pytest.raises(ll.LoanBookError, match="loan 'L0001'"):
        ll.loan_arrays(nulls)
    with pytest.raises(ll.LoanBookError, match="LoanArrays"):
        ll.simulate_chunk(
            make_book([0.1], [1.0], [1.0]), pd_multiplier=1.0, rho=0.1, seed=0, start=0, stop=5
        )


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"rho": 1.0}, "rho = 1.0 must lie in [0, 1)"),
        ({"rho": -0.1}, "rho = -0.1"),
        ({"rho": float("nan")}, "rho = nan"),
        ({"n_sims": 0}, "n_sims = 0 must be an integer >= 1"),
        ({"pd_multiplier": -0.5}, "pd_multiplier = -0.5"),
        ({"seed": -1}, "seed = -1"),
        ({"chunk_size": 0}, "chunk_size = 0"),
    ],
)
def test_invalid_settings_are_rejected(kwargs, fragment):
    params = {"pd_multiplier": 1.0, "rho": 0.1, "n_sims": 10, "seed": 0, **kwargs}
    with pytest.raises(ll.LoanBookError) as info:
        ll.simulate_portfolio_loss(make_book([0.1], [1.0], [1.0]), **params)
    assert fragment in str(info.value)


def test_summary_and_closed_form_argument_errors():
    with pytest.raises(ll.LoanBookError, match="at least 2"):
        ll.summarise_losses(np.array([1.0]))
    with pytest.raises(ll.LoanBookError, match="finite"):
        ll.summarise_losses(np.array([1.0, np.nan]))
    with pytest.raises(ll.LoanBookError, match=r"q = 1.0 must lie in \(0, 1\)"):
        ll.vasicek_loss_quantile(0.02, 0.1, 1.0)
    with pytest.raises(ll.LoanBookError, match="rho"):
        ll.vasicek_loss_cdf(0.1, 0.02, 1.0)
