"""Data contracts: symbol normalisation, row-level quarantine reasons, reconciliation.

Every rejected row is identified by its 1-based data row number (the header is not a
row) and the exact reason a user reads in ``quarantine/<table>``.
"""

import datetime as dt
import json
import re

import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.domain import contracts
from pipeline.domain.contracts import (
    ContractError,
    InvalidSymbolError,
    apply_contract,
    normalise_symbol,
    try_normalise_symbol,
)

CLAIMS_COLUMNS = ["policy_id", "district", "valuation_month", "exposure", "claim_count"]
FX_COLUMNS = ["symbol", "ts", "bid", "ask"]
CLAIMS_FILE = "claims/claims_2026-07.csv"
FX_FILE = "fx_ticks/fx_ticks_2026-09-01.parquet"


def bronze(rows: list[list[str | None]], columns: list[str], source: str) -> pl.DataFrame:
    """A bronze frame as ``read_delivery`` builds it: text values plus lineage."""
    frame = pl.DataFrame(rows, schema=dict.fromkeys(columns, pl.String), orient="row")
    return frame.with_columns(
        pl.lit(source).alias("_source_file"),
        pl.int_range(1, frame.height + 1, dtype=pl.Int64).alias("_row_number"),
    )


def reasons_by_row(quarantined: pl.DataFrame) -> dict[int, str]:
    return dict(zip(quarantined["_row_number"], quarantined["reason"], strict=True))


# --- normalise_symbol ---------------------------------------------------------------


@pytest.mark.parametrize(
    "raw", ["EUR/USD", "eur/usd", "EUR-USD", "eur_usd", " EUR USD ", "EurUsd", "EURUSD"]
)
def test_spellings_of_one_pair_normalise_to_the_same_key(raw: str) -> None:
    assert normalise_symbol(raw) == "EURUSD"


@pytest.mark.parametrize(
    "raw",
    ["../etc", "..", "", "EU", "/", "EUR/USD;", "EUR.USD", "ABCDEFGHIJKLM", "EUR\\USD", "€UR/USD"],
)
def test_unsafe_or_malformed_symbols_are_rejected_with_the_value_named(raw: str) -> None:
    with pytest.raises(InvalidSymbolError, match=re.escape(repr(raw))):
        normalise_symbol(raw)
    assert try_normalise_symbol(raw) is None


def test_non_text_symbol_is_rejected() -> None:
    with pytest.raises(InvalidSymbolError, match="is not text"):
        normalise_symbol(123)  # type: ignore[arg-type]
    assert try_normalise_symbol(None) is None


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=20))
def test_normalise_symbol_output_is_always_safe_and_idempotent(raw: str) -> None:
    try:
        key = normalise_symbol(raw)
    except InvalidSymbolError:
        assert try_normalise_symbol(raw) is None
        return
    assert re.fullmatch(r"[A-Z0-9]{3,12}", key)
    assert normalise_symbol(key) == key
    assert try_normalise_symbol(raw) == key


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.sampled_from("ABCXYZabcxyz019"), min_size=3, max_size=12),
    st.lists(st.sampled_from(["", "/", "-", "_", " "]), min_size=12, max_size=12),
)
def test_separators_and_case_never_change_the_key(chars: list[str], seps: list[str]) -> None:
    raw = "".join(c + s for c, s in zip(chars, seps, strict=False))
    assert normalise_symbol(raw) == "".join(chars).upper()


# --- claims contract ----------------------------------------------------------------


