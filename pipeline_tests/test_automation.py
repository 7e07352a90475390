"""Sensors, schedules, automation conditions and failure policy.

Sensor tests follow dagster's ``project_fully_featured`` pattern: a table of
scenarios, each a landing folder state plus a cursor, asserting the run requests
and the new cursor of one evaluation with ``build_sensor_context``.
"""

import datetime as dt
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import dagster as dg
import polars as pl
import pytest

from pipeline import automation, keys
from pipeline.automation import decode_file_cursor, encode_file_cursor, sensor_interval_seconds
from pipeline.domain.demo_data import generate_fx_ticks
from pipeline.domain.errors import DomainError
from pipeline.partitions import date_partitions, symbol_date_key
from pipeline.policies import MODEL_POOL, domain_errors_are_final, gated_eager, model_retry_policy
from pipeline.resources.lake import LakeResource
from pipeline.resources.landing import LandingResource
from pipeline.settings import SettingsError, ensure_dagster_home, load_settings

T0 = 1_790_000_000_000_000_000  # 2026-09-21T21:33:20Z in ns
T1 = T0 + 3_600 * 10**9
ROWS_A = "policy_id,district\nP1,D001\n"
ROWS_B = "policy_id,district\nP1,D001\nP2,D002\n"
ROWS_C = "policy_id,district\nP1,D009\n"  # same size as ROWS_A, other content


def _sensor(name: str) -> dg.SensorDefinition:
    return next(s for s in automation.build_sensors() if s.name == name)


def _write(folder: Path, name: str, content: str, mtime_ns: int) -> None:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content)
    os.utime(path, ns=(mtime_ns, mtime_ns))


def _sha(content: str) -> str:
    return hashlib.sha256(content.encode()).hexdigest()


def _resources(landing_root: Path, *, settle_s: int = 0, completion: str = "settle") -> dict:
    return {
        "landing": LandingResource(
            path=str(landing_root), settle_s=settle_s, completion=completion
        ),
        "lake": LakeResource(root_uri=str(landing_root.parent / "lake"), service_timeout_s=30),
    }


def _evaluate(
    sensor_name: str,
    landing_root: Path,
    cursor: str | None,
    instance=None,
    *,
    now_s: float | None = None,
    **policy,
) -> dg.SensorResult:
    """One evaluation, through the sensor definition or, given ``now_s``, its function."""
    instance = instance or dg.DagsterInstance.ephemeral()
    resources = _resources(landing_root, **policy)
    context = dg.build_sensor_context(cursor=cursor, instance=instance, resources=resources)
    if now_s is None:
        return _sensor(sensor_name)(context)
    target = automation.LANDING_TARGETS[sensor_name.removesuffix("_landing")]
    return automation.evaluate_landing(
        context, resources["landing"], resources["lake"], target, now_s=now_s
    )


def _rejects(landing_root: Path) -> list[tuple[str, str]]:
    lake = LakeResource(root_uri=str(landing_root.parent / "lake"))
    rows = lake.read("ops", automation.REJECTS_TABLE)
    return sorted(rows.select("file", "reason").rows()) if rows.height else []


def _done(content: str, mtime_ns: int) -> automation.FileState:
    return automation.FileState(mtime_ns, len(content), 0.0, automation.DONE, _sha(content))


@dataclass(frozen=True)
class Scenario:
    """One landing-folder state, one cursor, what one evaluation must request and report."""

    files: dict[str, tuple[str, int]]  # name -> (content, mtime_ns)
    cursor: dict[str, automation.FileState] | None
    requested: dict[str, list[str]]  # partition -> files in the run key
    remembered: list[str] = field(default_factory=list)  # file names in the new cursor
    rejected: dict[str, str] = field(default_factory=dict)  # file -> start of the reason


