"""Sensors, schedules, automation conditions, retry policies and pools.

How work is triggered, in one place:

* **Landing sensors** (one per source) watch ``$PIPELINE_HOME/landing/<source>``.
  Every file there is either ingested or reported (a warning in the sensor log and
  a row in ``ops/landing_rejects``: unknown name, partition outside the definition,
  unreadable, abandoned temporary file). A file is ingested once *complete*: its
  size and modification time stable for ``PIPELINE_LANDING_SETTLE_S``, a Parquet
  footer in place, or an upstream ``<name>.done`` marker (the only signal with
  ``PIPELINE_LANDING_COMPLETION=marker``). It is ingested again whenever its
  *content* changes: a changed ``(mtime_ns, size)`` makes the sensor read and hash
  the file, and the run key and the "already ingested" test use the hash (bronze
  records the hashes it read), so a corrected re-delivery that keeps an older
  modification time (``cp -p``) is ingested, and a file that changed while its run
  was reading it is ingested again. A run is requested only for the partition named
  in the file name. Claims, loan and FX incident-log files share a partitions
  definition with their curated table, so one run ingests bronze and publishes
  curated, with the checks in between. FX tick files register their symbols as
  dynamic partitions and request the bronze day only: ``curated/fx_spreads`` is partitioned by
  symbol × date, and Dagster cannot put two partitions definitions in one run.
* **fx_spreads_from_bronze** follows the bronze FX day: once a bronze partition
  has been materialised *and its blocking checks passed in that run*, it requests
  each ``(symbol, date)`` partition of ``curated/fx_spreads`` present in that day.
  Requesting both from the landing sensor would race (the curated run can start
  before bronze is written) and would bypass the bronze gate. A bronze run that
  never finishes (its process died) is waited for only up to its max runtime;
  run monitoring (``dagster.yaml``) marks it failed and run retries relaunch it.
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
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import polars as pl
from dagster import (
    AssetKey,
    AssetRecordsFilter,
    AssetSelection,
    AutomationConditionSensorDefinition,
    DagsterEventType,
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
from pipeline.domain.landing import (
    COMPLETION_MARKER,
    LandingFileError,
    is_settled,
    landing_name_problem,
)
from pipeline.gates import check_record_failures
from pipeline.partitions import symbol_date_key, symbol_partitions
from pipeline.policies import INGEST_RUN_CONFIG
from pipeline.resources.lake import LakeResource
from pipeline.resources.landing import LandingFile, LandingResource
from pipeline.settings import SettingsError, get_settings
from pipeline.stores.sources import LANDING_HASHES_METADATA, SOURCES, bronze_symbols

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


MAX_RUNTIME_TAG = "dagster/max_runtime"
"""Run tag read by Dagster's run monitoring: a run older than this many seconds is failed."""


def ingest_max_runtime_seconds() -> int:
    """Max runtime of a sensor-launched ingest run (``PIPELINE_INGEST_MAX_RUNTIME_S``).

    Set as the ``dagster/max_runtime`` tag of every ingest run: run monitoring fails a
    run whose process died once it is this old, and :func:`bronze_gate_status` stops
    waiting for it.
    """
    return get_settings().ingest_max_runtime_s


# --- landing sensors -----------------------------------------------------------------


class SensorCursorError(ValueError):
    """A sensor cursor cannot be decoded (written by an incompatible version)."""


WAITING, DONE, REJECTED, OUTSIDE = "waiting", "done", "rejected", "outside"
"""What a landing sensor remembers of a file: not complete yet; ingested or requested;
reported as a reject; named a partition that does not exist (re-checked every tick)."""

ABANDONED_TEMPORARY_S = 24 * 3600
"""A hidden temporary file (``.name.tmp``) untouched for this long is reported."""

REJECTS_TABLE = "landing_rejects"
"""``ops/landing_rejects``: every landing file the platform cannot place, and why."""


@dataclass(frozen=True)
class FileState:
    """What a landing sensor remembers about one file between ticks.

    Attributes
    ----------
    first_seen_s
        Sensor time (epoch seconds) when this ``(mtime_ns, size)`` was first seen:
        the start of the settle interval.
    sha256
        Content hash once the file was complete and read.
    """

    mtime_ns: int
    size: int
    first_seen_s: float
    status: str
    sha256: str | None = None

    @property
    def signature(self) -> tuple[int, int]:
        """``(mtime_ns, size)``: what tells the sensor to look at the content again."""
        return self.mtime_ns, self.size


