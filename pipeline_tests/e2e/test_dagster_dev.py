"""End to end through a real ``dagster dev``: sensors, runs, a backfill, the lake, MLflow.

The drop is small (one claims month, two FX days of three valid symbols and one
invalid one) so the whole module runs in a few minutes, yet it crosses every
boundary: landing files -> landing sensors -> daemon-launched runs -> Delta ->
``fx_spreads_from_bronze`` -> dynamic partitions -> a GraphQL backfill -> model
runs launched over GraphQL -> MLflow runs, artefacts and registry aliases.
"""

import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import pytest
import requests

from pipeline import keys
from pipeline.domain.demo_data import claims_truth, generate_claims
from pipeline.resources.lake import BATCH_METADATA_KEY as BATCH_METADATA
from pipeline_tests.e2e.conftest import (
    ARTIFACTS,
    BIN,
    CLAIMS_MONTH,
    EXPECTED_SENSOR_RUNS,
    EXPECTED_SYMBOLS,
    FX_DATES,
    N_POLICIES,
    RUNS_TIMEOUT_S,
    SERVER_START_TIMEOUT_S,
    TICKS_PER_SYMBOL,
    DagsterDev,
    Ingested,
    e2e_environment,
    free_port,
    session_members,
    start_in_own_session,
    stop_session,
)
from pipeline_tests.e2e.graphql import FINISHED_BACKFILL, FINISHED_RUN, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

SENSORS = (
    "claims_landing",
    "fx_ticks_landing",
    "fx_incidents_landing",
    "loan_book_landing",
    "loan_scenarios_landing",
    "fx_spreads_from_bronze",
    "automation",
)
SCHEDULES = ("credibility_monthly_schedule", "fx_scoring_daily_schedule")


def _http_ok(url: str) -> bool | None:
    try:
        return True if requests.get(url, timeout=5).status_code == 200 else None
    except requests.RequestException:
        return None


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def test_make_dev_serves_dagster_and_mlflow_and_stops_cleanly(tmp_path: Path) -> None:
    """``pipeline dev`` (what ``make dev`` runs): both UIs answer; SIGTERM stops every process."""
    dagster_port, mlflow_port = free_port(), free_port()
    proc = start_in_own_session(
        [
            str(BIN / "pipeline"),
            "dev",
            "--dagster-port",
            str(dagster_port),
            "--mlflow-port",
            str(mlflow_port),
        ],
        e2e_environment(tmp_path / "home"),
        ARTIFACTS / "pipeline_dev.log",
    )
    ui_sessions: list[int] = []
    try:
        wait_for(
            lambda: _http_ok(f"http://127.0.0.1:{dagster_port}/server_info"),
            timeout=SERVER_START_TIMEOUT_S,
            what="the Dagster UI of `pipeline dev`",
        )
        wait_for(
            lambda: _http_ok(f"http://127.0.0.1:{mlflow_port}/health"),
            timeout=60,
            what="the MLflow UI of `pipeline dev`",
        )
        ui_sessions = _children(proc.pid)  # each UI leads its own session
        assert len(ui_sessions) == 2, ui_sessions

        proc.send_signal(signal.SIGTERM)
        started = time.monotonic()
        proc.wait(timeout=60)
        print(f"`pipeline dev` stopped in {time.monotonic() - started:.1f} s")
        assert [pid for sid in ui_sessions for pid in session_members(sid)] == []
        assert _http_ok(f"http://127.0.0.1:{dagster_port}/server_info") is None
    finally:
        for sid in ui_sessions:
            for pid in session_members(sid):
                subprocess.run(["kill", "-9", str(pid)], check=False)
        stop_session(proc, grace_s=5)


def test_sensors_and_schedules_run_by_default(dagster_dev: DagsterDev) -> None:
    print(f"dagster dev answered after {dagster_dev.started_in_s:.1f} s")
    sensors = dagster_dev.client.sensor_statuses()
    assert {name: sensors.get(name) for name in SENSORS} == dict.fromkeys(SENSORS, "RUNNING")
    schedules = dagster_dev.client.schedule_statuses()
    assert {name: schedules.get(name) for name in SCHEDULES} == dict.fromkeys(SCHEDULES, "RUNNING")


