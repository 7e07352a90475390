"""The ``pipeline`` command: seed demo drops, run the demo, start the UIs."""

import argparse
import datetime
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from pipeline.settings import (
    PARTITIONS_START_FILE,
    Settings,
    ensure_dagster_home,
    get_settings,
    record_partitions_start,
)


def seed_landing(
    settings: Settings, *, force: bool = False, today: datetime.date | None = None
) -> int:
    """Write the seeded demo drops under the landing folder; return files written.

    The drops are dated relative to ``today`` (default: today in UTC), see
    :func:`pipeline.domain.demo_data.demo_calendar`. The first day of their
    earliest month is recorded as the home's partitions start, so the Dagster UI
    shows the demo's partitions rather than a year of empty days.
    """
    from pipeline.domain.demo_data import demo_calendar, utc_today, write_demo_landing

    marker = settings.landing_dir / "_truth" / "claims_truth.json"
    if marker.exists() and not force:
        print(f"landing files already present under {settings.landing_dir} (use --force)")
        return 0
    today = today or utc_today()
    files = write_demo_landing(settings.landing_dir, today=today)
    recorded = record_partitions_start(settings.home, demo_calendar(today).partitions_start)
    print(f"wrote {len(files)} landing files under {settings.landing_dir}")
    print(f"partitions start {recorded} (recorded in {settings.home / PARTITIONS_START_FILE})")
    return len(files)


def demo_pii_salt(home: Path) -> str:
    """The local tokenisation salt: random, made once per ``PIPELINE_HOME`` (mode 0600).

    ``pipeline demo`` and ``pipeline dev`` (the embedded, one-machine set-up) use it when
    ``PIPELINE_PII_SALT`` is unset, so tokens of the demo and of later sensor runs in
    ``make dev`` agree; everywhere else an unset salt fails the PII scan naming the variable.
    """
    path = home / "pii_salt"
    if not path.exists():
        home.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600)
        path.write_text(secrets.token_hex(32))
    return path.read_text().strip()


def use_local_pii_salt(settings: Settings) -> None:
    """Export the home's local salt as ``PIPELINE_PII_SALT`` unless one is set."""
    from pipeline.resources.pii import SALT_VARIABLE

    if not os.environ.get(SALT_VARIABLE):
        os.environ[SALT_VARIABLE] = demo_pii_salt(settings.home)


def demo(settings: Settings) -> None:
    """Seed the landing zone and materialise every asset on embedded defaults."""
    os.environ.setdefault("DAGSTER_HOME", str(settings.dagster_home))
    ensure_dagster_home(settings)
    use_local_pii_salt(settings)
    seed_landing(settings)
    # imported after seeding: pipeline.partitions reads the start seeding recorded
    from pipeline.demo import run_demo

    # the demo prints a summary; MLflow's INFO notices would bury it
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")

    started = time.perf_counter()
    summary = run_demo(settings)
    print(f"\ndemo finished in {time.perf_counter() - started:.0f} s")
    for line in summary:
        print(f"  {line}")
    print(
        f"\nresults: Delta tables under {settings.lake_uri}\n"
        f"         MLflow store {settings.mlflow_tracking_uri}\n"
        f"open the UIs with `make dev`, then http://127.0.0.1:3000 (Dagster) and "
        f"{settings.mlflow_ui_url} (MLflow)"
    )