def decode_file_cursor(cursor: str | None) -> dict[str, FileState]:
    """Decode a landing cursor: file name -> :class:`FileState`.

    Cursors of the previous version (``name -> [mtime_ns, size]``) decode as files
    already handled, so an upgrade does not ingest everything again.

    Raises
    ------
    SensorCursorError
        When the cursor is not the JSON object this module writes.
    """
    if not cursor:
        return {}
    try:
        raw = json.loads(cursor)
        decoded = {}
        for name, value in raw.items():
            if len(value) == 2:
                decoded[str(name)] = FileState(int(value[0]), int(value[1]), 0.0, DONE)
                continue
            mtime_ns, size, first_seen, status, sha = value
            if status not in (WAITING, DONE, REJECTED, OUTSIDE):
                raise ValueError(f"unknown status {status!r}")
            decoded[str(name)] = FileState(int(mtime_ns), int(size), float(first_seen), status, sha)
        return decoded
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
        raise SensorCursorError(
            f"landing sensor cursor {cursor[:200]!r} is not a JSON object of "
            f"file name -> [mtime_ns, size, first_seen_s, status, sha256]; reset the cursor "
            f"in the UI"
        ) from exc


def encode_file_cursor(files: Mapping[str, FileState]) -> str:
    """Encode a landing cursor deterministically (sorted keys, no spaces)."""
    return json.dumps(
        {
            name: [s.mtime_ns, s.size, round(s.first_seen_s, 3), s.status, s.sha256]
            for name, s in sorted(files.items())
        },
        separators=(",", ":"),
    )


@dataclass(frozen=True)
class Observation:
    """One file as a landing sensor tick sees it.

    Attributes
    ----------
    state
        What to remember (``None``: nothing, e.g. a marker beside its file).
    reject
        Why the file is reported, when it is newly reported.
    rows
        The file's rows as text (lazily; every row parses), when it is newly complete
        and readable.
    """

    state: FileState | None
    reject: str | None = None
    rows: pl.LazyFrame | None = None


def observe_file(
    landing: LandingResource,
    target: "LandingTarget",
    file: LandingFile,
    previous: FileState | None,
    names: set[str],
    now_s: float,
) -> Observation:
    """Decide what one tick does with one landing file.

    A file is read (and hashed) only when its size or modification time changed
    since the last tick, or while it is not complete yet: hashing costs a full read.
    """
    mode, settle_s = landing.completion_policy()
    same = previous is not None and previous.signature == (file.mtime_ns, file.size)
    first_seen = previous.first_seen_s if same and previous else now_s

    def state(status: str, sha256: str | None = None) -> FileState:
        return FileState(file.mtime_ns, file.size, first_seen, status, sha256)

    if same and previous and previous.status in (DONE, REJECTED):
        return Observation(previous)
    if file.is_marker:
        if file.name.removesuffix(COMPLETION_MARKER) in names:
            return Observation(None)
        return Observation(state(REJECTED), "incomplete: completion marker without its file")
    if file.is_temporary:
        if now_s - file.mtime_ns / 1e9 < ABANDONED_TEMPORARY_S:
            return Observation(None)  # a drop still being written under a temporary name
        hours = ABANDONED_TEMPORARY_S // 3600
        return Observation(state(REJECTED), f"incomplete: temporary file untouched for {hours} h")
    problem = landing_name_problem(target.source, file.name)
    if problem:
        return Observation(state(REJECTED), f"unknown name: {problem}")
    partition_key = file.partition_key or ""
    if not target.partitions_def.has_partition_key(partition_key):
        if same and previous and previous.status == OUTSIDE:
            return Observation(previous)  # reported once; placed once the partition exists
        return Observation(
            state(OUTSIDE),
            f"partition outside the definition: {partition_key!r} is not a partition of "
            f"{target.bronze.to_user_string()} (not ingested until it is)",
        )
    complete = f"{file.name}{COMPLETION_MARKER}" in names or (
        mode == "settle"
        and is_settled(
            first_seen_s=first_seen, mtime_ns=file.mtime_ns, now_s=now_s, settle_s=settle_s
        )
    )
    if not complete and mode == "settle" and file.name.endswith(".parquet"):
        complete = landing.parquet_complete(file)
    if not complete:
        return Observation(state(WAITING))
    try:
        sha256 = landing.digest(file.relative)
        rows = landing.scan_parsed(file.relative)
    except LandingFileError as exc:
        return Observation(state(REJECTED), f"unreadable: {exc}")
    return Observation(state(DONE, sha256), rows=rows)


