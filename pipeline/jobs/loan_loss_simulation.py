"""Simulate one valuation date's loss distribution under every macro scenario.

For each scenario the book is simulated under the one-factor Gaussian copula
(:mod:`pipeline.domain.loan_loss`), in chunks on the configured compute backend: in
this process, as Spark tasks (``mapInPandas`` over chunk ids) or as one Databricks run
of :mod:`pipeline.remote.loan_loss_job` through Dagster Pipes, always over the same
chunks, so the same seed gives the same losses.

Per scenario this runs two passes over the same simulations (same seed, same random
numbers): the first produces the losses, from which every figure and its Monte Carlo
standard error are computed; with ``auto_n_sims`` the simulations are doubled (only the new
ones are simulated: a simulation depends on its index and the seed only) until every
figure meets its relative bound or ``max_n_sims`` is reached. The second pass records which
loans defaulted in the tail simulations and allocates the 99% VaR and ES to segments and
loans (Euler allocation), without ever holding ``n_sims x n_loans`` values.
"""

import dataclasses
import datetime as dt
import io
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from pipeline import keys
from pipeline.audit import with_audit
from pipeline.resources.compute import ComputeError, ComputeResource
from pipeline.resources.lake import LakeResource
from pipeline.resources.tracking import TrackingResource
from pipeline.stores import loan_loss as store

SUMMARY_COLUMNS = (
    "expected_loss",
    "std",
    "p10",
    "p50",
    "p90",
    "var_99",
    "var_999",
    "es_99",
    "es_999",
)
FIGURES = ("expected_loss", "p10", "p50", "p90", "var_99", "var_999", "es_99", "es_999")
"""Every published figure: each has ``se_<figure>`` and ``max_rel_se_<figure>`` columns."""
SE_COLUMNS = tuple(f"se_{f}" for f in FIGURES)
BOUND_COLUMNS = tuple(f"{store.BOUND_PREFIX}{f}" for f in FIGURES)


@dataclass(frozen=True)
class SimulationSettings:
    """Simulation size, seed, error bounds and automatic sizing (the asset's run config).

    Attributes
    ----------
    n_sims : int
        Simulations per scenario (the first round's with ``auto_n_sims``).
    seed : int
        Seed of the whole run.
    chunk_size : int
        Simulations per chunk / Spark task.
    auto_n_sims : bool
        Double the simulations until every figure meets its bound or ``max_n_sims``.
    max_n_sims : int
        Budget of simulations per scenario for ``auto_n_sims``.
    max_relative_se : mapping of str to float
        Bound on ``se / |value|`` per figure of :data:`FIGURES`; empty means the domain's
        defaults.
    top_loans : int
        Loans listed individually in the contributions table.
    """

    n_sims: int = 100_000
    seed: int = 20260930
    chunk_size: int = 16_384
    auto_n_sims: bool = False
    max_n_sims: int = 1_600_000
    max_relative_se: Mapping[str, float] = field(default_factory=dict)
    top_loans: int = 10

    def bounds(self) -> dict[str, float]:
        """The bound of every figure: the configured ones over the domain's defaults."""
        from pipeline.domain.loan_loss import DEFAULT_MAX_RELATIVE_SE, validate_bounds

        return validate_bounds({**DEFAULT_MAX_RELATIVE_SE, **dict(self.max_relative_se)})


@dataclass(frozen=True)
class ScenarioOutcome:
    """What both passes of one scenario produced."""

    losses: np.ndarray
    summary: dict[str, Any]
    rounds: int
    contributions: pl.DataFrame


@dataclass(frozen=True)
class SimulatedDate:
    """What one valuation date's simulation stored and logged."""

    summary: pl.DataFrame
    contributions: pl.DataFrame
    delta_version: int
    contributions_version: int
    samples_uri: str
    mlflow_run_url: str
    histograms: dict[str, bytes]
    contribution_charts: dict[str, bytes]


# --------------------------------------------------------------------------- backends


