"""The lake: Delta tables at ``<root>/<layer>/<table>`` and files beside them.

All table IO goes through delta-rs. Its commits are atomic, so an interrupted
write leaves the previous version readable, and a partition-scoped overwrite
(``replaceWhere`` via ``predicate``) rewrites one partition without touching the
others. The root may be a local folder or an object-store URI (``s3://``,
``abfss://``); credentials come from the standard environment variables that
delta-rs and pyarrow read, never from configuration. Requests to an object store
are bounded (``PIPELINE_SERVICE_TIMEOUT_S``): an unreachable store fails the step
with :class:`LakeUnavailableError` instead of hanging.

Outcomes committed together (curated rows and their quarantine)
-----------------------------------------------------------------
Delta has no multi-table transaction, so :meth:`LakeResource.commit_outcome` uses a
*commit point*. Every row written carries a batch id (``_batch_id``, time-ordered);
the tables are only **appended** to, and then one append to ``ops/ingest_commits``
names the batch for every partition written. That single Delta commit is the
moment the outcome becomes visible: :meth:`LakeResource.read` shows, per partition,
the newest committed batch whose rows are present (or that committed no rows), and
hides every other batch. A writer killed before the commit record leaves invisible
rows; a failure to write the quarantine leaves the previous curated rows visible.
Two writers of different partitions never conflict (appends), and two writers of
the same partition cannot mix their rows (one batch is visible per partition).
After committing, a writer deletes the superseded batches of its partitions
(``_batch_id`` below its own), which keeps plain Delta readers of a table close to
what the platform shows; ``pipeline maintenance`` removes whatever a killed writer
or a lost race left. Only the tables written through ``commit_outcome`` (those
with a ``_batch_id`` column) are filtered; the others read as stored.

A single table holding both outcomes with a status column was the alternative; it
would have changed the schema every reader of the curated tables relies on.
"""

import datetime as dt
import json
import re
import secrets
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import polars as pl
from dagster import ConfigurableResource
from pydantic import Field

from pipeline.resources.lake_stream import (
    FrameStream,
    LakeError,
    Rows,
    partition_counts,
    table_schema,
    write_stream_files,
)

if TYPE_CHECKING:
    from deltalake import DeltaTable

LAYERS = ("bronze", "curated", "quarantine", "gold", "ops")
BATCH_COLUMN = "_batch_id"
COMMITS_TABLE = "ingest_commits"
"""``ops/ingest_commits``: one row per partition and committed batch."""
_BATCH = re.compile(r"\d{8}T\d{12}Z-[0-9a-f]{8}")
BATCH_METADATA_KEY = "pipeline.batch_id"
# matched with fullmatch: ``$`` alone would also accept a trailing newline
_TABLE = re.compile(r"[a-z][a-z0-9_]{0,62}")
_PREDICATE_VALUE = re.compile(r"[A-Za-z0-9_.:\- |]{1,64}")
_COLUMN = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")


class LakeUnavailableError(OSError):
    """The object store behind the lake did not answer within the configured bound."""


def new_batch_id(now: dt.datetime | None = None) -> str:
    """A batch id that sorts by creation time: ``YYYYMMDDTHHMMSSffffffZ-<8 hex>``."""
    stamp = (now or dt.datetime.now(dt.UTC)).strftime("%Y%m%dT%H%M%S%f")
    return f"{stamp}Z-{secrets.token_hex(4)}"


def batch_time(batch_id: str) -> dt.datetime:
    """The UTC time (naive) encoded in a batch id."""
    return dt.datetime.strptime(batch_id[:21], "%Y%m%dT%H%M%S%f")


@dataclass(frozen=True)
class PartitionWrite:
    """Rows of some partitions of one table, part of one :meth:`LakeResource.commit_outcome`.

    Attributes
    ----------
    partitions
        Partition column-to-value mappings; every row of ``frame`` must belong to
        one of them, and a partition listed without rows ends up empty.
    """

    layer: str
    table: str
    frame: Rows
    partitions: Sequence[Mapping[str, str]]


@dataclass(frozen=True)
class BatchCommit:
    """What :meth:`LakeResource.commit_outcome` committed.

    Attributes
    ----------
    versions
        ``layer/table`` to the Delta version of its append.
    commit_version
        Version of ``ops/ingest_commits`` holding the commit record.
    leftovers
        Superseded batches a lost race kept from being deleted (still invisible;
        ``pipeline maintenance`` removes them).
    """

    batch_id: str
    versions: dict[str, int]
    commit_version: int
    leftovers: list[str] = field(default_factory=list)