CLAIMS_SCENARIOS = {
    "empty folder requests nothing": Scenario({}, None, {}, []),
    "new file requests its partition": Scenario(
        {"claims_2026-07.csv": (ROWS_A, T0)},
        None,
        {"2026-07": ["claims_2026-07.csv"]},
        ["claims_2026-07.csv"],
    ),
    "same cursor again requests nothing": Scenario(
        {"claims_2026-07.csv": (ROWS_A, T0)},
        {"claims_2026-07.csv": _done(ROWS_A, T0)},
        {},
        ["claims_2026-07.csv"],
    ),
    "new content with an older mtime (cp -p) re-requests": Scenario(
        {"claims_2026-07.csv": (ROWS_C, T0 - 10**9)},
        {"claims_2026-07.csv": _done(ROWS_A, T0)},
        {"2026-07": ["claims_2026-07.csv"]},
        ["claims_2026-07.csv"],
    ),
    "new size with same mtime re-requests": Scenario(
        {"claims_2026-07.csv": (ROWS_B, T0)},
        {"claims_2026-07.csv": _done(ROWS_A, T0)},
        {"2026-07": ["claims_2026-07.csv"]},
        ["claims_2026-07.csv"],
    ),
    "stray, foreign and abandoned temporary files are reported, not ingested": Scenario(
        {
            ".claims_2026-08.csv.tmp": (ROWS_A, T0),
            "claims_notes.txt": (ROWS_A, T0),
            "fx_ticks_2026-09-01.csv": (ROWS_A, T0),
        },
        None,
        {},
        [".claims_2026-08.csv.tmp", "claims_notes.txt", "fx_ticks_2026-09-01.csv"],
        {
            "claims/.claims_2026-08.csv.tmp": "incomplete: temporary file untouched for 24 h",
            "claims/claims_notes.txt": "unknown name: extension '.txt' is not .csv or .parquet",
            "claims/fx_ticks_2026-09-01.csv": "unknown name: names source 'fx_ticks'",
        },
    ),
    "a resend of one partition is one run": Scenario(
        {"claims_2026-07.csv": (ROWS_A, T0), "claims_2026-07_resend.csv": (ROWS_B, T1)},
        {"claims_2026-07.csv": _done(ROWS_A, T0)},
        {"2026-07": ["claims_2026-07_resend.csv"]},
        ["claims_2026-07.csv", "claims_2026-07_resend.csv"],
    ),
    "two partitions are two runs": Scenario(
        {"claims_2026-07.csv": (ROWS_A, T0), "claims_2026-08.parquet": ("", T0)},
        None,
        {"2026-07": ["claims_2026-07.csv"]},
        ["claims_2026-07.csv", "claims_2026-08.parquet"],
        {"claims/claims_2026-08.parquet": "unreadable: "},
    ),
    "a month outside the partitions is reported and remembered": Scenario(
        {"claims_2025-12.csv": (ROWS_A, T0)},
        None,
        {},
        ["claims_2025-12.csv"],
        {"claims/claims_2025-12.csv": "partition outside the definition: '2025-12'"},
    ),
    "a deleted file leaves the cursor": Scenario(
        {}, {"claims_2026-07.csv": _done(ROWS_A, T0)}, {}, []
    ),
}


@pytest.mark.parametrize("scenario", CLAIMS_SCENARIOS.values(), ids=CLAIMS_SCENARIOS.keys())
def test_claims_landing_sensor(tmp_path: Path, scenario: Scenario) -> None:
    landing = tmp_path / "landing"
    for name, (content, mtime) in scenario.files.items():
        _write(landing / "claims", name, content, mtime)
    cursor = None if scenario.cursor is None else encode_file_cursor(scenario.cursor)

    result = _evaluate("claims_landing", landing, cursor)

    got = {r.partition_key: r.run_key for r in result.run_requests or []}
    expected = {
        pk: f"claims:{pk}:"
        + "+".join(f"{n}#{_sha(scenario.files[n][0])[:16]}" for n in names)
        + ":after@0"
        for pk, names in scenario.requested.items()
    }
    assert got == expected
    for request in result.run_requests or []:
        assert request.asset_selection == [
            keys.BRONZE_CLAIMS,
            keys.CLAIMS_BY_DISTRICT,
            keys.CLAIMS_REDACTED,  # the PII scan of the same month
            keys.PII_DETECTION_LOG,
        ]
        assert request.run_config == automation.INGEST_RUN_CONFIG
        assert request.tags[automation.MAX_RUNTIME_TAG] == str(
            automation.ingest_max_runtime_seconds()
        )
    assert sorted(decode_file_cursor(result.cursor)) == scenario.remembered
    rejects = _rejects(landing)
    assert [f for f, _ in rejects] == sorted(scenario.rejected)
    for file, reason in rejects:
        assert reason.startswith(scenario.rejected[file]), reason
    if not scenario.requested:
        assert result.skip_reason is not None