def test_claims_rows_breaking_the_contract_are_quarantined_with_exact_reasons() -> None:
    rows = [
        ["P1", "D001", "2026-07", "0.5", "1"],  # 1 good
        ["P2", "D001", "2026-07", "abc", "0"],  # 2 wrong type
        ["P3", "D002", "2026-07", "-1", "0"],  # 3 negative exposure
        ["P1", "D001", "2026-07", "0.5", "1"],  # 4 duplicate of row 1
        ["P4", "D002", "2026-08", "0.3", "0"],  # 5 another month in a month file
        ["P5", "D002", "2026-07", "NaN", "0"],  # 6 NaN
        ["P6", "D002", "2026-07", "inf", "0"],  # 7 inf
        ["P7", "D002", "2026-07", "1e400", "0"],  # 8 overflows to inf
        ["P8", "D002", "2026-07", "-inf", "0"],  # 9 -inf is also negative
        ["P9", "", "2026-07", "0.2", "0"],  # 10 blank district
        ["P10", "D003", "2026-07", "0.2", "1.5"],  # 11 fractional count
        ["P11", "D003", "2026-07", " 0.25 ", "2"],  # 12 good after trimming
        ["P12", "../x", "2026-07", "0.2", "2"],  # 13 unsafe district
        ["P13", "D003", "2026-07", "0.2", "-1"],  # 14 negative count
        ["P14", "D003", "2026-07", None, "2"],  # 15 null exposure
    ]
    curated, quarantined = apply_contract(
        bronze(rows, CLAIMS_COLUMNS, CLAIMS_FILE),
        contracts.claims_contract("2026-07"),
        partition_key="2026-07",
    )
    assert reasons_by_row(quarantined) == {
        2: "exposure: cannot parse 'abc' as Float64",
        3: "exposure < 0",
        4: f"duplicate key (policy_id) = (P1); first seen at row 1 of {CLAIMS_FILE}",
        5: "valuation_month is not the partition month 2026-07",
        6: "exposure is NaN or infinite",
        7: "exposure is NaN or infinite",
        8: "exposure is NaN or infinite",
        9: "exposure is NaN or infinite; exposure < 0",
        10: "district: missing value",
        11: "claim_count: cannot parse '1.5' as Int64",
        13: "district is not [A-Za-z0-9_-]{1,32}",
        14: "claim_count < 0",
        15: "exposure: missing value",
    }
    assert curated["_row_number"].to_list() == [1, 12]
    assert curated["exposure"].to_list() == [0.5, 0.25]
    assert curated.schema["claim_count"] == pl.Int64
    assert (quarantined["partition_key"] == "2026-07").all()
    assert (quarantined["_source_file"] == CLAIMS_FILE).all()
    # the delivered record is kept verbatim, so a user can see what was sent
    record = json.loads(quarantined.filter(pl.col("_row_number") == 2)["record"].item())
    assert record == {
        "policy_id": "P2",
        "district": "D001",
        "valuation_month": "2026-07",
        "exposure": "abc",
        "claim_count": "0",
    }
    assert curated.height + quarantined.height == len(rows)


def test_duplicate_across_two_files_names_the_first_file_and_row() -> None:
    first = bronze([["P1", "D001", "2026-07", "0.5", "1"]] * 1, CLAIMS_COLUMNS, CLAIMS_FILE)
    resend = bronze(
        [["P2", "D001", "2026-07", "0.5", "0"], ["P1", "D009", "2026-07", "0.7", "0"]],
        CLAIMS_COLUMNS,
        "claims/claims_2026-07_resend.csv",
    )
    curated, quarantined = apply_contract(
        pl.concat([first, resend]), contracts.claims_contract("2026-07"), partition_key="2026-07"
    )
    assert quarantined.select("_source_file", "_row_number", "reason").rows() == [
        (
            "claims/claims_2026-07_resend.csv",
            2,
            f"duplicate key (policy_id) = (P1); first seen at row 1 of {CLAIMS_FILE}",
        )
    ]
    assert sorted(curated["policy_id"]) == ["P1", "P2"]
    assert curated.filter(pl.col("policy_id") == "P1")["district"].item() == "D001"


def test_a_clean_delivery_passes_untouched() -> None:
    rows = [[f"P{i}", "D001", "2026-07", f"0.{i}", str(i)] for i in range(1, 6)]
    curated, quarantined = apply_contract(
        bronze(rows, CLAIMS_COLUMNS, CLAIMS_FILE),
        contracts.claims_contract("2026-07"),
        partition_key="2026-07",
    )
    assert quarantined.height == 0
    assert quarantined.columns == list(contracts.QUARANTINE_COLUMNS)
    assert curated["claim_count"].to_list() == [1, 2, 3, 4, 5]


def test_bronze_without_lineage_or_a_contract_column_is_refused() -> None:
    frame = bronze([["P1", "D001", "2026-07", "0.5", "1"]], CLAIMS_COLUMNS, CLAIMS_FILE)
    with pytest.raises(ContractError, match="lacks lineage column _row_number"):
        apply_contract(
            frame.drop("_row_number"), contracts.claims_contract("2026-07"), partition_key="x"
        )
    with pytest.raises(ContractError, match=r"missing required column.*exposure"):
        apply_contract(
            frame.drop("exposure"), contracts.claims_contract("2026-07"), partition_key="x"
        )


