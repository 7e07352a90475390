"""A Postgres-backed Dagster instance (``dagster-postgres``), on a real PostgreSQL server.

The server is Debian's ``postgresql`` package (``.ci/system-deps`` installs it): ``initdb``
and ``pg_ctl`` run as the ``postgres`` user (the server refuses root) on a data folder in
this test's temp folder, listening on a free loopback port and a socket folder of its own.
A sensor evaluation registers the FX symbols and a partitioned materialisation runs, both
against that instance; the test reads them back from PostgreSQL, then stops the server.
"""

import glob
import os
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest

from pipeline import deploy, keys
from pipeline.domain.demo_data import write_demo_landing
from pipeline.runs import QUIET
from pipeline_tests.conftest import make_platform
from pipeline_tests.sensor_helpers import (
    apply_dynamic_partitions_requests,
    evaluate_fx_landing_sensor,
)

pytestmark = [pytest.mark.slow]

DATE = "2026-09-01"


def _bin(name: str) -> str | None:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found[-1] if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_postgres(*argv: str) -> subprocess.CompletedProcess:
    done = subprocess.run(
        ["runuser", "-u", "postgres", "--", *argv],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd="/",
    )
    assert done.returncode == 0, f"{argv[0]} failed:\n{done.stdout}\n{done.stderr}"
    return done


def _traversable(path: Path) -> None:
    """Let the postgres user reach ``path`` (pytest makes its temp folders 0700)."""
    for folder in [path, *path.parents]:
        mode = folder.stat().st_mode
        if not mode & 0o001:
            folder.chmod(mode | 0o001)


@pytest.fixture
def postgres(tmp_path: Path) -> Iterator[dict]:
    if _bin("initdb") is None and os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run([".ci/system-deps"], check=True, timeout=900)  # installs postgresql
    initdb, pg_ctl = _bin("initdb"), _bin("pg_ctl")
    if initdb is None or pg_ctl is None or os.geteuid() != 0:
        pytest.fail("needs Debian's postgresql package and root (run .ci/system-deps)")
    root = tmp_path / "pg"
    root.mkdir()
    shutil.chown(root, "postgres", "postgres")
    _traversable(root)
    data, port = root / "data", _free_port()
    _as_postgres(initdb, "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync")
    _as_postgres(
        pg_ctl,
        "-D",
        str(data),
        "-l",
        str(root / "server.log"),
        "-o",
        # TCP only: a Unix socket path under a deep test folder can pass Linux's 107-byte limit
        f"-p {port} -c unix_socket_directories='' -c listen_addresses=127.0.0.1 -c fsync=off",
        "-w",
        "start",
    )
    try:
        import psycopg2

        conn = psycopg2.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres")
        conn.autocommit = True  # CREATE DATABASE runs outside a transaction
        conn.cursor().execute("CREATE DATABASE dagster")
        conn.close()
        yield {"port": port, "data": data}
    finally:
        _as_postgres(pg_ctl, "-D", str(data), "-m", "fast", "-w", "stop")


def test_partitioned_run_and_sensor_on_a_postgres_instance(
    postgres: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import psycopg2

    monkeypatch.setenv("DAGSTER_PG_PASSWORD", "")
    dagster_home = tmp_path / "dagster_home"
    deploy.write_postgres_instance(
        dagster_home,
        hostname="127.0.0.1",
        port=postgres["port"],
        db_name="dagster",
        username="postgres",
    )
    plat = make_platform(tmp_path / "home")
    plat.instance.dispose()
    plat.instance = deploy.postgres_instance(dagster_home)
    try:
        write_demo_landing(
            plat.settings.landing_dir,
            claims_months=(),
            valuation_dates=(),
            fx_dates=(DATE,),
            ticks_per_symbol=200,
        )
        result = evaluate_fx_landing_sensor(plat.settings, plat.instance, plat.resources)
        apply_dynamic_partitions_requests(plat.instance, result)
        symbols = plat.instance.get_dynamic_partitions("symbol")
        assert len(symbols) >= 2
        run = plat.materialize([keys.BRONZE_FX_TICKS], DATE, run_config=QUIET)
        assert run.success
        status = plat.instance.get_status_by_partition(
            keys.BRONZE_FX_TICKS,
            [DATE],
            plat.defs.get_assets_def(keys.BRONZE_FX_TICKS).partitions_def,
        )
        assert status == {DATE: dg.AssetPartitionStatus.MATERIALIZED}
    finally:
        plat.instance.dispose()

    # read back from PostgreSQL itself, not through the instance
    with psycopg2.connect(
        host="127.0.0.1", port=postgres["port"], user="postgres", dbname="dagster"
    ) as conn:
        cur = conn.cursor()
        cur.execute("SELECT status FROM runs WHERE run_id = %s", (run.run_id,))
        assert cur.fetchone() == ("SUCCESS",)
        cur.execute("SELECT partition FROM dynamic_partitions WHERE partitions_def_name = 'symbol'")
        assert sorted(r[0] for r in cur.fetchall()) == sorted(symbols)
        cur.execute(
            "SELECT count(*) FROM event_logs WHERE run_id = %s AND partition = %s",
            (run.run_id, DATE),
        )
        assert cur.fetchone()[0] >= 1
