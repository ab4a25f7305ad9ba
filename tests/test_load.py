"""Bursts: thousands of calls in flight at once all complete."""

from __future__ import annotations

import asyncio

from lambda_microservice import AsyncLambdaClient, LambdaError
from tests.support import ServerThread

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
