"""Tail risk of the loan-loss simulator against exact truth: VaR, ES, their errors, allocations.

The truth is the exact law of a homogeneous book's default count, integrated here with
``scipy.integrate.quad`` independently of the domain's grid quadrature. Every stochastic test
is seeded; tolerances are stated in standard errors of the compared quantity (4 SE: a correct
estimator fails with probability about 6e-5 per assertion), and the bands of the calibration
tests are derived from the number of independent seeds.
"""

import functools
import math
import tracemalloc

import numpy as np
import polars as pl
import pytest
from scipy import integrate, stats

from pipeline.domain import loan_loss as ll

EAD_LGD = 450_000.0


def homogeneous_book(n_loans: int, pd: float, loss: float = EAD_LGD) -> ll.LoanArrays:
    return ll.LoanArrays(
        loan_id=np.array([f"H{i:04d}" for i in range(n_loans)]),
        pd=np.full(n_loans, pd),
        ead=np.full(n_loans, loss),
        lgd=np.ones(n_loans),
    )


def heterogeneous_arrays(n: int, seed: int, pd_high: float = 0.3) -> ll.LoanArrays:
    rng = np.random.default_rng(seed)
    pd = np.clip(np.exp(rng.normal(np.log(0.02), 1.0, n)), 0.001, pd_high)
    return ll.LoanArrays(
        loan_id=np.array([f"L{i:04d}" for i in range(n)]),
        pd=pd,
        ead=rng.lognormal(10.0, 1.0, n),
        lgd=rng.uniform(0.2, 0.6, n),
    )


@functools.lru_cache
def pmf_by_quad(pd: float, rho: float, n_loans: int) -> np.ndarray:
    """``P(D = k) = integral Binom(k; n, p(z)) phi(z) dz`` by adaptive quadrature, per ``k``.

    The integrand of ``k`` peaks where ``p(z) = k / n``; that point is handed to ``quad`` so the
    adaptive rule cannot step over a narrow peak. Written with the ``math`` module (log-gamma
    binomial, ``erfc`` normal CDF) so that it shares no code with the domain's grid rule.
    """
    c, a, s = stats.norm.ppf(pd), math.sqrt(rho), math.sqrt(1.0 - rho)
    log_norm = -0.5 * math.log(2.0 * math.pi)

    def integrand(z: float, k: int) -> float:
        p = 0.5 * math.erfc(-(c - a * z) / (s * math.sqrt(2.0)))
        if p <= 0.0 or p >= 1.0:
            return float(k == (n_loans if p >= 1.0 else 0)) * math.exp(log_norm - 0.5 * z * z)
        log_binom = (
            math.lgamma(n_loans + 1)
            - math.lgamma(k + 1)
            - math.lgamma(n_loans - k + 1)
            + k * math.log(p)
            + (n_loans - k) * math.log1p(-p)
        )
        return math.exp(log_binom + log_norm - 0.5 * z * z)

    pmf = []
    for k in range(n_loans + 1):
        frac = min(max(k / n_loans, 1e-12), 1.0 - 1e-12)
        peak = min(max((c - s * stats.norm.ppf(frac)) / a, -11.0), 11.0)
        value, _ = integrate.quad(
            integrand, -12.0, 12.0, args=(k,), points=[peak], limit=400, epsabs=1e-16, epsrel=1e-11
        )
        pmf.append(value)
    pmf = np.array(pmf)
    pmf.setflags(write=False)
    return pmf


def exact_var_es(pmf: np.ndarray, atom: float, q: float) -> tuple[float, float]:
    """VaR and Acerbi-Tasche ES of the loss ``atom * D`` written out from the definitions."""
    cdf = np.cumsum(pmf)
    k = int(np.argmax(cdf >= q))
    tail = math.fsum(j * atom * pmf[j] for j in range(k + 1, pmf.size))
    return k * atom, (tail + k * atom * (cdf[k] - q)) / (1.0 - q)


# --------------------------------------------------------------------------- exact truth


