"""Bühlmann–Straub against actuar's published output on the Hachemeister data.

Published figures: actuar's credibility vignette (see ``fixtures/README.md``). The vignette
prints the structure parameters rounded to whole numbers, so those are compared to 0.5; the
per-state premiums and credibility factors are compared to the printed precision of a course
table (whole currency units, four decimals) and to an independent numpy transcription of
actuar's ``bstraub()`` to 1e-9 relative.
"""

from pathlib import Path

import numpy as np
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.domain.credibility import CredibilityInputError, buhlmann_straub

FIXTURE = Path(__file__).parent / "fixtures" / "hachemeister.csv"


@pytest.fixture(scope="module")
def hachemeister() -> pl.DataFrame:
    return pl.read_csv(FIXTURE)


def reference_bstraub(ratios: np.ndarray, weights: np.ndarray) -> dict[str, np.ndarray | float]:
    """Transcription of actuar's R/bstraub.R (method = "unbiased") on wide matrices."""
    n_groups, n_periods = ratios.shape
    w_s = weights.sum(axis=1)
    x_w = (weights * ratios).sum(axis=1) / w_s
    s2 = (weights * (ratios - x_w[:, None]) ** 2).sum() / (n_groups * n_periods - n_groups)
    w_ss = w_s.sum()
    x_ww = (w_s * x_w).sum() / w_ss
    a = w_ss * ((w_s * (x_w - x_ww) ** 2).sum() - (n_groups - 1) * s2) / (w_ss**2 - (w_s**2).sum())
    cred = 1 / (1 + s2 / (w_s * a))
    x_zw = (cred * x_w).sum() / cred.sum()
    return {"m": x_zw, "a": a, "s2": s2, "z": cred, "premium": x_zw + cred * (x_w - x_zw)}


def wide(df: pl.DataFrame, column: str) -> np.ndarray:
    return df.sort(["state", "period"])[column].to_numpy().astype(float).reshape(5, 12)


def test_fixture_is_actuars_table(hachemeister: pl.DataFrame) -> None:
    # Spot values read from actuar's data/hachemeister.rda (state 4 is the one that other
    # copies of the table get wrong).
    assert hachemeister.shape == (60, 4)
    state4 = hachemeister.filter(pl.col("state") == 4).sort("period")
    assert state4["ratio"].to_list()[:3] == [1223, 1146, 1010]
    assert state4["weight"].to_list() == [
        407,
        396,
        348,
        341,
        315,
        328,
        352,
        331,
        287,
        384,
        321,
        342,
    ]
    assert int(hachemeister["weight"].sum()) == 174_047


def test_buhlmann_straub_matches_actuar_vignette(hachemeister: pl.DataFrame) -> None:
    fit = buhlmann_straub(
        hachemeister, group="state", value="ratio", weight="weight", period="period"
    )
    # cm(~state, hachemeister, ratios = ratio.1:ratio.12, weights = weight.1:weight.12)
    assert abs(fit.collective_mean - 1684) < 0.5
    assert abs(fit.between_variance - 89639) < 0.5
    assert abs(fit.within_variance - 139120026) < 0.5
    assert fit.k == pytest.approx(fit.within_variance / fit.between_variance, rel=1e-12)


def test_buhlmann_straub_premiums_match_published_table(hachemeister: pl.DataFrame) -> None:
    table = buhlmann_straub(
        hachemeister, group="state", value="ratio", weight="weight", period="period"
    ).table
    assert table["state"].to_list() == ["1", "2", "3", "4", "5"]
    np.testing.assert_array_equal(
        np.round(table["credibility_premium"].to_numpy()), [2055, 1524, 1793, 1443, 1603]
    )
    np.testing.assert_array_equal(
        np.round(table["z"].to_numpy(), 4), [0.9847, 0.9276, 0.8985, 0.7279, 0.9588]
    )


def test_buhlmann_model_with_unit_weights_matches_vignette(hachemeister: pl.DataFrame) -> None:
    # cm(~state, hachemeister, ratios = ratio.1:ratio.12): Bühlmann's model is Bühlmann–Straub
    # with all weights equal to one.
    fit = buhlmann_straub(
        hachemeister.with_columns(pl.lit(1.0).alias("one")),
        group="state",
        value="ratio",
        weight="one",
        period="period",
    )
    assert abs(fit.collective_mean - 1671) < 0.5
    assert abs(fit.between_variance - 72310) < 0.5
    assert abs(fit.within_variance - 46040) < 0.5


def test_buhlmann_straub_matches_numpy_transcription(hachemeister: pl.DataFrame) -> None:
    fit = buhlmann_straub(
        hachemeister, group="state", value="ratio", weight="weight", period="period"
    )
    ref = reference_bstraub(wide(hachemeister, "ratio"), wide(hachemeister, "weight"))
    assert fit.collective_mean == pytest.approx(ref["m"], rel=1e-9)
    assert fit.between_variance == pytest.approx(ref["a"], rel=1e-9)
    assert fit.within_variance == pytest.approx(ref["s2"], rel=1e-9)
    np.testing.assert_allclose(fit.table["z"].to_numpy(), ref["z"], rtol=1e-9)
    np.testing.assert_allclose(
        fit.table["credibility_premium"].to_numpy(), ref["premium"], rtol=1e-9
    )


