"""Partitions, defined once and imported everywhere.

Symbols are dynamic: a new currency pair appears when the landing sensor sees it
in a drop. Every symbol passes :func:`pipeline.domain.contracts.normalise_symbol`
before it becomes a partition key, so only ``[A-Z0-9]{3,12}`` ever reaches a
path, a Delta predicate or an MLflow model name.

Daily partitions start on :func:`pipeline.settings.partitions_start` (the
``PIPELINE_PARTITIONS_START`` variable, else the start the demo seeding recorded in
the home, else 2026-01-01), read once at import; monthly partitions start on the
first of that month.
"""

from dagster import (
    DailyPartitionsDefinition,
    DynamicPartitionsDefinition,
    MonthlyPartitionsDefinition,
    MultiPartitionKey,
    MultiPartitionsDefinition,
)

from pipeline.settings import partitions_start

PARTITIONS_START = partitions_start()

month_partitions = MonthlyPartitionsDefinition(start_date=PARTITIONS_START[:7], fmt="%Y-%m")
date_partitions = DailyPartitionsDefinition(start_date=PARTITIONS_START)
valuation_date_partitions = DailyPartitionsDefinition(start_date=PARTITIONS_START)
symbol_partitions = DynamicPartitionsDefinition(name="symbol")
symbol_date_partitions = MultiPartitionsDefinition(
    {"date": date_partitions, "symbol": symbol_partitions}
)


def symbol_date_key(symbol: str, date: str) -> MultiPartitionKey:
    """Partition key of ``fx_spreads`` and its descendants for one symbol and day."""
    return MultiPartitionKey({"symbol": symbol, "date": date})


def split_symbol_date(partition_key: str | MultiPartitionKey) -> tuple[str, str]:
    """Return ``(symbol, date)`` of a symbol × date partition key."""
    if isinstance(partition_key, MultiPartitionKey):
        dims = partition_key.keys_by_dimension
        return dims["symbol"], dims["date"]
    date, symbol = str(partition_key).split("|")
    return symbol, date
