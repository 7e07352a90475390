"""Drive the whole graph in-process for the demo partitions.

The demo uses the persistent Dagster instance under ``DAGSTER_HOME``, so every
run, materialisation and check result appears in ``make dev`` afterwards, exactly
as if a user had launched them from the UI.
"""

import dagster as dg

from pipeline import keys
from pipeline.domain.contracts import try_normalise_symbol
from pipeline.domain.landing import partition_key_of, read_as_text
from pipeline.partitions import PARTITIONS_START, symbol_date_key, symbol_partitions
from pipeline.runs import materialize_partitions, materialize_range
from pipeline.settings import Settings, SettingsError

LAUNCHED_BY_DEMO = {"pipeline/launched_by": "demo"}


def landing_partitions(settings: Settings, source: str) -> list[str]:
    """Partition keys for which ``source`` has landing files."""
    folder = settings.landing_dir / source
    found = {partition_key_of(p) for p in folder.iterdir()} if folder.is_dir() else set()
    return sorted(key for src_key in found if src_key for src, key in [src_key] if src == source)


def landing_symbols(settings: Settings) -> list[str]:
    """Normalised symbols present in the delivered FX tick files (CSV or Parquet)."""
    symbols: set[str] = set()
    folder = settings.landing_dir / "fx_ticks"
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        if partition_key_of(path) is None:
            continue
        raw = read_as_text(path)
        if "symbol" in raw.columns:
            symbols.update(s for s in map(try_normalise_symbol, raw["symbol"].unique()) if s)
    return sorted(symbols)


def partitions_before_start(settings: Settings) -> list[str]:
    """Partition keys of landing files that fall before the first partition of the graph."""
    return sorted(
        key
        for source in ("claims", "fx_ticks", "fx_incidents", "loan_book", "loan_scenarios")
        for key in landing_partitions(settings, source)
        if key < PARTITIONS_START[: len(key)]
    )


PII_SCAN = (keys.CLAIMS_REDACTED, keys.PII_DETECTION_LOG)


def run_demo(settings: Settings, instance: dg.DagsterInstance | None = None) -> list[str]:
    """Materialise every asset for the demo partitions; return a summary."""
    from pipeline.definitions import build_definitions

    early = partitions_before_start(settings)
    if early:
        raise SettingsError(
            f"the landing zone holds partitions {', '.join(early)} before the first partition "
            f"{PARTITIONS_START}; set PIPELINE_PARTITIONS_START={min(early)[:7]}-01 "
            f"(or earlier)"
        )
    defs = build_definitions(settings)
    instance = instance or dg.DagsterInstance.get()
    summary: list[str] = []

    symbols = landing_symbols(settings)
    known = set(instance.get_dynamic_partitions(symbol_partitions.name))
    instance.add_dynamic_partitions(symbol_partitions.name, [s for s in symbols if s not in known])
    symbols = list(instance.get_dynamic_partitions(symbol_partitions.name))
    summary.append(f"symbols registered: {', '.join(sorted(symbols))}")

    for source, bronze_key, curated_key, *also in (
        ("claims", keys.BRONZE_CLAIMS, keys.CLAIMS_BY_DISTRICT, *PII_SCAN),
        ("fx_incidents", keys.BRONZE_FX_INCIDENTS, keys.FX_INCIDENTS),
        ("loan_book", keys.BRONZE_LOAN_BOOK, keys.LOAN_BOOK),
        ("loan_scenarios", keys.BRONZE_LOAN_SCENARIOS, keys.LOAN_SCENARIOS),
    ):
        partitions = landing_partitions(settings, source)
        materialize_partitions(
            defs, instance, [bronze_key, curated_key, *also], partitions, tags=LAUNCHED_BY_DEMO
        )
        summary.append(f"{curated_key.to_user_string()}: {', '.join(partitions)}")

    dates = landing_partitions(settings, "fx_ticks")
    materialize_partitions(defs, instance, [keys.BRONZE_FX_TICKS], dates, tags=LAUNCHED_BY_DEMO)
    first, last = symbol_date_key(symbols[0], dates[0]), symbol_date_key(symbols[-1], dates[-1])
    materialize_range(defs, instance, [keys.FX_SPREADS], first, last, tags=LAUNCHED_BY_DEMO)
    summary.append(f"curated/fx_spreads: {len(symbols)} symbols x {len(dates)} dates (one run)")

    for month in landing_partitions(settings, "claims"):
        materialize_partitions(
            defs,
            instance,
            [keys.CREDIBILITY_POSTERIOR, keys.CREDIBILITY_TABLE],
            [month],
            tags=LAUNCHED_BY_DEMO,
        )
    summary.append("gold/credibility_posterior + credibility_table: every claims month")

    materialize_range(
        defs,
        instance,
        [keys.FX_CHALLENGER_MODEL, keys.FX_CHAMPION_MODEL],
        symbols[0],
        symbols[-1],
        tags=LAUNCHED_BY_DEMO,
    )
    summary.append(f"models/fx_challenger_model + fx_champion_model: {len(symbols)} symbols")
    scored = dates[-3:]
    materialize_range(
        defs,
        instance,
        [keys.FX_ANOMALY_SCORES, keys.FX_MODEL_MONITOR],
        symbol_date_key(symbols[0], scored[0]),
        symbol_date_key(symbols[-1], scored[-1]),
        tags=LAUNCHED_BY_DEMO,
    )
    summary.append(f"gold/fx_anomaly_scores + fx_model_monitor: {scored[0]}..{scored[-1]}")

    valuation_dates = landing_partitions(settings, "loan_book")
    materialize_partitions(
        defs, instance, [keys.LOAN_LOSS_DISTRIBUTION], valuation_dates, tags=LAUNCHED_BY_DEMO
    )
    summary.append(f"gold/loan_loss_distribution: {', '.join(valuation_dates)}")
    return summary
