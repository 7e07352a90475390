"""Bronze and curated assets, materialised in process on a temp PIPELINE_HOME.

Each test writes landing files (seeded demo drops, or a hand-made bad delivery),
materialises bronze + curated with their checks, and asserts on what the Delta
tables hold, on the metadata a user reads, and on the check results. Row numbers
are 1-based data rows of the delivered file (the header is not a row).
"""

import json
from decimal import Decimal
from pathlib import Path

import dagster as dg
import polars as pl
import pytest
from deltalake import DeltaTable
from polars.testing import assert_frame_equal

from pipeline import keys
from pipeline.dagster_private import CheckStatus, latest_check_records
from pipeline.domain.contracts import normalise_symbol
from pipeline.domain.demo_data import (
    SCENARIOS,
    claims_truth,
    generate_claims,
    generate_fx_ticks,
    generate_loan_book,
    write_demo_landing,
)
from pipeline.partitions import symbol_date_key
from pipeline.runs import materialize_range
from pipeline_tests.conftest import Platform
from pipeline_tests.sensor_helpers import (
    added_symbols,
    evaluate_fx_landing_sensor,
    register_symbols_with_landing_sensor,
)

MONTH = "2026-07"
DAY = "2026-09-01"
VALUATION = "2026-09-30"
N_POLICIES = 300
TICKS = 40

BRONZE_CHECKS = {keys.CHECK_FILE_SCHEMA, keys.CHECK_INGEST_LAG, keys.CHECK_NO_UNDECLARED_COLUMNS}
CURATED_CHECKS = {keys.CHECK_CURATED_CONTRACT, keys.CHECK_RECONCILES}
CURATED_CHECK_KEYS = [dg.AssetCheckKey(keys.FX_SPREADS, name) for name in sorted(CURATED_CHECKS)]
CLAIMS_CSV = f"claims/claims_{MONTH}.csv"
CLAIMS_COLUMNS = ["policy_id", "district", "valuation_month", "exposure", "claim_count"]


# --- helpers ---------------------------------------------------------------------------


def demo(platform: Platform, **sizes) -> None:
    """Small seeded demo drops; clean unless a test asks for the injected defects."""
    defaults = {
        "n_policies": N_POLICIES,
        "ticks_per_symbol": TICKS,
        "fx_dates": (DAY,),
        "claims_months": (MONTH,),
        "valuation_dates": (VALUATION,),
        "inject_defects": False,
    }
    write_demo_landing(platform.settings.landing_dir, **{**defaults, **sizes})


def check_outcomes(result: dg.ExecuteInProcessResult) -> dict[tuple[str, str], bool]:
    return {
        (e.asset_key.to_user_string(), e.check_name): e.passed
        for e in result.get_asset_check_evaluations()
    }


def check_descriptions(result: dg.ExecuteInProcessResult) -> dict[tuple[str, str], str]:
    return {
        (e.asset_key.to_user_string(), e.check_name): e.description
        for e in result.get_asset_check_evaluations()
    }


def assert_all_checks_passed(result: dg.ExecuteInProcessResult, *asset_keys: dg.AssetKey) -> None:
    outcomes = check_outcomes(result)
    expected = set()
    for key in asset_keys:
        names = BRONZE_CHECKS if key.path[0] == "bronze" else CURATED_CHECKS
        expected |= {(key.to_user_string(), name) for name in names}
    assert set(outcomes) == expected
    assert all(outcomes.values()), check_descriptions(result)


def metadata(result: dg.ExecuteInProcessResult, key: dg.AssetKey) -> dict:
    (event,) = result.asset_materializations_for_node("__".join(key.path))
    return {k: v.value for k, v in event.metadata.items()}


def failure(result: dg.ExecuteInProcessResult, key: dg.AssetKey) -> tuple[str, dict]:
    data = result.failure_data_for_node("__".join(key.path))
    assert data is not None and data.user_failure_data is not None
    meta = {k: v.value for k, v in data.user_failure_data.metadata.items()}
    return data.user_failure_data.description, meta


def write_claims_csv(platform: Platform, rows: list[list[str]], name: str = CLAIMS_CSV) -> Path:
    path = platform.settings.landing_dir / name
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [",".join(CLAIMS_COLUMNS), *(",".join(r) for r in rows)]
    path.write_text("\n".join(lines) + "\n")
    return path


def good_claims(n: int = 4) -> list[list[str]]:
    return [[f"P{i}", f"D{i % 2}", MONTH, f"0.{i}", str(i % 3)] for i in range(1, n + 1)]


def ingest_claims(platform: Platform) -> dg.ExecuteInProcessResult:
    return platform.materialize(
        [keys.BRONZE_CLAIMS, keys.CLAIMS_BY_DISTRICT], MONTH, raise_on_error=False
    )


def quarantine(platform: Platform, table: str, partition_key: str) -> pl.DataFrame:
    return platform.lake.read("quarantine", table, {"partition_key": partition_key}).sort(
        "_source_file", "_row_number"
    )


def lake_paths(platform: Platform) -> list[Path]:
    return sorted(Path(platform.settings.lake_uri).rglob("*"))


def partition_file_uris(platform: Platform, layer: str, table: str, fragment: str) -> list[str]:
    table_uri = platform.lake.table_uri(layer, table)
    return sorted(f for f in DeltaTable(table_uri).file_uris() if fragment in f)


# --- curated contents against the generated drops ----------------------------------------


