"""Pins the Dagster private API that :mod:`pipeline.dagster_private` relies on.

If an upgrade of Dagster changes any of it, these tests fail loudly instead of a gate
silently opening (or a Databricks failure losing its run id).
"""

import inspect

import dagster as dg
import pytest

from pipeline.dagster_private import (
    CheckStatus,
    check_history,
    latest_check_records,
    named_run_pipes_client_class,
)

PARTS = dg.StaticPartitionsDefinition(["a", "b"])
KEY = dg.AssetKey(["probe"])
CHECK = dg.AssetCheckKey(KEY, "value_is_positive")


@dg.asset(key=KEY, partitions_def=PARTS)
def probe(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
    return dg.MaterializeResult(metadata={"value": 1 if context.partition_key == "a" else -1})


@dg.asset_check(asset=KEY, name=CHECK.name, partitions_def=PARTS, blocking=True)
def value_is_positive(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
    positive = context.partition_key == "a"
    return dg.AssetCheckResult(
        passed=positive, description=f"{context.partition_key}: {'ok' if positive else 'negative'}"
    )


@pytest.fixture
def instance():
    with dg.instance_for_test() as inst:
        yield inst


def _run(instance: dg.DagsterInstance, partition: str) -> str:
    result = dg.materialize(
        [probe, value_is_positive], partition_key=partition, instance=instance, raise_on_error=False
    )
    return result.run_id


def test_latest_record_is_per_partition_with_status_run_and_description(instance) -> None:
    run_a, run_b = _run(instance, "a"), _run(instance, "b")
    a = latest_check_records(instance, [CHECK], "a")[CHECK]
    b = latest_check_records(instance, [CHECK], "b")[CHECK]
    assert (a.status, a.run_id, a.partition, a.description) == (
        CheckStatus.SUCCEEDED,
        run_a,
        "a",
        "a: ok",
    )
    assert (b.status, b.run_id, b.partition, b.description) == (
        CheckStatus.FAILED,
        run_b,
        "b",
        "b: negative",
    )
    # a later run of partition a does not change what partition b's gate sees
    _run(instance, "a")
    assert latest_check_records(instance, [CHECK], "b")[CHECK].run_id == run_b


def test_a_partition_never_evaluated_has_no_record(instance) -> None:
    _run(instance, "a")
    assert latest_check_records(instance, [CHECK], "b") == {}


def test_history_is_newest_first_and_names_run_and_partition(instance) -> None:
    runs = [_run(instance, p) for p in ("a", "b", "a")]
    history = check_history(instance, CHECK, limit=10)
    assert [(r.run_id, r.partition) for r in history] == [
        (runs[2], "a"),
        (runs[1], "b"),
        (runs[0], "a"),
    ]
    assert [r.status for r in history] == [
        CheckStatus.SUCCEEDED,
        CheckStatus.FAILED,
        CheckStatus.SUCCEEDED,
    ]
    assert len(check_history(instance, CHECK, limit=2)) == 2


def test_every_dagster_check_status_maps_to_one_of_ours() -> None:
    from dagster._core.storage.asset_check_execution_record import (
        AssetCheckExecutionRecordStatus,
    )

    from pipeline.dagster_private import _status

    assert {_status(s) for s in AssetCheckExecutionRecordStatus} == set(CheckStatus)


def test_pipes_databricks_client_still_polls_through_the_overridden_hook() -> None:
    from dagster_databricks import PipesDatabricksClient

    base = PipesDatabricksClient._poll_til_success
    assert list(inspect.signature(base).parameters) == ["self", "context", "run_id"]
    # the hook is what run() calls after submitting; if run() stops calling it, the
    # override (which names the failed run) would silently never run
    assert "_poll_til_success" in inspect.getsource(PipesDatabricksClient)

    class Boom(Exception):
        pass

    subclass = named_run_pipes_client_class(lambda client, run_id: Boom(run_id))
    assert issubclass(subclass, PipesDatabricksClient)
    assert subclass._poll_til_success is not base