@pytest.mark.parametrize(("n_loans", "pd", "rho"), [(25, 0.0003, 0.2), (200, 0.02, 0.12)])
def test_exact_finite_portfolio_law_agrees_with_adaptive_quadrature(n_loans, pd, rho):
    grid = ll.finite_portfolio_default_pmf(pd, rho, n_loans=n_loans)
    quad = pmf_by_quad(pd, rho, n_loans)
    assert quad.sum() == pytest.approx(1.0, abs=1e-9)
    assert np.abs(grid - quad).max() < 1e-10
    # mean count is n * pd whatever rho
    assert float(np.arange(n_loans + 1) @ grid) == pytest.approx(n_loans * pd, rel=1e-9)
    values = np.arange(n_loans + 1) * EAD_LGD
    for q in (0.99, 0.999):
        var, es = ll.discrete_var_es(values, grid, q)
        var_q, es_q = exact_var_es(quad, EAD_LGD, q)
        assert var == var_q
        assert es == pytest.approx(es_q, rel=1e-9)


def test_the_issue_numbers_for_the_high_grade_book():
    # 25 loans, PD 0.03%, rho 0.2: P(L = 0) > 99% so VaR99 = 0 and ES99 = EL / 1% = 337.5k
    pmf = pmf_by_quad(0.0003, 0.2, 25)
    assert pmf[0] > 0.99
    var, es = exact_var_es(pmf, EAD_LGD, 0.99)
    assert var == 0.0
    assert es == pytest.approx(25 * 0.0003 * EAD_LGD / 0.01, rel=1e-8)  # 337,500


def test_discrete_var_es_weights_the_atom_at_the_var():
    # law: 0 w.p. 0.985, 10 w.p. 0.01, 100 w.p. 0.005; at 99%, VaR = 10 and the tail holds
    # all of the 100-atom (0.005) and half of the 10-atom (0.005)
    var, es = ll.discrete_var_es(np.array([0.0, 10.0, 100.0]), np.array([0.985, 0.01, 0.005]), 0.99)
    assert var == 10.0
    assert es == pytest.approx((0.005 * 100.0 + 0.005 * 10.0) / 0.01)
    with pytest.raises(ll.LoanBookError, match="increasing"):
        ll.discrete_var_es(np.array([1.0, 0.0]), np.array([0.5, 0.5]), 0.9)


# --------------------------------------------------------------------------- simulated vs exact


@pytest.mark.parametrize(
    ("n_loans", "pd", "rho", "n_sims"),
    [(25, 0.0003, 0.2, 400_000), (200, 0.02, 0.12, 200_000)],
    ids=["high-grade-25-var-on-the-zero-atom", "200-loans"],
)
def test_simulated_var_and_es_match_the_exact_finite_portfolio(n_loans, pd, rho, n_sims):
    book = homogeneous_book(n_loans, pd)
    losses = ll.simulate_portfolio_loss(book, pd_multiplier=1.0, rho=rho, n_sims=n_sims, seed=17)
    summary = ll.summarise_losses(losses)
    pmf = pmf_by_quad(pd, rho, n_loans)
    for level, suffix in ((0.99, "99"), (0.999, "999")):
        var, es = exact_var_es(pmf, EAD_LGD, level)
        se_var, se_es = summary["se_var_" + suffix], summary["se_es_" + suffix]
        # an empirical quantile of a lattice law may land one atom off the exact one
        assert abs(summary["var_" + suffix] - var) <= 4.0 * se_var + EAD_LGD, suffix
        assert se_es > 0.0
        z = (summary["es_" + suffix] - es) / se_es
        assert abs(z) <= 4.0, f"ES{suffix} {summary['es_' + suffix]:,.0f} vs exact {es:,.0f}"
    # the old estimator, the mean of every loss at or above the VaR, misses by far more
    old = losses[losses >= summary["var_99"]].mean()
    _, es99 = exact_var_es(pmf, EAD_LGD, 0.99)
    if n_loans == 25:
        assert summary["var_99"] == 0.0
        assert abs(old - es99) > 50.0 * summary["se_es_99"]  # it returns the expected loss
        assert old == pytest.approx(summary["expected_loss"])
    else:
        assert 0.005 < (es99 - old) / es99 < 0.03  # 1-2% low


