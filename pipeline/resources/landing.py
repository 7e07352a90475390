"""The landing zone where upstream systems drop files: a local folder or object storage.

Every read of a delivered file goes through this resource (the ingest assets, the
landing sensors, the label reader), so pointing ``LANDING_DIR`` at ``s3://…`` or
``abfss://…`` moves all of them at once. Paths are handled with pyarrow's filesystem
layer, as the lake's artefact files are; credentials come from the standard variables
the filesystem reads, never from configuration.
"""

import hashlib
from dataclasses import dataclass
from pathlib import Path

import polars as pl
from dagster import ConfigurableResource

from pipeline.domain.landing import (
    COMPLETION_MARKER,
    LandingFileError,
    Utf8Validator,
    parquet_ends_intact,
    partition_key_of,
    text_columns,
    unparseable,
)

READ_CHUNK_BYTES = 8 << 20
"""Bytes read at a time when hashing a delivered file."""


@dataclass(frozen=True)
class LandingFile:
    """One delivered file: where it is and the signature a sensor compares."""

    source: str
    name: str
    size: int
    mtime_ns: int

    @property
    def relative(self) -> str:
        """``<source>/<name>``: how the file is named in lineage columns and messages."""
        return f"{self.source}/{self.name}"

    @property
    def partition_key(self) -> str | None:
        """The partition named in the file name, or ``None`` when it names none."""
        parsed = partition_key_of(Path(self.name))
        return parsed[1] if parsed and parsed[0] == self.source else None

    @property
    def is_temporary(self) -> bool:
        """A hidden file (``.name.tmp``): by convention a drop still being written."""
        return self.name.startswith(".")

    @property
    def is_marker(self) -> bool:
        """An upstream completion marker ``<name>.done``."""
        return self.name.endswith(COMPLETION_MARKER)


