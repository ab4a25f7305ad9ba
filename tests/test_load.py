"""Bursts: thousands of calls in flight at once all complete."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import replace

from lambda_microservice import AsyncLambdaClient, LambdaClient, LambdaError
from tests.support import ServerThread, server_settings

CALLS = 2000
SESSIONS = 500


async def _burst(target: str) -> list[str]:
    async with AsyncLambdaClient(target, timeout=60) as client:
        ids = []
        for _ in range(SESSIONS):
            ids.append(
                (
                    await client.initialize(
                        "python-burst", "def handler(e):\n    return e['params']['n'] * 2"
                    )
                ).request_id
            )
        failures: list[str] = []

        async def one(n: int) -> None:
            try:
                response = await client.execute(ids[n % SESSIONS], {"n": n})
                if response.result.number_value != 2 * n:
                    failures.append(f"{n}: {response}")
            except LambdaError as exc:
                failures.append(f"{n}: {exc}")

        await asyncio.gather(*(one(n) for n in range(CALLS)))
        return failures


def test_2000_executes_in_flight_over_500_sessions_all_complete(server: ServerThread) -> None:
    failures = asyncio.run(_burst(server.target))
    assert not failures, f"{len(failures)} failed, the first: {failures[0]}"


def test_calls_past_grpc_max_concurrent_rpcs_get_resource_exhausted(database_url: str) -> None:
    settings = server_settings()
    running = ServerThread(
        replace(settings, grpc=replace(settings.grpc, max_concurrent_rpcs=2)), database_url
    )
    try:
        with LambdaClient(running.target, timeout=20) as client:
            session = client.initialize("python-slow-burst", "import time\ntime.sleep(0.5)\nresult = 1")
            outcomes: list[str] = []

            def call() -> None:
                try:
                    client.execute(session.request_id)
                    outcomes.append("OK")
                except LambdaError as exc:
                    outcomes.append(exc.code.name)

            threads = [threading.Thread(target=call) for _ in range(4)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(20)
            assert sorted(outcomes) == ["OK", "OK", "RESOURCE_EXHAUSTED", "RESOURCE_EXHAUSTED"]
    finally:
        running.stop()
