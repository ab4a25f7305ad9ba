"""Prometheus /metrics: RPCs by method and code, executions, environments and the pools, moving with calls."""

from __future__ import annotations

import socket
import urllib.request
import uuid
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from lambda_microservice import InvalidArgumentError, LambdaClient, NotFoundError
from lambda_server.app import build_server
from lambda_server.config import ConfigError
from tests.support import ServerThread, eventually, run_sync, server_settings

EXECUTE = "lambda_microservice.v1.LambdaService/Execute"
INITIALIZE = "lambda_microservice.v1.LambdaService/Initialize"
HEALTH_CHECK = "grpc.health.v1.Health/Check"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(server: ServerThread) -> Samples:
    port = server.server.metrics.port
    assert port
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


@pytest.fixture(scope="module")
def metered(database_url: str) -> Iterator[ServerThread]:
    running = ServerThread(server_settings(), database_url)
    yield running
    running.stop()


def test_rpcs_and_executions_are_counted_by_method_code_runtime_and_outcome(metered: ServerThread) -> None:
    before = scrape(metered)
    with LambdaClient(metered.target, timeout=20) as client:
        python = client.initialize("python-metrics", "result = params['x'] * 2").request_id
        failing = client.initialize("python-metrics", "raise RuntimeError('no')").request_id
        node = client.initialize("nodejs-metrics", "return event.params.x + 1;").request_id
        assert not client.execute(python, {"x": 2}).HasField("error")
        assert client.execute(failing).HasField("error")
        assert not client.execute(node, {"x": 2}).HasField("error")
        with pytest.raises(NotFoundError):
            client.execute(str(uuid.uuid4()))
    with grpc.insecure_channel(metered.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    after = scrape(metered)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    rpcs = "lambda_rpc_requests_total"
    assert moved(rpcs, method=INITIALIZE, code="OK") == 3
    assert moved(rpcs, method=EXECUTE, code="OK") == 3
    assert moved(rpcs, method=EXECUTE, code="NOT_FOUND") == 1
    assert moved(rpcs, method=HEALTH_CHECK, code="OK") == 1
    assert moved("lambda_rpc_duration_seconds_count", method=EXECUTE) == 4
    assert moved("lambda_rpc_duration_seconds_bucket", method=EXECUTE, le="+Inf") == 4

    executions = "lambda_executions_total"
    assert moved(executions, runtime="python", outcome="ok") == 1
    assert moved(executions, runtime="python", outcome="RUNTIME_ERROR") == 1
    assert moved(executions, runtime="nodejs", outcome="ok") == 1
    assert moved("lambda_execution_duration_seconds_count", runtime="python") == 2
    binds = sum(
        moved("lambda_environment_binds_total", runtime=runtime, state=state)
        for runtime in ("python", "nodejs")
        for state in ("prewarmed", "cold")
    )
    assert binds == 3  # three new scripts, each bound once

    # the gauges are set at scrape time, from the pool and the database pool
    for runtime in ("python", "nodejs"):
        for state in ("warm", "busy", "idle"):
            assert ("lambda_environments", frozenset({"runtime": runtime, "state": state}.items())) in after
    assert value(after, "lambda_environments", runtime="python", state="idle") >= 2
    assert value(after, "lambda_environments", runtime="python", state="busy") == 0
    in_use = ("lambda_db_pool_connections", frozenset({"state": "in_use"}.items()))
    assert in_use in after
    # the pool has its connections; which of them are idle at the scrape is a race with the
    # health monitor's and the log writer's own calls (seen once: the only one was in use)
    pool = [value(after, "lambda_db_pool_connections", state=state) for state in ("in_use", "idle")]
    assert ("lambda_db_pool_connections", frozenset({"state": "idle"}.items())) in after
    assert sum(pool) >= 1
    assert ("lambda_request_log_queue_depth", frozenset()) in after


def test_a_script_that_compiled_once_is_not_compiled_again(metered: ServerThread) -> None:
    """The one-shot pattern (the same script initialized again and again) skips the checker;
    a script that failed is checked again, each time with its error."""
    script = f"result = params.get('n', 0) + 1  # {uuid.uuid4()}"
    broken = f"def broken(:  # {uuid.uuid4()}"
    before = scrape(metered)
    with LambdaClient(metered.target, timeout=20.0) as client:
        sessions = [client.initialize("python-once", script) for _ in range(3)]
        for session in sessions:
            assert client.execute(session.request_id, {"n": 1}).result.number_value == 2
        for _ in range(2):
            with pytest.raises(InvalidArgumentError, match="SyntaxError"):
                client.initialize("python-broken", broken)
    after = scrape(metered)
    checks = "lambda_script_checks_total"
    compiled = value(after, checks, runtime="python", how="compiled") - value(
        before, checks, runtime="python", how="compiled"
    )
    known = value(after, checks, runtime="python", how="known") - value(
        before, checks, runtime="python", how="known"
    )
    assert (compiled, known) == (1, 2)


def test_the_log_queue_gauge_drains_after_calls(metered: ServerThread) -> None:
    with LambdaClient(metered.target, timeout=20) as client:
        session = client.initialize("python-metrics", "result = 1").request_id
        for _ in range(5):
            client.execute(session)
    eventually(lambda: value(scrape(metered), "lambda_request_log_queue_depth") == 0)
    assert value(scrape(metered), "lambda_request_log_written_total") >= 5


def test_a_metrics_port_that_cannot_be_bound_stops_start_up(database_url: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"

        async def attempt() -> None:
            server, _ = await build_server(server_settings(metrics_addr=address), database_url)
            try:
                with pytest.raises(ConfigError, match="METRICS_ADDR"):
                    await server.start()
            finally:
                await server.stop(0)

        run_sync(attempt())