NEAR_MISSES = {
    "claims-2026-07.csv": "the separator after 'claims' must be '_'",
    "claims.2026-07.csv": "the separator after 'claims' must be '_'",
    "claims_2026-07.CSV": "extension '.CSV' must be lower-case .csv or .parquet",
    "claims_2026-07.csv.gz": "compressed (.gz): deliver uncompressed .csv or .parquet",
    "claims_2026-07.zip": "compressed (.zip)",
    "claims_202607.csv": "no YYYY-MM date right after 'claims_'",
    "claims_07-2026.csv": "no YYYY-MM date right after 'claims_'",
    "claims_2026_07.csv": "no YYYY-MM date right after 'claims_'",
    "Claims_2026-07.csv": "must start with 'claims_' in lower case",
    "payments_2026-07.csv": "does not start with 'claims_'",
    "claims_2026-07-01.csv": "partition outside the definition: '2026-07-01'",
}


def test_near_miss_names_are_reported_once_with_what_is_wrong(tmp_path: Path) -> None:
    landing = tmp_path / "landing"
    for name in NEAR_MISSES:
        _write(landing / "claims", name, ROWS_A, T0)

    first = _evaluate("claims_landing", landing, None)

    assert not first.run_requests
    rows = dict(_rejects(landing))
    assert sorted(rows) == sorted(f"claims/{n}" for n in NEAR_MISSES)
    for name, problem in NEAR_MISSES.items():
        assert problem in rows[f"claims/{name}"], rows[f"claims/{name}"]
        if "outside" not in problem:
            assert "expected claims_<YYYY-MM>[_suffix].csv|parquet" in rows[f"claims/{name}"]
    stored = LakeResource(root_uri=str(tmp_path / "lake")).read("ops", automation.REJECTS_TABLE)
    assert set(stored["source"]) == {"claims"}
    assert stored["detected_at"].null_count() == 0
    assert stored["size"].to_list() == [len(ROWS_A)] * len(NEAR_MISSES)

    # reported once: the next tick remembers them and reports nothing new
    again = _evaluate("claims_landing", landing, first.cursor)
    assert not again.run_requests
    assert len(_rejects(landing)) == len(NEAR_MISSES)


def test_a_file_written_in_place_waits_for_the_settle_interval(tmp_path: Path) -> None:
    landing = tmp_path / "landing"
    now = time.time()
    _write(landing / "claims", "claims_2026-07.csv", ROWS_A, int(now * 1e9))

    early = _evaluate("claims_landing", landing, None, now_s=now + 1, settle_s=30)
    assert not early.run_requests
    assert decode_file_cursor(early.cursor)["claims_2026-07.csv"].status == automation.WAITING

    # the writer appends more rows: the settle interval starts again
    _write(landing / "claims", "claims_2026-07.csv", ROWS_B, int((now + 10) * 1e9))
    growing = _evaluate("claims_landing", landing, early.cursor, now_s=now + 31, settle_s=30)
    assert not growing.run_requests
    state = decode_file_cursor(growing.cursor)["claims_2026-07.csv"]
    assert (state.status, state.first_seen_s) == (automation.WAITING, pytest.approx(now + 31))

    settled = _evaluate("claims_landing", landing, growing.cursor, now_s=now + 62, settle_s=30)
    assert [r.partition_key for r in settled.run_requests] == ["2026-07"]
    assert _sha(ROWS_B)[:16] in settled.run_requests[0].run_key
    assert _rejects(landing) == []


