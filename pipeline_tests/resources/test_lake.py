"""The lake resource on real Delta tables under ``tmp_path``.

Partition-scoped overwrites, refusals of unsafe names and stray rows, atomicity of an
interrupted write, and concurrent writers (other processes, and threads racing for the
same commit).
"""

import datetime as dt
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import deltalake
import polars as pl
import pytest
from deltalake import DeltaTable
from deltalake.exceptions import CommitFailedError
from polars.testing import assert_frame_equal

from pipeline.resources import lake as lake_module
from pipeline.resources.lake import (
    LakeError,
    LakeResource,
    PartitionWrite,
    batch_time,
    new_batch_id,
    visible_rows,
)
from pipeline.resources.lake_stream import FrameStream

REPO = Path(__file__).resolve().parents[2]


def frame(partition: str, n: int = 5, offset: float = 0.0) -> pl.DataFrame:
    return pl.DataFrame({"p": [partition] * n, "x": [i + offset for i in range(n)]})


def partition_files(lake: LakeResource, table: str, value: str) -> list[str]:
    dt = DeltaTable(lake.table_uri("curated", table))
    return sorted(f for f in dt.file_uris() if f"/p={value}/" in f)


def sorted_read(lake: LakeResource, table: str) -> pl.DataFrame:
    return lake.read("curated", table).sort("p", "x")


@pytest.fixture
def lake(tmp_path: Path) -> LakeResource:
    return LakeResource(root_uri=str(tmp_path / "lake"))


# --- naming --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("layer", "table"),
    [
        ("curated", "../x"),
        ("curated", "a'; drop"),
        ("curated", "Claims"),
        ("curated", ""),
        ("curated", "a/b"),
        ("../curated", "t"),
        ("models", "t"),
        ("curated;", "t"),
    ],
)
def test_unsafe_layers_and_table_names_are_refused(
    lake: LakeResource, layer: str, table: str
) -> None:
    with pytest.raises(LakeError, match=r"layer|table name"):
        lake.table_uri(layer, table)
    with pytest.raises(LakeError):
        lake.overwrite_partition(layer, table, frame("a"), {"p": "a"})
    assert not (Path(lake.root_uri)).exists(), "nothing may be written for a refused name"


@pytest.mark.parametrize("part", ["..", ".", "../x", "a/b", "a'b", "", "x" * 129])
def test_unsafe_artefact_path_components_are_refused(lake: LakeResource, part: str) -> None:
    with pytest.raises(LakeError, match="is not safe"):
        lake.file_uri("gold", "posteriors", part)


@pytest.mark.parametrize(
    "value", ["../x", "a'; drop", "..", "x/../../y", "a' OR '1'='1", "", "x" * 65, "a\nb"]
)
def test_unsafe_partition_values_are_refused_before_anything_is_written(
    lake: LakeResource, value: str
) -> None:
    with pytest.raises(LakeError, match=r"partition value .* is not safe"):
        lake.overwrite_partition("curated", "t", frame(value), {"p": value})
    assert not lake.exists("curated", "t")


@pytest.mark.parametrize("column", ["p = 'a' OR 1=1 --", "../p", "p;", "1p"])
def test_unsafe_partition_columns_are_refused(lake: LakeResource, column: str) -> None:
    data = pl.DataFrame({column: ["a"], "x": [1.0]})
    with pytest.raises(LakeError, match=r"partition column .* is not safe"):
        lake.overwrite_partition("curated", "t", data, {column: "a"})
    assert not lake.exists("curated", "t")


def test_rows_outside_the_partition_are_refused(lake: LakeResource) -> None:
    lake.overwrite_partition("curated", "t", frame("a"), {"p": "a"})
    before = lake.version("curated", "t")
    mixed = pl.concat([frame("a", 3), frame("b", 2)])
    with pytest.raises(
        LakeError,
        match=r"2 row\(s\) lie outside the partitions being written \(e.g. \{'p': 'b'\}\)",
    ):
        lake.overwrite_partition("curated", "t", mixed, {"p": "a"})
    with pytest.raises(LakeError, match=r"frame lacks partition column\(s\) \['q'\]"):
        lake.overwrite_partition("curated", "t", frame("a"), {"q": "a"})
    with pytest.raises(LakeError, match="needs partition values"):
        lake.overwrite_partition("curated", "t", frame("a"), {})
    assert lake.version("curated", "t") == before
    assert_frame_equal(sorted_read(lake, "t"), frame("a"))


