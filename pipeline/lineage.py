"""Trace a gold row back to the landing files and the models that produced it.

``pipeline lineage <table> <column=value>...`` reads the gold rows with that key and
follows what they record (:mod:`pipeline.audit`): the Dagster run and the code
version; the MLflow run of the model involved and the registered model versions it
produced; and, for every curated input named in ``input_versions``, the bronze
partitions it was curated from and the landing files in them with their content hash.

Bronze rows carry ``_source_file`` and ``_source_sha256`` (the SHA-256 of the bytes
ingested). The bronze table is read as it was when the curated input version was
committed (Delta time travel to the latest bronze version not newer than that commit),
so a later re-delivery does not change the answer. Bronze rows ingested before the
hash column existed have no stored hash: the hash is then computed from the landing
file if it is still there, and the output says so. Each file's present state is shown
beside the ingested hash (unchanged, changed since, or gone).

Input partitions: a curated input is read at the gold row's own partition values
(``valuation_date``, ``date``), except the credibility table, whose posterior is fitted
on the trailing window of months of ``claims_by_district``. FX scoring also reads a
warm-up tail of up to :data:`pipeline.stores.fx.LOOKBACK_DAYS` earlier days; they are
listed too.
"""

import datetime as dt
import json
from collections.abc import Mapping

import polars as pl

from pipeline.audit import AUDIT_COLUMNS
from pipeline.resources.lake import LakeResource
from pipeline.resources.landing import LandingResource
from pipeline.resources.tracking import TrackingResource
from pipeline.stores import credibility, fx
from pipeline.stores.sources import BRONZE_PARTITION_COLUMN

CURATED_SOURCES = {
    "claims_by_district": ("claims", "month"),
    "fx_spreads": ("fx_ticks", "date"),
    "loan_book": ("loan_book", "valuation_date"),
    "loan_scenarios": ("loan_scenarios", "valuation_date"),
}
"""Curated table -> (bronze source, partition column naming the bronze partition)."""


class LineageError(ValueError):
    """The gold row cannot be found or carries no audit columns."""


def parse_key(parts: list[str]) -> dict[str, str]:
    """``["month=2026-09", "district=D001"]`` (or one comma-separated string) as a mapping."""
    key = {}
    for part in (p for item in parts for p in item.split(",") if p.strip()):
        column, sep, value = part.partition("=")
        if not sep or not column.strip():
            raise LineageError(f"key part {part!r} is not column=value")
        key[column.strip()] = value.strip()
    if not key:
        raise LineageError("give the row's key as column=value pairs")
    return key


def gold_rows(lake: LakeResource, table: str, key: Mapping[str, str]) -> pl.DataFrame:
    """Gold rows whose columns equal ``key`` (temporal columns: the value is a prefix)."""
    rows = lake.read("gold", table)
    if rows.height == 0:
        raise LineageError(f"gold/{table} does not exist or is empty")
    for column, value in key.items():
        if column not in rows.columns:
            raise LineageError(f"gold/{table} has no column {column!r}")
        text = pl.col(column).cast(pl.String)
        exact = rows.schema[column] == pl.String
        rows = rows.filter(text == value if exact else text.str.starts_with(value))
    if rows.height == 0:
        raise LineageError(f"gold/{table}: no row with {format_key(key)}")
    missing = [c for c in AUDIT_COLUMNS if c not in rows.columns]
    if missing:
        raise LineageError(
            f"gold/{table} {format_key(key)}: written before audit columns existed "
            f"(no {', '.join(missing)}); materialise it again"
        )
    return rows


def format_key(key: Mapping[str, str]) -> str:
    """``column=value`` pairs separated by spaces."""
    return " ".join(f"{c}={v}" for c, v in key.items())


def input_partitions(table: str, row: Mapping[str, object], curated: str) -> list[str]:
    """Bronze partition keys of curated input ``curated`` that made the gold ``row``."""
    if table == "credibility_table" and curated == "claims_by_district":
        return credibility.window_months(str(row["month"]))
    column = CURATED_SOURCES[curated][1]
    value = str(row[column])
    if curated == "fx_spreads":
        day = dt.date.fromisoformat(value)
        return [str(day - dt.timedelta(days=d)) for d in range(fx.LOOKBACK_DAYS, -1, -1)]
    return [value]


def _commit_time(lake: LakeResource, layer: str, table: str, version: int) -> int | None:
    """Commit timestamp (ms) of one version of a table (``None`` when not in its history)."""
    loaded = lake.delta_table(layer, table)
    if loaded is None:
        return None
    return next((h["timestamp"] for h in loaded.history() if h.get("version") == version), None)