def test_a_parquet_file_is_complete_once_its_footer_is_written(tmp_path: Path) -> None:
    landing = tmp_path / "landing"
    folder = landing / "loan_book"
    folder.mkdir(parents=True)
    whole = tmp_path / "whole.parquet"
    pl.DataFrame({"loan_id": [f"L{i}" for i in range(200)]}).write_parquet(whole)
    payload = whole.read_bytes()
    path = folder / "loan_book_2026-09-30.parquet"
    now = time.time()
    path.write_bytes(payload[: len(payload) // 2])  # a copy in progress

    half = _evaluate("loan_book_landing", landing, None, now_s=now, settle_s=60)
    assert not half.run_requests

    path.write_bytes(payload)
    whole_now = _evaluate("loan_book_landing", landing, half.cursor, now_s=now + 1, settle_s=60)
    assert [r.partition_key for r in whole_now.run_requests] == ["2026-09-30"]

    # a Parquet file that never gets its footer is reported once it has settled
    path.write_bytes(payload[:-3])
    torn = _evaluate("loan_book_landing", landing, whole_now.cursor, now_s=now + 2, settle_s=60)
    assert not torn.run_requests and _rejects(landing) == []
    later = _evaluate("loan_book_landing", landing, torn.cursor, now_s=now + 70, settle_s=60)
    assert not later.run_requests
    (reject,) = _rejects(landing)
    assert reject[0] == "loan_book/loan_book_2026-09-30.parquet"
    assert reject[1].startswith("unreadable: ")


def test_in_marker_mode_a_file_waits_for_its_done_marker(tmp_path: Path) -> None:
    landing = tmp_path / "landing"
    _write(landing / "claims", "claims_2026-07.csv", ROWS_A, T0)  # old, but no marker yet
    waiting = _evaluate("claims_landing", landing, None, completion="marker")
    assert not waiting.run_requests
    _write(landing / "claims", "claims_2026-07.csv.done", "", T1)
    marked = _evaluate("claims_landing", landing, waiting.cursor, completion="marker")
    assert [r.partition_key for r in marked.run_requests] == ["2026-07"]
    assert list(decode_file_cursor(marked.cursor)) == ["claims_2026-07.csv"]
    # a marker whose file is gone is reported
    (landing / "claims" / "claims_2026-07.csv").unlink()
    orphan = _evaluate("claims_landing", landing, marked.cursor, completion="marker")
    assert not orphan.run_requests
    assert _rejects(landing) == [
        ("claims/claims_2026-07.csv.done", "incomplete: completion marker without its file")
    ]


def test_replaying_the_new_cursor_requests_nothing(tmp_path: Path) -> None:
    landing = tmp_path / "landing"
    _write(landing / "loan_scenarios", "loan_scenarios_2026-09-30.csv", ROWS_A, T0)
    _write(landing / "loan_scenarios", "loan_scenarios_2026-10-31.csv", ROWS_B, T0)
    first = _evaluate("loan_scenarios_landing", landing, None)
    assert sorted(r.partition_key for r in first.run_requests) == ["2026-09-30", "2026-10-31"]
    assert all(
        r.asset_selection == [keys.BRONZE_LOAN_SCENARIOS, keys.LOAN_SCENARIOS]
        for r in first.run_requests
    )

    again = _evaluate("loan_scenarios_landing", landing, first.cursor)
    assert not again.run_requests
    assert again.cursor == first.cursor

    # a lost cursor yields byte-identical run keys, which Dagster de-duplicates
    replay = _evaluate("loan_scenarios_landing", landing, None)
    assert [r.run_key for r in replay.run_requests] == [r.run_key for r in first.run_requests]


def test_a_cursor_of_the_previous_version_counts_its_files_as_handled(tmp_path: Path) -> None:
    landing = tmp_path / "landing"
    _write(landing / "claims", "claims_2026-07.csv", ROWS_A, T0)
    legacy = json.dumps({"claims_2026-07.csv": [T0, len(ROWS_A)]})
    result = _evaluate("claims_landing", landing, legacy)
    assert not result.run_requests
    assert decode_file_cursor(result.cursor)["claims_2026-07.csv"].status == automation.DONE


def test_corrupt_cursor_is_an_error_not_a_rescan(tmp_path: Path) -> None:
    with pytest.raises(automation.SensorCursorError, match="not a JSON object"):
        _evaluate("claims_landing", tmp_path / "landing", "[1, 2")


# --- content hashes against what bronze read -------------------------------------------------

CLAIMS_HEADER = "policy_id,district,valuation_month,exposure,claim_count\n"


def _claims_rows(n: int, district: str = "D1") -> str:
    return CLAIMS_HEADER + "".join(f"P{i},{district},2026-07,0.5,0\n" for i in range(n))


def test_content_bronze_already_read_is_not_requested_again(platform) -> None:
    """After ``make demo`` the UI's sensors start with no cursor: nothing is redone."""
    landing = platform.settings.landing_dir
    _write(landing / "claims", "claims_2026-07.csv", _claims_rows(3), T0)
    assert platform.materialize([keys.BRONZE_CLAIMS], "2026-07").success
    resources = {**platform.resources, "landing": LandingResource(path=str(landing), settle_s=0)}
    context = dg.build_sensor_context(instance=platform.instance, resources=resources)
    target = automation.LANDING_TARGETS["claims"]

    skipped = automation.evaluate_landing(
        context, resources["landing"], platform.lake, target, now_s=time.time()
    )
    assert not skipped.run_requests

    # a corrected re-delivery copied with its older modification time (cp -p)
    _write(landing / "claims", "claims_2026-07.csv", _claims_rows(3, "D2"), T0 - 10**9)
    context = dg.build_sensor_context(
        instance=platform.instance, resources=resources, cursor=skipped.cursor
    )
    corrected = automation.evaluate_landing(
        context, resources["landing"], platform.lake, target, now_s=time.time()
    )
    assert [r.partition_key for r in corrected.run_requests] == ["2026-07"]
    bronze = latest_bronze(platform.instance, "2026-07")
    assert corrected.run_requests[0].run_key.endswith(f":after@{bronze.storage_id}")


def test_a_file_that_grew_while_its_run_read_it_is_ingested_again(platform) -> None:
    landing = platform.settings.landing_dir
    path = landing / "claims" / "claims_2026-07.csv"
    _write(landing / "claims", path.name, _claims_rows(2), T0)
    resources = {**platform.resources, "landing": LandingResource(path=str(landing), settle_s=0)}
    target = automation.LANDING_TARGETS["claims"]

    def tick(cursor: str | None) -> dg.SensorResult:
        context = dg.build_sensor_context(
            instance=platform.instance, resources=resources, cursor=cursor
        )
        return automation.evaluate_landing(
            context, resources["landing"], platform.lake, target, now_s=time.time()
        )

    first = tick(None)
    assert len(first.run_requests) == 1
    # the run reads the file while the writer is still appending: it sees 5 rows
    _write(landing / "claims", path.name, _claims_rows(5), T0 + 10**9)
    assert platform.materialize([keys.BRONZE_CLAIMS], "2026-07").success
    # the writer finishes: 8 rows. The next tick sees new content, not "already ingested"
    _write(landing / "claims", path.name, _claims_rows(8), T0 + 2 * 10**9)
    second = tick(first.cursor)
    assert [r.partition_key for r in second.run_requests] == ["2026-07"]
    assert second.run_requests[0].run_key != first.run_requests[0].run_key
    # once bronze holds the whole file, the same content is not requested again
    assert platform.materialize([keys.BRONZE_CLAIMS], "2026-07").success
    assert not tick(None).run_requests
    assert platform.lake.read("bronze", "claims").height == 8


def latest_bronze(instance: dg.DagsterInstance, partition: str) -> dg.EventLogRecord:
    record = automation.latest_materialization(instance, keys.BRONZE_CLAIMS, partition)
    assert record is not None
    return record


# --- FX: symbols become dynamic partitions -------------------------------------------

FX_SYMBOLS = {"EUR/USD": (1.08, 0.8), "usd/jpy": (150.0, 1.0), "../etc": (1.0, 1.0)}


def _write_fx(landing_root: Path, date: str, symbols=FX_SYMBOLS) -> Path:
    ticks, _ = generate_fx_ticks(date, ticks_per_symbol=40, symbols=symbols)
    path = landing_root / "fx_ticks" / f"fx_ticks_{date}.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    ticks.write_parquet(path)
    return path


def _added_symbols(result: dg.SensorResult) -> list[str]:
    return [k for r in result.dynamic_partitions_requests for k in r.partition_keys]


def test_fx_landing_registers_new_symbols_and_skips_invalid_ones(tmp_path: Path) -> None:
    landing = tmp_path / "landing"
    _write_fx(landing, "2026-09-01")
    instance = dg.DagsterInstance.ephemeral()

    result = _evaluate("fx_ticks_landing", landing, None, instance)

    assert _added_symbols(result) == ["EURUSD", "USDJPY"]  # "../etc" is not a partition key
    assert [(r.partition_key, r.asset_selection) for r in result.run_requests] == [
        ("2026-09-01", [keys.BRONZE_FX_TICKS])
    ]


def test_fx_landing_adds_only_unknown_symbols(tmp_path: Path) -> None:
    landing = tmp_path / "landing"
    _write_fx(landing, "2026-09-02")
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("symbol", ["EURUSD"])

    result = _evaluate("fx_ticks_landing", landing, None, instance)

    assert _added_symbols(result) == ["USDJPY"]
    assert len(result.run_requests) == 1


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"", "file is empty (0 bytes)"),
        (b"PAR1 truncated", "cannot be parsed"),
        (b"not,a,tick\n1,2,3\n", "cannot be parsed"),
    ],
    ids=["empty", "corrupt", "csv"],
)
def test_an_unreadable_tick_file_is_reported_not_requested(
    tmp_path: Path, content: bytes, problem: str
) -> None:
    landing = tmp_path / "landing"
    folder = landing / "fx_ticks"
    folder.mkdir(parents=True)
    (folder / "fx_ticks_2026-09-03.parquet").write_bytes(content)

    result = _evaluate("fx_ticks_landing", landing, None)

    assert not result.run_requests
    assert _added_symbols(result) == []
    ((file, reason),) = _rejects(landing)
    assert file == "fx_ticks/fx_ticks_2026-09-03.parquet"
    assert reason.startswith("unreadable: ") and problem in reason, reason


