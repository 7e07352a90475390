"""Tests of the FX spread anomaly domain: features, detector quality, drift and gate rules.

Detection floors were set from measurements on the seeded simulator (``fx_sim``, about 2.8 % of
ticks injected, like the demo data), training on 3 days and scoring a 4th with the default 3 %
alarm budget; 6 seeds were measured per regime:

* desk regime (4-15x bursts and spikes in 0.25 log-sd noise): AP 1.000, precision 0.82-1.00,
  recall 1.00, for EURUSD and USDJPY alike. Floors: AP >= 0.95, precision >= 0.6,
  recall >= 0.9.
* hard regime (2.5-8x anomalies in 0.4 log-sd noise): AP 0.88-0.95, precision 0.63-0.85,
  recall 0.82-0.95. Floors: AP >= 0.75, precision >= 0.5, recall >= 0.65.

What a degraded model looks like, measured on the hard regime: a forest fitted on the anomalous
ticks only (a wrong notion of "normal") ranks worse than chance (AP about 0.01); a random ranking
(labels permuted) has AP near the base rate. A forest fitted on column-wise shuffled training
features is *not* worse (AP 0.86-0.95): every feature is informative on its own, so the forest
needs the marginals, not their joint structure; no test pretends otherwise.
"""

import datetime as dt
import math

import numpy as np
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from polars.testing import assert_frame_equal
from scipy import stats
from sklearn.ensemble import IsolationForest
from sklearn.metrics import average_precision_score, f1_score, precision_score, recall_score

from pipeline.domain.errors import DomainError
from pipeline.domain.fx_anomaly import (
    FEATURE_COLUMNS,
    LABEL_FREE,
    LABELLED,
    MIN_HISTORY,
    MIN_TRAINING_ROWS,
    PSI_EPSILON,
    RATE_FLOOR,
    SCALE_FLOOR,
    TICK_COLUMNS,
    FxGateConfigError,
    FxInputError,
    FxModelError,
    anomaly_rate,
    burst_blocks,
    count_bursts,
    drift_warnings,
    evaluate_detector,
    fast_average_precision,
    feature_drift,
    feature_matrix,
    fit_spread_model,
    holdout_comparison,
    kpi_failures,
    ks_statistic,
    label_free_failures,
    label_free_summary,
    paired_ap_bootstrap,
    population_stability_index,
    precision_failures,
    promotion_failures,
    rank_agreement,
    reviewed_labels,
    reviewed_precision,
    score_spreads,
    spread_features,
)
from pipeline_tests.domain.fx_sim import SimulatedTicks, simulate_ticks

TRAIN_START = dt.date(2024, 1, 2)
TEST_START = dt.date(2024, 1, 5)
HARD = {"noise_sigma": 0.4, "multiplier_range": (2.5, 8.0)}
USDJPY = {"symbol": "USDJPY", "mid0": 150.0, "spread_level": 0.01}


def _train_test(seed: int, **kwargs: object) -> tuple[SimulatedTicks, SimulatedTicks]:
    train = simulate_ticks(seed=100 + seed, n_days=3, start=TRAIN_START, **kwargs)  # type: ignore[arg-type]
    test = simulate_ticks(seed=200 + seed, n_days=1, start=TEST_START, **kwargs)  # type: ignore[arg-type]
    return train, test


@pytest.fixture(scope="module")
def desk() -> tuple[SimulatedTicks, SimulatedTicks]:
    return _train_test(0)


@pytest.fixture(scope="module")
def desk_features(desk: tuple[SimulatedTicks, SimulatedTicks]) -> tuple[pl.DataFrame, pl.DataFrame]:
    train, test = desk
    return spread_features(train.ticks), spread_features(test.ticks)


@pytest.fixture(scope="module")
def desk_model(desk_features: tuple[pl.DataFrame, pl.DataFrame]) -> IsolationForest:
    return fit_spread_model(desk_features[0])


def _ticks(
    spreads: list[float], mids: list[float] | None = None, *, symbol: str = "EURUSD"
) -> pl.DataFrame:
    """Hand-made ticks one second apart from 06:00 UTC."""
    mids = mids if mids is not None else [1.1] * len(spreads)
    t0 = dt.datetime(2024, 1, 2, 6, tzinfo=dt.UTC)
    bid = [m - s / 2 for m, s in zip(mids, spreads, strict=True)]
    ask = [m + s / 2 for m, s in zip(mids, spreads, strict=True)]
    return pl.DataFrame(
        {
            "symbol": [symbol] * len(spreads),
            "ts": [t0 + dt.timedelta(seconds=i) for i in range(len(spreads))],
            "bid": bid,
            "ask": ask,
            "spread": [a - b for a, b in zip(ask, bid, strict=True)],
        },
        schema_overrides={"ts": pl.Datetime("us", "UTC")},
    )


# --------------------------------------------------------------------------------------------
# Simulator sanity
# --------------------------------------------------------------------------------------------


def test_simulator_is_seeded_and_injects_labelled_wide_spreads() -> None:
    a = simulate_ticks(seed=7)
    b = simulate_ticks(seed=7)
    assert_frame_equal(a.ticks, b.ticks, check_exact=True)
    assert a.ticks.height == 2_000
    assert a.ticks["ts"].is_sorted()
    rate = a.is_anomaly.mean()
    assert 0.005 < rate < 0.05, rate
    spread = a.ticks["spread"].to_numpy()
    ratio = np.median(spread[a.is_anomaly]) / np.median(spread[~a.is_anomaly])
    assert ratio > 3.0, ratio


# --------------------------------------------------------------------------------------------
# Features
# --------------------------------------------------------------------------------------------


def test_features_have_contract_columns_and_are_finite(
    desk_features: tuple[pl.DataFrame, pl.DataFrame],
) -> None:
    features = desk_features[0]
    assert features.columns == [*TICK_COLUMNS, *FEATURE_COLUMNS]
    x = features.select(FEATURE_COLUMNS).to_numpy()
    assert x.dtype == np.float64
    assert np.isfinite(x).all()
    assert features.select(pl.all().null_count()).sum_horizontal().item() == 0
    assert (features["spread_log_excess"] >= 0).all()
    assert (features["spread_excess_z"] >= 0).all()


