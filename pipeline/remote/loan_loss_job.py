"""Databricks job: simulate one loan-loss scenario on the cluster, return the losses via DBFS.

How it runs
-----------
:func:`pipeline.assets.loan_loss.databricks_simulate` submits this file as a
``spark_python_task`` (Jobs API ``runs/submit``) through
:class:`dagster_databricks.PipesDatabricksClient`, one run per scenario. The Pipes
bootstrap parameters arrive as task parameters (CLI arguments) on an existing cluster,
whose environment a run cannot change, and as ``spark_env_vars`` on a new cluster;
:func:`bootstrap_params_loader` picks whichever is present.

The science is :func:`pipeline.domain.loan_loss.simulate_chunk`, the same function the
local and Spark backends call over the same :func:`~pipeline.domain.loan_loss.chunk_ranges`,
so the losses are bit-for-bit those of ``COMPUTE=local`` for the same seed (given the same
numpy and scipy builds: their versions are reported back so the orchestrator can warn).
The cluster has no ``pipeline`` installation: the orchestrator uploads a zip of
``pipeline/domain`` and ``pipeline/remote`` and names it in the extras as ``code_bundle``;
it goes first on ``sys.path`` here and, with Spark, is shipped to the executors.

When the orchestrator asks for ``contributions.npz`` (and sends each loan's segment code in
the book file), the job also runs the contribution pass of
:func:`pipeline.domain.loan_loss.contribution_chunk` over the same chunks, on the tail of the
losses it just simulated, and writes the merged sums; the orchestrator checks them against
the tail of the losses it receives. One run per scenario thus carries both passes.

What crosses the wire, and why files rather than messages
----------------------------------------------------------
The Pipes extras carry scalars and DBFS paths only. The loan book comes as ``book.npz``
written by the orchestrator, and this job writes the losses as ``losses.npy`` to the path
the extras name, then reports that path with its SHA-256, size and a short summary in one
``report_custom_message``. Sending the samples as Pipes messages is not an option at this
size: 100,000 float64 are 800 kB in binary but about 2 MB of JSON, and
``PipesDbfsMessageReader`` fetches each message chunk with a single DBFS ``read`` call,
which returns at most 1 MB (0.5 MB by default), so a large chunk would arrive cut. Binary
``.npy`` also round-trips float64 exactly, which the bit-for-bit guarantee needs, and the
checksum lets the orchestrator prove it downloaded what was written. A custom message
rather than ``report_asset_materialization``: one scenario is not a materialisation; the
asset materialises once, with all scenarios, in the orchestrator.

The DBFS mount
--------------
A Databricks cluster mounts DBFS at ``/dbfs`` (FUSE), and that is where
:class:`FuseDbfsContextLoader` and :class:`FuseDbfsMessageWriter` look unless
``PIPELINE_DBFS_FUSE_ROOT`` names another mount point. The loopback fake workspace of the
tests sets it to its temp folder; on a cluster it is unset and these classes behave as
``dagster_pipes.PipesDbfsContextLoader``/``PipesDbfsMessageWriter``.

This module imports only the standard library, numpy and ``dagster_pipes`` at module
level, so it starts on a cluster where nothing but those (and the bundle) is available.
"""

import hashlib
import io
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
from dagster_pipes import (
    DAGSTER_PIPES_CONTEXT_CLI_ARGUMENT,
    PipesBufferedFilesystemMessageWriterChannel,
    PipesCliArgsParamsLoader,
    PipesContext,
    PipesContextData,
    PipesContextLoader,
    PipesDbfsMessageWriter,
    PipesEnvVarParamsLoader,
    PipesExtras,
    PipesParams,
    PipesParamsLoader,
    open_dagster_pipes,
)

FUSE_ROOT_ENV = "PIPELINE_DBFS_FUSE_ROOT"
DEFAULT_FUSE_ROOT = "/dbfs"
BOOK_FILE = "book.npz"
LOSSES_FILE = "losses.npy"
CONTRIBUTIONS_FILE = "contributions.npz"
ENGINES = ("auto", "local", "spark")
RESULT_KIND = "loan_loss_losses"
_BOOK_ARRAYS = ("loan_id", "pd", "ead", "lgd")