def test_fx_spreads_follow_bronze_days_whose_gate_passed(platform) -> None:
    date = "2026-09-01"
    _write_fx(platform.settings.landing_dir, date)
    bronze_run = platform.materialize([keys.BRONZE_FX_TICKS], partition_key=date)
    assert bronze_run.success
    context = dg.build_sensor_context(
        instance=platform.instance, resources={"lake": platform.lake}, cursor=None
    )

    result = _sensor("fx_spreads_from_bronze")(context)

    assert sorted(str(r.partition_key) for r in result.run_requests) == [
        f"{date}|EURUSD",
        f"{date}|USDJPY",
    ]
    assert all(r.asset_selection == [keys.FX_SPREADS] for r in result.run_requests)
    assert _added_symbols(result) == ["EURUSD", "USDJPY"]

    # the same cursor again: nothing new
    again = _sensor("fx_spreads_from_bronze")(
        dg.build_sensor_context(
            instance=platform.instance, resources={"lake": platform.lake}, cursor=result.cursor
        )
    )
    assert not again.run_requests

    # a partition curated after this bronze version is not requested again
    platform.instance.add_dynamic_partitions("symbol", ["EURUSD", "USDJPY"])
    assert platform.materialize([keys.FX_SPREADS], symbol_date_key("EURUSD", date)).success
    rescan = _sensor("fx_spreads_from_bronze")(
        dg.build_sensor_context(
            instance=platform.instance, resources={"lake": platform.lake}, cursor=None
        )
    )
    assert [str(r.partition_key) for r in rescan.run_requests] == [f"{date}|USDJPY"]