def record_rejects(
    context: SensorEvaluationContext,
    lake: LakeResource,
    source: str,
    rejects: Mapping[LandingFile, str],
) -> None:
    """Log each rejected file and append it to ``ops/landing_rejects``."""
    if not rejects:
        return
    detected_at = dt.datetime.now(dt.UTC).replace(tzinfo=None)
    for file, reason in rejects.items():
        context.log.warning(f"landing/{file.relative} is not ingested: {reason}")
    lake.append(
        "ops",
        REJECTS_TABLE,
        pl.DataFrame(
            {
                "file": [f.relative for f in rejects],
                "source": [source] * len(rejects),
                "reason": list(rejects.values()),
                "detected_at": [detected_at] * len(rejects),
                "size": [f.size for f in rejects],
                "mtime_ns": [f.mtime_ns for f in rejects],
            },
            schema={
                "file": pl.String,
                "source": pl.String,
                "reason": pl.String,
                "detected_at": pl.Datetime("us"),
                "size": pl.Int64,
                "mtime_ns": pl.Int64,
            },
        ),
    )


def ingested_hashes(record: EventLogRecord | None) -> dict[str, str]:
    """File -> content hash a bronze materialisation read (empty when unknown)."""
    if record is None or record.asset_materialization is None:
        return {}
    value = record.asset_materialization.metadata.get(LANDING_HASHES_METADATA)
    if value is None:
        return {}
    try:
        return {str(k): str(v) for k, v in json.loads(str(value.value)).items()}
    except (ValueError, AttributeError):
        return {}


def landing_run_key(
    source: str, partition_key: str, files: Mapping[str, FileState], after: int
) -> str:
    """Run key of one ingestion: source, partition, every changed file's content hash.

    ``after`` is the storage id of the bronze materialisation being superseded
    (0 for none): the same delivery over the same bronze state always yields the
    same key, so Dagster drops a duplicate request even if the cursor is lost,
    while content that comes back after another delivery is a new key.
    """
    parts = [f"{name}#{(state.sha256 or '')[:16]}" for name, state in sorted(files.items())]
    return f"{source}:{partition_key}:" + "+".join(parts) + f":after@{after}"


def read_landing_symbols(landing: LandingResource, file: LandingFile) -> list[str]:
    """Distinct raw ``symbol`` values of one FX tick file."""
    return symbols_of(landing.scan_as_text(file.relative), file.relative)


def symbols_of(rows: pl.LazyFrame, relative: str) -> list[str]:
    """Distinct raw ``symbol`` values of one FX tick file read as text.

    Raises
    ------
    LandingFileError
        When the file has no ``symbol`` column.
    """
    if "symbol" not in rows.collect_schema().names():
        raise LandingFileError(f"{relative}: no symbol column")
    distinct = rows.select(pl.col("symbol").drop_nulls().unique()).collect(engine="streaming")
    return sorted(str(v) for v in distinct["symbol"].to_list())


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
    also: tuple[AssetKey, ...] = ()  # further assets of the same partitions (the PII scan)

    @property
    def assets(self) -> list[AssetKey]:
        """Assets materialised by one run of this source."""
        curated = [] if self.curated is None else [self.curated]
        return [self.bronze, *curated, *self.also]


