"""Lake maintenance: remove what killed writers left behind and keep every table's history bounded.

A writer killed with ``SIGKILL`` after writing Parquet files but before its Delta
commit leaves *orphaned* files that no version references; a writer killed between
the append of a batch and its commit record (:meth:`LakeResource.commit_outcome`)
leaves rows that no reader sees. Nothing in the write path can remove them (the
writer is dead), so ``pipeline maintenance`` does, for every table of the lake:

1. on tables written through commit points, deletes the rows of batches that
   readers never see again: batches superseded by a newer committed batch of the
   same partition, and batches never committed that are older than the retention;
2. vacuums the table with delta-rs in *full* mode
   (``DeltaTable.vacuum(retention_hours=..., full=True, enforce_retention_duration=False)``):
   files no version within the retention references, including orphans older than
   the retention, are deleted; every version committed within the retention stays
   readable. A writer killed *while* writing a file on a local disk leaves the file
   under its staging name (``part-….parquet#1``), which the vacuum does not list:
   those older than the retention are deleted too (on S3 or ADLS an unfinished
   upload is not an object; a lifecycle rule aborting incomplete multipart uploads
   cleans it);
3. writes a checkpoint and lets delta-rs drop log files older than the table's log
   retention (``create_checkpoint``, ``cleanup_metadata``).

The append-only ``ops`` tables are compacted first (``optimize.compact``): every read
of a curated table reads ``ops/ingest_commits``, one small file per commit otherwise.

The retention (``PIPELINE_VACUUM_RETENTION_HOURS``, default 168 h) also protects
writers in flight: their files are younger than it, so they are never taken for
orphans. It must exceed the longest write.
"""

import datetime as dt
import re
from dataclasses import dataclass

import polars as pl

from pipeline.resources.lake import (
    BATCH_COLUMN,
    COMMITS_TABLE,
    LAYERS,
    LakeError,
    LakeResource,
    batch_time,
    visible_rows,
)


@dataclass(frozen=True)
class TableMaintenance:
    """What maintenance did to one table.

    Attributes
    ----------
    rows_deleted
        Rows of superseded or abandoned batches deleted (commit-point tables only).
    files_removed, bytes_removed
        Files the vacuum deleted and their total size.
    version
        The table's version after maintenance (checkpointed).
    """

    layer: str
    table: str
    rows_deleted: int
    files_removed: int
    bytes_removed: int
    version: int

    def line(self) -> str:
        """One line of the ``pipeline maintenance`` report."""
        return (
            f"{self.layer}/{self.table}: {self.rows_deleted} invisible rows deleted, "
            f"{self.files_removed} files ({self.bytes_removed} bytes) vacuumed, "
            f"checkpoint at version {self.version}"
        )


def lake_tables(lake: LakeResource) -> list[tuple[str, str]]:
    """Every Delta table of the lake as ``(layer, table)``, in layer then name order."""
    from pyarrow import fs

    filesystem, root = fs.FileSystem.from_uri(lake.root_uri)
    found = []
    for layer in LAYERS:
        folder = f"{root.rstrip('/')}/{layer}"
        if filesystem.get_file_info(folder).type != fs.FileType.Directory:
            continue
        for info in filesystem.get_file_info(fs.FileSelector(folder, recursive=False)):
            if info.type != fs.FileType.Directory:
                continue
            try:
                if lake.exists(layer, info.base_name):
                    found.append((layer, info.base_name))
            except LakeError:
                continue  # a folder whose name is not a table name is not a table
    return sorted(found, key=lambda t: (LAYERS.index(t[0]), t[1]))


def invisible_batches(
    lake: LakeResource, layer: str, table: str, *, retention_hours: int, now: dt.datetime
) -> pl.DataFrame:
    """Partition values and batch ids of stored rows no reader sees again.

    A batch is dropped from a partition when a newer batch is visible there, or when
    it was never committed and is older than the retention (a writer killed before
    its commit record). An uncommitted batch younger than the retention may belong to
    a writer still running, and a batch older than the visible one may still be read
    by a reader that resolved the commits a moment ago: both stay until a later run.
    """
    stored = lake.read(layer, table, committed=False)
    if stored.height == 0 or BATCH_COLUMN not in stored.columns:
        return pl.DataFrame()
    keys = _partition_columns(lake, layer, table)
    commits = lake.commits(layer, table)
    present = stored.select(*keys, BATCH_COLUMN).unique().with_columns(pl.col(keys).cast(pl.String))
    visible = (
        visible_rows(present, commits, keys)
        .filter(pl.col(BATCH_COLUMN).is_not_null())
        .group_by(keys)
        .agg(pl.col(BATCH_COLUMN).max().alias("__visible"))
    )
    committed = set(commits[BATCH_COLUMN].to_list()) if commits.height else set()
    cutoff = now - dt.timedelta(hours=retention_hours)
    candidates = present.filter(pl.col(BATCH_COLUMN).is_not_null()).join(
        visible, on=keys, how="left"
    )
    superseded = pl.col("__visible").is_not_null() & (pl.col(BATCH_COLUMN) < pl.col("__visible"))
    abandoned = pl.col(BATCH_COLUMN).map_elements(
        lambda b: b not in committed and batch_time(b) < cutoff, return_dtype=pl.Boolean
    )
    return candidates.filter(superseded | abandoned).select(*keys, BATCH_COLUMN)


