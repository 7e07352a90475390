"""One check outcome per partition, in single-partition and range runs alike.

A check here judges each partition of its run on its own (a :class:`Verdict`).
Dagster's ``AssetCheckResult`` carries no partition: in a run over a partition
range (a single-run backfill) it would be recorded once, without a partition, and
every partition's planned execution would stay PLANNED, shown as "Skipped" in the
UI although the check ran and passed. :func:`check_outcomes` therefore records one
evaluation per partition in a range run, each with that partition's own verdict,
description and metadata, so the UI, the GraphQL ``partitionStatuses`` and the
cross-run gates read the truth of the partition they are asked about. A failed
blocking evaluation still stops the run's downstream steps.
"""

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from dagster import (
    AssetCheckEvaluation,
    AssetCheckExecutionContext,
    AssetCheckResult,
    AssetCheckSeverity,
    Output,
)

from pipeline.dagster_private import partition_check_evaluation

DESCRIPTION_LIMIT = 500


@dataclass(frozen=True)
class Verdict:
    """Outcome of one check on one partition."""

    passed: bool
    summary: str
    metadata: Mapping[str, Any] = field(default_factory=dict)


CheckEvent = AssetCheckResult | AssetCheckEvaluation | Output


def check_outcomes(
    context: AssetCheckExecutionContext,
    verdicts: Mapping[str, Verdict],
    *,
    severity: AssetCheckSeverity = AssetCheckSeverity.ERROR,
) -> Iterator[CheckEvent]:
    """Yield what a check body yields for ``verdicts`` (partition key -> verdict).

    One partition: an ``AssetCheckResult`` (Dagster attaches the partition). A range:
    one ``AssetCheckEvaluation`` per partition, then the check's (empty) output so
    that downstream steps of the run may start.
    """
    missing = set(context.partition_keys) - set(verdicts)
    if missing:
        raise ValueError(f"no verdict for partitions {sorted(missing)} of the run")
    if context.has_partition_key:
        (verdict,) = verdicts.values()
        yield AssetCheckResult(
            passed=verdict.passed,
            severity=severity,
            metadata=dict(verdict.metadata),
            description=verdict.summary[:DESCRIPTION_LIMIT],
        )
        return
    (spec,) = context.check_specs
    failed = [key for key, verdict in verdicts.items() if not verdict.passed]
    context.log.info(
        f"{spec.name}: {len(verdicts) - len(failed)} of {len(verdicts)} partitions passed"
        + (f"; failed: {', '.join(failed)}" if failed else "")
    )
    for key, verdict in verdicts.items():
        yield partition_check_evaluation(
            context.instance,
            spec.key,
            key,
            passed=verdict.passed,
            description=verdict.summary[:DESCRIPTION_LIMIT],
            metadata=dict(verdict.metadata),
            severity=severity,
            blocking=spec.blocking,
        )
    (output,) = context.op_def.output_defs
    yield Output(None, output_name=output.name)