def test_claims_by_district_equals_a_direct_aggregation_of_the_delivered_csv(
    platform: Platform,
) -> None:
    demo(platform)
    result = platform.materialize([keys.BRONZE_CLAIMS, keys.CLAIMS_BY_DISTRICT], MONTH)
    assert_all_checks_passed(result, keys.BRONZE_CLAIMS, keys.CLAIMS_BY_DISTRICT)

    delivered = pl.read_csv(platform.settings.landing_dir / CLAIMS_CSV)
    expected = (
        delivered.group_by("district")
        .agg(
            pl.col("exposure").sum(),
            pl.col("claim_count").sum(),
            pl.len().alias("n_policies"),
        )
        .sort("district")
    )
    stored = platform.lake.read("curated", "claims_by_district", {"month": MONTH}).sort("district")
    assert stored.columns == ["month", "district", "exposure", "claim_count", "n_policies"]
    assert stored["district"].to_list() == expected["district"].to_list()
    assert stored["claim_count"].to_list() == expected["claim_count"].to_list()
    assert stored["n_policies"].to_list() == expected["n_policies"].to_list()
    # float sums may differ in summation order only
    assert stored["exposure"].to_list() == pytest.approx(expected["exposure"].to_list(), rel=1e-12)
    assert int(stored["n_policies"].sum()) == N_POLICIES

    meta = metadata(result, keys.CLAIMS_BY_DISTRICT)
    assert (meta["rows_in"], meta["rows_curated"], meta["rows_quarantined"]) == (
        N_POLICIES,
    ) * 2 + (0,)
    assert meta["dagster/row_count"] == stored.height
    bronze_meta = metadata(result, keys.BRONZE_CLAIMS)
    assert bronze_meta["dagster/row_count"] == N_POLICIES
    assert CLAIMS_CSV in bronze_meta["files"]

    bronze = platform.lake.read("bronze", "claims")
    assert bronze["_row_number"].sort().to_list() == list(range(1, N_POLICIES + 1))
    assert set(bronze.schema[c] for c in CLAIMS_COLUMNS) == {pl.String}
    assert quarantine(platform, "claims_by_district", MONTH).height == 0


def test_bad_claims_rows_are_quarantined_and_everything_reconciles(platform: Platform) -> None:
    truth = claims_truth()
    generated = generate_claims(MONTH, truth, n_policies=N_POLICIES)
    text = generated.with_columns(pl.all().cast(pl.String))
    text = text.with_columns(
        pl.when(pl.int_range(pl.len()) == 4)
        .then(pl.lit("abc"))
        .when(pl.int_range(pl.len()) == 9)
        .then(pl.lit("-0.3"))
        .otherwise(pl.col("exposure"))
        .alias("exposure")
    )
    text = pl.concat([text, text.head(1)])  # row 301 repeats row 1
    path = platform.settings.landing_dir / CLAIMS_CSV
    path.parent.mkdir(parents=True)
    text.write_csv(path)

    result = ingest_claims(platform)
    assert_all_checks_passed(result, keys.BRONZE_CLAIMS, keys.CLAIMS_BY_DISTRICT)

    q = quarantine(platform, "claims_by_district", MONTH)
    first_policy = generated["policy_id"][0]
    assert q.select("_source_file", "_row_number", "reason").rows() == [
        (CLAIMS_CSV, 5, "exposure: cannot parse 'abc' as Float64"),
        (CLAIMS_CSV, 10, "exposure < 0"),
        (
            CLAIMS_CSV,
            N_POLICIES + 1,
            f"duplicate key (policy_id) = ({first_policy}); first seen at row 1 of {CLAIMS_CSV}",
        ),
    ]
    kept = generated.with_row_index().filter(~pl.col("index").is_in([4, 9]))
    stored = platform.lake.read("curated", "claims_by_district", {"month": MONTH})
    assert int(stored["n_policies"].sum()) == kept.height
    assert int(stored["claim_count"].sum()) == int(kept["claim_count"].sum())
    assert float(stored["exposure"].sum()) == pytest.approx(float(kept["exposure"].sum()))

    meta = metadata(result, keys.CLAIMS_BY_DISTRICT)
    assert meta["rows_in"] == N_POLICIES + 1
    assert meta["rows_in"] == meta["rows_curated"] + meta["rows_quarantined"]
    assert (meta["rows_curated"], meta["rows_quarantined"]) == (N_POLICIES - 2, 3)
    # the same identity from the stored tables, not from metadata
    bronze = platform.lake.read("bronze", "claims", {"_partition_key": MONTH})
    assert bronze.height == int(stored["n_policies"].sum()) + q.height
    assert check_descriptions(result)[("curated/claims_by_district", keys.CHECK_RECONCILES)] == (
        f"{N_POLICIES + 1} in = {N_POLICIES - 2} curated + 3 quarantined"
    )


def curate_claims(platform: Platform, bucket_rows: int) -> dg.ExecuteInProcessResult:
    config = {"ops": {"curated__claims_by_district": {"config": {"bucket_rows": bucket_rows}}}}
    return platform.materialize([keys.CLAIMS_BY_DISTRICT], MONTH, run_config=config)


def test_a_month_curated_in_key_buckets_equals_the_month_curated_whole(
    platform: Platform,
) -> None:
    """Spilled to buckets of its typed key, a month gives the same rows and quarantine.

    The second file repeats keys of the first (one with padding that the contract
    strips), so a duplicate is only found if both rows meet in one bucket.
    """
    first = [[f"P{i}", f"D{i % 5}", MONTH, f"0.{i:03d}", str(i % 3)] for i in range(1, 61)]
    first[6][3] = "abc"
    first[11][3] = "-0.2"
    second = [
        ["P5", "D9", MONTH, "0.5", "1"],
        [" P8 ", "D9", MONTH, "0.5", "1"],
        ["P61", "D1", "2026-06", "0.5", "0"],
        ["P62", "D1", MONTH, "0.25", "2"],
    ]
    write_claims_csv(platform, first)
    write_claims_csv(platform, second, name=f"claims/claims_{MONTH}_resend.csv")
    platform.materialize([keys.BRONZE_CLAIMS], MONTH)

    whole = curate_claims(platform, bucket_rows=1_000)
    assert metadata(whole, keys.CLAIMS_BY_DISTRICT)["buckets"] == 1
    stored_whole = platform.lake.read("curated", "claims_by_district", {"month": MONTH})
    quarantined_whole = quarantine(platform, "claims_by_district", MONTH)

    bucketed = curate_claims(platform, bucket_rows=7)
    meta = metadata(bucketed, keys.CLAIMS_BY_DISTRICT)
    assert meta["buckets"] == 10  # ceil(64 / 7)
    assert all(check_outcomes(bucketed).values()), check_descriptions(bucketed)
    stored = platform.lake.read("curated", "claims_by_district", {"month": MONTH})
    assert_frame_equal(stored.sort("district"), stored_whole.sort("district"))
    assert_frame_equal(quarantine(platform, "claims_by_district", MONTH), quarantined_whole)
    assert quarantined_whole.select("_row_number", "reason").rows() == [
        (7, "exposure: cannot parse 'abc' as Float64"),
        (12, "exposure < 0"),
        (1, f"duplicate key (policy_id) = (P5); first seen at row 5 of {CLAIMS_CSV}"),
        (2, f"duplicate key (policy_id) = (P8); first seen at row 8 of {CLAIMS_CSV}"),
        (3, f"valuation_month is not the partition month {MONTH}"),
    ]
    assert (meta["rows_in"], meta["rows_curated"], meta["rows_quarantined"]) == (64, 59, 5)

    # the statistics against a plain sum of the kept rows: exposures of 3 decimals sum
    # exactly in decimals of 1e-12, so the stored float is the correctly rounded total
    kept = [r for r in first if r[3] not in ("abc", "-0.2")] + [second[3]]
    for district in stored["district"]:
        rows = [r for r in kept if r[1] == district]
        row = stored.filter(pl.col("district") == district).row(0, named=True)
        assert row["n_policies"] == len(rows)
        assert row["claim_count"] == sum(int(r[4]) for r in rows)
        assert row["exposure"] == float(sum(Decimal(r[3]) for r in rows))