class JobError(RuntimeError):
    """The job was started without what it needs: Pipes bootstrap, extras or input files."""


# --------------------------------------------------------------------------- DBFS mount


def fuse_root() -> str:
    """Where DBFS is mounted on this machine: ``$PIPELINE_DBFS_FUSE_ROOT`` or ``/dbfs``."""
    return os.environ.get(FUSE_ROOT_ENV) or DEFAULT_FUSE_ROOT


def fuse_path(dbfs_path: str, root: str | None = None) -> str:
    """The local file path of a DBFS path on the mount (``dbfs:/a/b`` -> ``/dbfs/a/b``).

    Parameters
    ----------
    dbfs_path : str
        ``dbfs:/...`` or an absolute DBFS path ``/...``.
    root : str, optional
        Mount point; default :func:`fuse_root`.

    Returns
    -------
    str
        The path under the mount point.

    Raises
    ------
    JobError
        When the path is relative or contains ``..`` (it could leave the mount).
    """
    path = dbfs_path.removeprefix("dbfs:")
    if not path.startswith("/"):
        raise JobError(f"DBFS path {dbfs_path!r} is not absolute (expected dbfs:/... or /...)")
    if ".." in path.split("/"):
        raise JobError(f"DBFS path {dbfs_path!r} contains '..'")
    return os.path.join(root or fuse_root(), path.lstrip("/"))


class FuseDbfsContextLoader(PipesContextLoader):
    """``PipesDbfsContextLoader`` reading through a configurable mount point.

    The orchestrator's ``PipesDbfsContextInjector`` writes the context JSON with the DBFS
    API; the job reads it through the mount (:func:`fuse_path`).
    """

    @contextmanager
    def load_context(self, params: PipesParams) -> Iterator[PipesContextData]:
        """Yield the context data stored at ``params["path"]`` on DBFS."""
        path = params.get("path")
        if not isinstance(path, str):
            raise JobError(f"Pipes context params lack a DBFS 'path': {sorted(params)}")
        with open(fuse_path(path), encoding="utf-8") as f:
            yield json.load(f)


class FuseDbfsMessageWriter(PipesDbfsMessageWriter):
    """``PipesDbfsMessageWriter`` writing message chunks through a configurable mount point."""

    def make_channel(self, params: PipesParams) -> PipesBufferedFilesystemMessageWriterChannel:
        """A channel writing numbered chunk files into ``params["path"]`` on DBFS."""
        path = params.get("path")
        if not isinstance(path, str):
            raise JobError(f"Pipes message params lack a DBFS 'path': {sorted(params)}")
        return PipesBufferedFilesystemMessageWriterChannel(
            path=fuse_path(path), interval=self.interval
        )

    def get_opened_extras(self) -> PipesExtras:
        """Cluster log location when Databricks' Spark session is up, else nothing.

        ``dagster_pipes`` raises when no Spark session is active. On a Databricks cluster
        one always is, so behaviour there is unchanged; off a cluster (the loopback fake)
        there are no cluster logs to point the orchestrator at, so nothing is reported.
        """
        try:
            from pyspark.sql import SparkSession
        except ImportError:
            return {}
        if SparkSession.getActiveSession() is None:
            return {}
        return super().get_opened_extras()


def bootstrap_params_loader() -> PipesParamsLoader:
    """CLI-argument loader on an existing cluster, environment loader on a new one.

    ``PipesDatabricksClient`` passes the bootstrap parameters as task parameters when the
    task names ``existing_cluster_id`` and as ``spark_env_vars`` otherwise.

    Raises
    ------
    JobError
        When neither is present: the script was not launched through Dagster Pipes, and
        ``open_dagster_pipes`` would otherwise hand back a mock that silently does nothing.
    """
    if DAGSTER_PIPES_CONTEXT_CLI_ARGUMENT in sys.argv:
        return PipesCliArgsParamsLoader()
    loader = PipesEnvVarParamsLoader()
    if loader.is_dagster_pipes_process():
        return loader
    raise JobError(
        f"not launched by Dagster Pipes: neither {DAGSTER_PIPES_CONTEXT_CLI_ARGUMENT} nor "
        "DAGSTER_PIPES_CONTEXT is set; submit it with ComputeResource.run_databricks_job"
    )


