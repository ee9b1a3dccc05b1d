"""Throw-away servers for the cluster tests: a PostgreSQL cluster and an ``mlflow server``
backed by it, both on loopback, both stopped when the context ends. docs/CLUSTER.md
gives the same commands for a real deployment.

PostgreSQL comes from the machine's packages (Debian: ``postgresql``; `.ci/run` installs
it where it is missing). ``initdb`` refuses to run as root, so as root the server runs as
the ``postgres`` user the package creates. Without PostgreSQL the tests that need it
skip, unless ``DMP_TEST_POSTGRES=required`` (set by `.ci/run`) makes that a failure.
"""
from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Iterator, Optional

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pg_bin(name: str) -> Optional[str]:
    found = shutil.which(name) or sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found if isinstance(found, str) else (found[-1] if found else None)


def require_postgres() -> str:
    """The folder of PostgreSQL's programs, or skip (fail under DMP_TEST_POSTGRES=required)."""
    initdb = pg_bin("initdb")
    if initdb is not None:
        initdb = str(Path(initdb).resolve())  # a link in /usr/local/bin -> the folder with createdb, pg_ctl
    if initdb is None:
        why = "PostgreSQL's initdb is not installed (Debian: apt-get install postgresql)"
        if os.environ.get("DMP_TEST_POSTGRES") == "required":
            pytest.fail(why)
        pytest.skip(why)
    return str(Path(initdb).parent)


def _as_postgres(cmd: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


@contextlib.contextmanager
def postgres() -> Iterator[str]:
    """A PostgreSQL cluster on 127.0.0.1 with a database ``mlflow``; yields its SQLAlchemy URI."""
    bindir = require_postgres()
    folder = Path(tempfile.mkdtemp(prefix="dmp-pg-"))  # not under pytest's 0700 tmp: the postgres user reads it
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres", "postgres")
    port = free_port()
    data = folder / "data"
    run = dict(check=True, capture_output=True, text=True)
    subprocess.run(_as_postgres([f"{bindir}/initdb", "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"]),
                   **run)
    subprocess.run(_as_postgres([f"{bindir}/pg_ctl", "-D", str(data), "-l", str(folder / "log"), "-w", "-o",
                                 f"-p {port} -k {folder} -c listen_addresses=127.0.0.1", "start"]), **run)
    try:
        subprocess.run([f"{bindir}/createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "mlflow"], **run)
        yield f"postgresql://postgres@127.0.0.1:{port}/mlflow"
    finally:
        subprocess.run(_as_postgres([f"{bindir}/pg_ctl", "-D", str(data), "-m", "immediate", "stop"]),
                       capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def mlflow_server(backend_uri: str, artifacts: Path, workers: int = 2, timeout_s: float = 120) -> Iterator[str]:
    """``mlflow server`` on a free loopback port; yields its http:// tracking URI."""
    port = free_port()
    log = open(artifacts.parent / f"mlflow-server-{port}.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_uri,
                             "--artifacts-destination", artifacts.as_uri(), "--host", "127.0.0.1", "--port", str(port),
                             "--workers", str(workers)], stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            # no background job runners (GenAI/trace jobs, ~10 processes): nothing here uses them
                            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                log.flush()
                raise RuntimeError(f"mlflow server did not start: {Path(log.name).read_text()[-2000:]}")
            time.sleep(0.5)
        yield uri
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 15)
        proc.wait(timeout=30)
        log.close()