def simulate_scenario(
    compute: ComputeResource,
    book: Any,
    *,
    pd_multiplier: float,
    rho: float,
    n_sims: int,
    seed: int,
    chunk_size: int,
    pipes_context: Any = None,
    start: int = 0,
) -> np.ndarray:
    """Losses of simulations ``[start, n_sims)`` of one scenario on the compute backend.

    ``pipes_context`` is the Dagster execution context that launches and watches a
    Databricks run; only ``COMPUTE=databricks`` needs it.
    """
    from pipeline.domain import loan_loss

    if compute.backend == "databricks":
        losses, _ = databricks_simulate(
            pipes_context,
            compute,
            book,
            pd_multiplier=pd_multiplier,
            rho=rho,
            n_sims=n_sims,
            seed=seed,
            chunk_size=chunk_size,
        )
        return losses[start:]
    ranges = loan_loss.chunk_ranges(n_sims, chunk_size, start)

    def local_chunk(chunk_id: int) -> np.ndarray:
        lo, hi = ranges[chunk_id]
        return loan_loss.simulate_chunk(
            book, pd_multiplier=pd_multiplier, rho=rho, seed=seed, start=lo, stop=hi
        )

    def spark_chunks(session, chunk_ids):
        return spark_simulate(
            session, book, ranges, chunk_ids, pd_multiplier=pd_multiplier, rho=rho, seed=seed
        )

    parts = compute.map_chunks(local_chunk, range(len(ranges)), spark_fn=spark_chunks)
    return np.concatenate(parts)


def scenario_contributions(
    compute: ComputeResource,
    book: Any,
    groups: np.ndarray,
    n_groups: int,
    tail: Any,
    *,
    pd_multiplier: float,
    rho: float,
    seed: int,
    chunk_size: int,
) -> Any:
    """The contribution pass of one scenario: tail sums mapped over the same chunks.

    Chunk sums add up without rounding error, so every backend and chunk size gives the
    same floats; the merged counts must equal the first pass's (``check_second_pass``).
    """
    from pipeline.domain import loan_loss

    ranges = loan_loss.chunk_ranges(tail.n_sims, chunk_size)
    settings = {"pd_multiplier": pd_multiplier, "rho": rho, "seed": seed, "tail": tail}

    def local_chunk(chunk_id: int) -> Any:
        lo, hi = ranges[chunk_id]
        return loan_loss.contribution_chunk(
            book, start=lo, stop=hi, groups=groups, n_groups=n_groups, **settings
        )

    def spark_chunks(session, chunk_ids):
        return spark_contributions(session, book, groups, n_groups, ranges, chunk_ids, settings)

    parts = compute.map_chunks(local_chunk, range(len(ranges)), spark_fn=spark_chunks)
    total = parts[0]
    for part in parts[1:]:
        total = total.merge(part)
    loan_loss.check_second_pass(total, tail)
    return total


