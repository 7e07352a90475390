"""Cross-run gates read real check records from an ephemeral Dagster instance.

A tiny partitioned asset carries one blocking check whose outcome per partition is
set by the test, so each scenario (failed, passed, never evaluated, failed later,
interrupted) is produced by an actual run rather than a fake record.
"""

from collections.abc import Iterator

import dagster as dg
import pytest

from pipeline.gates import GateClosedError, check_record_failures, require_gate

UPSTREAM = dg.AssetKey(["gate_test", "upstream"])
CHECK = "value_within_bound"
PARTS = dg.StaticPartitionsDefinition(["A", "B", "C"])


class Scenario:
    """What the upstream asset stores per partition; the check reads it back."""

    def __init__(self) -> None:
        self.values: dict[str, float] = {}
        self.raise_in_asset: set[str] = set()


def build(scenario: Scenario) -> list:
    @dg.asset(key=UPSTREAM, partitions_def=PARTS)
    def upstream(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        if context.partition_key in scenario.raise_in_asset:
            raise RuntimeError(f"upstream broke for {context.partition_key}")
        return dg.MaterializeResult(metadata={"value": scenario.values[context.partition_key]})

    @dg.asset_check(asset=UPSTREAM, name=CHECK, partitions_def=PARTS, blocking=True)
    def value_within_bound(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
        value = scenario.values[context.partition_key]
        return dg.AssetCheckResult(passed=value <= 5.0, description=f"value {value} vs bound 5.0")

    return [upstream, value_within_bound]


@pytest.fixture
def instance() -> Iterator[dg.DagsterInstance]:
    inst = dg.DagsterInstance.ephemeral()
    yield inst
    inst.dispose()


def run(
    instance: dg.DagsterInstance, scenario: Scenario, partition: str
) -> dg.ExecuteInProcessResult:
    return dg.materialize(
        build(scenario), partition_key=partition, instance=instance, raise_on_error=False
    )


def test_gate_refuses_the_failed_partition_and_opens_the_passed_one(
    instance: dg.DagsterInstance,
) -> None:
    scenario = Scenario()
    scenario.values = {"A": 7.0, "B": 3.0}
    failed_run = run(instance, scenario, "A")
    assert failed_run.get_asset_check_evaluations()[0].passed is False
    assert run(instance, scenario, "B").success

    failures = check_record_failures(instance, UPSTREAM, [CHECK], "A")
    assert failures == [
        f"gate_test/upstream:{CHECK} failed for partition A in run {failed_run.run_id} "
        "(value 7.0 vs bound 5.0)"
    ]
    with pytest.raises(GateClosedError) as err:
        require_gate(
            instance=instance,
            asset_key=UPSTREAM,
            check_names=[CHECK],
            partition_key="A",
            what="gate_test/downstream",
        )
    message = err.value.description
    assert message.startswith(
        "refusing to write gate_test/downstream for partition A: the gate on "
        "gate_test/upstream did not pass: "
    )
    assert CHECK in message
    assert "value 7.0 vs bound 5.0" in message
    assert err.value.metadata["gate_failures"].value == f"- {failures[0]}"
    assert err.value.allow_retries is False

    assert check_record_failures(instance, UPSTREAM, [CHECK], "B") == []
    require_gate(
        instance=instance,
        asset_key=UPSTREAM,
        check_names=[CHECK],
        partition_key="B",
        what="gate_test/downstream",
    )


def test_never_evaluated_partition_and_unknown_check_refuse(instance: dg.DagsterInstance) -> None:
    scenario = Scenario()
    scenario.values = {"B": 1.0}
    assert run(instance, scenario, "B").success
    assert check_record_failures(instance, UPSTREAM, [CHECK], "C") == [
        f"gate_test/upstream:{CHECK} was never evaluated for partition C"
    ]
    with pytest.raises(GateClosedError, match="partition C"):
        require_gate(
            instance=instance,
            asset_key=UPSTREAM,
            check_names=[CHECK],
            partition_key="C",
            what="x",
        )
    assert check_record_failures(instance, UPSTREAM, [CHECK, "other_check"], "B") == [
        "gate_test/upstream:other_check was never evaluated for partition B"
    ]


def test_rule_failures_alone_close_a_gate_with_a_clean_history(
    instance: dg.DagsterInstance,
) -> None:
    scenario = Scenario()
    scenario.values = {"B": 1.0}
    assert run(instance, scenario, "B").success
    with pytest.raises(GateClosedError) as err:
        require_gate(
            instance=instance,
            asset_key=UPSTREAM,
            check_names=[CHECK],
            partition_key="B",
            rule_failures=["stored R-hat 1.07 > 1.01"],
            what="gate_test/downstream",
        )
    assert err.value.description.endswith("did not pass: stored R-hat 1.07 > 1.01")


def test_the_latest_evaluation_decides(instance: dg.DagsterInstance) -> None:
    scenario = Scenario()
    scenario.values = {"A": 9.0}
    run(instance, scenario, "A")
    scenario.values = {"A": 2.0}
    assert run(instance, scenario, "A").success
    assert check_record_failures(instance, UPSTREAM, [CHECK], "A") == []
    scenario.values = {"A": 6.0}
    rerun = run(instance, scenario, "A")
    assert check_record_failures(instance, UPSTREAM, [CHECK], "A") == [
        f"gate_test/upstream:{CHECK} failed for partition A in run {rerun.run_id} "
        "(value 6.0 vs bound 5.0)"
    ]


def test_a_run_that_broke_before_the_check_refuses_even_after_an_earlier_pass(
    instance: dg.DagsterInstance,
) -> None:
    scenario = Scenario()
    scenario.values = {"A": 1.0}
    assert run(instance, scenario, "A").success
    scenario.raise_in_asset = {"A"}
    broken = run(instance, scenario, "A")
    assert not broken.success
    assert check_record_failures(instance, UPSTREAM, [CHECK], "A") == [
        f"gate_test/upstream:{CHECK} did not complete for partition A in run {broken.run_id}"
    ]


def test_unpartitioned_gate(instance: dg.DagsterInstance) -> None:
    key = dg.AssetKey(["gate_test", "whole"])
    outcome = {"passed": False}

    @dg.asset(key=key)
    def whole() -> dg.MaterializeResult:
        return dg.MaterializeResult()

    @dg.asset_check(asset=key, name=CHECK, blocking=True)
    def whole_check() -> dg.AssetCheckResult:
        return dg.AssetCheckResult(passed=outcome["passed"], description="whole-table bound")

    first = dg.materialize([whole, whole_check], instance=instance, raise_on_error=False)
    with pytest.raises(GateClosedError) as err:
        require_gate(
            instance=instance, asset_key=key, check_names=[CHECK], partition_key=None, what="y"
        )
    assert err.value.description == (
        "refusing to write y for the asset: the gate on gate_test/whole did not pass: "
        f"gate_test/whole:{CHECK} failed in run {first.run_id} (whole-table bound)"
    )
    outcome["passed"] = True
    assert dg.materialize([whole, whole_check], instance=instance).success
    assert check_record_failures(instance, key, [CHECK], None) == []


def build_range_aware(scenario: Scenario) -> list:
    """Like :func:`build`, but the asset and check handle a partition range in one run."""

    @dg.asset(key=UPSTREAM, partitions_def=PARTS, backfill_policy=dg.BackfillPolicy.single_run())
    def upstream(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        return dg.MaterializeResult(metadata={"partitions": len(context.partition_keys)})

    @dg.asset_check(asset=UPSTREAM, name=CHECK, partitions_def=PARTS, blocking=True)
    def value_within_bound(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
        bad = [k for k in context.partition_keys if scenario.values[k] > 5.0]
        return dg.AssetCheckResult(passed=not bad, description=f"over bound: {bad}")

    return [upstream, value_within_bound]


def test_a_range_run_failure_closes_every_partition_unless_a_per_partition_rule_decides(
    instance: dg.DagsterInstance,
) -> None:
    scenario = Scenario()
    scenario.values = {"A": 1.0, "B": 9.0, "C": 1.0}
    result = dg.materialize(
        build_range_aware(scenario),
        instance=instance,
        raise_on_error=False,
        tags={
            "dagster/asset_partition_range_start": "A",
            "dagster/asset_partition_range_end": "C",
        },
    )
    (evaluation,) = result.get_asset_check_evaluations()
    assert not evaluation.passed
    assert evaluation.partition is None  # dagster records one result for the whole range

    # without a per-partition rule the range result is all we know: every partition closes
    for partition in ("A", "B", "C"):
        (failure,) = check_record_failures(instance, UPSTREAM, [CHECK], partition)
        assert f"failed for partition {partition} in range run {result.run_id}" in failure

    # with one, the range result is left to that rule, which decides per partition
    for partition in ("A", "B", "C"):
        assert (
            check_record_failures(instance, UPSTREAM, [CHECK], partition, per_partition_rule=True)
            == []
        )
