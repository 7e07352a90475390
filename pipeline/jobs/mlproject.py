"""Entry points of the repository's ``MLproject``: the heavy jobs run by ``mlflow run``.

``mlflow run . -e train_fx -P symbol=EURUSD --env-manager local`` runs
``python -m pipeline.jobs.mlproject train_fx --symbol EURUSD ...``; each sub-command calls
the same plain function the asset calls (:func:`pipeline.jobs.fx_training.train_challenger`,
:func:`pipeline.jobs.fx_scoring.score_symbol_days`,
:func:`pipeline.jobs.loan_loss_simulation.simulate_valuation_date`,
:func:`pipeline.jobs.credibility_fit.fit_month`) on the lake and tracking store of the
settings, so a run outside Dagster trains, registers and aliases exactly as a
materialisation does.

Inside ``mlflow run`` MLflow opens a run for the entry point (its ``-P`` parameters are that
run's parameters) and hands it over in ``MLFLOW_RUN_ID`` and ``MLFLOW_TRACKING_URI``. These
are read, never written: the settings take the tracking URI from the environment as always,
and the tracking resource is given the project run as ``parent_run_id``, so every run the job
opens is nested under it; the project run gets the job's result (``result.json``) and the
ids of its nested runs (tag ``pipeline.nested_run_ids``). Outside ``mlflow run`` the
sub-commands run alone, without a parent.

There is no Dagster run here: the ``dagster_run_id`` recorded on rows and run tags is
``mlproject-<MLflow run id>``, and the asset checks' history is not consulted; the gate
rules that are recomputed on stored inputs (claims contracts, loan inputs) are applied.
"""

import argparse
import dataclasses
import datetime as dt
import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from pipeline.audit import input_versions
from pipeline.domain.errors import DomainError
from pipeline.jobs import credibility_fit, fx_scoring, fx_spark, fx_training, loan_loss_simulation
from pipeline.resources import build_resources
from pipeline.resources.tracking import TrackingResource
from pipeline.settings import Settings, load_settings
from pipeline.stores import credibility as credibility_store
from pipeline.stores import fx as fx_store
from pipeline.stores import loan_loss as loan_store

RUN_ID_VARIABLE = "MLFLOW_RUN_ID"
"""Set by ``mlflow run`` for the entry point: the run the job logs under."""
NESTED_RUNS_TAG = "pipeline.nested_run_ids"
ENTRY_POINT_TAG = "pipeline.entry_point"
RESULT_ARTIFACT = "result.json"


class EntryPointError(DomainError):
    """An entry point's parameters or stored inputs do not allow the job to run."""


@dataclasses.dataclass(frozen=True)
class Job:
    """What one entry point needs: settings, the resources built from them, its run ids."""

    settings: Settings
    resources: dict[str, Any]
    parent_run_id: str | None

    @property
    def tracking(self) -> TrackingResource:
        """The tracking resource, nesting every run it opens under the project run."""
        return self.resources["tracking"]

    @property
    def dagster_run_id(self) -> str:
        """What stands for the Dagster run id on rows and tags (there is no Dagster run)."""
        return f"mlproject-{self.parent_run_id or 'standalone'}"


def job_of(
    environ: Mapping[str, str], *, lake: str = "", branch: str = "", entry_point: str
) -> Job:
    """Settings and resources for one entry point, from ``environ`` and its parameters.

    Parameters
    ----------
    environ
        The process environment (read only): ``PIPELINE_HOME``, ``MLFLOW_TRACKING_URI``,
        ``MLFLOW_RUN_ID`` and the other settings variables.
    lake
        The lake: a path relative to ``PIPELINE_HOME``, an absolute path or a URI; empty
        means the settings' ``LAKE_URI``.
    branch
        The git branch naming the experiments on Databricks (``/Shared/pipeline/<branch>``);
        empty means the settings' (CI variables, else git). A project uploaded to a cluster
        by ``mlflow run --backend databricks`` has no usable git checkout, so pass it there.
    entry_point
        Name of the entry point, tagged on the project run.
    """
    env = dict(environ)
    if branch:
        env["PIPELINE_GIT_BRANCH"] = branch
    if lake:
        home = load_settings(env).home
        env["LAKE_URI"] = lake if "://" in lake else str(home / lake)
    settings = load_settings(env)
    resources = build_resources(settings)
    parent = env.get(RUN_ID_VARIABLE) or None
    if parent is not None:
        tracking = resources["tracking"]
        fields = {**fx_spark.tracking_fields(tracking), "parent_run_id": parent}
        resources["tracking"] = type(tracking)(**fields)
        resources["tracking"].client().set_tag(parent, ENTRY_POINT_TAG, entry_point)
    return Job(settings=settings, resources=resources, parent_run_id=parent)


