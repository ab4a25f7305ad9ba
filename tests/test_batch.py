"""ExecuteBatch: many params in one call, in order, each item its own answer, counted per item."""

from __future__ import annotations

import asyncio
import io
import json
import statistics
import threading
import time
from collections.abc import Iterator
from contextlib import redirect_stdout
from dataclasses import replace
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import jwt
import pytest

from lambda_microservice import (
    AsyncLambdaClient,
    InvalidArgumentError,
    LambdaClient,
    RateLimitedError,
    item_error,
    result,
    to_python,
)
from lambda_microservice.cli import main as cli
from lambda_microservice.errors import DeadlineExceededError
from lambda_microservice.v1 import lambda_service_pb2 as pb
from lambda_microservice.v1 import lambda_service_pb2_grpc as pb_grpc
from lambda_server.config import AuthSettings, RuntimeSettings
from tests.support import ServerThread, eventually, health_check, pool_counts, server_settings

SECRET = "a-test-secret-of-at-least-32-bytes!!"
RUNTIME_ERROR = pb.EXECUTION_ERROR_CODE_RUNTIME_ERROR
TIMEOUT = pb.EXECUTION_ERROR_CODE_TIMEOUT
DEADLINE_EXCEEDED = grpc.StatusCode.DEADLINE_EXCEEDED.value[0]

DOUBLE_OR_RAISE = """
def handler(event):
    n = event['params']['n']
    if n % 7 == 3:
        raise ValueError(f'item {n} fails')
    print('item', n)
    return n * 2
"""
SLEEPY = (
    "import time\n\ndef handler(event):\n    time.sleep(event['params']['s'])\n"
    + "    return event['params']['n']"
)
SPIN_ON_ASK = (
    "def handler(event):\n    if event['params'].get('spin'):\n        while True:\n            pass\n"
    "    return event['params']['n']\n"
)


def token(sub: str) -> str:
    return jwt.encode({"sub": sub, "scope": "execute:all", "exp": int(time.time()) + 600}, SECRET)


def client_for(target: str, sub: str) -> LambdaClient:
    return LambdaClient(target, timeout=60, metadata=(("authorization", f"Bearer {token(sub)}"),))


@pytest.fixture(scope="module")
def tight(database_url: str) -> Iterator[ServerThread]:
    """One environment per script (a batch's items go to one worker, in chunks), batches of 150
    at most, 100 executions a minute for an anonymous caller."""
    runtime = replace(RuntimeSettings(timeout_seconds=5.0), max_environments_per_key=1, max_batch_size=150)
    auth = AuthSettings(anonymous_rate_limit_per_minute=100)
    running = ServerThread(replace(server_settings(), runtime=runtime, auth=auth), database_url)
    yield running
    running.stop()


def test_a_batch_of_1000_comes_back_in_order_with_its_failures_and_an_exact_count(
    client: LambdaClient,
) -> None:
    session = client.initialize("python-batch", DOUBLE_OR_RAISE)
    responses = client.execute_batch(session.request_id, [{"n": n} for n in range(1000)], timeout=60)
    assert len(responses) == 1000
    for n, response in enumerate(responses):
        assert not response.HasField("status"), (n, response.status)
        if n % 7 == 3:
            assert response.error.code == RUNTIME_ERROR, n
            assert f"item {n} fails" in response.error.message
        else:
            assert not response.HasField("error"), (n, response.error)
            assert result(response) == 2 * n
            assert response.logs == f"item {n}\n"
        assert response.request_id == session.request_id
    assert client.get_session(session.request_id).execution_count == 1000
    # the environments are fine afterwards
    assert to_python(client.execute(session.request_id, {"n": 5}).result) == 10


def test_node_items_run_in_order(client: LambdaClient) -> None:
    session = client.initialize(
        "nodejs-batch", "if (event.params.n === 2) throw new Error('two');\nreturn event.params.n + 1;"
    )
    responses = client.execute_batch(session.request_id, [{"n": n} for n in range(50)])
    assert [result(r) for r in responses if not r.HasField("error")] == [n + 1 for n in range(50) if n != 2]
    assert "two" in responses[2].error.message
    assert client.get_session(session.request_id).execution_count == 50