def dev(settings: Settings, *, dagster_port: int, mlflow_port: int) -> int:
    """Run ``dagster dev`` and the MLflow UI on the same embedded stores.

    Each UI runs in its own session with default signal handling, so a terminal
    Ctrl-C or a ``SIGTERM`` to this process (a service manager, a test) reaches
    each exactly once, as ``SIGINT``: ``dagster dev`` then stops its webserver,
    daemon and code server cleanly. Whatever is still alive 10 s later gets
    ``SIGTERM`` and then ``SIGKILL`` with its whole process group (MLflow's job
    consumers ignore ``SIGINT``), so no server outlives the command.
    """
    os.environ.setdefault("DAGSTER_HOME", str(settings.dagster_home))
    ensure_dagster_home(settings)
    use_local_pii_salt(settings)  # sensor-launched claims runs scan for PII
    os.environ["MLFLOW_UI_URL"] = f"http://127.0.0.1:{mlflow_port}"
    mlflow_cmd, dagster_cmd = ui_commands(
        settings, dagster_port=dagster_port, mlflow_port=mlflow_port
    )

    def default_signals() -> None:  # runs in the child between fork and exec
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous_term = signal.signal(signal.SIGTERM, stop)
    procs: list[subprocess.Popen] = []
    try:
        for cmd in (mlflow_cmd, dagster_cmd):
            procs.append(
                subprocess.Popen(cmd, start_new_session=True, preexec_fn=default_signals)  # noqa: S603
            )
        print(
            f"Dagster UI: http://127.0.0.1:{dagster_port}\n"
            f"MLflow UI:  http://127.0.0.1:{mlflow_port}\n(Ctrl-C stops both)",
            flush=True,
        )
        while all(p.poll() is None for p in procs):
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # finish the shutdown once started

        def running(proc: subprocess.Popen) -> bool:
            proc.poll()  # reap the leader, so only live members keep its group alive
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                return False
            return True

        def wait_groups(seconds: float) -> None:
            deadline = time.monotonic() + seconds
            while any(running(p) for p in procs) and time.monotonic() < deadline:
                time.sleep(0.2)

        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)  # dagster dev stops its services in order
        wait_groups(10)
        # MLflow's job consumers and dagster's code servers may outlive their parent
        for signum, grace in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
            for proc in [p for p in procs if running(p)]:
                try:
                    os.killpg(proc.pid, signum)
                except ProcessLookupError:
                    pass
            wait_groups(grace)
        for proc in procs:
            proc.wait()
        signal.signal(signal.SIGTERM, previous_term)
    return max((p.returncode or 0) for p in procs) if procs else 1


def ui_commands(
    settings: Settings, *, dagster_port: int, mlflow_port: int
) -> tuple[list[str], list[str]]:
    """Commands of the MLflow UI and ``dagster dev`` on the embedded stores of ``settings``.

    Shared by ``pipeline dev`` and the README screenshot script, so both start the
    servers the same way. The MLflow command runs through ``env`` with
    ``MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false``: MLflow 3 otherwise starts job
    consumer processes (about 2 GB resident) for server-side jobs this platform never
    submits. Setting it on the command keeps it out of the caller's environment and
    holds for any caller, whatever environment it passes to the child. It also lets
    :mod:`pipeline.mlflow_ui` run the server in the launched process itself, without
    ``mlflow ui``'s idle parent (about 300 MB).
    """
    bin_dir = os.path.dirname(sys.executable)
    repo_workspace = os.path.join(os.path.dirname(os.path.dirname(__file__)), "workspace.yaml")
    code_location = (
        ["-w", repo_workspace]
        if os.path.exists(repo_workspace)
        else ["-m", "pipeline.definitions"]  # installed as a package, no checkout
    )
    mlflow_cmd = [
        shutil.which("env") or "/usr/bin/env",
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false",
        sys.executable,
        "-m",
        "pipeline.mlflow_ui",  # `mlflow ui`, with the server in one process
        "--backend-store-uri",
        settings.mlflow_tracking_uri,
        "--default-artifact-root",
        settings.mlflow_artifact_root,
        "--host",
        "127.0.0.1",
        "--port",
        str(mlflow_port),
        "--workers",  # one user on a laptop: one worker starts, and stops, in seconds
        "1",
    ]
    dagster_cmd = [
        os.path.join(bin_dir, "dagster"),
        "dev",
        *code_location,
        "-h",
        "127.0.0.1",
        "-p",
        str(dagster_port),
    ]
    return mlflow_cmd, dagster_cmd


def maintenance(settings: Settings, *, retention_hours: int | None = None) -> list[str]:
    """Maintain every table of the lake of ``settings`` (:mod:`pipeline.maintenance`).

    Prints and returns one line per table.
    """
    from pipeline.maintenance import maintain_lake
    from pipeline.resources.lake import LakeResource

    hours = settings.vacuum_retention_hours if retention_hours is None else retention_hours
    lake = LakeResource(root_uri=settings.lake_uri, service_timeout_s=settings.service_timeout_s)
    lines = [report.line() for report in maintain_lake(lake, retention_hours=hours)]
    for line in lines or [f"no Delta table under {settings.lake_uri}"]:
        print(line)
    return lines