@pytest.mark.parametrize("cut", [1, 2, MIN_HISTORY, MIN_HISTORY + 2, 250, 1_999, 4_321])
def test_features_are_causal_prefix_equals_full(
    desk: tuple[SimulatedTicks, SimulatedTicks], cut: int
) -> None:
    ticks = desk[0].ticks
    full = spread_features(ticks)
    prefix = spread_features(ticks.head(cut))
    assert_frame_equal(prefix, full.head(cut), check_exact=True)


def test_changing_a_future_tick_changes_no_past_feature_row(
    desk: tuple[SimulatedTicks, SimulatedTicks],
) -> None:
    ticks = desk[1].ticks
    k = 1_500
    wider = pl.int_range(pl.len()) == k
    bumped = ticks.with_columns(
        bid=pl.when(wider).then(pl.col("bid") - 0.01).otherwise(pl.col("bid")),
        ask=pl.when(wider).then(pl.col("ask") + 0.01).otherwise(pl.col("ask")),
    ).with_columns(spread=pl.col("ask") - pl.col("bid"))
    before = spread_features(ticks)
    after = spread_features(bumped)
    assert_frame_equal(after.head(k), before.head(k), check_exact=True)
    assert after["spread_excess_z"][k] > before["spread_excess_z"][k] + 10


def test_features_by_hand_for_a_flat_spread_then_a_tenfold_spike() -> None:
    n = 60
    spreads = [1e-4] * n + [1e-3]
    features = spread_features(_ticks(spreads))
    spike = features.row(n, named=True)
    assert spike["rel_spread_bps"] == pytest.approx(1e-3 / 1.1 * 1e4, rel=1e-12)
    assert spike["spread_log_excess"] == pytest.approx(math.log(10.0), rel=1e-9)
    # The past deviations are all 0, so the MAD is 0 and the scale floor applies.
    assert spike["spread_excess_z"] == pytest.approx(math.log(10.0) / SCALE_FLOOR, rel=1e-9)
    assert features["spread_excess_z"].head(n).abs().max() == pytest.approx(0.0, abs=1e-9)
    # 06:00 UTC is a quarter turn of the day.
    assert features["hour_sin"][0] == pytest.approx(1.0, abs=1e-12)
    assert features["hour_cos"][0] == pytest.approx(0.0, abs=1e-12)


def test_robust_z_is_zero_during_warm_up_and_live_after(
    desk_features: tuple[pl.DataFrame, pl.DataFrame],
) -> None:
    z = desk_features[0]["spread_excess_z"]
    assert (z.head(MIN_HISTORY) == 0.0).all()
    assert features_first_positive(z) <= MIN_HISTORY + 40
    assert desk_features[0]["spread_log_excess"][0] == 0.0


def features_first_positive(z: pl.Series) -> int:
    return int(np.argmax(z.to_numpy() > 0))


def test_features_are_invariant_to_the_price_scale() -> None:
    eur = simulate_ticks(seed=3).ticks
    scaled = eur.with_columns(
        pl.lit("USDJPY").alias("symbol"),
        (pl.col("bid") * 136.4).alias("bid"),
        (pl.col("ask") * 136.4).alias("ask"),
    ).with_columns(spread=pl.col("ask") - pl.col("bid"))
    a = feature_matrix(spread_features(eur))
    b = feature_matrix(spread_features(scaled))
    np.testing.assert_allclose(b, a, rtol=1e-7, atol=1e-7)


def test_features_are_computed_per_symbol() -> None:
    eur = simulate_ticks(seed=4).ticks
    jpy = simulate_ticks(seed=5, **USDJPY).ticks  # type: ignore[arg-type]
    mixed = pl.concat([eur, jpy]).sort("ts", maintain_order=True)
    together = spread_features(mixed)
    for symbol, alone in (("EURUSD", eur), ("USDJPY", jpy)):
        assert_frame_equal(
            together.filter(pl.col("symbol") == symbol), spread_features(alone), check_exact=True
        )


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(st.floats(0.5, 200.0), st.one_of(st.just(0.0), st.floats(1e-7, 0.2))),
        min_size=1,
        max_size=80,
    )
)
def test_features_stay_finite_for_any_valid_ticks(rows: list[tuple[float, float]]) -> None:
    # Spreads are a fraction of the mid (up to 10 %), including locked quotes (bid == ask).
    mids = [m for m, _ in rows]
    spreads = [m * f / 2 for m, f in rows]
    x = feature_matrix(spread_features(_ticks(spreads, mids)))
    assert x.shape == (len(rows), len(FEATURE_COLUMNS))
    assert np.isfinite(x).all()


# --------------------------------------------------------------------------------------------
# Input validation
# --------------------------------------------------------------------------------------------


def _one_bad(column: str, row: int, value: float) -> pl.DataFrame:
    ticks = _ticks([1e-4] * 5)
    return ticks.with_columns(
        pl.when(pl.int_range(pl.len()) == row).then(value).otherwise(pl.col(column)).alias(column)
    )


@pytest.mark.parametrize(
    ("ticks", "pattern"),
    [
        (_ticks([1e-4] * 3).drop("ask"), r"lack column\(s\) \['ask'\]"),
        (
            _one_bad("bid", 3, 1.2).with_columns(spread=pl.col("ask") - pl.col("bid")),
            r"bid > ask.*row 3 \(symbol='EURUSD', ts=2024-01-02 06:00:03.*bid=1\.2",
        ),
        (_one_bad("bid", 2, -1.0), r"non-positive price.*row 2.*bid=-1\.0"),
        (_one_bad("ask", 1, 0.0), r"non-positive price.*row 1.*ask=0\.0"),
        (_one_bad("ask", 4, float("nan")), r"non-finite.*row 4.*ask=nan"),
        (_one_bad("spread", 0, 5e-4), r"spread != ask - bid.*row 0.*spread=0\.0005"),
        (_ticks([1e-4] * 4).reverse(), r"earlier than the previous tick.*row 1"),
        (_ticks([1e-4] * 2).with_columns(pl.col("ts").cast(pl.Int64)), r"'ts' must be a Datetime"),
        (_ticks([1e-4] * 2).with_columns(bid=pl.lit("x")), r"'bid' must be numeric"),
        (
            _ticks([1e-4] * 3).with_columns(
                bid=pl.when(pl.int_range(pl.len()) == 1).then(None).otherwise(pl.col("bid"))
            ),
            r"null value.*row 1",
        ),
    ],
    ids=[
        "missing-column",
        "crossed",
        "negative-bid",
        "zero-ask",
        "nan",
        "spread-mismatch",
        "unsorted",
        "ts-not-datetime",
        "bid-not-numeric",
        "null",
    ],
)
def test_bad_ticks_raise_a_named_domain_error(ticks: pl.DataFrame, pattern: str) -> None:
    with pytest.raises(FxInputError, match=pattern) as info:
        spread_features(ticks)
    assert isinstance(info.value, DomainError)
    assert isinstance(info.value, ValueError)


