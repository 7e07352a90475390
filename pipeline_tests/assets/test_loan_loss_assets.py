"""Loan-loss distribution: summaries, contributions, samples, gates and the Spark path.

Each test writes the seeded demo loan book (1,200 loans) and its eight macro
scenarios to a temp landing folder, ingests them into a real Delta lake, and
materialises ``gold/loan_loss_distribution`` with a real MLflow sqlite store and
an ephemeral Dagster instance. What is asserted is what a user reads back: the
summary rows, the contributions table, the stored loss samples, the MLflow run and
the check results. The expected loss is checked against
``sum(EAD * LGD * min(PD * m, 1))`` computed here from the delivered file, not
through the domain code under test.
"""

import io
import math
from pathlib import Path

import dagster as dg
import numpy as np
import polars as pl
import pytest
from mlflow import MlflowClient

from pipeline import keys
from pipeline.assets.loan_loss import LoanLossConfig
from pipeline.domain.demo_data import SCENARIOS, SEGMENT_PROFILES, write_demo_landing
from pipeline.domain.loan_loss import (
    DEFAULT_MAX_RELATIVE_SE,
    SUMMARY_FIGURES,
    mc_error_shortfalls,
    summarise_losses,
)
from pipeline.jobs.loan_loss_simulation import FIGURES, SE_COLUMNS, SUMMARY_COLUMNS
from pipeline.resources.tracking import DAGSTER_ASSET_TAG, DAGSTER_PARTITION_TAG, DAGSTER_RUN_TAG
from pipeline.stores.loan_loss import committed_samples_uri
from pipeline_tests.conftest import Platform, make_platform

VALUATION = "2026-09-30"
LOSS_OP = "__".join(keys.LOAN_LOSS_DISTRIBUTION.path)
LOAN_INPUTS = (
    keys.BRONZE_LOAN_BOOK,
    keys.LOAN_BOOK,
    keys.BRONZE_LOAN_SCENARIOS,
    keys.LOAN_SCENARIOS,
)
LOSS_CHECKS = {
    keys.CHECK_MC_ERROR,
    keys.CHECK_EL_ANALYTIC,
    keys.CHECK_VASICEK,
    keys.CHECK_CONTRIBUTIONS,
}
BOOK_FILE = f"loan_book/loan_book_{VALUATION}.parquet"
SCENARIO_MULTIPLIERS = {name: multiplier for name, multiplier, _ in SCENARIOS}


# --- helpers ---------------------------------------------------------------------------


def write_landing(platform: Platform) -> Path:
    """Demo loan book and scenarios for :data:`VALUATION` only; returns the book file."""
    write_demo_landing(
        platform.settings.landing_dir,
        claims_months=(),
        fx_dates=(),
        valuation_dates=(VALUATION,),
    )
    return platform.settings.landing_dir / BOOK_FILE


def ingest(platform: Platform) -> dg.ExecuteInProcessResult:
    return platform.materialize(LOAN_INPUTS, VALUATION, raise_on_error=False)


def simulate(
    platform: Platform,
    *,
    with_checks: bool = True,
    checks: tuple[str, ...] | None = None,
    **config: object,
) -> dg.ExecuteInProcessResult:
    """Materialise the loss distribution of :data:`VALUATION` with ``config``.

    Without its checks when a test is about the asset's output only, or with the named
    ``checks`` only: the Vasicek reference check simulates its own portfolio and costs
    seconds.
    """
    selection = dg.AssetSelection.assets(keys.LOAN_LOSS_DISTRIBUTION)
    if not with_checks or checks is not None:
        selection = selection.without_checks()
    if checks:
        selection = selection | dg.AssetSelection.checks(
            *(dg.AssetCheckKey(keys.LOAN_LOSS_DISTRIBUTION, name) for name in checks)
        )
    return dg.materialize(
        [*platform.defs.assets, *(platform.defs.asset_checks or [])],
        selection=selection,
        partition_key=VALUATION,
        resources=platform.resources,
        instance=platform.instance,
        raise_on_error=False,
        run_config={"ops": {LOSS_OP: {"config": config}}},
    )


def check_results(result: dg.ExecuteInProcessResult) -> dict[str, dg.AssetCheckEvaluation]:
    return {e.check_name: e for e in result.get_asset_check_evaluations()}


def summary(platform: Platform) -> pl.DataFrame:
    """Stored summary rows of :data:`VALUATION` by scenario (no columns when never written)."""
    rows = platform.lake.read("gold", "loan_loss_summary", {"valuation_date": VALUATION})
    return rows.sort("scenario") if rows.height else rows