def test_several_partitions_are_replaced_in_one_commit(lake: LakeResource) -> None:
    for value in ("a", "b", "c"):
        lake.overwrite_partition("curated", "t", frame(value, 2), {"p": value})
    before = lake.version("curated", "t")
    # rewrite a with 4 rows and empty b (listed, no rows); c is not listed and stays
    version = lake.overwrite_partitions("curated", "t", frame("a", 4), [{"p": "a"}, {"p": "b"}])
    assert version == before + 1
    stored = sorted_read(lake, "t")
    assert stored.group_by("p").len().sort("p").rows() == [("a", 4), ("c", 2)]
    with pytest.raises(LakeError, match="every partition needs the columns"):
        lake.overwrite_partitions("curated", "t", frame("a"), [{"p": "a"}, {"q": "b"}])
    with pytest.raises(LakeError, match=r"partition value '\.\./x' is not safe"):
        lake.overwrite_partitions("curated", "t", frame("a"), [{"p": "a"}, {"p": "../x"}])
    assert lake.version("curated", "t") == version


# --- streamed writes ---------------------------------------------------------------------


def stream_of(*batches: pl.DataFrame, fail_after: int | None = None) -> FrameStream:
    """A stream of ``batches``; with ``fail_after`` it raises once that many were produced."""

    def produce():
        for i, batch in enumerate(batches):
            if fail_after is not None and i == fail_after:
                raise ValueError(f"upstream broke after batch {i}")
            yield batch

    return FrameStream(batches[0].schema, produce)


def test_a_stream_is_written_as_one_commit_of_every_batch(lake: LakeResource) -> None:
    lake.overwrite_partition("curated", "t", frame("b"), {"p": "b"})
    before = lake.version("curated", "t")
    stream = stream_of(frame("a", 3), frame("a", 4, offset=10.0), frame("a", 2, offset=20.0))
    assert lake.overwrite_partition("curated", "t", stream, {"p": "a"}) == before + 1
    assert_frame_equal(sorted_read(lake, "t"), pl.concat([stream.collect(), frame("b")]))
    assert lake.count("curated", "t", {"p": "a"}) == 9
    assert lake.scan("curated", "t", {"p": "a"}).select(pl.col("x").sum()).collect().item() == (
        3 + 46 + 41
    )


def test_a_stream_that_fails_part_of_the_way_commits_nothing(lake: LakeResource) -> None:
    lake.overwrite_partition("curated", "t", frame("a"), {"p": "a"})
    before = lake.version("curated", "t")
    files = sorted(Path(lake.table_uri("curated", "t")).rglob("*.parquet"))
    broken = stream_of(frame("a", 3), frame("a", 4), frame("a", 2), fail_after=2)
    with pytest.raises(ValueError, match="upstream broke after batch 2"):
        lake.overwrite_partition("curated", "t", broken, {"p": "a"})
    stray = stream_of(frame("a", 3), frame("b", 2))
    with pytest.raises(LakeError, match=r"2 row\(s\) of a batch lie outside the partitions"):
        lake.overwrite_partition("curated", "t", stray, {"p": "a"})
    assert lake.version("curated", "t") == before
    assert_frame_equal(sorted_read(lake, "t"), frame("a"))
    assert sorted(Path(lake.table_uri("curated", "t")).rglob("*.parquet")) == files


def test_a_streamed_outcome_records_its_rows_per_partition(lake: LakeResource) -> None:
    stream = stream_of(frame("a", 3), frame("b", 2), frame("a", 1, offset=5.0))
    commit = lake.commit_outcome(
        [PartitionWrite("curated", "t", stream, [{"p": "a"}, {"p": "b"}, {"p": "c"}])]
    )
    records = lake.commits("curated", "t").sort("p")
    assert records.select("p", "rows").rows() == [("a", 4), ("b", 2), ("c", 0)]
    assert set(records["_batch_id"]) == {commit.batch_id}
    assert lake.count("curated", "t") == 6
    with pytest.raises(LakeError, match="written with commit points"):
        lake.scan("curated", "t")


# --- partition-scoped overwrite ------------------------------------------------------