def test_a_top_level_that_fails_fails_every_item_alike(client: LambdaClient) -> None:
    session = client.initialize(
        "python-batch", "raise RuntimeError('no import')\ndef handler(event):\n    return 1\n"
    )
    responses = client.execute_batch(session.request_id, [{"n": n} for n in range(20)])
    assert [r.error.code for r in responses] == [RUNTIME_ERROR] * 20
    assert all("no import" in r.error.message for r in responses)


def test_an_item_past_its_timeout_in_a_chunk_fails_alone(tight: ServerThread) -> None:
    with LambdaClient(tight.target, timeout=60) as client:
        session = client.initialize("python-batch", SPIN_ON_ASK, options={"timeout": 0.5})
        items: list[dict[str, object]] = [{"n": n} for n in range(12)]
        items[5] = {"n": 5, "spin": True}
        started = time.monotonic()
        responses = client.execute_batch(session.request_id, items)
        took = time.monotonic() - started
        assert responses[5].error.code == TIMEOUT
        assert "timeout of 0.5 s" in responses[5].error.message
        others = [n for n in range(12) if n != 5]
        assert [result(responses[n]) for n in others] == others
        assert all(not responses[n].HasField("error") and not responses[n].HasField("status") for n in others)
        assert took < 20  # one timeout's wait, not one per item after it
        assert client.get_session(session.request_id).execution_count == 12


def test_a_batch_past_its_deadline_answers_in_time_with_the_rest_not_started(client: LambdaClient) -> None:
    session = client.initialize("python-batch", SLEEPY, options={"timeout": 10})
    timeout = 3.0
    started = time.monotonic()
    responses = client.execute_batch(
        session.request_id, [{"n": n, "s": 0.3} for n in range(200)], timeout=timeout
    )
    took = time.monotonic() - started
    assert took < timeout  # answered, not DEADLINE_EXCEEDED
    ran = [n for n, r in enumerate(responses) if not r.HasField("status") and not r.HasField("error")]
    stopped = [n for n, r in enumerate(responses) if r.error.code == TIMEOUT]
    unstarted = [n for n, r in enumerate(responses) if r.HasField("status")]
    assert ran and unstarted
    assert len(ran) + len(stopped) + len(unstarted) == 200
    assert all(result(responses[n]) == n for n in ran)
    for n in unstarted:
        status = responses[n].status
        assert status.code == DEADLINE_EXCEEDED
        assert "deadline came before item" in status.message
        error = item_error(responses[n])
        assert isinstance(error, DeadlineExceededError) and error.reason == "DEADLINE_EXCEEDED"
    assert all("deadline came while the item ran" in responses[n].error.message for n in stopped)
    assert client.get_session(session.request_id).execution_count == 200  # asked for: counted
    assert to_python(client.execute(session.request_id, {"n": 7, "s": 0}).result) == 7


def test_too_many_items_both_fields_and_none_are_invalid_argument(tight: ServerThread) -> None:
    with LambdaClient(tight.target, timeout=30) as client:
        session = client.initialize("python-batch", "result = 1")
        with pytest.raises(InvalidArgumentError) as many:
            client.execute_batch(session.request_id, [{}] * 151)
        assert many.value.metadata["setting"] == "MAX_BATCH_SIZE"
        assert "MAX_BATCH_SIZE (150)" in many.value.message
        with pytest.raises(InvalidArgumentError) as empty:
            client.execute_batch(session.request_id, [])
        assert "no item" in empty.value.message
        stub = pb_grpc.LambdaServiceStub(client._channel)
        both = pb.ExecuteBatchRequest(request_id=session.request_id, params_json=["{}"])
        both.params.add()
        with pytest.raises(grpc.RpcError) as refused:
            stub.ExecuteBatch(both, timeout=10)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "both set" in (refused.value.details() or "")
        assert client.get_session(session.request_id).execution_count == 0  # none of them counted


