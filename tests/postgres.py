"""A throwaway PostgreSQL server on loopback, for the storage tests and the fault benchmark.

Debian's postgresql package (installed by .ci/run where missing). The server refuses to run as
root, so as root its programs run as the `postgres` user. It listens on 127.0.0.1 at a free port
and on a Unix socket in its own temporary folder, with password authentication over TCP.
"""

from __future__ import annotations

import importlib.util
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

PASSWORD = "nmsearch-test"


class PostgresUnavailable(RuntimeError):
    """No psycopg or no server programs on this machine."""


def postgres_bin() -> Path | None:
    """The folder of the newest installed server programs (``pg_ctl``, ``initdb``)."""
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).resolve().parent
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), key=lambda p: int(p.parts[-3]))
    return versions[-1].parent if versions else None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def postgres_server() -> Iterator[dict[str, Any]]:
    """Start a server (``{"host", "port", "user", "password"}``), stop and delete it on exit."""
    bin_dir = postgres_bin()
    if importlib.util.find_spec("psycopg") is None:
        raise PostgresUnavailable("psycopg is not installed (pip install 'nmsearch[postgres]')")
    if bin_dir is None:
        raise PostgresUnavailable("no PostgreSQL server programs (apt-get install postgresql)")
    root = Path(tempfile.mkdtemp(prefix="nmsearch-pg-"))
    prefix: list[str] = []
    if os.geteuid() == 0:
        account = pwd.getpwnam("postgres")
        os.chown(root, account.pw_uid, account.pw_gid)
        prefix = ["runuser", "-u", "postgres", "--"]
    (root / "pw").write_text(PASSWORD)
    os.chmod(root / "pw", 0o644)
    port = _free_port()

    def run(*command: str) -> None:
        done = subprocess.run([*prefix, *command], capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed: {done.stderr.strip() or done.stdout.strip()}")

    try:
        run(str(bin_dir / "initdb"), "-D", str(root / "data"), "-U", "postgres", f"--pwfile={root / 'pw'}",
            "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8", "--no-sync")  # fmt: skip
        options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
        run(str(bin_dir / "pg_ctl"), "-D", str(root / "data"), "-o", options, "-l", str(root / "log"), "-w", "start")
        yield {"host": "127.0.0.1", "port": port, "user": "postgres", "password": PASSWORD}
    finally:
        if (root / "data" / "postmaster.pid").exists():
            run(str(bin_dir / "pg_ctl"), "-D", str(root / "data"), "-m", "immediate", "stop")
        shutil.rmtree(root, ignore_errors=True)


def create_database(server: dict[str, Any]) -> str:
    """A fresh, empty database on ``server``, as a ``postgresql://`` URL."""
    import psycopg

    name = f"nmsearch_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(
        host=server["host"], port=server["port"], user=server["user"], password=server["password"],
        dbname="postgres", autocommit=True,
    ) as connection:  # fmt: skip
        connection.execute(f"CREATE DATABASE {name}")
    return f"postgresql://{server['user']}:{server['password']}@{server['host']}:{server['port']}/{name}"