def test_sensors_ingest_the_drop_exactly_once(dagster_dev: DagsterDev, ingested: Ingested) -> None:
    print(f"sensor-driven runs finished {ingested.seconds:.1f} s after the drop")
    # one run per delivered partition: re-evaluations every 3 s requested no duplicates
    counts = {trigger: len(runs) for trigger, runs in ingested.runs.items()}
    assert counts == EXPECTED_SENSOR_RUNS
    assert {r["status"] for runs in ingested.runs.values() for r in runs} == {"SUCCESS"}
    spreads_partitions = sorted(
        r["tags"]["dagster/partition"] for r in ingested.runs["bronze:fx_ticks"]
    )
    assert spreads_partitions == sorted(f"{d}|{s}" for d in FX_DATES for s in EXPECTED_SYMBOLS)

    lake = Path(dagster_dev.settings.lake_uri)
    bronze = pl.read_delta(str(lake / "bronze" / "fx_ticks"))
    per_day = dict(bronze.group_by("_partition_key").len().iter_rows())
    assert per_day == dict.fromkeys(FX_DATES, ingested.delivered["fx_rows_per_day"])

    quarantined = pl.read_delta(str(lake / "quarantine" / "fx_spreads"))
    assert quarantined.height == len(FX_DATES) * TICKS_PER_SYMBOL  # the invalid symbol's ticks
    assert quarantined["reason"].str.contains("symbol does not normalise").all()

    claims = pl.read_delta(str(lake / "curated" / "claims_by_district"))
    delivered = generate_claims(CLAIMS_MONTH, claims_truth(), n_policies=N_POLICIES)
    assert claims["n_policies"].sum() == N_POLICIES
    assert claims["claim_count"].sum() == delivered["claim_count"].sum()
    assert claims["exposure"].sum() == pytest.approx(delivered["exposure"].sum(), rel=1e-12)

    from dagster import DagsterInstance

    with DagsterInstance.from_config(str(dagster_dev.settings.dagster_home)) as instance:
        assert sorted(instance.get_dynamic_partitions("symbol")) == list(EXPECTED_SYMBOLS)


def _spreads_summary_polars(uri: str) -> list[tuple]:
    frame = pl.read_delta(uri)
    return (
        frame.group_by("symbol", "date")
        .agg(
            pl.len().alias("n"),
            (pl.col("spread") > 0).all().alias("positive"),
            (pl.col("bid") < pl.col("ask")).all().alias("uncrossed"),
            pl.col("spread").sum().round(9).alias("spread_sum"),
        )
        .sort("symbol", "date")
        .rows()
    )


def _spreads_summary_duckdb(uri: str) -> list[tuple]:
    import duckdb
    from deltalake import DeltaTable

    # duckdb's delta extension is downloaded at run time; a pyarrow dataset is not
    dataset = DeltaTable(uri).to_pyarrow_dataset()
    with duckdb.connect() as con:
        con.register("fx_spreads", dataset)
        return con.execute(
            """
            select symbol, date, count(*)::bigint, bool_and(spread > 0), bool_and(bid < ask),
                   round(sum(spread), 9)
            from fx_spreads group by symbol, date order by symbol, date
            """
        ).fetchall()


@dataclass
class Backfill:
    """A finished GraphQL backfill of ``curated/fx_spreads``."""

    state: dict
    partitions: list[str]
    commits: list[dict]  # the Delta history entries the backfill added, oldest first
    seconds: float


