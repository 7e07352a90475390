"""Reading landing files exactly as delivered, and failing loudly on unreadable ones."""

import datetime as dt
import re
from pathlib import Path

import polars as pl
import pytest

from pipeline.domain.landing import (
    LandingFileError,
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