def test_the_demo_defects_are_quarantined_exactly_where_the_truth_says(
    platform: Platform,
) -> None:
    """The demo's recorded defects (``_truth/injected_defects.json``) are the expected
    quarantine: same files, same row numbers, and the reason each defect deserves."""
    demo(platform, ticks_per_symbol=200, inject_defects=True)
    injected = json.loads(
        (platform.settings.landing_dir / "_truth" / "injected_defects.json").read_text()
    )
    delivered = pl.read_csv(platform.settings.landing_dir / CLAIMS_CSV, infer_schema=False)
    ticks_file = f"fx_ticks/fx_ticks_{DAY}.parquet"
    ticks = pl.read_parquet(platform.settings.landing_dir / ticks_file)

    def expected_reason(defect: dict) -> str:
        if defect["defect"] == "negative exposure":
            return "exposure < 0"
        if defect["defect"] == "unparseable exposure":
            value = delivered["exposure"][defect["row"] - 1]
            return f"exposure: cannot parse '{value}' as Float64"
        if defect["defect"].startswith("duplicate of row "):
            first = int(defect["defect"].removeprefix("duplicate of row "))
            policy = delivered["policy_id"][defect["row"] - 1]
            assert delivered["policy_id"][first - 1] == policy
            return (
                f"duplicate key (policy_id) = ({policy}); first seen at row {first} of {CLAIMS_CSV}"
            )
        assert defect["defect"] == "bid > ask", defect
        return "bid > ask"

    expected = sorted((d["file"], d["row"], expected_reason(d)) for d in injected)
    assert {d["file"] for d in injected} == {CLAIMS_CSV, ticks_file}

    claims = platform.materialize([keys.BRONZE_CLAIMS, keys.CLAIMS_BY_DISTRICT], MONTH)
    assert_all_checks_passed(claims, keys.BRONZE_CLAIMS, keys.CLAIMS_BY_DISTRICT)
    register_symbols_with_landing_sensor(platform)
    platform.materialize([keys.BRONZE_FX_TICKS], DAY)
    crossed_symbol = normalise_symbol(ticks["symbol"][0])
    fx = platform.materialize([keys.FX_SPREADS], symbol_date_key(crossed_symbol, DAY))
    assert_all_checks_passed(fx, keys.FX_SPREADS)

    quarantined = pl.concat(
        [quarantine(platform, "claims_by_district", MONTH), quarantine(platform, "fx_spreads", DAY)]
    )
    assert sorted(quarantined.select("_source_file", "_row_number", "reason").rows()) == expected
    assert metadata(fx, keys.FX_SPREADS)["rows_quarantined_for_symbol"] == sum(
        d["file"] == ticks_file for d in injected
    )


def test_a_range_run_shows_each_partition_its_own_rows_and_check_results(
    platform: Platform,
) -> None:
    """A single-run backfill over three symbols: every partition's materialisation and
    check results are that partition's, not the run's totals or one partition-less result."""
    demo(platform)
    symbols = register_symbols_with_landing_sensor(platform)[:3]
    platform.materialize([keys.BRONZE_FX_TICKS], DAY)
    result = materialize_range(
        platform.defs,
        platform.instance,
        [keys.FX_SPREADS],
        symbol_date_key(symbols[0], DAY),
        symbol_date_key(symbols[-1], DAY),
    )
    assert result.success
    shown = {
        e.partition: {k: v.value for k, v in e.materialization.metadata.items()}
        for e in result.get_asset_materialization_events()
    }
    assert sorted(shown) == sorted(symbol_date_key(s, DAY) for s in symbols)
    for key, meta in shown.items():
        symbol = key.split("|")[1]
        stored = platform.lake.read("curated", "fx_spreads", {"symbol": symbol, "date": DAY})
        assert meta["dagster/row_count"] == meta["rows_curated"] == stored.height == TICKS
        assert meta["rows_curated_in_run"] == 3 * TICKS
    evaluations = result.get_asset_check_evaluations()
    assert sorted((e.check_name, e.partition) for e in evaluations) == sorted(
        (check, key) for check in CURATED_CHECKS for key in shown
    )
    reconciled = {e.partition: e for e in evaluations if e.check_name == keys.CHECK_RECONCILES}
    for evaluation in reconciled.values():
        assert evaluation.passed
        assert evaluation.description == f"{TICKS} in = {TICKS} curated + 0 quarantined"
        assert evaluation.metadata["rows_curated"].value == TICKS
    # the instance records each partition's result (the UI's partition statuses)
    for key in shown:
        records = latest_check_records(platform.instance, CURATED_CHECK_KEYS, key)
        assert {r.status for r in records.values()} == {CheckStatus.SUCCEEDED}, key
        assert {r.run_id for r in records.values()} == {result.run_id}


