"""Reading landing files exactly as delivered, and failing loudly on unreadable ones."""

import datetime as dt
import re
from pathlib import Path

import polars as pl
import pytest

from pipeline.domain.landing import (
    LandingFileError,
    expected_name,
    is_settled,
    landing_name_problem,
    parquet_footer_intact,
    partition_key_of,
    read_as_text,
)
from pipeline.resources.landing import LandingResource


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("claims_2026-07.csv", ("claims", "2026-07")),
        ("claims_2026-07_resend.csv", ("claims", "2026-07")),
        ("fx_ticks_2026-09-01.parquet", ("fx_ticks", "2026-09-01")),
        ("fx_ticks_2026-09-01_resend.parquet", ("fx_ticks", "2026-09-01")),
        ("loan_book_2026-09-30.parquet", ("loan_book", "2026-09-30")),
        ("loan_scenarios_2026-09-30.csv", ("loan_scenarios", "2026-09-30")),
        (".claims_2026-07.csv.tmp", None),  # a drop in progress
        ("claims_2026-07.csv.tmp", None),
        ("claims_2026-07.xlsx", None),
        ("payments_2026-07.csv", None),  # not a known source
        ("claims_latest.csv", None),
        ("claims_../2026-07.csv", None),
    ],
)
def test_partition_key_is_read_from_the_file_name(
    name: str, expected: tuple[str, str] | None
) -> None:
    assert partition_key_of(Path(name)) == expected


def test_landing_files_lists_one_partition_in_name_order(tmp_path: Path) -> None:
    folder = tmp_path / "claims"
    folder.mkdir()
    for name in (
        "claims_2026-07_resend.csv",
        "claims_2026-07.csv",
        "claims_2026-08.csv",
        ".claims_2026-07.csv.tmp",
        "claims_2026-07-01.csv",  # a daily key is not the month 2026-07
    ):
        (folder / name).write_text("policy_id\nP1\n")
    (folder / "claims_2026-07_dir.csv").mkdir()
    landing = LandingResource(path=str(tmp_path))
    found = landing.partition_files("claims", "2026-07")
    assert [f.name for f in found] == ["claims_2026-07.csv", "claims_2026-07_resend.csv"]
    assert [f.relative for f in found] == [
        "claims/claims_2026-07.csv",
        "claims/claims_2026-07_resend.csv",
    ]
    assert all(f.size == len("policy_id\nP1\n") for f in found)
    assert landing.partition_files("fx_ticks", "2026-09-01") == []


def test_csv_values_are_kept_exactly_as_text(tmp_path: Path) -> None:
    path = tmp_path / "claims_2026-07.csv"
    path.write_text("policy_id,exposure,claim_count\n007,1e400,abc\nP2, 0.5 ,\n")
    frame = read_as_text(path)
    assert frame.schema == {c: pl.String for c in ("policy_id", "exposure", "claim_count")}
    assert frame.rows() == [("007", "1e400", "abc"), ("P2", " 0.5 ", None)]


def test_csv_with_a_utf8_bom_keeps_the_first_column_name(tmp_path: Path) -> None:
    path = tmp_path / "claims_2026-07.csv"
    path.write_bytes(b"\xef\xbb\xbfpolicy_id,exposure\nP1,0.5\n")
    assert read_as_text(path).columns == ["policy_id", "exposure"]


def test_parquet_is_read_as_text_that_parses_back_to_the_same_values(tmp_path: Path) -> None:
    source = pl.DataFrame(
        {
            "symbol": ["EUR/USD", "usd/jpy"],
            "ts": [dt.datetime(2026, 9, 1, 0, 0, 1, 123456), dt.datetime(2026, 9, 1, 23, 59)],
            "bid": [1.0798958, 149.99123],
            "ask": [1.0800471, 150.00012],
            "n": [3, 4],
        }
    )
    path = tmp_path / "fx_ticks_2026-09-01.parquet"
    source.write_parquet(path)
    frame = read_as_text(path)
    assert set(frame.schema.values()) == {pl.String}
    assert frame["ts"].to_list() == ["2026-09-01T00:00:01.123456", "2026-09-01T23:59:00.000000"]
    # the text round trip is exact, so curated spreads equal spreads of the delivered floats
    assert frame["bid"].cast(pl.Float64).to_list() == source["bid"].to_list()
    assert frame["ask"].cast(pl.Float64).to_list() == source["ask"].to_list()
    assert frame["n"].to_list() == ["3", "4"]


def test_tz_aware_parquet_timestamps_are_written_as_utc(tmp_path: Path) -> None:
    """Regression: a Paris timestamp was printed as Paris wall-clock time, so a tick at
    01:30 Paris (23:30 UTC the day before) landed on the wrong UTC date."""
    source = pl.DataFrame({"ts": [dt.datetime(2026, 9, 1, 1, 30)], "bid": [1.1]}).with_columns(
        pl.col("ts").dt.replace_time_zone("Europe/Paris")
    )
    path = tmp_path / "fx_ticks_2026-09-01.parquet"
    source.write_parquet(path)
    assert read_as_text(path)["ts"].to_list() == ["2026-08-31T23:30:00.000000"]


def test_empty_file_fails_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "claims_2026-07.csv"
    path.write_bytes(b"")
    with pytest.raises(LandingFileError, match=re.escape(f"{path}: file is empty (0 bytes)")):
        read_as_text(path)


def test_non_utf8_csv_fails_naming_the_file_byte_and_offset(tmp_path: Path) -> None:
    path = tmp_path / "claims_2026-07.csv"
    payload = "policy_id,district\nP1,Zürich\n".encode("latin-1")
    path.write_bytes(payload)
    offset = payload.index(b"\xfc")
    with pytest.raises(LandingFileError) as err:
        read_as_text(path)
    assert str(err.value) == f"{path}: not valid UTF-8 (byte 0xfc at offset {offset})"