# --------------------------------------------------------------------------- wire format


def encode_book(loan_id: Any, pd: Any, ead: Any, lgd: Any, *, groups: Any | None = None) -> bytes:
    """The loan book as ``.npz`` bytes (no pickles: ids are stored as unicode strings).

    Parameters
    ----------
    loan_id, pd, ead, lgd : array-like
        The arrays of a ``LoanArrays``; PD, EAD and LGD are stored as float64 unchanged,
        so the job simulates exactly the book the orchestrator validated.
    groups : array-like, optional
        Integer segment code per loan, for the contribution pass.

    Returns
    -------
    bytes
        An uncompressed ``.npz`` archive.
    """
    buffer = io.BytesIO()
    extra = {} if groups is None else {"groups": np.asarray(groups, dtype=np.int64)}
    np.savez(
        buffer,
        loan_id=np.asarray(loan_id).astype(str),
        pd=np.asarray(pd, dtype=np.float64),
        ead=np.asarray(ead, dtype=np.float64),
        lgd=np.asarray(lgd, dtype=np.float64),
        **extra,
    )
    return buffer.getvalue()


def decode_book(data: bytes) -> dict[str, np.ndarray]:
    """The arrays of :func:`encode_book`, ready for ``LoanArrays(**arrays)``.

    The segment codes, when the orchestrator sent them, are left out here: read them with
    :func:`decode_groups`.
    """
    with np.load(io.BytesIO(data), allow_pickle=False) as archive:
        missing = [name for name in _BOOK_ARRAYS if name not in archive.files]
        if missing:
            raise JobError(f"{BOOK_FILE} lacks array(s) {missing}; has {archive.files}")
        return {name: archive[name] for name in _BOOK_ARRAYS}


def decode_groups(data: bytes) -> np.ndarray | None:
    """The segment codes of :func:`encode_book` bytes, or ``None`` when none were sent."""
    with np.load(io.BytesIO(data), allow_pickle=False) as archive:
        return archive["groups"] if "groups" in archive.files else None


def encode_losses(losses: np.ndarray) -> bytes:
    """Losses as ``.npy`` bytes (float64, exact)."""
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(losses, dtype=np.float64), allow_pickle=False)
    return buffer.getvalue()


def decode_losses(data: bytes, n_sims: int) -> np.ndarray:
    """Losses from :func:`encode_losses` bytes, checked to be ``n_sims`` float64 values.

    Raises
    ------
    JobError
        When the array has another dtype or length than the job was asked for.
    """
    losses = np.load(io.BytesIO(data), allow_pickle=False)
    if losses.dtype != np.float64 or losses.shape != (n_sims,):
        raise JobError(
            f"{LOSSES_FILE} holds {losses.dtype} of shape {losses.shape}; "
            f"expected float64 of shape ({n_sims},)"
        )
    return losses