class LandingResource(ConfigurableResource):
    """Folder of delivered files, one sub-folder per source.

    Attributes
    ----------
    path
        Root of the landing zone: a local folder (``$PIPELINE_HOME/landing`` by
        default) or an object-store URI.
    settle_s
        Seconds a file's size and modification time must stay unchanged before it
        counts as complete; ``None`` reads ``PIPELINE_LANDING_SETTLE_S``.
    completion
        ``"settle"`` (a settled file, a Parquet file with its footer, or a
        ``<name>.done`` marker) or ``"marker"`` (only the marker); ``None`` reads
        ``PIPELINE_LANDING_COMPLETION``.
    """

    path: str
    settle_s: int | None = None
    completion: str | None = None

    def completion_policy(self) -> tuple[str, int]:
        """``(completion mode, settle seconds)``, from this resource or the settings."""
        from pipeline.settings import LANDING_COMPLETION_MODES, get_settings

        mode, settle_s = self.completion, self.settle_s
        if mode is None or settle_s is None:
            settings = get_settings()
            mode = mode or settings.landing_completion
            settle_s = settings.landing_settle_s if settle_s is None else settle_s
        if mode not in LANDING_COMPLETION_MODES or settle_s < 0:
            raise ValueError(
                f"landing completion {mode!r} with settle {settle_s} s: the mode must be one of "
                f"{', '.join(LANDING_COMPLETION_MODES)} and the interval at least 0 s"
            )
        return mode, settle_s

    @property
    def root(self) -> Path:
        """The landing folder as a local path (for tools that write demo drops)."""
        return Path(self.path)

    def _filesystem(self, relative: str = "") -> tuple[object, str]:
        from pyarrow import fs

        filesystem, base = fs.FileSystem.from_uri(self.path)
        return filesystem, f"{base.rstrip('/')}/{relative}" if relative else base

    def files(self, source: str) -> list[LandingFile]:
        """Every file in ``<root>/<source>``, in name order (hidden temp files too)."""
        from pyarrow import fs

        filesystem, folder = self._filesystem(source)
        if filesystem.get_file_info(folder).type != fs.FileType.Directory:
            return []
        infos = filesystem.get_file_info(fs.FileSelector(folder, recursive=False))
        return sorted(
            (
                LandingFile(source, info.base_name, int(info.size), int(info.mtime_ns or 0))
                for info in infos
                if info.type == fs.FileType.File
            ),
            key=lambda f: f.name,
        )

    def partition_files(self, source: str, partition_key: str) -> list[LandingFile]:
        """Files of ``source`` whose names name ``partition_key``, in name order."""
        return [f for f in self.files(source) if f.partition_key == partition_key]

    def uri(self, relative: str) -> str:
        """Where ``relative`` lives, for messages."""
        return f"{self.path.rstrip('/')}/{relative}"

    def signature(self, relative: str) -> tuple[int, int] | None:
        """``(size, modification time in ns)`` of a file now, ``None`` when it is gone."""
        from pyarrow import fs

        filesystem, path = self._filesystem(relative)
        info = filesystem.get_file_info(path)
        if info.type != fs.FileType.File:
            return None
        return int(info.size), int(info.mtime_ns or 0)

    def exists(self, relative: str) -> bool:
        """Whether a file exists at ``relative`` under the landing root."""
        return self.signature(relative) is not None

    def scan_parsed(self, relative: str) -> pl.LazyFrame:
        """:meth:`scan_as_text` of a file every row of which has been parsed once.

        One streamed pass (a ragged line, a value polars cannot read), in bounded
        memory: 50 million policy rows take a few seconds and no more memory than a
        few batches.

        Raises
        ------
        LandingFileError
            Naming the file and the first problem.
        """
        rows = self.scan_as_text(relative)
        try:
            rows.select(pl.all().count()).collect(engine="streaming")
        except Exception as exc:  # polars raises several unrelated types for broken files
            raise unparseable(self.uri(relative), exc) from exc
        return rows

    def digest(self, relative: str, *, validate: bool = True) -> str:
        """SHA-256 of a delivered file, read in chunks, and (``validate``) that it is readable.

        With ``validate`` a CSV must be UTF-8 and no file may be empty. A drop of tens
        of millions of rows is gigabytes: neither the hash nor the
        check holds the file in memory.

        Raises
        ------
        LandingFileError
            When the file is empty, is a CSV that is not UTF-8 (first invalid byte
            and its offset), vanished or cannot be opened; the message names it.
        """
        filesystem, path = self._filesystem(relative)
        uri = self.uri(relative)
        digest, size = hashlib.sha256(), 0
        utf8 = Utf8Validator(uri) if validate and relative.endswith(".csv") else None
        try:
            with filesystem.open_input_stream(path) as stream:
                while chunk := stream.read(READ_CHUNK_BYTES):
                    digest.update(chunk)
                    if utf8 is not None:
                        utf8.feed(chunk)
                    size += len(chunk)
        except (FileNotFoundError, OSError) as exc:
            raise LandingFileError(f"{uri}: cannot be read: {exc}") from exc
        if validate and size == 0:
            raise LandingFileError(f"{uri}: file is empty (0 bytes)")
        if utf8 is not None:
            utf8.finish()
        return digest.hexdigest()

    def parquet_complete(self, file: LandingFile) -> bool:
        """Whether a Parquet drop ends with its footer, reading 12 bytes of it."""
        filesystem, path = self._filesystem(file.relative)
        try:
            with filesystem.open_input_file(path) as handle:
                size = handle.size()
                head = handle.read_at(4, 0)
                tail = handle.read_at(8, max(0, size - 8))
        except (FileNotFoundError, OSError):
            return False
        return parquet_ends_intact(head, tail, size)

    def scan_as_text(self, relative: str) -> pl.LazyFrame:
        """A lazy read of one delivered file, every column as text (as ``parse_as_text``).

        Nothing is read until the query runs; a file that stops parsing half way
        raises then. Local folders and the object stores polars reads natively.
        """
        uri = self.uri(relative)
        if relative.endswith(".csv"):
            return pl.scan_csv(uri, infer_schema=False)
        if relative.endswith(".parquet"):
            lazy = pl.scan_parquet(uri)
            try:
                schema = lazy.collect_schema()
            except Exception as exc:  # polars raises several unrelated types for broken files
                raise unparseable(uri, exc) from exc
            return lazy.with_columns(text_columns(schema))
        raise LandingFileError(f"{uri}: unsupported file type {Path(relative).suffix!r}")
