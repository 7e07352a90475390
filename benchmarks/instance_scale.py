"""Orchestration state at scale: 1,000 symbols, two years of daily partitions.

Run ``python -m benchmarks.instance_scale`` (1,000 symbols, 30 materialised days) or
``--quick`` (200 symbols, 5 days; same targets).

Builds, in a fresh ``PIPELINE_HOME`` with the generated sqlite ``dagster.yaml``:

* ``PIPELINE_PARTITIONS_START`` two years back, so ``fx_spreads`` has 730 dates x N
  symbols partitions;
* N symbols registered through the FX landing sensor itself (one evaluation over a
  drop that carries every symbol), as the daemon registers them;
* the last D days materialised: bronze ``fx_ticks`` by real in-process runs (with their
  blocking checks), ``curated/fx_spreads`` for every symbol x day recorded as
  materialisation events of those partitions (``report_runless_asset_event``: the same
  event-log rows a run writes and the UI reads; running N x D curation runs would
  measure the run launcher, not the instance).

Measured, each the median of three (the targets are the issue's):

a. the code location loading: a ``dagster-webserver`` on this instance is asked to reload
   the ``pipeline`` location over GraphQL (what the UI's *Reload* does) until it is
   ``LOADED`` again, at most 10 s;
b. one tick of every landing sensor in steady state (every file already ingested), and
   of the FX landing sensor seeing a new day's drop of all N symbols, at most 10 s each;
c. one tick of the ``fx_spreads`` sensor after a new bronze day (it looks up N
   partitions and requests N runs), reported beside the landing ticks against the same
   10 s;
d. the GraphQL query of ``fx_spreads``' partition statuses (the partitions tab), at
   most 2 s.

Exit status 1 when a target is missed; results in ``benchmarks/results/instance_scale.json``.
The measurement runs in a child process so the partitions start is read at import, as
in ``dagster dev``.
"""

import argparse
import datetime as dt
import json
import os
import platform
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import requests

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results" / "instance_scale.json"
SYMBOLS, DAYS = 1_000, 30
QUICK_SYMBOLS, QUICK_DAYS = 200, 5
HISTORY_DAYS = 730
TICKS_PER_SYMBOL = 12
LOAD_TARGET_S, TICK_TARGET_S, STATUS_TARGET_S = 10.0, 10.0, 2.0
REPEATS = 3
FX_SPREADS_SENSOR = "fx_spreads_from_bronze"
WEBSERVER_START_TIMEOUT_S = 300.0

PARTITION_STATUS_QUERY = """
query Statuses($key: AssetKeyInput!) {
  assetNodeOrError(assetKey: $key) {
    ... on AssetNode {
      assetPartitionStatuses {
        __typename
        ... on MultiPartitionStatuses {
          primaryDimensionName
          ranges { primaryDimStartKey primaryDimEndKey
            secondaryDim { ... on DefaultPartitionStatuses {
              materializedPartitions failedPartitions materializingPartitions } } }
        }
      }
    }
  }
}
"""
RELOAD_MUTATION = """
mutation { reloadRepositoryLocation(repositoryLocationName: "pipeline") {
  __typename ... on WorkspaceLocationEntry { name } ... on PythonError { message } } }
"""
LOCATION_STATUS_QUERY = """
{ workspaceOrError { ... on Workspace { locationEntries { name loadStatus
  locationOrLoadError { __typename } } } } }
"""


def symbols_of_size(n: int) -> dict[str, tuple[float, float]]:
    """``n`` distinct synthetic pairs ``X0000USD``... with a level and a spread in bp."""
    return {f"X{i:04d}USD": (1.0 + (i % 50) / 10.0, 1.0 + (i % 7)) for i in range(n)}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def graphql(url: str, query: str, variables: dict | None = None, timeout: float = 60.0) -> dict:
    """POST one GraphQL document to ``url`` and return its ``data`` (errors raise)."""
    response = requests.post(
        f"{url}/graphql", json={"query": query, "variables": variables or {}}, timeout=timeout
    )
    response.raise_for_status()
    payload = response.json()
    if payload.get("errors"):
        raise RuntimeError(str(payload["errors"])[:1000])
    return payload["data"]


