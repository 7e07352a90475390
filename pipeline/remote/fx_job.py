"""Databricks job: train or score the FX spread models of one asset run's symbols.

How it runs
-----------
:mod:`pipeline.jobs.fx_databricks` submits this file as a ``spark_python_task`` through
:meth:`pipeline.resources.compute.ComputeResource.run_databricks_job` (Dagster Pipes),
one run per asset run, with the project's wheel as the task's library
(``DATABRICKS_WHEEL``): unlike :mod:`pipeline.remote.loan_loss_job` this job needs the
platform's building blocks, MLflow and scikit-learn, which come with the wheel and its
dependencies, not with the zip bundle.

Two modes, chosen by ``extras["mode"]``, each calling the function the local path calls:

* ``train``: :func:`pipeline.jobs.fx_training.train_challenger` per symbol (fit, evaluate
  against the champion on the held-out days, MLflow run tagged with the Dagster run id,
  asset key, partition key and symbol, registration, alias ``challenger``); the evaluations
  come back as ``evaluations.json``.
* ``score``: :func:`pipeline.jobs.fx_scoring.score_days` per symbol with the model
  version the orchestrator resolved (never the moving ``champion`` alias); the scored rows
  come back as ``scores.parquet``, and the orchestrator writes them to the lake.

Inputs are each symbol's ticks (and, for training, incidents) as parquet files on DBFS.
MLflow is reached with the tracking resource's settings from the extras: the tracking and
registry URIs (``databricks`` / ``databricks-uc`` on a workspace, where the cluster
authenticates MLflow itself), Unity Catalog catalog and schema, the branch's experiment
root. No credential travels in the extras.
"""

import io
import json
import platform
import re
import sys
import time
from collections.abc import Mapping
from typing import Any

from dagster_pipes import PipesContext

from pipeline.remote.loan_loss_job import JobError, fuse_path, run_under_pipes
from pipeline.remote.loan_loss_job import _write as write_output

MODES = ("train", "score")
EVALUATIONS_FILE = "evaluations.json"
SCORES_FILE = "scores.parquet"
RESULT_KIND = "fx_models"
_SYMBOL = re.compile(r"^[A-Z0-9]{3,12}$")
_TRACKING_SETTINGS = (
    "tracking_uri",
    "registry_uri",
    "artifact_root",
    "ui_url",
    "uc_catalog",
    "uc_schema",
    "request_timeout_s",
    "experiment_root",
)


# --------------------------------------------------------------------------- wire format


def ticks_file(symbol: str) -> str:
    """Input file name of a symbol's ticks."""
    return f"ticks-{_checked_symbol(symbol)}.parquet"


def incidents_file(symbol: str) -> str:
    """Input file name of a symbol's incident-log rows."""
    return f"incidents-{_checked_symbol(symbol)}.parquet"


def _checked_symbol(symbol: Any) -> str:
    if not isinstance(symbol, str) or not _SYMBOL.fullmatch(symbol):
        raise JobError(f"symbol {symbol!r} is not a normalised partition key")
    return symbol


def encode_frame(frame: Any) -> bytes:
    """A polars frame as parquet bytes (dtypes and float64 values round-trip exactly)."""
    buffer = io.BytesIO()
    frame.write_parquet(buffer)
    return buffer.getvalue()


def decode_frame(data: bytes) -> Any:
    """The polars frame of :func:`encode_frame` bytes."""
    import polars as pl

    return pl.read_parquet(io.BytesIO(data))


def encode_evaluations(evaluations: list[dict], errors: Mapping[str, str]) -> bytes:
    """``train_challenger`` results (``evaluated_at`` as ISO text) and per-symbol errors."""
    rows = [{**e, "evaluated_at": e["evaluated_at"].isoformat()} for e in evaluations]
    return json.dumps({"evaluations": rows, "errors": dict(errors)}).encode("utf-8")


def decode_evaluations(data: bytes) -> tuple[list[dict], dict[str, str]]:
    """The results and errors of :func:`encode_evaluations` (``evaluated_at`` a datetime)."""
    import datetime as dt

    payload = json.loads(data)
    rows = [
        {**e, "evaluated_at": dt.datetime.fromisoformat(e["evaluated_at"])}
        for e in payload["evaluations"]
    ]
    return rows, dict(payload["errors"])


def tracking_settings(tracking: Any) -> dict[str, Any]:
    """The settings a job rebuilds the tracking resource from (no credential among them).

    Raises
    ------
    JobError
        When the tracking URI carries a password (it would travel in the extras).
    """
    from urllib.parse import urlsplit

    settings = {k: getattr(tracking, k) for k in _TRACKING_SETTINGS if hasattr(tracking, k)}
    for key in ("tracking_uri", "registry_uri"):
        if settings.get(key) and urlsplit(str(settings[key])).password:
            raise JobError(f"{key} carries a password; give MLflow its credentials otherwise")
    return settings