class LakeResource(ConfigurableResource):
    """Delta tables and artefact files under one root.

    Attributes
    ----------
    root_uri
        Local folder or object-store URI of the lake root.
    storage_options
        Non-secret delta-rs storage options (e.g. ``AWS_REGION``).
    commit_retries
        Attempts when a concurrent writer wins the commit race.
    service_timeout_s
        Bound on one operation against an object store (seconds); ``None`` reads
        ``PIPELINE_SERVICE_TIMEOUT_S``. Local folders are not bounded.
    """

    root_uri: str
    storage_options: dict[str, str] = Field(default_factory=dict)
    commit_retries: int = 5
    service_timeout_s: int | None = None

    # --- object-store bounds ----------------------------------------------------------
    @property
    def is_local(self) -> bool:
        """Whether the lake root is a folder on this machine."""
        return "://" not in self.root_uri or self.root_uri.startswith("file://")

    def _bound_s(self) -> int:
        if self.service_timeout_s is not None:
            return self.service_timeout_s
        from pipeline.settings import get_settings

        return get_settings().service_timeout_s

    def _delta_options(self) -> dict[str, str] | None:
        """delta-rs storage options: the configured ones plus request bounds for object stores.

        Each request may take a third of the bound and is retried twice, all within
        the bound (``retry_timeout``); options set in ``storage_options`` win.
        """
        if self.is_local:
            return self.storage_options or None
        bound = self._bound_s()
        per_request = max(1, bound // 3)
        return {
            "timeout": f"{per_request}s",
            "connect_timeout": f"{min(5, per_request)}s",
            "max_retries": "2",
            "retry_timeout": f"{bound}s",
            **self.storage_options,
        }

    def _polars_options(self) -> dict[str, str] | None:
        """The same bounds spelled for polars' reader of the data files."""
        if self.is_local:
            return self.storage_options or None
        bound = self._bound_s()
        per_request = max(1, bound // 3)
        return {
            "timeout": f"{per_request}s",
            "connect_timeout": f"{min(5, per_request)}s",
            "max_retries": "2",
            "retry_timeout_ms": str(bound * 1000),
            **self.storage_options,
        }

    def _unavailable(self, uri: str, exc: BaseException) -> LakeUnavailableError:
        return LakeUnavailableError(
            f"{uri}: the object store failed or did not answer within the bound of "
            f"{self._bound_s()} s (PIPELINE_SERVICE_TIMEOUT_S): {type(exc).__name__}: "
            f"{str(exc)[:500]}"
        )

    def _load(self, uri: str) -> "DeltaTable | None":
        """The table at ``uri``, or ``None`` when there is none."""
        from deltalake import DeltaTable
        from deltalake.exceptions import TableNotFoundError

        try:
            return DeltaTable(uri, storage_options=self._delta_options())
        except TableNotFoundError:
            return None
        except OSError as exc:
            if self.is_local:
                raise
            raise self._unavailable(uri, exc) from exc

    # --- naming -----------------------------------------------------------------
    def table_uri(self, layer: str, table: str) -> str:
        """URI of ``<root>/<layer>/<table>`` after validating both names."""
        if layer not in LAYERS:
            raise LakeError(f"layer {layer!r} is not one of {', '.join(LAYERS)}")
        if not isinstance(table, str) or not _TABLE.fullmatch(table):
            raise LakeError(f"table name {table!r} must match {_TABLE.pattern}")
        return f"{self.root_uri.rstrip('/')}/{layer}/{table}"

    def file_uri(self, layer: str, *parts: str) -> str:
        """URI of an artefact file (e.g. a netCDF posterior) under a layer folder."""
        for part in parts:
            if not re.fullmatch(r"[A-Za-z0-9_.=\-]{1,128}", part) or part in (".", ".."):
                raise LakeError(f"path component {part!r} is not safe")
        return "/".join([self.table_uri(layer, parts[0]), *parts[1:]])

    # --- tables -------------------------------------------------------------------
    def exists(self, layer: str, table: str) -> bool:
        """Whether a Delta table exists at that location."""
        from deltalake import DeltaTable

        uri = self.table_uri(layer, table)
        try:
            return DeltaTable.is_deltatable(uri, storage_options=self._delta_options())
        except OSError as exc:
            if self.is_local:
                raise
            raise self._unavailable(uri, exc) from exc

    def delta_table(self, layer: str, table: str) -> "DeltaTable | None":
        """The delta-rs table at ``<root>/<layer>/<table>`` (maintenance), or ``None``."""
        return self._load(self.table_uri(layer, table))

    def version(self, layer: str, table: str) -> int | None:
        """Current Delta version, or ``None`` when the table does not exist."""
        if not self.exists(layer, table):
            return None
        loaded = self._load(self.table_uri(layer, table))
        return None if loaded is None else loaded.version()

    def read(
        self,
        layer: str,
        table: str,
        where: Mapping[str, str | list[str]] | None = None,
        *,
        columns: list[str] | None = None,
        committed: bool = True,
    ) -> pl.DataFrame:
        """Read a table, optionally filtered by equality on partition columns.

        Returns an empty frame when the table does not exist yet, because a
        partition that was never written has no rows, which callers decide about.

        Parameters
        ----------
        committed
            For tables written by :meth:`commit_outcome`: only the committed batch
            of each partition, without the ``_batch_id`` column (the default), or
            every stored row with it (``False``: maintenance and tests).
        """
        scanned = self._scan(layer, table, where)
        if scanned is None:
            return pl.DataFrame()
        lazy, loaded = scanned
        names = lazy.collect_schema().names()
        if BATCH_COLUMN not in names or not committed:
            return (lazy.select(columns) if columns else lazy).collect()
        keys = list(loaded.metadata().partition_columns)
        wanted = [*dict.fromkeys([*(columns or names), *keys, BATCH_COLUMN])]
        rows = visible_rows(lazy.select(wanted).collect(), self.commits(layer, table), keys)
        return rows.select(columns) if columns else rows.drop(BATCH_COLUMN)

    def _scan(
        self, layer: str, table: str, where: Mapping[str, str | list[str]] | None
    ) -> "tuple[pl.LazyFrame, DeltaTable] | None":
        if not self.exists(layer, table):
            return None
        uri = self.table_uri(layer, table)
        loaded = self._load(uri)
        if loaded is None:
            return None
        if self.is_local:
            lazy = pl.scan_delta(loaded)
        else:
            lazy = pl.scan_delta(
                uri, version=loaded.version(), storage_options=self._polars_options()
            )
        for col, value in (where or {}).items():
            values = value if isinstance(value, list) else [value]
            lazy = lazy.filter(pl.col(col).is_in(values))
        return lazy, loaded

    def scan(
        self, layer: str, table: str, where: Mapping[str, str | list[str]] | None = None
    ) -> pl.LazyFrame | None:
        """A lazy read of a table that is not written by :meth:`commit_outcome` (bronze).

        For partitions too large to read at once: callers aggregate or stream it.
        ``None`` when the table does not exist yet.

        Raises
        ------
        LakeError
            For a table with commit points, whose visible rows need the commit records
            (use :meth:`read`).
        """
        scanned = self._scan(layer, table, where)
        if scanned is None:
            return None
        lazy, _ = scanned
        if BATCH_COLUMN in lazy.collect_schema().names():
            raise LakeError(f"{layer}/{table} is written with commit points: read it instead")
        return lazy

    def count(
        self, layer: str, table: str, where: Mapping[str, str | list[str]] | None = None
    ) -> int:
        """Rows of a table (or of some partitions) as a reader sees them, without loading them."""
        scanned = self._scan(layer, table, where)
        if scanned is None:
            return 0
        lazy, loaded = scanned
        if BATCH_COLUMN not in lazy.collect_schema().names():
            return int(lazy.select(pl.len()).collect().item())
        keys = list(loaded.metadata().partition_columns)
        return self.read(layer, table, where, columns=keys).height

    def commits(self, layer: str, table: str) -> pl.DataFrame:
        """Commit records of one table: partition columns, ``_batch_id`` and ``rows``.

        The commit table is read after the data table (see :meth:`read`), so a batch
        committed in between is either present in the rows read or ignored.
        """
        records = self.read("ops", COMMITS_TABLE, {"layer": layer, "table": table}, committed=False)
        if records.height == 0:
            return pl.DataFrame(schema={BATCH_COLUMN: pl.String, "rows": pl.Int64})
        partitions = pl.DataFrame([json.loads(p) for p in records["partition"]])
        return pl.concat(
            [
                partitions.cast(pl.String),
                records.select(pl.col("batch_id").alias(BATCH_COLUMN), pl.col("rows")),
            ],
            how="horizontal",
        )

    def overwrite_partition(
        self, layer: str, table: str, frame: Rows, partition: Mapping[str, str]
    ) -> int:
        """Replace exactly one partition of a table with ``frame``.

        Parameters
        ----------
        partition
            Partition column to value; every row of ``frame`` must carry these
            values, so a bug cannot write rows into another partition.

        Returns
        -------
        int
            The Delta version written.
        """
        if not partition:
            raise LakeError(f"{layer}/{table}: overwrite_partition needs partition values")
        return self.overwrite_partitions(layer, table, frame, [partition])

    def overwrite_partitions(
        self,
        layer: str,
        table: str,
        frame: Rows,
        partitions: Sequence[Mapping[str, str]],
    ) -> int:
        """Replace several partitions in one atomic commit.

        A range run (e.g. one symbol over 14 days) then costs one Delta commit
        instead of one per partition, and readers see all of it or none of it.
        Partitions listed without rows in ``frame`` end up empty.

        Parameters
        ----------
        partitions
            Partition column-to-value mappings, all with the same columns; every
            row of ``frame`` must belong to one of them.

        Returns
        -------
        int
            The Delta version written.
        """
        columns, allowed = self._partitions_of(layer, table, frame, partitions)
        return self._write(
            layer,
            table,
            frame,
            mode="overwrite",
            predicate=_predicate(allowed),
            partition_by=columns,
            allowed=allowed,
        )

    def _partitions_of(
        self,
        layer: str,
        table: str,
        frame: Rows,
        partitions: Sequence[Mapping[str, str]],
    ) -> tuple[list[str], pl.DataFrame]:
        """Validate partitions and rows; return the partition columns and distinct values.

        The rows of a :class:`FrameStream` are checked batch by batch as they are
        written (a stray row aborts the write before its commit).

        Raises
        ------
        LakeError
            When a name or value is unsafe, the partitions disagree on their
            columns, or a row lies outside them.
        """
        self.table_uri(layer, table)
        if not partitions:
            raise LakeError(f"{layer}/{table}: overwrite_partitions needs partitions")
        columns = list(partitions[0])
        for partition in partitions:
            if list(partition) != columns or not columns:
                raise LakeError(
                    f"{layer}/{table}: every partition needs the columns {columns}, got "
                    f"{list(partition)}"
                )
            for col, value in partition.items():
                # the column name and value are pasted into the predicate and become a
                # folder name ``col=value``: neither may carry quotes, operators or ``..``
                if not _COLUMN.fullmatch(col):
                    raise LakeError(f"{layer}/{table}: partition column {col!r} is not safe")
                if (
                    not isinstance(value, str)
                    or not _PREDICATE_VALUE.fullmatch(value)
                    or (".." in value)
                ):
                    raise LakeError(f"{layer}/{table}: partition value {value!r} is not safe")
        missing = [c for c in columns if c not in frame.columns]
        if missing:
            raise LakeError(f"{layer}/{table}: frame lacks partition column(s) {missing}")
        allowed = pl.DataFrame(
            [dict(p) for p in partitions], schema={c: pl.String for c in columns}
        ).unique(maintain_order=True)
        if isinstance(frame, FrameStream):
            return columns, allowed
        stray = frame.select(pl.col(c).cast(pl.String) for c in columns).join(
            allowed, on=columns, how="anti"
        )
        if stray.height:
            first = stray.row(0, named=True)
            raise LakeError(
                f"{layer}/{table}: {stray.height} row(s) lie outside the partitions being "
                f"written (e.g. {first}); refusing to write outside them"
            )
        return columns, allowed

    def partition_predicate(
        self,
        layer: str,
        table: str,
        frame: pl.DataFrame,
        partitions: Sequence[Mapping[str, str]],
    ) -> str:
        """The Delta predicate a write of ``partitions`` would use, after every validation.

        Raises
        ------
        LakeError
            As :meth:`overwrite_partitions` would, before anything is written.
        """
        return _predicate(self._partitions_of(layer, table, frame, partitions)[1])

    # --- outcomes committed together --------------------------------------------------
    def commit_outcome(self, writes: Sequence[PartitionWrite]) -> BatchCommit:
        """Write partitions of several tables so that they become visible together.

        Every write is validated before anything is written; then each table gets
        one append of its rows tagged with a new batch id, and one append to
        ``ops/ingest_commits`` makes all of them visible at once (see the module
        docstring). Finally the superseded batches of the written partitions are
        deleted.

        Raises
        ------
        LakeError
            When a name, a partition value or a row's partition is not acceptable
            (nothing is written).
        """
        if not writes:
            raise LakeError("commit_outcome needs at least one write")
        prepared = []
        for write in writes:
            if BATCH_COLUMN in write.frame.columns:
                raise LakeError(f"{write.layer}/{write.table}: frame already has {BATCH_COLUMN}")
            columns, allowed = self._partitions_of(
                write.layer, write.table, write.frame, write.partitions
            )
            prepared.append((write, columns, allowed))
        batch = new_batch_id()
        versions: dict[str, int] = {}
        records = []
        for write, columns, allowed in prepared:
            counts: Counter[str] = Counter()
            if isinstance(write.frame, FrameStream):
                tagged: Rows = write.frame.with_constant(BATCH_COLUMN, batch)
            else:
                tagged = write.frame.with_columns(pl.lit(batch).alias(BATCH_COLUMN))
                counts.update(partition_counts(write.frame, columns))
            versions[f"{write.layer}/{write.table}"] = self._write(
                write.layer,
                write.table,
                tagged,
                mode="append",
                partition_by=columns,
                batch=batch,
                allowed=allowed,
                counts=counts,
            )
            for partition in allowed.iter_rows(named=True):
                key = "\x1f".join(partition[c] for c in columns)
                records.append(
                    {
                        "layer": write.layer,
                        "table": write.table,
                        "partition": json.dumps(partition, sort_keys=True),
                        "batch_id": batch,
                        "rows": int(counts.get(key, 0)),
                        "committed_at": dt.datetime.now(dt.UTC).replace(tzinfo=None),
                    }
                )
        commit_version = self._write(
            "ops", COMMITS_TABLE, pl.DataFrame(records), mode="append", batch=batch
        )
        leftovers = []
        for write, _, allowed in prepared:
            leftover = self.drop_superseded(write.layer, write.table, allowed, batch)
            if leftover:
                leftovers.append(leftover)
        return BatchCommit(batch, versions, commit_version, leftovers)

    def drop_superseded(
        self, layer: str, table: str, partitions: pl.DataFrame, batch: str
    ) -> str | None:
        """Delete rows of batches older than ``batch`` in ``partitions`` of one table.

        Rows of an older batch are never visible once ``batch`` is committed, and a
        concurrent writer's uncommitted batch is older only if it started earlier, in
        which case its commit would not be the newest either. Lost commit races are
        retried; if they keep failing the rows stay (invisible) and a description is
        returned for the caller to log.
        """
        from deltalake.exceptions import CommitFailedError

        if not _BATCH.fullmatch(batch):
            raise LakeError(f"batch id {batch!r} is not one this lake writes")
        uri = self.table_uri(layer, table)
        predicate = (
            f"({_predicate(partitions)}) AND ({BATCH_COLUMN} < '{batch}' OR {BATCH_COLUMN} IS NULL)"
        )
        for attempt in range(self.commit_retries):
            loaded = self._load(uri)
            if loaded is None:
                return None
            try:
                loaded.delete(predicate)
                return None
            except CommitFailedError as exc:
                if attempt == self.commit_retries - 1:
                    return f"{layer}/{table}: batches before {batch} not deleted yet ({exc})"
                time.sleep(0.2 * 2**attempt)
        return None

    def append(self, layer: str, table: str, frame: pl.DataFrame) -> int:
        """Append rows (event logs such as ``gold/model_events``)."""
        return self._write(layer, table, frame, mode="append")

    def _write(
        self,
        layer: str,
        table: str,
        frame: Rows,
        *,
        batch: str | None = None,
        allowed: pl.DataFrame | None = None,
        counts: Counter[str] | None = None,
        **kwargs,
    ) -> int:
        """One Delta write, retried when a concurrent writer wins the commit race.

        Each attempt re-reads the table (``write_deltalake`` loads it from the URI),
        so a retried partition overwrite applies to what the winner left. A write
        tagged with ``batch`` records it in its commit's metadata; before a retry,
        a commit already carrying it means the lost race was only reported lost,
        and the rows are not appended twice. A :class:`FrameStream` goes through
        :meth:`_write_stream` (``allowed`` partitions, rows per partition into
        ``counts``).
        """
        import deltalake
        from deltalake import CommitProperties

        uri = self.table_uri(layer, table)
        if isinstance(frame, FrameStream):
            return self._write_stream(
                uri, frame, batch=batch, allowed=allowed, counts=counts, mode=kwargs["mode"]
            )
        data = frame.to_arrow()
        properties = CommitProperties(
            custom_metadata={BATCH_METADATA_KEY: batch} if batch else None
        )

        def write() -> None:
            deltalake.write_deltalake(
                uri,
                data,
                # appends, partition overwrites and bronze add new columns to the
                # table (older rows read them as null) instead of refusing the write:
                # a table written by an older release keeps working after an upgrade
                schema_mode="merge"
                if kwargs.get("mode") == "append" or "predicate" in kwargs or layer == "bronze"
                else None,
                storage_options=self._delta_options(),
                commit_properties=properties,
                **kwargs,
            )

        return self._commit_with_retries(uri, batch, write)

    def _commit_with_retries(self, uri: str, batch: str | None, commit: Callable[[], None]) -> int:
        """Run ``commit`` until it wins the commit race; return the table's version after it.

        Before a retry, a commit already carrying ``batch`` means the lost race was only
        reported lost, and nothing is committed twice.
        """
        from deltalake.exceptions import CommitFailedError

        for attempt in range(self.commit_retries):
            if attempt and batch and self._has_commit(uri, batch):
                break
            try:
                commit()
                break
            except CommitFailedError:
                if attempt == self.commit_retries - 1:
                    raise
                time.sleep(0.2 * 2**attempt)
            except OSError as exc:
                if self.is_local:
                    raise
                raise self._unavailable(uri, exc) from exc
        loaded = self._load(uri)
        return -1 if loaded is None else loaded.version()

    def _write_stream(
        self,
        uri: str,
        stream: FrameStream,
        *,
        mode: str,
        batch: str | None,
        allowed: pl.DataFrame | None,
        counts: Counter[str] | None,
    ) -> int:
        """Write a stream as data files, then add them in one transaction (see lake_stream).

        ``overwrite`` replaces the ``allowed`` partitions (one partition column); the
        table's schema gains the stream's new columns. A lost commit race retries the
        transaction over the same files.
        """
        import pyarrow as pa
        from deltalake import CommitProperties
        from deltalake.schema import Schema as DeltaSchema
        from deltalake.transaction import create_table_with_add_actions

        columns = [] if allowed is None else list(allowed.columns)
        if mode == "overwrite" and len(columns) != 1:
            raise LakeError(f"{uri}: a streamed overwrite needs exactly one partition column")
        files = write_stream_files(
            uri,
            stream,
            where=uri,
            columns=columns,
            allowed=allowed if allowed is not None else pl.DataFrame(),
        )
        properties = CommitProperties(
            custom_metadata={BATCH_METADATA_KEY: batch} if batch else None
        )
        filters = None
        if mode == "overwrite":
            values = allowed[columns[0]].to_list()
            filters = [(columns[0], "in", values)]

        def commit() -> None:
            loaded = self._load(uri)
            if loaded is None:
                create_table_with_add_actions(
                    uri,
                    DeltaSchema.from_arrow(table_schema(stream, None)),
                    files.actions,
                    mode="append",
                    partition_by=columns or None,
                    storage_options=self._delta_options(),
                    commit_properties=properties,
                )
                return
            loaded.create_write_transaction(
                files.actions,
                mode,
                table_schema(stream, pa.schema(loaded.schema().to_arrow())),
                partition_by=columns or None,
                partition_filters=filters,
                commit_properties=properties,
            )

        version = self._commit_with_retries(uri, batch, commit)
        if counts is not None:
            counts.clear()
            counts.update(files.counts)
        return version

    def _has_commit(self, uri: str, batch: str) -> bool:
        loaded = self._load(uri)
        if loaded is None:
            return False
        return any(entry.get(BATCH_METADATA_KEY) == batch for entry in loaded.history(20))

    def delete_batches(self, layer: str, table: str, doomed: pl.DataFrame) -> int:
        """Delete the rows of ``(partition values..., _batch_id)`` pairs of one table.

        Returns the number of rows deleted.

        Raises
        ------
        LakeError
            When a partition value or batch id is not one this lake writes.
        """
        if doomed.height == 0:
            return 0
        keys = [c for c in doomed.columns if c != BATCH_COLUMN]
        for row in doomed.iter_rows(named=True):
            if not _BATCH.fullmatch(str(row[BATCH_COLUMN])):
                raise LakeError(f"{layer}/{table}: batch id {row[BATCH_COLUMN]!r} is not valid")
        partitions = doomed.select(pl.col(keys).cast(pl.String))
        self._partitions_of(layer, table, partitions, list(partitions.iter_rows(named=True)))
        predicate = " OR ".join(
            f"(({_predicate(pl.DataFrame([{k: row[k] for k in keys}]))}) AND "
            f"{BATCH_COLUMN} = '{row[BATCH_COLUMN]}')"
            for row in doomed.with_columns(pl.col(keys).cast(pl.String)).iter_rows(named=True)
        )
        loaded = self.delta_table(layer, table)
        if loaded is None:
            return 0
        return int(loaded.delete(predicate).get("num_deleted_rows", 0))

    # --- files --------------------------------------------------------------------
    def write_bytes(self, uri: str, payload: bytes) -> str:
        """Write a file atomically where the filesystem allows (temp name + rename)."""
        from pyarrow import fs

        filesystem, path = fs.FileSystem.from_uri(uri)
        parent = path.rsplit("/", 1)[0]
        filesystem.create_dir(parent, recursive=True)
        tmp = f"{parent}/.{path.rsplit('/', 1)[1]}.tmp"
        with filesystem.open_output_stream(tmp) as out:
            out.write(payload)
        filesystem.move(tmp, path)
        return uri

    def read_bytes(self, uri: str) -> bytes:
        """Read a whole artefact file."""
        from pyarrow import fs

        filesystem, path = fs.FileSystem.from_uri(uri)
        with filesystem.open_input_stream(path) as stream:
            return stream.read()

    def file_exists(self, uri: str) -> bool:
        """Whether an artefact file exists."""
        from pyarrow import fs

        filesystem, path = fs.FileSystem.from_uri(uri)
        return filesystem.get_file_info(path).type == fs.FileType.File


def _predicate(partitions: pl.DataFrame) -> str:
    """``(a = 'x' AND b = 'y') OR ...`` over validated partition values."""
    return " OR ".join(
        "(" + " AND ".join(f"{col} = '{value}'" for col, value in p.items()) + ")"
        for p in partitions.iter_rows(named=True)
    )


def visible_rows(rows: pl.DataFrame, commits: pl.DataFrame, keys: list[str]) -> pl.DataFrame:
    """The rows a reader sees: per partition, the newest committed batch that is present.

    A committed batch counts when its rows are among ``rows`` (read before the
    commit records, so a batch committed meanwhile but not read is skipped) or when
    it committed no rows (an emptied partition). Rows without a batch id predate
    commit points and show only in partitions without a counted batch.

    Parameters
    ----------
    rows
        Stored rows with the partition columns ``keys`` and ``_batch_id``.
    commits
        :meth:`LakeResource.commits` of the same table.
    """
    if not keys:
        raise LakeError("a table written by commit_outcome must be partitioned")
    as_text = [pl.col(k).cast(pl.String).alias(f"__key_{k}") for k in keys]
    key_cols = [f"__key_{k}" for k in keys]
    tagged = rows.with_columns(as_text)
    present = (
        tagged.select(*key_cols, BATCH_COLUMN)
        .unique()
        .with_columns(pl.lit(True).alias("__present"))
    )
    if commits.height == 0:
        chosen = pl.DataFrame(schema={**{k: pl.String for k in key_cols}, BATCH_COLUMN: pl.String})
    else:
        chosen = (
            commits.select(
                *[pl.col(k).cast(pl.String).alias(f"__key_{k}") for k in keys],
                BATCH_COLUMN,
                "rows",
            )
            .join(present, on=[*key_cols, BATCH_COLUMN], how="left")
            .filter(pl.col("__present").fill_null(False) | (pl.col("rows") == 0))
            .group_by(key_cols)
            .agg(pl.col(BATCH_COLUMN).max())
        )
    visible = tagged.join(chosen, on=[*key_cols, BATCH_COLUMN], how="semi")
    legacy = tagged.filter(pl.col(BATCH_COLUMN).is_null()).join(
        chosen.select(key_cols), on=key_cols, how="anti"
    )
    return pl.concat([visible, legacy]).drop(key_cols)