def test_truncated_parquet_fails_naming_the_file(tmp_path: Path) -> None:
    whole = tmp_path / "whole.parquet"
    pl.DataFrame({"x": list(range(1000))}).write_parquet(whole)
    path = tmp_path / "fx_ticks_2026-09-01.parquet"
    path.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(LandingFileError, match=re.escape(f"{path}: cannot be parsed")):
        read_as_text(path)


def test_ragged_csv_fails_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "claims_2026-07.csv"
    path.write_text("a,b\n1,2\n1,2,3\n")
    with pytest.raises(LandingFileError, match=re.escape(f"{path}: cannot be parsed")):
        read_as_text(path)


def test_missing_and_unsupported_files_fail(tmp_path: Path) -> None:
    with pytest.raises(LandingFileError, match="does not exist"):
        read_as_text(tmp_path / "claims_2026-07.csv")
    path = tmp_path / "claims_2026-07.json"
    path.write_text("{}")
    with pytest.raises(LandingFileError, match=re.escape("unsupported file type '.json'")):
        read_as_text(path)


def test_header_only_csv_reads_as_zero_rows(tmp_path: Path) -> None:
    path = tmp_path / "claims_2026-07.csv"
    path.write_text("policy_id,exposure\n")
    frame = read_as_text(path)
    assert frame.height == 0
    assert frame.columns == ["policy_id", "exposure"]


# --- names the platform cannot place, completeness ----------------------------------------


@pytest.mark.parametrize(
    ("source", "name", "problem"),
    [
        ("claims", "claims_2026-07.csv", None),
        ("claims", "claims_2026-07_resend.parquet", None),
        ("claims", "claims-2026-07.csv", "the separator after 'claims' must be '_'"),
        ("claims", "claims.2026-07.csv", "the separator after 'claims' must be '_'"),
        ("claims", "claims_2026-07.CSV", "extension '.CSV' must be lower-case .csv or .parquet"),
        ("claims", "claims_2026-07.Parquet", "extension '.Parquet' must be lower-case"),
        ("claims", "claims_2026-07.csv.gz", "compressed (.gz): deliver uncompressed"),
        ("claims", "claims_2026-07.zip", "compressed (.zip)"),
        ("claims", "claims_202607.csv", "no YYYY-MM date right after 'claims_'"),
        ("claims", "claims_07-2026.csv", "no YYYY-MM date right after 'claims_'"),
        ("claims", "claims_2026_07.csv", "no YYYY-MM date right after 'claims_'"),
        ("claims", "Claims_2026-07.csv", "must start with 'claims_' in lower case"),
        ("claims", "notes.txt", "extension '.txt' is not .csv or .parquet"),
        ("claims", "README", "extension '(none)' is not .csv or .parquet"),
        ("claims", "fx_ticks_2026-09-01.csv", "names source 'fx_ticks' but lies in the 'claims'"),
        ("fx_ticks", "fx_ticks_2026-9-1.parquet", "no YYYY-MM-DD date right after 'fx_ticks_'"),
        ("loan_book", "loanbook_2026-09-30.parquet", "does not start with 'loan_book_'"),
    ],
)
def test_a_name_that_names_no_partition_says_what_is_wrong(
    source: str, name: str, problem: str | None
) -> None:
    found = landing_name_problem(source, name)
    if problem is None:
        assert found is None
        return
    assert found is not None and problem in found, found
    assert found.endswith(f"expected {expected_name(source)}")


def test_expected_names_follow_each_source_partition_format() -> None:
    assert expected_name("claims") == "claims_<YYYY-MM>[_suffix].csv|parquet"
    assert expected_name("loan_book") == "loan_book_<YYYY-MM-DD>[_suffix].csv|parquet"


@pytest.mark.parametrize(
    ("first_seen_s", "mtime_s", "now_s", "settled"),
    [
        (100.0, 100.0, 105.0, False),  # written 5 s ago, seen 5 s ago
        (100.0, 100.0, 115.0, True),  # unchanged for the whole interval
        (100.0, 110.0, 112.0, False),  # still being written (mtime moves, sensor saw it late)
        (110.0, 10.0, 110.0, True),  # modified long ago (cp -p sets an old time when done)
        (100.0, 200.0, 116.0, True),  # a clock ahead of the sensor: the sensor's own time counts
    ],
)
def test_a_file_is_settled_after_the_interval_by_either_clock(
    first_seen_s: float, mtime_s: float, now_s: float, settled: bool
) -> None:
    assert (
        is_settled(first_seen_s=first_seen_s, mtime_ns=int(mtime_s * 1e9), now_s=now_s, settle_s=15)
        is settled
    )


def test_a_parquet_file_is_complete_only_with_its_footer(tmp_path: Path) -> None:
    path = tmp_path / "ticks.parquet"
    pl.DataFrame({"x": list(range(1000))}).write_parquet(path)
    payload = path.read_bytes()
    assert parquet_footer_intact(payload)
    for cut in (0, 4, 11, len(payload) // 2, len(payload) - 1):
        assert not parquet_footer_intact(payload[:cut]), cut
    assert not parquet_footer_intact(b"PAR1" + b"\x00" * 8 + b"PAR1")  # footer of length 0
    assert not parquet_footer_intact(b"policy_id\nP1\n")


def test_the_landing_completion_policy_is_validated() -> None:
    assert LandingResource(path="/x", settle_s=5, completion="marker").completion_policy() == (
        "marker",
        5,
    )
    with pytest.raises(ValueError, match="must be one of settle, marker"):
        LandingResource(path="/x", settle_s=5, completion="eventually").completion_policy()