def test_overwriting_one_partition_leaves_the_others_untouched(lake: LakeResource) -> None:
    assert lake.version("curated", "t") is None
    assert lake.read("curated", "t").height == 0
    lake.overwrite_partition("curated", "t", frame("a"), {"p": "a"})
    lake.overwrite_partition("curated", "t", frame("b"), {"p": "b"})
    files_b = partition_files(lake, "t", "b")
    rows_b = lake.read("curated", "t", {"p": "b"})

    version = lake.overwrite_partition("curated", "t", frame("a", n=3, offset=100), {"p": "a"})

    assert version == 2
    assert lake.read("curated", "t", {"p": "a"})["x"].to_list() == [100, 101, 102]
    assert_frame_equal(lake.read("curated", "t", {"p": "b"}), rows_b)
    assert partition_files(lake, "t", "b") == files_b
    assert lake.read("curated", "t", {"p": ["a", "b"]}, columns=["x"]).height == 8


def test_an_empty_frame_clears_only_its_partition(lake: LakeResource) -> None:
    lake.overwrite_partition("curated", "t", frame("a"), {"p": "a"})
    lake.overwrite_partition("curated", "t", frame("b"), {"p": "b"})
    lake.overwrite_partition("curated", "t", frame("a", n=0), {"p": "a"})
    assert lake.read("curated", "t")["p"].unique().to_list() == ["b"]


def test_append_merges_new_columns(lake: LakeResource) -> None:
    lake.append("gold", "events", pl.DataFrame({"event": ["promoted"]}))
    lake.append("gold", "events", pl.DataFrame({"event": ["rolled_back"], "version": [3]}))
    events = lake.read("gold", "events").sort("event")
    assert events.rows() == [("promoted", None), ("rolled_back", 3)]


def test_a_partition_overwrite_with_a_new_column_keeps_the_older_partitions(
    lake: LakeResource,
) -> None:
    """A table written by an older release (fewer columns) accepts the new release's rows."""
    lake.overwrite_partition("gold", "t", frame("a"), {"p": "a"})
    lake.overwrite_partition("gold", "t", frame("b"), {"p": "b"})
    newer = frame("a", n=2, offset=10).with_columns(pl.lit("v2").alias("added"))
    lake.overwrite_partition("gold", "t", newer, {"p": "a"})
    stored = lake.read("gold", "t")
    assert stored.columns[-1] == "added"
    assert stored.filter(pl.col("p") == "a")["added"].to_list() == ["v2", "v2"]
    assert stored.filter(pl.col("p") == "b")["added"].null_count() == frame("b").height


def test_artefact_files_round_trip_without_leaving_temp_files(lake: LakeResource) -> None:
    uri = lake.file_uri("gold", "posteriors", "month=2026-07", "trace.nc")
    assert not lake.file_exists(uri)
    assert lake.write_bytes(uri, b"\x00payload") == uri
    assert lake.file_exists(uri)
    assert lake.read_bytes(uri) == b"\x00payload"
    folder = Path(lake.root_uri) / "gold" / "posteriors" / "month=2026-07"
    assert [p.name for p in folder.iterdir()] == ["trace.nc"]


# --- atomicity -------------------------------------------------------------------------

_SLOW_WRITER = """
import sys
import numpy as np
import polars as pl
from pipeline.resources.lake import LakeResource

root, n = sys.argv[1], int(sys.argv[2])
rng = np.random.default_rng(0)
frame = pl.DataFrame({"p": ["a"] * n, "x": rng.standard_normal(n)})
print("ready", flush=True)
LakeResource(root_uri=root).overwrite_partition("curated", "t", frame, {"p": "a"})
print("committed", flush=True)
"""