def contributions(platform: Platform) -> pl.DataFrame:
    """Stored contributions of :data:`VALUATION` (no columns when never written)."""
    return platform.lake.read("gold", "loan_loss_contributions", {"valuation_date": VALUATION})


def samples(platform: Platform) -> dict[str, np.ndarray]:
    uri = committed_samples_uri(platform.lake, VALUATION)
    assert uri is not None, "no committed loss samples"
    payload = platform.lake.read_bytes(uri)
    with np.load(io.BytesIO(payload)) as npz:
        return {name: npz[name] for name in npz.files}


def independent_expected_loss(book: pl.DataFrame) -> dict[str, float]:
    """``sum(EAD * LGD * min(PD * m, 1))`` per demo scenario, straight from the file."""
    ead, lgd, pd_ = (book[c].to_numpy() for c in ("ead", "lgd", "pd"))
    return {
        name: math.fsum((ead * lgd * np.minimum(pd_ * m, 1.0)).tolist())
        for name, m in SCENARIO_MULTIPLIERS.items()
    }


def failure(result: dg.ExecuteInProcessResult, op: str) -> str:
    data = result.failure_data_for_node(op)
    assert data is not None and data.user_failure_data is not None, data
    return data.user_failure_data.description


# --- the demo book --------------------------------------------------------------------------


@pytest.mark.slow
def test_loss_distribution_of_the_demo_book(platform: Platform, tmp_path: Path) -> None:
    book = pl.read_parquet(write_landing(platform))
    assert ingest(platform).success
    result = simulate(platform)
    assert result.success
    checks = check_results(result)
    assert set(checks) == LOSS_CHECKS
    assert all(c.passed for c in checks.values()), {n: c.description for n, c in checks.items()}

    defaults = LoanLossConfig()
    rows = summary(platform)
    assert rows["scenario"].to_list() == sorted(SCENARIO_MULTIPLIERS)
    assert rows["n_sims"].unique().to_list() == [defaults.n_sims]
    assert rows["seed"].unique().to_list() == [defaults.seed]
    assert rows["n_loans"].unique().to_list() == [book.height]
    assert rows["loan_book_version"].unique().to_list() == [
        platform.lake.version("curated", "loan_book")
    ]
    assert rows["scenario_version"].unique().to_list() == [
        platform.lake.version("curated", "loan_scenarios")
    ]
    assert rows["dagster_run_id"].unique().to_list() == [result.run_id]
    for row in rows.iter_rows(named=True):
        assert row["pd_multiplier"] == SCENARIO_MULTIPLIERS[row["scenario"]]
        assert row["p10"] <= row["p50"] <= row["p90"] <= row["var_99"] <= row["var_999"]
        assert row["var_99"] <= row["es_99"] and row["var_999"] <= row["es_999"]

    # every figure has its standard error and the bound it was judged by; one round
    assert FIGURES == SUMMARY_FIGURES
    assert rows["n_sims_rounds"].unique().to_list() == [1]
    for figure in FIGURES:
        assert rows[f"max_rel_se_{figure}"].unique().to_list() == [DEFAULT_MAX_RELATIVE_SE[figure]]
        assert (rows[f"se_{figure}"] > 0).all(), figure

    # the stored samples reproduce every stored number exactly
    losses = samples(platform)
    assert set(losses) == set(SCENARIO_MULTIPLIERS)
    for row in rows.iter_rows(named=True):
        x = losses[row["scenario"]]
        assert x.shape == (defaults.n_sims,) and x.dtype == np.float64
        recomputed = summarise_losses(x)
        for column in (*SUMMARY_COLUMNS, *SE_COLUMNS, "n_sims"):
            assert row[column] == recomputed[column], (row["scenario"], column)

    # contributions: every segment plus the ten largest loans, adding up to VaR and ES
    stored = contributions(platform)
    assert stored["dagster_run_id"].unique().to_list() == [result.run_id]
    for row in rows.iter_rows(named=True):
        mine = stored.filter(pl.col("scenario") == row["scenario"])
        segments = mine.filter(pl.col("kind") == "segment")
        assert sorted(segments["segment"]) == sorted(SEGMENT_PROFILES)
        assert segments["n_loans"].sum() == book.height
        assert math.fsum(segments["es_contribution"]) == pytest.approx(row["es_99"], rel=1e-9)
        assert math.fsum(segments["var_contribution"]) == pytest.approx(row["var_99"], rel=1e-9)
        assert (segments["se_es_contribution"] > 0).all()
        top = mine.filter(pl.col("kind") == "loan").sort("rank")
        assert top["rank"].to_list() == list(range(1, 11))
        assert set(top["loan_id"]) <= set(book["loan_id"])
        assert top["es_contribution"].is_sorted(descending=True)
        assert (top["es_contribution"] <= top["exposure"] * (1 + 1e-12)).all()

    # the simulated mean agrees with the exact expected loss within 3 standard errors
    analytic = independent_expected_loss(book)
    for row in rows.iter_rows(named=True):
        truth = analytic[row["scenario"]]
        assert row["analytic_expected_loss"] == pytest.approx(truth, rel=1e-12)
        z = (row["expected_loss"] - truth) / row["se_expected_loss"]
        assert abs(z) <= 3.0, f"{row['scenario']}: {z:.2f} SE from the analytic value"
    # stress orders the losses: more PD stress, more expected loss
    by_multiplier = rows.sort("pd_multiplier")
    assert by_multiplier["expected_loss"].is_sorted()

    # the MLflow run holds the histograms, the metrics and the Dagster lineage
    client = MlflowClient(tracking_uri=platform.settings.mlflow_tracking_uri)
    (run_id,) = rows["mlflow_run_id"].unique().to_list()
    run = client.get_run(run_id)
    assert run.data.tags[DAGSTER_RUN_TAG] == result.run_id
    assert run.data.tags[DAGSTER_ASSET_TAG] == keys.LOAN_LOSS_DISTRIBUTION.to_user_string()
    assert run.data.tags[DAGSTER_PARTITION_TAG] == VALUATION
    for row in rows.iter_rows(named=True):
        for column in ("expected_loss", "var_999", "es_999", "se_es_999", "n_sims_rounds"):
            assert run.data.metrics[f"{row['scenario']}.{column}"] == row[column], column
    histograms = {Path(a.path).name for a in client.list_artifacts(run_id, "histograms")}
    assert histograms == {f"histogram_{name}.png" for name in SCENARIO_MULTIPLIERS}
    local = client.download_artifacts(run_id, "histograms/histogram_baseline.png", str(tmp_path))
    assert Path(local).read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    charts = {Path(a.path).name for a in client.list_artifacts(run_id, "contributions")}
    assert charts == {
        "contributions.csv",
        *(f"contributions_{name}.png" for name in SCENARIO_MULTIPLIERS),
    }
    baseline = stored.filter(
        (pl.col("scenario") == "baseline") & (pl.col("kind") == "segment")
    ).row(0, named=True)
    key = f"baseline.es_contribution.{baseline['segment']}"
    assert run.data.metrics[key] == baseline["es_contribution"]


