"""What a fresh Debian machine needs beyond Python and make, and what ``make dev`` starts.

``.ci/system-deps`` (the first prerequisite of ``make test``) runs here against a
folder of stand-in commands put first on ``PATH``: ``id`` says who runs it, ``java``
prints the version under test, and ``apt-get`` / ``sudo`` record their arguments and
environment instead of touching the system. Chromium and PostgreSQL are looked for
where the tests use them (``/usr/bin/chromium``, ``/usr/lib/postgresql/*/bin``), so
the expectations follow this machine for those two.
"""

import glob
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from pipeline.cli import ui_commands
from pipeline.settings import load_settings

ROOT = Path(__file__).resolve().parents[1]
SYSTEM_DEPS = ROOT / ".ci" / "system-deps"
CHROMIUM_PRESENT = Path("/usr/bin/chromium").exists()
POSTGRES_PRESENT = bool(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
INSTALL = "apt-get install -y --no-install-recommends"


def expected_missing(*, java: bool) -> list[str]:
    """Packages the script should ask for on this machine, in its order."""
    return (
        ["chromium"] * (not CHROMIUM_PRESENT)
        + ["postgresql"] * (not POSTGRES_PRESENT)
        + ["openjdk-17-jre-headless"] * java
    )


def _script(folder: Path, name: str, body: str) -> None:
    path = folder / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def run_system_deps(
    tmp_path: Path, *, uid: int, java_version: str | None, apt_exit: int = 0
) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Run the script with stand-ins; return its result and the recorded apt-get calls."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "apt-calls"
    calls.touch()
    _script(bin_dir, "id", f'[ "$1" = "-u" ] && echo {uid}\n')
    if java_version is not None:
        _script(bin_dir, "java", f"echo 'openjdk version \"{java_version}\" 2025-01-01' >&2\n")
    _script(
        bin_dir,
        "apt-get",
        f'echo "DEBIAN_FRONTEND=$DEBIAN_FRONTEND $*" >> "{calls}"\n'
        f'[ "$1" = "install" ] && exit {apt_exit}\nexit 0\n',
    )
    _script(bin_dir, "sudo", f'echo "sudo $*" >> "{calls}"\nexit 1\n')
    # only the stand-ins and what the script itself needs (bash, sed): no real java
    tools = tmp_path / "tools"
    tools.mkdir()
    for tool in ("bash", "sed"):
        (tools / tool).symlink_to(shutil.which(tool))
    proc = subprocess.run(
        [str(tools / "bash"), str(SYSTEM_DEPS)],
        env={"PATH": f"{bin_dir}:{tools}", "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return proc, calls.read_text().splitlines()


def test_non_root_stops_with_the_exact_install_command_and_installs_nothing(tmp_path):
    proc, calls = run_system_deps(tmp_path, uid=1000, java_version=None)
    missing = expected_missing(java=True)
    assert proc.returncode == 1, proc.stderr
    assert f"sudo apt-get update && sudo {INSTALL} {' '.join(missing)}" in proc.stderr
    assert calls == []


def test_a_java_older_than_17_counts_as_missing(tmp_path):
    proc, _ = run_system_deps(tmp_path, uid=1000, java_version="11.0.24")
    assert proc.returncode == 1
    assert "openjdk-17-jre-headless" in proc.stderr


def test_root_updates_once_then_installs_only_what_is_missing(tmp_path):
    proc, calls = run_system_deps(tmp_path, uid=0, java_version=None)
    missing = expected_missing(java=True)
    assert proc.returncode == 0, proc.stderr
    assert calls == [
        "DEBIAN_FRONTEND=noninteractive update -qq",
        f"DEBIAN_FRONTEND=noninteractive {INSTALL.removeprefix('apt-get ')} {' '.join(missing)}",
    ]


def test_a_failed_install_fails_the_script(tmp_path):
    proc, calls = run_system_deps(tmp_path, uid=0, java_version=None, apt_exit=100)
    assert proc.returncode == 100
    assert len(calls) == 2


def test_nothing_to_do_when_java_17_chromium_and_postgresql_are_there(tmp_path):
    proc, calls = run_system_deps(tmp_path, uid=1000, java_version="17.0.13")
    missing = expected_missing(java=False)
    if not missing:
        assert (proc.returncode, proc.stdout, proc.stderr, calls) == (0, "", "", [])
    else:
        assert proc.returncode == 1
        assert f"{INSTALL} {' '.join(missing)}\n" in proc.stderr


def test_make_test_installs_system_packages_before_anything_else_and_ci_runs_it():
    makefile = (ROOT / "Makefile").read_text()
    prerequisites = re.search(r"^test:(.*)$", makefile, re.M).group(1).split()
    assert prerequisites[0] == "system-deps", prerequisites
    assert re.search(r"^system-deps:\n\t@?\.ci/system-deps$", makefile, re.M)
    ci = (ROOT / ".ci" / "run").read_text()
    commands = [
        line for line in ci.splitlines() if line.strip() and not line.lstrip().startswith("#")
    ]
    assert commands[-1] == "exec make test"
    assert "apt-get" not in "\n".join(commands)


def test_mlflow_ui_runs_without_job_execution_and_the_caller_keeps_its_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MLflow 3's job consumers (about 2 GB idle) stay off for the UI of ``make dev``."""
    monkeypatch.delenv("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", raising=False)
    before = dict(os.environ)
    settings = load_settings({"PIPELINE_HOME": str(tmp_path / "home")})
    mlflow_cmd, dagster_cmd = ui_commands(settings, dagster_port=3001, mlflow_port=5001)
    assert dict(os.environ) == before
    assert Path(dagster_cmd[0]).name == "dagster"
    launcher = mlflow_cmd.index(sys.executable)
    assert mlflow_cmd[launcher + 1 : launcher + 3] == ["-m", "pipeline.mlflow_ui"]
    # what the MLflow server reads, through the same launcher prefix
    probe = (
        "from mlflow.environment_variables import MLFLOW_SERVER_ENABLE_JOB_EXECUTION as v;"
        "print(v.get())"
    )
    out = subprocess.run(
        [*mlflow_cmd[:launcher], sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    assert out.strip() == "False"


def test_mlflow_ui_serves_from_the_launched_process_itself(tmp_path: Path) -> None:
    """No idle ``mlflow ui`` parent: the process started is the one answering HTTP."""
    settings = load_settings({"PIPELINE_HOME": str(tmp_path / "home")})
    settings.home.mkdir(parents=True)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mlflow_cmd, _ = ui_commands(settings, dagster_port=3001, mlflow_port=port)
    log = tmp_path / "mlflow_ui.log"
    with log.open("wb") as out:
        server = subprocess.Popen(mlflow_cmd, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, log.read_text()
            try:
                if requests.get(f"http://127.0.0.1:{port}/health", timeout=2).ok:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.5)
        # /proc: the launched pid now runs uvicorn, and it has no children
        cmdline = Path(f"/proc/{server.pid}/cmdline").read_bytes().split(b"\0")
        assert b"uvicorn" in cmdline, cmdline
        children = Path(f"/proc/{server.pid}/task/{server.pid}/children").read_text().split()
        assert children == []
        experiments = requests.get(
            f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search",
            params={"max_results": 10},
            timeout=10,
        ).json()
        assert [e["name"] for e in experiments["experiments"]] == ["Default"]
    finally:
        server.terminate()
        server.wait(timeout=30)