def test_feature_matrix_is_float64_in_feature_column_order(
    desk_features: tuple[pl.DataFrame, pl.DataFrame],
) -> None:
    features = desk_features[1]
    x = feature_matrix(features.select(reversed(features.columns)))
    assert x.dtype == np.float64
    assert x.flags.c_contiguous
    assert x.shape == (features.height, len(FEATURE_COLUMNS))
    for j, name in enumerate(FEATURE_COLUMNS):
        np.testing.assert_array_equal(x[:, j], features[name].to_numpy())


def test_feature_matrix_rejects_missing_and_non_finite_features(
    desk_features: tuple[pl.DataFrame, pl.DataFrame],
) -> None:
    features = desk_features[1].head(10)
    with pytest.raises(FxInputError, match=r"lack column\(s\) \['hour_cos'\]"):
        feature_matrix(features.drop("hour_cos"))
    broken = features.with_columns(
        spread_excess_z=pl.when(pl.int_range(pl.len()) == 7)
        .then(float("inf"))
        .otherwise(pl.col("spread_excess_z"))
    )
    with pytest.raises(FxInputError, match=r"row 7, column 'spread_excess_z': inf"):
        feature_matrix(broken)


# --------------------------------------------------------------------------------------------
# Model fitting and scoring
# --------------------------------------------------------------------------------------------


def test_fit_refuses_too_few_rows_and_zero_variance() -> None:
    few = spread_features(simulate_ticks(seed=1).ticks.head(MIN_TRAINING_ROWS - 1))
    with pytest.raises(FxModelError, match=rf"on {MIN_TRAINING_ROWS - 1} row\(s\); need at least"):
        fit_spread_model(few)
    with pytest.raises(FxModelError, match=r"on 0 row\(s\)"):
        fit_spread_model(few.clear())
    flat = _ticks([1e-4] * 100).with_columns(pl.col("ts").first())
    with pytest.raises(FxModelError, match="all constant"):
        fit_spread_model(spread_features(flat))


def test_scores_match_the_model_and_are_reproducible(
    desk_features: tuple[pl.DataFrame, pl.DataFrame], desk_model: IsolationForest
) -> None:
    features = desk_features[1]
    scored = score_spreads(desk_model, features)
    assert scored.columns == [*features.columns, "anomaly_score", "is_anomaly"]
    x = feature_matrix(features)
    np.testing.assert_array_equal(scored["anomaly_score"].to_numpy(), -desk_model.score_samples(x))
    np.testing.assert_array_equal(scored["is_anomaly"].to_numpy(), desk_model.predict(x) == -1)
    np.testing.assert_array_equal(
        scored["is_anomaly"].to_numpy(), scored["anomaly_score"].to_numpy() > -desk_model.offset_
    )
    refit = fit_spread_model(desk_features[0])
    assert_frame_equal(score_spreads(refit, features), scored, check_exact=True)
    assert score_spreads(desk_model, features.clear()).height == 0


def test_score_refuses_a_model_fitted_on_other_features(
    desk_features: tuple[pl.DataFrame, pl.DataFrame],
) -> None:
    other = IsolationForest(random_state=0).fit(np.random.default_rng(0).normal(size=(100, 3)))
    with pytest.raises(FxModelError, match="model expects 3 feature"):
        score_spreads(other, desk_features[1])


def test_anomaly_rate_counts_flags_and_refuses_empty() -> None:
    scored = pl.DataFrame({"is_anomaly": [True, False, False, False]})
    assert anomaly_rate(scored) == 0.25
    with pytest.raises(FxInputError, match="empty"):
        anomaly_rate(scored.clear())
    with pytest.raises(FxInputError, match="lacks 'is_anomaly'"):
        anomaly_rate(pl.DataFrame({"x": [1]}))


# --------------------------------------------------------------------------------------------
# Detection quality against injected truth
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pair", [{}, USDJPY], ids=["EURUSD", "USDJPY"])
def test_detector_finds_desk_anomalies(pair: dict[str, object]) -> None:
    train, test = _train_test(0, **pair)
    model = fit_spread_model(spread_features(train.ticks))
    metrics = evaluate_detector(model, spread_features(test.ticks), test.labels)
    print(pair.get("symbol", "EURUSD"), metrics)
    assert metrics["average_precision"] >= 0.95, metrics
    assert metrics["precision"] >= 0.6, metrics
    assert metrics["recall"] >= 0.9, metrics


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_detector_finds_harder_anomalies(seed: int) -> None:
    train, test = _train_test(seed, **HARD)
    model = fit_spread_model(spread_features(train.ticks))
    metrics = evaluate_detector(model, spread_features(test.ticks), test.labels)
    print(seed, metrics)
    assert metrics["average_precision"] >= 0.75, metrics
    assert metrics["precision"] >= 0.5, metrics
    assert metrics["recall"] >= 0.65, metrics


def test_default_alarm_budget_beats_auto_contamination(
    desk: tuple[SimulatedTicks, SimulatedTicks], desk_features: tuple[pl.DataFrame, pl.DataFrame]
) -> None:
    train, test = desk_features
    budget = evaluate_detector(fit_spread_model(train), test, desk[1].labels)
    auto = evaluate_detector(fit_spread_model(train, contamination="auto"), test, desk[1].labels)
    print("budget", budget, "auto", auto)
    assert auto["anomaly_rate"] > 0.08  # "auto" flags several times the 2.8 % injected
    assert budget["precision"] > auto["precision"] + 0.4
    assert budget["average_precision"] == pytest.approx(auto["average_precision"], abs=1e-12)