def maintain_table(
    lake: LakeResource,
    layer: str,
    table: str,
    *,
    retention_hours: int,
    now: dt.datetime | None = None,
) -> TableMaintenance:
    """Delete invisible batches, vacuum, checkpoint and clean the log of one table."""
    now = now or dt.datetime.now(dt.UTC).replace(tzinfo=None)
    rows_deleted = 0
    if layer != "ops" or table != COMMITS_TABLE:
        doomed = invisible_batches(lake, layer, table, retention_hours=retention_hours, now=now)
        if doomed.height:
            rows_deleted = lake.delete_batches(layer, table, doomed)
    loaded = lake.delta_table(layer, table)
    if loaded is None:
        raise LakeError(f"{layer}/{table}: not a Delta table")
    if layer == "ops":
        # append-only logs grow one small file per write, and every read of a curated
        # table reads ops/ingest_commits: compacting keeps that read cheap
        loaded.optimize.compact()
    candidates = loaded.vacuum(
        retention_hours=retention_hours,
        dry_run=True,
        enforce_retention_duration=False,
        full=True,
    )
    sizes = _sizes(lake.table_uri(layer, table), candidates)
    removed = loaded.vacuum(
        retention_hours=retention_hours,
        dry_run=False,
        enforce_retention_duration=False,
        full=True,
    )
    staged = _sweep_staged_files(
        lake.table_uri(layer, table), now - dt.timedelta(hours=retention_hours)
    )
    sizes.update(staged)
    removed = [*removed, *staged]
    loaded.create_checkpoint()
    loaded.cleanup_metadata()
    return TableMaintenance(
        layer,
        table,
        rows_deleted,
        len(removed),
        sum(sizes.get(path, 0) for path in removed),
        loaded.version(),
    )


def maintain_lake(
    lake: LakeResource, *, retention_hours: int, now: dt.datetime | None = None
) -> list[TableMaintenance]:
    """:func:`maintain_table` on every table of the lake (see :func:`lake_tables`)."""
    if retention_hours < 1:
        raise LakeError(
            f"retention of {retention_hours} h would delete the files of writes in flight; "
            "use at least 1 h"
        )
    return [
        maintain_table(lake, layer, table, retention_hours=retention_hours, now=now)
        for layer, table in lake_tables(lake)
    ]


def _partition_columns(lake: LakeResource, layer: str, table: str) -> list[str]:
    loaded = lake.delta_table(layer, table)
    return [] if loaded is None else list(loaded.metadata().partition_columns)


_STAGED = re.compile(r"\.parquet#\d+$")


def _sweep_staged_files(table_uri: str, cutoff: dt.datetime) -> dict[str, int]:
    """Delete data files a killed writer left under their staging name, if older than ``cutoff``.

    Returns their paths (relative to the table) and sizes.
    """
    from pyarrow import fs

    filesystem, root = fs.FileSystem.from_uri(table_uri)
    root = root.rstrip("/")
    deleted = {}
    for info in filesystem.get_file_info(fs.FileSelector(root, recursive=True)):
        relative = info.path[len(root) + 1 :]
        if (
            info.type != fs.FileType.File
            or relative.startswith("_delta_log")
            or not _STAGED.search(relative)
            or info.mtime is None
            or info.mtime.replace(tzinfo=None) >= cutoff
        ):
            continue
        filesystem.delete_file(info.path)
        deleted[relative] = int(info.size or 0)
    return deleted


def _sizes(table_uri: str, relative_paths: list[str]) -> dict[str, int]:
    """Size in bytes of files under a table, by their path relative to it."""
    from pyarrow import fs

    filesystem, root = fs.FileSystem.from_uri(table_uri)
    infos = filesystem.get_file_info([f"{root.rstrip('/')}/{p}" for p in relative_paths])
    return {
        path: int(info.size or 0)
        for path, info in zip(relative_paths, infos, strict=True)
        if info.type == fs.FileType.File
    }
