"""What holds at scale: memory over many executions, thousands in flight, a large sessions table."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import asyncpg
from google.protobuf.struct_pb2 import Struct

from bench.server import BenchServer
from bench.throughput import SCRIPTS, SERVICE, Load, measure
from lambda_microservice import AsyncLambdaClient, LambdaClient, LambdaError
from lambda_microservice.v1 import lambda_service_pb2 as pb

MIB = 1024 * 1024

# Sessions made in bulk, as a busy deployment has them: unexpired, so Execute's
# claim statement and the cleanup's index both see them.
_FILL = """
INSERT INTO meta.sessions
    (request_id, language_title, expires_at, context, script_content, script_hash, compile_status)
SELECT gen_random_uuid(), 'python-filler', now() + interval '1 day', '{}', 'result = 1', md5(i::text),
       'success'
FROM generate_series(1, $1) AS i
"""


def _execute_request(client: LambdaClient, runtime: str = "python") -> pb.ExecuteRequest:
    session = client.initialize(f"{runtime}-scale", SCRIPTS[runtime])
    client.execute(session.request_id, {"n": 41})  # bound before anything is measured
    params = Struct()
    params.update({"n": 41})
    return pb.ExecuteRequest(request_id=session.request_id, params=params)


def memory(server: BenchServer, executions: int) -> dict[str, Any]:
    """The server's RSS after a warm-up, and after `executions` more warm Executes."""
    with LambdaClient(server.target, timeout=30) as client:
        request = _execute_request(client)
    load = Load(connections=2, streams=8, seconds=0)
    warm = measure(
        server, "warm-up", f"{SERVICE}/Execute", request, load, requests=max(1000, executions // 5)
    )
    before = server.rss_bytes()
    run = measure(server, "soak", f"{SERVICE}/Execute", request, load, requests=executions)
    after = server.rss_bytes()
    return {
        "executions": run["done"],
        "rss_before_mib": before / MIB,
        "rss_after_mib": after / MIB,
        "errors": warm["errors"] + run["errors"],
    }


async def _in_flight(target: str, calls: int, sessions: int) -> dict[str, Any]:
    async with AsyncLambdaClient(target, timeout=60) as client:
        ids = [
            (await client.initialize("python-in-flight", SCRIPTS["python"])).request_id
            for _ in range(sessions)
        ]
        errors: list[str] = []

        async def one(i: int) -> None:
            try:
                response = await client.execute(ids[i % sessions], {"n": i})
                if response.HasField("error") or response.result.number_value != i + 1:
                    errors.append(response.error.message or "wrong result")
            except LambdaError as exc:
                errors.append(str(exc))

        started = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(calls)))
        seconds = time.perf_counter() - started
    return {
        "calls": calls,
        "sessions": sessions,
        "seconds": seconds,
        "errors": len(errors),
        "first_error": errors[0] if errors else "",
    }


def in_flight(server: BenchServer, calls: int, sessions: int) -> dict[str, Any]:
    """`calls` Executes sent at once over `sessions` sessions of one script."""
    return asyncio.run(_in_flight(server.target, calls, sessions))


async def _fill(url: str, rows: int) -> None:
    conn = await asyncpg.connect(url, timeout=30)
    try:
        if rows:
            await conn.execute(_FILL, rows, timeout=600)
        # both runs start from a table just vacuumed: the runs before this one left dead
        # rows (an update a claim) that autovacuum would otherwise clean during a run
        await conn.execute("VACUUM ANALYZE meta.sessions", timeout=600)
    finally:
        await conn.close()


def large_table(server: BenchServer, rows: int, seconds: float) -> dict[str, Any]:
    """Warm Execute throughput on the table as it is, then with `rows` more sessions in it."""
    with LambdaClient(server.target, timeout=30) as client:
        request = _execute_request(client)
    load = Load(connections=2, streams=8, seconds=seconds)
    asyncio.run(_fill(server.database_url, 0))
    empty = measure(server, "sessions table as it was", f"{SERVICE}/Execute", request, load)
    started = time.perf_counter()
    asyncio.run(_fill(server.database_url, rows))
    filled_in = time.perf_counter() - started
    full = measure(server, f"with {rows:,} more sessions", f"{SERVICE}/Execute", request, load)
    return {
        "rows": rows,
        "fill_seconds": filled_in,
        "rps_before": empty["rps"],
        "rps_after": full["rps"],
        "ratio": full["rps"] / empty["rps"],
        "errors": empty["errors"] + full["errors"],
    }