def test_fx_spreads_not_requested_when_bronze_gate_failed(tmp_path: Path) -> None:
    @dg.asset(key=keys.BRONZE_FX_TICKS, partitions_def=date_partitions)
    def bronze_stand_in() -> None:
        return None

    @dg.asset_check(
        asset=keys.BRONZE_FX_TICKS,
        name=keys.CHECK_FILE_SCHEMA,
        partitions_def=date_partitions,
        blocking=True,
    )
    def schema_fails() -> dg.AssetCheckResult:
        return dg.AssetCheckResult(passed=False, description="missing column ask")

    instance = dg.DagsterInstance.ephemeral()
    run = dg.materialize(
        [bronze_stand_in, schema_fails],
        partition_key="2026-09-01",
        instance=instance,
        raise_on_error=False,
    )
    assert not run.success  # the blocking check failed the run
    record = instance.fetch_materializations(keys.BRONZE_FX_TICKS, limit=1).records[0]

    from pipeline.resources.lake import LakeResource

    result = _sensor("fx_spreads_from_bronze")(
        dg.build_sensor_context(
            instance=instance,
            resources={"lake": LakeResource(root_uri=str(tmp_path / "lake"))},
        )
    )
    assert not result.run_requests
    assert result.cursor == str(record.storage_id)  # handled: not looked at again
    status, reason = automation.bronze_gate_status(instance, record, automation.BRONZE_FX_GATE)
    assert status == "failed"
    assert f"{keys.CHECK_FILE_SCHEMA} failed for partition 2026-09-01" in reason
    assert "missing column ask" in reason


def test_fx_spreads_wait_while_the_bronze_run_is_going(tmp_path: Path) -> None:
    @dg.asset(key=keys.BRONZE_FX_TICKS, partitions_def=date_partitions)
    def bronze_stand_in() -> None:
        return None

    instance = dg.DagsterInstance.ephemeral()
    assert dg.materialize([bronze_stand_in], partition_key="2026-09-01", instance=instance).success
    record = instance.fetch_materializations(keys.BRONZE_FX_TICKS, limit=1).records[0]
    # the run is reported as still going: its checks may not have run yet
    instance.report_run_canceling(instance.get_run_by_id(record.run_id))

    from pipeline.resources.lake import LakeResource

    result = _sensor("fx_spreads_from_bronze")(
        dg.build_sensor_context(
            instance=instance,
            resources={"lake": LakeResource(root_uri=str(tmp_path / "lake"))},
        )
    )
    assert not result.run_requests
    assert result.cursor is None  # the record is looked at again next tick
    status, reason = automation.bronze_gate_status(instance, record, automation.BRONZE_FX_GATE)
    assert status == "pending", reason


# --- automation conditions --------------------------------------------------------------