@dataclass(frozen=True)
class ScenarioRequest:
    """What one run simulates, read from the Pipes extras.

    Attributes
    ----------
    book_path, losses_path : str
        DBFS paths of the input book and of the losses to write.
    pd_multiplier, rho : float
        Scenario PD multiplier and asset correlation.
    seed, n_sims, chunk_size : int
        Seed of the whole run, simulations, simulations per chunk.
    engine : str
        ``auto`` (Spark on a Databricks cluster, else in process), ``local`` or ``spark``.
    code_bundle : str or None
        DBFS path of the zip holding ``pipeline.domain``; ``None`` when the cluster has
        ``pipeline`` installed as a library.
    contributions_path : str or None
        DBFS path of the contribution sums to write; ``None`` skips the contribution pass.
    n_groups : int
        Number of segment codes in the book file (with ``contributions_path``).
    """

    book_path: str
    losses_path: str
    pd_multiplier: float
    rho: float
    seed: int
    n_sims: int
    chunk_size: int
    engine: str = "auto"
    code_bundle: str | None = None
    contributions_path: str | None = None
    n_groups: int = 0

    @classmethod
    def from_extras(cls, extras: Mapping[str, Any]) -> "ScenarioRequest":
        """Parse and type-check the extras sent by the orchestrator.

        Raises
        ------
        JobError
            Naming the missing or mistyped key.
        """
        inputs, outputs = extras.get("inputs") or {}, extras.get("outputs") or {}
        if BOOK_FILE not in inputs or LOSSES_FILE not in outputs:
            raise JobError(
                f"extras must name inputs[{BOOK_FILE!r}] and outputs[{LOSSES_FILE!r}]; "
                f"got inputs {sorted(inputs)} and outputs {sorted(outputs)}"
            )
        values: dict[str, Any] = {}
        for key, kind in (
            ("pd_multiplier", float),
            ("rho", float),
            ("seed", int),
            ("n_sims", int),
            ("chunk_size", int),
        ):
            value = extras.get(key)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise JobError(f"extra {key!r} must be a number, got {value!r}")
            if kind is int and value != int(value):
                raise JobError(f"extra {key!r} must be an integer, got {value!r}")
            values[key] = kind(value)
        engine = extras.get("engine", "auto")
        if engine not in ENGINES:
            raise JobError(f"extra 'engine' must be one of {ENGINES}, got {engine!r}")
        contributions = outputs.get(CONTRIBUTIONS_FILE)
        n_groups = extras.get("n_groups", 0)
        if isinstance(n_groups, bool) or not isinstance(n_groups, int) or n_groups < 0:
            raise JobError(f"extra 'n_groups' must be an integer >= 0, got {n_groups!r}")
        return cls(
            book_path=str(inputs[BOOK_FILE]),
            losses_path=str(outputs[LOSSES_FILE]),
            engine=engine,
            code_bundle=extras.get("code_bundle"),
            contributions_path=None if contributions is None else str(contributions),
            n_groups=n_groups,
            **values,
        )


# --------------------------------------------------------------------------- simulation


def spark_session_for(engine: str) -> Any | None:
    """The cluster's Spark session when ``engine`` asks for Spark, else ``None``.

    ``auto`` uses Spark only on a Databricks cluster (``DATABRICKS_RUNTIME_VERSION`` is set
    on every one), where the session exists already and chunks spread over the workers.
    """
    if engine == "local" or (engine == "auto" and "DATABRICKS_RUNTIME_VERSION" not in os.environ):
        return None
    from pyspark.sql import SparkSession

    return SparkSession.builder.getOrCreate()


def ship_code_to_executors(spark: Any, bundle_file: str) -> None:
    """Make the code bundle importable on the executors, not only on the driver.

    Functions of :mod:`pipeline.domain` are pickled by reference, so every Python worker must
    import the package. Classic clusters take it through ``SparkContext.addPyFile``; Spark
    Connect sessions (shared access mode) have no SparkContext and take an artifact instead.
    """
    try:
        context = spark.sparkContext
    except NotImplementedError:  # pyspark's PySparkNotImplementedError on Spark Connect
        spark.addArtifacts(bundle_file, pyfile=True)
        return
    context.addPyFile(bundle_file)