@pytest.mark.slow
def test_standard_errors_of_every_figure_match_the_spread_over_independent_seeds():
    """Reported SEs against the spread of 200 independent estimates of each figure.

    With R = 200 seeds the sample standard deviation of the estimates has a relative error of
    about 1 / sqrt(2 (R - 1)) = 5% (more for the skewed 99.9% figures), so a calibrated SE
    lies in [0.8, 1.25] of the spread; an SE off by a factor of 1.5, or the order-statistic
    SE with the wrong binomial bracket, falls outside it.
    """
    book = heterogeneous_arrays(60, seed=6, pd_high=0.15)
    runs = 200
    summaries = [
        ll.summarise_losses(
            ll.simulate_portfolio_loss(book, pd_multiplier=2.0, rho=0.15, n_sims=32_768, seed=s)
        )
        for s in range(runs)
    ]
    ratios = {}
    for key in ll.SUMMARY_FIGURES:
        spread = np.std([s[key] for s in summaries], ddof=1)
        predicted = np.mean([s["se_" + key] for s in summaries])
        ratios[key] = predicted / spread
    bad = {k: round(r, 3) for k, r in ratios.items() if not 0.8 < r < 1.25}
    assert not bad, ratios


# --------------------------------------------------------------------------- the dense branch


def test_dense_branch_reproduces_marginal_and_joint_default_probabilities():
    # 40 loans with PDs of 10-45%: almost every (simulation, bucket) pair is dense; EADs are
    # powers of two, so each loss spells out which loans defaulted
    pd = np.linspace(0.10, 0.45, 40)
    book = ll.LoanArrays(loan_id=np.arange(40), pd=pd, ead=2.0 ** np.arange(40), lgd=np.ones(40))
    plan = ll._make_plan(book, 1.0, 0.2)
    lam_lowest = -math.log(stats.norm.cdf(-plan.c_hi[0] / plan.s))
    assert lam_lowest > ll._DENSE_LAMBDA  # dense at Z = 0 already
    n = 100_000
    losses = ll.simulate_portfolio_loss(book, pd_multiplier=1.0, rho=0.2, n_sims=n, seed=31)
    as_int = losses.astype(np.int64)
    assert np.array_equal(as_int, losses)
    defaults = ((as_int[:, None] >> np.arange(40)) & 1).astype(bool)
    z = np.abs(defaults.mean(axis=0) - pd) / np.sqrt(pd * (1 - pd) / n)
    assert z.max() < 4.5, z.max()
    c = stats.norm.ppf(pd)
    mvn = stats.multivariate_normal(cov=[[1.0, 0.2], [0.2, 1.0]])
    worst = 0.0
    for i, j in [(0, 1), (0, 39), (5, 20), (17, 18), (30, 39), (38, 39)]:
        exact = mvn.cdf([c[i], c[j]])
        joint = np.mean(defaults[:, i] & defaults[:, j])
        worst = max(worst, abs(joint - exact) / math.sqrt(exact * (1 - exact) / n))
    assert worst < 4.5, worst


@pytest.mark.parametrize(
    ("lo", "hi", "mult", "rho"), [(0.02, 0.10, 1.5, 0.2), (0.1, 0.4, 1.0, 0.3)]
)
def test_fast_simulator_matches_the_conditional_bernoulli_reference(lo, hi, mult, rho):
    rng = np.random.default_rng(12)
    n_loans = 250
    book = ll.LoanArrays(
        loan_id=np.arange(n_loans),
        pd=np.exp(rng.uniform(np.log(lo), np.log(hi), n_loans)),
        ead=rng.lognormal(10.0, 1.0, n_loans),
        lgd=rng.uniform(0.2, 0.6, n_loans),
    )
    n = 40_000
    kw = {"pd_multiplier": mult, "rho": rho, "n_sims": n}
    fast = ll.simulate_portfolio_loss(book, seed=1, **kw)
    exact = ll.simulate_portfolio_loss_bernoulli(book, seed=2, **kw)
    assert stats.ks_2samp(fast, exact).pvalue > 1e-3
    sf, se = ll.summarise_losses(fast), ll.summarise_losses(exact)
    for key in ("expected_loss", "p50", "p90", "var_99", "es_99"):
        assert abs(sf[key] - se[key]) < 4.0 * math.hypot(sf["se_" + key], se["se_" + key]), key
    analytic = ll.analytic_expected_loss(book, mult)
    assert ll.expected_loss_within_se(se, analytic, 4.0) is None


