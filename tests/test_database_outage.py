"""With PostgreSQL unreachable, RPCs fail UNAVAILABLE in a bound, health says so, and the service heals."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace

import asyncpg
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lambda_microservice import (
    NO_RETRY,
    AsyncLambdaClient,
    LambdaClient,
    NotStartedError,
    UnavailableError,
    to_python,
)
from lambda_microservice.v1 import lambda_service_pb2 as pb
from tests.proxy import DatabaseProxy
from tests.support import ServerThread, eventually, server_settings, serving_before_the_database

BOUND = 5.0  # seconds within which an RPC must fail when the database is gone


@pytest.fixture
def proxy(database_url: str) -> Iterator[DatabaseProxy]:
    proxied = DatabaseProxy(database_url)
    yield proxied
    proxied.close()


@pytest.fixture
def proxied_server(proxy: DatabaseProxy) -> Iterator[ServerThread]:
    # every Execute claims in PostgreSQL: none runs from memory (SESSION_CACHE_SECONDS)
    # through the outage, which these tests make each call meet
    settings = server_settings()
    settings = replace(settings, database=replace(settings.database, session_cache_seconds=0.0))
    running = ServerThread(settings, proxy.url)
    yield running
    running.stop()


def health_status(channel: grpc.Channel, service: str = "") -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    status: int = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
    return status


@pytest.mark.parametrize("outage", ["reset", "blackhole"])
def test_an_outage_fails_fast_shows_in_health_and_heals_without_restart(
    proxy: DatabaseProxy, proxied_server: ServerThread, outage: str
) -> None:
    serving = health_pb2.HealthCheckResponse.SERVING
    not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
    # No retries on this channel, nor of Execute: each call shows what the server answered.
    with grpc.insecure_channel(proxied_server.target) as channel:
        client = LambdaClient(channel=channel, timeout=30, execute_retry=NO_RETRY)
        eventually(lambda: health_status(channel) == serving)
        session = client.initialize("python-outage", "result = params['x'] * 3")
        assert to_python(client.execute(session.request_id, {"x": 2}).result) == 6

        proxy.set_mode(outage)
        calls = [
            (lambda: client.initialize("python-outage", "result = 1"), "UNAVAILABLE"),
            # the session could not be claimed: the script did not run, and a retry is safe
            (lambda: client.execute(session.request_id, {"x": 2}), "NOT_STARTED"),
            (lambda: client.get_session(session.request_id), "UNAVAILABLE"),
        ]
        for call, reason in calls:
            started = time.monotonic()
            with pytest.raises(UnavailableError) as caught:
                call()
            assert time.monotonic() - started < BOUND
            assert caught.value.reason == reason
            assert isinstance(caught.value, NotStartedError) == (reason == "NOT_STARTED")
        eventually(lambda: health_status(channel) == not_serving, timeout=BOUND)
        assert health_status(channel, "lambda_microservice.v1.LambdaService") == not_serving
        assert health_status(channel, "liveness") == serving  # the process lives: no restart wanted
        health = client.health()
        assert health.status == pb.HEALTH_STATUS_NOT_SERVING
        assert health.components["postgres"].startswith("unavailable")
        postgres = {check.name: check for check in health.checks}["postgres"]
        assert postgres.status == pb.COMPONENT_STATUS_UNAVAILABLE and postgres.required

        proxy.set_mode("up")
        eventually(lambda: health_status(channel) == serving, timeout=BOUND)
        # the pool healed: the session saved before the outage is there and counted
        assert to_python(client.execute(session.request_id, {"x": 5}).result) == 15
        assert client.get_session(session.request_id).execution_count == 2
        assert client.health().components["postgres"] == "ok"


def test_a_server_started_while_the_database_is_down_serves_once_it_is_up(proxy: DatabaseProxy) -> None:
    proxy.set_mode("reset")
    running = ServerThread(serving_before_the_database(server_settings()), proxy.url)
    try:
        with grpc.insecure_channel(running.target) as channel:
            client = LambdaClient(channel=channel)
            assert health_status(channel) == health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(UnavailableError):
                client.initialize("nodejs-late", "return 1;")
            proxy.set_mode("up")
            eventually(lambda: health_status(channel) == health_pb2.HealthCheckResponse.SERVING)
            session = client.initialize("nodejs-late", "return 1;")
            assert to_python(client.execute(session.request_id).result) == 1
    finally:
        running.stop()


@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_the_client_retries_unavailable_within_its_deadline(
    proxy: DatabaseProxy, proxied_server: ServerThread, flavour: str
) -> None:
    with LambdaClient(proxied_server.target, timeout=20) as client:
        session = client.initialize("nodejs-retry-outage", "return 2;")
        proxy.set_mode("reset")
        eventually(lambda: client.health().status == pb.HEALTH_STATUS_NOT_SERVING)
        # the database returns while the client is still retrying its call: the session could
        # not be claimed, so the script did not run (NOT_STARTED), which makes Execute safe to retry
        timer = threading.Timer(0.05, proxy.set_mode, args=("up",))
        timer.start()
        try:
            if flavour == "sync":
                response = client.execute(session.request_id)
            else:

                async def execute() -> pb.ExecuteResponse:
                    async with AsyncLambdaClient(proxied_server.target, timeout=20) as aclient:
                        return await aclient.execute(session.request_id)

                response = asyncio.run(execute())
            assert to_python(response.result) == 2
        finally:
            timer.join()


def test_a_statement_blocked_by_a_lock_is_cut_and_the_pool_still_works(
    database_url: str, server: ServerThread, client: LambdaClient
) -> None:
    """The hang of the service we replace: a query waiting forever. Here lock_timeout cuts it."""
    session = client.initialize("python-locked", "result = 'free'")

    async def hold_lock_and_call() -> float:
        conn = await asyncpg.connect(database_url)
        try:
            async with conn.transaction():
                await conn.execute(
                    "SELECT 1 FROM meta.sessions WHERE request_id = $1 FOR UPDATE",
                    uuid.UUID(session.request_id),
                )
                with grpc.insecure_channel(server.target) as channel:
                    no_retries = LambdaClient(channel=channel, execute_retry=NO_RETRY)
                    started = time.monotonic()
                    with pytest.raises(UnavailableError):
                        await asyncio.to_thread(no_retries.execute, session.request_id)
                    return time.monotonic() - started
        finally:
            await conn.close()

    assert asyncio.run(hold_lock_and_call()) < BOUND
    # the lock is gone, and the pool's connections serve again
    assert to_python(client.execute(session.request_id).result) == "free"