def simulate_losses(
    book: Any,
    *,
    pd_multiplier: float,
    rho: float,
    seed: int,
    ranges: Sequence[tuple[int, int]],
    spark: Any | None = None,
) -> np.ndarray:
    """Losses of simulations ``0 .. n`` in order: chunks in process, or Spark tasks.

    Parameters
    ----------
    book : pipeline.domain.loan_loss.LoanArrays
        The validated loan book.
    pd_multiplier, rho : float
        Scenario settings.
    seed : int
        Seed of the whole run.
    ranges : sequence of (int, int)
        ``chunk_ranges(n_sims, chunk_size)``: consecutive, starting at 0.
    spark : pyspark.sql.SparkSession, optional
        With a session every chunk is one row of a frame mapped by ``mapInPandas``, so the
        chunks run as tasks on the workers; the rows come back with their simulation index
        and are put in order, so the result does not depend on task scheduling.

    Returns
    -------
    numpy.ndarray
        float64 losses, one per simulation.
    """
    from pipeline.domain.loan_loss import simulate_chunk

    bounds = [(int(a), int(b)) for a, b in ranges]
    settings = {"pd_multiplier": float(pd_multiplier), "rho": float(rho), "seed": int(seed)}
    if spark is None:
        parts = [simulate_chunk(book, **settings, start=a, stop=b) for a, b in bounds]
        return np.concatenate(parts)
    import pandas as pd

    def run_chunks(batches: Iterator[Any]) -> Iterator[Any]:
        from pipeline.domain.loan_loss import simulate_chunk as chunk_fn

        for batch in batches:
            for chunk_id in batch["chunk_id"]:
                start, stop = bounds[int(chunk_id)]
                yield pd.DataFrame(
                    {
                        "sim": np.arange(start, stop, dtype=np.int64),
                        "loss": chunk_fn(book, **settings, start=start, stop=stop),
                    }
                )

    ids = spark.createDataFrame([(i,) for i in range(len(bounds))], "chunk_id int")
    ids = ids.repartition(max(len(bounds), 1), "chunk_id")
    frame = ids.mapInPandas(run_chunks, schema="sim long, loss double").toPandas()
    frame = frame.sort_values("sim", kind="stable")
    n_sims = bounds[-1][1] if bounds else 0
    sims = frame["sim"].to_numpy()
    if sims.shape != (n_sims,) or not np.array_equal(sims, np.arange(n_sims)):
        raise JobError(
            f"Spark returned {sims.size} simulations for {len(bounds)} chunks; "
            f"expected each of 0 .. {n_sims - 1} exactly once"
        )
    return frame["loss"].to_numpy(dtype=np.float64)


def contribution_sums(
    book: Any,
    groups: np.ndarray,
    n_groups: int,
    tail: Any,
    *,
    pd_multiplier: float,
    rho: float,
    seed: int,
    ranges: Sequence[tuple[int, int]],
    spark: Any | None = None,
) -> Any:
    """The contribution pass over the same chunks: tail sums merged in chunk order.

    Parameters
    ----------
    book : pipeline.domain.loan_loss.LoanArrays
        The validated loan book.
    groups : numpy.ndarray
        Segment code of each loan, in ``[0, n_groups)``.
    n_groups : int
        Number of segments.
    tail : pipeline.domain.loan_loss.TailSpec
        ``tail_spec`` of the losses of the first pass.
    pd_multiplier, rho : float
        Scenario settings.
    seed : int
        Seed of the whole run.
    ranges : sequence of (int, int)
        The chunks of the first pass.
    spark : pyspark.sql.SparkSession, optional
        Run the chunks as Spark tasks; each returns its sums as exact ``.npz`` bytes.

    Returns
    -------
    pipeline.domain.loan_loss.ContributionSums
        The merged sums, checked to have seen the first pass's tail.
    """
    from pipeline.domain.loan_loss import ContributionSums, check_second_pass, contribution_chunk

    bounds = [(int(a), int(b)) for a, b in ranges]
    settings = {
        "pd_multiplier": float(pd_multiplier),
        "rho": float(rho),
        "seed": int(seed),
        "tail": tail,
        "groups": groups,
        "n_groups": int(n_groups),
    }
    if spark is None:
        parts = [contribution_chunk(book, **settings, start=a, stop=b) for a, b in bounds]
    else:
        import pandas as pd

        def run_chunks(batches: Iterator[Any]) -> Iterator[Any]:
            from pipeline.domain.loan_loss import contribution_chunk as chunk_fn

            for batch in batches:
                for chunk_id in batch["chunk_id"]:
                    start, stop = bounds[int(chunk_id)]
                    sums = chunk_fn(book, **settings, start=start, stop=stop)
                    yield pd.DataFrame({"chunk_id": [int(chunk_id)], "sums": [sums.to_bytes()]})

        ids = spark.createDataFrame([(i,) for i in range(len(bounds))], "chunk_id int")
        ids = ids.repartition(max(len(bounds), 1), "chunk_id")
        frame = ids.mapInPandas(run_chunks, schema="chunk_id int, sums binary").toPandas()
        by_id = {int(c): bytes(b) for c, b in zip(frame["chunk_id"], frame["sums"], strict=True)}
        if sorted(by_id) != list(range(len(bounds))):
            raise JobError(f"Spark returned sums for chunks {sorted(by_id)} of {len(bounds)}")
        parts = [ContributionSums.from_bytes(by_id[i]) for i in range(len(bounds))]
    total = parts[0]
    for part in parts[1:]:
        total = total.merge(part)
    check_second_pass(total, tail)
    return total


