"""Sensors, schedules, automation conditions, retry policies and pools.

How work is triggered, in one place:

* **Landing sensors** (one per source) watch ``$PIPELINE_HOME/landing/<source>``.
  A file is *new or changed* when its ``(mtime_ns, size)`` differs from what the
  sensor's cursor remembers, and a run is requested only for the partition named
  in the file name. Claims and loan files share a partitions definition with
  their curated table, so one run ingests bronze and publishes curated, with the
  checks in between. FX tick files register their symbols as dynamic partitions
  and request the bronze day only: ``curated/fx_spreads`` is partitioned by
  symbol × date, and Dagster cannot put two partitions definitions in one run.
* **fx_spreads_from_bronze** follows the bronze FX day: once a bronze partition
  has been materialised *and its blocking checks passed in that run*, it requests
  each ``(symbol, date)`` partition of ``curated/fx_spreads`` present in that day.
  Requesting both from the landing sensor would race (the curated run can start
  before bronze is written) and would bypass the bronze gate.
* **automation** is the declarative-automation sensor: it evaluates every asset's
  ``automation_condition`` (e.g. :func:`gated_eager` on model assets).
* **Schedules**: the credibility model monthly (for the month that closed), FX
  scoring and monitoring daily (for yesterday, every registered symbol). Both are
  built from the targets' partitions, so a schedule tick names its partition.

Sensors and schedules are ``RUNNING`` by default: ``dagster dev`` (``make dev``) picks up
drops without a click, which is also what the end-to-end test relies on. They
skip partitions that were already ingested after the file last changed, so
starting the UI after ``make demo`` does not redo the demo's work.
"""

import datetime as dt
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from dagster import (
    AssetKey,
    AssetRecordsFilter,
    AssetSelection,
    AutomationConditionSensorDefinition,
    DagsterInstance,
    DefaultScheduleStatus,
    DefaultSensorStatus,
    EventLogRecord,
    PartitionsDefinition,
    RunRequest,
    ScheduleEvaluationContext,
    SensorDefinition,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    build_schedule_from_partitioned_job,
    define_asset_job,
    schedule,
    sensor,
)

from pipeline import keys
from pipeline.dagster_private import latest_check_records
from pipeline.domain.contracts import try_normalise_symbol
from pipeline.domain.landing import LandingFileError
from pipeline.gates import check_record_failures
from pipeline.partitions import symbol_date_key, symbol_partitions
from pipeline.policies import INGEST_RUN_CONFIG
from pipeline.resources.lake import LakeResource
from pipeline.resources.landing import LandingFile, LandingResource
from pipeline.settings import SettingsError
from pipeline.stores.sources import SOURCES, bronze_symbols

# --- knobs ---------------------------------------------------------------------------

SENSOR_INTERVAL_ENV = "PIPELINE_SENSOR_INTERVAL_S"
DEFAULT_SENSOR_INTERVAL_S = 30


def sensor_interval_seconds(environ: Mapping[str, str] | None = None) -> int:
    """Minimum seconds between two evaluations of the landing and fx_spreads sensors.

    ``PIPELINE_SENSOR_INTERVAL_S`` (default 30) lets tests and demos react faster
    without changing code. The automation sensor keeps 30 s: it evaluates the
    whole graph, and model work is not latency-bound.

    Raises
    ------
    SettingsError
        When the variable is not a whole number of seconds between 1 and 86400.
    """
    env = os.environ if environ is None else environ
    raw = env.get(SENSOR_INTERVAL_ENV, "").strip()
    if not raw:
        return DEFAULT_SENSOR_INTERVAL_S
    if not raw.isdigit() or not 1 <= int(raw) <= 86_400:
        raise SettingsError(f"{SENSOR_INTERVAL_ENV}={raw!r} is not a whole number in [1, 86400]")
    return int(raw)


# --- landing sensors -----------------------------------------------------------------

FileSignature = tuple[int, int]


class SensorCursorError(ValueError):
    """A sensor cursor cannot be decoded (written by an incompatible version)."""