def test_a_batch_takes_a_token_per_item(tight: ServerThread) -> None:
    with LambdaClient(tight.target, timeout=30) as client:
        session = client.initialize("python-batch", "result = params['n']")
        stub = pb_grpc.LambdaServiceStub(client._channel)

        def remaining(count: int) -> int:
            request = pb.ExecuteBatchRequest(request_id=session.request_id)
            for n in range(count):
                request.params.add().update({"n": n})
            _, call = stub.ExecuteBatch.with_call(request, timeout=30)
            trailers = dict(call.trailing_metadata() or ())
            assert trailers["x-ratelimit-limit"] == "100"
            return int(trailers["x-ratelimit-remaining"])

        before = remaining(1)
        after = remaining(60)
        assert 55 <= before - after <= 60  # 60 taken, less what the time between refilled
        with pytest.raises(RateLimitedError) as limited:
            client.execute_batch(session.request_id, [{"n": 1}] * 60)
        assert "this call takes 60" in limited.value.message
        with pytest.raises(InvalidArgumentError) as whole:  # more than a minute's worth: never
            client.execute_batch(session.request_id, [{"n": 1}] * 101)
        assert whole.value.metadata["setting"] == "RATE_LIMIT_ANONYMOUS_PER_MINUTE"
        assert "more than the 100 a minute" in whole.value.message


def test_the_result_cache_applies_per_item(client: LambdaClient) -> None:
    session = client.initialize(
        "python-batch", "import random\nresult = [params['n'], random.random()]", options={"cache_ttl": 60}
    )
    first = client.execute_batch(session.request_id, [{"n": n} for n in range(5)])
    assert [r.cached for r in first] == [False] * 5
    second = client.execute_batch(session.request_id, [{"n": n} for n in (4, 9, 0)])
    assert [r.cached for r in second] == [True, False, True]
    assert second[0].result_json == first[4].result_json
    assert second[2].result_json == first[0].result_json
    assert result(second[1])[0] == 9
    assert client.get_session(session.request_id).execution_count == 8


def test_items_with_integers_past_2_53_are_exact(client: LambdaClient) -> None:
    session = client.initialize("python-batch", "def handler(event):\n    return event['params']['n'] + 1\n")
    big = 2**70
    responses = client.execute_batch(session.request_id, [{"n": big}, {"n": 1}, {"n": -big}])
    assert [r.result_json for r in responses] == [str(big + 1), "2", str(-big + 1)]
    assert [result(r) for r in responses] == [big + 1, 2, -big + 1]


def test_the_async_client_runs_a_batch(server: ServerThread) -> None:
    async def go() -> list[pb.ExecuteResponse]:
        async with AsyncLambdaClient(server.target, timeout=30) as client:
            session = await client.initialize("python-batch", "result = params['n'] * 3")
            return await client.execute_batch(session.request_id, [{"n": n} for n in range(10)])

    assert [result(r) for r in asyncio.run(go())] == [3 * n for n in range(10)]


def test_lambda_cli_batch_prints_a_line_per_item(
    client: LambdaClient, server: ServerThread, tmp_path: Path
) -> None:
    session = client.initialize("python-batch", DOUBLE_OR_RAISE)
    items = tmp_path / "items.jsonl"
    items.write_text('{"n": 1}\n\n{"n": 3}\n{"n": 12345678901234567890}\n')
    out = io.StringIO()
    with redirect_stdout(out):
        code = cli(["--target", server.target, "batch", session.request_id, "--params-file", str(items)])
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert code == 1  # an item failed
    assert len(lines) == 3
    assert lines[0]["result"] == 2
    assert lines[1]["error"]["code"] == "EXECUTION_ERROR_CODE_RUNTIME_ERROR"
    assert lines[2]["result"] == 2 * 12345678901234567890
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"n": 1}\n[1]\n')
    assert cli(["--target", server.target, "batch", session.request_id, "--params-file", str(bad)]) == 2


def test_rust_items_run_in_order(client: LambdaClient) -> None:
    script = (
        "use serde_json::Value;\n\npub fn handler(event: Value) -> Result<Value, String> {\n"
        '    let n = event["params"]["n"].as_i64().ok_or("n")?;\n'
        '    if n == 4 { return Err(String::from("four")); }\n'
        "    Ok(Value::from(n * n))\n}\n"
    )
    session = client.initialize("rust-batch", script, timeout=120.0)
    responses = client.execute_batch(session.request_id, [{"n": n} for n in range(40)], timeout=60)
    assert responses[4].error.code == RUNTIME_ERROR and "four" in responses[4].error.message
    assert [result(r) for n, r in enumerate(responses) if n != 4] == [n * n for n in range(40) if n != 4]
    assert client.get_session(session.request_id).execution_count == 40


