"""A bronze FX day whose run dies with SIGKILL after its materialisation (a stand-in).

Its blocking check kills its own process, so the run stays ``STARTED`` with the
materialisation stored: the state a run worker killed by the OOM killer, a node loss or
``kill -9`` leaves behind. Loaded by ``dagster-daemon`` in the run-monitoring test.
"""

import os
import signal
import sys

import dagster as dg

from pipeline import keys
from pipeline.partitions import date_partitions


@dg.asset(key=keys.BRONZE_FX_TICKS, partitions_def=date_partitions)
def bronze_stand_in() -> None:
    """Materialises nothing but the event."""


@dg.asset_check(
    asset=keys.BRONZE_FX_TICKS,
    name=keys.CHECK_FILE_SCHEMA,
    partitions_def=date_partitions,
    blocking=True,
)
def dies_mid_run() -> dg.AssetCheckResult:
    """The run worker is killed before the gate is evaluated."""
    os.kill(os.getpid(), signal.SIGKILL)
    return dg.AssetCheckResult(passed=True)  # never reached


defs = dg.Definitions(assets=[bronze_stand_in], asset_checks=[dies_mid_run])


if __name__ == "__main__":
    dagster_home, max_runtime = sys.argv[1], sys.argv[2]
    with dg.DagsterInstance.from_config(dagster_home) as instance:
        dg.materialize(
            [bronze_stand_in, dies_mid_run],
            partition_key="2026-09-01",
            instance=instance,
            tags={"dagster/max_runtime": max_runtime},
        )
