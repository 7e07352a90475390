"""Writers that reliability tests kill: each loops writes of one lake table in its own process.

Every Delta table the platform writes is listed in :data:`TABLES` with the write call
the platform uses for it (a partition overwrite, an append, or a commit point of a
curated table and its quarantine) and small frames of its partition columns. Each
write ``i`` stamps its rows with ``write_no = i`` and writes :data:`ROWS` rows per
partition, so a reader can tell a whole write from a partial one: after a kill,
every visible partition must hold exactly one write's rows, all of them.

The processes are forked by :class:`WriterServer`, a child interpreter that has
already imported polars, pyarrow, deltalake and the lake resource (and started no
thread), so a trial costs a fork, not an interpreter start. A writer counts its
completed writes by appending one byte per write to a progress file; the test kills
it with ``SIGKILL`` by pid.
"""

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import polars as pl

from pipeline.resources.lake import LakeResource, PartitionWrite

ROWS = 64


@dataclass(frozen=True)
class TableSpec:
    """One table the platform writes, and how.

    Attributes
    ----------
    kind
        ``"overwrite"`` (partition overwrite), ``"append"`` or ``"commit"``
        (curated + quarantine through a commit point).
    partitions
        Partition column -> values of each write (one write covers them all).
    """

    layer: str
    table: str
    kind: str
    partitions: tuple[dict[str, str], ...] = ()

    @property
    def name(self) -> str:
        """``layer/table`` (the quarantine of a commit is implied)."""
        return f"{self.layer}/{self.table}"


def _days(n: int) -> tuple[dict[str, str], ...]:
    return tuple({"symbol": "EURUSD", "date": f"2026-09-0{i + 1}"} for i in range(n))


TABLES = (
    TableSpec("bronze", "claims", "overwrite", ({"_partition_key": "2026-07"},)),
    TableSpec("bronze", "fx_ticks", "overwrite", ({"_partition_key": "2026-09-01"},)),
    TableSpec("bronze", "loan_book", "overwrite", ({"_partition_key": "2026-09-30"},)),
    TableSpec("bronze", "loan_scenarios", "overwrite", ({"_partition_key": "2026-09-30"},)),
    TableSpec("curated", "claims_by_district", "commit", ({"month": "2026-07"},)),
    TableSpec("curated", "fx_spreads", "commit", _days(1)),
    TableSpec("curated", "loan_book", "commit", ({"valuation_date": "2026-09-30"},)),
    TableSpec("curated", "loan_scenarios", "commit", ({"valuation_date": "2026-09-30"},)),
    TableSpec("gold", "credibility_table", "overwrite", ({"month": "2026-07"},)),
    TableSpec("gold", "fx_anomaly_scores", "overwrite", _days(3)),
    TableSpec("gold", "fx_model_monitor", "overwrite", _days(1)),
    TableSpec("gold", "loan_loss_summary", "overwrite", ({"valuation_date": "2026-09-30"},)),
    TableSpec("gold", "model_events", "append"),
    TableSpec("gold", "fx_model_evaluations", "append"),
    TableSpec("ops", "landing_rejects", "append"),
)
"""Every table the platform writes (``ops/ingest_commits`` is written by each commit)."""


def rows_of(
    spec: TableSpec, write_no: int, partition: dict[str, str] | None = None
) -> pl.DataFrame:
    """:data:`ROWS` rows of one write for one partition (or unpartitioned)."""
    frame = pl.DataFrame(
        {
            "write_no": [write_no] * ROWS,
            "row": list(range(ROWS)),
            "payload": [f"w{write_no}-r{i}-" + "x" * 40 for i in range(ROWS)],
        }
    )
    return frame.with_columns(pl.lit(v).alias(k) for k, v in (partition or {}).items())


def quarantine_key(partition: dict[str, str]) -> str:
    """The quarantine partition of a curated partition (FX quarantine is keyed by date)."""
    return partition.get("date") or next(iter(partition.values()))