def databricks_simulate(
    context: Any,
    compute: ComputeResource,
    book: Any,
    *,
    pd_multiplier: float,
    rho: float,
    n_sims: int,
    seed: int,
    chunk_size: int,
    groups: np.ndarray | None = None,
    n_groups: int = 0,
) -> tuple[np.ndarray, Any]:
    """One scenario as one Databricks run of :mod:`pipeline.remote.loan_loss_job`, via Pipes.

    The book goes to the cluster as a DBFS file and the losses come back as one, checked
    against the digest the job reports (the job module says why files, not messages). The
    job runs ``simulate_chunk`` over the same ``chunk_ranges``, so the losses equal the
    local backend's bit for bit when both sides have the same numpy and scipy: the job
    reports its versions, and a difference is logged as a warning because random streams
    and special functions may change between releases. With ``groups`` the job also runs
    the contribution pass on the cluster and returns its sums (else ``None``).
    """
    import scipy

    from pipeline.domain.loan_loss import ContributionSums
    from pipeline.remote import loan_loss_job as job

    if context is None:
        raise ComputeError("COMPUTE=databricks needs the Dagster context that launches the run")
    partition = context.partition_key if context.has_partition_key else "unpartitioned"
    with_contributions = groups is not None
    result = compute.run_databricks_job(
        context,
        script=Path(job.__file__).name,
        run_name=(
            f"{keys.LOAN_LOSS_DISTRIBUTION.to_user_string()} {partition} "
            f"m={pd_multiplier:g} rho={rho:g}"
        ),
        inputs={
            job.BOOK_FILE: job.encode_book(book.loan_id, book.pd, book.ead, book.lgd, groups=groups)
        },
        outputs=(job.LOSSES_FILE, job.CONTRIBUTIONS_FILE)
        if with_contributions
        else (job.LOSSES_FILE,),
        extras={
            "pd_multiplier": float(pd_multiplier),
            "rho": float(rho),
            "seed": int(seed),
            "n_sims": int(n_sims),
            "chunk_size": int(chunk_size),
            **({"n_groups": int(n_groups)} if with_contributions else {}),
        },
    )
    remote = result.message.get("versions") or {}
    local = {"numpy": np.__version__, "scipy": scipy.__version__}
    differs = {name: (remote.get(name), here) for name, here in local.items()}
    differs = {name: pair for name, pair in differs.items() if pair[0] != pair[1]}
    if differs:
        context.log.warning(
            f"Databricks run {result.run_id} used "
            + ", ".join(f"{n} {r} (here {h})" for n, (r, h) in differs.items())
            + "; losses may differ from COMPUTE=local for the same seed"
        )
    context.log.info(
        f"Databricks run {result.run_id}: {result.message.get('n_sims')} losses on "
        f"{result.message.get('engine')} in {result.message.get('seconds')} s "
        f"(domain code from {result.message.get('code_origin')})"
    )
    losses = job.decode_losses(result.outputs[job.LOSSES_FILE], int(n_sims))
    sums = (
        ContributionSums.from_bytes(result.outputs[job.CONTRIBUTIONS_FILE])
        if with_contributions
        else None
    )
    return losses, sums


def spark_simulate(
    session, book, ranges, chunk_ids, *, pd_multiplier: float, rho: float, seed: int
) -> list[np.ndarray]:
    """Run chunks as Spark tasks: ``mapInPandas`` over a frame of chunk ids."""
    import pandas as pd

    def run_chunks(batches):
        from pipeline.domain.loan_loss import simulate_chunk

        for batch in batches:
            for chunk_id in batch["chunk_id"]:
                start, stop = ranges[int(chunk_id)]
                losses = simulate_chunk(
                    book, pd_multiplier=pd_multiplier, rho=rho, seed=seed, start=start, stop=stop
                )
                yield pd.DataFrame(
                    {"chunk_id": int(chunk_id), "sim": np.arange(start, stop), "loss": losses}
                )

    ids = session.createDataFrame([(int(c),) for c in chunk_ids], "chunk_id int").repartition(
        max(len(chunk_ids), 1), "chunk_id"
    )
    result = ids.mapInPandas(run_chunks, schema="chunk_id int, sim long, loss double")
    frame = result.toPandas().sort_values("sim")
    return [frame.loc[frame["chunk_id"] == c, "loss"].to_numpy(dtype=np.float64) for c in chunk_ids]


def spark_contributions(
    session, book, groups, n_groups, ranges, chunk_ids, settings: dict
) -> list[Any]:
    """Contribution chunks as Spark tasks; each returns its sums as exact ``.npz`` bytes."""
    import pandas as pd

    from pipeline.domain.loan_loss import ContributionSums

    def run_chunks(batches):
        from pipeline.domain.loan_loss import contribution_chunk

        for batch in batches:
            for chunk_id in batch["chunk_id"]:
                start, stop = ranges[int(chunk_id)]
                sums = contribution_chunk(
                    book, start=start, stop=stop, groups=groups, n_groups=n_groups, **settings
                )
                yield pd.DataFrame({"chunk_id": [int(chunk_id)], "sums": [sums.to_bytes()]})

    ids = session.createDataFrame([(int(c),) for c in chunk_ids], "chunk_id int").repartition(
        max(len(chunk_ids), 1), "chunk_id"
    )
    frame = ids.mapInPandas(run_chunks, schema="chunk_id int, sums binary").toPandas()
    by_id = {int(c): bytes(b) for c, b in zip(frame["chunk_id"], frame["sums"], strict=True)}
    return [ContributionSums.from_bytes(by_id[int(c)]) for c in chunk_ids]


# --------------------------------------------------------------------------- one scenario


