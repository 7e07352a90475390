"""Resident memory of ``pipeline dev`` (what ``make dev`` runs) once both UIs are idle.

Run ``python -m benchmarks.dev_idle`` (20 s idle) or ``--quick`` (5 s idle, same target).

Starts ``pipeline dev`` on two free loopback ports against a fresh ``PIPELINE_HOME`` in
``.pipeline/tmp/`` of the repository (removed afterwards), waits until the Dagster UI
(``/server_info``) and the MLflow UI (``/health``) both answer HTTP 200, lets them idle,
then reads ``/proc`` for every process descended from ``pipeline dev`` (the command
itself, the MLflow UI server, one process since :mod:`pipeline.mlflow_ui`, ``dagster
dev``, its webserver, daemon and code server) five times a second apart, and judges the
largest sum.

Target (PASS/FAIL; the exit status is 1 when it fails): the memory the process tree
holds, its summed proportional set size (PSS: each shared page split between the
processes that map it), below 1 GB (10^9 bytes). The summed RSS is printed and recorded
beside it but not judged: it counts every shared page (the interpreter, libpython,
numpy's and grpc's native libraries every process maps) once per process, so it
overstates what the machine spends by a few hundred MB. Sensors keep ticking while the
UIs idle, as they do on a laptop. The per-process breakdown is printed and written
with the results to ``benchmarks/results/dev_idle.json``.
"""

import argparse
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results" / "dev_idle.json"
SCRATCH = REPO / ".pipeline" / "tmp"
TARGET_BYTES = 1_000_000_000
IDLE_S = 20.0
QUICK_IDLE_S = 5.0
SAMPLES = 5
START_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 60.0
MB = 1_000_000


def free_port() -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http_ok(url: str) -> bool:
    """Whether ``url`` answers 200 within 5 s."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 (loopback URL)
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


def _stat_fields(pid: int) -> list[str]:
    # /proc/<pid>/stat: "pid (comm) state ppid pgrp session ..."; comm may hold spaces
    return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()


def descendants(root: int) -> list[int]:
    """``root`` and every live process below it, by parent pid (Linux ``/proc``)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = _stat_fields(int(entry.name))
        except (OSError, IndexError):
            continue
        if fields[0] != "Z":
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return sorted(found)


def _kib(text: str, key: str) -> int:
    for line in text.splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def process_memory(pid: int) -> dict | None:
    """RSS and PSS in bytes and the command line of ``pid``; None once it has exited."""
    proc = Path("/proc") / str(pid)
    try:
        status = (proc / "status").read_text()
        rollup = (proc / "smaps_rollup").read_text()
        cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
        ppid = int(_stat_fields(pid)[1])
    except (OSError, IndexError, ValueError):
        return None
    return {
        "pid": pid,
        "ppid": ppid,
        "rss_bytes": _kib(status, "VmRSS"),
        "pss_bytes": _kib(rollup, "Pss"),
        "command": cmdline,
    }


def sample(root: int) -> list[dict]:
    """Memory of every process in the tree of ``root`` right now."""
    return [m for pid in descendants(root) if (m := process_memory(pid)) is not None]


def short(command: str, width: int = 110) -> str:
    """``command`` with the repository and venv prefixes dropped, cut to ``width``."""
    for prefix in (str(Path(sys.executable).parent) + "/", str(REPO) + "/"):
        command = command.replace(prefix, "")
    return command if len(command) <= width else command[: width - 1] + "…"


def environment(home: Path) -> dict[str, str]:
    """Environment of ``pipeline dev`` on ``home``: nothing inherited from a user's setup."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PIPELINE_", "DAGSTER_", "MLFLOW_", "LAKE_", "LANDING_"))
    }
    env.update(PIPELINE_HOME=str(home), DAGSTER_HOME=str(home / "dagster"), PYTHONUNBUFFERED="1")
    return env


def wait_until(condition, *, timeout: float, what: str, proc: subprocess.Popen) -> float:
    """Poll ``condition`` every second; seconds it took. Fails if ``proc`` exits or on timeout."""
    started = time.monotonic()
    while not condition():
        if proc.poll() is not None:
            raise SystemExit(f"`pipeline dev` exited with {proc.returncode} before {what}")
        if time.monotonic() - started > timeout:
            raise SystemExit(f"{what} did not happen within {timeout:.0f} s")
        time.sleep(1.0)
    return time.monotonic() - started


def stop(proc: subprocess.Popen, tree: list[int]) -> None:
    """SIGTERM ``pipeline dev`` (it stops both UIs), then SIGKILL whatever is left of ``tree``."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pass
    for pid in tree:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=10)


