"""Reading landing files exactly as delivered.

Every value is kept as text: bronze must hold what arrived, including values a
contract will later reject (``"abc"`` in a numeric column, ``"1e400"``), and a
column whose type differs between two drops must not break the bronze table's
schema. Typing happens once, in :func:`pipeline.domain.contracts.apply_contract`.
"""

import re
from pathlib import Path

import polars as pl

from pipeline.domain.errors import DomainError

LANDING_SOURCES = ("claims", "fx_ticks", "loan_book", "loan_scenarios")
_FILE_KEY = re.compile(
    r"^(?P<source>[a-z_]+?)_(?P<key>\d{4}-\d{2}(?:-\d{2})?)(?P<suffix>[A-Za-z0-9_.-]*)"
    r"\.(?P<ext>csv|parquet)$"
)


class LandingFileError(DomainError):
    """A delivered file cannot be read at all."""


def partition_key_of(path: Path) -> tuple[str, str] | None:
    """Return ``(source, partition key)`` encoded in a landing file name.

    ``claims_2026-07.csv`` -> ``("claims", "2026-07")``;
    ``fx_ticks_2026-09-01_resend.parquet`` -> ``("fx_ticks", "2026-09-01")``.
    Files that do not follow the convention (including temporary ``.name.tmp``
    files of a drop in progress) return ``None``.
    """
    match = _FILE_KEY.match(path.name)
    if not match or match["source"] not in LANDING_SOURCES:
        return None
    return match["source"], match["key"]


def landing_files(landing_dir: Path, source: str, partition_key: str) -> list[Path]:
    """Files of ``source`` delivered for ``partition_key``, in name order."""
    folder = landing_dir / source
    if not folder.is_dir():
        return []
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and partition_key_of(p) == (source, partition_key)
    )


def read_as_text(path: Path) -> pl.DataFrame:
    """Read one CSV or Parquet file with every column as text.

    Raises
    ------
    LandingFileError
        Naming the file and the problem: empty file, not UTF-8, truncated or
        corrupt Parquet, ragged CSV.
    """
    if not path.exists():
        raise LandingFileError(f"{path}: file does not exist")
    if path.stat().st_size == 0:
        raise LandingFileError(f"{path}: file is empty (0 bytes)")
    try:
        if path.suffix == ".csv":
            raw = path.read_bytes()
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise LandingFileError(
                    f"{path}: not valid UTF-8 (byte 0x{raw[exc.start]:02x} at offset {exc.start})"
                ) from exc
            frame = pl.read_csv(raw, infer_schema=False)
        elif path.suffix == ".parquet":
            frame = pl.read_parquet(path)
            frame = frame.with_columns(
                [_parquet_column_as_text(c, t) for c, t in frame.schema.items()]
            )
        else:
            raise LandingFileError(f"{path}: unsupported file type {path.suffix!r}")
    except LandingFileError:
        raise
    except Exception as exc:  # polars raises several unrelated types for broken files
        raise LandingFileError(f"{path}: cannot be parsed: {type(exc).__name__}: {exc}") from exc
    if frame.width == 0:
        raise LandingFileError(f"{path}: no columns")
    return frame


def _parquet_column_as_text(col: str, dtype: pl.DataType) -> pl.Expr:
    """Text form of one typed Parquet column.

    Timestamps are written as naive ISO-8601 UTC: a tz-aware column is converted
    to UTC first, otherwise ``strftime`` would print local wall-clock time and a
    tick at 01:30 Paris time would land on the wrong UTC date.
    """
    if isinstance(dtype, pl.Datetime):
        expr = pl.col(col)
        if dtype.time_zone is not None:
            expr = expr.dt.convert_time_zone("UTC")
        return expr.dt.strftime("%Y-%m-%dT%H:%M:%S%.6f")
    return pl.col(col).cast(pl.String)
