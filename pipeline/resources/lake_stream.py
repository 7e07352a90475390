"""Writing more rows than fit in memory into a Delta table, as one commit.

``write_deltalake`` given an Arrow stream holds the whole stream before it writes
(measured with delta-rs 1.6: 1.4 GB for 20 million short rows, growing with the row
count). A month of 50 million policies cannot go through it. So a stream is written
the way Delta writers work underneath: each batch goes to Parquet data files under the
table (one rolling file per partition, a few batches in memory), and then one
transaction adds them all (``create_write_transaction``), replacing the partitions
being overwritten. Until that commit the files are invisible to every reader; a
failed stream deletes what it wrote, and anything a killed process left is removed by
``VACUUM`` (``pipeline maintenance``) like any uncommitted file.
"""

import datetime as dt
import json
import re
import secrets
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl

if TYPE_CHECKING:
    import pyarrow as pa

STREAM_BATCH_ROWS = 200_000
"""Rows per batch when a :class:`FrameStream` is produced from a lazy query."""
FILE_ROWS = 4_000_000
"""Rows per data file of a streamed write (a partition of 50M rows is 13 files)."""
_UNSAFE_PATH = re.compile(r"[^A-Za-z0-9_.\-]")


class LakeError(ValueError):
    """A table name, layer or partition value is not acceptable."""


@dataclass(frozen=True)
class FrameStream:
    """Rows too many to hold at once: their schema and a way to produce them in batches.

    The lake writes a stream batch by batch into one Delta commit, so a month of 50
    million policies goes from its landing file to bronze, or from spill files to a
    quarantine, in the memory of a few batches. ``batches`` is called once per write;
    every batch must have ``schema``'s columns and types. An exception a batch raises
    (a landing file that stops parsing half way) aborts the write before anything is
    committed and reaches the caller as raised.
    """

    schema: pl.Schema
    batches: Callable[[], Iterator[pl.DataFrame]]

    @classmethod
    def of(cls, lazy: pl.LazyFrame, batch_rows: int = STREAM_BATCH_ROWS) -> "FrameStream":
        """A lazy query (a scan of files) run by polars' streaming engine, batch by batch."""
        return cls(
            lazy.collect_schema(),
            lambda: iter(lazy.collect_batches(chunk_size=batch_rows, lazy=True)),
        )

    @classmethod
    def of_files(cls, paths: list[Path]) -> "FrameStream":
        """Local Parquet files of one schema (spill files), read one file at a time.

        Reading them through a lazy scan would let polars read ahead across files; one
        file at a time holds exactly one file's rows.
        """
        if not paths:
            raise ValueError("a stream of files needs at least one file")
        schema = pl.read_parquet_schema(paths[0])
        return cls(pl.Schema(schema), lambda: (pl.read_parquet(p) for p in paths))

    @property
    def columns(self) -> list[str]:
        """Column names, in order."""
        return self.schema.names()

    def collect(self) -> pl.DataFrame:
        """Every row in memory at once: for small streams and tests only."""
        return pl.concat(
            [pl.DataFrame(schema=self.schema), *(b.select(self.columns) for b in self.batches())]
        )

    def with_constant(self, name: str, value: str) -> "FrameStream":
        """The same rows with a text column holding ``value`` (a batch id)."""
        schema = pl.Schema({**self.schema, name: pl.String()})
        return FrameStream(
            schema, lambda: (b.with_columns(pl.lit(value).alias(name)) for b in self.batches())
        )


Rows = pl.DataFrame | FrameStream
"""What a lake write takes: rows in memory, or a stream of batches."""


def partition_counts(frame: pl.DataFrame, columns: list[str]) -> dict[str, int]:
    """Rows per partition, keyed by the partition values joined with the unit separator."""
    return dict(
        frame.select(pl.col(c).cast(pl.String) for c in columns)
        .group_by(columns)
        .len()
        .select(pl.concat_str(columns, separator="\x1f"), "len")
        .iter_rows()
    )


@dataclass
class StreamedFiles:
    """The data files one stream was written to, ready to be committed.

    Attributes
    ----------
    counts
        Rows per partition (:func:`partition_counts` keys).
    """

    actions: list[Any] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)