def test_check_required_columns_names_file_and_every_missing_column() -> None:
    frame = pl.DataFrame({"policy_id": ["P1"], "district": ["D1"], "valuation_month": ["x"]})
    with pytest.raises(ContractError) as err:
        contracts.check_required_columns(
            frame.columns, contracts.claims_contract("2026-07"), CLAIMS_FILE
        )
    message = str(err.value)
    assert message.startswith(f"{CLAIMS_FILE}: missing required column(s) exposure, claim_count")
    assert "found: policy_id, district, valuation_month" in message


# --- FX tick contract ------------------------------------------------------------------


def test_fx_ticks_normalise_symbols_compute_spreads_and_quarantine_bad_ticks() -> None:
    rows = [
        ["EUR/USD", "2026-09-01T00:00:01.000000", "1.1", "1.2"],  # 1
        ["eur/usd", "2026-09-01T00:00:02.000000", "1.1000", "1.1003"],  # 2
        ["../etc", "2026-09-01T00:00:03.000000", "1.1", "1.2"],  # 3 unsafe symbol
        ["EURUSD", "2026-09-01T00:00:04.000000", "1.3", "1.2"],  # 4 crossed quote
        ["EURUSD", "2026-09-02T00:00:04.000000", "1.1", "1.2"],  # 5 another day
        ["EUR-USD", "2026-09-01T00:00:01.000000", "1.1", "1.2"],  # 6 same tick as row 1
        ["EURUSD", "2026-09-01T00:00:05.000000", "nan", "1.2"],  # 7 NaN bid
        ["EURUSD", "2026-09-01T00:00:06.000000", "1.1", "inf"],  # 8 inf ask
        ["EURUSD", "garbage", "1.1", "1.2"],  # 9 unparseable time
        ["usd/jpy", "2026-09-01T00:00:07.000000", "-1", "150.1"],  # 10 negative bid
    ]
    curated, quarantined = apply_contract(
        bronze(rows, FX_COLUMNS, FX_FILE),
        contracts.fx_ticks_contract("2026-09-01"),
        partition_key="2026-09-01",
    )
    assert reasons_by_row(quarantined) == {
        3: "symbol does not normalise to [A-Z0-9]{3,12}",
        4: "bid > ask",
        5: "ts is not on the partition date 2026-09-01",
        6: (
            "duplicate key (symbol, ts) = (EURUSD, 2026-09-01 00:00:01.000000); "
            f"first seen at row 1 of {FX_FILE}"
        ),
        7: "bid or ask is NaN or infinite",
        8: "bid or ask is NaN or infinite",
        9: "ts: cannot parse 'garbage' as Datetime(time_unit='us', time_zone=None)",
        10: "bid or ask <= 0",
    }
    assert curated["symbol"].to_list() == ["EURUSD", "EURUSD"]
    assert curated["spread"].to_list() == pytest.approx([0.1, 0.0003], abs=1e-12)
    assert (curated["spread"] == curated["ask"] - curated["bid"]).all()
    assert curated["date"].unique().to_list() == ["2026-09-01"]
    # the unsafe symbol survives only as data inside the quarantined record
    record = json.loads(quarantined.filter(pl.col("_row_number") == 3)["record"].item())
    assert record["symbol"] == "../etc"


@pytest.mark.parametrize(
    "first_ts",
    ["2026-09-01T00:00:01Z", "2026-09-01T02:00:01+02:00", "2026-09-01 00:00:01.000000"],
)
def test_timestamp_format_of_the_first_row_does_not_decide_the_column(first_ts: str) -> None:
    """Regression: polars inferred one format from the first value, so a leading ``Z`` made
    the column tz-aware and every naive row "cannot parse"."""
    rows = [
        ["EURUSD", first_ts, "1.1", "1.2"],
        ["EURUSD", "2026-09-01T00:00:02.500000", "1.1", "1.2"],
        ["EURUSD", "2026-09-01T01:00:03-01:00", "1.1", "1.2"],
    ]
    curated, quarantined = apply_contract(
        bronze(rows, FX_COLUMNS, FX_FILE),
        contracts.fx_ticks_contract("2026-09-01"),
        partition_key="2026-09-01",
    )
    assert quarantined.height == 0, quarantined["reason"].to_list()
    assert curated.schema["ts"] == pl.Datetime("us")
    assert curated["ts"].to_list() == [
        dt.datetime(2026, 9, 1, 0, 0, 1),
        dt.datetime(2026, 9, 1, 0, 0, 2, 500000),
        dt.datetime(2026, 9, 1, 2, 0, 3),
    ]