def decode_file_cursor(cursor: str | None) -> dict[str, FileSignature]:
    """Decode a landing cursor: file name -> ``(mtime_ns, size)``.

    Raises
    ------
    SensorCursorError
        When the cursor is not the JSON object this module writes.
    """
    if not cursor:
        return {}
    try:
        raw = json.loads(cursor)
        return {str(name): (int(sig[0]), int(sig[1])) for name, sig in raw.items()}
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
        raise SensorCursorError(
            f"landing sensor cursor {cursor[:200]!r} is not a JSON object of "
            f"file name -> [mtime_ns, size]; reset the cursor in the UI"
        ) from exc


def encode_file_cursor(files: Mapping[str, FileSignature]) -> str:
    """Encode a landing cursor deterministically (sorted keys, no spaces)."""
    return json.dumps(
        {name: list(sig) for name, sig in sorted(files.items())}, separators=(",", ":")
    )


def scan_landing(landing: LandingResource, source: str) -> dict[str, LandingFile]:
    """The delivered files of ``source``, by name.

    Only names that name a partition of ``source``
    (:func:`~pipeline.domain.landing.partition_key_of`) count, so temporary
    ``.name.tmp`` files of a drop in progress and stray files are never ingested.
    """
    return {f.name: f for f in landing.files(source) if f.partition_key is not None}


def landing_run_key(source: str, partition_key: str, files: Mapping[str, FileSignature]) -> str:
    """Run key of one ingestion: the source, partition and every changed file's signature.

    The same delivery always yields the same key, so Dagster itself drops a
    duplicate request even if a cursor is lost or reset.
    """
    parts = [f"{name}@{mtime}:{size}" for name, (mtime, size) in sorted(files.items())]
    return f"{source}:{partition_key}:" + "+".join(parts)


def read_landing_symbols(landing: LandingResource, file: LandingFile) -> list[str]:
    """Distinct raw ``symbol`` values of one FX tick file."""
    frame = landing.read_as_text(file)
    if "symbol" not in frame.columns:
        raise LandingFileError(f"{file.relative}: no symbol column")
    return sorted({str(v) for v in frame["symbol"].drop_nulls().unique().to_list()})


def _symbols_or_log(
    context: SensorEvaluationContext, landing: LandingResource, file: LandingFile
) -> list[str]:
    """Raw symbols of a tick file; an unreadable file is logged and ingested anyway.

    The bronze run still goes ahead: it fails with the file and the problem in
    its message, visible in the UI, instead of every sensor tick erroring.
    """
    try:
        return read_landing_symbols(landing, file)
    except LandingFileError as exc:
        context.log.warning(
            f"fx_ticks: cannot read the symbols of {file.name} ({exc}); "
            "its bronze run will report the problem"
        )
        return []


def normalise_symbols(raw: Iterable[str]) -> tuple[list[str], list[str]]:
    """Split raw symbols into ``(valid partition keys, invalid raw values)``."""
    valid, invalid = set(), set()
    for value in raw:
        symbol = try_normalise_symbol(value)
        if symbol is None:
            invalid.add(value)
        else:
            valid.add(symbol)
    return sorted(valid), sorted(invalid)


def latest_materialization(
    instance: DagsterInstance, asset_key: AssetKey, partition_key: str
) -> EventLogRecord | None:
    """The newest materialisation record of one asset partition, if any."""
    records = instance.fetch_materializations(
        AssetRecordsFilter(asset_key=asset_key, asset_partitions=[partition_key]), limit=1
    ).records
    return records[0] if records else None


@dataclass(frozen=True)
class LandingTarget:
    """What a landing sensor requests for one source."""

    source: str
    bronze: AssetKey
    curated: AssetKey | None  # None when curated has another partitions definition
    partitions_def: PartitionsDefinition

    @property
    def assets(self) -> list[AssetKey]:
        """Assets materialised by one run of this source."""
        return [self.bronze] if self.curated is None else [self.bronze, self.curated]


LANDING_TARGETS = {
    "claims": LandingTarget(
        "claims", keys.BRONZE_CLAIMS, keys.CLAIMS_BY_DISTRICT, SOURCES["claims"].partitions_def
    ),
    "fx_ticks": LandingTarget(
        "fx_ticks", keys.BRONZE_FX_TICKS, None, SOURCES["fx_ticks"].partitions_def
    ),
    "loan_book": LandingTarget(
        "loan_book", keys.BRONZE_LOAN_BOOK, keys.LOAN_BOOK, SOURCES["loan_book"].partitions_def
    ),
    "loan_scenarios": LandingTarget(
        "loan_scenarios",
        keys.BRONZE_LOAN_SCENARIOS,
        keys.LOAN_SCENARIOS,
        SOURCES["loan_scenarios"].partitions_def,
    ),
}