def test_fx_spreads_are_ask_minus_bid_per_normalised_symbol(platform: Platform) -> None:
    demo(platform)
    symbols = register_symbols_with_landing_sensor(platform)
    assert symbols == [
        "AUDUSD",
        "EURGBP",
        "EURUSD",
        "GBPUSD",
        "NZDUSD",
        "USDCAD",
        "USDCHF",
        "USDJPY",
    ]
    bronze_run = platform.materialize([keys.BRONZE_FX_TICKS], DAY)
    assert_all_checks_passed(bronze_run, keys.BRONZE_FX_TICKS)

    delivered = pl.read_parquet(platform.settings.landing_dir / f"fx_ticks/fx_ticks_{DAY}.parquet")
    for raw_symbol, symbol in (("EUR/USD", "EURUSD"), ("usd/jpy", "USDJPY")):
        result = platform.materialize([keys.FX_SPREADS], symbol_date_key(symbol, DAY))
        assert_all_checks_passed(result, keys.FX_SPREADS)
        stored = platform.lake.read("curated", "fx_spreads", {"symbol": symbol, "date": DAY})
        source = delivered.filter(pl.col("symbol") == raw_symbol).sort("ts")
        assert stored.columns == ["symbol", "date", "ts", "bid", "ask", "spread"]
        assert stored.height == TICKS
        assert stored["ts"].to_list() == source["ts"].to_list()
        assert stored["bid"].to_list() == source["bid"].to_list()
        assert stored["ask"].to_list() == source["ask"].to_list()
        assert stored["spread"].to_list() == (source["ask"] - source["bid"]).to_list()
        assert (stored["symbol"] == symbol).all()
        meta = metadata(result, keys.FX_SPREADS)
        assert meta["rows_curated"] == TICKS
        assert meta["rows_in_days_all_symbols"] == TICKS * len(symbols)
    written = {
        p.name for p in (Path(platform.settings.lake_uri) / "curated" / "fx_spreads").iterdir()
    }
    assert {"symbol=EURUSD", "symbol=USDJPY"} <= written


def test_spellings_of_one_pair_land_in_one_partition(platform: Platform) -> None:
    # the generator needs >= 26 ticks per symbol (room for its anomaly bursts)
    ticks, _ = generate_fx_ticks(
        DAY, ticks_per_symbol=30, symbols={"EUR/USD": (1.08, 0.8), "eur/usd": (1.09, 0.8)}
    )
    path = platform.settings.landing_dir / f"fx_ticks/fx_ticks_{DAY}.parquet"
    path.parent.mkdir(parents=True)
    ticks.write_parquet(path)
    assert register_symbols_with_landing_sensor(platform) == ["EURUSD"]
    platform.materialize([keys.BRONZE_FX_TICKS], DAY)
    result = platform.materialize([keys.FX_SPREADS], symbol_date_key("EURUSD", DAY))
    assert_all_checks_passed(result, keys.FX_SPREADS)
    stored = platform.lake.read("curated", "fx_spreads")
    assert stored.height == 60
    assert stored["symbol"].unique().to_list() == ["EURUSD"]
    assert stored["ts"].is_sorted()


def test_loan_book_and_scenarios_match_the_generated_drops(platform: Platform) -> None:
    demo(platform)
    result = platform.materialize(
        [keys.BRONZE_LOAN_BOOK, keys.LOAN_BOOK, keys.BRONZE_LOAN_SCENARIOS, keys.LOAN_SCENARIOS],
        VALUATION,
    )
    assert_all_checks_passed(
        result,
        keys.BRONZE_LOAN_BOOK,
        keys.LOAN_BOOK,
        keys.BRONZE_LOAN_SCENARIOS,
        keys.LOAN_SCENARIOS,
    )
    book = platform.lake.read("curated", "loan_book", {"valuation_date": VALUATION})
    expected = generate_loan_book(VALUATION).with_columns(pl.lit(VALUATION).alias("valuation_date"))
    assert_frame_equal(
        book.sort("loan_id"), expected.select(book.columns).sort("loan_id"), check_exact=True
    )
    scenarios = platform.lake.read("curated", "loan_scenarios", {"valuation_date": VALUATION})
    assert sorted(scenarios.select("scenario", "pd_multiplier", "asset_correlation").rows()) == (
        sorted(SCENARIOS)
    )
    assert metadata(result, keys.LOAN_BOOK)["rows_in"] == expected.height


# --- partitions: isolation and idempotence ------------------------------------------------


def test_rewriting_one_month_leaves_the_other_month_untouched(platform: Platform) -> None:
    demo(platform, claims_months=("2026-07", "2026-08"))
    for month in ("2026-07", "2026-08"):
        platform.materialize([keys.BRONZE_CLAIMS, keys.CLAIMS_BY_DISTRICT], month)
    july_rows = platform.lake.read("curated", "claims_by_district", {"month": "2026-07"})
    july_files = partition_file_uris(platform, "curated", "claims_by_district", "month=2026-07")
    july_bronze = partition_file_uris(platform, "bronze", "claims", "_partition_key=2026-07")
    august_before = platform.lake.read("curated", "claims_by_district", {"month": "2026-08"})

    resent = generate_claims("2026-08", claims_truth(), n_policies=120, seed=7)
    resent.write_csv(platform.settings.landing_dir / "claims" / "claims_2026-08.csv")
    result = platform.materialize([keys.BRONZE_CLAIMS, keys.CLAIMS_BY_DISTRICT], "2026-08")
    assert_all_checks_passed(result, keys.BRONZE_CLAIMS, keys.CLAIMS_BY_DISTRICT)

    assert_frame_equal(
        platform.lake.read("curated", "claims_by_district", {"month": "2026-07"}), july_rows
    )
    assert partition_file_uris(platform, "curated", "claims_by_district", "month=2026-07") == (
        july_files
    )
    assert partition_file_uris(platform, "bronze", "claims", "_partition_key=2026-07") == (
        july_bronze
    )
    august = platform.lake.read("curated", "claims_by_district", {"month": "2026-08"})
    assert int(august["n_policies"].sum()) == 120
    assert int(august["claim_count"].sum()) == int(resent["claim_count"].sum())
    assert not august.equals(august_before)
    assert platform.lake.read("bronze", "claims", {"_partition_key": "2026-08"}).height == 120


