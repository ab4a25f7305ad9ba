"""The request-log writer's cost a row: the server's CPU and PostgreSQL's, in one process.

    python -m bench.request_log_cost [--rows 50000]

Writes `--rows` request logs shaped like a warm Execute's through RequestLogWriter (its
queue, batches and statements, as the server runs them), on a database of its own: once
with no error rows, once with one row in ten carrying an error_logs row. CPU is this
process's (the entries are built before the clock starts) and that of the PostgreSQL
backends serving the writer's connections. To compare with another checkout, run it with
that checkout's server first on the path:
`PYTHONPATH=/other/server:/other/client python -m bench.request_log_cost`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from datetime import UTC, datetime

import asyncpg

from lambda_server.config import DatabaseSettings, RequestLogSettings
from lambda_server.domain import ErrorLogEntry, RequestLogEntry
from lambda_server.metrics import Metrics
from lambda_server.store import migrations
from lambda_server.store.database import Database
from lambda_server.store.request_log import RequestLogWriter
from tests.support import create_database, drop_database, with_database

ADMIN_URL = os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


def entries(count: int, failing_every: int) -> list[RequestLogEntry]:
    now = datetime.now(UTC)
    return [
        RequestLogEntry(
            request_id=f"5b0c4b8e-1f7a-4c57-9a56-{n:012d}",
            language_title="python-throughput",
            timestamp=now,
            client_ip="127.0.0.1",
            user_id=None,
            request_headers={"user-agent": "h2load nghttp2/1.52.0", "te": "trailers"},
            request_payload={"n": 41},
            response_payload=42,
            status_code=500 if failing_every and n % failing_every == 0 else 200,
            grpc_code="OK",
            duration_ms=1,
            cached=False,
            error_details=None,
            runtime_metrics={"cpu_time_ms": 0.12, "peak_memory_bytes": 21590016, "state": "warm"},
            error=(
                ErrorLogEntry("RUNTIME_ERROR", "ValueError: no", "Traceback ...\nValueError: no\n")
                if failing_every and n % failing_every == 0
                else None
            ),
            size=300,
        )
        for n in range(count)
    ]


def backend_cpu(pids: list[int]) -> float:
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        total += (int(fields[11]) + int(fields[12])) / ticks
    return total


async def write(db: Database, url: str, name: str, rows: list[RequestLogEntry]) -> tuple[float, float]:
    """CPU seconds (this process, the backends) to write `rows`."""
    metrics = Metrics()
    writer = RequestLogWriter(db, RequestLogSettings(queue_size=len(rows) + 1), metrics)
    writer.start()
    conn = await asyncpg.connect(url)
    try:
        pids = [
            r["pid"] for r in await conn.fetch("SELECT pid FROM pg_stat_activity WHERE datname = $1", name)
        ]
        pids.remove(await conn.fetchval("SELECT pg_backend_pid()"))
    finally:
        await conn.close()
    client, server = time.process_time(), backend_cpu(pids)
    for row in rows:
        writer.record(row)
    await writer.close(timeout=300)
    client, server = time.process_time() - client, backend_cpu(pids) - server
    written = metrics.registry.get_sample_value("lambda_request_log_written_total")
    assert written == len(rows), (written, len(rows))
    return client, server


async def main(count: int) -> None:
    name = await create_database(ADMIN_URL)
    url = with_database(ADMIN_URL, name)
    db = Database(DatabaseSettings(pool_size=1), url)
    await db.open()
    try:
        await migrations.apply(db, migrations.load(migrations.default_directory()))
        await write(db, url, name, entries(2000, 10))  # the connection open, its statements prepared
        for label, failing_every in (("no error rows", 0), ("one row in ten with an error row", 10)):
            client, server = await write(db, url, name, entries(count, failing_every))
            print(
                f"{label:34}: {count} rows, CPU us a row: this process {1e6 * client / count:.1f}, "
                f"PostgreSQL backend {1e6 * server / count:.1f}"
            )
    finally:
        await db.close()
        await drop_database(ADMIN_URL, name)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=50_000)
    asyncio.run(main(parser.parse_args().rows))