def measure(home: Path, idle_s: float, log: Path) -> dict:
    """Start ``pipeline dev`` on ``home``, let it idle, return the memory samples."""
    dagster_port, mlflow_port = free_port(), free_port()
    pipeline = Path(sys.executable).with_name("pipeline")
    cmd = [str(pipeline), "dev", "--dagster-port", str(dagster_port)]
    cmd += ["--mlflow-port", str(mlflow_port)]
    tree: list[int] = []
    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd,
            cwd=REPO,
            env=environment(home),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        started_s = wait_until(
            lambda: (
                http_ok(f"http://127.0.0.1:{dagster_port}/server_info")
                and http_ok(f"http://127.0.0.1:{mlflow_port}/health")
            ),
            timeout=START_TIMEOUT_S,
            what="both UIs answering",
            proc=proc,
        )
        print(f"both UIs answer after {started_s:.0f} s; idling {idle_s:.0f} s", flush=True)
        time.sleep(idle_s)
        samples = []
        for _ in range(SAMPLES):
            samples.append(sample(proc.pid))
            tree = sorted({m["pid"] for s in samples for m in s} | set(tree))
            time.sleep(1.0)
        if proc.poll() is not None:
            raise SystemExit(f"`pipeline dev` exited with {proc.returncode} while idle")
    finally:
        tree = sorted(set(tree) | set(descendants(proc.pid) if proc.poll() is None else []))
        stop(proc, tree)
    return {"startup_seconds": started_s, "samples": samples}


def main(argv: list[str] | None = None) -> int:
    """Measure, print the breakdown, write the results; 1 when the target is missed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"idle {QUICK_IDLE_S:.0f} s")
    parser.add_argument("--output", type=Path, default=RESULTS, help="JSON results path")
    args = parser.parse_args(argv)
    idle_s = QUICK_IDLE_S if args.quick else IDLE_S
    load_before = os.getloadavg()
    SCRATCH.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="dev_idle_", dir=SCRATCH) as tmp:
        run = measure(Path(tmp) / "home", idle_s, Path(tmp) / "pipeline_dev.log")
    try:
        SCRATCH.rmdir()  # only when nothing else lives there
    except OSError:
        pass

    totals = [sum(m["rss_bytes"] for m in s) for s in run["samples"]]
    pss_totals = [sum(m["pss_bytes"] for m in s) for s in run["samples"]]
    worst = run["samples"][pss_totals.index(max(pss_totals))]
    total_rss = max(totals)
    total_pss = max(pss_totals)
    print(f"{'pid':>8} {'ppid':>8} {'RSS MB':>8} {'PSS MB':>8}  command")
    for m in sorted(worst, key=lambda m: -m["rss_bytes"]):
        print(
            f"{m['pid']:>8} {m['ppid']:>8} {m['rss_bytes'] / MB:>8.0f} "
            f"{m['pss_bytes'] / MB:>8.0f}  {short(m['command'])}"
        )
    print(
        f"total of {len(worst)} processes: RSS {total_rss / MB:,.0f} MB, PSS "
        f"{total_pss / MB:,.0f} MB (largest of {len(totals)} samples; RSS sums "
        + ", ".join(f"{t / MB:,.0f}" for t in totals)
        + " MB)"
    )
    passed = total_pss < TARGET_BYTES
    target = f"< {TARGET_BYTES / MB:,.0f} MB"
    print(f"{'PASS' if passed else 'FAIL'} idle_pss: {total_pss / MB:,.0f} MB (target {target})")
    print(f"(not judged) idle_rss: {total_rss / MB:,.0f} MB, shared pages counted per process")

    result = {
        "benchmark": "dev_idle",
        "quick": args.quick,
        "idle_seconds": idle_s,
        "startup_seconds": run["startup_seconds"],
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "load_average_start": load_before,
        "load_average_end": os.getloadavg(),
        "total_rss_bytes": total_rss,
        "total_pss_bytes": total_pss,
        "rss_sums_bytes": totals,
        "pss_sums_bytes": pss_totals,
        "processes": [{**m, "command": short(m["command"], 400)} for m in worst],
        "targets": {"idle_pss_bytes": {"value": total_pss, "target": target, "passed": passed}},
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2))
    print(f"results written to {args.output}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
