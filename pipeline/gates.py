"""Cross-run gates: a failed blocking check must also hold in later runs.

A blocking asset check stops downstream steps only inside the run in which it
failed (dagster issue 17332). Downstream model assets therefore call
:func:`require_gate` before writing anything. It combines two sources of truth:

1. the latest evaluation of each gating check *for the same partition*, read
   from the Dagster instance (a failed or never-evaluated check refuses), and
2. the gate rule itself, recomputed by the caller on what the upstream asset
   stored for that partition (so a gate cannot be bypassed by wiping history or
   by a run launched on another instance).
"""

from collections.abc import Iterable, Sequence

from dagster import AssetCheckKey, AssetKey, DagsterInstance, Failure, MetadataValue

from pipeline.dagster_private import CheckStatus, check_history, latest_check_records


class GateClosedError(Failure):
    """Raised by a downstream asset when its upstream gate did not pass."""


def check_record_failures(
    instance: DagsterInstance,
    asset_key: AssetKey,
    check_names: Iterable[str],
    partition_key: str | None,
    *,
    per_partition_rule: bool = False,
) -> list[str]:
    """Describe each gating check whose latest evaluation for the partition did not pass.

    Parameters
    ----------
    per_partition_rule
        Set when the caller also recomputes the gate rule per partition from stored
        facts. A run over a partition range (single-run backfill) records one check
        result for the whole range, so a failure there may belong to another
        partition; with a per-partition rule at hand, such range results (and a
        missing record) are left to that rule instead of closing the gate for every
        partition of the range.

    Returns an empty list when every check's latest evaluation passed.
    """
    check_keys = [AssetCheckKey(asset_key, name) for name in check_names]
    latest = latest_check_records(instance, check_keys, partition_key)
    failures = []
    where = f" for partition {partition_key}" if partition_key else ""
    for check_key in check_keys:
        record = latest.get(check_key)
        label = f"{asset_key.to_user_string()}:{check_key.name}"
        if record is None:
            if not per_partition_rule:
                failures.append(f"{label} was never evaluated{where}")
        elif record.status == CheckStatus.FAILED:
            detail = f" ({record.description})" if record.description else ""
            failures.append(f"{label} failed{where} in run {record.run_id}{detail}")
        elif record.status == CheckStatus.PLANNED:
            # A run over a partition range (single-run backfill) plans one evaluation per
            # partition but records the result without a partition: use that result.
            outcome = _range_run_outcome(instance, check_key, record.run_id)
            if outcome is not None and per_partition_rule:
                continue
            if outcome is None:
                failures.append(f"{label} did not complete{where} in run {record.run_id}")
            elif outcome == CheckStatus.FAILED:
                failures.append(f"{label} failed{where} in range run {record.run_id}")
    return failures


def _range_run_outcome(
    instance: DagsterInstance, check_key: AssetCheckKey, run_id: str
) -> CheckStatus | None:
    """Status of the unpartitioned evaluation a range run recorded, if any."""
    for record in check_history(instance, check_key, limit=20):
        if record.run_id == run_id and record.partition is None:
            if record.status != CheckStatus.PLANNED:
                return record.status
    return None


def require_gate(
    *,
    instance: DagsterInstance,
    asset_key: AssetKey,
    check_names: Sequence[str],
    partition_key: str | None,
    rule_failures: Sequence[str] = (),
    what: str,
) -> None:
    """Refuse to write ``what`` unless the upstream gate passed for ``partition_key``.

    Parameters
    ----------
    rule_failures
        Failures of the gate rule recomputed by the caller on the stored upstream
        artefact; any entry closes the gate even if the check history is clean.
    what
        The output being protected, used in the error message.

    Raises
    ------
    GateClosedError
        Naming the partition, each failing check or rule, and the values.
    """
    failures = [
        *rule_failures,
        *check_record_failures(instance, asset_key, check_names, partition_key),
    ]
    if failures:
        where = f"partition {partition_key}" if partition_key else "the asset"
        raise GateClosedError(
            description=(
                f"refusing to write {what} for {where}: the gate on "
                f"{asset_key.to_user_string()} did not pass: " + "; ".join(failures)
            ),
            metadata={"gate_failures": MetadataValue.md("\n".join(f"- {f}" for f in failures))},
            allow_retries=False,
        )
