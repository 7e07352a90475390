"""Audit columns on gold rows and ``pipeline lineage``, on real small runs.

Each test writes demo drops to a temp landing folder, ingests them into a real Delta
lake and materialises a gold asset with a real MLflow sqlite store and an ephemeral
Dagster instance; then ``pipeline lineage`` must name the landing file that was
ingested with the SHA-256 computed here from its bytes, the Dagster run, the code
version and the MLflow run recorded for the model.
"""

import hashlib
import json
import subprocess
from pathlib import Path

import dagster as dg
import polars as pl
import pytest

from pipeline import audit, cli, keys
from pipeline.domain.demo_data import write_demo_landing
from pipeline.lineage import LineageError
from pipeline.partitions import symbol_date_key
from pipeline.runs import QUIET, materialize_range
from pipeline_tests.conftest import Platform, make_platform
from pipeline_tests.sensor_helpers import register_symbols_with_landing_sensor

VALUATION = "2026-09-30"
FX_DATES = tuple(f"2026-09-{day:02d}" for day in range(1, 9))
SYMBOL = "EURUSD"
MONTHS = ("2026-07", "2026-08", "2026-09")
REPO = Path(__file__).resolve().parents[1]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_ids(result: dg.ExecuteInProcessResult) -> str:
    assert result.success
    return result.run_id


def assert_audited(frame: pl.DataFrame, *, dagster_run_id: str, inputs: dict) -> None:
    """Every row carries the run, the code version of this checkout and the input versions."""
    assert frame.height > 0
    assert set(frame["dagster_run_id"].to_list()) == {dagster_run_id}
    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.strip()
    assert set(frame["code_version"].to_list()) == {f"0.1.0+{commit}"}
    assert [json.loads(v) for v in frame["input_versions"].unique()] == [inputs]


def test_code_version_never_fails_without_git(monkeypatch: pytest.MonkeyPatch) -> None:
    audit.git_commit.cache_clear()
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setenv(audit.COMMIT_ENV, "abc123")
    try:
        assert audit.git_commit() == "abc123"
        monkeypatch.delenv(audit.COMMIT_ENV)
        audit.git_commit.cache_clear()
        assert audit.git_commit() == "unknown"
    finally:
        audit.git_commit.cache_clear()


def test_assets_declare_a_code_version_that_follows_their_computing_modules(
    platform: Platform,
) -> None:
    graph = platform.defs.resolve_asset_graph()
    versions = {k: graph.get(k).code_version for k in graph.get_all_asset_keys()}
    assert all(versions.values()), versions
    # the credibility assets hash the science they run, not only their own module
    assert versions[keys.CREDIBILITY_TABLE] == audit.asset_code_version(
        "pipeline.assets.credibility"
    )
    assert versions[keys.CREDIBILITY_TABLE] != versions[keys.LOAN_LOSS_DISTRIBUTION]
    reached = audit._imported_modules(
        "pipeline.jobs.credibility_fit",
        (REPO / "pipeline/jobs/credibility_fit.py").read_text(),
    )
    assert "pipeline.domain.credibility" in reached  # imported inside a function


def test_lineage_of_a_loan_loss_figure(platform: Platform, capsys) -> None:
    write_demo_landing(
        platform.settings.landing_dir,
        claims_months=(),
        fx_dates=(),
        valuation_dates=(VALUATION,),
    )
    inputs = (keys.BRONZE_LOAN_BOOK, keys.LOAN_BOOK, keys.BRONZE_LOAN_SCENARIOS)
    platform.materialize([*inputs, keys.LOAN_SCENARIOS], VALUATION)
    result = dg.materialize(
        platform.defs.assets,
        selection=dg.AssetSelection.assets(keys.LOAN_LOSS_DISTRIBUTION).without_checks(),
        partition_key=VALUATION,
        resources=platform.resources,
        instance=platform.instance,
        run_config={"ops": {"gold__loan_loss_distribution": {"config": {"n_sims": 2048}}}},
    )
    run_id = run_ids(result)
    versions = {
        "curated/loan_book": platform.lake.version("curated", "loan_book"),
        "curated/loan_scenarios": platform.lake.version("curated", "loan_scenarios"),
    }
    summary = platform.lake.read("gold", "loan_loss_summary", {"valuation_date": VALUATION})
    assert_audited(summary, dagster_run_id=run_id, inputs=versions)
    contributions = platform.lake.read(
        "gold", "loan_loss_contributions", {"valuation_date": VALUATION}
    )
    assert_audited(contributions, dagster_run_id=run_id, inputs=versions)
    mlflow_run = summary["mlflow_run_id"][0]
    assert set(contributions["mlflow_run_id"]) == {mlflow_run}

    capsys.readouterr()
    lines = cli.lineage(
        platform.settings,
        "gold/loan_loss_summary",
        [f"valuation_date={VALUATION}", "scenario=baseline"],
    )
    printed = capsys.readouterr().out
    assert printed.splitlines() == lines
    landing = platform.settings.landing_dir
    for name in (
        f"loan_book/loan_book_{VALUATION}.parquet",
        f"loan_scenarios/loan_scenarios_{VALUATION}.csv",
    ):
        matching = [line for line in lines if f"landing file {name} " in line]
        assert len(matching) == 1, printed
        assert f"sha256 {sha256(landing / name)}" in matching[0]
        assert "unchanged" in matching[0]
    assert f"mlflow run {mlflow_run}" in printed
    assert f"dagster run {run_id}" in printed
    assert f"input curated/loan_book @ delta version {versions['curated/loan_book']}" in printed

    # a corrected re-delivery: lineage still names the hash that was ingested
    book = landing / f"loan_book/loan_book_{VALUATION}.parquet"
    ingested = sha256(book)
    pl.read_parquet(book).head(1100).write_parquet(book)
    lines = cli.lineage(
        platform.settings, "loan_loss_summary", [f"valuation_date={VALUATION},scenario=baseline"]
    )
    (line,) = [line for line in lines if "loan_book_" in line and "landing file" in line]
    assert f"sha256 {ingested}" in line
    assert f"changed in the landing folder since ingestion (now sha256 {sha256(book)})" in line

    with pytest.raises(LineageError, match="no row"):
        cli.lineage(platform.settings, "loan_loss_summary", ["valuation_date=2020-01-31"])
    assert cli.main(["lineage", "gold/loan_loss_summary", "scenario"]) == 1


