"""Graceful stop: health turns NOT_SERVING first, in-flight calls finish, worker processes go."""

from __future__ import annotations

import threading
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lambda_microservice import LambdaClient, to_python
from tests.support import (
    ServerThread,
    descendants,
    eventually,
    pool_counts,
    quiet_descendants,
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