@pytest.fixture(scope="module")
def fx_backfill(dagster_dev: DagsterDev, ingested: Ingested) -> Backfill:
    """Backfill three symbols over both days through ``launchPartitionBackfill``."""
    from deltalake import DeltaTable

    uri = str(Path(dagster_dev.settings.lake_uri) / "curated" / "fx_spreads")
    version_before = DeltaTable(uri).version()
    partitions = [f"{d}|{s}" for d in FX_DATES for s in EXPECTED_SYMBOLS]
    started = time.monotonic()
    client = dagster_dev.client
    backfill_id = client.launch_asset_backfill(
        ["curated", "fx_spreads"], partitions, title="e2e fx_spreads backfill"
    )

    def finished() -> dict | None:
        state = client.backfill(backfill_id)
        return state if state["status"] in FINISHED_BACKFILL else None

    state = wait_for(finished, timeout=240, interval=2.0, what=f"backfill {backfill_id}")
    seconds = time.monotonic() - started
    print(f"backfill of {len(partitions)} partitions took {seconds:.1f} s")
    table = DeltaTable(uri)
    added = table.history(table.version() - version_before)
    return Backfill(state, partitions, sorted(added, key=lambda c: c["version"]), seconds)


def test_backfill_of_three_symbols_over_two_days(
    dagster_dev: DagsterDev, fx_backfill: Backfill
) -> None:
    state, partitions = fx_backfill.state, fx_backfill.partitions
    errors = {r["runId"]: dagster_dev.client.run_errors(r["runId"]) for r in state["runs"]}
    assert state["status"] in {"COMPLETED", "COMPLETED_SUCCESS"}, (state, errors)
    assert state["numPartitions"] == len(partitions)
    # BackfillPolicy.single_run on symbol x date: one run per day (a range of symbols),
    # never one run per partition, so each day's ticks are read once
    assert len(state["runs"]) == len(FX_DATES), [r["runId"] for r in state["runs"]]
    assert {r["status"] for r in state["runs"]} == {"SUCCESS"}
    # every requested symbol of a day is published in one atomic append (one batch);
    # the other commits only delete rows of batches it superseded
    appends = [c for c in fx_backfill.commits if c["operation"] == "WRITE" and BATCH_METADATA in c]
    assert len(appends) == len({key.split("|")[0] for key in partitions}), fx_backfill.commits
    assert {c["operation"] for c in fx_backfill.commits} <= {"WRITE", "DELETE"}

    uri = str(Path(dagster_dev.settings.lake_uri) / "curated" / "fx_spreads")
    by_polars = _spreads_summary_polars(uri)
    by_duckdb = _spreads_summary_duckdb(uri)
    assert [row[:5] for row in by_polars] == [
        (s, d, TICKS_PER_SYMBOL, True, True) for s in EXPECTED_SYMBOLS for d in FX_DATES
    ]
    assert by_duckdb == [tuple(row) for row in by_polars]


def test_gates_stay_open_after_a_range_run_backfill(
    dagster_dev: DagsterDev, fx_backfill: Backfill
) -> None:
    """A range run records its check result once, without a partition (dagster 1.13).

    Every partition's own record stays PLANNED; the model guards must still read
    the range result as a pass, or every backfill would close the gates.
    """
    from dagster import DagsterInstance

    from pipeline import keys
    from pipeline.gates import check_record_failures

    with DagsterInstance.from_config(str(dagster_dev.settings.dagster_home)) as instance:
        failures = {
            pk: check_record_failures(
                instance,
                keys.FX_SPREADS,
                (keys.CHECK_CURATED_CONTRACT, keys.CHECK_RECONCILES),
                pk,
            )
            for pk in fx_backfill.partitions
        }
    assert failures == {pk: [] for pk in fx_backfill.partitions}


