"""A throw-away PostgreSQL cluster for the team tests: Debian's binaries (`make install-services`),
a fresh data folder, 127.0.0.1 and a free port, trust authentication (no password anywhere)."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

USER = "team"


def bin_dir() -> Path | None:
    """The newest installed server's binaries; None when PostgreSQL is not installed."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    return Path(found[-1]).parent if found else None


def _as_owner(cmd: list[str]) -> list[str]:
    # The server refuses to run as root; Debian's package creates the `postgres` account for it.
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


@contextlib.contextmanager
def cluster(port: int) -> Iterator[str]:
    """Start a cluster; yields `postgresql://team@127.0.0.1:PORT` (add a database name); stops and
    deletes it afterwards."""
    bins = bin_dir()
    # Not under pytest's basetemp: its folders are private to root, and the server runs as `postgres`.
    folder = Path(tempfile.mkdtemp(prefix="pg-"))
    data, log = folder / "data", folder / "server.log"
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres")
    try:
        run = [str(bins / "initdb"), "-D", str(data), "-U", USER, "--auth=trust", "-E", "UTF8", "--no-sync"]
        subprocess.run(_as_owner(run), check=True, capture_output=True, timeout=120)
        # fsync off: a test cluster need not survive a power cut, and it is much faster on a shared disk.
        options = f"-h 127.0.0.1 -p {port} -k {folder} -c fsync=off -c max_connections=200"
        start = [str(bins / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", options, "-w", "-t", "60", "start"]
        started = subprocess.run(_as_owner(start), capture_output=True, text=True, timeout=120)
        if started.returncode:
            raise RuntimeError(f"PostgreSQL did not start: {started.stderr}{log.read_text()[-2000:]}")
        try:
            yield f"postgresql://{USER}@127.0.0.1:{port}"
        finally:
            subprocess.run(_as_owner([str(bins / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"]),
                           capture_output=True, timeout=120)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def create_database(server: str, name: str) -> str:
    import psycopg

    with psycopg.connect(f"{server}/postgres", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return f"{server}/{name}"
