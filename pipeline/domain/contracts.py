"""Data contracts: what a delivered row must satisfy to be published.

A contract turns a bronze frame (every column text, exactly as delivered, plus
lineage columns) into two frames: curated rows, typed and clean, and quarantined
rows, each with the reason it was rejected. Nothing is dropped silently: every
input row ends up in exactly one of the two, which :func:`apply_contract`
guarantees and the reconciliation checks verify on what was stored.
"""

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import polars as pl

from pipeline.domain.errors import DomainError

LINEAGE_COLUMNS = (
    "_source_file",
    "_source_sha256",
    "_row_number",
    "_ingested_at",
    "_delivered_at",
    "_partition_key",
)
QUARANTINE_COLUMNS = ("partition_key", "_source_file", "_row_number", "reason", "record")
RESERVED_COLUMNS = (*LINEAGE_COLUMNS, "_batch_id")
"""Column names the platform adds; a delivered column may not take one of them."""
_UNSTORABLE_CHARACTERS = frozenset(" ,;{}()\n\t=")
"""Characters a Delta column name may not hold without column mapping (Spark refuses them)."""

SYMBOL_PATTERN = re.compile(r"^[A-Z0-9]{3,12}$")


class ContractError(DomainError):
    """A delivery breaks its contract as a whole (not row by row)."""


class InvalidSymbolError(ContractError):
    """A currency-pair name cannot be made into a safe partition key."""


def normalise_symbol(raw: str) -> str:
    """Return the canonical partition key of a currency-pair name.

    Upstream sends ``EUR/USD``, ``eur/usd``, ``EUR-USD`` or ``eur_usd`` for the
    same pair. Separators are removed and letters upper-cased; whatever remains
    must match ``[A-Z0-9]{3,12}``, so that a key like ``../etc`` can never
    reach a file path, a Delta predicate or an MLflow model name.

    Raises
    ------
    InvalidSymbolError
        When the cleaned name does not match the pattern.
    """
    if not isinstance(raw, str):
        raise InvalidSymbolError(f"symbol {raw!r} is not text")
    cleaned = re.sub(r"[/\-_ ]", "", raw.strip()).upper()
    if not SYMBOL_PATTERN.match(cleaned):
        raise InvalidSymbolError(
            f"symbol {raw!r} normalises to {cleaned!r}, which does not match [A-Z0-9]{{3,12}}"
        )
    return cleaned


def try_normalise_symbol(raw: str | None) -> str | None:
    """Like :func:`normalise_symbol`, returning ``None`` instead of raising."""
    try:
        return normalise_symbol(raw) if raw is not None else None
    except InvalidSymbolError:
        return None


def normalise_symbols(raw: pl.Series) -> pl.Series:
    """:func:`try_normalise_symbol` over a column, one Python call per distinct name.

    A day of ticks repeats a handful of names millions of times; mapping the distinct
    names and replacing keeps the cost independent of the row count.
    """
    distinct = raw.drop_nulls().unique()
    mapping = {name: try_normalise_symbol(name) for name in distinct.to_list()}
    return raw.replace_strict(mapping, default=None, return_dtype=pl.String)


@dataclass(frozen=True)
class RowRule:
    """A row-level rule: ``violated`` is true for rows that break it."""

    reason: str
    violated: Callable[[], pl.Expr]


@dataclass(frozen=True)
class Contract:
    """The published shape of one curated table.

    Attributes
    ----------
    table
        Curated table name.
    columns
        Delivered column name to target dtype, in output order.
    key
        Columns that must be unique within one partition.
    rules
        Row rules checked after typing.
    derived
        Expressions evaluated after typing to add or replace columns
        (e.g. the normalised symbol or the spread).
    personal
        Declared text columns holding personal data (names, contact and payment
        details, free-text notes): optional in a delivery, never published by the
        contract's curated rows and withheld from quarantine records. The PII scan
        (:mod:`pipeline.domain.pii`) publishes them redacted or tokenised.
    optional
        Declared columns a file must carry but whose value may be blank, e.g. a
        free-text note.
    """

    table: str
    columns: dict[str, pl.DataType]
    key: tuple[str, ...]
    rules: tuple[RowRule, ...] = ()
    derived: tuple[pl.Expr, ...] = field(default_factory=tuple)
    personal: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()

    @property
    def required_columns(self) -> tuple[str, ...]:
        """Columns a delivered file must carry."""
        return tuple(self.columns)


def _finite(col: str) -> pl.Expr:
    return pl.col(col).is_finite()