def test_each_backfilled_partition_shows_its_own_row_count_and_checks_over_graphql(
    dagster_dev: DagsterDev, fx_backfill: Backfill
) -> None:
    """What the UI reads per partition: its own ``dagster/row_count`` (not the run's total)
    and a real check outcome (never a planned, "Skipped" one)."""
    data = dagster_dev.client.execute(
        """query Mats($key: AssetKeyInput!, $partitions: [String!]) {
          assetNodeOrError(assetKey: $key) { __typename ... on AssetNode {
            assetMaterializations(partitions: $partitions) {
              partition runId
              metadataEntries { label ... on IntMetadataEntry { intValue } }
            }
          } }
        }""",
        {"key": {"path": ["curated", "fx_spreads"]}, "partitions": fx_backfill.partitions},
    )["assetNodeOrError"]
    assert data["__typename"] == "AssetNode", data
    backfill_runs = {r["runId"] for r in fx_backfill.state["runs"]}
    newest: dict[str, dict] = {}
    for event in data["assetMaterializations"]:  # newest first
        newest.setdefault(event["partition"], event)
    assert sorted(newest) == sorted(fx_backfill.partitions)
    stored = pl.read_delta(str(Path(dagster_dev.settings.lake_uri) / "curated" / "fx_spreads"))
    for key, event in newest.items():
        assert event["runId"] in backfill_runs, key
        date, symbol = key.split("|")
        rows = stored.filter((pl.col("symbol") == symbol) & (pl.col("date") == date)).height
        shown = {e["label"]: e.get("intValue") for e in event["metadataEntries"]}
        assert shown["dagster/row_count"] == rows == TICKS_PER_SYMBOL, key
    for check in (keys.CHECK_CURATED_CONTRACT, keys.CHECK_RECONCILES):
        executions = dagster_dev.client.execute(
            """query Executions($key: AssetKeyInput!, $check: String!) {
              assetCheckExecutions(assetKey: $key, checkName: $check, limit: 500) {
                runId status partition
              }
            }""",
            {"key": {"path": ["curated", "fx_spreads"]}, "check": check},
        )["assetCheckExecutions"]
        in_backfill = [e for e in executions if e["runId"] in backfill_runs]
        assert sorted(e["partition"] for e in in_backfill) == sorted(fx_backfill.partitions)
        assert {e["status"] for e in in_backfill} == {"SUCCEEDED"}, (check, in_backfill)


# --- MLflow ------------------------------------------------------------------------


def _run_assets(
    dagster_dev: DagsterDev,
    asset_keys: list,
    partition_key: str,
    run_config: dict | None = None,
) -> tuple[str, float]:
    """Launch ``asset_keys`` as "Materialize" does, wait for success; return id and seconds."""
    client = dagster_dev.client
    started = time.monotonic()
    run_id = client.launch_assets(
        [key.path for key in asset_keys], partition_key=partition_key, run_config=run_config
    )

    def finished() -> str | None:
        status = client.run_status(run_id)
        return status if status in FINISHED_RUN else None

    status = wait_for(finished, timeout=RUNS_TIMEOUT_S, interval=2.0, what=f"run {run_id}")
    seconds = time.monotonic() - started
    assert status == "SUCCESS", (status, client.run_errors(run_id))
    return run_id, seconds