def test_model_trained_on_the_wrong_normal_ranks_worse_than_chance() -> None:
    train, test = _train_test(0, **HARD)
    train_features = spread_features(train.ticks)
    test_features = spread_features(test.ticks)
    good = evaluate_detector(fit_spread_model(train_features), test_features, test.labels)
    anomalous_only = train_features.filter(pl.Series(train.is_anomaly))
    assert anomalous_only.height >= MIN_TRAINING_ROWS
    bad = evaluate_detector(fit_spread_model(anomalous_only), test_features, test.labels)
    base_rate = good["n_positive"] / good["n"]
    print("good", good, "bad", bad, "base rate", base_rate)
    assert bad["average_precision"] < 0.1
    assert bad["average_precision"] < good["average_precision"] - 0.5


def test_average_precision_of_a_random_ranking_is_near_the_base_rate(
    desk: tuple[SimulatedTicks, SimulatedTicks],
    desk_features: tuple[pl.DataFrame, pl.DataFrame],
    desk_model: IsolationForest,
) -> None:
    labels = desk[1].labels
    rng = np.random.default_rng(11)
    permuted = labels.with_columns(is_anomaly=pl.Series(rng.permutation(desk[1].is_anomaly)))
    metrics = evaluate_detector(desk_model, desk_features[1], permuted)
    base_rate = metrics["n_positive"] / metrics["n"]
    assert metrics["average_precision"] < 0.1
    assert metrics["average_precision"] < 3 * base_rate + 0.02


def test_evaluate_matches_sklearn_on_aligned_arrays(
    desk: tuple[SimulatedTicks, SimulatedTicks],
    desk_features: tuple[pl.DataFrame, pl.DataFrame],
    desk_model: IsolationForest,
) -> None:
    features = desk_features[1]
    truth = desk[1].is_anomaly
    # Shuffle the labels' rows and drop their symbol: the join on ts must still align them.
    labels = desk[1].labels.drop("symbol").sample(fraction=1.0, shuffle=True, seed=5)
    metrics = evaluate_detector(desk_model, features, labels)
    scored = score_spreads(desk_model, features)
    pred = scored["is_anomaly"].to_numpy()
    score = scored["anomaly_score"].to_numpy()
    assert metrics["precision"] == precision_score(truth, pred)
    assert metrics["recall"] == recall_score(truth, pred)
    assert metrics["f1"] == f1_score(truth, pred)
    assert metrics["average_precision"] == average_precision_score(truth, score)
    assert metrics["n"] == features.height
    assert metrics["n_positive"] == truth.sum()
    assert metrics["anomaly_rate"] == anomaly_rate(scored)


def test_evaluate_refuses_labels_that_do_not_cover_or_repeat(
    desk: tuple[SimulatedTicks, SimulatedTicks],
    desk_features: tuple[pl.DataFrame, pl.DataFrame],
    desk_model: IsolationForest,
) -> None:
    features, labels = desk_features[1], desk[1].labels
    with pytest.raises(FxInputError, match=r"labels miss 10 of 2000 feature row"):
        evaluate_detector(desk_model, features, labels.slice(10))
    with pytest.raises(FxInputError, match=r"labels repeat 2 row\(s\)"):
        evaluate_detector(desk_model, features, pl.concat([labels, labels.head(1)]))
    with pytest.raises(FxInputError, match=r"lack column\(s\) \['is_anomaly'\]"):
        evaluate_detector(desk_model, features, labels.drop("is_anomaly"))
    with pytest.raises(FxInputError, match="zero feature rows"):
        evaluate_detector(desk_model, features.clear(), labels)


def test_evaluate_without_positives_leaves_ranking_metrics_undefined(
    desk: tuple[SimulatedTicks, SimulatedTicks],
    desk_features: tuple[pl.DataFrame, pl.DataFrame],
    desk_model: IsolationForest,
) -> None:
    none = desk[1].labels.with_columns(is_anomaly=pl.lit(False))
    metrics = evaluate_detector(desk_model, desk_features[1], none)
    assert metrics["n_positive"] == 0
    assert metrics["precision"] == 0.0
    assert math.isnan(metrics["average_precision"])
    assert math.isnan(metrics["recall"])
    assert promotion_failures(metrics, None, tolerance=0.0, floor=0.5) != []


# --------------------------------------------------------------------------------------------
# Drift
# --------------------------------------------------------------------------------------------


def test_psi_is_zero_for_identical_samples() -> None:
    x = np.random.default_rng(0).lognormal(size=5_000)
    assert population_stability_index(x, x) == 0.0
    assert population_stability_index(x, np.random.default_rng(0).permutation(x)) == 0.0


def test_psi_of_a_known_shift_matches_the_hand_computation() -> None:
    # Deciles of 0..999 are 99.9, 199.8, ...: each bin holds 100 reference values (10 %).
    reference = np.arange(1_000, dtype=float)
    # Shifted by +100: bin 0 is empty (floored at epsilon), bins 1-8 keep 10 %, bin 9 gets 20 %.
    shifted = reference + 100.0
    expected = (PSI_EPSILON - 0.1) * math.log(PSI_EPSILON / 0.1) + (0.2 - 0.1) * math.log(2.0)
    assert population_stability_index(reference, shifted) == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(0.7594, abs=1e-4)
    # Only the lower half: bins 0-4 get 20 % each, bins 5-9 are empty.
    lower = reference[:500]
    expected_half = 5 * 0.1 * math.log(2.0) + 5 * (PSI_EPSILON - 0.1) * math.log(PSI_EPSILON / 0.1)
    assert population_stability_index(reference, lower) == pytest.approx(expected_half, rel=1e-12)


def test_psi_thresholds_read_as_documented_for_normal_shifts() -> None:
    rng = np.random.default_rng(1)
    reference = rng.normal(size=50_000)
    small = population_stability_index(reference, rng.normal(0.1, 1.0, size=50_000))
    large = population_stability_index(reference, rng.normal(0.8, 1.0, size=50_000))
    assert small < 0.1 < 0.25 < large