def evaluate_landing(
    context: SensorEvaluationContext, landing: LandingResource, target: LandingTarget
) -> SensorResult:
    """One evaluation of a landing sensor (see :func:`build_landing_sensor`)."""
    seen = decode_file_cursor(context.cursor)
    found = scan_landing(landing, target.source)
    current = {name: (f.mtime_ns, f.size) for name, f in found.items()}
    changed = {name: sig for name, sig in current.items() if seen.get(name) != sig}
    next_cursor = dict(current)

    by_partition: dict[str, dict[str, FileSignature]] = {}
    for name, sig in sorted(changed.items()):
        partition_key = found[name].partition_key or ""
        if not target.partitions_def.has_partition_key(partition_key):
            # Not remembered: once the partition exists (a future date), it is picked up.
            context.log.warning(
                f"{target.source}: {name} names partition {partition_key!r}, which is not a "
                f"partition of {target.bronze.to_user_string()}; not ingested yet"
            )
            next_cursor.pop(name)
            continue
        by_partition.setdefault(partition_key, {})[name] = sig

    run_requests: list[RunRequest] = []
    raw_symbols: set[str] = set()
    for partition_key, files in sorted(by_partition.items()):
        newest_ns = max(mtime for mtime, _ in files.values())
        ingested = latest_materialization(context.instance, target.bronze, partition_key)
        if ingested is not None and ingested.timestamp * 1e9 > newest_ns:
            context.log.info(
                f"{target.source} {partition_key}: already ingested by run {ingested.run_id} "
                f"after {', '.join(sorted(files))} last changed"
            )
            continue
        if target.source == "fx_ticks":
            for name in files:
                raw_symbols.update(_symbols_or_log(context, landing, found[name]))
        run_requests.append(
            RunRequest(
                run_key=landing_run_key(target.source, partition_key, files),
                asset_selection=target.assets,
                partition_key=partition_key,
                run_config=INGEST_RUN_CONFIG,
                tags={"pipeline/trigger": f"landing:{target.source}"},
            )
        )

    partition_requests = []
    if raw_symbols:
        valid, invalid = normalise_symbols(raw_symbols)
        if invalid:
            context.log.warning(
                f"fx_ticks: symbols {invalid} do not normalise to [A-Z0-9]{{3,12}}; not "
                f"registered (their rows are quarantined when the day is curated)"
            )
        known = set(context.instance.get_dynamic_partitions(symbol_partitions.name))
        new = [s for s in valid if s not in known]
        if new:
            context.log.info(f"fx_ticks: registering new symbols {new}")
            partition_requests.append(symbol_partitions.build_add_request(new))

    cursor = encode_file_cursor(next_cursor)
    if not run_requests and not partition_requests:
        return SensorResult(
            skip_reason=SkipReason(f"no new or changed {target.source} files to ingest"),
            cursor=cursor,
        )
    return SensorResult(
        run_requests=run_requests,
        dynamic_partitions_requests=partition_requests,
        cursor=cursor,
    )


def build_landing_sensor(target: LandingTarget, interval_s: int) -> SensorDefinition:
    """A cursor-based sensor over one landing folder.

    Each new or changed file requests one run of its partition, keyed by
    :func:`landing_run_key`. Re-evaluating with the same cursor requests nothing.
    """

    @sensor(
        name=f"{target.source}_landing",
        target=AssetSelection.assets(*target.assets),
        minimum_interval_seconds=interval_s,
        default_status=DefaultSensorStatus.RUNNING,
        description=(
            f"Ingests new or changed files under landing/{target.source}: "
            + ", ".join(k.to_user_string() for k in target.assets)
            + " for the partition named in the file name."
        ),
    )
    def landing_sensor(context: SensorEvaluationContext, landing: LandingResource) -> SensorResult:
        return evaluate_landing(context, landing, target)

    return landing_sensor


# --- fx_spreads follows bronze FX days ----------------------------------------------

BRONZE_FX_GATE = (keys.CHECK_FILE_SCHEMA,)