def test_rematerialising_a_partition_is_idempotent(platform: Platform) -> None:
    demo(platform)
    write_claims_csv(platform, [*good_claims(3), ["P1", "D1", MONTH, "0.9", "0"]])
    results = [ingest_claims(platform) for _ in range(2)]
    assert all(r.success for r in results)
    tables = [
        ("curated", "claims_by_district"),
        ("quarantine", "claims_by_district"),
    ]
    curated = platform.lake.read("curated", "claims_by_district").sort("district")
    assert curated["district"].is_unique().all()
    assert int(curated["n_policies"].sum()) == 3
    for layer, table in tables:
        assert platform.lake.read(layer, table).height == (2 if layer == "curated" else 1)
    bronze = platform.lake.read("bronze", "claims")
    assert bronze.height == 4
    assert bronze["_row_number"].is_unique().all()
    assert metadata(results[0], keys.CLAIMS_BY_DISTRICT)["rows_in"] == 4
    volatile = {"delta_version": None, "table_uri": None, "batch_id": None}
    assert metadata(results[1], keys.CLAIMS_BY_DISTRICT) | volatile == (
        metadata(results[0], keys.CLAIMS_BY_DISTRICT) | volatile
    )
    # the second run's batch superseded the first, whose rows were deleted
    stored = platform.lake.read("curated", "claims_by_district", committed=False)
    assert stored["_batch_id"].unique().to_list() == [
        metadata(results[1], keys.CLAIMS_BY_DISTRICT)["batch_id"]
    ]


# --- the bad-input corpus ---------------------------------------------------------------


def test_missing_column_fails_the_partition_naming_file_and_column(platform: Platform) -> None:
    path = platform.settings.landing_dir / CLAIMS_CSV
    path.parent.mkdir(parents=True)
    path.write_text("policy_id,district,valuation_month,claim_count\nP1,D1,2026-07,0\n")
    result = ingest_claims(platform)
    assert not result.success
    description, meta = failure(result, keys.BRONZE_CLAIMS)
    assert description == (
        f"claims partition {MONTH}: {CLAIMS_CSV}: missing required column(s) exposure for "
        "claims_by_district (found: policy_id, district, valuation_month, claim_count)"
    )
    assert meta == {"file": CLAIMS_CSV}
    assert not platform.lake.exists("bronze", "claims")
    assert not platform.lake.exists("curated", "claims_by_district")