def test_psi_handles_a_discrete_reference_and_rejects_bad_samples() -> None:
    constant = np.full(100, 3.0)
    assert population_stability_index(constant, constant) == 0.0
    # One merged edge at 3.0: bins (-inf, 3] and (3, inf); all current values are above.
    expected = (1 - PSI_EPSILON) * math.log(1 / PSI_EPSILON) + (PSI_EPSILON - 1) * math.log(
        PSI_EPSILON / 1
    )
    assert population_stability_index(constant, constant + 1) == pytest.approx(expected)
    with pytest.raises(FxInputError, match="non-empty 1-D"):
        population_stability_index(np.array([]), constant)
    with pytest.raises(
        FxInputError, match=r"current has 1 non-finite value\(s\); first at index 2"
    ):
        population_stability_index(constant, np.array([1.0, 2.0, np.nan]))
    with pytest.raises(FxInputError, match="at least 2 bins"):
        population_stability_index(constant, constant, bins=1)


def test_ks_statistic_matches_scipy_and_a_closed_form() -> None:
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=700), rng.normal(0.3, 1.2, size=900)
    assert ks_statistic(a, b) == stats.ks_2samp(a, b).statistic
    grid = np.arange(1_000, dtype=float)
    assert ks_statistic(grid, grid + 100.0) == pytest.approx(0.1, abs=1e-12)
    assert ks_statistic(grid, grid) == 0.0
    with pytest.raises(FxInputError, match="reference"):
        ks_statistic(np.ones((2, 2)), grid)


# --------------------------------------------------------------------------------------------
# Gate rules
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("challenger", "champion", "expected"),
    [
        # First model: the floor alone decides.
        (0.75, None, []),
        (0.5, None, ["not above the floor 0.5000"]),
        (0.25, None, ["not above the floor"]),
        # Against a champion at 0.75 with tolerance 0.125 (bound 0.625, exact in binary).
        (0.875, 0.75, []),
        (0.625, 0.75, []),
        (0.6, 0.75, ["below the champion's 0.7500 minus tolerance 0.1250 = 0.6250"]),
        (0.5, 0.75, ["not above the floor", "below the champion's"]),
        (0.55, 0.95, ["below the champion's 0.9500"]),
        # Fail closed on missing or undefined metrics.
        (math.nan, None, ["challenger average_precision is missing or not finite"]),
        (0.9, math.nan, ["champion average_precision is missing or not finite"]),
    ],
)
def test_promotion_truth_table(
    challenger: float, champion: float | None, expected: list[str]
) -> None:
    failures = promotion_failures(
        {"average_precision": challenger},
        None if champion is None else {"average_precision": champion},
        tolerance=0.125,
        floor=0.5,
    )
    assert len(failures) == len(expected), failures
    for failure, fragment in zip(failures, expected, strict=True):
        assert fragment in failure


def test_promotion_fails_closed_on_missing_key_and_rejects_bad_config() -> None:
    assert promotion_failures({}, None, tolerance=0.0, floor=0.1) == [
        "challenger average_precision is missing or not finite (None); cannot judge it"
    ]
    with pytest.raises(FxGateConfigError, match="tolerance"):
        promotion_failures({"average_precision": 0.9}, None, tolerance=-0.1, floor=0.1)
    with pytest.raises(FxGateConfigError, match="floor"):
        promotion_failures({"average_precision": 0.9}, None, tolerance=0.0, floor=1.0)


@pytest.mark.parametrize(
    ("rate", "promotion_rate", "expected"),
    [
        # Promotion rate 1/64 and ratio 3: the bound 3/64 = 0.046875 is exact in binary.
        (0.015625, 0.015625, []),
        (0.046875, 0.015625, []),  # exactly 3x is allowed
        (0.0625, 0.015625, ["anomaly rate 0.0625 exceeds 3 x promotion rate 0.0156"]),
        # A model promoted with no alarms: the rate floor keeps its first flags from reverting it.
        (0.0025, 0.0, []),
        (0.004, 0.0, ["(floored at 0.001) = 0.0030"]),
        (math.nan, 0.02, ["not finite"]),
    ],
)
def test_kpi_truth_table(rate: float, promotion_rate: float, expected: list[str]) -> None:
    failures = kpi_failures(
        anomaly_rate=rate, promotion_anomaly_rate=promotion_rate, max_rate_ratio=3.0
    )
    assert len(failures) == len(expected), failures
    for failure, fragment in zip(failures, expected, strict=True):
        assert fragment in failure
    assert RATE_FLOOR == 1e-3


def test_kpi_rejects_bad_config_and_impossible_rates() -> None:
    ok = {"anomaly_rate": 0.01, "promotion_anomaly_rate": 0.01}
    with pytest.raises(FxGateConfigError, match="max_rate_ratio"):
        kpi_failures(**ok, max_rate_ratio=0.0)
    with pytest.raises(FxGateConfigError, match=r"anomaly_rate must be in \[0, 1\]; got 1.5"):
        kpi_failures(anomaly_rate=1.5, promotion_anomaly_rate=0.01, max_rate_ratio=3)


@pytest.mark.parametrize(
    ("drift", "expected"),
    [
        ({"a": {"psi": 0.1, "ks": 0.1}}, []),
        ({"a": {"psi": 0.25, "ks": 0.2}}, []),  # on the bounds is within them
        ({"a": {"psi": 0.3, "ks": 0.1}}, ["a: PSI 0.3000 exceeds the bound 0.2500"]),
        ({"a": {"psi": 0.1, "ks": 0.5}, "b": {"psi": 0.1, "ks": 0.1}}, ["a: KS 0.5000"]),
        ({"a": {"psi": math.nan, "ks": 0.1}}, ["a: PSI nan is not finite"]),
        ({"a": {"psi": 1.0, "ks": 0.1}, "b": {"psi": 0.0, "ks": 0.9}}, ["a: PSI", "b: KS"]),
    ],
)
def test_drift_warnings_truth_table(drift: dict, expected: list[str]) -> None:
    warnings = drift_warnings(drift, max_psi=0.25, max_ks=0.2)
    assert len(warnings) == len(expected), warnings
    for warning, fragment in zip(warnings, expected, strict=True):
        assert warning.startswith(fragment)
    with pytest.raises(FxGateConfigError, match="max_psi"):
        drift_warnings(drift, max_psi=-1.0, max_ks=0.2)
    with pytest.raises(FxGateConfigError, match="max_ks"):
        drift_warnings(drift, max_psi=0.25, max_ks=1.5)


