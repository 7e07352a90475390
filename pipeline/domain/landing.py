"""Landing files: what their names mean, when they are complete, and reading them as delivered.

Every value is kept as text: bronze must hold what arrived, including values a
contract will later reject (``"abc"`` in a numeric column, ``"1e400"``), and a
column whose type differs between two drops must not break the bronze table's
schema. Typing happens once, in :func:`pipeline.domain.contracts.apply_contract`.

A file the platform cannot place is never ignored: :func:`landing_name_problem`
says what is wrong with a name (another separator, an upper-case or compressed
extension, a date written another way, another source's file), and the landing
sensor reports it. A file is ingested only once complete
(:func:`is_settled`, :func:`parquet_footer_intact`, or an upstream ``<name>.done``
marker).
"""

import codecs
import io
import re
from pathlib import Path

import polars as pl

from pipeline.domain.errors import DomainError

LANDING_SOURCES = ("claims", "fx_ticks", "fx_incidents", "loan_book", "loan_scenarios")
KEY_FORMATS = {
    "claims": "YYYY-MM",
    "fx_ticks": "YYYY-MM-DD",
    "fx_incidents": "YYYY-MM-DD",
    "loan_book": "YYYY-MM-DD",
    "loan_scenarios": "YYYY-MM-DD",
}
"""How each source writes its partition in a file name."""
COMPLETION_MARKER = ".done"
"""Suffix of the empty file an upstream writes once ``<name>`` is complete."""
COMPRESSED_SUFFIXES = (".gz", ".gzip", ".zip", ".bz2", ".xz", ".zst", ".7z", ".tgz", ".lz4")
_PARQUET_MAGIC = b"PAR1"
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


def expected_name(source: str) -> str:
    """The naming convention of ``source``, as written in messages."""
    return f"{source}_<{KEY_FORMATS.get(source, 'YYYY-MM-DD')}>[_suffix].csv|parquet"


def landing_name_problem(source: str, name: str) -> str | None:
    """Why ``name`` in the landing folder of ``source`` names no partition of it, if it does not.

    Returns ``None`` for a name that follows the convention, else one sentence a
    data owner can act on: the extension is upper-case or compressed, the separator
    after the source is not ``_``, the date is written another way, or the file
    belongs to another source's folder.
    """
    parsed = partition_key_of(Path(name))
    if parsed is not None and parsed[0] == source:
        return None
    expected = f"expected {expected_name(source)}"
    if parsed is not None:
        return f"names source {parsed[0]!r} but lies in the {source!r} folder; {expected}"
    suffix = Path(name).suffix
    lowered = name.lower()
    if lowered.endswith(COMPRESSED_SUFFIXES):
        return f"compressed ({suffix}): deliver uncompressed .csv or .parquet; {expected}"
    if lowered.endswith((".csv", ".parquet")) and not name.endswith((".csv", ".parquet")):
        return f"extension {suffix!r} must be lower-case .csv or .parquet; {expected}"
    if not lowered.endswith((".csv", ".parquet")):
        return f"extension {suffix or '(none)'!r} is not .csv or .parquet; {expected}"
    if not name.startswith(f"{source}_"):
        if name.startswith(source):
            return f"the separator after {source!r} must be '_'; {expected}"
        if lowered.startswith(source):
            return f"must start with '{source}_' in lower case; {expected}"
        return f"does not start with '{source}_'; {expected}"
    return f"no {KEY_FORMATS.get(source, 'YYYY-MM-DD')} date right after '{source}_'; {expected}"


def is_settled(*, first_seen_s: float, mtime_ns: int, now_s: float, settle_s: float) -> bool:
    """Whether a file's size and modification time have been stable for ``settle_s``.

    Stable since the sensor first saw this ``(size, mtime)`` (``first_seen_s``, the
    sensor's clock), or last modified at least ``settle_s`` ago by the file's own
    time: a copy in progress keeps moving its modification time, and a copy that
    preserves an old one (``cp -p``, ``rsync -t``) sets it only once complete.
    """
    return now_s - first_seen_s >= settle_s or now_s - mtime_ns / 1e9 >= settle_s


def parquet_footer_intact(payload: bytes) -> bool:
    """Whether ``payload`` ends with a whole Parquet footer.

    Parquet is self-delimiting: a writer appends the footer (its length and the
    ``PAR1`` magic) last, so a file written in place without one is incomplete.
    """
    return parquet_ends_intact(payload[:4], payload[-8:], len(payload))


def parquet_ends_intact(head: bytes, tail: bytes, size: int) -> bool:
    """:func:`parquet_footer_intact` from the first 4 and last 8 bytes of a file of ``size``."""
    if size < 12 or head[:4] != _PARQUET_MAGIC or tail[-4:] != _PARQUET_MAGIC:
        return False
    footer_length = int.from_bytes(tail[-8:-4], "little")
    return 0 < footer_length <= size - 12


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


def unparseable(name: str, exc: Exception) -> LandingFileError:
    """The error for a file polars could not parse, naming the file and polars' reason.

    polars raises several unrelated exception types for broken files; every reader of
    delivered files reports them in this one form.
    """
    return LandingFileError(f"{name}: cannot be parsed: {type(exc).__name__}: {exc}")


class Utf8Validator:
    """Checks that a file is UTF-8 as its bytes arrive in chunks (a drop may be gigabytes).

    Feed every chunk in order, then :meth:`finish`; the first invalid byte raises the
    same error a whole-file check would, with its offset in the file.
    """

    def __init__(self, name: str):
        self.name = name
        self._decoder = codecs.getincrementaldecoder("utf-8")()
        self._offset = 0

    def feed(self, chunk: bytes, *, final: bool = False) -> None:
        """Validate the next chunk (``final`` once the file has ended)."""
        pending = len(self._decoder.getstate()[0])
        try:
            self._decoder.decode(chunk, final=final)
        except UnicodeDecodeError as exc:
            at = self._offset - pending + exc.start
            raise LandingFileError(
                f"{self.name}: not valid UTF-8 (byte 0x{exc.object[exc.start]:02x} at offset {at})"
            ) from exc
        self._offset += len(chunk)

    def finish(self) -> None:
        """The file has ended: a multi-byte character cut off at its end is invalid."""
        self.feed(b"", final=True)


def text_columns(schema: pl.Schema) -> list[pl.Expr]:
    """Expressions turning the typed columns of a Parquet drop into text, as bronze stores them."""
    return [_parquet_column_as_text(c, t) for c, t in schema.items()]


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
            Utf8Validator(name).feed(payload, final=True)
            frame = pl.read_csv(payload, infer_schema=False)
        elif suffix == ".parquet":
            frame = pl.read_parquet(io.BytesIO(payload))
            frame = frame.with_columns(text_columns(frame.schema))
        else:
            raise LandingFileError(f"{name}: unsupported file type {suffix!r}")
    except LandingFileError:
        raise
    except Exception as exc:  # polars raises several unrelated types for broken files
        raise unparseable(name, exc) from exc
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