def test_a_second_tenant_is_not_starved_by_batches(database_url: str) -> None:
    auth = AuthSettings(mode="jwt", jwt_secret=SECRET, rate_limit_per_minute=0)
    settings = replace(server_settings(), auth=auth)
    server = ServerThread(settings, database_url)
    try:
        with client_for(server.target, "mallory") as mallory, client_for(server.target, "victor") as victor:
            busy = mallory.initialize("python-batch", "def handler(event):\n    return sum(range(200000))\n")
            quick = victor.initialize("python-quick", "result = params['n']")
            done: list[int] = []  # the items each of mallory's batches ran
            for n in range(20):  # warm
                victor.execute(quick.request_id, {"n": n})

            def latencies(count: int, batches: int = 0) -> list[float]:
                """At least `count` Executes' latencies, and until `batches` batches are done."""
                samples: list[float] = []
                give_up = time.monotonic() + 60
                while len(samples) < count or (len(done) < batches and time.monotonic() < give_up):
                    n = len(samples)
                    started = time.perf_counter()
                    assert to_python(victor.execute(quick.request_id, {"n": n}).result) == n
                    samples.append(time.perf_counter() - started)
                return samples

            alone = statistics.median(latencies(100))
            stop = threading.Event()

            def attack() -> None:
                while not stop.is_set():
                    responses = mallory.execute_batch(busy.request_id, [{}] * 200, timeout=60)
                    done.append(
                        sum(1 for r in responses if not r.HasField("error") and not r.HasField("status"))
                    )

            attacker = threading.Thread(target=attack)
            attacker.start()
            try:
                eventually(lambda: pool_counts(victor, "python")["busy"] > 0)  # a batch runs
                during = statistics.median(latencies(150, batches=3))
            finally:
                stop.set()
                attacker.join(60)
            after = statistics.median(latencies(100))
            print(
                f"\nvictor's median: alone {alone * 1000:.1f} ms, during batches {during * 1000:.1f} ms, "
                f"after {after * 1000:.1f} ms; {len(done)} batches"
            )
            assert done and all(count == 200 for count in done)
            assert during <= 5 * max(alone, after), (alone, during, after)
    finally:
        server.stop()


def test_an_item_that_does_not_fit_the_schema_fails_alone(client: LambdaClient) -> None:
    session = client.initialize("nodejs-calculator", "")
    items = [
        {"operation": "add", "a": 1, "b": 2},
        {"operation": "add", "a": "x", "b": 2},
        {"operation": "multiply", "a": 3, "b": 4},
    ]
    responses = client.execute_batch(session.request_id, items)
    assert to_python(responses[0].result) == {"result": 3}
    assert to_python(responses[2].result) == {"result": 12}
    refused = item_error(responses[1])
    assert isinstance(refused, InvalidArgumentError) and refused.reason == "INVALID_PARAMS"
    assert responses[1].status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert client.get_session(session.request_id).execution_count == 3  # as Execute counts it


def test_the_request_log_has_one_row_per_batch_with_its_items(database_url: str) -> None:
    server = ServerThread(server_settings(), database_url)
    try:
        with LambdaClient(server.target, timeout=30) as client:
            session = client.initialize("python-batch", DOUBLE_OR_RAISE)
            client.execute_batch(session.request_id, [{"n": n} for n in range(10)])  # n = 3 fails
            client.execute(session.request_id, {"n": 1})
    finally:
        server.stop()  # graceful: what is queued is written now

    async def rows() -> list[asyncpg.Record]:
        conn = await asyncpg.connect(database_url, timeout=10)
        try:
            await conn.set_type_codec("jsonb", schema="pg_catalog", encoder=json.dumps, decoder=json.loads)
            query = 'SELECT * FROM public.request_logs WHERE request_id = $1 ORDER BY "timestamp"'
            return list(await conn.fetch(query, session.request_id))
        finally:
            await conn.close()

    batch, single = asyncio.run(rows())
    assert batch["items"] == 10 and single["items"] is None
    assert batch["grpc_code"] == "OK" and batch["status_code"] == 500  # an item failed
    assert batch["error_details"] == {"items": 10, "failed": 1, "not_run": 0}
    assert batch["request_payload"] == [{"n": n} for n in range(10)]
    answers = batch["response_payload"]
    assert answers[3]["error"]["code"] == "RUNTIME_ERROR"
    assert [answers[n] for n in range(10) if n != 3] == [2 * n for n in range(10) if n != 3]
    assert batch["runtime_metrics"]["items"] == 10