def _not_nan(*cols: str) -> pl.Expr:
    """True where none of ``cols`` is NaN.

    polars orders NaN above every number, so ``NaN > ask`` or ``pd > 1`` is true;
    range rules are ANDed with this so a NaN row is quarantined for being NaN,
    not also for a comparison it did not fail.
    """
    return pl.all_horizontal([~pl.col(c).is_nan() for c in cols])


_NAIVE_DATETIME_FORMATS = ("%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f", "%Y-%m-%d")
_OFFSET_DATETIME_FORMATS = ("%Y-%m-%dT%H:%M:%S%.f%#z", "%Y-%m-%d %H:%M:%S%.f%#z")


def _parse_utc_datetime(raw: pl.Expr) -> pl.Expr:
    """Parse ISO-8601 text to naive UTC microseconds, row by row.

    Explicit formats instead of polars' inference: inference picks one format
    from the first parseable value, so a file whose first tick carries ``Z`` or
    ``+02:00`` would turn the whole column tz-aware (breaking the table schema)
    and null every naive row. Offsets are converted to UTC, then dropped.
    """
    naive = [raw.str.to_datetime(f, time_unit="us", strict=False) for f in _NAIVE_DATETIME_FORMATS]
    offset = [
        raw.str.to_datetime(f, time_unit="us", time_zone="UTC", strict=False).dt.replace_time_zone(
            None
        )
        for f in _OFFSET_DATETIME_FORMATS
    ]
    return pl.coalesce([*naive, *offset])


def _cast(col: str, dtype: pl.DataType) -> pl.Expr:
    raw = pl.col(col).str.strip_chars()
    if dtype == pl.Datetime("us"):
        return _parse_utc_datetime(raw).alias(col)
    if dtype == pl.Date:
        return raw.str.to_date(strict=False).alias(col)
    return raw.cast(dtype, strict=False).alias(col)


def typed_key(contract: Contract) -> list[pl.Expr]:
    """The contract's key columns typed exactly as :func:`apply_contract` types them.

    Two delivered values that become the same key (``" P1"`` and ``"P1"``) give the
    same typed value, so rows bucketed on it meet their duplicates in one bucket.
    """
    return [_cast(k, contract.columns[k]) for k in contract.key]


def check_required_columns(columns: Sequence[str], contract: Contract, source_file: str) -> None:
    """Fail the whole file when a contract column is missing from its ``columns``.

    Raises
    ------
    ContractError
        Naming the file and every missing column.
    """
    missing = [c for c in contract.required_columns if c not in columns]
    if missing:
        raise ContractError(
            f"{source_file}: missing required column(s) {', '.join(missing)} "
            f"for {contract.table} (found: {', '.join(columns) or 'none'})"
        )


def undeclared_columns(columns: Sequence[str], contract: Contract) -> list[str]:
    """Delivered columns the contract does not declare (lineage columns aside), in file order.

    Bronze keeps them as delivered; the bronze drift check names them.
    """
    declared = (*contract.columns, *contract.personal, *RESERVED_COLUMNS)
    return [c for c in columns if c not in declared]


def check_storable_columns(columns: list[str], source_file: str) -> None:
    """Fail a file whose column names cannot become bronze columns as they are.

    A name may not repeat another ignoring case (Delta column names are
    case-insensitive), take a name the platform adds (``_source_file`` …), or hold
    a character Delta refuses without column mapping (space, ``,;{}()=``, tab,
    newline).

    Raises
    ------
    ContractError
        Naming the file and every offending column.
    """
    problems = []
    seen: dict[str, str] = {}
    reserved = {c.lower() for c in RESERVED_COLUMNS}
    for name in columns:
        if name.lower() in reserved:
            problems.append(f"{name!r} is a column the platform adds")
        elif name.lower() in seen:
            problems.append(f"{name!r} repeats {seen[name.lower()]!r} (names ignore case)")
        elif not name or set(name) & _UNSTORABLE_CHARACTERS:
            problems.append(f"{name!r} is empty or holds one of ' ,;{{}}()=', tab, newline")
        seen.setdefault(name.lower(), name)
    if problems:
        raise ContractError(
            f"{source_file}: column name(s) cannot be stored in bronze: {'; '.join(problems)}"
        )