@pytest.mark.parametrize(
    ("name", "payload", "problem"),
    [
        (CLAIMS_CSV, b"", "file is empty (0 bytes)"),
        (
            CLAIMS_CSV,
            "policy_id,district,valuation_month,exposure,claim_count\nP1,Zürich,2026-07,1,0\n".encode(
                "latin-1"
            ),
            "not valid UTF-8 (byte 0xfc at offset 60)",  # 55-char header, newline, "P1,Z"
        ),
        (f"claims/claims_{MONTH}.parquet", b"PAR1\x15\x04\x15\x10\x15", "cannot be parsed"),
    ],
    ids=["empty", "latin-1", "truncated-parquet"],
)
def test_unreadable_files_fail_the_partition_naming_the_file(
    platform: Platform, name: str, payload: bytes, problem: str
) -> None:
    if name.endswith(".parquet"):
        whole = generate_claims(MONTH, claims_truth(), n_policies=50)
        full = platform.settings.home / "whole.parquet"
        full.parent.mkdir(parents=True, exist_ok=True)
        whole.write_parquet(full)
        payload = full.read_bytes()[: full.stat().st_size // 2]
    path = platform.settings.landing_dir / name
    path.parent.mkdir(parents=True)
    path.write_bytes(payload)
    result = ingest_claims(platform)
    assert not result.success
    description, meta = failure(result, keys.BRONZE_CLAIMS)
    assert description.startswith(f"claims partition {MONTH}: {path}: {problem}")
    assert meta == {"file": name}
    assert not platform.lake.exists("bronze", "claims")


def test_bronze_streamed_in_small_batches_numbers_rows_across_batches(
    platform: Platform, monkeypatch: pytest.MonkeyPatch
) -> None:
    demo(platform)
    whole = platform.materialize([keys.BRONZE_CLAIMS], MONTH)
    stored_whole = platform.lake.read("bronze", "claims").drop("_ingested_at")

    monkeypatch.setattr("pipeline.stores.sources.STREAM_BATCH_ROWS", 7)
    batched = platform.materialize([keys.BRONZE_CLAIMS], MONTH)
    stored = platform.lake.read("bronze", "claims").drop("_ingested_at")
    assert_frame_equal(stored.sort("_row_number"), stored_whole.sort("_row_number"))
    assert stored["_row_number"].sort().to_list() == list(range(1, N_POLICIES + 1))
    assert metadata(batched, keys.BRONZE_CLAIMS)["dagster/row_count"] == N_POLICIES
    assert (
        metadata(whole, keys.BRONZE_CLAIMS)["landing_sha256"]
        == (metadata(batched, keys.BRONZE_CLAIMS)["landing_sha256"])
    )


def test_a_file_that_breaks_part_of_the_way_leaves_the_previous_bronze_readable(
    platform: Platform, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows stream into bronze in batches; a ragged line after some batches commits none."""
    write_claims_csv(platform, good_claims(40))
    platform.materialize([keys.BRONZE_CLAIMS], MONTH)
    version = platform.lake.version("bronze", "claims")
    before = platform.lake.read("bronze", "claims")

    rows = good_claims(60)
    rows[49] = [*rows[49], "surplus"]
    write_claims_csv(platform, rows)
    monkeypatch.setattr("pipeline.stores.sources.STREAM_BATCH_ROWS", 10)
    result = platform.materialize([keys.BRONZE_CLAIMS], MONTH, raise_on_error=False)
    description, meta = failure(result, keys.BRONZE_CLAIMS)
    path = platform.settings.landing_dir / CLAIMS_CSV
    assert description.startswith(f"claims partition {MONTH}: {path}: cannot be parsed: ")
    assert meta == {"file": CLAIMS_CSV}
    assert platform.lake.version("bronze", "claims") == version
    assert_frame_equal(platform.lake.read("bronze", "claims"), before)


def test_no_landing_file_fails_naming_the_expected_pattern(platform: Platform) -> None:
    result = ingest_claims(platform)
    description, _ = failure(result, keys.BRONZE_CLAIMS)
    assert description == (
        f"claims partition {MONTH}: no landing file claims_{MONTH}*.csv|parquet under "
        f"{platform.settings.landing_dir / 'claims'}"
    )


@pytest.mark.parametrize(
    ("bad_row", "reason"),
    [
        (["P9", "D1", MONTH, "abc", "0"], "exposure: cannot parse 'abc' as Float64"),
        (["P9", "D1", MONTH, "-0.5", "0"], "exposure < 0"),
        (["P9", "D1", MONTH, "NaN", "0"], "exposure is NaN or infinite"),
        (["P9", "D1", MONTH, "inf", "0"], "exposure is NaN or infinite"),
        (
            ["P9", "D1", "2026-08", "0.5", "0"],
            f"valuation_month is not the partition month {MONTH}",
        ),
        (
            ["P2", "D1", MONTH, "0.5", "0"],
            f"duplicate key (policy_id) = (P2); first seen at row 2 of {CLAIMS_CSV}",
        ),
        (["P9", "D1", MONTH, "0.5", "x"], "claim_count: cannot parse 'x' as Int64"),
    ],
    ids=["wrong-type", "negative", "nan", "inf", "other-month", "duplicate", "bad-count"],
)
def test_a_bad_row_is_quarantined_with_its_reason_and_row_number(
    platform: Platform, bad_row: list[str], reason: str
) -> None:
    write_claims_csv(platform, [*good_claims(2), bad_row, *good_claims(4)[2:]])
    result = ingest_claims(platform)
    assert_all_checks_passed(result, keys.BRONZE_CLAIMS, keys.CLAIMS_BY_DISTRICT)
    q = quarantine(platform, "claims_by_district", MONTH)
    assert q.select("partition_key", "_source_file", "_row_number", "reason").rows() == [
        (MONTH, CLAIMS_CSV, 3, reason)
    ]
    assert json.loads(q["record"].item()) == dict(zip(CLAIMS_COLUMNS, bad_row, strict=True))
    meta = metadata(result, keys.CLAIMS_BY_DISTRICT)
    assert (meta["rows_in"], meta["rows_curated"], meta["rows_quarantined"]) == (5, 4, 1)
    assert reason.split(" = ")[0] in meta["quarantine_reasons"]


def test_crossed_quotes_nan_and_unsafe_symbols_are_quarantined_by_date(
    platform: Platform,
) -> None:
    rows = pl.DataFrame(
        {
            "symbol": ["EUR/USD", "EURUSD", "../etc", "EURUSD", "EURUSD", "EURUSD"],
            "ts": [f"{DAY}T00:00:0{i}" for i in range(1, 7)],
            "bid": ["1.10", "1.20", "1.10", "nan", "1.10", "1.10"],
            "ask": ["1.11", "1.19", "1.11", "1.11", "inf", "1.12"],
        }
    )
    path = platform.settings.landing_dir / f"fx_ticks/fx_ticks_{DAY}.csv"
    path.parent.mkdir(parents=True)
    rows.write_csv(path)
    platform.instance.add_dynamic_partitions("symbol", ["EURUSD"])
    platform.materialize([keys.BRONZE_FX_TICKS], DAY)
    result = platform.materialize([keys.FX_SPREADS], symbol_date_key("EURUSD", DAY))
    assert_all_checks_passed(result, keys.FX_SPREADS)

    source = f"fx_ticks/fx_ticks_{DAY}.csv"
    q = quarantine(platform, "fx_spreads", DAY)
    assert q.select("_source_file", "_row_number", "reason").rows() == [
        (source, 2, "bid > ask"),
        (source, 3, "symbol does not normalise to [A-Z0-9]{3,12}"),
        (source, 4, "bid or ask is NaN or infinite"),
        (source, 5, "bid or ask is NaN or infinite"),
    ]
    stored = platform.lake.read("curated", "fx_spreads")
    assert stored["ts"].dt.second().to_list() == [1, 6]
    meta = metadata(result, keys.FX_SPREADS)
    assert meta["rows_quarantined_for_symbol"] == 3  # ../etc belongs to no symbol
    assert meta["rows_quarantined_days_all_symbols"] == 4
    # the unsafe symbol never became a partition, a folder or a path component
    assert platform.instance.get_dynamic_partitions("symbol") == ["EURUSD"]
    assert not [p for p in lake_paths(platform) if ".." in p.name or "ETC" in p.name.upper()]


def test_unsafe_symbol_in_parquet_is_not_discovered_as_a_partition(platform: Platform) -> None:
    ticks, _ = generate_fx_ticks(
        DAY, ticks_per_symbol=30, symbols={"../etc": (1.0, 1.0), "EUR/USD": (1.08, 0.8)}
    )
    path = platform.settings.landing_dir / f"fx_ticks/fx_ticks_{DAY}.parquet"
    path.parent.mkdir(parents=True)
    ticks.write_parquet(path)
    result = evaluate_fx_landing_sensor(platform.settings, platform.instance, platform.resources)
    assert added_symbols(result) == ["EURUSD"]
    assert [r.partition_key for r in result.run_requests] == [DAY]  # the day is still ingested


def test_a_non_normalised_symbol_partition_is_refused_before_any_write(
    platform: Platform,
) -> None:
    """Regression: a hand-added dynamic partition ``..`` reached the lake as ``symbol=..``."""
    demo(platform, claims_months=())
    platform.materialize([keys.BRONZE_FX_TICKS], DAY)
    platform.instance.add_dynamic_partitions("symbol", ["..", "eurusd"])
    for bad in ("..", "eurusd"):
        key = symbol_date_key(bad, DAY)
        result = platform.materialize([keys.FX_SPREADS], key, raise_on_error=False)
        description, _ = failure(result, keys.FX_SPREADS)
        assert description == (
            f"fx_spreads partition {key}: symbol {bad!r} is not a normalised partition key "
            "([A-Z0-9]{3,12})"
        )
    assert not platform.lake.exists("curated", "fx_spreads")
    assert not [p for p in lake_paths(platform) if ".." in p.name]


def test_a_registered_symbol_without_ticks_fails_its_blocking_checks(platform: Platform) -> None:
    demo(platform, claims_months=())
    platform.instance.add_dynamic_partitions("symbol", ["SEKNOK"])
    platform.materialize([keys.BRONZE_FX_TICKS], DAY)
    result = platform.materialize(
        [keys.FX_SPREADS], symbol_date_key("SEKNOK", DAY), raise_on_error=False
    )
    outcomes = check_outcomes(result)
    assert outcomes == {
        ("curated/fx_spreads", keys.CHECK_CURATED_CONTRACT): False,
        ("curated/fx_spreads", keys.CHECK_RECONCILES): False,
    }
    descriptions = check_descriptions(result)
    assert descriptions[("curated/fx_spreads", keys.CHECK_CURATED_CONTRACT)] == (
        "no curated rows stored"
    )
    assert descriptions[("curated/fx_spreads", keys.CHECK_RECONCILES)] == (
        "0 in = 0 curated + 0 quarantined"
    )


# --- schema drift, all-rejected drops, outcomes committed together ------------------------


def test_undeclared_columns_are_kept_in_bronze_and_reported_as_drift(platform: Platform) -> None:
    path = platform.settings.landing_dir / CLAIMS_CSV
    path.parent.mkdir(parents=True)
    header = ",".join([*CLAIMS_COLUMNS, "broker", "channel"])
    rows = [",".join([*r, f"B{i}", "web"]) for i, r in enumerate(good_claims(3))]
    path.write_text("\n".join([header, *rows]) + "\n")
    resend = platform.settings.landing_dir / f"claims/claims_{MONTH}_resend.csv"
    resend.write_text(",".join(CLAIMS_COLUMNS) + "\nP9,D1,2026-07,0.1,0\n")

    result = ingest_claims(platform)

    assert result.success
    bronze = platform.lake.read("bronze", "claims").sort("_source_file", "_row_number")
    assert bronze.columns[:7] == [*CLAIMS_COLUMNS, "broker", "channel"]
    assert bronze.schema["broker"] == pl.String
    assert bronze["broker"].to_list() == ["B0", "B1", "B2", None]
    assert metadata(result, keys.BRONZE_CLAIMS)["undeclared_columns"] == "broker, channel"
    outcomes = check_outcomes(result)
    assert outcomes[("bronze/claims", keys.CHECK_NO_UNDECLARED_COLUMNS)] is False
    assert outcomes[("bronze/claims", keys.CHECK_FILE_SCHEMA)] is True
    drift = next(
        e
        for e in result.get_asset_check_evaluations()
        if e.check_name == keys.CHECK_NO_UNDECLARED_COLUMNS
    )
    assert drift.severity == dg.AssetCheckSeverity.WARN
    assert drift.description == (
        f"undeclared column(s) broker, channel in {CLAIMS_CSV}; kept in bronze"
    )
    # a warning: curated is published, without the undeclared columns
    curated = platform.lake.read("curated", "claims_by_district", {"month": MONTH})
    assert int(curated["n_policies"].sum()) == 4
    assert "broker" not in curated.columns


def test_a_column_bronze_cannot_store_fails_naming_file_and_column(platform: Platform) -> None:
    path = platform.settings.landing_dir / CLAIMS_CSV
    path.parent.mkdir(parents=True)
    path.write_text(",".join([*CLAIMS_COLUMNS, "_source_file", "sales channel"]) + "\n")
    description, meta = failure(ingest_claims(platform), keys.BRONZE_CLAIMS)
    assert description == (
        f"claims partition {MONTH}: {CLAIMS_CSV}: column name(s) cannot be stored in bronze: "
        "'_source_file' is a column the platform adds; 'sales channel' is empty or holds one "
        "of ' ,;{}()=', tab, newline"
    )
    assert meta == {"file": CLAIMS_CSV}


def test_a_drop_whose_rows_are_all_rejected_is_quarantined_and_fails_its_gate(
    platform: Platform,
) -> None:
    write_claims_csv(platform, [[f"P{i}", "D1", MONTH, "-1", "0"] for i in range(4)])
    result = ingest_claims(platform)
    assert not result.success  # the blocking contract check has no curated rows to pass
    q = quarantine(platform, "claims_by_district", MONTH)
    assert q["reason"].to_list() == ["exposure < 0"] * 4
    outcomes = check_outcomes(result)
    assert outcomes[("curated/claims_by_district", keys.CHECK_RECONCILES)] is True
    assert outcomes[("curated/claims_by_district", keys.CHECK_CURATED_CONTRACT)] is False


def test_an_fx_day_without_a_valid_symbol_is_quarantined_by_its_bronze_run(
    platform: Platform,
) -> None:
    rows = pl.DataFrame(
        {
            "symbol": ["../etc", "€/$", None],
            "ts": [f"{DAY}T00:00:0{i}" for i in range(1, 4)],
            "bid": ["1.10", "1.20", "1.30"],
            "ask": ["1.11", "1.21", "1.31"],
        }
    )
    path = platform.settings.landing_dir / f"fx_ticks/fx_ticks_{DAY}.csv"
    path.parent.mkdir(parents=True)
    rows.write_csv(path)
    result = platform.materialize([keys.BRONZE_FX_TICKS], DAY)
    assert metadata(result, keys.BRONZE_FX_TICKS)["rows_quarantined_without_symbol"] == 3
    q = quarantine(platform, "fx_spreads", DAY)
    assert q["_row_number"].to_list() == [1, 2, 3]
    assert set(q["reason"]) == {"symbol does not normalise to [A-Z0-9]{3,12}"} | {
        "symbol: missing value"
    }
    assert not platform.lake.exists("curated", "fx_spreads") or (
        platform.lake.read("curated", "fx_spreads").height == 0
    )


def test_an_unwritable_quarantine_publishes_no_curated_rows(platform: Platform) -> None:
    """Regression: curated rows were published and the quarantined ones lost."""
    write_claims_csv(platform, good_claims(3))
    assert ingest_claims(platform).success
    before = platform.lake.read("curated", "claims_by_district", {"month": MONTH})

    write_claims_csv(platform, [*good_claims(5), ["P9", "D1", MONTH, "-1", "0"]])
    quarantine_dir = Path(platform.lake.table_uri("quarantine", "claims_by_district"))
    log = quarantine_dir / "_delta_log"
    moved = quarantine_dir.with_name("moved")
    quarantine_dir.rename(moved)
    quarantine_dir.write_text("not a table")  # the quarantine location cannot take a write
    try:
        result = ingest_claims(platform)
    finally:
        quarantine_dir.unlink()
        moved.rename(quarantine_dir)
    assert not result.success
    assert result.failure_data_for_node("curated__claims_by_district") is not None
    assert log.is_dir()
    # the new curated rows were written but never committed: readers see the old outcome
    assert_frame_equal(
        platform.lake.read("curated", "claims_by_district", {"month": MONTH}), before
    )
    assert quarantine(platform, "claims_by_district", MONTH).height == 0
    stored = platform.lake.read("curated", "claims_by_district", committed=False)
    assert stored["_batch_id"].n_unique() == 2  # the uncommitted batch is invisible


# --- the FX incident log: labels are data ------------------------------------------------

INCIDENT_COLUMNS = ["symbol", "start", "end", "label", "reviewer", "note"]


def test_the_incident_log_is_picked_up_by_its_sensor_and_ingested_like_any_source(
    platform: Platform,
) -> None:
    import time

    from pipeline import automation
    from pipeline.resources.landing import LandingResource

    demo(platform, claims_months=(), valuation_dates=(), ticks_per_symbol=1_500)
    landing = platform.settings.landing_dir
    (delivered,) = sorted((landing / "fx_incidents").iterdir())
    assert delivered.name == f"fx_incidents_{DAY}.csv"

    # its landing sensor requests bronze and curated of the day named in the file, in one run
    resources = {**platform.resources, "landing": LandingResource(path=str(landing), settle_s=0)}
    context = dg.build_sensor_context(instance=platform.instance, resources=resources)
    sensed = automation.evaluate_landing(
        context,
        resources["landing"],
        platform.lake,
        automation.LANDING_TARGETS["fx_incidents"],
        now_s=time.time() + 60,
    )
    (request,) = sensed.run_requests
    assert request.partition_key == DAY
    assert request.asset_selection == [keys.BRONZE_FX_INCIDENTS, keys.FX_INCIDENTS]

    result = platform.materialize(request.asset_selection, DAY)
    assert_all_checks_passed(result, keys.BRONZE_FX_INCIDENTS, keys.FX_INCIDENTS)
    log = pl.read_csv(delivered, try_parse_dates=True)
    curated = platform.lake.read("curated", "fx_incidents", {"date": DAY}).sort("symbol", "start")
    assert curated.columns == ["date", *INCIDENT_COLUMNS]
    assert curated.height == log.height == metadata(result, keys.FX_INCIDENTS)["rows_curated"]
    assert set(curated["symbol"]) == {normalise_symbol(s) for s in log["symbol"]}
    assert set(curated["label"]) == {"anomaly", "reviewed_window"}
    expected = log.with_columns(
        pl.col("symbol").map_elements(normalise_symbol, return_dtype=pl.String),
        pl.col("start", "end").cast(pl.Datetime("us")),
    ).sort("symbol", "start")
    assert_frame_equal(
        curated.select("symbol", "start", "end", "label", "reviewer"),
        expected.select("symbol", "start", "end", "label", "reviewer"),
    )
    assert quarantine(platform, "fx_incidents", DAY).height == 0


def test_incident_rows_breaking_the_contract_are_quarantined_with_their_reason(
    platform: Platform,
) -> None:
    rows = [
        ["EUR/USD", f"{DAY}T08:00:00", f"{DAY}T12:00:00", "reviewed_window", "a.b", ""],
        ["eur/usd", f"{DAY}T09:00:00", f"{DAY}T09:00:05", "anomaly", "a.b", "wide"],
        ["EURUSD", f"{DAY}T10:00:00", f"{DAY}T09:00:00", "anomaly", "a.b", "backwards"],
        ["EURUSD", "2026-09-02T10:00:00", "2026-09-02T11:00:00", "anomaly", "a.b", "next day"],
        ["EURUSD", f"{DAY}T22:00:00", "2026-09-02T01:00:00", "reviewed_window", "a.b", ""],
        ["EURUSD", f"{DAY}T10:00:00", f"{DAY}T11:00:00", "maybe", "a.b", "unknown label"],
        ["../x", f"{DAY}T10:00:00", f"{DAY}T11:00:00", "anomaly", "a.b", "unsafe symbol"],
        ["EURUSD", f"{DAY}T13:00:00", f"{DAY}T14:00:00", "anomaly", "", "no reviewer"],
        ["EURUSD", f"{DAY}T15:00:00", "soon", "anomaly", "a.b", "unparseable end"],
    ]
    path = platform.settings.landing_dir / "fx_incidents" / f"fx_incidents_{DAY}.csv"
    path.parent.mkdir(parents=True)
    path.write_text("\n".join(",".join(r) for r in [INCIDENT_COLUMNS, *rows]) + "\n")

    result = platform.materialize(
        [keys.BRONZE_FX_INCIDENTS, keys.FX_INCIDENTS], DAY, raise_on_error=False
    )
    assert result.success  # rows are quarantined; the partition reconciles
    curated = platform.lake.read("curated", "fx_incidents").sort("start")
    assert curated.select("symbol", "label").rows() == [
        ("EURUSD", "reviewed_window"),
        ("EURUSD", "anomaly"),
    ]
    assert curated["note"].to_list()[1] == "wide"  # a blank note (row 1) is allowed
    reasons = dict(quarantine(platform, "fx_incidents", DAY).select("_row_number", "reason").rows())
    assert reasons == {
        3: "end < start",
        4: f"start is not on the partition date {DAY}; end is after the partition date {DAY}",
        5: f"end is after the partition date {DAY}",
        6: "label not one of anomaly, reviewed_window",
        7: "symbol does not normalise to [A-Z0-9]{3,12}",
        8: "reviewer: missing value",
        9: "end: cannot parse 'soon' as Datetime(time_unit='us', time_zone=None)",
    }
    outcomes = check_outcomes(result)
    assert outcomes[("curated/fx_incidents", keys.CHECK_RECONCILES)]
    assert outcomes[("curated/fx_incidents", keys.CHECK_CURATED_CONTRACT)]