def _write(dbfs_path: str, data: bytes) -> dict[str, Any]:
    """Write ``data`` to a DBFS path through the mount; its path, SHA-256 and size."""
    target = fuse_path(dbfs_path)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with open(target, "wb") as f:
        f.write(data)
    return {"path": dbfs_path, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def run(pipes: PipesContext) -> dict[str, Any]:
    """Simulate the scenario named by the extras, write the losses, report them.

    When the extras name a ``contributions.npz`` output, the contribution pass runs too
    (over the same chunks, same seed) and its sums are written there.

    Returns
    -------
    dict
        The custom message sent to Dagster: ``kind``, ``outputs`` (per file its DBFS path,
        SHA-256 and size), ``n_sims``, ``chunks``, ``engine``, ``expected_loss``, ``seconds``,
        ``versions`` (python, numpy, scipy) and ``code_origin`` (the file the domain code
        was imported from, to show the bundle was used).
    """
    started = time.perf_counter()
    request = ScenarioRequest.from_extras(pipes.extras)
    bundle_file = fuse_path(request.code_bundle) if request.code_bundle else None
    if bundle_file is not None:
        if not os.path.isfile(bundle_file):
            raise JobError(f"code bundle {request.code_bundle} is not on DBFS ({bundle_file})")
        sys.path.insert(0, bundle_file)
    import scipy

    from pipeline.domain import loan_loss

    with open(fuse_path(request.book_path), "rb") as f:
        book_bytes = f.read()
    book = loan_loss.LoanArrays(**decode_book(book_bytes))
    ranges = loan_loss.chunk_ranges(request.n_sims, request.chunk_size)
    spark = spark_session_for(request.engine)
    if spark is not None and bundle_file is not None:
        ship_code_to_executors(spark, bundle_file)
    settings = {"pd_multiplier": request.pd_multiplier, "rho": request.rho, "seed": request.seed}
    losses = simulate_losses(book, **settings, ranges=ranges, spark=spark)
    outputs = {LOSSES_FILE: _write(request.losses_path, encode_losses(losses))}
    if request.contributions_path is not None:
        groups = decode_groups(book_bytes)
        if groups is None:
            raise JobError(f"{CONTRIBUTIONS_FILE} was asked for but {BOOK_FILE} has no groups")
        tail = loan_loss.tail_spec(losses)
        sums = contribution_sums(
            book, groups, request.n_groups, tail, **settings, ranges=ranges, spark=spark
        )
        outputs[CONTRIBUTIONS_FILE] = _write(request.contributions_path, sums.to_bytes())
    result = {
        "kind": RESULT_KIND,
        "outputs": outputs,
        "n_sims": int(losses.size),
        "chunks": len(ranges),
        "engine": "spark" if spark is not None else "local",
        "expected_loss": float(losses.mean()),
        "seconds": round(time.perf_counter() - started, 3),
        "versions": {
            "python": platform.python_version(),
            "numpy": np.__version__,
            "scipy": scipy.__version__,
        },
        "code_origin": loan_loss.__file__,
    }
    pipes.log.info(
        f"simulated {result['n_sims']:,} losses in {result['chunks']} chunk(s) on "
        f"{result['engine']} in {result['seconds']} s; wrote {request.losses_path}"
    )
    # stdout is what the Databricks run page shows as the task's output
    print(json.dumps(result, sort_keys=True))
    pipes.report_custom_message(result)
    return result


def run_under_pipes(job: Callable[[PipesContext], dict[str, Any]]) -> None:
    """Run ``job`` in a Dagster Pipes session opened as a Databricks task sees it.

    Bootstrap parameters come from the task's environment; context and messages go through
    the DBFS mount.
    """
    with open_dagster_pipes(
        params_loader=bootstrap_params_loader(),
        context_loader=FuseDbfsContextLoader(),
        message_writer=FuseDbfsMessageWriter(),
    ) as pipes:
        job(pipes)


def main() -> None:
    """Entry point of the ``spark_python_task``."""
    run_under_pipes(run)


if __name__ == "__main__":
    main()
