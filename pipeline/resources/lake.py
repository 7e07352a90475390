"""The lake: Delta tables at ``<root>/<layer>/<table>`` and files beside them.

All table IO goes through delta-rs. Its commits are atomic, so an interrupted
write leaves the previous version readable, and a partition-scoped overwrite
(``replaceWhere`` via ``predicate``) rewrites one partition without touching the
others. The root may be a local folder or an object-store URI (``s3://``,
``abfss://``); credentials come from the standard environment variables that
delta-rs and pyarrow read, never from configuration.
"""

import re
import time
from collections.abc import Mapping, Sequence

import polars as pl
from dagster import ConfigurableResource
from pydantic import Field

LAYERS = ("bronze", "curated", "quarantine", "gold")
_TABLE = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
_PREDICATE_VALUE = re.compile(r"^[A-Za-z0-9_.:\- |]{1,64}$")
_COLUMN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


class LakeError(ValueError):
    """A table name, layer or partition value is not acceptable."""


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
    """

    root_uri: str
    storage_options: dict[str, str] = Field(default_factory=dict)
    commit_retries: int = 5

    # --- naming -----------------------------------------------------------------
    def table_uri(self, layer: str, table: str) -> str:
        """URI of ``<root>/<layer>/<table>`` after validating both names."""
        if layer not in LAYERS:
            raise LakeError(f"layer {layer!r} is not one of {', '.join(LAYERS)}")
        if not _TABLE.match(table):
            raise LakeError(f"table name {table!r} must match {_TABLE.pattern}")
        return f"{self.root_uri.rstrip('/')}/{layer}/{table}"

    def file_uri(self, layer: str, *parts: str) -> str:
        """URI of an artefact file (e.g. a netCDF posterior) under a layer folder."""
        for part in parts:
            if not re.match(r"^[A-Za-z0-9_.=\-]{1,128}$", part) or part in (".", ".."):
                raise LakeError(f"path component {part!r} is not safe")
        return "/".join([self.table_uri(layer, parts[0]), *parts[1:]])

    # --- tables -------------------------------------------------------------------
    def exists(self, layer: str, table: str) -> bool:
        """Whether a Delta table exists at that location."""
        from deltalake import DeltaTable

        return DeltaTable.is_deltatable(
            self.table_uri(layer, table), storage_options=self.storage_options or None
        )

    def version(self, layer: str, table: str) -> int | None:
        """Current Delta version, or ``None`` when the table does not exist."""
        from deltalake import DeltaTable

        if not self.exists(layer, table):
            return None
        return DeltaTable(
            self.table_uri(layer, table), storage_options=self.storage_options or None
        ).version()

    def read(
        self,
        layer: str,
        table: str,
        where: Mapping[str, str | list[str]] | None = None,
        *,
        columns: list[str] | None = None,
    ) -> pl.DataFrame:
        """Read a table, optionally filtered by equality on partition columns.

        Returns an empty frame when the table does not exist yet, because a
        partition that was never written has no rows, which callers decide about.
        """
        if not self.exists(layer, table):
            return pl.DataFrame()
        lazy = pl.scan_delta(
            self.table_uri(layer, table), storage_options=self.storage_options or None
        )
        for col, value in (where or {}).items():
            values = value if isinstance(value, list) else [value]
            lazy = lazy.filter(pl.col(col).is_in(values))
        if columns:
            lazy = lazy.select(columns)
        return lazy.collect()

    def overwrite_partition(
        self, layer: str, table: str, frame: pl.DataFrame, partition: Mapping[str, str]
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
        frame: pl.DataFrame,
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
                if not _COLUMN.match(col):
                    raise LakeError(f"{layer}/{table}: partition column {col!r} is not safe")
                if not _PREDICATE_VALUE.match(value) or ".." in value:
                    raise LakeError(f"{layer}/{table}: partition value {value!r} is not safe")
        missing = [c for c in columns if c not in frame.columns]
        if missing:
            raise LakeError(f"{layer}/{table}: frame lacks partition column(s) {missing}")
        allowed = pl.DataFrame(
            [dict(p) for p in partitions], schema={c: pl.String for c in columns}
        ).unique()
        stray = frame.select(pl.col(c).cast(pl.String) for c in columns).join(
            allowed, on=columns, how="anti"
        )
        if stray.height:
            first = stray.row(0, named=True)
            raise LakeError(
                f"{layer}/{table}: {stray.height} row(s) lie outside the partitions being "
                f"written (e.g. {first}); refusing to write outside them"
            )
        predicate = " OR ".join(
            "(" + " AND ".join(f"{col} = '{value}'" for col, value in p.items()) + ")"
            for p in allowed.iter_rows(named=True)
        )
        return self._write(
            layer, table, frame, mode="overwrite", predicate=predicate, partition_by=columns
        )

    def append(self, layer: str, table: str, frame: pl.DataFrame) -> int:
        """Append rows (event logs such as ``gold/model_events``)."""
        return self._write(layer, table, frame, mode="append")

    def _write(self, layer: str, table: str, frame: pl.DataFrame, **kwargs) -> int:
        from deltalake import DeltaTable, write_deltalake
        from deltalake.exceptions import CommitFailedError

        uri = self.table_uri(layer, table)
        data = frame.to_arrow()
        for attempt in range(self.commit_retries):
            try:
                write_deltalake(
                    uri,
                    data,
                    schema_mode="merge" if kwargs.get("mode") == "append" else None,
                    storage_options=self.storage_options or None,
                    **kwargs,
                )
                break
            except CommitFailedError:
                if attempt == self.commit_retries - 1:
                    raise
                time.sleep(0.2 * 2**attempt)
        return DeltaTable(uri, storage_options=self.storage_options or None).version()

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
