"""Run policies shared by assets and sensors: pools, retries, automation conditions.

They live below the assets and the automation module, so an asset can declare its
pool, retry policy and automation condition without importing the sensors, and the
sensors can launch runs with the same run config without importing the assets.
"""

from collections.abc import Iterator
from contextlib import contextmanager

from dagster import AutomationCondition, Backoff, Failure, Jitter, RetryPolicy

from pipeline.domain.errors import DomainError

INGEST_RUN_CONFIG = {"execution": {"config": {"in_process": {}}}}
"""Run config of sensor-launched ingestion runs: every step in the run's own process.

An ingestion step is a few seconds of polars; the default multiprocess executor
would start a fresh Python (and import the code location) for the asset and for
each of its checks, which costs more than the work. Model runs keep the default.
"""

MODEL_POOL = "model_training"
"""Pool of heavy model assets (``@asset(pool=MODEL_POOL)``).

``dagster.yaml`` (written by :func:`pipeline.settings.ensure_dagster_home`) sets
``concurrency.pools.default_limit: 1``, so two samplers never fight for a
laptop's cores; raise it with ``dagster instance concurrency set model_training N``.
"""

model_retry_policy = RetryPolicy(
    max_retries=3, delay=5, backoff=Backoff.EXPONENTIAL, jitter=Jitter.PLUS_MINUS
)
"""Retries for transient failures of model assets (MLflow or storage unreachable).

Delays are ``(2**n - 1) * 5 s ± 5 s``: about 0-10 s, 10-20 s and 30-40 s, so a
restarting tracking server or a throttled object store gets a minute to recover.
Dagster retries *every* exception under a policy; deterministic failures must not
be retried, which is why gates raise ``Failure(allow_retries=False)`` and model
bodies wrap domain code in :func:`domain_errors_are_final`.
"""


def gated_eager() -> AutomationCondition:
    """Eager materialisation that never requests a partition behind a failed gate.

    ``eager()`` fires when an upstream partition updates; the extra term holds the
    request until every *blocking* check on every upstream asset passed for the
    mapped partition (or is requested in the same tick, in which case the run
    itself stops at the failing check). Without it, the daemon would launch a
    run only for the asset's own guard to refuse it.
    """
    return (
        AutomationCondition.eager() & AutomationCondition.all_deps_blocking_checks_passed()
    ).with_label("gated_eager")


@contextmanager
def domain_errors_are_final() -> Iterator[None]:
    """Turn a :class:`~pipeline.domain.errors.DomainError` into a non-retried failure.

    A domain error (a contract breach, a diverged sampler, an invalid partition)
    fails the same way on every attempt; retrying it under
    :data:`model_retry_policy` only delays the message. Anything else (network,
    storage) propagates unchanged and is retried.

    Raises
    ------
    Failure
        With ``allow_retries=False`` and the domain error's message.
    """
    try:
        yield
    except DomainError as exc:
        raise Failure(
            description=f"{type(exc).__name__}: {exc}",
            allow_retries=False,
        ) from exc