def grow_until_bounds(
    simulate_range: Callable[[int, int], np.ndarray], settings: SimulationSettings
) -> tuple[np.ndarray, dict[str, Any], int]:
    """Simulate ``n_sims``; with ``auto_n_sims`` double until every bound holds or the budget.

    ``simulate_range(start, stop)`` returns the losses of simulations ``[start, stop)``; the
    rounds append, so the result equals one run of the final size.

    Returns
    -------
    tuple
        ``(losses, summary, rounds)``; ``rounds`` is 1 when no doubling was needed.
    """
    from pipeline.domain import loan_loss

    if settings.auto_n_sims and settings.max_n_sims < settings.n_sims:
        raise loan_loss.LoanBookError(
            f"max_n_sims = {settings.max_n_sims:,} is below n_sims = {settings.n_sims:,}: "
            "the budget of auto_n_sims must allow the first round"
        )
    bounds = settings.bounds()
    n = settings.n_sims
    losses = simulate_range(0, n)
    summary = loan_loss.summarise_losses(losses)
    rounds = 1
    while settings.auto_n_sims and loan_loss.mc_error_shortfalls(summary, bounds):
        more = loan_loss.next_n_sims(n, settings.max_n_sims)
        if more == n:
            break
        losses = np.concatenate([losses, simulate_range(n, more)])
        n, rounds = more, rounds + 1
        summary = loan_loss.summarise_losses(losses)
    return losses, summary, rounds


def simulate_one_scenario(
    compute: ComputeResource,
    book: Any,
    segments: list[str],
    *,
    pd_multiplier: float,
    rho: float,
    settings: SimulationSettings,
    pipes_context: Any = None,
) -> ScenarioOutcome:
    """Both passes of one scenario: losses (grown to the bounds) and their contributions.

    On Databricks each round is one run over ``[0, n)`` that also runs the contribution
    pass on the cluster (a cluster run costs far more than re-simulating the prefix); the
    last round's sums are kept and checked against the tail of the losses returned.
    """
    from pipeline.domain import loan_loss

    names, codes = loan_loss.segment_codes(segments)
    common = {"pd_multiplier": pd_multiplier, "rho": rho, "seed": settings.seed}
    remote: dict[str, Any] = {}
    if compute.backend == "databricks":

        def simulate_range(start: int, stop: int) -> np.ndarray:
            losses, remote["sums"] = databricks_simulate(
                pipes_context,
                compute,
                book,
                **common,
                n_sims=stop,
                chunk_size=settings.chunk_size,
                groups=codes,
                n_groups=len(names),
            )
            return losses[start:]

    else:

        def simulate_range(start: int, stop: int) -> np.ndarray:
            return simulate_scenario(
                compute, book, **common, n_sims=stop, chunk_size=settings.chunk_size, start=start
            )

    losses, summary, rounds = grow_until_bounds(simulate_range, settings)
    tail = loan_loss.tail_spec(losses)
    if "sums" in remote:
        sums = remote["sums"]
        loan_loss.check_second_pass(sums, tail)
    else:
        sums = scenario_contributions(
            compute, book, codes, len(names), tail, **common, chunk_size=settings.chunk_size
        )
    table = loan_loss.contribution_table(book, segments, sums, tail, top_loans=settings.top_loans)
    return ScenarioOutcome(losses=losses, summary=summary, rounds=rounds, contributions=table)


# --------------------------------------------------------------------------- one date