LANDING_TARGETS = {
    "claims": LandingTarget(
        "claims",
        keys.BRONZE_CLAIMS,
        keys.CLAIMS_BY_DISTRICT,
        SOURCES["claims"].partitions_def,
        also=(keys.CLAIMS_REDACTED, keys.PII_DETECTION_LOG),
    ),
    "fx_ticks": LandingTarget(
        "fx_ticks", keys.BRONZE_FX_TICKS, None, SOURCES["fx_ticks"].partitions_def
    ),
    "fx_incidents": LandingTarget(
        "fx_incidents",
        keys.BRONZE_FX_INCIDENTS,
        keys.FX_INCIDENTS,
        SOURCES["fx_incidents"].partitions_def,
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
    context: SensorEvaluationContext,
    landing: LandingResource,
    lake: LakeResource,
    target: LandingTarget,
    *,
    now_s: float | None = None,
) -> SensorResult:
    """One evaluation of a landing sensor (see :func:`build_landing_sensor`).

    Parameters
    ----------
    now_s
        The sensor's clock (epoch seconds); tests pass one to step through a
        settle interval without waiting.
    """
    now_s = time.time() if now_s is None else now_s
    seen = decode_file_cursor(context.cursor)
    files = landing.files(target.source)
    names = {f.name for f in files}
    next_cursor: dict[str, FileState] = {}
    rejects: dict[LandingFile, str] = {}
    by_partition: dict[str, dict[str, FileState]] = {}
    scans: dict[str, pl.LazyFrame] = {}
    for file in files:
        seen_before = seen.get(file.name)
        observed = observe_file(landing, target, file, seen_before, names, now_s)
        if observed.state is None:
            continue
        next_cursor[file.name] = observed.state
        if observed.reject:
            rejects[file] = observed.reject
        if observed.state.status == WAITING and (
            seen_before is None or seen_before.signature != observed.state.signature
        ):
            context.log.info(f"landing/{file.relative}: waiting until it is complete")
        if observed.rows is not None:
            by_partition.setdefault(file.partition_key or "", {})[file.name] = observed.state
            scans[file.name] = observed.rows
    record_rejects(context, lake, target.source, rejects)

    run_requests: list[RunRequest] = []
    raw_symbols: set[str] = set()
    for partition_key, changed in sorted(by_partition.items()):
        ingested = latest_materialization(context.instance, target.bronze, partition_key)
        read = ingested_hashes(ingested)
        if ingested is not None and all(
            read.get(f"{target.source}/{name}") == state.sha256 for name, state in changed.items()
        ):
            context.log.info(
                f"{target.source} {partition_key}: {', '.join(sorted(changed))} already "
                f"ingested with this content by run {ingested.run_id}"
            )
            continue
        if target.source == "fx_ticks":
            for name in changed:
                try:
                    raw_symbols.update(symbols_of(scans[name], f"fx_ticks/{name}"))
                except LandingFileError as exc:
                    context.log.warning(f"fx_ticks: {exc}; its bronze run will report it")
        run_requests.append(
            RunRequest(
                run_key=landing_run_key(
                    target.source, partition_key, changed, ingested.storage_id if ingested else 0
                ),
                asset_selection=target.assets,
                partition_key=partition_key,
                run_config=INGEST_RUN_CONFIG,
                tags={
                    "pipeline/trigger": f"landing:{target.source}",
                    MAX_RUNTIME_TAG: str(ingest_max_runtime_seconds()),
                },
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
            skip_reason=SkipReason(f"no new or changed complete {target.source} files to ingest"),
            cursor=cursor,
        )
    return SensorResult(
        run_requests=run_requests,
        dynamic_partitions_requests=partition_requests,
        cursor=cursor,
    )


def build_landing_sensor(target: LandingTarget, interval_s: int) -> SensorDefinition:
    """A cursor-based sensor over one landing folder.

    Each new or changed file, once complete, requests one run of its partition,
    keyed by :func:`landing_run_key`; every file it cannot place is reported.
    Re-evaluating with the same cursor requests nothing.
    """

    @sensor(
        name=f"{target.source}_landing",
        target=AssetSelection.assets(*target.assets),
        minimum_interval_seconds=interval_s,
        default_status=DefaultSensorStatus.RUNNING,
        description=(
            f"Ingests new or changed complete files under landing/{target.source}: "
            + ", ".join(k.to_user_string() for k in target.assets)
            + " for the partition named in the file name; reports any other file in "
            "ops/landing_rejects."
        ),
    )
    def landing_sensor(
        context: SensorEvaluationContext, landing: LandingResource, lake: LakeResource
    ) -> SensorResult:
        return evaluate_landing(context, landing, lake, target)

    return landing_sensor


# --- fx_spreads follows bronze FX days ----------------------------------------------

RUN_MONITORING_GRACE_S = 60
"""Slack beyond a run's max runtime: two polls of run monitoring (every 30 s)."""


def run_max_runtime(tags: Mapping[str, str]) -> int:
    """Max runtime of a run in seconds: its ``dagster/max_runtime`` tag, else the ingest bound."""
    raw = tags.get(MAX_RUNTIME_TAG, "")
    try:
        return int(float(raw))
    except ValueError:
        return ingest_max_runtime_seconds()


BRONZE_FX_GATE = (keys.CHECK_FILE_SCHEMA,)


def bronze_gate_status(
    instance: DagsterInstance,
    record: EventLogRecord,
    check_names: Iterable[str],
    *,
    now_s: float | None = None,
) -> tuple[str, str]:
    """Whether the blocking checks passed on the run that wrote ``record``.

    The verdict is read as :func:`pipeline.gates.check_record_failures`
    reads it for the model guards (including results of partition-range runs),
    but only once the run that wrote the partition has finished, and only from
    evaluations made in that run: a pass left by an earlier delivery must not
    open the gate for a new one.

    A run that never finishes (its process was killed after the materialisation)
    is not waited for forever: once it is older than its max runtime (the
    ``dagster/max_runtime`` tag, else ``PIPELINE_INGEST_MAX_RUNTIME_S``) plus one
    run-monitoring poll, it counts as failed, as run monitoring will mark it.

    Parameters
    ----------
    now_s
        Clock of the evaluation (epoch seconds); tests pass one.

    Returns
    -------
    tuple of (status, reason)
        ``status`` is ``"passed"``, ``"failed"`` or ``"pending"`` (the run is still
        going, so its checks may not have been evaluated yet).
    """
    partition_key = str(record.partition_key)
    run_record = instance.get_run_record_by_id(record.run_id)
    run = run_record.dagster_run if run_record is not None else None
    if run is not None and not run.is_finished:
        started = run_record.start_time or run_record.create_timestamp.timestamp()
        age = (time.time() if now_s is None else now_s) - started
        bound = run_max_runtime(run.tags)
        if age > bound + RUN_MONITORING_GRACE_S:
            return "failed", (
                f"run {record.run_id} that wrote {partition_key} is still {run.status.value} "
                f"after {age:.0f} s, beyond its max runtime of {bound} s: its process is taken "
                "as dead (run monitoring marks it failed); the day waits for a new ingestion"
            )
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


def evaluate_fx_spreads(
    context: SensorEvaluationContext, lake: LakeResource, *, now_s: float | None = None
) -> SensorResult:
    """One evaluation of :data:`fx_spreads_sensor` (``now_s``: see :func:`bronze_gate_status`)."""
    after = int(context.cursor) if context.cursor else None
    records = context.instance.fetch_materializations(
        AssetRecordsFilter(asset_key=keys.BRONZE_FX_TICKS, after_storage_id=after),
        limit=100,
        ascending=True,
    ).records
    cursor = after
    latest_by_date: dict[str, EventLogRecord] = {}
    for record in records:
        status, reason = bronze_gate_status(context.instance, record, BRONZE_FX_GATE, now_s=now_s)
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
        # one event-log query per day, not one per symbol (1,000 symbols: 0.2 s, not 20 s)
        curated = context.instance.get_latest_storage_id_by_partition(
            keys.FX_SPREADS,
            DagsterEventType.ASSET_MATERIALIZATION,
            {str(symbol_date_key(symbol, date)) for symbol in symbols},
        )
        for symbol in symbols:
            partition_key = symbol_date_key(symbol, date)
            if curated.get(str(partition_key), -1) > record.storage_id:
                continue  # already curated from this bronze version (e.g. by a backfill)
            all_symbols.add(symbol)
            run_requests.append(
                RunRequest(
                    run_key=f"fx_spreads:{partition_key}:bronze@{record.storage_id}",
                    asset_selection=[keys.FX_SPREADS],
                    partition_key=partition_key,
                    run_config=INGEST_RUN_CONFIG,
                    tags={
                        "pipeline/trigger": "bronze:fx_ticks",
                        MAX_RUNTIME_TAG: str(ingest_max_runtime_seconds()),
                    },
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