def test_gated_eager_waits_for_upstream_blocking_checks() -> None:
    verdict = {"passed": False}

    @dg.asset
    def upstream() -> None:
        return None

    @dg.asset_check(asset=upstream, blocking=True)
    def upstream_is_valid() -> dg.AssetCheckResult:
        return dg.AssetCheckResult(passed=verdict["passed"])

    @dg.asset(deps=[upstream], automation_condition=gated_eager())
    def gated_model() -> None:
        return None

    @dg.asset(deps=[upstream], automation_condition=dg.AutomationCondition.eager())
    def ungated_model() -> None:
        return None

    defs = dg.Definitions(
        assets=[upstream, gated_model, ungated_model], asset_checks=[upstream_is_valid]
    )
    instance = dg.DagsterInstance.ephemeral()
    tick = dg.evaluate_automation_conditions(defs=defs, instance=instance)
    assert tick.total_requested == 0  # upstream never materialised

    failed = dg.materialize([upstream, upstream_is_valid], instance=instance, raise_on_error=False)
    assert not failed.success
    tick = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=tick.cursor)
    assert tick.get_num_requested(gated_model.key) == 0
    assert tick.get_num_requested(ungated_model.key) == 1  # plain eager() would run it

    verdict["passed"] = True
    assert dg.materialize([upstream, upstream_is_valid], instance=instance).success
    tick = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=tick.cursor)
    assert tick.get_num_requested(gated_model.key) == 1


def _labels(condition: dg.AutomationCondition) -> set[str]:
    found = {condition.get_label() or condition.name}
    for child in condition.children:
        found |= _labels(child)
    return found


def test_gated_assets_of_the_graph_wait_for_blocking_checks() -> None:
    from pipeline.definitions import defs

    graph = defs.resolve_asset_graph()
    assert "all_deps_blocking_checks_passed" in _labels(gated_eager())
    for key in (keys.CREDIBILITY_TABLE, keys.FX_CHAMPION_MODEL):
        condition = graph.get(key).automation_condition
        assert condition is not None, key
        assert {"eager", "all_deps_blocking_checks_passed"} <= _labels(condition), key


# --- failure policy -------------------------------------------------------------------


def test_retry_delays_follow_exponential_backoff_with_jitter() -> None:
    for attempt, (low, high) in {1: (0, 10), 2: (10, 20), 3: (30, 40)}.items():
        delays = [model_retry_policy.calculate_delay(attempt) for _ in range(200)]
        assert low <= min(delays) and max(delays) <= high, (attempt, min(delays), max(delays))
        assert max(delays) - min(delays) > 5  # jitter spreads the retries
    assert model_retry_policy.max_retries == 3


def test_domain_errors_fail_once_under_the_retry_policy() -> None:
    @dg.asset(retry_policy=model_retry_policy)
    def diverging_model() -> None:
        with domain_errors_are_final():
            raise DomainError("partition 2026-07: R-hat 1.12 above bound 1.01")

    result = dg.materialize(
        [diverging_model], instance=dg.DagsterInstance.ephemeral(), raise_on_error=False
    )
    assert not result.success
    kinds = [e.event_type_value for e in result.all_events]
    assert "STEP_UP_FOR_RETRY" not in kinds
    (failure,) = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    assert "R-hat 1.12 above bound 1.01" in str(failure.event_specific_data.error)


def test_transient_errors_are_left_to_the_retry_policy() -> None:
    with pytest.raises(ConnectionError, match="mlflow"), domain_errors_are_final():
        raise ConnectionError("mlflow tracking server unreachable")


def test_model_pool_limit_from_dagster_yaml(tmp_path: Path) -> None:
    home = ensure_dagster_home(load_settings({"PIPELINE_HOME": str(tmp_path)}))
    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert instance.get_concurrency_config().pool_config.default_pool_limit == 1
        assert instance.event_log_storage.supports_global_concurrency_limits
        instance.event_log_storage.initialize_concurrency_limit_to_default(MODEL_POOL)
        assert instance.event_log_storage.get_concurrency_info(MODEL_POOL).slot_count == 1


# --- knobs, schedules and wiring ------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"), [(None, 30), ("", 30), ("2", 2), (" 45 ", 45), ("86400", 86400)]
)
def test_sensor_interval_from_environment(raw: str | None, expected: int) -> None:
    env = {} if raw is None else {automation.SENSOR_INTERVAL_ENV: raw}
    assert sensor_interval_seconds(env) == expected


@pytest.mark.parametrize("raw", ["0", "-5", "1.5", "soon", "86401"])
def test_sensor_interval_rejects_nonsense(raw: str) -> None:
    with pytest.raises(SettingsError, match=automation.SENSOR_INTERVAL_ENV):
        sensor_interval_seconds({automation.SENSOR_INTERVAL_ENV: raw})