def location_loaded(url: str) -> bool:
    try:
        entries = graphql(url, LOCATION_STATUS_QUERY, timeout=10)["workspaceOrError"]
    except requests.RequestException:
        return False
    for entry in entries.get("locationEntries") or []:
        if entry["name"] == "pipeline":
            error = entry["locationOrLoadError"]
            if error and error["__typename"] == "PythonError":
                raise RuntimeError("the pipeline code location failed to load")
            return entry["loadStatus"] == "LOADED" and error is not None
    return False


def wait_until(predicate, timeout: float, what: str, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def timed(fn) -> tuple[float, Any]:
    started = time.perf_counter()
    value = fn()
    return time.perf_counter() - started, value


# --- the child: build the instance and measure ---------------------------------------


def build_state(n_symbols: int, n_days: int, today: dt.date) -> dict[str, Any]:
    """Register the symbols and materialise the last ``n_days`` (see the module docstring)."""
    import dagster as dg

    from pipeline import keys
    from pipeline.definitions import build_definitions
    from pipeline.domain.demo_data import generate_fx_ticks
    from pipeline.partitions import symbol_date_key, symbol_partitions
    from pipeline.runs import materialize_partitions
    from pipeline.settings import ensure_dagster_home, get_settings

    settings = get_settings()
    ensure_dagster_home(settings)
    instance = dg.DagsterInstance.get()
    defs = build_definitions(settings)
    symbols = symbols_of_size(n_symbols)
    landing = settings.landing_dir / "fx_ticks"
    landing.mkdir(parents=True, exist_ok=True)
    # the last complete day is the "new" drop of the measurements; the days before it are
    # the materialised history
    days = [(today - dt.timedelta(days=n_days + 1 - i)).isoformat() for i in range(n_days + 1)]
    for day in days:
        ticks, _ = generate_fx_ticks(day, ticks_per_symbol=TICKS_PER_SYMBOL, symbols=symbols)
        ticks.write_parquet(landing / f"fx_ticks_{day}.parquet")
    new_day = days[-1]
    (landing / f"fx_ticks_{new_day}.parquet").rename(landing.parent / "new_day.parquet")

    sensors = sensor_defs(defs)
    registering, _ = tick(sensors["fx_ticks_landing"], instance, defs, cursor=None)
    for request in registering.dynamic_partitions_requests or []:
        instance.add_dynamic_partitions(request.partitions_def_name, request.partition_keys)
    registered = instance.get_dynamic_partitions(symbol_partitions.name)

    seconds_bronze, _ = timed(
        lambda: materialize_partitions(defs, instance, [keys.BRONZE_FX_TICKS], days[:-1])
    )

    def record_curated() -> int:
        count = 0
        for day in days[:-1]:
            for symbol in registered:
                instance.report_runless_asset_event(
                    dg.AssetMaterialization(
                        asset_key=keys.FX_SPREADS,
                        partition=str(symbol_date_key(symbol, day)),
                        metadata={"dagster/row_count": TICKS_PER_SYMBOL},
                    )
                )
                count += 1
        return count

    seconds_curated, recorded = timed(record_curated)
    return {
        "settings": settings,
        "instance": instance,
        "defs": defs,
        "sensors": sensors,
        "landing": landing,
        "new_day": new_day,
        "symbols_registered": len(registered),
        "bronze_days_run": len(days) - 1,
        "bronze_runs_s": seconds_bronze,
        "curated_partitions_recorded": recorded,
        "curated_record_s": seconds_curated,
    }


def sensor_defs(defs) -> dict[str, Any]:
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Starting in dagster 1.11, get_sensor_def", UserWarning)
        return {s.name: s for s in defs.sensors}


def tick(sensor, instance, defs, cursor: str | None) -> tuple[Any, float]:
    """One evaluation of ``sensor`` as the daemon makes it; the result and its seconds."""
    import dagster as dg

    context = dg.build_sensor_context(instance=instance, resources=defs.resources, cursor=cursor)
    seconds, result = timed(lambda: sensor(context))
    return result, seconds


def landing_ticks(state: dict[str, Any]) -> dict[str, Any]:
    """Steady ticks of every landing sensor, then the FX one seeing the new day."""
    instance, defs, sensors = state["instance"], state["defs"], state["sensors"]
    out: dict[str, Any] = {}
    for name in sorted(n for n in sensors if n.endswith("_landing")):
        first, _ = tick(sensors[name], instance, defs, cursor=None)
        cursor = first.cursor
        out[f"{name}_steady_s"] = statistics.median(
            tick(sensors[name], instance, defs, cursor)[1] for _ in range(REPEATS)
        )
        if name == "fx_ticks_landing":
            steady_cursor = cursor
    new_file = state["landing"] / f"fx_ticks_{state['new_day']}.parquet"
    (state["landing"].parent / "new_day.parquet").rename(new_file)
    seconds, requested = [], 0
    for _ in range(REPEATS):  # from the steady cursor: the new file is new each time
        result, s = tick(sensors["fx_ticks_landing"], instance, defs, steady_cursor)
        seconds.append(s)
        requested = len(result.run_requests or [])
    out["fx_ticks_landing_new_day_s"] = statistics.median(seconds)
    out["fx_ticks_landing_new_day_runs_requested"] = requested
    return out


def fx_spreads_tick(state: dict[str, Any]) -> dict[str, Any]:
    """The ``fx_spreads`` sensor after bronze of the new day has been materialised."""
    from pipeline import keys
    from pipeline.runs import materialize_partitions

    instance, defs, sensors = state["instance"], state["defs"], state["sensors"]
    sensor = sensors[FX_SPREADS_SENSOR]
    steady, _ = tick(sensor, instance, defs, cursor=None)  # consumes the recorded days
    materialize_partitions(defs, instance, [keys.BRONZE_FX_TICKS], [state["new_day"]])
    seconds, requested = [], 0
    for _ in range(REPEATS):
        result, s = tick(sensor, instance, defs, steady.cursor)
        seconds.append(s)
        requested = len(result.run_requests or [])
    return {
        "sensor": sensor.name,
        "fx_spreads_new_day_s": statistics.median(seconds),
        "fx_spreads_new_day_runs_requested": requested,
    }


def webserver_measures(state: dict[str, Any]) -> dict[str, Any]:
    """Start ``dagster-webserver`` on the instance; time reloads and the status query."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(state["settings"].home / "webserver.log", "wb")
    proc = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "dagster-webserver"),
            *("-w", str(REPO / "workspace.yaml"), "-h", "127.0.0.1", "-p", str(port)),
        ],
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        start_s, _ = timed(
            lambda: wait_until(
                lambda: location_loaded(url), WEBSERVER_START_TIMEOUT_S, "the webserver", 0.5
            )
        )
        reloads = []
        for _ in range(REPEATS):

            def reload() -> None:
                graphql(url, RELOAD_MUTATION, timeout=120)
                wait_until(lambda: location_loaded(url), 120, "the reloaded location")

            reloads.append(timed(reload)[0])
        variables = {"key": {"path": ["curated", "fx_spreads"]}}
        graphql(url, PARTITION_STATUS_QUERY, variables)  # first query warms caches
        queries, materialised = [], 0
        for _ in range(REPEATS):
            seconds, data = timed(lambda: graphql(url, PARTITION_STATUS_QUERY, variables))
            queries.append(seconds)
            statuses = data["assetNodeOrError"]["assetPartitionStatuses"]
            materialised = count_materialised(statuses)
        return {
            "webserver_ready_s": start_s,
            "location_reload_s": statistics.median(reloads),
            "partition_status_query_s": statistics.median(queries),
            "partition_status_materialised": materialised,
        }
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def count_materialised(statuses: dict) -> int:
    """Materialised partitions in a ``MultiPartitionStatuses`` answer (ranges x keys)."""
    from dagster import PartitionKeyRange

    from pipeline.partitions import date_partitions

    total = 0
    for block in statuses["ranges"]:
        dates = PartitionKeyRange(block["primaryDimStartKey"], block["primaryDimEndKey"])
        n_dates = len(date_partitions.get_partition_keys_in_range(dates))
        total += n_dates * len(block["secondaryDim"]["materializedPartitions"])
    return total


def child(n_symbols: int, n_days: int) -> dict[str, Any]:
    today = dt.date.fromisoformat(os.environ["PIPELINE_PARTITIONS_START"]) + dt.timedelta(
        days=HISTORY_DAYS
    )
    setup_s, state = timed(lambda: build_state(n_symbols, n_days, today))
    results: dict[str, Any] = {
        "symbols": n_symbols,
        "materialised_days": n_days,
        "history_days": HISTORY_DAYS,
        "setup_s": setup_s,
        **{k: v for k, v in state.items() if isinstance(v, int | float)},
    }
    results.update(landing_ticks(state))
    results.update(fx_spreads_tick(state))
    results.update(webserver_measures(state))
    return results


# --- the parent: environment, targets, report ----------------------------------------


def judge(results: dict[str, Any]) -> list[str]:
    """Every missed target, as a sentence."""
    misses = []
    if results["location_reload_s"] > LOAD_TARGET_S:
        misses.append(f"code location reload {results['location_reload_s']:.1f} s > 10 s")
    for key, value in results.items():
        if key.endswith("_steady_s") or key.endswith("_new_day_s"):
            if value > TICK_TARGET_S:
                misses.append(f"{key} {value:.1f} s > {TICK_TARGET_S:.0f} s")
    if results["partition_status_query_s"] > STATUS_TARGET_S:
        misses.append(f"partition status query {results['partition_status_query_s']:.2f} s > 2 s")
    expected = results["symbols_registered"] * results["materialised_days"]
    if results["partition_status_materialised"] != expected:
        misses.append(
            f"the status query counts {results['partition_status_materialised']} materialised "
            f"partitions, not the {expected} recorded"
        )
    return misses


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.instance_scale")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--child", nargs=2, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(*args.child)))
        return 0
    n_symbols, n_days = (QUICK_SYMBOLS, QUICK_DAYS) if args.quick else (SYMBOLS, DAYS)
    start = (dt.datetime.now(dt.UTC).date() - dt.timedelta(days=HISTORY_DAYS)).isoformat()
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="instance-scale-") as tmp:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("PIPELINE_", "DAGSTER_", "MLFLOW_", "LAKE_", "LANDING_"))
        }
        env.update(
            PIPELINE_HOME=f"{tmp}/home",
            DAGSTER_HOME=f"{tmp}/home/dagster",
            PIPELINE_PARTITIONS_START=start,
            # the sensors' resources include the PII scan's; a throwaway salt for a throwaway home
            PIPELINE_PII_SALT=secrets.token_hex(16),
        )
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "benchmarks.instance_scale",
                "--child",
                str(n_symbols),
                str(n_days),
            ],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
        )
    if done.returncode != 0:
        print(done.stdout[-3000:], done.stderr[-6000:], sep="\n")
        return 1
    results = json.loads(done.stdout.strip().splitlines()[-1])
    results.update(
        load_start=load_start, load_end=os.getloadavg(), cpus=os.cpu_count(), host=platform.node()
    )
    misses = judge(results)
    results["misses"] = misses
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=1, default=str) + "\n")
    for key, value in results.items():
        if isinstance(value, float):
            print(f"{key:45s} {value:10.3f}")
        elif isinstance(value, int):
            print(f"{key:45s} {value:10d}")
    print("PASS" if not misses else "FAIL: " + "; ".join(misses))
    return 1 if misses else 0


if __name__ == "__main__":
    sys.exit(main())