def write_once(lake: LakeResource, spec: TableSpec, write_no: int) -> str:
    """One write of ``spec`` the way the platform writes that table; the batch id of a commit."""
    if spec.kind == "append":
        lake.append(spec.layer, spec.table, rows_of(spec, write_no))
        return "-"
    frame = pl.concat([rows_of(spec, write_no, p) for p in spec.partitions])
    if spec.kind == "overwrite":
        lake.overwrite_partitions(spec.layer, spec.table, frame, list(spec.partitions))
        return "-"
    # a commit point: write_no decides how each partition's ROWS delivered rows split
    split = write_no % (ROWS + 1)
    curated = frame.filter(pl.col("row") < split)
    quarantined = pl.concat(
        [
            rows_of(spec, write_no)
            .filter(pl.col("row") >= split)
            .with_columns(pl.lit(quarantine_key(p)).alias("partition_key"))
            for p in spec.partitions
        ]
    )
    keys = sorted({quarantine_key(p) for p in spec.partitions})
    return lake.commit_outcome(
        [
            PartitionWrite(spec.layer, spec.table, curated, list(spec.partitions)),
            PartitionWrite(
                "quarantine", spec.table, quarantined, [{"partition_key": k} for k in keys]
            ),
        ]
    ).batch_id


def loop_writes(
    root: str,
    spec: TableSpec,
    start: int,
    progress: str,
    count: int | None = None,
    go: str | None = None,
) -> None:
    """Write ``spec`` ``count`` times (default: until killed), one line per write in ``progress``.

    Each line is the batch id of a commit (``-`` for other writes). With ``go``, the
    writer waits for that file to exist first, so several writers start together.
    """
    lake = LakeResource(root_uri=root, service_timeout_s=30)
    fd = os.open(progress, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    while go is not None and not os.path.exists(go):
        time.sleep(0.0005)
    write_no = start
    while count is None or write_no < start + count:
        batch = write_once(lake, spec, write_no)
        write_no += 1
        os.write(fd, f"{batch}\n".encode())


def spec_json(spec: TableSpec) -> dict:
    """A spec as the writer server receives it."""
    return {
        "layer": spec.layer,
        "table": spec.table,
        "kind": spec.kind,
        "partitions": list(spec.partitions),
    }


def spec_from_json(raw: dict) -> TableSpec:
    """The inverse of :func:`spec_json`."""
    return TableSpec(raw["layer"], raw["table"], raw["kind"], tuple(raw["partitions"]))


TABLES_BY_NAME = {spec.name: spec for spec in TABLES}
REPO = Path(__file__).resolve().parents[2]
_SERVER = """
import json, os, sys
import pyarrow, pyarrow.dataset, pyarrow.parquet
import deltalake, deltalake.exceptions
from deltalake import CommitProperties, DeltaTable, write_deltalake
from pipeline_tests.reliability import writers
print("ready", flush=True)
for line in sys.stdin:
    command = json.loads(line)
    if command["op"] == "spawn":
        pid = os.fork()
        if pid == 0:
            os.setpgid(0, 0)
            code = 1
            try:
                spec = writers.spec_from_json(command["spec"])
                writers.loop_writes(
                    command["root"],
                    spec,
                    command["start"],
                    command["progress"],
                    command["count"],
                    command["go"],
                )
                code = 0
            finally:
                os._exit(code)
        print(json.dumps({"pid": pid}), flush=True)
    elif command["op"] == "reap":
        _, status = os.waitpid(command["pid"], 0)
        killed_by = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
        code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
        print(json.dumps({"signal": killed_by, "code": code}), flush=True)
"""


class WriterServer:
    """A warm interpreter that forks writer processes on request (see the module docstring)."""

    def __init__(self) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _SERVER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            cwd=REPO,
        )
        if self._reply() != "ready":
            raise RuntimeError("writer server did not start")

    def _reply(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        if not line:
            raise RuntimeError(f"writer server exited with {self.proc.wait()}")
        return line

    def _ask(self, **command: object) -> dict:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        return json.loads(self._reply())

    def spawn(
        self,
        root: str,
        spec: TableSpec,
        start: int,
        progress: Path,
        *,
        count: int | None = None,
        go: Path | None = None,
    ) -> int:
        """Fork a writer of ``spec`` from ``write_no = start`` (see :func:`loop_writes`)."""
        reply = self._ask(
            op="spawn",
            root=root,
            spec=spec_json(spec),
            start=start,
            progress=str(progress),
            count=count,
            go=None if go is None else str(go),
        )
        return int(reply["pid"])

    def reap(self, pid: int) -> tuple[int | None, int | None]:
        """Wait for a writer to end: ``(signal that ended it, exit code)``."""
        reply = self._ask(op="reap", pid=pid)
        return reply["signal"], reply["code"]

    def __enter__(self) -> "WriterServer":
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=60)
