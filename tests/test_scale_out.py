"""Two server processes on one PostgreSQL, and the service behind pgbouncer in transaction mode."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import pytest

from lambda_microservice import LambdaClient, to_python
from tests.support import alternated_executes, free_port, port_answers, run_sync, server_process

PGBOUNCER = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
IDLE_TIMEOUT = "idle_in_transaction_session_timeout"


def test_a_session_made_on_one_server_runs_on_the_other_and_counts_stay_exact(database_url: str) -> None:
    with server_process(database_url) as first, server_process(database_url) as second:
        with LambdaClient(first.target, timeout=20) as one, LambdaClient(second.target, timeout=20) as two:
            session = one.initialize(
                "python-shared", "def handler(event):\n    return event['params']['n'] * 3"
            )
            assert to_python(two.execute(session.request_id, {"n": 2}).result) == 6
            calls = 200
            results = alternated_executes(one, two, session.request_id, calls)
            assert results == [3 * n for n in range(calls)]
            assert one.get_session(session.request_id).execution_count == calls + 1
            assert two.get_session(session.request_id).execution_count == calls + 1


@pytest.fixture
def pgbouncer(database_url: str) -> Iterator[str]:
    """pgbouncer in transaction mode in front of the test database; yields the URL through it."""
    if not Path(PGBOUNCER).exists():
        pytest.skip("pgbouncer is missing (`make test` installs Debian's pgbouncer)")
    parts = urlsplit(database_url)
    directory = Path(tempfile.mkdtemp(prefix="lambda-pgbouncer-"))
    port = free_port()
    (directory / "users.txt").write_text('"postgres" ""\n')
    (directory / "pgbouncer.ini").write_text(
        f"""[databases]
* = host={parts.hostname or "127.0.0.1"} port={parts.port or 5432}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = trust
auth_file = {directory}/users.txt
pool_mode = transaction
default_pool_size = 5
max_client_conn = 200
; PostgreSQL settings sent at connect are not pgbouncer's to pass on: set them on the
; role instead (ALTER ROLE ... SET statement_timeout), as the README says
ignore_startup_parameters = extra_float_digits,statement_timeout,lock_timeout,{IDLE_TIMEOUT}
logfile = {directory}/pgbouncer.log
pidfile = {directory}/pgbouncer.pid
"""
    )
    command = [PGBOUNCER, str(directory / "pgbouncer.ini")]
    if os.geteuid() == 0:  # pgbouncer will not run as root
        shutil.chown(directory, "postgres", "postgres")
        for path in directory.iterdir():
            shutil.chown(path, "postgres", "postgres")
        command = ["runuser", "-u", "postgres", "--", *command]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not port_answers("127.0.0.1", port):
            if process.poll() is not None or time.monotonic() > deadline:
                log = (
                    (directory / "pgbouncer.log").read_text()
                    if (directory / "pgbouncer.log").exists()
                    else ""
                )
                raise RuntimeError(f"pgbouncer did not start: {log[-2000:]}")
            time.sleep(0.05)
        yield f"postgresql://postgres@127.0.0.1:{port}{parts.path}"
    finally:
        process.terminate()
        process.wait(10)
        shutil.rmtree(directory, ignore_errors=True)


def test_the_service_works_behind_pgbouncer_in_transaction_mode(pgbouncer: str, database_url: str) -> None:
    with server_process(pgbouncer, DATABASE_STATEMENT_CACHE="off") as behind:
        with LambdaClient(behind.target, timeout=20) as client:
            assert client.health().components["postgres"] == "ok"
            session = client.initialize(
                "python-pooled", "def handler(event):\n    return event['params']['n'] + 1"
            )
            failing = client.initialize("python-pooled", "def handler(event):\n    raise ValueError('no')")
            for _ in range(3):  # request logs with error rows: both COPYs in one transaction
                assert client.execute(failing.request_id).error.message == "ValueError: no"
            with ThreadPoolExecutor(max_workers=12) as pool:  # more callers than pgbouncer's 5 connections
                results = list(
                    pool.map(
                        lambda n: to_python(client.execute(session.request_id, {"n": n}).result), range(100)
                    )
                )
            assert results == [n + 1 for n in range(100)]
            assert client.get_session(session.request_id).execution_count == 100
            assert client.get_function("nodejs-calculator").language_title == "nodejs-calculator"
    # the server stopped gracefully: every request log was written through pgbouncer (COPY)
    rows = run_sync(
        _fetch(
            database_url,
            "SELECT r.request_id, count(e.id) AS errors FROM public.request_logs r"
            " LEFT JOIN public.error_logs e ON e.request_log_id = r.id"
            " WHERE r.request_id = ANY($1::text[]) GROUP BY r.id",
            [session.request_id, failing.request_id],
        )
    )
    by_session = Counter((row["request_id"], row["errors"]) for row in rows)
    assert by_session == {(session.request_id, 0): 100, (failing.request_id, 1): 3}


async def _fetch(url: str, query: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(url, timeout=10)
    try:
        rows: list[asyncpg.Record] = await conn.fetch(query, *args)
        return rows
    finally:
        await conn.close()