def test_conditional_bernoulli_reference_follows_the_exact_finite_law():
    n_loans, pd, rho, n = 200, 0.02, 0.12, 50_000
    book = homogeneous_book(n_loans, pd, loss=1.0)
    counts = ll.simulate_portfolio_loss_bernoulli(
        book, pd_multiplier=1.0, rho=rho, n_sims=n, seed=3
    )
    cdf = np.cumsum(ll.finite_portfolio_default_pmf(pd, rho, n_loans=n_loans))
    for k in (0, 2, 5, 10, 20):
        assert abs(np.mean(counts <= k) - cdf[k]) < 4.5 * math.sqrt(cdf[k] * (1 - cdf[k]) / n)


# --------------------------------------------------------------------------- contributions


def contributions(book, tail, *, groups=None, n_groups=0, chunk_size=16_384, **kw):
    total = None
    for lo, hi in ll.chunk_ranges(tail.n_sims, chunk_size):
        part = ll.contribution_chunk(
            book, start=lo, stop=hi, tail=tail, groups=groups, n_groups=n_groups, **kw
        )
        total = part if total is None else total.merge(part)
    ll.check_second_pass(total, tail)
    return total


def test_contributions_add_up_to_the_portfolio_var_and_es():
    book = heterogeneous_arrays(300, seed=3)
    # a loan that always defaults under the scenario, one that never does, one without loss
    pd = book.pd.copy()
    pd[:3] = (0.9, 0.0, 0.05)
    ead = book.ead.copy()
    ead[2] = 0.0
    book = ll.LoanArrays(loan_id=book.loan_id, pd=pd, ead=ead, lgd=book.lgd)
    segments = np.random.default_rng(4).integers(0, 4, book.n_loans)
    kw = {"pd_multiplier": 1.3, "rho": 0.2, "seed": 5}
    losses = ll.simulate_portfolio_loss(book, n_sims=40_000, **kw)
    summary, tail = ll.summarise_losses(losses), ll.tail_spec(losses)
    sums = contributions(book, tail, groups=segments, n_groups=4, **kw)
    by_loan = ll.euler_contributions(sums, tail)
    by_segment = ll.euler_contributions(sums, tail, by="groups")
    for alloc in (by_loan, by_segment):
        assert alloc["es"].sum() == pytest.approx(summary["es_99"], rel=1e-12)
        assert alloc["var"].sum() == pytest.approx(summary["var_99"], rel=1e-12)
        assert (alloc["se_es"] >= 0).all() and (alloc["se_var"] >= 0).all()
    for seg in range(4):
        mine = segments == seg
        assert by_segment["es"][seg] == pytest.approx(by_loan["es"][mine].sum(), rel=1e-12)
    # the certain loan contributes its whole loss to every tail simulation; PD 0 and zero
    # exposure contribute nothing
    assert by_loan["es"][0] == pytest.approx(ead[0] * book.lgd[0], rel=1e-12)
    # (the VaR allocation is scaled by VaR / mean loss in the window, so that it adds up)
    scale = tail.var * sums.n_window / sums.window_loss
    assert by_loan["var"][0] == pytest.approx(ead[0] * book.lgd[0] * scale, rel=1e-12)
    assert by_loan["es"][1] == 0.0 and by_loan["es"][2] == 0.0
    # the same floats whatever the chunking (error-free accumulation), and through bytes
    for chunk_size in (1_024, 3_000, 40_000):
        other = contributions(book, tail, groups=segments, n_groups=4, chunk_size=chunk_size, **kw)
        assert other.window_loss == sums.window_loss
        for name, values in sums.loans.items():
            assert other.loans[name].tobytes() == values.tobytes(), (chunk_size, name)
            assert other.groups[name].tobytes() == sums.groups[name].tobytes(), (chunk_size, name)
    back = ll.ContributionSums.from_bytes(sums.to_bytes())
    assert back.n_sims == sums.n_sims and back.window_loss == sums.window_loss
    for name, values in sums.groups.items():
        assert back.groups[name].tobytes() == values.tobytes()