def test_an_offset_that_moves_a_tick_to_another_utc_day_is_quarantined() -> None:
    rows = [["EURUSD", "2026-09-01T01:30:00+02:00", "1.1", "1.2"]]
    _, quarantined = apply_contract(
        bronze(rows, FX_COLUMNS, FX_FILE),
        contracts.fx_ticks_contract("2026-09-01"),
        partition_key="2026-09-01",
    )
    assert quarantined["reason"].to_list() == ["ts is not on the partition date 2026-09-01"]


def test_a_day_of_only_bad_ticks_curates_nothing_and_quarantines_everything() -> None:
    rows = [["../etc", "2026-09-01T00:00:03", "1.1", "1.2"], ["EURUSD", "x", "1", "2"]]
    curated, quarantined = apply_contract(
        bronze(rows, FX_COLUMNS, FX_FILE),
        contracts.fx_ticks_contract("2026-09-01"),
        partition_key="2026-09-01",
    )
    assert curated.height == 0
    assert quarantined["_row_number"].to_list() == [1, 2]


# --- loan contracts ------------------------------------------------------------------


def test_loan_book_nan_is_reported_as_nan_not_as_out_of_range() -> None:
    columns = ["loan_id", "ead", "pd", "lgd", "rate", "segment"]
    rows = [
        ["L1", "1000", "0.01", "0.4", "0.05", "sme"],
        ["L2", "1000", "NaN", "0.4", "0.05", "sme"],
        ["L3", "1000", "1.5", "0.4", "0.05", "sme"],
        ["L4", "1000", "0.01", "-0.1", "0.05", "sme"],
        ["L5", "-5", "0.01", "0.4", "0.05", "crypto"],
    ]
    curated, quarantined = apply_contract(
        bronze(rows, columns, "loan_book/loan_book_2026-09-30.parquet"),
        contracts.loan_book_contract("2026-09-30"),
        partition_key="2026-09-30",
    )
    assert reasons_by_row(quarantined) == {
        2: "ead, pd, lgd or rate is NaN or infinite",
        3: "pd outside [0, 1]",
        4: "lgd outside [0, 1]",
        5: "ead < 0; segment not one of retail_mortgage, consumer, sme, corporate",
    }
    assert curated["valuation_date"].to_list() == ["2026-09-30"]


def test_loan_scenarios_reject_correlation_of_one_and_bad_names() -> None:
    columns = ["scenario", "pd_multiplier", "asset_correlation"]
    rows = [
        ["baseline", "1.0", "0.12"],
        ["total_loss", "1.0", "1.0"],
        ["Bad Name", "1.0", "0.1"],
        ["nan_case", "nan", "0.1"],
    ]
    _, quarantined = apply_contract(
        bronze(rows, columns, "loan_scenarios/loan_scenarios_2026-09-30.csv"),
        contracts.loan_scenarios_contract("2026-09-30"),
        partition_key="2026-09-30",
    )
    assert reasons_by_row(quarantined) == {
        2: "asset_correlation outside [0, 1)",
        3: "scenario is not [a-z0-9_]{1,40}",
        4: "pd_multiplier or asset_correlation is NaN or infinite",
    }


# --- reconciliation as a property ----------------------------------------------------

_cell = st.one_of(
    st.none(),
    st.sampled_from(["", "0", "1", "-1", "0.5", "abc", "NaN", "inf", "1e400", "2026-07"]),
    st.text(max_size=6),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.lists(_cell, min_size=5, max_size=5), min_size=1, max_size=25))
def test_every_row_is_either_curated_or_quarantined_exactly_once(
    rows: list[list[str | None]],
) -> None:
    frame = bronze(rows, CLAIMS_COLUMNS, CLAIMS_FILE)
    curated, quarantined = apply_contract(
        frame, contracts.claims_contract("2026-07"), partition_key="2026-07"
    )
    seen = sorted([*curated["_row_number"], *quarantined["_row_number"]])
    assert seen == list(range(1, len(rows) + 1))
    assert (quarantined["reason"].str.len_chars() > 0).all()
    # what was published satisfies the same rules the curated checks apply later
    assert contracts.rule_violations(curated, contracts.claims_contract("2026-07")) == {}


# --- checks on stored frames and the claims aggregate ----------------------------------