def contribution_chart_png(contributions: pl.DataFrame, *, title: str) -> bytes:
    """Horizontal bars of the 99% ES and VaR contributions with 2-SE error bars.

    Segments first, then the top loans; the segment bars add up to the portfolio figures.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = contributions.with_columns(
        pl.when(pl.col("kind") == "segment")
        .then(pl.col("segment"))
        .otherwise(pl.format("loan {} ({})", pl.col("loan_id"), pl.col("segment")))
        .alias("label")
    )
    labels = rows["label"].to_list()
    y = np.arange(len(labels))
    fig, ax = plt.subplots(figsize=(7.5, 0.32 * len(labels) + 1.4), dpi=90)
    for offset, (column, colour, name) in zip(
        (-0.2, 0.2),
        (
            ("es_contribution", "tab:red", "ES 99%"),
            ("var_contribution", "tab:blue", "VaR 99%"),
        ),
        strict=True,
    ):
        ax.barh(
            y + offset,
            rows[column].to_numpy(),
            height=0.38,
            xerr=2.0 * rows["se_" + column].to_numpy(),
            color=colour,
            alpha=0.8,
            label=name,
            error_kw={"lw": 0.8},
        )
    ax.set_yticks(y, labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("contribution (Euler allocation), ±2 SE")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def _summary_row(
    outcome: ScenarioOutcome,
    scenario: Mapping[str, Any],
    *,
    book: Any,
    valuation_date: str,
    settings: SimulationSettings,
    input_versions: Mapping[str, int | None],
    dagster_run_id: str,
) -> dict[str, Any]:
    from pipeline.domain import loan_loss

    summary, bounds = outcome.summary, settings.bounds()
    return {
        "valuation_date": valuation_date,
        "scenario": scenario["scenario"],
        "pd_multiplier": scenario["pd_multiplier"],
        "asset_correlation": scenario["asset_correlation"],
        **{k: float(v) for k, v in summary.items() if k != "n_sims"},
        "n_sims": int(summary["n_sims"]),
        "n_sims_rounds": outcome.rounds,
        "auto_n_sims": settings.auto_n_sims,
        "max_n_sims": settings.max_n_sims,
        **{f"{store.BOUND_PREFIX}{f}": float(bounds[f]) for f in FIGURES},
        "analytic_expected_loss": float(
            loan_loss.analytic_expected_loss(book, scenario["pd_multiplier"])
        ),
        "n_loans": len(book.pd),
        "total_exposure": float(np.sum(book.ead * book.lgd)),
        "seed": settings.seed,
        "loan_book_version": input_versions["loan_book"],
        "scenario_version": input_versions["loan_scenarios"],
        "dagster_run_id": dagster_run_id,
    }


def simulate_valuation_date(
    loans: pl.DataFrame,
    scenarios: pl.DataFrame,
    *,
    valuation_date: str,
    settings: SimulationSettings,
    input_versions: dict[str, int | None],
    compute: ComputeResource,
    lake: LakeResource,
    tracking: TrackingResource,
    dagster_run_id: str,
    pipes_context: Any = None,
) -> SimulatedDate:
    """Simulate every scenario, store samples, contributions and summaries, log to MLflow.

    The samples file is written first, then the contributions, and the summary (one Delta
    commit naming the samples) last, so the summary is the commit point of the date: its
    ``dagster_run_id`` names the run whose contributions rows belong to it.

    Parameters
    ----------
    input_versions
        Delta versions of ``loan_book`` and ``loan_scenarios`` the inputs were read at,
        recorded on every summary and contribution row.
    """
    from pipeline.domain import loan_loss, plots

    book = loan_loss.loan_arrays(loans.select("loan_id", "ead", "pd", "lgd"))
    segments = loans["segment"].to_list() if "segment" in loans.columns else ["all"] * loans.height
    rows, samples, pictures, charts, tables = [], {}, {}, {}, []
    for scenario in scenarios.sort("scenario").iter_rows(named=True):
        name = scenario["scenario"]
        outcome = simulate_one_scenario(
            compute,
            book,
            segments,
            pd_multiplier=scenario["pd_multiplier"],
            rho=scenario["asset_correlation"],
            settings=settings,
            pipes_context=pipes_context,
        )
        samples[name] = outcome.losses
        pictures[name] = plots.loss_histogram_png(
            outcome.losses, outcome.summary, title=f"{valuation_date} {name}"
        )
        charts[name] = contribution_chart_png(
            outcome.contributions, title=f"{valuation_date} {name}: 99% ES and VaR contributions"
        )
        rows.append(
            _summary_row(
                outcome,
                scenario,
                book=book,
                valuation_date=valuation_date,
                settings=settings,
                input_versions=input_versions,
                dagster_run_id=dagster_run_id,
            )
        )
        tables.append(
            outcome.contributions.with_columns(
                pl.lit(valuation_date).alias("valuation_date"),
                pl.lit(name).alias("scenario"),
                pl.lit(outcome.summary["es_99"]).alias("es_99"),
                pl.lit(outcome.summary["var_99"]).alias("var_99"),
                pl.lit(int(outcome.summary["n_sims"])).alias("n_sims"),
            )
        )
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **samples)
    npz_uri = lake.write_bytes(
        store.samples_uri(lake, valuation_date, dagster_run_id), buffer.getvalue()
    )
    contributions = pl.concat(tables)
    run = _log_to_mlflow(
        tracking,
        rows,
        contributions,
        pictures,
        charts,
        valuation_date=valuation_date,
        settings=settings,
        input_versions=input_versions,
        dagster_run_id=dagster_run_id,
        n_loans=len(book.pd),
    )
    lineage = (
        pl.lit(settings.seed).alias("seed"),
        pl.lit(input_versions["loan_book"]).alias("loan_book_version"),
        pl.lit(input_versions["loan_scenarios"]).alias("scenario_version"),
        pl.lit(dt.datetime.now(dt.UTC).replace(tzinfo=None)).alias("computed_at"),
    )
    audit = {
        "dagster_run_id": dagster_run_id,
        "mlflow_run_id": run.run_id,
        "inputs": {f"curated/{table}": v for table, v in input_versions.items()},
    }
    contributions = with_audit(contributions.with_columns(*lineage), **audit)
    contributions_version = lake.overwrite_partition(
        "gold", store.CONTRIBUTIONS_TABLE, contributions, {"valuation_date": valuation_date}
    )
    summary_table = with_audit(
        pl.DataFrame(rows).with_columns(
            pl.lit(npz_uri).alias("samples_uri"),
            pl.lit(dt.datetime.now(dt.UTC).replace(tzinfo=None)).alias("computed_at"),
        ),
        **audit,
    )
    version = lake.overwrite_partition(
        "gold", store.SUMMARY_TABLE, summary_table, {"valuation_date": valuation_date}
    )
    return SimulatedDate(
        summary=summary_table,
        contributions=contributions,
        delta_version=version,
        contributions_version=contributions_version,
        samples_uri=npz_uri,
        mlflow_run_url=tracking.run_url(run.experiment_id, run.run_id),
        histograms=pictures,
        contribution_charts=charts,
    )


def _log_to_mlflow(
    tracking: TrackingResource,
    rows: list[dict[str, Any]],
    contributions: pl.DataFrame,
    pictures: dict[str, bytes],
    charts: dict[str, bytes],
    *,
    valuation_date: str,
    settings: SimulationSettings,
    input_versions: Mapping[str, int | None],
    dagster_run_id: str,
    n_loans: int,
) -> Any:
    """One MLflow run per date: settings, every figure with its SE, rounds, contributions."""
    params = dataclasses.asdict(settings)
    params.pop("max_relative_se")
    segments = contributions.filter(pl.col("kind") == "segment")
    csv = io.BytesIO()
    contributions.write_csv(csv)
    with tracking.start_run(
        experiment=store.EXPERIMENT,
        run_name=f"loan_loss_{valuation_date}",
        dagster_run_id=dagster_run_id,
        asset_key=keys.LOAN_LOSS_DISTRIBUTION.to_user_string(),
        partition_key=valuation_date,
    ) as run:
        run.log_params(
            {
                **params,
                **{f"max_relative_se.{f}": v for f, v in settings.bounds().items()},
                "loan_book_version": input_versions["loan_book"],
                "scenario_version": input_versions["loan_scenarios"],
                "n_loans": n_loans,
            }
        )
        run.log_metrics(
            {
                **{
                    f"{row['scenario']}.{k}": row[k]
                    for row in rows
                    for k in (*SUMMARY_COLUMNS, *SE_COLUMNS, "n_sims", "n_sims_rounds")
                },
                **{
                    f"{r['scenario']}.{column}.{r['segment']}": r[column]
                    for r in segments.iter_rows(named=True)
                    for column in ("es_contribution", "var_contribution")
                },
            }
        )
        run.log_files(
            {f"histogram_{name}.png": png for name, png in pictures.items()},
            artifact_path="histograms",
        )
        run.log_files(
            {
                **{f"contributions_{name}.png": png for name, png in charts.items()},
                "contributions.csv": csv.getvalue(),
            },
            artifact_path="contributions",
        )
    return run