def bronze_gate_status(
    instance: DagsterInstance, record: EventLogRecord, check_names: Iterable[str]
) -> tuple[str, str]:
    """Whether the blocking checks passed on the run that wrote ``record``.

    The verdict is read as :func:`pipeline.gates.check_record_failures`
    reads it for the model guards (including results of partition-range runs),
    but only once the run that wrote the partition has finished, and only from
    evaluations made in that run: a pass left by an earlier delivery must not
    open the gate for a new one.

    Returns
    -------
    tuple of (status, reason)
        ``status`` is ``"passed"``, ``"failed"`` or ``"pending"`` (the run is still
        going, so its checks may not have been evaluated yet).
    """
    partition_key = str(record.partition_key)
    run = instance.get_run_by_id(record.run_id)
    if run is not None and not run.is_finished:
        return "pending", f"run {record.run_id} that wrote {partition_key} is {run.status.value}"
    check_names = tuple(check_names)
    check_keys = [keys.check_key(keys.BRONZE_FX_TICKS, name) for name in check_names]
    latest = latest_check_records(instance, check_keys, partition_key)
    elsewhere = [
        k.name for k in check_keys if (r := latest.get(k)) is None or r.run_id != record.run_id
    ]
    if elsewhere:
        return "failed", (
            f"{', '.join(elsewhere)} not evaluated on {partition_key} in run {record.run_id}"
        )
    failures = check_record_failures(instance, keys.BRONZE_FX_TICKS, check_names, partition_key)
    if failures:
        return "failed", "; ".join(failures)
    return "passed", f"{', '.join(check_names)} passed on {partition_key} in run {record.run_id}"


def evaluate_fx_spreads(context: SensorEvaluationContext, lake: LakeResource) -> SensorResult:
    """One evaluation of :data:`fx_spreads_sensor`."""
    after = int(context.cursor) if context.cursor else None
    records = context.instance.fetch_materializations(
        AssetRecordsFilter(asset_key=keys.BRONZE_FX_TICKS, after_storage_id=after),
        limit=100,
        ascending=True,
    ).records
    cursor = after
    latest_by_date: dict[str, EventLogRecord] = {}
    for record in records:
        status, reason = bronze_gate_status(context.instance, record, BRONZE_FX_GATE)
        if status == "pending":
            context.log.info(f"bronze fx_ticks {record.partition_key}: waiting, {reason}")
            break  # keep the cursor before this record and look again next tick
        cursor = record.storage_id
        if status == "failed":
            context.log.warning(f"bronze fx_ticks {record.partition_key}: gate closed, {reason}")
            latest_by_date.pop(str(record.partition_key), None)
            continue
        latest_by_date[str(record.partition_key)] = record

    run_requests: list[RunRequest] = []
    all_symbols: set[str] = set()
    for date, record in sorted(latest_by_date.items()):
        symbols, invalid = normalise_symbols(bronze_symbols(lake, date))
        if invalid:
            context.log.warning(f"fx_ticks {date}: invalid symbols {invalid} are quarantined")
        for symbol in symbols:
            partition_key = symbol_date_key(symbol, date)
            curated = latest_materialization(context.instance, keys.FX_SPREADS, str(partition_key))
            if curated is not None and curated.storage_id > record.storage_id:
                continue  # already curated from this bronze version (e.g. by a backfill)
            all_symbols.add(symbol)
            run_requests.append(
                RunRequest(
                    run_key=f"fx_spreads:{partition_key}:bronze@{record.storage_id}",
                    asset_selection=[keys.FX_SPREADS],
                    partition_key=partition_key,
                    run_config=INGEST_RUN_CONFIG,
                    tags={"pipeline/trigger": "bronze:fx_ticks"},
                )
            )
    known = set(context.instance.get_dynamic_partitions(symbol_partitions.name))
    new = sorted(all_symbols - known)
    new_cursor = None if cursor is None else str(cursor)
    if not run_requests:
        return SensorResult(
            skip_reason=SkipReason("no newly ingested FX day with passing checks"),
            cursor=new_cursor,
        )
    return SensorResult(
        run_requests=run_requests,
        dynamic_partitions_requests=[symbol_partitions.build_add_request(new)] if new else [],
        cursor=new_cursor,
    )