def test_feature_drift_sees_a_spread_level_change_only_in_the_raw_spread() -> None:
    """Twice the spread level: rel_spread_bps drifts, the scale-free features do not."""
    train = spread_features(simulate_ticks(seed=11, n_days=3).ticks)
    same = spread_features(simulate_ticks(seed=12, start=TEST_START).ticks)
    wider = spread_features(simulate_ticks(seed=12, start=TEST_START, spread_level=2e-4).ticks)
    reference = {c: train[c].to_numpy() for c in FEATURE_COLUMNS}
    calm, shifted = feature_drift(reference, same), feature_drift(reference, wider)
    assert list(shifted) == list(FEATURE_COLUMNS)
    assert drift_warnings(calm, max_psi=0.25, max_ks=0.25) == []
    assert shifted["rel_spread_bps"]["psi"] > 1.0 and shifted["rel_spread_bps"]["ks"] > 0.5
    for name in ("spread_log_excess", "spread_excess_z", "hour_sin", "hour_cos"):
        assert shifted[name] == calm[name], name  # the features are scale-free
    (warning,) = [w for w in drift_warnings(shifted, max_psi=0.25, max_ks=0.25) if "PSI" in w]
    assert warning.startswith("rel_spread_bps: PSI")
    # a model logged before features were stored: drift of its one reference feature
    legacy = feature_drift({"rel_spread_bps": reference["rel_spread_bps"]}, wider)
    assert list(legacy) == ["rel_spread_bps"]
    with pytest.raises(FxInputError, match="no reference sample"):
        feature_drift({"mid": reference["rel_spread_bps"]}, wider)


# --------------------------------------------------------------------------------------------
# Reviewed labels, the burst bootstrap of the AP difference, the label-free rule
# --------------------------------------------------------------------------------------------


def _at(minute: int) -> dt.datetime:
    return dt.datetime(2026, 9, 6, 10) + dt.timedelta(minutes=minute)


def test_only_ticks_inside_reviewed_windows_are_labelled() -> None:
    ticks = pl.DataFrame({"ts": [_at(m) for m in range(10)]}).with_columns(
        pl.col("ts").cast(pl.Datetime("us"))
    )
    incidents = pl.DataFrame(
        {
            "start": [_at(2), _at(3), _at(8), _at(7)],
            "end": [_at(5), _at(4), _at(8), _at(9)],
            "label": ["reviewed_window", "anomaly", "anomaly", "something_else"],
        }
    )
    labels = reviewed_labels(ticks, incidents)
    # minutes 2..5 reviewed (ends inclusive); 3 and 4 anomalous; the anomaly at 8 lies
    # outside every reviewed window and is left out, as are the unreviewed ticks
    assert labels["ts"].to_list() == [_at(m) for m in (2, 3, 4, 5)]
    assert labels["is_anomaly"].to_list() == [False, True, True, False]
    nothing = reviewed_labels(ticks, incidents.filter(pl.col("label") == "anomaly"))
    assert nothing.height == 0
    with pytest.raises(FxInputError, match="label"):
        reviewed_labels(ticks, incidents.drop("label"))


@given(
    st.lists(st.booleans(), min_size=2, max_size=60),
    st.lists(st.integers(0, 5), min_size=60, max_size=60),
)
def test_fast_average_precision_equals_sklearn_with_ties(y: list[bool], score: list[int]) -> None:
    y_true = np.array(y)
    s = np.array(score[: len(y)], dtype=float)  # few distinct values: many ties
    if not y_true.any():
        assert math.isnan(fast_average_precision(y_true, s))
        return
    assert fast_average_precision(y_true, s) == pytest.approx(
        average_precision_score(y_true, s), abs=1e-12
    )


def test_burst_blocks_start_at_each_burst_and_keep_its_ticks_together() -> None:
    y = np.array([0, 0, 1, 1, 1, 0, 0, 1, 0, 1, 1, 0], dtype=bool)
    assert burst_blocks(y).tolist() == [0, 0, 0, 0, 0, 0, 0, 1, 1, 2, 2, 2]
    assert count_bursts(y) == 3
    assert count_bursts(np.zeros(5, dtype=bool)) == 0


def _bursty_truth(n_bursts: int, seed: int, *, gap: int = 60, length: int = 8) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y = np.zeros(n_bursts * gap, dtype=bool)
    for b in range(n_bursts):
        start = b * gap + int(rng.integers(0, gap - length))
        y[start : start + int(rng.integers(1, length + 1))] = True
    return y


def test_bootstrap_of_identical_scores_gives_zero_with_an_interval_at_zero() -> None:
    y = _bursty_truth(20, seed=1)
    score = np.random.default_rng(2).normal(size=y.size) + 2.0 * y
    result = paired_ap_bootstrap(y, score, score.copy(), n_resamples=300, seed=3)
    assert result["ap_difference"] == 0.0
    assert result["ap_difference_se"] == 0.0
    assert result["ap_difference_lower"] == 0.0 == result["ap_difference_upper"]
    assert result["n_bursts"] == 20
    assert (
        promotion_failures(
            {"average_precision": 0.8},
            {"average_precision": 0.8},
            tolerance=0.0,
            floor=0.3,
            difference=result,
        )
        == []
    )


def test_bootstrap_of_a_perfect_against_a_random_detector_excludes_zero() -> None:
    y = _bursty_truth(20, seed=4)
    perfect = y.astype(float) + np.random.default_rng(5).uniform(0, 0.1, y.size)
    random = np.random.default_rng(6).uniform(size=y.size)
    base_rate = y.mean()
    result = paired_ap_bootstrap(y, perfect, random, n_resamples=500, seed=7)
    # truth: AP(perfect) = 1 and AP(random) is about the base rate (here ~0.07)
    assert result["ap_difference"] == pytest.approx(1.0 - base_rate, abs=0.08)
    assert 0 < result["ap_difference_lower"] <= result["ap_difference"]
    assert result["ap_difference"] <= result["ap_difference_upper"] <= 1.0
    assert 0.0 < result["ap_difference_se"] < 0.1
    # the other way round the challenger is worse beyond the uncertainty and refused
    worse = paired_ap_bootstrap(y, random, perfect, n_resamples=500, seed=7)
    assert worse["ap_difference_upper"] < 0
    (failure,) = promotion_failures(
        {"average_precision": 0.9},
        {"average_precision": 1.0},
        tolerance=0.0,
        floor=0.05,
        difference=worse,
    )
    assert "worse than the champion beyond the uncertainty" in failure


