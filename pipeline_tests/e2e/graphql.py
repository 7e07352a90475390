"""A small client for the Dagster webserver's GraphQL API, as the UI uses it."""

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

import requests

T = TypeVar("T")

REPOSITORY = {"repositoryLocationName": "pipeline", "repositoryName": "__repository__"}
IMPLICIT_ASSET_JOB = "__ASSET_JOB"  # the job the UI's "Materialize" launches
PARTITION_TAG = "dagster/partition"
FINISHED_RUN = {"SUCCESS", "FAILURE", "CANCELED"}
FINISHED_BACKFILL = {"COMPLETED", "COMPLETED_SUCCESS", "COMPLETED_FAILED", "FAILED", "CANCELED"}


class GraphQLError(RuntimeError):
    """The server answered with errors, or with an error member of a result union."""


def wait_for(
    probe: Callable[[], T | None], *, timeout: float, interval: float = 1.0, what: str
) -> T:
    """Call ``probe`` until it returns something other than ``None``.

    Raises
    ------
    TimeoutError
        Naming ``what`` and the timeout, so a hang reads as a failure.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value is not None:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


@dataclass(frozen=True)
class DagsterGraphQL:
    """GraphQL endpoint of one ``dagster dev`` webserver."""

    base_url: str
    request_timeout: float = 30.0

    def execute(self, query: str, variables: Mapping | None = None) -> dict:
        """Run one query or mutation and return its ``data``."""
        response = requests.post(
            f"{self.base_url}/graphql",
            json={"query": query, "variables": dict(variables or {})},
            timeout=self.request_timeout,
        )
        response.raise_for_status()
        body = response.json()
        if body.get("errors"):
            raise GraphQLError(str(body["errors"])[:2000])
        return body["data"]

    def is_ready(self) -> bool:
        """Whether the webserver answers and the ``pipeline`` code location has loaded."""
        try:
            data = self.execute(
                "{ workspaceOrError { ... on Workspace { locationEntries { name "
                "locationOrLoadError { __typename } } } } }"
            )
        except (requests.ConnectionError, requests.Timeout, requests.HTTPError):
            return False
        entries = data["workspaceOrError"].get("locationEntries") or []
        loaded = {
            e["name"]: e["locationOrLoadError"] and e["locationOrLoadError"]["__typename"]
            for e in entries
        }
        if loaded.get("pipeline") == "PythonError":
            raise GraphQLError("code location `pipeline` failed to load; see the dagster log")
        return loaded.get("pipeline") == "RepositoryLocation"

    def runs(self, tags: Mapping[str, str] | None = None, limit: int = 200) -> list[dict]:
        """Runs (newest first) with all ``tags``: id, status, tags and partition."""
        data = self.execute(
            """query Runs($filter: RunsFilter, $limit: Int) {
              runsOrError(filter: $filter, limit: $limit) {
                __typename
                ... on Runs { results { runId status tags { key value } } }
                ... on PythonError { message }
              }
            }""",
            {
                "filter": {"tags": [{"key": k, "value": v} for k, v in (tags or {}).items()]},
                "limit": limit,
            },
        )["runsOrError"]
        if data["__typename"] != "Runs":
            raise GraphQLError(f"runsOrError: {data}")
        runs = data["results"]
        for run in runs:
            run["tags"] = {t["key"]: t["value"] for t in run["tags"]}
        return runs

    def launch_assets(
        self,
        asset_paths: Sequence[Sequence[str]],
        *,
        partition_key: str | None = None,
        run_config: Mapping | None = None,
    ) -> str:
        """Launch one run of ``asset_paths`` (and their checks), as "Materialize" does.

        The UI launches the implicit asset job with an asset selection, the partition
        as the ``dagster/partition`` tag and the launchpad's config as ``runConfigData``;
        so does this. Leaving ``assetCheckSelection`` out selects every check of the
        selected assets, so blocking gates run inside the launched run.

        Returns
        -------
        str
            The new run's id.

        Raises
        ------
        GraphQLError
            When the launch is refused (invalid config, unknown asset, no such job...).
        """
        tags = [{"key": PARTITION_TAG, "value": partition_key}] if partition_key else []
        data = self.execute(
            """mutation Launch($params: ExecutionParams!) {
              launchRun(executionParams: $params) {
                __typename
                ... on LaunchRunSuccess { run { runId } }
                ... on RunConfigValidationInvalid { errors { message } }
                ... on Error { message }
              }
            }""",
            {
                "params": {
                    "selector": {
                        **REPOSITORY,
                        "jobName": IMPLICIT_ASSET_JOB,
                        "assetSelection": [{"path": list(path)} for path in asset_paths],
                    },
                    "runConfigData": dict(run_config or {}),
                    "executionMetadata": {"tags": tags},
                }
            },
        )["launchRun"]
        if data["__typename"] != "LaunchRunSuccess":
            raise GraphQLError(f"launchRun {[list(p) for p in asset_paths]}: {data}")
        return data["run"]["runId"]

    def run_status(self, run_id: str) -> str:
        """Status of one run (``QUEUED``, ``STARTED``, ``SUCCESS``, ``FAILURE``...)."""
        data = self.execute(
            """query Run($runId: ID!) {
              runOrError(runId: $runId) {
                __typename
                ... on Run { status }
                ... on Error { message }
              }
            }""",
            {"runId": run_id},
        )["runOrError"]
        if data["__typename"] != "Run":
            raise GraphQLError(f"runOrError {run_id}: {data}")
        return data["status"]

    def run_errors(self, run_id: str) -> list[str]:
        """Error messages of a run's failed steps and of the run itself."""
        data = self.execute(
            """query Logs($runId: ID!) {
              logsForRun(runId: $runId) {
                ... on EventConnection { events {
                  __typename
                  ... on MessageEvent { message stepKey }
                  ... on ExecutionStepFailureEvent { error { message } }
                } }
              }
            }""",
            {"runId": run_id},
        )["logsForRun"]
        messages = []
        for event in data.get("events", []):
            if event["__typename"] == "ExecutionStepFailureEvent":
                messages.append(f"{event.get('stepKey')}: {event['error']['message']}")
            elif event["__typename"] in {"RunFailureEvent", "EngineEvent"} and "rror" in (
                event.get("message") or ""
            ):
                messages.append(event["message"])
        return messages

    def sensor_statuses(self) -> dict[str, str]:
        """Sensor name -> ``RUNNING`` or ``STOPPED`` in the ``pipeline`` location."""
        data = self.execute(
            """query Sensors($selector: RepositorySelector!) {
              sensorsOrError(repositorySelector: $selector) {
                ... on Sensors { results { name sensorState { status } } }
              }
            }""",
            {"selector": REPOSITORY},
        )["sensorsOrError"]
        return {s["name"]: s["sensorState"]["status"] for s in data["results"]}

    def schedule_statuses(self) -> dict[str, str]:
        """Schedule name -> ``RUNNING`` or ``STOPPED`` in the ``pipeline`` location."""
        data = self.execute(
            """query Schedules($selector: RepositorySelector!) {
              schedulesOrError(repositorySelector: $selector) {
                ... on Schedules { results { name scheduleState { status } } }
              }
            }""",
            {"selector": REPOSITORY},
        )["schedulesOrError"]
        return {s["name"]: s["scheduleState"]["status"] for s in data["results"]}

    def launch_asset_backfill(
        self, asset_path: Sequence[str], partition_names: Sequence[str], title: str
    ) -> str:
        """Launch a backfill of one asset over ``partition_names``; return its id."""
        data = self.execute(
            """mutation Backfill($params: LaunchBackfillParams!) {
              launchPartitionBackfill(backfillParams: $params) {
                __typename
                ... on LaunchBackfillSuccess { backfillId }
                ... on Error { message }
              }
            }""",
            {
                "params": {
                    "partitionNames": list(partition_names),
                    "assetSelection": [{"path": list(asset_path)}],
                    "title": title,
                }
            },
        )["launchPartitionBackfill"]
        if data["__typename"] != "LaunchBackfillSuccess":
            raise GraphQLError(f"launchPartitionBackfill: {data}")
        return data["backfillId"]

    def backfill(self, backfill_id: str) -> dict:
        """Status, partition count and runs of one backfill."""
        data = self.execute(
            """query Backfill($id: String!) {
              partitionBackfillOrError(backfillId: $id) {
                __typename
                ... on PartitionBackfill {
                  id status numPartitions
                  runs(limit: 100) { runId status }
                  error { message }
                }
                ... on Error { message }
              }
            }""",
            {"id": backfill_id},
        )["partitionBackfillOrError"]
        if data["__typename"] != "PartitionBackfill":
            raise GraphQLError(f"partitionBackfillOrError: {data}")
        return data

    def asset_check_statuses(self, asset_path: Sequence[str]) -> dict[str, str]:
        """Check name -> status of its execution for the asset's latest materialisation.

        Statuses are GraphQL enum names (``SUCCEEDED``, ``FAILED``, ``SKIPPED``,
        ``IN_PROGRESS``, ``EXECUTION_FAILED``); ``NONE`` when never executed.
        """
        data = self.execute(
            """query Checks($key: AssetKeyInput!) {
              assetNodeOrError(assetKey: $key) {
                __typename
                ... on AssetNode { assetChecksOrError {
                  __typename
                  ... on AssetChecks { checks {
                    name executionForLatestMaterialization { status }
                  } }
                } }
              }
            }""",
            {"key": {"path": list(asset_path)}},
        )["assetNodeOrError"]
        if data["__typename"] != "AssetNode":
            raise GraphQLError(f"assetNodeOrError {list(asset_path)}: {data}")
        checks = data["assetChecksOrError"]
        if checks["__typename"] != "AssetChecks":
            raise GraphQLError(f"assetChecksOrError {list(asset_path)}: {checks}")
        return {
            c["name"]: (c["executionForLatestMaterialization"] or {}).get("status", "NONE")
            for c in checks["checks"]
        }
