"""MLflow's own ``mlflow ui`` command, run as one process instead of two.

``mlflow ui`` validates its options, initialises the tracking and registry stores and
then starts uvicorn as a *child* process. The parent stays alive only to forward
signals and, when job execution is on, to run MLflow's job consumers: about 300 MB
resident doing nothing, a third of what ``make dev`` idles at. This platform turns job
execution off (it never submits server-side jobs), so the parent has nothing left to
do: this launcher runs the same click command and, where MLflow would spawn uvicorn,
replaces itself with it (``os.execve``). Options, validation, store initialisation
and the uvicorn command line stay MLflow's.

The one private name used is ``mlflow.server._exec_cmd``, the spawn hook;
``pipeline_tests/test_fresh_machine.py`` pins that the server answers on its port
from the very process this launcher started, so an MLflow upgrade that moves the
hook fails the tests instead of silently bringing the second process back.
"""

import os
import sys
from collections.abc import Mapping, Sequence
from typing import NoReturn

JOB_EXECUTION_ENV = "MLFLOW_SERVER_ENABLE_JOB_EXECUTION"


def _exec_instead(
    cmd: Sequence[str], *, extra_env: Mapping[str, str] | None = None, **_: object
) -> NoReturn:
    """Replace this process with the server command MLflow built (``cmd[0]`` is a path)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(cmd[0], list(cmd), {**os.environ, **(extra_env or {})})  # noqa: S606


def main(argv: Sequence[str]) -> None:
    """Run ``mlflow ui <argv>`` with the server in this process."""
    from mlflow.environment_variables import MLFLOW_SERVER_ENABLE_JOB_EXECUTION

    if MLFLOW_SERVER_ENABLE_JOB_EXECUTION.get():
        raise SystemExit(
            f"pipeline.mlflow_ui runs the MLflow UI without job execution: set {JOB_EXECUTION_ENV}"
            "=false (job consumers need the parent process this launcher replaces)"
        )
    import mlflow.server
    from mlflow.cli import cli

    if not callable(getattr(mlflow.server, "_exec_cmd", None)):
        raise SystemExit("mlflow.server._exec_cmd is gone: pipeline.mlflow_ui needs updating")
    mlflow.server._exec_cmd = _exec_instead
    cli.main(args=["ui", *argv], prog_name="mlflow")


if __name__ == "__main__":
    main(sys.argv[1:])
