"""Reading landing files exactly as delivered.

Every value is kept as text: bronze must hold what arrived, including values a
contract will later reject (``"abc"`` in a numeric column, ``"1e400"``), and a
column whose type differs between two drops must not break the bronze table's
schema. Typing happens once, in :func:`pipeline.domain.contracts.apply_contract`.
"""

import io
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


def read_as_text(path: Path) -> pl.DataFrame:
    """Read one local CSV or Parquet file with every column as text (see :func:`parse_as_text`).

    Raises
    ------
    LandingFileError
        When the file does not exist or cannot be parsed.
    """
    if not path.exists():
        raise LandingFileError(f"{path}: file does not exist")
    return parse_as_text(str(path), path.read_bytes())


def parse_as_text(name: str, payload: bytes) -> pl.DataFrame:
    """Parse the bytes of one delivered CSV or Parquet file with every column as text.

    Parameters
    ----------
    name
        The file's name or relative path: its suffix picks the format, and every
        error message names it.

    Raises
    ------
    LandingFileError
        Naming the file and the problem: empty file, not UTF-8, truncated or
        corrupt Parquet, ragged CSV.
    """
    suffix = Path(name).suffix
    if not payload:
        raise LandingFileError(f"{name}: file is empty (0 bytes)")
    try:
        if suffix == ".csv":
            try:
                payload.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise LandingFileError(
                    f"{name}: not valid UTF-8 (byte 0x{payload[exc.start]:02x} at offset "
                    f"{exc.start})"
                ) from exc
            frame = pl.read_csv(payload, infer_schema=False)
        elif suffix == ".parquet":
            frame = pl.read_parquet(io.BytesIO(payload))
            frame = frame.with_columns(
                [_parquet_column_as_text(c, t) for c, t in frame.schema.items()]
            )
        else:
            raise LandingFileError(f"{name}: unsupported file type {suffix!r}")
    except LandingFileError:
        raise
    except Exception as exc:  # polars raises several unrelated types for broken files
        raise LandingFileError(f"{name}: cannot be parsed: {type(exc).__name__}: {exc}") from exc
    if frame.width == 0:
        raise LandingFileError(f"{name}: no columns")
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