def test_too_few_simulations_fail_the_mc_gate_which_says_how_many_are_needed(
    platform: Platform,
) -> None:
    write_landing(platform)
    assert ingest(platform).success
    n_sims = 2_000
    result = simulate(platform, n_sims=n_sims)
    checks = check_results(result)
    mc_check = checks[keys.CHECK_MC_ERROR]
    assert mc_check.passed is False
    assert not result.success  # a blocking check that fails fails the run
    # the asset itself was written: the gate judges it, it does not hide it
    assert result.asset_materializations_for_node(LOSS_OP)
    rows = summary(platform)
    assert rows["n_sims"].unique().to_list() == [n_sims]

    # simulations each figure needs, per scenario: the relative SE falls as 1/sqrt(n); the
    # bounds are those stored on the rows (the defaults here)
    needed: dict[str, int] = {}
    for r in rows.iter_rows(named=True):
        for figure in FIGURES:
            relative = r[f"se_{figure}"] / abs(r[figure])
            need = math.ceil(n_sims * (relative / r[f"max_rel_se_{figure}"]) ** 2)
            if need > n_sims:
                needed[figure] = max(needed.get(figure, 0), need)
    assert needed["expected_loss"] > n_sims  # every scenario is short at 2,000 simulations
    assert "var_999" in needed and "es_999" in needed
    description = mc_check.description
    # one number a user can act on, stated first, then each failing figure with its need
    assert description.startswith(
        f"raise n_sims from {n_sims:,} to at least {max(needed.values()):,}"
    ), description
    headline = description.split("; ")[0]
    for figure, need in needed.items():
        assert f"{figure} needs {need:,}" in headline, (figure, headline)
    assert mc_check.metadata["n_sims_needed"].value == max(needed.values())
    # per scenario the stored facts give the same verdict
    for r in rows.iter_rows(named=True):
        failing = mc_error_shortfalls(r, {f: r[f"max_rel_se_{f}"] for f in FIGURES})
        assert {f["figure"] for f in failing} <= set(needed)
    # the other gates hold: the estimates are noisy, not wrong
    assert checks[keys.CHECK_EL_ANALYTIC].passed is True
    assert checks[keys.CHECK_CONTRIBUTIONS].passed is True