def apply_contract(
    bronze: pl.DataFrame, contract: Contract, *, partition_key: str
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Split a bronze frame into curated rows and quarantined rows.

    Parameters
    ----------
    bronze
        Text columns as delivered plus ``_source_file`` and ``_row_number``.
    contract
        The contract of the target table.
    partition_key
        Recorded on every quarantined row so a user can find them per partition.

    Returns
    -------
    tuple of (curated, quarantined)
        ``curated`` holds the typed contract columns plus derived columns;
        ``quarantined`` has :data:`QUARANTINE_COLUMNS`. Their row counts add up
        to ``bronze.height``.
    """
    for col in ("_source_file", "_row_number"):
        if col not in bronze.columns:
            raise ContractError(f"bronze frame for {contract.table} lacks lineage column {col}")
    check_required_columns(bronze.columns, contract, "bronze frame")
    raw_cols = list(contract.columns)
    typed = bronze.with_columns(
        [_cast(c, t).alias(f"__typed_{c}") for c, t in contract.columns.items()]
    )
    reasons: list[pl.Expr] = []
    for col, dtype in contract.columns.items():
        raw = pl.col(col)
        is_blank = raw.is_null() | (raw.str.strip_chars() == "")
        if col not in contract.optional:
            reasons.append(pl.when(is_blank).then(pl.lit(f"{col}: missing value")))
        reasons.append(
            pl.when(~is_blank & pl.col(f"__typed_{col}").is_null()).then(
                pl.format("{}: cannot parse '{}' as {}", pl.lit(col), raw, pl.lit(str(dtype)))
            )
        )
    typed = typed.with_columns(
        pl.concat_str(reasons, separator="; ", ignore_nulls=True).alias("__type_reason")
    )
    clean_types = typed.filter(pl.col("__type_reason") == "")
    bad_types = typed.filter(pl.col("__type_reason") != "").with_columns(
        pl.col("__type_reason").alias("reason")
    )

    as_typed = clean_types.drop(raw_cols).rename({f"__typed_{c}": c for c in raw_cols})
    if contract.derived:
        as_typed = as_typed.with_columns(list(contract.derived))
    rule_reasons = [
        pl.when(rule.violated().fill_null(True)).then(pl.lit(rule.reason))
        for rule in contract.rules
    ]
    if rule_reasons:
        as_typed = as_typed.with_columns(
            pl.concat_str(rule_reasons, separator="; ", ignore_nulls=True).alias("reason")
        )
    else:
        as_typed = as_typed.with_columns(pl.lit("").alias("reason"))

    passing = as_typed.filter(pl.col("reason") == "").sort("_source_file", "_row_number")
    key = list(contract.key)
    first_seen = passing.group_by(key, maintain_order=True).agg(
        pl.col("_source_file").first().alias("__first_file"),
        pl.col("_row_number").first().alias("__first_row"),
    )
    passing = passing.join(first_seen, on=key, how="left", nulls_equal=True)
    derived_names = {e.meta.output_name() for e in contract.derived}
    undeclared = [c for c in undeclared_columns(bronze.columns, contract) if c not in derived_names]
    is_dup = (pl.col("_source_file") != pl.col("__first_file")) | (
        pl.col("_row_number") != pl.col("__first_row")
    )
    duplicates = passing.filter(is_dup).with_columns(
        pl.format(
            "duplicate key ({}) = ({}); first seen at row {} of {}",
            pl.lit(", ".join(key)),
            pl.concat_str([pl.col(k).cast(pl.String) for k in key], separator=", "),
            pl.col("__first_row"),
            pl.col("__first_file"),
        ).alias("reason")
    )
    curated = passing.filter(~is_dup).drop("reason", "__first_file", "__first_row")
    keep = [
        c
        for c in curated.columns
        if not c.startswith("__")
        and c not in ("_source_sha256", "_ingested_at", "_delivered_at", "_partition_key")
        and c not in undeclared
        and c not in contract.personal
    ]
    curated = curated.select(keep)

    declared = list(contract.columns)
    withheld = bronze.drop([c for c in contract.personal if c in bronze.columns])
    rejected_rows = [
        _to_quarantine(
            withheld, bad_types.select("_source_file", "_row_number", "reason"), declared
        ),
        _to_quarantine(
            withheld,
            as_typed.filter(pl.col("reason") != "").select("_source_file", "_row_number", "reason"),
            declared,
        ),
        _to_quarantine(
            withheld, duplicates.select("_source_file", "_row_number", "reason"), declared
        ),
    ]
    quarantined = pl.concat(rejected_rows).with_columns(
        pl.lit(partition_key).alias("partition_key")
    )
    quarantined = quarantined.select(QUARANTINE_COLUMNS).sort("_source_file", "_row_number")
    if curated.height + quarantined.height != bronze.height:
        raise ContractError(
            f"{contract.table} partition {partition_key}: {bronze.height} rows in but "
            f"{curated.height} curated + {quarantined.height} quarantined"
        )
    return curated, quarantined


def _to_quarantine(
    bronze: pl.DataFrame, rejected: pl.DataFrame, declared: list[str]
) -> pl.DataFrame:
    """Attach the delivered record (as JSON) to rejected row ids.

    The record holds every declared column and the undeclared columns the row's
    file delivered (bronze holds the union of the files' columns; a column another
    file delivered is null here and left out).
    """
    raw_cols = [c for c in bronze.columns if c not in RESERVED_COLUMNS]
    if rejected.height == 0:
        return pl.DataFrame(
            schema={
                "_source_file": pl.String,
                "_row_number": pl.Int64,
                "reason": pl.String,
                "record": pl.String,
            }
        )
    joined = rejected.join(
        bronze.select("_source_file", "_row_number", *raw_cols),
        on=["_source_file", "_row_number"],
        how="left",
    )
    records = [
        json.dumps({k: v for k, v in r.items() if v is not None or k in declared}, default=str)
        for r in joined.select(raw_cols).iter_rows(named=True)
    ]
    return joined.select(
        pl.col("_source_file"),
        pl.col("_row_number").cast(pl.Int64),
        pl.col("reason"),
        pl.Series("record", records, dtype=pl.String),
    )


def empty_quarantine() -> pl.DataFrame:
    """A quarantine frame with no rows and the standard schema."""
    return pl.DataFrame(
        schema={
            "partition_key": pl.String,
            "_source_file": pl.String,
            "_row_number": pl.Int64,
            "reason": pl.String,
            "record": pl.String,
        }
    )


# --- the four curated contracts -------------------------------------------------

CLAIMS_PERSONAL_COLUMNS = (
    "policyholder_name",
    "policyholder_email",
    "policyholder_phone",
    "policyholder_iban",
    "policyholder_card",
    "adjuster_notes",
)
"""Personal data a claims drop may carry (see :attr:`Contract.personal`)."""


def claims_contract(month: str) -> Contract:
    """Policy-level claims for one valuation month."""
    return Contract(
        table="claims_by_district",
        columns={
            "policy_id": pl.String(),
            "district": pl.String(),
            "valuation_month": pl.String(),
            "exposure": pl.Float64(),
            "claim_count": pl.Int64(),
        },
        key=("policy_id",),
        rules=(
            RowRule("exposure is NaN or infinite", lambda: ~_finite("exposure")),
            RowRule("exposure < 0", lambda: pl.col("exposure") < 0),
            RowRule("claim_count < 0", lambda: pl.col("claim_count") < 0),
            RowRule(
                f"valuation_month is not the partition month {month}",
                lambda: pl.col("valuation_month") != month,
            ),
            RowRule(
                "district is not [A-Za-z0-9_-]{1,32}",
                lambda: ~pl.col("district").str.contains(r"^[A-Za-z0-9_-]{1,32}$"),
            ),
        ),
        personal=CLAIMS_PERSONAL_COLUMNS,
    )


def fx_ticks_contract(date: str) -> Contract:
    """Bid/ask ticks of any symbol for one trading date (UTC)."""
    return Contract(
        table="fx_spreads",
        columns={
            "symbol": pl.String(),
            "ts": pl.Datetime("us"),
            "bid": pl.Float64(),
            "ask": pl.Float64(),
        },
        key=("symbol", "ts"),
        rules=(
            RowRule(
                "symbol does not normalise to [A-Z0-9]{3,12}",
                lambda: pl.col("symbol").is_null(),
            ),
            RowRule(
                "bid or ask is NaN or infinite",
                lambda: ~(_finite("bid") & _finite("ask")),
            ),
            RowRule("bid or ask <= 0", lambda: (pl.col("bid") <= 0) | (pl.col("ask") <= 0)),
            RowRule(
                "bid > ask",
                lambda: (pl.col("bid") > pl.col("ask")) & _not_nan("bid", "ask"),
            ),
            RowRule(
                f"ts is not on the partition date {date}",
                lambda: pl.col("ts").dt.date().cast(pl.String) != date,
            ),
        ),
        derived=(
            pl.col("symbol").map_batches(normalise_symbols, return_dtype=pl.String),
            (pl.col("ask") - pl.col("bid")).alias("spread"),
            pl.lit(date).alias("date"),
        ),
    )


INCIDENT_ANOMALY = "anomaly"
"""Incident-log label of a confirmed anomaly: every tick in ``[start, end]`` is anomalous."""
INCIDENT_REVIEWED = "reviewed_window"
"""Incident-log label of a reviewed window: a reviewer went through every tick in
``[start, end]``; the ticks there not inside an ``anomaly`` row are normal."""
INCIDENT_LABELS = (INCIDENT_ANOMALY, INCIDENT_REVIEWED)
"""Labels of the FX incident log (see :func:`fx_incidents_contract`)."""


def fx_incidents_contract(date: str) -> Contract:
    """The FX desk's incident log of one UTC day.

    One file kind, two row kinds told apart by ``label``: ``reviewed_window`` rows say
    which span ``[start, end]`` of a symbol's ticks a reviewer went through, ``anomaly``
    rows which span was a confirmed incident. Both start on the partition date and end on
    it too (a window over midnight is delivered as two rows, one per day's log).
    ``note`` may be blank.
    """
    day_end = f"{date} 23:59:59.999999"
    return Contract(
        table="fx_incidents",
        columns={
            "symbol": pl.String(),
            "start": pl.Datetime("us"),
            "end": pl.Datetime("us"),
            "label": pl.String(),
            "reviewer": pl.String(),
            "note": pl.String(),
        },
        key=("symbol", "start", "end", "label"),
        optional=("note",),
        rules=(
            RowRule(
                "symbol does not normalise to [A-Z0-9]{3,12}",
                lambda: pl.col("symbol").is_null(),
            ),
            RowRule(
                f"label not one of {', '.join(INCIDENT_LABELS)}",
                lambda: ~pl.col("label").is_in(INCIDENT_LABELS),
            ),
            RowRule("end < start", lambda: pl.col("end") < pl.col("start")),
            RowRule(
                f"start is not on the partition date {date}",
                lambda: pl.col("start").dt.date().cast(pl.String) != date,
            ),
            RowRule(
                f"end is after the partition date {date}",
                lambda: pl.col("end") > pl.lit(day_end).str.to_datetime(time_unit="us"),
            ),
        ),
        derived=(
            pl.col("symbol").map_batches(normalise_symbols, return_dtype=pl.String),
            pl.col("label").str.strip_chars().str.to_lowercase(),
            pl.lit(date).alias("date"),
        ),
    )


LOAN_SEGMENTS = ("retail_mortgage", "consumer", "sme", "corporate")


def loan_book_contract(valuation_date: str) -> Contract:
    """Loan-level exposures for one valuation date."""
    return Contract(
        table="loan_book",
        columns={
            "loan_id": pl.String(),
            "ead": pl.Float64(),
            "pd": pl.Float64(),
            "lgd": pl.Float64(),
            "rate": pl.Float64(),
            "segment": pl.String(),
        },
        key=("loan_id",),
        rules=(
            RowRule(
                "ead, pd, lgd or rate is NaN or infinite",
                lambda: ~(_finite("ead") & _finite("pd") & _finite("lgd") & _finite("rate")),
            ),
            RowRule("ead < 0", lambda: pl.col("ead") < 0),
            RowRule(
                "pd outside [0, 1]",
                lambda: ((pl.col("pd") < 0) | (pl.col("pd") > 1)) & _not_nan("pd"),
            ),
            RowRule(
                "lgd outside [0, 1]",
                lambda: ((pl.col("lgd") < 0) | (pl.col("lgd") > 1)) & _not_nan("lgd"),
            ),
            RowRule(
                f"segment not one of {', '.join(LOAN_SEGMENTS)}",
                lambda: ~pl.col("segment").is_in(LOAN_SEGMENTS),
            ),
        ),
        derived=(pl.lit(valuation_date).alias("valuation_date"),),
    )


def loan_scenarios_contract(valuation_date: str) -> Contract:
    """Macro scenarios applied to the loan book of one valuation date."""
    return Contract(
        table="loan_scenarios",
        columns={
            "scenario": pl.String(),
            "pd_multiplier": pl.Float64(),
            "asset_correlation": pl.Float64(),
        },
        key=("scenario",),
        rules=(
            RowRule(
                "pd_multiplier or asset_correlation is NaN or infinite",
                lambda: ~(_finite("pd_multiplier") & _finite("asset_correlation")),
            ),
            RowRule("pd_multiplier < 0", lambda: pl.col("pd_multiplier") < 0),
            RowRule(
                "asset_correlation outside [0, 1)",
                lambda: (
                    ((pl.col("asset_correlation") < 0) | (pl.col("asset_correlation") >= 1))
                    & _not_nan("asset_correlation")
                ),
            ),
            RowRule(
                "scenario is not [a-z0-9_]{1,40}",
                lambda: ~pl.col("scenario").str.contains(r"^[a-z0-9_]{1,40}$"),
            ),
        ),
        derived=(pl.lit(valuation_date).alias("valuation_date"),),
    )


def rule_violations(frame: pl.DataFrame, contract: Contract) -> dict[str, int]:
    """Count rows of an already typed frame breaking each rule, plus key duplicates.

    The curated checks call this on what was *stored*, so the same rules that
    split the delivery also verify the published table.
    """
    counts: dict[str, int] = {}
    for rule in contract.rules:
        n = frame.filter(rule.violated().fill_null(True)).height
        if n:
            counts[rule.reason] = n
    key = [k for k in contract.key if k in frame.columns]
    if key:
        dupes = frame.height - frame.select(key).unique().height
        if dupes:
            counts[f"duplicate key ({', '.join(key)})"] = dupes
    for col in contract.columns:
        if col in frame.columns and col not in contract.optional and frame[col].null_count():
            counts[f"{col}: null"] = frame[col].null_count()
    return counts


def contract_failures(frame: pl.DataFrame, contract: Contract, label: str) -> list[str]:
    """Rule violations of stored rows as gate failure messages (``label: reason (n rows)``).

    The guards of model assets call this on the curated rows they are about to use,
    so a gate holds even when the Dagster check history is gone.
    """
    return [
        f"{label}: {reason} ({n} rows)" for reason, n in rule_violations(frame, contract).items()
    ]


def claims_by_district_contract(month: str) -> Contract:
    """The aggregated claims table as published for credibility modelling."""
    return Contract(
        table="claims_by_district",
        columns={
            "month": pl.String(),
            "district": pl.String(),
            "exposure": pl.Float64(),
            "claim_count": pl.Int64(),
            "n_policies": pl.Int64(),
        },
        key=("month", "district"),
        rules=(
            RowRule("exposure is NaN or infinite", lambda: ~_finite("exposure")),
            RowRule("exposure < 0", lambda: pl.col("exposure") < 0),
            RowRule("claim_count < 0", lambda: pl.col("claim_count") < 0),
            RowRule("n_policies < 1", lambda: pl.col("n_policies") < 1),
            RowRule(f"month is not {month}", lambda: pl.col("month") != month),
        ),
    )


EXPOSURE_SUM_DTYPE = pl.Decimal(38, 12)
"""Exposure is summed as decimals of 1e-12 policy-years: 128-bit integer sums are exact,
so a district's total does not depend on the order of its rows, on how they were split
into batches or buckets, or on threads (a float sum does, in its last bits)."""


def claims_statistics(policies: pl.DataFrame) -> pl.DataFrame:
    """Mergeable per-district sufficient statistics of some curated policies.

    ``exposure`` stays a :data:`EXPOSURE_SUM_DTYPE` sum, so statistics of disjoint
    parts of a month merge exactly (:func:`merge_claims_statistics`).
    """
    return policies.group_by("district").agg(
        pl.col("exposure").cast(EXPOSURE_SUM_DTYPE).sum(),
        pl.col("claim_count").sum().cast(pl.Int64),
        pl.len().cast(pl.Int64).alias("n_policies"),
    )


def merge_claims_statistics(parts: Sequence[pl.DataFrame], month: str) -> pl.DataFrame:
    """One month's ``claims_by_district`` rows from statistics of disjoint parts of it."""
    schema = {
        "district": pl.String,
        "exposure": EXPOSURE_SUM_DTYPE,
        "claim_count": pl.Int64,
        "n_policies": pl.Int64,
    }
    return (
        pl.concat([pl.DataFrame(schema=schema), *(p.cast(schema) for p in parts)])
        .group_by("district")
        .agg(pl.col("exposure").sum(), pl.col("claim_count").sum(), pl.col("n_policies").sum())
        .with_columns(pl.lit(month).alias("month"), pl.col("exposure").cast(pl.Float64))
        .select("month", "district", "exposure", "claim_count", "n_policies")
        .sort("district")
    )


def aggregate_claims(policies: pl.DataFrame, month: str) -> pl.DataFrame:
    """Per-district sufficient statistics of one month's curated policies."""
    return merge_claims_statistics([claims_statistics(policies)], month)