def test_bootstrap_resamples_bursts_not_ticks() -> None:
    """Long bursts are few independent units: the SE is that of n_bursts, not of n ticks.

    The same scores with each burst's ticks relabelled as one burst per tick (spaced
    apart) would give a much smaller SE if ticks were resampled; block resampling of
    long bursts must show the larger uncertainty of only a few incidents.
    """
    rng = np.random.default_rng(8)
    y = np.zeros(600, dtype=bool)
    for start in range(30, 600, 120):  # 5 bursts of 20 ticks
        y[start : start + 20] = True
    # the challenger finds some bursts completely and misses others
    found = np.zeros(600)
    for k, start in enumerate(range(30, 600, 120)):
        found[start : start + 20] = 1.0 if k % 2 == 0 else 0.0
    a = found + rng.uniform(0, 0.5, 600)
    b = rng.uniform(0, 0.5, 600) + 0.5 * y
    few = paired_ap_bootstrap(y, a, b, n_resamples=400, seed=9)
    assert few["n_bursts"] == 5
    # tick-level resampling (every tick its own block) of the same data
    ticks_as_bursts = np.zeros(y.size * 2, dtype=bool)
    ticks_as_bursts[::2] = y
    spread_a, spread_b = np.repeat(a, 2), np.repeat(b, 2)
    spread_a[1::2] = spread_b[1::2] = -1.0  # separators score lowest, change no AP
    many = paired_ap_bootstrap(ticks_as_bursts, spread_a, spread_b, n_resamples=400, seed=9)
    assert many["n_bursts"] == 100
    assert few["ap_difference"] == pytest.approx(many["ap_difference"], abs=1e-12)
    assert few["ap_difference_se"] > 2 * many["ap_difference_se"]


def test_bootstrap_without_anomalies_is_undefined_and_rejects_bad_input() -> None:
    result = paired_ap_bootstrap(np.zeros(10, bool), np.ones(10), np.ones(10))
    assert result["n_bursts"] == 0
    assert math.isnan(result["ap_difference_upper"])
    with pytest.raises(FxInputError, match="shape"):
        paired_ap_bootstrap(np.ones(3, bool), np.ones(3), np.ones(4))
    with pytest.raises(FxGateConfigError):
        paired_ap_bootstrap(np.ones(3, bool), np.ones(3), np.ones(3), level=1.0)


def _scored(ts: list[dt.datetime], score: np.ndarray, flagged: np.ndarray) -> pl.DataFrame:
    return pl.DataFrame(
        {"ts": ts, "anomaly_score": score, "is_anomaly": flagged},
        schema_overrides={"ts": pl.Datetime("us")},
    )


def test_holdout_comparison_scores_reviewed_ticks_or_falls_back_to_label_free() -> None:
    y = _bursty_truth(10, seed=10)
    ts = [_at(0) + dt.timedelta(seconds=i) for i in range(y.size)]
    good = np.where(y, 1.0, 0.0) + np.random.default_rng(11).uniform(0, 0.9, y.size)
    noise = np.random.default_rng(12).uniform(size=y.size)
    challenger = _scored(ts, good, good > 0.95)
    champion = _scored(ts, noise, noise > 0.95)
    half = y.size // 2  # the reviewer looked at the first half only
    labels = pl.DataFrame(
        {"ts": ts[:half], "is_anomaly": y[:half]}, schema_overrides={"ts": pl.Datetime("us")}
    )
    out = holdout_comparison(challenger, champion, labels, n_resamples=200)
    assert out["gate"] == LABELLED
    assert out["reviewed_ticks"] == half
    assert out["n_positive"] == y[:half].sum()
    assert out["challenger_average_precision"] == pytest.approx(
        average_precision_score(y[:half], good[:half]), abs=1e-12
    )
    assert out["champion_average_precision"] == pytest.approx(
        average_precision_score(y[:half], noise[:half]), abs=1e-12
    )
    assert out["ap_difference_lower"] > 0  # the good ranking wins beyond the uncertainty
    assert out["challenger_anomaly_rate"] == pytest.approx((good > 0.95).mean())
    assert out["rank_agreement"] == pytest.approx(stats.spearmanr(good, noise).statistic)

    unreviewed = holdout_comparison(challenger, champion, labels.clear())
    assert unreviewed["gate"] == LABEL_FREE
    assert math.isnan(unreviewed["challenger_average_precision"])
    assert math.isnan(unreviewed["ap_difference"])
    assert unreviewed["rank_agreement"] == out["rank_agreement"]
    first = holdout_comparison(challenger, None, labels, n_resamples=50)
    assert first["gate"] == LABELLED and math.isnan(first["ap_difference"])
    assert math.isnan(first["champion_average_precision"])
    with pytest.raises(FxInputError, match="different holdout ticks"):
        holdout_comparison(challenger, champion.slice(1), labels)


def test_rank_agreement_is_undefined_for_a_constant_model() -> None:
    a = np.arange(10.0)
    assert rank_agreement(a, a[::-1]) == pytest.approx(-1.0)
    assert math.isnan(rank_agreement(a, np.ones(10)))