def test_auto_n_sims_doubles_until_every_bound_holds_and_records_the_rounds(
    platform: Platform,
) -> None:
    write_landing(platform)
    assert ingest(platform).success
    bound = 0.06
    result = simulate(
        platform,
        checks=(keys.CHECK_MC_ERROR, keys.CHECK_CONTRIBUTIONS),
        n_sims=1_024,
        auto_n_sims=True,
        max_n_sims=65_536,
        max_relative_se=dict.fromkeys(FIGURES, bound),
        top_loans=3,
    )
    assert result.success, [e.description for e in result.get_asset_check_evaluations()]
    checks = check_results(result)
    assert checks[keys.CHECK_MC_ERROR].passed and checks[keys.CHECK_CONTRIBUTIONS].passed
    rows = summary(platform)
    losses = samples(platform)
    bounds = dict.fromkeys(FIGURES, bound)
    for r in rows.iter_rows(named=True):
        n = r["n_sims"]
        assert n == 1_024 * 2 ** (r["n_sims_rounds"] - 1) < 65_536
        assert losses[r["scenario"]].shape == (n,)
        assert not mc_error_shortfalls(r, bounds)  # every bound holds at the final size
        if r["n_sims_rounds"] > 1:  # and one round fewer would not have done
            half = summarise_losses(losses[r["scenario"]][: n // 2])
            assert mc_error_shortfalls(half, bounds), r["scenario"]
    assert rows["n_sims_rounds"].max() > 1
    assert rows["auto_n_sims"].unique().to_list() == [True]
    materialization = result.asset_materializations_for_node(LOSS_OP)[0]
    rounds = materialization.metadata["n_sims_rounds"].value
    assert rounds == dict(rows.select("scenario", "n_sims_rounds").iter_rows())
    assert "contributions_chart_baseline" in materialization.metadata
    client = MlflowClient(tracking_uri=platform.settings.mlflow_tracking_uri)
    run = client.get_run(rows["mlflow_run_id"][0])
    for r in rows.iter_rows(named=True):
        assert run.data.metrics[f"{r['scenario']}.n_sims_rounds"] == r["n_sims_rounds"]
    assert run.data.params["auto_n_sims"] == "True"
    stored = contributions(platform)
    assert stored.filter(pl.col("kind") == "loan").height == 3 * rows.height


def test_auto_n_sims_stops_at_the_budget_and_the_gate_names_what_is_missing(
    platform: Platform,
) -> None:
    write_landing(platform)
    assert ingest(platform).success
    result = simulate(
        platform,
        checks=(keys.CHECK_MC_ERROR,),
        n_sims=1_024,
        auto_n_sims=True,
        max_n_sims=3_000,
        max_relative_se={"expected_loss": 0.001},
    )
    assert not result.success
    rows = summary(platform)
    assert rows["n_sims"].unique().to_list() == [3_000]  # 1,024 -> 2,048 -> budget
    assert rows["n_sims_rounds"].unique().to_list() == [3]
    description = check_results(result)[keys.CHECK_MC_ERROR].description
    assert description.startswith("raise n_sims from 3,000 to at least ")
    assert "expected_loss needs " in description


@pytest.mark.slow
@pytest.mark.spark
def test_spark_chunks_reproduce_the_local_losses_bit_for_bit(
    spark_session, platform: Platform, tmp_path: Path
) -> None:
    """``COMPUTE=spark`` runs chunks as Spark tasks; same seed, same losses, to the bit.

    The Spark run also uses a smaller chunk size (5 tasks instead of 2 local chunks):
    a simulation's loss depends on its index and the seed only.
    """
    n_sims, seed = 20_000, 77
    write_landing(platform)
    assert ingest(platform).success
    local = simulate(platform, with_checks=False, n_sims=n_sims, seed=seed)
    assert local.success

    spark_platform = make_platform(
        tmp_path / "spark_home", COMPUTE="spark", SPARK_MASTER="local[2]"
    )
    try:
        assert spark_platform.resources["compute"].backend == "spark"
        write_landing(spark_platform)
        assert ingest(spark_platform).success
        tracker = spark_session.sparkContext.statusTracker()
        jobs_before = set(tracker.getJobIdsForGroup())
        on_spark = simulate(
            spark_platform, with_checks=False, n_sims=n_sims, seed=seed, chunk_size=4_096
        )
        assert on_spark.success
        assert set(tracker.getJobIdsForGroup()) - jobs_before, "no Spark job ran"
    finally:
        spark_platform.instance.dispose()

    local_losses, spark_losses = samples(platform), samples(spark_platform)
    assert set(local_losses) == set(spark_losses) == set(SCENARIO_MULTIPLIERS)
    for name, x in local_losses.items():
        assert spark_losses[name].dtype == x.dtype == np.float64
        assert spark_losses[name].tobytes() == x.tobytes(), name
    volatile = ["dagster_run_id", "mlflow_run_id", "computed_at", "samples_uri"]
    assert summary(spark_platform).drop(volatile).equals(summary(platform).drop(volatile))
    # the contribution pass ran as Spark tasks too, and merged to the same floats
    order = ["scenario", "kind", "segment", "rank"]
    spark_contributions = contributions(spark_platform).drop(volatile[:3]).sort(order)
    assert spark_contributions.equals(contributions(platform).drop(volatile[:3]).sort(order))


# --- bad inputs -------------------------------------------------------------------------


def test_loans_breaking_the_contract_are_quarantined_and_the_rest_simulated(
    platform: Platform,
) -> None:
    book_path = write_landing(platform)
    delivered = pl.read_parquet(book_path)
    bad_pd = {"L000007": 1.7, "L000100": -0.02}
    broken = delivered.with_columns(
        pl.col("loan_id")
        .replace_strict(bad_pd, default=pl.col("pd"), return_dtype=pl.Float64)
        .alias("pd")
    )
    broken.write_parquet(book_path)

    ingested = ingest(platform)
    assert ingested.success
    assert all(e.passed for e in ingested.get_asset_check_evaluations())
    quarantined = platform.lake.read("quarantine", "loan_book", {"partition_key": VALUATION}).sort(
        "_row_number"
    )
    assert quarantined["_row_number"].to_list() == [7, 100]
    assert quarantined["reason"].to_list() == ["pd outside [0, 1]"] * 2
    assert quarantined["_source_file"].unique().to_list() == [BOOK_FILE]
    for record, (loan_id, pd_) in zip(quarantined["record"], bad_pd.items(), strict=True):
        assert f'"loan_id": "{loan_id}"' in record and str(pd_) in record
    curated = platform.lake.read("curated", "loan_book", {"valuation_date": VALUATION})
    assert curated.height == delivered.height - len(bad_pd)
    assert not set(bad_pd) & set(curated["loan_id"])

    result = simulate(platform, with_checks=False, n_sims=4_096)
    assert result.success
    rows = summary(platform)
    assert rows.height == len(SCENARIOS)
    assert rows["n_loans"].unique().to_list() == [delivered.height - len(bad_pd)]
    clean = broken.filter(~pl.col("loan_id").is_in(list(bad_pd)))
    analytic = independent_expected_loss(clean)
    for row in rows.iter_rows(named=True):
        assert row["analytic_expected_loss"] == pytest.approx(analytic[row["scenario"]], rel=1e-12)


def test_an_empty_loan_book_stops_the_loss_asset_naming_the_partition(
    platform: Platform,
) -> None:
    book_path = write_landing(platform)
    delivered = pl.read_parquet(book_path)
    delivered.with_columns(pl.lit(2.0).alias("pd")).write_parquet(book_path)

    ingested = ingest(platform)
    assert platform.lake.read("curated", "loan_book", {"valuation_date": VALUATION}).is_empty()
    quarantined = platform.lake.read("quarantine", "loan_book", {"partition_key": VALUATION})
    assert quarantined.height == delivered.height
    contract_checks = {
        (e.asset_key, e.check_name): e.passed for e in ingested.get_asset_check_evaluations()
    }
    assert contract_checks[(keys.LOAN_BOOK, keys.CHECK_CURATED_CONTRACT)] is False
    assert contract_checks[(keys.LOAN_BOOK, keys.CHECK_RECONCILES)] is True

    # a later run of the loss asset alone: the guard refuses before simulating anything
    result = simulate(platform, with_checks=False, n_sims=4_096)
    assert not result.success
    message = failure(result, LOSS_OP)
    assert message.startswith(
        f"refusing to write a loss distribution for partition {VALUATION}: "
        "the gate on curated/loan_book did not pass: "
    ), message
    assert f"curated/loan_book has no rows for {VALUATION}" in message
    assert f"{keys.CHECK_CURATED_CONTRACT} failed for partition {VALUATION}" in message
    assert summary(platform).is_empty()
    assert committed_samples_uri(platform.lake, VALUATION) is None
    folder = platform.settings.home / "lake" / "gold" / "loan_loss_distribution"
    assert not list(folder.rglob("*.npz"))