def test_model_runs_launched_over_graphql_are_tracked_in_mlflow(
    dagster_dev: DagsterDev, ingested: Ingested
) -> None:
    """A model run launched from the UI is found in MLflow by its Dagster run id.

    The credibility posterior (sampler defaults) must pass its convergence gate on
    the e2e claims month, and the table step must attach its CSV to the same MLflow
    run. The FX challenger of one symbol trains on the first day and is judged on the
    second (``holdout_days=1``); as the symbol's first model it is judged by the AP
    floor alone, so the same run promotes version 1 to ``champion``.
    """
    import arviz as az
    from mlflow import MlflowClient

    from pipeline import keys
    from pipeline.assets.credibility import CredibilityConfig
    from pipeline.assets.fx_anomaly import ChallengerConfig
    from pipeline.resources.tracking import (
        DAGSTER_ASSET_TAG,
        DAGSTER_PARTITION_TAG,
        DAGSTER_RUN_TAG,
    )
    from pipeline.stores.credibility import EXPERIMENT
    from pipeline.stores.fx import CHALLENGER, CHAMPION

    settings = dagster_dev.settings
    assert settings.mlflow_tracking_uri == f"sqlite:///{settings.home / 'mlflow.db'}"
    mlflow = MlflowClient(
        tracking_uri=settings.mlflow_tracking_uri, registry_uri=settings.mlflow_tracking_uri
    )

    # 1. credibility for the claims month, gate and table in the same run
    cred_run, cred_seconds = _run_assets(
        dagster_dev, [keys.CREDIBILITY_POSTERIOR, keys.CREDIBILITY_TABLE], CLAIMS_MONTH
    )
    print(f"credibility run {cred_run} took {cred_seconds:.1f} s")
    experiment = mlflow.get_experiment_by_name(EXPERIMENT)
    assert experiment is not None
    found = mlflow.search_runs(
        [experiment.experiment_id], filter_string=f"tags.`{DAGSTER_RUN_TAG}` = '{cred_run}'"
    )
    assert len(found) == 1, [r.info.run_id for r in found]
    run = found[0]
    tags, metrics = run.data.tags, run.data.metrics
    assert run.info.status == "FINISHED"
    assert tags[DAGSTER_ASSET_TAG] == "gold/credibility_posterior"
    assert tags[DAGSTER_PARTITION_TAG] == CLAIMS_MONTH
    assert tags["gate"] == "passed"
    print({k: round(metrics[k], 4) for k in ("max_rhat", "min_ess_bulk", "n_divergences")})
    assert metrics["max_rhat"] <= 1.01
    assert metrics["n_divergences"] == 0
    assert metrics["min_ess_bulk"] >= 400  # the third check of the gate the table passed
    assert metrics["n_policies"] == N_POLICIES
    artifacts = {a.path for a in mlflow.list_artifacts(run.info.run_id)}
    assert {"posterior.nc", f"credibility_table_{CLAIMS_MONTH}.csv"} <= artifacts, artifacts
    with tempfile.TemporaryDirectory() as tmp:
        local = mlflow.download_artifacts(run.info.run_id, "posterior.nc", tmp)
        sizes = dict(az.from_netcdf(local).posterior.sizes)
    defaults = CredibilityConfig()
    assert (sizes["chain"], sizes["draw"]) == (defaults.chains, defaults.draws)
    table = pl.read_delta(str(Path(settings.lake_uri) / "gold" / "credibility_table")).filter(
        pl.col("month") == CLAIMS_MONTH
    )
    assert table.height > 0
    assert set(table["mlflow_run_id"]) == {run.info.run_id}
    assert set(table["dagster_run_id"]) == {cred_run}

    # 2. challenger and champion of one symbol: version 1 gets both aliases
    symbol = EXPECTED_SYMBOLS[0]
    fx_run, fx_seconds = _run_assets(
        dagster_dev,
        [keys.FX_CHALLENGER_MODEL, keys.FX_CHAMPION_MODEL],
        symbol,
        run_config={"ops": {"models__fx_challenger_model": {"config": {"holdout_days": 1}}}},
    )
    print(f"fx challenger + champion run {fx_run} took {fx_seconds:.1f} s")
    name = f"fx_spread_{symbol.lower()}"
    versions = mlflow.search_model_versions(f"name = '{name}'")
    assert [str(v.version) for v in versions] == ["1"]
    # the sqlite registry returns alias targets as ints; compare them as version strings
    aliases = {alias: str(v) for alias, v in mlflow.get_registered_model(name).aliases.items()}
    assert aliases == {CHALLENGER: "1", CHAMPION: "1"}
    (version,) = versions
    assert version.tags["dagster_run_id"] == fx_run
    fx_mlflow_run = mlflow.get_run(version.run_id)
    fx_tags, fx_metrics = fx_mlflow_run.data.tags, fx_mlflow_run.data.metrics
    assert fx_tags[DAGSTER_RUN_TAG] == fx_run
    assert fx_tags[DAGSTER_ASSET_TAG] == "models/fx_challenger_model"
    assert fx_tags[DAGSTER_PARTITION_TAG] == symbol
    first, last = FX_DATES
    assert fx_mlflow_run.data.params["train_dates"] == f"{first}..{first}"
    assert fx_mlflow_run.data.params["holdout_dates"] == f"{last}..{last}"
    print({k: fx_metrics[f"holdout_{k}"] for k in ("n", "n_positive", "average_precision")})
    assert fx_metrics["holdout_n"] == TICKS_PER_SYMBOL
    assert fx_metrics["holdout_n_positive"] > 0  # the labels reached the gate
    assert fx_metrics["holdout_average_precision"] >= ChallengerConfig().ap_floor