def write_stream_files(
    table_uri: str,
    stream: FrameStream,
    *,
    where: str,
    columns: list[str],
    allowed: pl.DataFrame,
    file_rows: int = FILE_ROWS,
) -> StreamedFiles:
    """Write a stream into Parquet data files under ``table_uri``, checking every batch.

    Each row must lie in one of the ``allowed`` partitions (values of ``columns``);
    a stray row, or an exception of the stream itself, deletes the files written so
    far and is raised. Partition columns are not stored in the files (Delta keeps
    them in the commit), as every Delta writer does.
    """
    import pyarrow.parquet as pq
    from pyarrow import fs

    filesystem, base = fs.FileSystem.from_uri(table_uri)
    file_schema = _arrow_schema(stream.schema, exclude=columns)
    prefix = f"part-{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%S}-{secrets.token_hex(4)}"
    written = StreamedFiles()
    open_files: dict[tuple, tuple[Any, str, dict[str, str], int]] = {}

    def close(key: tuple) -> None:
        writer, relative, values, rows = open_files.pop(key)
        writer.close()
        size = filesystem.get_file_info(f"{base}/{relative}").size
        written.actions.append(_add_action(relative, int(size), values, rows))

    def write(key: tuple, values: dict[str, str], rows: pl.DataFrame) -> None:
        if key not in open_files:
            folder = "/".join(f"{c}={_UNSAFE_PATH.sub('_', v)}" for c, v in values.items())
            relative = f"{folder}/" if folder else ""
            relative += f"{prefix}-{len(written.paths):05d}.parquet"
            filesystem.create_dir(f"{base}/{relative}".rsplit("/", 1)[0], recursive=True)
            written.paths.append(f"{base}/{relative}")
            writer = pq.ParquetWriter(
                filesystem.open_output_stream(f"{base}/{relative}"),
                file_schema,
                compression="zstd",
            )
            open_files[key] = (writer, relative, values, 0)
        writer, relative, values, count = open_files[key]
        writer.write_table(rows.to_arrow().select(file_schema.names).cast(file_schema))
        open_files[key] = (writer, relative, values, count + rows.height)
        if count + rows.height >= file_rows:
            close(key)

    try:
        for batch in stream.batches():
            batch = batch.select(stream.columns)
            if batch.height == 0:
                continue
            if not columns:
                write((), {}, batch)
                continue
            keys = batch.select(pl.col(c).cast(pl.String) for c in columns)
            stray = keys.join(allowed, on=columns, how="anti")
            if stray.height:
                raise LakeError(
                    f"{where}: {stray.height} row(s) of a batch lie outside the partitions "
                    f"being written (e.g. {stray.row(0, named=True)}); refusing to write "
                    "outside them"
                )
            written.counts.update(partition_counts(keys, columns))
            as_text = batch.with_columns(pl.col(c).cast(pl.String) for c in columns)
            parts = as_text.partition_by(columns, as_dict=True, maintain_order=True)
            for values, part in parts.items():
                write(values, dict(zip(columns, values, strict=True)), part)
        for key in list(open_files):
            close(key)
    except BaseException:
        for writer, *_ in open_files.values():
            writer.close()
        for path in written.paths:
            filesystem.delete_file(path)
        raise
    return written


def _add_action(relative: str, size: int, values: dict[str, str], rows: int) -> Any:
    from deltalake.transaction import AddAction

    return AddAction(
        path=relative,
        size=size,
        partition_values=values,
        modification_time=int(dt.datetime.now(dt.UTC).timestamp() * 1000),
        data_change=True,
        stats=json.dumps({"numRecords": rows}),
    )


def _arrow_schema(schema: pl.Schema, exclude: list[str] = ()) -> "pa.Schema":
    kept = pl.Schema({c: t for c, t in schema.items() if c not in exclude})
    return pl.DataFrame(schema=kept).to_arrow().schema


def table_schema(stream: FrameStream, existing: "pa.Schema | None") -> "pa.Schema":
    """The table's schema after the write: the existing columns, then the stream's new ones.

    Committing only the stream's schema would drop a column that this delivery lacks
    but older partitions hold.
    """
    import pyarrow as pa

    incoming = _arrow_schema(stream.schema)
    if existing is None:
        return incoming
    names = set(existing.names)
    return pa.schema([*existing, *(f for f in incoming if f.name not in names)])
