"""Graceful stop: health turns NOT_SERVING first, in-flight calls finish, worker processes go."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import asyncpg
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lambda_microservice import LambdaClient, to_python
from lambda_microservice.v1 import lambda_service_pb2 as pb
from lambda_microservice.v1 import lambda_service_pb2_grpc as pb_grpc
from tests.support import (
    ServerThread,
    descendants,
    eventually,
    pool_counts,
    quiet_descendants,
    run_sync,
    server_settings,
)


def test_stop_turns_health_not_serving_and_lets_in_flight_calls_finish(database_url: str) -> None:
    before = quiet_descendants()
    running = ServerThread(server_settings(), database_url)
    results: list[object] = []
    with grpc.insecure_channel(running.target) as channel:
        client = LambdaClient(channel=channel)
        session = client.initialize("python-slow", "import time\ntime.sleep(1.0)\nresult = 'done'")
        in_flight = threading.Thread(
            target=lambda: results.append(to_python(client.execute(session.request_id).result))
        )
        in_flight.start()
        eventually(lambda: pool_counts(client, "python")["busy"] == 1)
        assert descendants() - before, "the server runs environments"
        stopper = threading.Thread(target=running.stop, kwargs={"grace": 5.0})
        stopper.start()
        health = health_pb2_grpc.HealthStub(channel)
        time.sleep(0.2)
        # stopping: health says NOT_SERVING, or the listener is already closed to new calls
        try:
            answer = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
            assert answer.status == health_pb2.HealthCheckResponse.NOT_SERVING
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.UNAVAILABLE
        in_flight.join(10)
        stopper.join(10)
    assert results == ["done"]
    # every process the server started is gone
    eventually(lambda: descendants() <= before, timeout=5)


@dataclass
class Outcome:
    started: float
    code: grpc.StatusCode


async def _logged(url: str, request_id: str) -> int:
    conn = await asyncpg.connect(url, timeout=10)
    try:
        return int(
            await conn.fetchval("SELECT count(*) FROM public.request_logs WHERE request_id = $1", request_id)
        )
    finally:
        await conn.close()


def test_a_stop_under_load_fails_no_call_in_flight_and_writes_every_log(database_url: str) -> None:
    """SIGTERM's path: NOT_SERVING while still serving (the drain), then in-flight calls finish
    within the grace, new calls are refused UNAVAILABLE, logs are written, processes end."""
    before = quiet_descendants()
    running = ServerThread(server_settings(shutdown_drain_seconds=0.5), database_url)
    with LambdaClient(running.target, timeout=20) as client:
        session = client.initialize("python-busy", "import time\ntime.sleep(0.2)\nresult = 'done'")
    request = pb.ExecuteRequest(request_id=session.request_id)
    outcomes: list[Outcome] = []
    stopping: list[float] = []

    def caller() -> None:
        with grpc.insecure_channel(running.target) as channel:  # no retries: every refusal shows
            stub = pb_grpc.LambdaServiceStub(channel)
            while True:
                started = time.monotonic()
                try:
                    stub.Execute(request, timeout=10)
                    code = grpc.StatusCode.OK
                except grpc.RpcError as error:
                    code = error.code()
                outcomes.append(Outcome(started, code))
                if stopping and started > stopping[0] and code != grpc.StatusCode.OK:
                    return

    callers = [threading.Thread(target=caller) for _ in range(8)]
    for thread in callers:
        thread.start()
    time.sleep(1.0)
    with grpc.insecure_channel(running.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        stopping.append(time.monotonic())
        stopper = threading.Thread(target=running.stop, kwargs={"grace": 5.0})
        stopper.start()
        time.sleep(0.2)  # in the drain: NOT_SERVING, yet calls are still taken
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=2).status == (
            health_pb2.HealthCheckResponse.NOT_SERVING
        )
        stopper.join(20)
    for thread in callers:
        thread.join(20)
    in_flight = [o for o in outcomes if o.started < stopping[0]]
    failed = [o.code for o in in_flight if o.code != grpc.StatusCode.OK]
    answered = sum(o.code == grpc.StatusCode.OK for o in outcomes)
    print(f"in flight at the stop: {len(in_flight)}, failed: {len(failed)}; answered in all: {answered}")
    assert len(in_flight) > 8 and not failed, (
        f"{len(failed)} of {len(in_flight)} in-flight calls failed: {failed}"
    )
    during_drain = [o for o in outcomes if stopping[0] < o.started < stopping[0] + 0.4]
    assert during_drain and all(o.code == grpc.StatusCode.OK for o in during_drain)
    refused = {o.code for o in outcomes if o.started > stopping[0] and o.code != grpc.StatusCode.OK}
    # a call that gRPC's core had received but not yet handed to a handler when the listener
    # closed ends CANCELLED, not UNAVAILABLE (grpc/grpc#41785, open): seen on a loaded machine
    assert grpc.StatusCode.UNAVAILABLE in refused, refused
    assert refused <= {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}, refused
    assert run_sync(_logged(database_url, session.request_id)) == answered  # every answered call logged
    eventually(lambda: descendants() <= before, timeout=5)