def _symbol(raw: str) -> str:
    """``EUR/USD`` or ``eurusd`` as the partition key ``EURUSD`` (validated by the registry)."""
    return raw.strip().replace("/", "").upper()


def _date(raw: str) -> str:
    try:
        return dt.date.fromisoformat(raw.strip()).isoformat()
    except ValueError as exc:
        raise EntryPointError(f"date {raw!r} is not an ISO date YYYY-MM-DD") from exc


def _refuse(failures: Sequence[str], what: str) -> None:
    if failures:
        raise EntryPointError(f"refusing to compute {what}: " + "; ".join(failures))


def train_fx(job: Job, args: argparse.Namespace) -> dict[str, Any]:
    """Train, evaluate, register and alias one symbol's challenger (as ``fx_challenger_model``)."""
    symbol = _symbol(args.symbol)
    job.tracking.model_name(symbol)  # validates the symbol before it reaches the lake
    lake = job.resources["lake"]
    inputs = input_versions(lake, "curated/fx_spreads", "curated/fx_incidents")
    params = fx_training.TrainingParams(
        holdout_days=args.holdout_days,
        n_estimators=args.n_estimators,
        random_state=args.random_state,
        contamination=args.contamination,
        bootstrap_resamples=args.bootstrap_resamples,
    )
    evaluation = fx_training.train_challenger(
        fx_store.read_symbol_ticks(lake, symbol),
        fx_store.read_incidents(lake, symbol),
        symbol=symbol,
        params=params,
        tracking=job.tracking,
        dagster_run_id=job.dagster_run_id,
    )
    fx_training.store_evaluations(lake, [evaluation], inputs=inputs)
    return {"nested_run_ids": [evaluation["mlflow_run_id"]], **evaluation}


def score_fx(job: Job, args: argparse.Namespace) -> dict[str, Any]:
    """Score a symbol's days with its champion (as ``fx_anomaly_scores``)."""
    symbol = _symbol(args.symbol)
    job.tracking.model_name(symbol)
    dates = [_date(d) for d in args.dates.split(",") if d.strip()]
    if not dates:
        raise EntryPointError("score_fx: no dates given (-P dates=YYYY-MM-DD,YYYY-MM-DD)")
    version, scored = fx_scoring.score_symbol_days(
        symbol,
        dates,
        lake=job.resources["lake"],
        tracking=job.tracking,
        dagster_run_id=job.dagster_run_id,
    )
    return {
        "nested_run_ids": [],
        "symbol": symbol,
        "dates": dates,
        "model_version": version,
        "rows": scored.height,
        "anomaly_rate": float(scored["is_anomaly"].mean()) if scored.height else 0.0,
    }


def loan_loss(job: Job, args: argparse.Namespace) -> dict[str, Any]:
    """Simulate one valuation date under every scenario (as ``loan_loss_distribution``)."""
    valuation_date = _date(args.valuation_date)
    lake, compute = job.resources["lake"], job.resources["compute"]
    if compute.backend == "databricks":
        raise EntryPointError(
            "loan_loss: COMPUTE=databricks submits through Dagster Pipes, which needs a "
            "Dagster run; on a cluster run this entry point with COMPUTE=spark"
        )
    for upstream in loan_store.LOAN_INPUTS:
        _refuse(
            loan_store.input_rule_failures(lake, upstream, valuation_date),
            f"a loss distribution for {valuation_date}",
        )
    where = {"valuation_date": valuation_date}
    result = loan_loss_simulation.simulate_valuation_date(
        lake.read("curated", "loan_book", where),
        lake.read("curated", "loan_scenarios", where),
        valuation_date=valuation_date,
        settings=loan_loss_simulation.SimulationSettings(
            n_sims=args.n_sims, seed=args.seed, chunk_size=args.chunk_size
        ),
        input_versions={t: lake.version("curated", t) for t in ("loan_book", "loan_scenarios")},
        compute=compute,
        lake=lake,
        tracking=job.tracking,
        dagster_run_id=job.dagster_run_id,
    )
    summary = result.summary
    return {
        "nested_run_ids": sorted(set(summary["mlflow_run_id"].to_list())),
        "valuation_date": valuation_date,
        "samples_uri": result.samples_uri,
        "summary": summary.select(
            "scenario", *loan_loss_simulation.SUMMARY_COLUMNS, "n_sims"
        ).to_dicts(),
    }