def test_a_writer_killed_after_writing_data_files_leaves_the_previous_version(
    lake: LakeResource,
) -> None:
    """SIGKILL the writer as soon as its first data file appears, before the commit.

    The previous version must read identically; the orphan file is ignored because no
    commit references it. If the writer commits before we see a file (a very loaded
    machine), we retry with a bigger frame rather than pass vacuously.
    """
    lake.overwrite_partition("curated", "t", frame("a"), {"p": "a"})
    lake.overwrite_partition("curated", "t", frame("b"), {"p": "b"})
    before = sorted_read(lake, "t")
    version = lake.version("curated", "t")
    folder = Path(lake.root_uri) / "curated" / "t" / "p=a"
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    for n in (2_000_000, 8_000_000):
        known = set(folder.iterdir())
        proc = subprocess.Popen(
            [sys.executable, "-c", _SLOW_WRITER, lake.root_uri, str(n)],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "ready"
            deadline = time.monotonic() + 60
            while not (set(folder.iterdir()) - known) and proc.poll() is None:
                assert time.monotonic() < deadline, "writer produced no data file in 60 s"
                time.sleep(0.001)
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.wait(timeout=30)
        if proc.returncode == -signal.SIGKILL and lake.version("curated", "t") == version:
            break
        # the writer won the race and committed: put the old partition back and retry
        lake.overwrite_partition("curated", "t", frame("a"), {"p": "a"})
        before = sorted_read(lake, "t")
        version = lake.version("curated", "t")
    else:
        pytest.fail("could not interrupt a writer between its data files and its commit")

    assert set(folder.iterdir()) - known, "the killed writer had written a data file"
    assert lake.version("curated", "t") == version
    assert_frame_equal(sorted_read(lake, "t"), before)
    # and the table still takes writes afterwards
    lake.overwrite_partition("curated", "t", frame("a", n=2, offset=9), {"p": "a"})
    assert lake.read("curated", "t", {"p": "a"})["x"].to_list() == [9, 10]


def test_a_failing_write_leaves_the_previous_version(lake: LakeResource) -> None:
    lake.overwrite_partition("curated", "t", frame("a"), {"p": "a"})
    lake.overwrite_partition("curated", "t", frame("b"), {"p": "b"})
    before = sorted_read(lake, "t")
    version = lake.version("curated", "t")
    incompatible = pl.DataFrame({"p": ["a"], "x": ["not a number"], "extra": [1]})
    with pytest.raises(Exception, match=r"(?i)schema|cannot cast"):
        lake.overwrite_partition("curated", "t", incompatible, {"p": "a"})
    assert lake.version("curated", "t") == version
    assert_frame_equal(sorted_read(lake, "t"), before)


# --- concurrency -----------------------------------------------------------------------

_PARTITION_WRITER = """
import pathlib
import sys
import time
import polars as pl
from pipeline.resources.lake import LakeResource

root, partition, go = sys.argv[1], sys.argv[2], pathlib.Path(sys.argv[3])
lake = LakeResource(root_uri=root)
print("ready", flush=True)
while not go.exists():
    time.sleep(0.005)
for i in range(4):
    data = pl.DataFrame({"p": [partition] * 50, "x": [float(i * 1000 + k) for k in range(50)]})
    lake.overwrite_partition("curated", "t", data, {"p": partition})
print("done", flush=True)
"""


def test_two_processes_writing_different_partitions_both_land(
    lake: LakeResource, tmp_path: Path
) -> None:
    """A child process writes partition ``b`` while this process writes ``c``.

    Each has its own delta-rs state, as two Dagster run workers would; one child instead
    of two keeps the test to one extra interpreter start-up.
    """
    lake.overwrite_partition("curated", "t", frame("a"), {"p": "a"})
    go = tmp_path / "go"
    proc = subprocess.Popen(
        [sys.executable, "-c", _PARTITION_WRITER, lake.root_uri, "b", str(go)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        go.touch()
        for i in range(4):
            data = pl.DataFrame({"p": ["c"] * 50, "x": [float(i * 1000 + k) for k in range(50)]})
            lake.overwrite_partition("curated", "t", data, {"p": "c"})
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert out.strip() == "done"

    assert lake.version("curated", "t") == 8  # 1 initial + 2 writers x 4 commits, none lost
    table = lake.read("curated", "t")
    assert table.group_by("p").len().sort("p").rows() == [("a", 5), ("b", 50), ("c", 50)]
    for p in ("b", "c"):
        assert table.filter(pl.col("p") == p)["x"].min() == 3000.0  # the last write won


class CommitRecorder:
    """Wraps ``write_deltalake``: records every attempt and every lost commit race."""

    def __init__(self, fail_first: int = 0) -> None:
        self.real = deltalake.write_deltalake
        self.fail_first = fail_first
        self.calls = 0
        self.conflicts = 0
        self.lock = threading.Lock()

    def __call__(self, *args, **kwargs):
        with self.lock:
            self.calls += 1
            injected = self.calls <= self.fail_first
        if injected:
            raise CommitFailedError("injected: a concurrent transaction won")
        try:
            return self.real(*args, **kwargs)
        except CommitFailedError:
            with self.lock:
                self.conflicts += 1
            raise


def test_threads_racing_on_one_partition_retry_until_every_commit_lands(
    lake: LakeResource, monkeypatch: pytest.MonkeyPatch
) -> None:
    lake.overwrite_partition("curated", "t", frame("a"), {"p": "a"})
    recorder = CommitRecorder()
    monkeypatch.setattr(deltalake, "write_deltalake", recorder)
    barrier = threading.Barrier(2)
    errors: list[BaseException] = []

    def writer(offset: float) -> None:
        try:
            for i in range(3):
                barrier.wait(timeout=30)
                lake.overwrite_partition("curated", "t", frame("a", 4, offset + i), {"p": "a"})
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(o,)) for o in (100.0, 200.0)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    # every commit landed exactly once, whatever the number of lost races retried
    assert lake.version("curated", "t") == 6
    assert recorder.calls == 6 + recorder.conflicts
    final = lake.read("curated", "t")
    assert final.height == 4
    assert final["x"].min() in (102.0, 202.0)


def test_a_lost_commit_is_retried_with_backoff_then_raised(
    lake: LakeResource, monkeypatch: pytest.MonkeyPatch
) -> None:
    sleeps: list[float] = []
    monkeypatch.setattr(lake_module.time, "sleep", sleeps.append)
    monkeypatch.setattr(deltalake, "write_deltalake", CommitRecorder(fail_first=2))
    assert lake.overwrite_partition("curated", "t", frame("a"), {"p": "a"}) == 0
    assert sleeps == [0.2, 0.4]

    sleeps.clear()
    always = CommitRecorder(fail_first=10**6)
    monkeypatch.setattr(deltalake, "write_deltalake", always)
    with pytest.raises(CommitFailedError, match="injected"):
        lake.overwrite_partition("curated", "t", frame("a", offset=5), {"p": "a"})
    assert always.calls == lake.commit_retries
    assert sleeps == [0.2, 0.4, 0.8, 1.6]
    assert lake.read("curated", "t")["x"].to_list() == [0, 1, 2, 3, 4]


# --- outcomes committed together (commit point) ------------------------------------------


def outcome(partition: str, curated: int, quarantined: int, offset: float = 0.0) -> list:
    """A curated table and its quarantine, for one partition of ``curated/t``."""
    return [
        PartitionWrite("curated", "t", frame(partition, curated, offset), [{"p": partition}]),
        PartitionWrite(
            "quarantine",
            "t",
            pl.DataFrame(
                {"partition_key": [partition] * quarantined, "reason": ["bad"] * quarantined},
                schema={"partition_key": pl.String, "reason": pl.String},
            ),
            [{"partition_key": partition}],
        ),
    ]


def test_curated_and_quarantine_rows_become_visible_together(lake: LakeResource) -> None:
    first = lake.commit_outcome(outcome("a", 3, 2))
    other = lake.commit_outcome(outcome("b", 1, 0))
    assert lake.read("curated", "t").group_by("p").len().sort("p").rows() == [("a", 3), ("b", 1)]
    assert lake.read("quarantine", "t", {"partition_key": "a"}).height == 2
    assert "_batch_id" not in lake.read("curated", "t").columns

    second = lake.commit_outcome(outcome("a", 1, 4, offset=10))
    assert second.batch_id > first.batch_id
    assert lake.read("curated", "t", {"p": "a"})["x"].to_list() == [10.0]
    assert lake.read("quarantine", "t", {"partition_key": "a"}).height == 4
    # the superseded batch of a was deleted after the commit; b kept its own
    stored = lake.read("curated", "t", committed=False)
    assert set(stored["_batch_id"]) == {second.batch_id, other.batch_id}
    assert stored.filter(pl.col("p") == "a")["_batch_id"].unique().to_list() == [second.batch_id]
    commits = lake.read("ops", "ingest_commits")
    assert commits.filter(pl.col("batch_id") == second.batch_id).select(
        "layer", "table", "partition", "rows"
    ).sort("layer").rows() == [
        ("curated", "t", '{"p": "a"}', 1),
        ("quarantine", "t", '{"partition_key": "a"}', 4),
    ]


def test_an_all_rejected_partition_is_committed_empty_not_left_as_it_was(
    lake: LakeResource,
) -> None:
    lake.commit_outcome(outcome("a", 3, 0))
    lake.commit_outcome(outcome("a", 0, 3))
    assert lake.read("curated", "t", {"p": "a"}).height == 0
    assert lake.read("quarantine", "t").height == 3


def test_a_failed_quarantine_write_publishes_nothing(lake: LakeResource) -> None:
    lake.commit_outcome(outcome("a", 3, 1))
    before = lake.read("curated", "t")
    blocked = Path(lake.table_uri("quarantine", "t"))
    moved = blocked.with_name("moved")
    blocked.rename(moved)
    blocked.write_text("a file where the table should be")
    try:
        with pytest.raises(Exception):  # noqa: B017 - delta-rs reports it as it sees fit
            lake.commit_outcome(outcome("a", 5, 0, offset=50))
    finally:
        blocked.unlink()
        moved.rename(blocked)
    assert_frame_equal(lake.read("curated", "t"), before)
    assert lake.read("quarantine", "t").height == 1
    assert lake.read("curated", "t", committed=False).height == 3 + 5  # appended, invisible


def test_invalid_writes_are_refused_before_any_table_is_touched(lake: LakeResource) -> None:
    stray = outcome("a", 2, 1)
    stray[1] = PartitionWrite(
        "quarantine", "t", pl.DataFrame({"partition_key": ["z"]}), [{"partition_key": "a"}]
    )
    with pytest.raises(LakeError, match="lie outside the partitions"):
        lake.commit_outcome(stray)
    assert not lake.exists("curated", "t")
    with pytest.raises(LakeError, match="at least one write"):
        lake.commit_outcome([])


def test_readers_see_the_newest_committed_batch_that_their_snapshot_holds() -> None:
    rows = pl.DataFrame(
        {
            "p": ["a", "a", "b", "c", "d"],
            "x": [1, 2, 3, 4, 5],
            "_batch_id": ["B1", "B2", "B1", None, "B9"],
        }
    )
    commits = pl.DataFrame(
        {
            "p": ["a", "a", "a", "b", "b", "d"],
            "_batch_id": ["B1", "B2", "B3", "B1", "B4", "B8"],
            "rows": [1, 1, 7, 1, 0, 1],
        }
    )
    visible = visible_rows(rows, commits, ["p"]).sort("p")
    # a: B3 committed after the snapshot was read (absent): B2; b: B4 emptied it;
    # c: rows from before commit points; d: B9 never committed and B8 absent: nothing
    assert visible.select("p", "x").rows() == [("a", 2), ("c", 4)]


def test_a_commit_reported_lost_after_it_landed_is_not_appended_twice(
    lake: LakeResource, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = deltalake.write_deltalake
    calls = []

    def lands_then_reports_a_conflict(*args, **kwargs):
        real(*args, **kwargs)
        calls.append(kwargs.get("mode"))
        if len(calls) == 1:
            raise CommitFailedError("injected: the commit landed but the response was lost")

    monkeypatch.setattr(deltalake, "write_deltalake", lands_then_reports_a_conflict)
    monkeypatch.setattr(lake_module.time, "sleep", lambda _: None)
    lake.commit_outcome(outcome("a", 3, 1))
    assert lake.read("curated", "t", committed=False).height == 3
    assert lake.read("curated", "t").height == 3


def test_object_store_requests_are_bounded_and_local_folders_are_not() -> None:
    remote = LakeResource(root_uri="s3://bucket/lake", service_timeout_s=30)
    assert remote._delta_options() == {
        "timeout": "10s",
        "connect_timeout": "5s",
        "max_retries": "2",
        "retry_timeout": "30s",
    }
    assert remote._polars_options()["retry_timeout_ms"] == "30000"
    tuned = LakeResource(
        root_uri="abfss://c@a.dfs.core.windows.net/lake",
        service_timeout_s=9,
        storage_options={"timeout": "60s"},
    )
    assert tuned._delta_options()["timeout"] == "60s"  # what the user configured wins
    assert tuned._delta_options()["retry_timeout"] == "9s"
    assert LakeResource(root_uri="/data/lake", service_timeout_s=30)._delta_options() is None


def test_ops_is_a_layer_and_batch_ids_sort_by_time(lake: LakeResource) -> None:
    assert lake.table_uri("ops", "landing_rejects").endswith("/ops/landing_rejects")
    early = new_batch_id(dt.datetime(2026, 9, 1, 12, 0, tzinfo=dt.UTC))
    late = new_batch_id(dt.datetime(2026, 9, 1, 12, 0, 0, 1, tzinfo=dt.UTC))
    assert early < late
    assert batch_time(early) == dt.datetime(2026, 9, 1, 12, 0)
    with pytest.raises(LakeError, match="is not valid"):
        lake.delete_batches("curated", "t", pl.DataFrame({"p": ["a"], "_batch_id": ["x' OR 1=1"]}))