@pytest.mark.parametrize(
    ("rate", "champion_rate", "agreement", "expected"),
    [
        # first model: the alarm budget 1/32 and ratio 2 give [1/64, 1/16]
        (0.03125, None, None, []),
        (0.0625, None, None, []),
        (0.07, None, None, ["outside [0.0156, 0.0625] (the alarm budget 0.0312"]),
        (0.01, None, None, ["outside"]),
        # with a champion flagging 1/32: same rate bounds, and rank agreement >= 0.5
        (0.03125, 0.03125, 0.9, []),
        (0.03125, 0.03125, 0.4, ["rank agreement with the champion 0.4000 is below 0.5000"]),
        (0.1, 0.03125, 0.4, ["the champion's rate", "rank agreement"]),
        (0.03125, 0.03125, math.nan, ["rank agreement nan is not finite"]),
        (math.nan, 0.03125, 0.9, ["flag rate nan is not finite"]),
    ],
)
def test_label_free_truth_table(
    rate: float, champion_rate: float | None, agreement: float | None, expected: list[str]
) -> None:
    failures = label_free_failures(
        challenger_rate=rate,
        champion_rate=champion_rate,
        rank_agreement=agreement,
        contamination=0.03125,
        max_rate_ratio=2.0,
        min_rank_agreement=0.5,
    )
    assert len(failures) == len(expected), failures
    for failure, fragment in zip(failures, expected, strict=True):
        assert fragment in failure


def test_label_free_summary_states_the_rule_values_not_an_ap() -> None:
    common = {"contamination": 0.03125, "max_rate_ratio": 2.0, "min_rank_agreement": 0.5}
    first = label_free_summary(
        challenger_rate=0.0625, champion_rate=None, rank_agreement=None, **common
    )
    assert first == (
        "flag rate 0.0625 = 2.00 x the alarm budget 0.0312 (bound 1/2..2); "
        "no champion to compare rankings with"
    )
    # a champion flagging less than RATE_FLOOR is compared with the floor, as the rule does
    floored = label_free_summary(
        challenger_rate=RATE_FLOOR, champion_rate=0.0, rank_agreement=0.875, **common
    )
    assert floored.startswith(f"flag rate {RATE_FLOOR:.4f} = 1.00 x the champion's rate")
    assert floored.endswith("rank agreement with the champion 0.875 (min 0.5)")
    assert "nan" not in first + floored


def test_label_free_rule_rejects_bad_config() -> None:
    kwargs = {"challenger_rate": 0.03, "champion_rate": None, "rank_agreement": None}
    with pytest.raises(FxGateConfigError, match="max_rate_ratio"):
        label_free_failures(
            **kwargs, contamination=0.03, max_rate_ratio=0.5, min_rank_agreement=0.5
        )
    with pytest.raises(FxGateConfigError, match="contamination"):
        label_free_failures(**kwargs, contamination=0.0, max_rate_ratio=2, min_rank_agreement=0.5)


@pytest.mark.parametrize(
    ("interval", "expected"),
    [
        ((-0.05, -0.12, 0.02), []),  # worse on the point, not beyond the uncertainty
        ((-0.1, -0.15, -0.03), ["interval [-0.1500, -0.0300] lies below -0.0000"]),
        ((0.1, 0.05, 0.2), []),
        ((math.nan, math.nan, math.nan), ["AP difference interval is missing or not finite"]),
    ],
)
def test_promotion_with_an_interval_refuses_only_a_challenger_worse_beyond_it(
    interval: tuple[float, float, float], expected: list[str]
) -> None:
    point, lower, upper = interval
    failures = promotion_failures(
        {"average_precision": 0.7},
        {"average_precision": 0.75},
        tolerance=0.0,
        floor=0.3,
        difference={
            "ap_difference": point,
            "ap_difference_lower": lower,
            "ap_difference_upper": upper,
        },
    )
    assert len(failures) == len(expected), failures
    for failure, fragment in zip(failures, expected, strict=True):
        assert fragment in failure


def test_weighted_resample_ap_equals_the_ap_of_the_expanded_ticks() -> None:
    """The bootstrap weights ticks by how often their block was drawn; that must equal the
    AP of the resample written out tick by tick (copies tie with their original)."""
    from pipeline.domain.fx_anomaly import _weighted_ap

    rng = np.random.default_rng(13)
    y = rng.random(500) < 0.08
    score = rng.integers(0, 40, 500).astype(float) + 5.0 * y  # ties on purpose
    weights = rng.integers(0, 3, (6, 500)).astype(float)
    for row in weights:
        expanded = np.repeat(np.arange(500), row.astype(int))
        assert _weighted_ap(y, score, row[None, :])[0] == pytest.approx(
            average_precision_score(y[expanded], score[expanded]), abs=1e-12
        )


def test_reviewed_precision_counts_only_flags_inside_reviewed_windows() -> None:
    ts = pl.datetime_range(
        dt.datetime(2026, 9, 1), dt.datetime(2026, 9, 1, 0, 9), "1m", eager=True
    ).alias("ts")
    # ticks 0-9 flagged at 1, 2, 3, 7, 8; reviewed 0-5 with an anomaly at 2-3; 7-8 unreviewed
    scored = pl.DataFrame({"ts": ts, "is_anomaly": [i in (1, 2, 3, 7, 8) for i in range(10)]})
    incidents = pl.DataFrame(
        {
            "start": [ts[0], ts[2]],
            "end": [ts[5], ts[3]],
            "label": ["reviewed_window", "anomaly"],
        }
    )
    measured = reviewed_precision(scored, reviewed_labels(scored, incidents))
    assert measured == {
        "reviewed_ticks": 6.0,
        "reviewed_flags": 3.0,
        "confirmed_flags": 2.0,
        "reviewed_precision": 2 / 3,
    }
    assert precision_failures(measured, min_precision=0.6, min_flags=3) == []
    (failure,) = precision_failures(measured, min_precision=0.7, min_flags=3)
    assert failure == (
        "precision on reviewed ticks 0.6667 (2 of 3 flags confirmed by the incident log) "
        "is below 0.7000"
    )
    assert precision_failures(measured, min_precision=0.7, min_flags=4) == []  # too few flags
    nothing = reviewed_precision(scored, reviewed_labels(scored, incidents.head(0)))
    assert nothing["reviewed_ticks"] == 0 and math.isnan(nothing["reviewed_precision"])
    assert precision_failures(nothing, min_precision=1.0, min_flags=1) == []
    with pytest.raises(FxGateConfigError, match="min_precision"):
        precision_failures(measured, min_precision=1.5, min_flags=1)
    with pytest.raises(FxGateConfigError, match="min_flags"):
        precision_failures(measured, min_precision=0.5, min_flags=0)
