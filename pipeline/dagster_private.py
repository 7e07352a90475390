"""Every use of Dagster's private API, in one place, with the reason for each.

Dagster 1.13's public API does not serve four needs of this platform:

* **The latest check evaluation of one partition.** The cross-run gates
  (:mod:`pipeline.gates`) must know whether a blocking check passed *for the same
  partition* in any earlier run. ``DagsterInstance.get_latest_asset_check_evaluation_record``
  takes no partition; the event-log storage's
  ``get_latest_asset_check_execution_by_key(..., partition_filter=PartitionKeyFilter(...))``
  does, and its records carry an ``AssetCheckExecutionRecordStatus``.
* **The check history of a range run.** A run over a partition range may record a check
  result without a partition; ``get_asset_check_execution_history`` is the one reader.
* **A check result per partition of a range run.** ``AssetCheckResult`` takes no
  partition: in a run over a partition range Dagster records it once, without a
  partition, and every partition's planned execution stays PLANNED (the UI shows
  "Skipped"). ``AssetCheckEvaluation(partition=...)`` is public, but the data linking
  an evaluation to the materialisation it judged
  (``AssetCheckEvaluationTargetMaterializationData``) is not exported;
  :func:`partition_check_evaluation` builds it as ``AssetCheckResult`` does for one
  partition.
* **Naming a failed Databricks run.** ``PipesDatabricksClient`` reports a failed task only
  by its state message ("Workload failed"); ``_poll_til_success`` is the one hook that
  knows the run id, so :func:`named_run_pipes_client_class` overrides it.

``pipeline_tests/test_dagster_private.py`` pins the behaviour relied on, so an upgrade
that changes any of it fails loudly in the test suite instead of silently opening a gate.
"""

import enum
import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from dagster import (
    AssetCheckEvaluation,
    AssetCheckKey,
    AssetCheckSeverity,
    AssetRecordsFilter,
    DagsterInstance,
)


class CheckStatus(enum.Enum):
    """Outcome of one recorded check execution, in this platform's own terms."""

    PLANNED = "planned"  # the run planned it; no result (yet, or ever if the run died)
    SUCCEEDED = "succeeded"
    FAILED = "failed"


@dataclass(frozen=True)
class CheckRecord:
    """What the gates need to know of one stored check execution."""

    status: CheckStatus
    run_id: str
    partition: str | None
    description: str | None


def _status(record_status: Any) -> CheckStatus:
    from dagster._core.storage.asset_check_execution_record import (
        AssetCheckExecutionRecordStatus,
    )

    return {
        AssetCheckExecutionRecordStatus.PLANNED: CheckStatus.PLANNED,
        AssetCheckExecutionRecordStatus.SUCCEEDED: CheckStatus.SUCCEEDED,
        AssetCheckExecutionRecordStatus.FAILED: CheckStatus.FAILED,
    }[record_status]


def _record(raw: Any) -> CheckRecord:
    evaluation = raw.event.asset_check_evaluation if raw.event else None
    return CheckRecord(
        status=_status(raw.status),
        run_id=raw.run_id,
        partition=raw.partition,
        description=evaluation.description if evaluation else None,
    )


def latest_check_records(
    instance: DagsterInstance, check_keys: Sequence[AssetCheckKey], partition_key: str | None
) -> dict[AssetCheckKey, CheckRecord]:
    """The latest stored execution of each check, for ``partition_key`` when given."""
    from dagster._core.event_api import PartitionKeyFilter

    partition_filter = PartitionKeyFilter(key=partition_key) if partition_key else None
    latest = instance.event_log_storage.get_latest_asset_check_execution_by_key(
        list(check_keys), partition_filter=partition_filter
    )
    return {key: _record(raw) for key, raw in latest.items()}


def check_history(
    instance: DagsterInstance, check_key: AssetCheckKey, *, limit: int
) -> list[CheckRecord]:
    """The ``limit`` most recent executions of one check, newest first."""
    history = instance.event_log_storage.get_asset_check_execution_history(check_key, limit=limit)
    return [_record(raw) for raw in history]


def partition_check_evaluation(
    instance: DagsterInstance,
    check_key: AssetCheckKey,
    partition_key: str,
    *,
    passed: bool,
    description: str,
    metadata: Mapping[str, Any],
    severity: AssetCheckSeverity,
    blocking: bool,
) -> AssetCheckEvaluation:
    """The evaluation of one check on one partition, tied to that partition's latest write."""
    from dagster._core.definitions.asset_checks.asset_check_evaluation import (
        AssetCheckEvaluationTargetMaterializationData,
    )

    latest = instance.fetch_materializations(
        AssetRecordsFilter(asset_key=check_key.asset_key, asset_partitions=[partition_key]),
        limit=1,
    ).records
    target = (
        AssetCheckEvaluationTargetMaterializationData(
            run_id=latest[0].event_log_entry.run_id,
            storage_id=latest[0].storage_id,
            timestamp=latest[0].timestamp,
        )
        if latest
        else None
    )
    return AssetCheckEvaluation(
        asset_key=check_key.asset_key,
        check_name=check_key.name,
        passed=passed,
        metadata=metadata,
        target_materialization_data=target,
        severity=severity,
        description=description,
        blocking=blocking,
        partition=partition_key,
    )


@functools.cache
def named_run_pipes_client_class(describe_failure: Callable[[Any, int], Exception]) -> type:
    """``PipesDatabricksClient`` whose failures name the run and carry the task's error.

    Parameters
    ----------
    describe_failure
        ``describe_failure(workspace_client, run_id)`` returns the exception to raise
        when the run failed (the caller knows how to describe a run).
    """
    from dagster._core.errors import DagsterPipesExecutionError
    from dagster_databricks import PipesDatabricksClient

    class NamedRunPipesDatabricksClient(PipesDatabricksClient):
        def _poll_til_success(self, context: Any, run_id: int) -> None:
            page = self.client.jobs.get_run(run_id).run_page_url
            context.log.info(f"Databricks run {run_id} submitted: {page}")
            try:
                super()._poll_til_success(context, run_id)
            except DagsterPipesExecutionError as exc:
                raise describe_failure(self.client, run_id) from exc
            context.log.info(f"Databricks run {run_id} succeeded: {page}")

    return NamedRunPipesDatabricksClient