def test_rule_violations_counts_each_broken_rule_duplicates_and_nulls() -> None:
    stored = pl.DataFrame(
        {
            "month": ["2026-07", "2026-07", "2026-08", "2026-07"],
            "district": ["D1", "D1", "D2", None],
            "exposure": [1.0, -1.0, float("nan"), 2.0],
            "claim_count": [1, 0, 0, 1],
            "n_policies": [3, 0, 1, 2],
        }
    )
    violations = contracts.rule_violations(stored, contracts.claims_by_district_contract("2026-07"))
    assert violations == {
        "exposure is NaN or infinite": 1,
        "exposure < 0": 1,
        "n_policies < 1": 1,
        "month is not 2026-07": 1,
        "duplicate key (month, district)": 1,
        "district: null": 1,
    }


def test_aggregate_claims_sums_per_district() -> None:
    policies = pl.DataFrame(
        {
            "district": ["D2", "D1", "D2", "D2"],
            "exposure": [0.5, 1.0, 0.25, 0.25],
            "claim_count": [1, 0, 2, 0],
        }
    )
    table = contracts.aggregate_claims(policies, "2026-07")
    assert table.rows() == [("2026-07", "D1", 1.0, 0, 1), ("2026-07", "D2", 1.0, 3, 3)]
    assert contracts.rule_violations(table, contracts.claims_by_district_contract("2026-07")) == {}


# --- columns the contract does not declare ------------------------------------------------


def test_undeclared_columns_are_named_in_file_order_without_lineage() -> None:
    frame = bronze(
        [["P1", "D1", "2026-07", "1", "0", "web", "B1"]],
        [*CLAIMS_COLUMNS, "channel", "broker"],
        CLAIMS_FILE,
    )
    contract = contracts.claims_contract("2026-07")
    assert contracts.undeclared_columns(frame.columns, contract) == ["channel", "broker"]


def test_undeclared_columns_stay_out_of_curated_and_in_the_quarantined_record() -> None:
    rows = [
        ["P1", "D1", "2026-07", "1", "0", "web"],
        ["P2", "D1", "2026-07", "-1", "0", "branch"],
        ["P3", "D2", "2026-07", "2", "1", None],  # a file that did not deliver the column
    ]
    frame = bronze(rows, [*CLAIMS_COLUMNS, "channel"], CLAIMS_FILE)
    curated, quarantined = apply_contract(
        frame, contracts.claims_contract("2026-07"), partition_key="2026-07"
    )
    assert "channel" not in curated.columns
    assert curated["policy_id"].to_list() == ["P1", "P3"]
    assert json.loads(quarantined["record"].item()) == {
        "policy_id": "P2",
        "district": "D1",
        "valuation_month": "2026-07",
        "exposure": "-1",
        "claim_count": "0",
        "channel": "branch",
    }


def test_a_delivered_column_named_like_a_derived_one_does_not_shadow_it() -> None:
    frame = bronze(
        [["EUR/USD", "2026-09-01T00:00:01", "1.1", "1.2", "yesterday", "9"]],
        [*FX_COLUMNS, "date", "spread"],
        FX_FILE,
    )
    curated, quarantined = apply_contract(
        frame, contracts.fx_ticks_contract("2026-09-01"), partition_key="2026-09-01"
    )
    assert quarantined.height == 0
    assert curated.select("symbol", "date").row(0) == ("EURUSD", "2026-09-01")
    assert curated["spread"].item() == pytest.approx(0.1)


@pytest.mark.parametrize(
    ("columns", "problem"),
    [
        (["a", "_source_file"], "'_source_file' is a column the platform adds"),
        (["a", "_BATCH_ID"], "'_BATCH_ID' is a column the platform adds"),
        (["Note", "note"], "'note' repeats 'Note' (names ignore case)"),
        (["sales channel"], "'sales channel' is empty or holds one of"),
        (["a=b"], "'a=b' is empty or holds one of"),
        (["a\nb"], "is empty or holds one of"),
        ([""], "'' is empty or holds one of"),
    ],
)
def test_column_names_bronze_cannot_store_fail_the_file(columns: list[str], problem: str) -> None:
    with pytest.raises(ContractError) as err:
        contracts.check_storable_columns(columns, CLAIMS_FILE)
    assert str(err.value).startswith(f"{CLAIMS_FILE}: column name(s) cannot be stored in bronze: ")
    assert problem in str(err.value)


def test_ordinary_column_names_are_storable() -> None:
    contracts.check_storable_columns(["policy_id", "Broker-Name", "région", "x.y"], CLAIMS_FILE)