def _request_log_rows(database_url: str, request_id: str) -> list[asyncpg.Record]:
    async def rows() -> list[asyncpg.Record]:
        conn = await asyncpg.connect(database_url, timeout=10)
        try:
            await conn.set_type_codec("jsonb", schema="pg_catalog", encoder=json.dumps, decoder=json.loads)
            query = 'SELECT * FROM public.request_logs WHERE request_id = $1 ORDER BY "timestamp"'
            return list(await conn.fetch(query, request_id))
        finally:
            await conn.close()

    return asyncio.run(rows())


def test_a_batch_whose_answers_pass_the_send_limit_answers_ok_with_what_fits(database_url: str) -> None:
    settings = server_settings()
    limit = settings.grpc.max_send_message_bytes
    line = settings.runtime.max_log_bytes - 100  # each item prints about MAX_LOG_BYTES
    server = ServerThread(settings, database_url)
    try:
        with LambdaClient(server.target, timeout=60) as client:
            session = client.initialize("python-batch", f"def handler(event):\n    print('x' * {line})\n")
            items = 100
            assert items * line > limit  # the whole answer would not fit
            responses = client.execute_batch(session.request_id, [{"n": n} for n in range(items)])
            assert len(responses) == items
            assert sum(r.ByteSize() for r in responses) <= limit
            full = [r for r in responses if not r.HasField("error") and not r.HasField("status")]
            dropped = [r for r in responses if r.HasField("error")]
            not_run = [r for r in responses if r.HasField("status")]
            assert len(full) + len(dropped) + len(not_run) == items
            assert len(full) >= limit // (2 * line)  # most of what fits is kept
            assert dropped or not_run  # the rest said so
            assert all(r.logs == "x" * line + "\n" for r in full)
            for response in dropped:
                assert response.error.code == pb.EXECUTION_ERROR_CODE_OUTPUT_LIMIT
                assert "answer is full" in response.error.message
                assert "GRPC_MAX_SEND_MESSAGE_BYTES" in response.error.message
                assert response.logs == ""
            for response in not_run:
                assert response.status.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
                assert "GRPC_MAX_SEND_MESSAGE_BYTES" in response.status.message
                error = item_error(response)
                assert error is not None and error.reason == "QUOTA_EXCEEDED"
            assert client.get_session(session.request_id).execution_count == items
    finally:
        server.stop()
    (row,) = _request_log_rows(database_url, session.request_id)
    assert row["grpc_code"] == "OK" and row["items"] == items
    assert row["error_details"] == {"items": items, "failed": len(dropped), "not_run": len(not_run)}


def _failing_starts(server: ServerThread, runtime: str) -> list[int]:
    """Make every new process of `runtime` fail to start (its worker is missing), and count
    the starts tried (the list's length)."""
    pool: Any = server.server.pool
    # the pool's view of the registry is read-only: the pool is given a patched copy
    pool._runtimes = {
        **pool._runtimes,
        runtime: replace(pool._runtimes[runtime], worker=Path("/nonexistent/worker.py")),
    }
    launcher = pool._launcher
    starts: list[int] = []
    real_start = launcher.start

    async def counted(*args: Any, **kwargs: Any) -> Any:
        starts.append(1)
        return await real_start(*args, **kwargs)

    launcher.start = counted
    return starts


def test_a_runtime_that_cannot_start_fails_the_batch_once_not_in_a_loop(database_url: str) -> None:
    runtime = replace(RuntimeSettings(timeout_seconds=5.0), prewarm_per_runtime=0)
    server = ServerThread(replace(server_settings(), runtime=runtime), database_url)
    try:
        with LambdaClient(server.target, timeout=60) as client:
            session = client.initialize("python-batch", "result = params['n']")
            starts = _failing_starts(server, "python")
            responses = client.execute_batch(session.request_id, [{"n": n} for n in range(40)], timeout=30)
            assert len(starts) <= runtime.max_environments_per_key  # one try a lane, no respawn loop
            assert all(r.HasField("status") for r in responses)
            assert {r.status.code for r in responses} == {grpc.StatusCode.UNAVAILABLE.value[0]}
            assert all("could not start" in r.status.message for r in responses)
            counts = pool_counts(client, "python")
            assert counts["busy"] == 0 and counts["idle"] == 0
    finally:
        server.stop()