def tracking_from(settings: Mapping[str, Any]) -> Any:
    """The tracking resource of the orchestrator, rebuilt from :func:`tracking_settings`."""
    from pipeline.resources import BranchTrackingResource

    unknown = sorted(set(settings) - set(_TRACKING_SETTINGS))
    if unknown or not settings.get("tracking_uri"):
        raise JobError(
            f"extra 'tracking' needs tracking_uri and no other keys than "
            f"{list(_TRACKING_SETTINGS)}; got {sorted(settings)}"
        )
    return BranchTrackingResource(**settings)


# --------------------------------------------------------------------------- the job


def _read(path: str) -> bytes:
    with open(fuse_path(path), "rb") as f:
        return f.read()


def _input(extras: Mapping[str, Any], name: str) -> bytes:
    inputs = extras.get("inputs") or {}
    if name not in inputs:
        raise JobError(f"extras name no input {name!r}; got {sorted(inputs)}")
    return _read(str(inputs[name]))


def _output(extras: Mapping[str, Any], name: str) -> str:
    outputs = extras.get("outputs") or {}
    if name not in outputs:
        raise JobError(f"extras name no output {name!r}; got {sorted(outputs)}")
    return str(outputs[name])


def train(extras: Mapping[str, Any], *, dagster_run_id: str) -> dict[str, Any]:
    """``train_challenger`` per symbol; writes ``evaluations.json``, returns its digest.

    A symbol whose training raises a domain error (too few days, say) is reported in the
    file's ``errors`` and does not stop the others, as on Spark.
    """
    from pipeline.domain.errors import DomainError
    from pipeline.jobs import fx_training

    tracking = tracking_from(extras.get("tracking") or {})
    params = fx_training.TrainingParams(**(extras.get("params") or {}))
    evaluations, errors = [], {}
    for symbol in [_checked_symbol(s) for s in extras.get("symbols") or []]:
        try:
            evaluations.append(
                fx_training.train_challenger(
                    decode_frame(_input(extras, ticks_file(symbol))),
                    decode_frame(_input(extras, incidents_file(symbol))),
                    symbol=symbol,
                    params=params,
                    tracking=tracking,
                    dagster_run_id=dagster_run_id,
                )
            )
        except DomainError as exc:
            errors[symbol] = str(exc)
    data = encode_evaluations(evaluations, errors)
    return {EVALUATIONS_FILE: write_output(_output(extras, EVALUATIONS_FILE), data)}


def score(extras: Mapping[str, Any]) -> dict[str, Any]:
    """``score_days`` per symbol and version; writes ``scores.parquet``, returns its digest.

    Each symbol's model is loaded by the version the orchestrator resolved; the rows of
    all symbols go into one file, in request order.
    """
    import polars as pl

    from pipeline.jobs import fx_scoring

    tracking = tracking_from(extras.get("tracking") or {})
    versions, dates = extras.get("versions") or {}, extras.get("dates") or {}
    frames = []
    for symbol in [_checked_symbol(s) for s in extras.get("symbols") or []]:
        if symbol not in versions or symbol not in dates:
            raise JobError(f"extras give no model version or dates for symbol {symbol}")
        model = tracking.load_sklearn(tracking.model_name(symbol), version=str(versions[symbol]))
        ticks = decode_frame(_input(extras, ticks_file(symbol)))
        frames.append(fx_scoring.score_days(model, ticks, list(dates[symbol])))
    scored = pl.concat(frames, how="vertical") if frames else pl.DataFrame()
    return {SCORES_FILE: write_output(_output(extras, SCORES_FILE), encode_frame(scored))}


def run(pipes: PipesContext) -> dict[str, Any]:
    """Train or score as ``extras["mode"]`` says, write the output, report it.

    Returns
    -------
    dict
        The custom message sent to Dagster: ``kind``, ``mode``, ``symbols``, ``outputs``
        (per file its DBFS path, SHA-256 and size), ``seconds``, ``versions`` and
        ``pipeline_origin``, the file the platform was imported from (the installed wheel
        on a cluster), with ``python``, the interpreter that ran the job.
    """
    import numpy as np
    import sklearn

    import pipeline

    started = time.perf_counter()
    extras = pipes.extras
    mode = extras.get("mode")
    if mode not in MODES:
        raise JobError(f"extra 'mode' must be one of {MODES}, got {mode!r}")
    dagster_run_id = pipes.run_id
    if not dagster_run_id:
        raise JobError("the Pipes context names no Dagster run id")
    outputs = train(extras, dagster_run_id=dagster_run_id) if mode == "train" else score(extras)
    result = {
        "kind": RESULT_KIND,
        "mode": mode,
        "symbols": list(extras.get("symbols") or []),
        "outputs": outputs,
        "seconds": round(time.perf_counter() - started, 3),
        "versions": {
            "python": platform.python_version(),
            "numpy": np.__version__,
            "scikit-learn": sklearn.__version__,
        },
        "pipeline_origin": pipeline.__file__,
        "python": sys.executable,
    }
    pipes.log.info(
        f"fx {mode} of {len(result['symbols'])} symbol(s) in {result['seconds']} s "
        f"with the platform from {result['pipeline_origin']}"
    )
    print(json.dumps(result, sort_keys=True))  # the task output on the run page
    pipes.report_custom_message(result)
    return result


def main() -> None:
    """Entry point of the ``spark_python_task``."""
    run_under_pipes(run)


if __name__ == "__main__":
    main()