@pytest.fixture
def fx(tmp_path: Path):
    plat = make_platform(tmp_path / "home")
    yield plat
    plat.instance.dispose()
    import mlflow

    while mlflow.active_run() is not None:
        mlflow.end_run()


def test_lineage_of_an_fx_score(fx: Platform) -> None:
    write_demo_landing(
        fx.settings.landing_dir,
        claims_months=(),
        valuation_dates=(),
        fx_dates=FX_DATES,
        ticks_per_symbol=1500,
    )
    register_symbols_with_landing_sensor(fx)
    for date in FX_DATES:
        fx.materialize([keys.BRONZE_FX_TICKS], date, run_config=QUIET)
    first, last = symbol_date_key(SYMBOL, FX_DATES[0]), symbol_date_key(SYMBOL, FX_DATES[-1])
    materialize_range(fx.defs, fx.instance, [keys.FX_SPREADS], first, last)
    trained = fx.materialize([keys.FX_CHALLENGER_MODEL, keys.FX_CHAMPION_MODEL], SYMBOL)
    assert trained.success
    scored = fx.materialize([keys.FX_ANOMALY_SCORES], last)
    run_id = run_ids(scored)

    scores = fx.lake.read("gold", "fx_anomaly_scores", {"symbol": SYMBOL, "date": FX_DATES[-1]})
    assert_audited(
        scores,
        dagster_run_id=run_id,
        inputs={"curated/fx_spreads": fx.lake.version("curated", "fx_spreads")},
    )
    version = fx.tracking.client().get_model_version("fx_spread_eurusd", "1")
    assert set(scores["mlflow_run_id"]) == {version.run_id}
    evaluations = fx.lake.read("gold", "fx_model_evaluations", {"symbol": SYMBOL})
    assert set(evaluations["mlflow_run_id"]) == {version.run_id}
    assert set(evaluations["dagster_run_id"]) == {trained.run_id}
    events = fx.lake.read("gold", "model_events")
    assert set(events["code_version"]) == {audit.code_version()}

    ts = str(scores.sort("ts")["ts"][10])
    lines = cli.lineage(
        fx.settings,
        "gold/fx_anomaly_scores",
        [f"symbol={SYMBOL}", f"date={FX_DATES[-1]}", f"ts={ts}"],
    )
    printed = "\n".join(lines)
    assert lines[0].endswith(": 1 row(s)"), printed
    assert f"mlflow run {version.run_id}" in printed
    assert "registered model fx_spread_eurusd version 1" in printed
    assert f"dagster run {run_id}" in printed
    for date in FX_DATES[-4:]:  # the scored day and its warm-up days
        name = f"fx_ticks/fx_ticks_{date}.parquet"
        (line,) = [line for line in lines if f"landing file {name} " in line]
        assert f"sha256 {sha256(fx.settings.landing_dir / name)}" in line


@pytest.mark.slow
def test_lineage_of_a_credibility_row(platform: Platform) -> None:
    write_demo_landing(
        platform.settings.landing_dir, claims_months=MONTHS, fx_dates=(), valuation_dates=()
    )
    for month in MONTHS:
        platform.materialize([keys.BRONZE_CLAIMS, keys.CLAIMS_BY_DISTRICT], month)
    result = platform.materialize([keys.CREDIBILITY_POSTERIOR, keys.CREDIBILITY_TABLE], MONTHS[-1])
    run_id = run_ids(result)
    table = platform.lake.read("gold", "credibility_table", {"month": MONTHS[-1]})
    assert_audited(
        table,
        dagster_run_id=run_id,
        inputs={
            "curated/claims_by_district": platform.lake.version("curated", "claims_by_district")
        },
    )
    district = table["district"][0]
    mlflow_run = table["mlflow_run_id"][0]
    lines = cli.lineage(
        platform.settings, "gold/credibility_table", [f"month={MONTHS[-1]}", f"district={district}"]
    )
    printed = "\n".join(lines)
    assert f"mlflow run {mlflow_run}" in printed
    assert "experiment claims_credibility" in printed
    for month in MONTHS:  # every month of the window that was delivered
        name = f"claims/claims_{month}.csv"
        (line,) = [line for line in lines if f"landing file {name} " in line]
        assert f"sha256 {sha256(platform.settings.landing_dir / name)}" in line
