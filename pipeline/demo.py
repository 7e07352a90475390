"""Drive the whole graph in-process for the demo partitions.

The demo uses the persistent Dagster instance under ``DAGSTER_HOME``, so every
run, materialisation and check result appears in ``make dev`` afterwards, exactly
as if a user had launched them from the UI.
"""

from collections.abc import Iterable, Sequence

import dagster as dg

from pipeline import keys
from pipeline.domain.contracts import try_normalise_symbol
from pipeline.domain.landing import partition_key_of
from pipeline.partitions import symbol_date_key, symbol_partitions
from pipeline.settings import Settings


def landing_partitions(settings: Settings, source: str) -> list[str]:
    """Partition keys for which ``source`` has landing files."""
    folder = settings.landing_dir / source
    found = {partition_key_of(p) for p in folder.iterdir()} if folder.is_dir() else set()
    return sorted(key for src_key in found if src_key for src, key in [src_key] if src == source)


def landing_symbols(settings: Settings) -> list[str]:
    """Normalised symbols present in the delivered FX tick files."""
    import polars as pl

    symbols: set[str] = set()
    for path in sorted((settings.landing_dir / "fx_ticks").glob("fx_ticks_*.parquet")):
        raw = pl.read_parquet(path, columns=["symbol"])["symbol"].unique().to_list()
        symbols.update(s for s in map(try_normalise_symbol, raw) if s)
    return sorted(symbols)


def materialize_partitions(
    defs: dg.Definitions,
    instance: dg.DagsterInstance,
    asset_keys: Sequence[dg.AssetKey],
    partition_keys: Iterable[str | dg.MultiPartitionKey],
    *,
    raise_on_error: bool = True,
) -> list[dg.ExecuteInProcessResult]:
    """Materialise ``asset_keys`` (with their checks) once per partition key."""
    results = []
    assets = [*defs.assets, *(defs.asset_checks or [])]
    for partition_key in partition_keys:
        results.append(
            dg.materialize(
                assets,
                selection=dg.AssetSelection.assets(*asset_keys),
                partition_key=str(partition_key),
                resources=defs.resources,
                instance=instance,
                raise_on_error=raise_on_error,
                tags={"pipeline/launched_by": "demo"},
            )
        )
    return results


def run_demo(settings: Settings, instance: dg.DagsterInstance | None = None) -> list[str]:
    """Materialise every asset for the demo partitions; return a summary."""
    from pipeline.definitions import build_definitions

    defs = build_definitions(settings)
    instance = instance or dg.DagsterInstance.get()
    summary: list[str] = []

    symbols = landing_symbols(settings)
    instance.add_dynamic_partitions(symbol_partitions.name, symbols)
    summary.append(f"symbols registered: {', '.join(symbols)}")

    for source, curated_key in (
        ("claims", keys.CLAIMS_BY_DISTRICT),
        ("loan_book", keys.LOAN_BOOK),
        ("loan_scenarios", keys.LOAN_SCENARIOS),
    ):
        partitions = landing_partitions(settings, source)
        bronze_key = {
            "claims": keys.BRONZE_CLAIMS,
            "loan_book": keys.BRONZE_LOAN_BOOK,
            "loan_scenarios": keys.BRONZE_LOAN_SCENARIOS,
        }[source]
        materialize_partitions(defs, instance, [bronze_key, curated_key], partitions)
        summary.append(f"{curated_key.to_user_string()}: {len(partitions)} partition(s)")

    dates = landing_partitions(settings, "fx_ticks")
    materialize_partitions(defs, instance, [keys.BRONZE_FX_TICKS], dates)
    materialize_partitions(
        defs,
        instance,
        [keys.FX_SPREADS],
        [symbol_date_key(s, d) for d in dates for s in symbols],
    )
    summary.append(f"curated/fx_spreads: {len(symbols)} symbols x {len(dates)} dates")
    return summary