def test_batches_cancelled_as_they_start_leave_no_slot_taken(database_url: str) -> None:
    server = ServerThread(server_settings(), database_url)
    try:
        with LambdaClient(server.target, timeout=60) as client:
            session = client.initialize("python-batch", SLEEPY)
            stub = pb_grpc.LambdaServiceStub(client._channel)
            request = pb.ExecuteBatchRequest(request_id=session.request_id)
            for n in range(64):
                request.params.add().update({"n": n, "s": 0.01})
            for attempt in range(30):
                call = stub.ExecuteBatch.future(request, timeout=60)
                if attempt % 3:
                    time.sleep(0.005 * attempt)
                call.cancel()
            bound = lambda: health_check(client, "environments").counts["bound"]  # noqa: E731
            # every slot goes back: nothing busy, every bound environment idle
            eventually(
                lambda: (
                    pool_counts(client, "python")["busy"] == 0
                    and bound() == pool_counts(client, "python")["idle"]
                ),
                timeout=server_settings().runtime.queue_timeout_seconds,
            )
            responses = client.execute_batch(session.request_id, [{"n": n, "s": 0} for n in range(8)])
            assert [result(r) for r in responses] == list(range(8))
            assert to_python(client.execute(session.request_id, {"n": 9, "s": 0}).result) == 9
    finally:
        server.stop()


def test_a_one_item_batch_takes_one_environment_and_evicts_nobody(database_url: str) -> None:
    auth = AuthSettings(mode="jwt", jwt_secret=SECRET, rate_limit_per_minute=0)
    runtime = replace(RuntimeSettings(timeout_seconds=5.0), max_environments=3, max_environments_per_owner=3)
    server = ServerThread(replace(server_settings(), auth=auth, runtime=runtime), database_url)
    try:
        with client_for(server.target, "alice") as alice, client_for(server.target, "bob") as bob:
            scripts = [bob.initialize("python-batch", f"result = {n}") for n in range(2)]
            for session in scripts:
                assert to_python(bob.execute(session.request_id, {}).result) is not None
            own = alice.initialize("python-batch", "result = params['n'] * 2")
            (response,) = alice.execute_batch(own.request_id, [{"n": 21}])
            assert result(response) == 42
            counts = pool_counts(alice, "python")
            assert counts["idle"] == 3 and counts["busy"] == 0  # bob's two and alice's one
            for session in scripts:  # bob's environments are still there
                state = bob.execute(session.request_id, {}).environment_state
                assert state == pb.ENVIRONMENT_STATE_WARM
    finally:
        server.stop()


def test_a_long_batch_gives_its_environments_to_another_owner_waiting(database_url: str) -> None:
    auth = AuthSettings(mode="jwt", jwt_secret=SECRET, rate_limit_per_minute=0)
    runtime = replace(
        RuntimeSettings(timeout_seconds=5.0, queue_timeout_seconds=2.0),
        max_environments=2,
        max_environments_per_owner=2,
        max_environments_per_key=2,
    )
    server = ServerThread(replace(server_settings(), auth=auth, runtime=runtime), database_url)
    try:
        with client_for(server.target, "alice") as alice, client_for(server.target, "bob") as bob:
            # a chunk of items (32 of 20 ms) is well within the queue's bound; the batch is not
            long = alice.initialize("python-batch", SLEEPY)
            quick = bob.initialize("python-quick", "result = params['n']")
            answers: list[list[pb.ExecuteResponse]] = []
            items = [{"n": n, "s": 0.02} for n in range(600)]  # 6 s at least on its 2 environments
            batch = threading.Thread(
                target=lambda: answers.append(alice.execute_batch(long.request_id, items, timeout=120))
            )
            batch.start()
            try:
                eventually(lambda: pool_counts(bob, "python")["busy"] == 2)  # the batch holds both
                for n in range(3):  # each waits at most a chunk, not the whole batch
                    assert to_python(bob.execute(quick.request_id, {"n": n}).result) == n
                assert batch.is_alive()  # bob was served while the batch ran
            finally:
                batch.join(120)
            (responses,) = answers
            assert [result(r) for r in responses] == list(range(600))
    finally:
        server.stop()