def credibility(job: Job, args: argparse.Namespace) -> dict[str, Any]:
    """Fit, store and log one month's posterior (as ``credibility_posterior``)."""
    month = args.month.strip()
    _date(f"{month}-01")
    lake = job.resources["lake"]
    _refuse(credibility_store.claims_rule_failures(lake, month), f"a posterior for {month}")
    fitted = credibility_fit.fit_month(
        credibility_store.read_claims_window(lake, month),
        month=month,
        settings=credibility_fit.SamplerSettings(
            draws=args.draws,
            tune=args.tune,
            chains=args.chains,
            random_seed=args.random_seed,
            sampler=args.sampler,
        ),
        lake=lake,
        tracking=job.tracking,
        dagster_run_id=job.dagster_run_id,
    )
    diagnostics = fitted.diagnostics
    return {
        "nested_run_ids": [diagnostics["mlflow_run_id"]],
        "month": month,
        "netcdf_uri": fitted.netcdf_uri,
        "gate_failures": diagnostics["gate_failures"],
    }


ENTRY_POINTS: dict[str, Callable[[Job, argparse.Namespace], dict[str, Any]]] = {
    "train_fx": train_fx,
    "score_fx": score_fx,
    "loan_loss": loan_loss,
    "credibility": credibility,
}
"""Sub-command name -> job; the names are the ``MLproject`` entry points."""


def parser() -> argparse.ArgumentParser:
    """The command line: one sub-command per ``MLproject`` entry point."""
    root = argparse.ArgumentParser(prog="python -m pipeline.jobs.mlproject")
    commands = root.add_subparsers(dest="entry_point", required=True)
    sub = {name: commands.add_parser(name, help=f.__doc__) for name, f in ENTRY_POINTS.items()}
    for command in sub.values():
        command.add_argument("--lake", default="", help="lake, relative to PIPELINE_HOME")
        command.add_argument("--branch", default="", help="git branch naming experiments")
    defaults = fx_training.TrainingParams()
    train = sub["train_fx"]
    train.add_argument("--symbol", required=True)
    train.add_argument("--holdout-days", type=int, default=defaults.holdout_days)
    train.add_argument("--n-estimators", type=int, default=defaults.n_estimators)
    train.add_argument("--random-state", type=int, default=defaults.random_state)
    train.add_argument("--contamination", type=float, default=defaults.contamination)
    train.add_argument("--bootstrap-resamples", type=int, default=defaults.bootstrap_resamples)
    sub["score_fx"].add_argument("--symbol", required=True)
    sub["score_fx"].add_argument("--dates", required=True, help="YYYY-MM-DD,YYYY-MM-DD,...")
    simulation = loan_loss_simulation.SimulationSettings()
    sub["loan_loss"].add_argument("--valuation-date", required=True)
    sub["loan_loss"].add_argument("--n-sims", type=int, default=simulation.n_sims)
    sub["loan_loss"].add_argument("--seed", type=int, default=simulation.seed)
    sub["loan_loss"].add_argument("--chunk-size", type=int, default=simulation.chunk_size)
    sampler = credibility_fit.SamplerSettings()
    fit = sub["credibility"]
    fit.add_argument("--month", required=True, help="YYYY-MM")
    fit.add_argument("--draws", type=int, default=sampler.draws)
    fit.add_argument("--tune", type=int, default=sampler.tune)
    fit.add_argument("--chains", type=int, default=sampler.chains)
    fit.add_argument("--random-seed", type=int, default=sampler.random_seed)
    fit.add_argument("--sampler", default=sampler.sampler, choices=("nutpie", "pymc"))
    return root


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """Run one entry point; log its result to the project run when there is one."""
    args = parser().parse_args(argv)
    job = job_of(
        os.environ if environ is None else environ,
        lake=args.lake,
        branch=args.branch,
        entry_point=args.entry_point,
    )
    result = ENTRY_POINTS[args.entry_point](job, args)
    text = json.dumps(result, default=str, indent=2, sort_keys=True)
    if job.parent_run_id is not None:
        parent = job.tracking.existing_run(job.parent_run_id)
        parent.log_files({RESULT_ARTIFACT: text.encode()})
        parent.client.set_tag(
            job.parent_run_id, NESTED_RUNS_TAG, ",".join(result["nested_run_ids"])
        )
    sys.stdout.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