def lineage(settings: Settings, table: str, key: Sequence[str]) -> list[str]:
    """Print and return the lineage of a gold row (:mod:`pipeline.lineage`)."""
    from pipeline.lineage import parse_key, trace
    from pipeline.resources import build_resources

    resources = build_resources(settings)
    lines = trace(
        table,
        parse_key(list(key)),
        lake=resources["lake"],
        landing=resources["landing"],
        tracking=resources["tracking"],
    )
    for line in lines:
        print(line)
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``pipeline`` console script."""
    parser = argparse.ArgumentParser(prog="pipeline", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    seed = sub.add_parser("seed-landing", help="write seeded demo drops into the landing zone")
    seed.add_argument("--force", action="store_true", help="rewrite existing demo files")
    sub.add_parser("demo", help="seed and materialise the whole graph on embedded defaults")
    dev_parser = sub.add_parser("dev", help="start dagster dev and the MLflow UI")
    dev_parser.add_argument("--dagster-port", type=int, default=3000)
    dev_parser.add_argument("--mlflow-port", type=int, default=5000)
    sub.add_parser("reset", help="delete PIPELINE_HOME (lake, landing, MLflow, Dagster state)")
    maint = sub.add_parser(
        "maintenance",
        help="remove invisible batches and orphaned files of killed writes, vacuum and "
        "checkpoint every lake table",
    )
    maint.add_argument(
        "--retention-hours",
        type=int,
        default=None,
        help="keep every version of the last N hours readable (default "
        "PIPELINE_VACUUM_RETENTION_HOURS, 168)",
    )
    deploy_parser = sub.add_parser(
        "deploy", help="build the wheel and upload it to the Databricks workspace"
    )
    deploy_parser.add_argument(
        "--root",
        help="wheel folder, dbfs:/... or /Volumes/<catalog>/<schema>/<volume>/... "
        "(default PIPELINE_WHEEL_ROOT)",
    )
    deploy_parser.add_argument("--build-only", action="store_true", help="build, do not upload")
    trace = sub.add_parser(
        "lineage",
        help="trace a gold row to its landing files (name, sha256), code, runs and models",
    )
    trace.add_argument("table", help="gold table, e.g. gold/credibility_table")
    trace.add_argument(
        "key", nargs="+", help="the row's key as column=value, e.g. month=2026-09 district=D001"
    )
    graph = sub.add_parser("graph", help="print the asset graph as Mermaid")
    graph.add_argument("--update-readme", metavar="PATH", help="rewrite the graph block of PATH")
    args = parser.parse_args(argv)
    settings = get_settings()
    if args.command == "seed-landing":
        seed_landing(settings, force=args.force)
    elif args.command == "demo":
        demo(settings)
    elif args.command == "dev":
        return dev(settings, dagster_port=args.dagster_port, mlflow_port=args.mlflow_port)
    elif args.command == "graph":
        from pathlib import Path

        from pipeline.definitions import defs
        from pipeline.graph_doc import asset_graph_mermaid, readme_with_graph

        mermaid = asset_graph_mermaid(defs)
        if args.update_readme:
            path = Path(args.update_readme)
            path.write_text(readme_with_graph(path.read_text(), mermaid))
        else:
            print(mermaid)
    elif args.command == "deploy":
        import json

        from pipeline.deploy import deploy

        print(json.dumps(deploy(root=args.root, upload=not args.build_only), indent=2))
    elif args.command == "lineage":
        from pipeline.lineage import LineageError

        try:
            lineage(settings, args.table, args.key)
        except LineageError as exc:
            print(f"pipeline lineage: {exc}", file=sys.stderr)
            return 1
    elif args.command == "maintenance":
        maintenance(settings, retention_hours=args.retention_hours)
    elif args.command == "reset":
        shutil.rmtree(settings.home, ignore_errors=True)
        print(f"removed {settings.home}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