def test_homogeneous_book_allocates_var_and_es_equally_within_standard_errors():
    """Identical loans share the tail equally: ``C_i = ES / n`` and ``c_i = VaR / n``.

    Each loan's contribution is compared with the exact share in its own standard errors. The
    200 z-scores are nearly independent (the common part, the noise of the portfolio ES, is
    well below a loan's own noise), so their mean square lies in [0.7, 1.4] (four standard
    deviations of a chi-square mean over 200) unless the SEs are miscalibrated, and no ES
    z-score exceeds 4.5. VaR contributions average the loans' default indicators over the
    few hundred simulations of the window, so their z-scores are discrete and only their
    mean square is bounded.
    """
    n_loans, pd, rho = 200, 0.02, 0.12
    book = homogeneous_book(n_loans, pd)
    kw = {"pd_multiplier": 1.0, "rho": rho, "seed": 23}
    losses = ll.simulate_portfolio_loss(book, n_sims=200_000, **kw)
    tail = ll.tail_spec(losses)
    alloc = ll.euler_contributions(contributions(book, tail, **kw), tail)
    _, es = exact_var_es(ll.finite_portfolio_default_pmf(pd, rho, n_loans=n_loans), EAD_LGD, 0.99)
    z = (alloc["es"] - es / n_loans) / alloc["se_es"]
    assert np.abs(z).max() < 4.5, np.abs(z).max()
    assert 0.7 < np.mean(z**2) < 1.4, np.mean(z**2)
    z_var = (alloc["var"] - tail.var / n_loans) / alloc["se_var"]
    assert 0.7 < np.mean(z_var**2) < 1.4, np.mean(z_var**2)


def test_contribution_pass_refuses_a_tail_it_did_not_reproduce():
    book = heterogeneous_arrays(50, seed=9)
    kw = {"pd_multiplier": 1.0, "rho": 0.1, "seed": 2}
    losses = ll.simulate_portfolio_loss(book, n_sims=5_000, **kw)
    tail = ll.tail_spec(losses)
    other_seed = {**kw, "seed": 3}
    part = ll.contribution_chunk(book, start=0, stop=5_000, tail=tail, **other_seed)
    with pytest.raises(ll.LoanBookError, match="did not reproduce"):
        ll.check_second_pass(part, tail)


@pytest.mark.slow
def test_contribution_standard_errors_match_the_spread_over_seeds():
    """ES and VaR contribution SEs of each segment against 120 independent runs.

    With R = 120 the spread has a relative error of about 1 / sqrt(2 R) = 6.5%; the band
    [0.75, 1.33] is four of those, widened for the skewed tail. The VaR contributions' SE
    leaves out the window's smoothing bias, which the same band bounds.
    """
    book = heterogeneous_arrays(80, seed=14, pd_high=0.2)
    segments = np.arange(book.n_loans) % 3
    es, se_es, var, se_var = [], [], [], []
    for seed in range(120):
        kw = {"pd_multiplier": 1.5, "rho": 0.15, "seed": seed}
        losses = ll.simulate_portfolio_loss(book, n_sims=16_384, **kw)
        tail = ll.tail_spec(losses)
        alloc = ll.euler_contributions(
            contributions(book, tail, groups=segments, n_groups=3, **kw), tail, by="groups"
        )
        es.append(alloc["es"])
        se_es.append(alloc["se_es"])
        var.append(alloc["var"])
        se_var.append(alloc["se_var"])
    for name, values, ses in (("es", es, se_es), ("var", var, se_var)):
        ratio = np.mean(ses, axis=0) / np.std(values, axis=0, ddof=1)
        assert ((0.75 < ratio) & (ratio < 1.33)).all(), (name, ratio)