def build_fx_spreads_sensor(interval_s: int) -> SensorDefinition:
    """The sensor that curates each (symbol, date) of a newly ingested, gated bronze FX day."""

    @sensor(
        name="fx_spreads_from_bronze",
        target=AssetSelection.assets(keys.FX_SPREADS),
        minimum_interval_seconds=interval_s,
        default_status=DefaultSensorStatus.RUNNING,
        description=(
            "Curates each (symbol, date) of a bronze FX day once that day is ingested and "
            "its blocking checks passed; skips partitions already curated from that version."
        ),
    )
    def fx_spreads_sensor(context: SensorEvaluationContext, lake: LakeResource) -> SensorResult:
        return evaluate_fx_spreads(context, lake)

    return fx_spreads_sensor


def build_sensors(interval_s: int | None = None) -> list[SensorDefinition]:
    """Every sensor: landing (one per source), fx_spreads from bronze, and automation.

    Built on demand, not at import, so importing this module reads no environment.

    Parameters
    ----------
    interval_s
        Minimum seconds between landing and fx_spreads evaluations; default
        :func:`sensor_interval_seconds` (``PIPELINE_SENSOR_INTERVAL_S``).
    """
    interval_s = interval_s or sensor_interval_seconds()
    automation_sensor = AutomationConditionSensorDefinition(
        "automation",
        target=AssetSelection.all(),
        default_status=DefaultSensorStatus.RUNNING,
        minimum_interval_seconds=DEFAULT_SENSOR_INTERVAL_S,  # whole-graph evaluation
        description="Evaluates every asset's automation condition (e.g. gated_eager on models).",
    )
    return [
        *(build_landing_sensor(target, interval_s) for target in LANDING_TARGETS.values()),
        build_fx_spreads_sensor(interval_s),
        automation_sensor,
    ]


# --- schedules -----------------------------------------------------------------------

credibility_job = define_asset_job(
    "credibility_monthly",
    selection=AssetSelection.assets(keys.CREDIBILITY_POSTERIOR, keys.CREDIBILITY_TABLE),
    description="Fit the credibility posterior of one month and publish its table.",
)
credibility_schedule = build_schedule_from_partitioned_job(
    credibility_job,
    name="credibility_monthly_schedule",
    day_of_month=5,
    hour_of_day=6,
    minute_of_hour=0,
    default_status=DefaultScheduleStatus.RUNNING,
    description=(
        "On the 5th at 06:00 UTC, refits the month that just closed: late claims "
        "deliveries of the first days are in, and the landing sensor has curated them."
    ),
)

fx_daily_job = define_asset_job(
    "fx_scoring_daily",
    selection=AssetSelection.assets(keys.FX_ANOMALY_SCORES, keys.FX_MODEL_MONITOR),
    description="Score one (symbol, date) with its champion, then monitor KPI and drift.",
)


@schedule(
    job=fx_daily_job,
    cron_schedule="0 6 * * *",
    execution_timezone="UTC",
    name="fx_scoring_daily_schedule",
    default_status=DefaultScheduleStatus.RUNNING,
    description=(
        "At 06:00 UTC, scores yesterday's ticks of every registered symbol that has curated "
        "ticks for that day, and runs the champion monitor on them (one run per symbol)."
    ),
)
def fx_daily_schedule(
    context: ScheduleEvaluationContext, lake: LakeResource
) -> list[RunRequest] | SkipReason:
    """Request yesterday's (symbol, date) partitions that have something to score.

    A registered symbol with no ticks that day (a holiday, a pair that stopped
    trading) is skipped rather than launched into a certain failure.
    """
    day = context.scheduled_execution_time.astimezone(dt.UTC).date() - dt.timedelta(days=1)
    date = day.isoformat()
    registered = set(context.instance.get_dynamic_partitions(symbol_partitions.name))
    curated = lake.read("curated", "fx_spreads", {"date": date}, columns=["symbol"])
    present = sorted(registered & set(curated["symbol"].unique())) if curated.height else []
    if not present:
        return SkipReason(f"no curated fx_spreads for {date} among {len(registered)} symbols")
    return [
        RunRequest(
            run_key=f"fx_scoring_daily:{date}:{symbol}",
            partition_key=symbol_date_key(symbol, date),
        )
        for symbol in present
    ]


jobs = [credibility_job, fx_daily_job]
schedules = [credibility_schedule, fx_daily_schedule]