def test_row_order_does_not_matter(hachemeister: pl.DataFrame) -> None:
    a = buhlmann_straub(hachemeister, group="state", value="ratio", weight="weight")
    b = buhlmann_straub(
        hachemeister.sample(fraction=1.0, shuffle=True, seed=3),
        group="state",
        value="ratio",
        weight="weight",
    )
    assert a.collective_mean == pytest.approx(b.collective_mean, rel=1e-12)
    np.testing.assert_allclose(a.table["z"].to_numpy(), b.table["z"].to_numpy(), rtol=1e-12)


def test_known_within_variance_allows_one_row_per_group() -> None:
    df = pl.DataFrame({"g": ["a", "b", "c"], "x": [0.08, 0.12, 0.10], "w": [100.0, 50.0, 400.0]})
    s2 = 0.0005
    fit = buhlmann_straub(df, group="g", value="x", weight="w", within_variance=s2)
    w = df["w"].to_numpy()
    x = df["x"].to_numpy()
    x_ww = (w * x).sum() / w.sum()
    a = w.sum() * ((w * (x - x_ww) ** 2).sum() - 2 * s2) / (w.sum() ** 2 - (w**2).sum())
    assert fit.within_variance == s2
    assert a > 0
    assert fit.between_variance == pytest.approx(a, rel=1e-12)
    np.testing.assert_allclose(fit.table["z"].to_numpy(), w / (w + s2 / a), rtol=1e-12)


def test_no_between_variance_gives_zero_credibility() -> None:
    # Identical group means: the unbiased a is negative, so (as actuar) z = 0 and every
    # premium is the weight-averaged collective mean.
    df = pl.DataFrame(
        {"g": ["a", "a", "b", "b"], "x": [1.0, 3.0, 3.0, 1.0], "w": [1.0, 1.0, 1.0, 1.0]}
    )
    fit = buhlmann_straub(df, group="g", value="x", weight="w")
    assert fit.between_variance < 0
    assert fit.k == float("inf")
    assert fit.table["z"].to_list() == [0.0, 0.0]
    assert fit.table["credibility_premium"].to_list() == [2.0, 2.0]


@pytest.mark.parametrize(
    ("frame", "kwargs", "fragment"),
    [
        (
            pl.DataFrame({"g": ["a", "a"], "x": [1.0, 2.0], "w": [1.0, 1.0]}),
            {},
            "need at least 2",
        ),
        (
            pl.DataFrame({"g": ["a", "b"], "x": [1.0, 2.0], "w": [1.0, 1.0]}),
            {},
            "single row",
        ),
        (
            pl.DataFrame({"g": ["a", "b", "b"], "x": [1.0, 2.0, 3.0], "w": [1.0, 0.0, 1.0]}),
            {},
            "group 'b' has w 0.0",
        ),
        (
            pl.DataFrame({"g": ["a", "b", "b"], "x": [1.0, float("nan"), 3.0], "w": [1.0] * 3}),
            {},
            "group 'b' has non-finite x",
        ),
        (
            pl.DataFrame(
                {"g": ["a", "b", "b"], "x": [1.0, 2.0, 3.0], "w": [1.0] * 3, "p": [1] * 3}
            ),
            {"period": "p"},
            "group 'b' has 2 rows for p 1",
        ),
        (pl.DataFrame({"g": ["a"], "x": [1.0]}), {}, "missing column(s) ['w']"),
    ],
)
def test_bad_input_is_rejected(frame: pl.DataFrame, kwargs: dict, fragment: str) -> None:
    with pytest.raises(CredibilityInputError) as excinfo:
        buhlmann_straub(frame, group="g", value="x", weight="w", **kwargs)
    assert fragment in str(excinfo.value)


panels = st.integers(min_value=2, max_value=6).flatmap(
    lambda n_groups: st.tuples(
        st.just(n_groups),
        st.integers(min_value=2, max_value=6),
        st.integers(min_value=0, max_value=2**32 - 1),
    )
)


@settings(max_examples=200, deadline=None)
@given(panels)
def test_credibility_properties(panel: tuple[int, int, int]) -> None:
    n_groups, n_periods, seed = panel
    rng = np.random.default_rng(seed)
    means = rng.normal(0.0, rng.uniform(0.01, 3.0), n_groups)
    weights = rng.uniform(0.1, 50.0, (n_groups, n_periods))
    values = means[:, None] + rng.normal(0.0, 1.0, (n_groups, n_periods)) / np.sqrt(weights)
    df = pl.DataFrame(
        {
            "g": np.repeat([f"g{i}" for i in range(n_groups)], n_periods),
            "x": values.ravel(),
            "w": weights.ravel(),
        }
    )
    fit = buhlmann_straub(df, group="g", value="x", weight="w")
    z = fit.table["z"].to_numpy()
    x_iw = fit.table["weighted_mean"].to_numpy()
    premium = fit.table["credibility_premium"].to_numpy()
    m = fit.collective_mean
    tol = 1e-9 * (1 + np.abs(x_iw).max())
    assert np.all((z >= 0) & (z <= 1))
    assert np.all(premium >= np.minimum(x_iw, m) - tol)
    assert np.all(premium <= np.maximum(x_iw, m) + tol)
    # Larger total weight, more credibility (z = w / (w + k) is increasing in w).
    order = np.argsort(fit.table["total_weight"].to_numpy())
    assert np.all(np.diff(z[order]) >= -1e-12)
    if fit.between_variance > 0:
        # Balance property of the credibility-weighted collective mean:
        # sum_i z_i (X_iw - X_zw) = 0, so the premiums' z-weighted mean is X_zw.
        assert abs(np.dot(z, x_iw - m)) <= tol * n_groups
    else:
        assert np.all(z == 0)