@pytest.mark.parametrize(
    ("schedule_name", "tick", "expected"),
    [
        (
            "credibility_monthly_schedule",
            dt.datetime(2026, 11, 5, 6, tzinfo=dt.UTC),
            ["2026-10"],
        ),
        (
            # USDJPY has no curated ticks that day: skipped, not launched into a failure
            "fx_scoring_daily_schedule",
            dt.datetime(2026, 9, 3, 6, tzinfo=dt.UTC),
            ["2026-09-02|EURUSD", "2026-09-02|GBPUSD"],
        ),
    ],
)
def test_schedules_request_the_partition_that_closed(
    tmp_path: Path, schedule_name: str, tick: dt.datetime, expected: list[str]
) -> None:
    from pipeline.definitions import defs

    repository = defs.get_repository_def()
    schedule = repository.get_schedule_def(schedule_name)
    assert schedule.default_status == dg.DefaultScheduleStatus.RUNNING
    # a persistent instance: schedules read dynamic partitions only through an instance ref
    home = ensure_dagster_home(load_settings({"PIPELINE_HOME": str(tmp_path)}))
    with dg.DagsterInstance.from_config(str(home)) as instance:
        instance.add_dynamic_partitions("symbol", ["USDJPY", "EURUSD", "GBPUSD"])
        lake = LakeResource(root_uri=str(tmp_path / "lake"))
        for symbol, date in (
            ("EURUSD", "2026-09-02"),
            ("GBPUSD", "2026-09-02"),
            ("USDJPY", "2026-09-01"),
        ):
            lake.overwrite_partition(
                "curated",
                "fx_spreads",
                pl.DataFrame({"symbol": [symbol], "date": [date], "spread": [1e-4]}),
                {"symbol": symbol, "date": date},
            )
        # closed before the instance: a context collected later would reset dagster's
        # current defs-state storage to this (then disposed) instance's
        with dg.build_schedule_context(
            instance=instance,
            scheduled_execution_time=tick,
            repository_def=repository,
            resources={"lake": lake},
        ) as context:
            requests = schedule.evaluate_tick(context).run_requests
    assert sorted(str(r.partition_key) for r in requests) == expected


def test_fx_daily_schedule_skips_a_day_without_ticks(tmp_path: Path) -> None:
    from pipeline.definitions import defs

    repository = defs.get_repository_def()
    schedule = repository.get_schedule_def("fx_scoring_daily_schedule")
    home = ensure_dagster_home(load_settings({"PIPELINE_HOME": str(tmp_path)}))
    with dg.DagsterInstance.from_config(str(home)) as instance:
        instance.add_dynamic_partitions("symbol", ["EURUSD"])
        with dg.build_schedule_context(
            instance=instance,
            scheduled_execution_time=dt.datetime(2026, 9, 3, 6, tzinfo=dt.UTC),
            repository_def=repository,
            resources={"lake": LakeResource(root_uri=str(tmp_path / "lake"))},
        ) as context:
            result = schedule.evaluate_tick(context)
    assert not result.run_requests
    assert "no curated fx_spreads for 2026-09-02 among 1 symbols" in result.skip_message


def test_definitions_wire_every_sensor_running() -> None:
    from pipeline.definitions import defs

    repository = defs.get_repository_def()
    sensors = {s.name: s for s in repository.sensor_defs}
    expected = {
        "claims_landing",
        "fx_ticks_landing",
        "fx_incidents_landing",
        "loan_book_landing",
        "loan_scenarios_landing",
        "fx_spreads_from_bronze",
        "automation",
    }
    assert expected <= set(sensors)
    for name in expected:
        assert sensors[name].default_status == dg.DefaultSensorStatus.RUNNING, name
    assert sensors["claims_landing"].minimum_interval_seconds == sensor_interval_seconds()


def test_read_landing_symbols_reads_csv_and_parquet(tmp_path: Path) -> None:
    frame = pl.DataFrame({"symbol": ["EUR/USD", "EUR/USD", None, "gbp-usd"], "bid": [1, 2, 3, 4]})
    (tmp_path / "fx_ticks").mkdir()
    frame.write_parquet(tmp_path / "fx_ticks" / "fx_ticks_2026-09-01.parquet")
    frame.write_csv(tmp_path / "fx_ticks" / "fx_ticks_2026-09-02.csv")
    landing = LandingResource(path=str(tmp_path))
    files = landing.files("fx_ticks")
    assert [f.name for f in files] == ["fx_ticks_2026-09-01.parquet", "fx_ticks_2026-09-02.csv"]
    for file in files:
        assert automation.read_landing_symbols(landing, file) == ["EUR/USD", "gbp-usd"]
