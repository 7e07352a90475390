"""Drive the FX landing sensor the way the daemon does, through its public API only.

Tests that need symbol partitions get them from the sensor itself, so they
register exactly what ``fx_ticks_landing`` would register in ``dagster dev``.
"""

import warnings

import dagster as dg

from pipeline.definitions import build_definitions
from pipeline.partitions import symbol_partitions
from pipeline.settings import Settings

FX_LANDING_SENSOR = "fx_ticks_landing"


def evaluate_fx_landing_sensor(
    settings: Settings,
    instance: dg.DagsterInstance,
    resources: dict,
    *,
    cursor: str | None = None,
) -> dg.SensorResult:
    """One evaluation of ``fx_ticks_landing`` from the definitions of ``settings``.

    Nothing is applied to ``instance``: see :func:`apply_dynamic_partitions_requests`.
    """
    defs = build_definitions(settings)
    with warnings.catch_warnings():
        # resources come with the context below, so the resolution it warns about is moot
        warnings.filterwarnings("ignore", "Starting in dagster 1.11, get_sensor_def", UserWarning)
        sensor = defs.get_sensor_def(FX_LANDING_SENSOR)
    context = dg.build_sensor_context(instance=instance, resources=resources, cursor=cursor)
    result = sensor(context)
    if not isinstance(result, dg.SensorResult):
        raise TypeError(f"{FX_LANDING_SENSOR} returned {type(result).__name__}, not SensorResult")
    return result


def apply_dynamic_partitions_requests(
    instance: dg.DagsterInstance, result: dg.SensorResult
) -> None:
    """Apply a sensor result's partition requests to ``instance``, as the daemon does."""
    for request in result.dynamic_partitions_requests or []:
        if isinstance(request, dg.AddDynamicPartitionsRequest):
            instance.add_dynamic_partitions(request.partitions_def_name, request.partition_keys)
        elif isinstance(request, dg.DeleteDynamicPartitionsRequest):
            for key in request.partition_keys:
                instance.delete_dynamic_partition(request.partitions_def_name, key)
        else:
            raise TypeError(f"unknown dynamic partitions request {request!r}")


def added_symbols(result: dg.SensorResult) -> list[str]:
    """Symbols a sensor result asks to add, in request order."""
    return [
        key
        for request in result.dynamic_partitions_requests or []
        if isinstance(request, dg.AddDynamicPartitionsRequest)
        and request.partitions_def_name == symbol_partitions.name
        for key in request.partition_keys
    ]


def register_symbols_with_landing_sensor(platform) -> list[str]:
    """Evaluate ``fx_ticks_landing`` on ``platform`` and apply its symbol requests.

    Parameters
    ----------
    platform
        A :class:`pipeline_tests.conftest.Platform` (settings, resources, instance).

    Returns
    -------
    list of str
        The symbol partitions of the instance afterwards, in the instance's order
        (the order Dagster uses for ranges over symbols).
    """
    result = evaluate_fx_landing_sensor(platform.settings, platform.instance, platform.resources)
    apply_dynamic_partitions_requests(platform.instance, result)
    return list(platform.instance.get_dynamic_partitions(symbol_partitions.name))
