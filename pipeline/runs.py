"""In-process runs of the asset graph: one run per partition, or one run over a range.

The demo, the tests and the benchmarks launch runs the same way the UI does
(assets with their checks, on a given instance), so the helpers live here, below
the demo, rather than in it.
"""

from collections.abc import Iterable, Mapping, Sequence

import dagster as dg

QUIET = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}
"""Run config that keeps the console logger at ``WARNING``."""


def materialize_partitions(
    defs: dg.Definitions,
    instance: dg.DagsterInstance,
    asset_keys: Sequence[dg.AssetKey],
    partition_keys: Iterable[str | dg.MultiPartitionKey],
    *,
    raise_on_error: bool = True,
    tags: Mapping[str, str] | None = None,
) -> list[dg.ExecuteInProcessResult]:
    """Materialise ``asset_keys`` (with their checks) once per partition key.

    Parameters
    ----------
    defs
        Definitions holding the assets, checks and resources.
    instance
        Instance that records the runs.
    asset_keys
        Assets to materialise; their checks run with them.
    partition_keys
        One run per key, in this order.
    raise_on_error
        Raise on the first failed step instead of returning the failed result.
    tags
        Tags of every run.

    Returns
    -------
    list of dagster.ExecuteInProcessResult
        One result per partition key.
    """
    assets = [*defs.assets, *(defs.asset_checks or [])]
    return [
        dg.materialize(
            assets,
            selection=dg.AssetSelection.assets(*asset_keys),
            partition_key=str(partition_key),
            resources=defs.resources,
            instance=instance,
            raise_on_error=raise_on_error,
            tags=dict(tags or {}),
            run_config=QUIET,
        )
        for partition_key in partition_keys
    ]


def materialize_range(
    defs: dg.Definitions,
    instance: dg.DagsterInstance,
    asset_keys: Sequence[dg.AssetKey],
    start: str | dg.MultiPartitionKey,
    end: str | dg.MultiPartitionKey,
    *,
    raise_on_error: bool = True,
    tags: Mapping[str, str] | None = None,
) -> dg.ExecuteInProcessResult:
    """Materialise a partition range in one run, as a single-run backfill does.

    For symbol × date partitions the range is the box between the two corners.

    Parameters
    ----------
    defs
        Definitions holding the assets, checks and resources.
    instance
        Instance that records the run.
    asset_keys
        Assets to materialise; their checks run with them.
    start, end
        First and last partition key of the range (corners of the box for
        multi-partitions).
    raise_on_error
        Raise on a failed step instead of returning the failed result.
    tags
        Further tags of the run (the range tags are always set).

    Returns
    -------
    dagster.ExecuteInProcessResult
        The result of the one run.
    """
    return dg.materialize(
        [*defs.assets, *(defs.asset_checks or [])],
        selection=dg.AssetSelection.assets(*asset_keys),
        resources=defs.resources,
        instance=instance,
        raise_on_error=raise_on_error,
        run_config=QUIET,
        tags={
            **(tags or {}),
            "dagster/asset_partition_range_start": str(start),
            "dagster/asset_partition_range_end": str(end),
        },
    )