def test_contribution_pass_memory_is_flat_in_the_number_of_simulations():
    book = heterogeneous_arrays(500, seed=15)
    kw = {"pd_multiplier": 2.0, "rho": 0.2, "seed": 1}
    peaks = {}
    for n_sims in (8_192, 65_536):
        losses = ll.simulate_portfolio_loss(book, n_sims=n_sims, **kw)
        tail = ll.tail_spec(losses)
        tracemalloc.start()
        contributions(book, tail, chunk_size=8_192, **kw)
        peaks[n_sims] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peaks[65_536] / peaks[8_192] < 1.5, peaks


def test_tail_spec_weights_the_atom_at_the_var():
    # 1,000 losses: 985 zeros, 10 at 10.0, 5 at 100.0; at 99% the VaR is 10 and half of the
    # 10-atom lies in the tail (the tail holds 10 simulations: 5 above, 5 of the atom)
    losses = np.r_[np.zeros(985), np.full(10, 10.0), np.full(5, 100.0)]
    np.random.default_rng(0).shuffle(losses)
    tail = ll.tail_spec(losses, level=0.99)
    assert (tail.var, tail.n_above, tail.n_atom) == (10.0, 5, 10)
    assert tail.atom_weight == pytest.approx(0.5)
    assert ll.summarise_losses(losses)["es_99"] == pytest.approx((5 * 100.0 + 5 * 10.0) / 10)
    # the window spans one rank either side of the VaR (10% of 10 tail simulations, min 1)
    assert (tail.window_lo, tail.window_hi) == (10.0, 10.0)


def test_contribution_table_lists_segments_and_the_largest_contributors():
    book = heterogeneous_arrays(120, seed=21)
    segments = [("retail", "sme", None)[i % 3] for i in range(book.n_loans)]
    names, codes = ll.segment_codes(segments)
    assert names == ["retail", "sme", "unassigned"]
    kw = {"pd_multiplier": 1.5, "rho": 0.2, "seed": 8}
    losses = ll.simulate_portfolio_loss(book, n_sims=20_000, **kw)
    tail = ll.tail_spec(losses)
    sums = contributions(book, tail, groups=codes, n_groups=len(names), **kw)
    table = ll.contribution_table(book, segments, sums, tail, top_loans=5)
    seg = table.filter(pl.col("kind") == "segment")
    loans = table.filter(pl.col("kind") == "loan")
    assert seg["segment"].to_list() == names and seg["n_loans"].to_list() == [40, 40, 40]
    assert seg["exposure"].sum() == pytest.approx(float(book.loss_given_default.sum()))
    assert seg["es_share"].sum() == pytest.approx(1.0, rel=1e-12)
    summary = ll.summarise_losses(losses)
    assert math.fsum(seg["es_contribution"]) == pytest.approx(summary["es_99"], rel=1e-12)
    assert ll.contributions_failure(summary, table) is None
    by_loan = ll.euler_contributions(sums, tail)["es"]
    largest = np.argsort(-by_loan)[:5]
    assert loans["rank"].to_list() == [1, 2, 3, 4, 5]
    assert loans["loan_id"].to_list() == [str(book.loan_id[i]) for i in largest]
    assert loans["segment"].to_list() == [names[codes[i]] for i in largest]
    # a table that does not add up is named by figure and both values
    broken = table.with_columns(pl.col("es_contribution") * 1.01)
    message = ll.contributions_failure(summary, broken)
    assert message is not None and "es_99" in message and "var_99" not in message
    assert ll.contributions_failure(summary, table.head(0)) == "no segment contributions stored"


def test_chunk_ranges_from_a_later_start_continue_the_run():
    ranges = ll.chunk_ranges(10_000, 2_048, start=3_000)
    assert ranges[0] == (3_000, 4_096) and ranges[-1][1] == 10_000
    assert all(lo % 2_048 == 0 for lo, _ in ranges[1:])
    book = heterogeneous_arrays(30, seed=2)
    kw = {"pd_multiplier": 1.2, "rho": 0.2, "seed": 4}
    whole = ll.simulate_portfolio_loss(book, n_sims=10_000, **kw)
    tail_part = np.concatenate([ll.simulate_chunk(book, start=a, stop=b, **kw) for a, b in ranges])
    assert tail_part.tobytes() == whole[3_000:].tobytes()
    with pytest.raises(ll.LoanBookError, match="below n_sims"):
        ll.chunk_ranges(100, 10, start=100)