def bronze_files(
    lake: LakeResource, source: str, partitions: list[str], as_of_ms: int | None
) -> tuple[int | None, pl.DataFrame]:
    """Bronze version read and the distinct (partition, file, hash) of ``partitions``."""
    loaded = lake.delta_table("bronze", source)
    if loaded is None:
        return None, pl.DataFrame()
    if as_of_ms is not None:
        older = [h["version"] for h in loaded.history() if h["timestamp"] <= as_of_ms]
        if older:
            loaded.load_as_version(max(older))
    scan = pl.scan_delta(loaded).filter(pl.col(BRONZE_PARTITION_COLUMN).is_in(partitions))
    names = scan.collect_schema().names()
    hashed = "_source_sha256" in names
    columns = [BRONZE_PARTITION_COLUMN, "_source_file", *(["_source_sha256"] if hashed else [])]
    files = scan.select(columns).unique().collect()
    if not hashed:
        files = files.with_columns(pl.lit(None, dtype=pl.String).alias("_source_sha256"))
    return loaded.version(), files.sort(BRONZE_PARTITION_COLUMN, "_source_file")


def landing_state(landing: LandingResource, name: str, ingested: str | None) -> tuple[str, str]:
    """(hash to show, what the landing folder holds now) for one bronze source file."""
    if not landing.exists(name):
        return ingested or "unknown (not stored, file gone)", "no longer in the landing folder"
    now = landing.digest(name, validate=False)
    if ingested is None:
        return now, "hash not stored in bronze: computed now from the landing file"
    if now == ingested:
        return ingested, "in the landing folder, unchanged"
    return ingested, f"changed in the landing folder since ingestion (now sha256 {now})"


def model_lines(tracking: TrackingResource, run_id: str | None) -> list[str]:
    """The MLflow run of a row and the model versions registered from it."""
    if not run_id:
        return ["  model: none involved"]
    client = tracking.client()
    run = client.get_run(run_id)
    experiment = client.get_experiment(run.info.experiment_id)
    lines = [
        f"  model: mlflow run {run_id} (experiment {experiment.name}, run "
        f"{run.info.run_name}, {run.info.status}; dagster run "
        f"{run.data.tags.get('dagster.run_id', '?')})"
    ]
    for version in client.search_model_versions(f"run_id = '{run_id}'"):
        lines.append(f"         registered model {version.name} version {version.version}")
    return lines


def trace(
    table: str,
    key: Mapping[str, str],
    *,
    lake: LakeResource,
    landing: LandingResource,
    tracking: TrackingResource,
) -> list[str]:
    """The lineage of the gold rows of ``table`` with ``key``, as printable lines."""
    table = table.removeprefix("gold/")
    rows = gold_rows(lake, table, key)
    lines = [f"gold/{table} {format_key(key)}: {rows.height} row(s)"]
    for audit in rows.select(AUDIT_COLUMNS).unique(maintain_order=True).iter_rows(named=True):
        row = rows.filter(pl.col("dagster_run_id") == audit["dagster_run_id"]).row(0, named=True)
        lines += [
            f"  written by dagster run {audit['dagster_run_id']}",
            f"  code version {audit['code_version']}",
        ]
        if "model_version" in row:
            lines.append(f"  scored with model version {row['model_version']}")
        lines += model_lines(tracking, audit["mlflow_run_id"])
        for name, version in json.loads(audit["input_versions"]).items():
            lines += input_lines(table, row, name, version, lake=lake, landing=landing)
    return lines


def input_lines(
    table: str,
    row: Mapping[str, object],
    name: str,
    version: int | None,
    *,
    lake: LakeResource,
    landing: LandingResource,
) -> list[str]:
    """One input of a gold row: its Delta version and, for curated inputs, the files."""
    layer, input_table = name.split("/", 1)
    lines = [f"  input {name} @ delta version {version}"]
    if layer != "curated" or input_table not in CURATED_SOURCES or version is None:
        return lines
    source = CURATED_SOURCES[input_table][0]
    partitions = input_partitions(table, row, input_table)
    as_of = _commit_time(lake, layer, input_table, version)
    bronze_version, files = bronze_files(lake, source, partitions, as_of)
    lines.append(
        f"    <- bronze/{source} @ delta version {bronze_version} "
        f"(as of the commit of {name} {version}), partitions {', '.join(partitions)}"
    )
    for file in files.iter_rows(named=True):
        sha, state = landing_state(landing, file["_source_file"], file["_source_sha256"])
        lines.append(
            f"       landing file {file['_source_file']} sha256 {sha} "
            f"(partition {file[BRONZE_PARTITION_COLUMN]}; {state})"
        )
    if files.height == 0:
        lines.append("       no bronze rows in these partitions")
    return lines
