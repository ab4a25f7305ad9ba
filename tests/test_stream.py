"""ExecuteStream: console output as the script writes it, then the response; cut, cancelled,
refused, logged and counted like Execute; a flood of output bounded."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import grpc
import pytest

from lambda_microservice import AsyncLambdaClient, LambdaClient, LambdaError, NotFoundError, to_python
from lambda_microservice.v1 import lambda_service_pb2 as pb
from lambda_server.config import AuthSettings, RuntimeSettings
from lambda_server.runtimes.process import output_frame_cap
from tests.support import (
    IdleCpu,
    ServerThread,
    assert_p99_within,
    descendants,
    eventually,
    p99,
    pool_counts,
    run_sync,
    server_settings,
    settled,
)
from tests.test_auth import SECRET, token
from tests.test_metrics import scrape, value
from tests.test_request_logs import fetch

STDOUT, STDERR = pb.OUTPUT_STREAM_STDOUT, pb.OUTPUT_STREAM_STDERR
EXECUTE_STREAM = "lambda_microservice.v1.LambdaService/ExecuteStream"

SLOW = {
    "python": "import time\nprint('first')\ntime.sleep(1)\nprint('second')\nresult = 'done'\n",
    "nodejs": "console.log('first');\nawait new Promise((r) => setTimeout(r, 1000));\n"
    "console.log('second');\nreturn 'done';",
    "rust": "use serde_json::Value;\n\npub fn handler(_event: Value) -> Result<Value, String> {\n"
    '    println!("first");\n    std::thread::sleep(std::time::Duration::from_secs(1));\n'
    '    println!("second");\n    Ok(Value::from("done"))\n}\n',
}

# both streams, a partial line, a flush, characters of 2 to 4 bytes
MIXED = {
    "python": "import sys\nprint('out 1')\nsys.stderr.write('err 1\\n')\nprint('part', end='')\n"
    "sys.stdout.flush()\nprint(' é€😀')\nsys.stderr.write('err 2')\nresult = 1\n",
    "nodejs": "console.log('out 1'); console.error('err 1'); process.stdout.write('part');"
    " process.stdout.write(' é€😀\\n'); process.stderr.write('err 2'); return 1;",
    "rust": "use serde_json::Value;\n\npub fn handler(_event: Value) -> Result<Value, String> {\n"
    '    println!("out 1");\n    eprintln!("err 1");\n    println!("part é€😀");\n'
    '    eprint!("err 2");\n    Ok(Value::from(1))\n}\n',
}
MIXED_OUTPUT = {
    "python": [
        (STDOUT, "out 1\n"),
        (STDERR, "err 1\n"),
        (STDOUT, "part"),
        (STDOUT, " é€😀\n"),
        (STDERR, "err 2"),
    ],
    "nodejs": [
        (STDOUT, "out 1\n"),
        (STDERR, "err 1\n"),
        (STDOUT, "part"),
        (STDOUT, " é€😀\n"),
        (STDERR, "err 2"),
    ],
    "rust": [(STDOUT, "out 1\n"), (STDERR, "err 1\n"), (STDOUT, "part é€😀\n"), (STDERR, "err 2")],
}

# 4 KiB a line of 2-byte characters, far past a 1,000-byte limit
CHATTY = {
    "python": "for i in range(40):\n    print('é' * 2047)\nresult = 1\n",
    "nodejs": "for (let i = 0; i < 40; i++) console.log('é'.repeat(2047)); return 1;",
    "rust": "use serde_json::Value;\n\npub fn handler(_event: Value) -> Result<Value, String> {\n"
    '    for _ in 0..40 {\n        println!("{}", "é".repeat(2047));\n    }\n    Ok(Value::from(1))\n}\n',
}

TITLES = {"python": "python-stream", "nodejs": "nodejs-stream", "rust": "rust-stream"}
LIMIT = 1000


def collect(
    client: LambdaClient, request_id: str, params: dict[str, object] | None = None
) -> tuple[list[tuple[float, pb.OutputChunk]], float, pb.ExecuteResponse]:
    """The chunks with their arrival times, the final message's time, and the response."""
    chunks: list[tuple[float, pb.OutputChunk]] = []
    final: pb.ExecuteResponse | None = None
    for event in client.execute_stream(request_id, params, timeout=60):
        assert final is None, "a message after the response"
        if isinstance(event, pb.OutputChunk):
            chunks.append((time.monotonic(), event))
        else:
            final, at = event, time.monotonic()
    assert final is not None
    return chunks, at, final


def check_offsets(chunks: list[pb.OutputChunk], logs: str) -> None:
    """The chunks, in order, are the logs, each at its byte offset."""
    offset = 0
    for chunk in chunks:
        assert chunk.offset == offset, (chunk, offset)
        assert chunk.stream in (STDOUT, STDERR)
        offset += len(chunk.text.encode())
    assert "".join(chunk.text for chunk in chunks) == logs.removesuffix("\n[logs truncated]\n")


def joined(chunks: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """Adjacent chunks of one stream as one."""
    merged: list[tuple[int, str]] = []
    for stream, text in chunks:
        if merged and merged[-1][0] == stream:
            merged[-1] = (stream, merged[-1][1] + text)
        else:
            merged.append((stream, text))
    return merged


def interleaves(logs: str, first: str, second: str) -> bool:
    """Whether logs is first and second merged, each in its own order (two pipes read by one thread)."""
    if len(logs) != len(first) + len(second):
        return False
    reachable = {0}  # how much of first is used after each character of logs
    for at, char in enumerate(logs):
        reachable = {
            i + step
            for i in reachable
            for step, text, index in ((1, first, i), (0, second, at - i))
            if index < len(text) and text[index] == char
        }
    return bool(reachable)


def rust_or_fail(client: LambdaClient, runtime: str) -> None:
    if runtime == "rust":  # as tests/test_rust.py: a machine without Rust fails, it never skips
        status = dict(client.health().components)["runtime.rust"]
        if not status.startswith("ok"):
            pytest.fail(f"the Rust runtime is not available here: {status}")


@pytest.fixture(scope="module")
def small_logs(database_url: str) -> Iterator[ServerThread]:
    """A server whose MAX_LOG_BYTES is 1,000."""
    runtime = replace(RuntimeSettings(timeout_seconds=20.0), max_log_bytes=LIMIT)
    running = ServerThread(server_settings(runtime=runtime), database_url)
    yield running
    running.stop()


@pytest.mark.parametrize("runtime", ["python", "nodejs", "rust"])
def test_output_arrives_as_it_is_written(client: LambdaClient, runtime: str) -> None:
    rust_or_fail(client, runtime)
    session = client.initialize(TITLES[runtime], SLOW[runtime], timeout=300)
    chunks, final_at, response = collect(client, session.request_id)
    assert not response.HasField("error"), response.error
    assert to_python(response.result) == "done"
    assert [chunk.text for _, chunk in chunks] == ["first\n", "second\n"]
    # the first line came while the script slept (1 s), not with the answer (a gap of ~0): half
    # the sleep leaves the first chunk 0.5 s to arrive late on a busy machine
    assert final_at - chunks[0][0] >= 0.5
    check_offsets([chunk for _, chunk in chunks], response.logs)
    assert not response.logs_truncated


@pytest.mark.parametrize("runtime", ["python", "nodejs", "rust"])
def test_chunks_keep_their_stream_order_and_offsets_and_make_the_logs(
    client: LambdaClient, runtime: str
) -> None:
    rust_or_fail(client, runtime)
    session = client.initialize(TITLES[runtime], MIXED[runtime], timeout=300)
    chunks, _, response = collect(client, session.request_id)
    assert not response.HasField("error"), response.error
    got = [(chunk.stream, chunk.text) for _, chunk in chunks]
    if runtime == "rust":  # two pipes read by one thread: each stream in order
        for stream in (STDOUT, STDERR):
            mine = "".join(text for s, text in got if s == stream)
            assert mine == "".join(text for s, text in MIXED_OUTPUT[runtime] if s == stream)
    else:  # the server sends chunks of one stream that queued up meanwhile as one
        assert joined(got) == joined(MIXED_OUTPUT[runtime])
    check_offsets([chunk for _, chunk in chunks], response.logs)
    # Execute's logs are the same text; Rust's two pipes may merge in another order
    unary = client.execute(session.request_id).logs
    if runtime == "rust":
        out, err = ("".join(text for s, text in MIXED_OUTPUT[runtime] if s == n) for n in (STDOUT, STDERR))
        assert interleaves(unary, out, err), unary
        assert interleaves(response.logs, out, err), response.logs
    else:
        assert unary == response.logs


@pytest.mark.parametrize("runtime", ["python", "nodejs", "rust"])
def test_output_past_max_log_bytes_is_cut_and_the_response_says_so(
    small_logs: ServerThread, runtime: str
) -> None:
    with LambdaClient(small_logs.target, timeout=300) as client:
        rust_or_fail(client, runtime)
        session = client.initialize(TITLES[runtime], CHATTY[runtime], timeout=300)
        chunks, _, response = collect(client, session.request_id)
        assert not response.HasField("error"), response.error
        assert response.logs_truncated
        assert response.logs.endswith("\n[logs truncated]\n")
        total = sum(len(chunk.text.encode()) for _, chunk in chunks)
        assert LIMIT - 3 <= total <= LIMIT  # a 2-byte character is never split
        check_offsets([chunk for _, chunk in chunks], response.logs)
        unary = client.execute(session.request_id)
        assert unary.logs_truncated and unary.logs == response.logs
        quiet = client.initialize(TITLES[runtime], SLOW[runtime], timeout=300)
        assert not client.execute(quiet.request_id).logs_truncated


def test_cancelling_mid_stream_kills_the_execution_and_the_next_call_works(client: LambdaClient) -> None:
    script = "import time\nprint('started', flush=True)\ntime.sleep(60)\nresult = 1\n"
    session = client.initialize("python-stream-cancel", script, context={"timeout_ms": 60_000})
    quick = client.initialize("python-stream-cancel", "print('hi')\nresult = 2\n")
    eventually(lambda: settled(client))
    baseline = len(descendants())
    stream = client.execute_stream(session.request_id, timeout=30)
    first = next(stream)
    assert isinstance(first, pb.OutputChunk) and first.text == "started\n"
    assert pool_counts(client, "python")["busy"] == 1
    stream.close()  # the caller leaves: the call is cancelled
    # the environment was killed (no orphan), and replaced by a pre-started one
    eventually(lambda: settled(client) and len(descendants()) <= baseline)
    chunks, _, response = collect(client, quick.request_id)
    assert to_python(response.result) == 2 and [c.text for _, c in chunks] == ["hi\n"]
    eventually(lambda: settled(client))
    baseline = len(descendants())  # with the environment `quick` keeps idle
    # and the cancelled session's next call runs in a new environment
    again = client.execute_stream(session.request_id, timeout=30)
    assert next(again).text == "started\n"
    again.close()
    eventually(lambda: settled(client) and len(descendants()) <= baseline)


def test_a_deadline_mid_stream_ends_the_execution(client: LambdaClient, server: ServerThread) -> None:
    """The server answers the call's deadline itself: its own TIMEOUT (counted before the
    answer goes, whether or not the answer beats the deadline to the caller) with what was
    streamed as its logs; the environment is killed at once, and the next call binds a new one."""
    script = "import time\nprint('started', flush=True)\ntime.sleep(60)\nresult = 1\n"
    session = client.initialize("python-stream-deadline", script, context={"timeout_ms": 60_000})
    eventually(lambda: settled(client))
    baseline = len(descendants())
    before = scrape(server)
    seen: list[object] = []
    try:
        # the first chunk must come before the deadline (a bind and a first frame, on a busy
        # machine); the script's 60 s of sleep leave the deadline what ends the call
        for event in client.execute_stream(session.request_id, timeout=2.5):
            seen.append(event)
    except LambdaError as ended:  # the deadline passed before the server's answer arrived
        assert ended.code == grpc.StatusCode.DEADLINE_EXCEEDED
    else:  # the server's TIMEOUT arrived just before the caller's deadline
        final = seen[-1]
        assert isinstance(final, pb.ExecuteResponse)
        assert final.error.code == pb.EXECUTION_ERROR_CODE_TIMEOUT
        assert final.logs == "started\n"
    assert isinstance(seen[0], pb.OutputChunk) and seen[0].text == "started\n"

    def timeouts(samples: dict[object, float]) -> float:
        return value(samples, "lambda_executions_total", runtime="python", outcome="TIMEOUT")

    # the server ended the execution itself (not gRPC's cancellation of the call): TIMEOUT
    eventually(lambda: timeouts(scrape(server)) - timeouts(before) == 1)
    # the script (60 s of sleep) was stopped: its environment is gone well before it would end
    eventually(lambda: settled(client) and len(descendants()) <= baseline, timeout=20)
    again = client.execute_stream(session.request_id, timeout=30)
    assert next(again).text == "started\n"
    again.close()
    after = scrape(server)
    binds = sum(
        value(after, "lambda_environment_binds_total", runtime="python", state=state)
        - value(before, "lambda_environment_binds_total", runtime="python", state=state)
        for state in ("prewarmed", "cold")
    )
    assert binds == 1  # the deadline's environment was replaced, not reused (WARM)
    eventually(lambda: settled(client) and len(descendants()) <= baseline)


def test_a_cached_result_streams_no_chunk(client: LambdaClient) -> None:
    session = client.initialize(
        "python-stream-cached", "print('ran')\nresult = 7\n", options={"cache_ttl": 60}
    )
    chunks, _, first = collect(client, session.request_id)
    assert [c.text for _, c in chunks] == ["ran\n"] and not first.cached
    chunks, _, second = collect(client, session.request_id)
    assert chunks == [] and second.cached and to_python(second.result) == 7


def refusal(call: object) -> tuple[grpc.StatusCode, str]:
    try:
        if callable(call):
            result = call()
            if isinstance(result, Iterator):
                list(result)
    except LambdaError as error:
        return error.code, error.reason
    raise AssertionError("not refused")


def test_refused_calls_answer_as_execute_does(client: LambdaClient, server: ServerThread) -> None:
    unknown = str(uuid.uuid4())
    for request_id in (unknown, "not-a-uuid"):
        unary = refusal(lambda r=request_id: client.execute(r))  # type: ignore[misc]
        streamed = refusal(lambda r=request_id: client.execute_stream(r))  # type: ignore[misc]
        assert unary == streamed and unary[0] != grpc.StatusCode.UNKNOWN
    assert refusal(lambda: client.execute_stream(unknown)) == (grpc.StatusCode.NOT_FOUND, "NOT_FOUND")
    session = client.initialize("python-stream-params", "result = 1")
    both = pb.ExecuteRequest(request_id=session.request_id, params_json="{}")
    both.params.update({"a": 1})
    with grpc.insecure_channel(server.target) as channel:
        stream = channel.unary_stream(
            f"/{EXECUTE_STREAM}", pb.ExecuteRequest.SerializeToString, pb.ExecuteStreamResponse.FromString
        )
        unary = channel.unary_unary(
            f"/{EXECUTE_STREAM.removesuffix('Stream')}",
            pb.ExecuteRequest.SerializeToString,
            pb.ExecuteResponse.FromString,
        )
        codes = []
        for call in (lambda: list(stream(both, timeout=10)), lambda: unary(both, timeout=10)):
            with pytest.raises(grpc.RpcError) as refused:
                call()
            codes.append(refused.value.code())
        assert codes == [grpc.StatusCode.INVALID_ARGUMENT] * 2
        raw = channel.unary_stream(f"/{EXECUTE_STREAM}", lambda raw: raw, lambda raw: raw)
        with pytest.raises(grpc.RpcError) as undecodable:
            list(raw(b"\xff\xff\xff", timeout=10))
        assert undecodable.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_auth_and_the_rate_limit_refuse_a_stream_as_execute(database_url: str) -> None:
    rate = 3
    auth = AuthSettings(mode="jwt", jwt_secret=SECRET, rate_limit_per_minute=rate)
    running = ServerThread(replace(server_settings(), auth=auth), database_url)
    try:
        with LambdaClient(running.target, timeout=20) as anonymous:
            assert refusal(lambda: anonymous.execute_stream(str(uuid.uuid4()))) == refusal(
                lambda: anonymous.execute(str(uuid.uuid4()))
            )
            assert (
                refusal(lambda: anonymous.execute_stream(str(uuid.uuid4())))[0]
                == grpc.StatusCode.UNAUTHENTICATED
            )
        bearer = (("authorization", f"Bearer {token(f'streamer-{uuid.uuid4().hex[:6]}')}"),)
        with LambdaClient(running.target, timeout=20, metadata=bearer) as client:
            session = client.initialize("python-stream-limited", "print('x')\nresult = 1")
            stub = client._stub
            request = pb.ExecuteRequest(request_id=session.request_id)
            call = stub.ExecuteStream(request, metadata=bearer, timeout=10)
            messages = list(call)
            assert messages[-1].HasField("response")
            trailing = dict(call.trailing_metadata() or ())
            assert trailing["x-ratelimit-limit"] == str(rate)
            with pytest.raises(grpc.RpcError) as limited:
                for _ in range(10):
                    list(stub.ExecuteStream(request, metadata=bearer, timeout=10))
            assert limited.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert dict(limited.value.trailing_metadata())["x-ratelimit-remaining"] == "0"
            assert (
                refusal(lambda: client.execute_stream(session.request_id))
                == refusal(lambda: client.execute(session.request_id))
                == (grpc.StatusCode.RESOURCE_EXHAUSTED, "RATE_LIMITED")
            )
    finally:
        running.stop()


def test_a_stream_is_logged_and_counted_like_execute(database_url: str) -> None:
    running = ServerThread(server_settings(), database_url)
    unknown = str(uuid.uuid4())
    try:
        with LambdaClient(running.target, timeout=20) as client:
            before = scrape(running)
            adding = client.initialize("python-stream-log", "print('adding')\nresult = params['a'] + 1")
            sleeping = client.initialize(
                "python-stream-log",
                "import time\nprint('zz', flush=True)\ntime.sleep(30)",
                context={"timeout_ms": 30_000},
            )
            chunks, _, response = collect(client, adding.request_id, {"a": 41})
            assert to_python(response.result) == 42
            with pytest.raises(NotFoundError):
                list(client.execute_stream(unknown))
            stream = client.execute_stream(sleeping.request_id)
            assert next(stream).text == "zz\n"
            stream.close()

            def moved(code: str) -> float:
                return value(
                    scrape(running), "lambda_rpc_requests_total", method=EXECUTE_STREAM, code=code
                ) - value(before, "lambda_rpc_requests_total", method=EXECUTE_STREAM, code=code)

            eventually(lambda: (moved("OK"), moved("NOT_FOUND"), moved("CANCELLED")) == (1, 1, 1))
            after = scrape(running)
            assert (
                value(after, "lambda_rpc_duration_seconds_count", method=EXECUTE_STREAM)
                - value(before, "lambda_rpc_duration_seconds_count", method=EXECUTE_STREAM)
                == 3
            )
            assert value(after, "lambda_inflight_request_bytes") == 0  # every reservation given back
    finally:
        running.stop()  # graceful: the request log is flushed
    rows = run_sync(
        fetch(
            database_url,
            "SELECT r.*, e.error_code FROM public.request_logs r"
            " LEFT JOIN public.error_logs e ON e.request_log_id = r.id"
            " WHERE r.request_id = ANY($1::text[])",
            [adding.request_id, unknown, sleeping.request_id],
        )
    )
    by_id = {row["request_id"]: row for row in rows}
    assert len(rows) == 3
    ok = by_id[adding.request_id]
    assert (ok["status_code"], ok["grpc_code"], ok["request_payload"], ok["response_payload"]) == (
        200,
        "OK",
        {"a": 41},
        42,
    )
    assert by_id[unknown]["grpc_code"] == "NOT_FOUND" and by_id[unknown]["error_code"] == "NOT_FOUND"
    assert by_id[sleeping.request_id]["grpc_code"] == "CANCELLED"


def test_a_forged_flood_of_output_frames_kills_only_its_environment(client: LambdaClient) -> None:
    """A script that writes output frames on the answer pipe itself: past the cap of a
    request's frames (output_frame_cap of its timeout, 600 and a few for the default 30 s),
    its worker is killed; the server goes on."""
    script = (
        "import json, os\n"
        "fd = int(os.environ['LAMBDA_RESPONSE_FD'])\n"
        "body = json.dumps({'id': params['id'], 'op': 'output', 'parts': [['stdout', 'x']]}).encode()\n"
        "frame = len(body).to_bytes(4, 'big') + body\n"
        "for _ in range(5000):\n    os.write(fd, frame)\n"
        "result = 1\n"
    )
    session = client.initialize("python-stream-forger", script)
    # the request ids a worker sees start at 1: whichever it guesses, the call ends in an error
    outcomes = set()
    for guess in (1, 2):
        chunks, _, response = collect(client, session.request_id, {"id": guess})
        assert len(chunks) <= output_frame_cap(30.0)
        outcomes.add(response.error.code)
    assert outcomes == {pb.EXECUTION_ERROR_CODE_RUNTIME_ERROR}
    ok = client.initialize("python-stream-forger", "print('fine')\nresult = 3")
    assert to_python(collect(client, ok.request_id)[2].result) == 3


def test_a_flood_of_tiny_lines_costs_a_bounded_number_of_messages_and_spares_a_second_tenant(
    database_url: str,
) -> None:
    auth = AuthSettings(mode="jwt", jwt_secret=SECRET, rate_limit_per_minute=1_000_000)
    running = ServerThread(replace(server_settings(), auth=auth), database_url)
    flood = {
        "python": "for i in range(1_000_000):\n    print('x')\nresult = 1\n",
        "nodejs": "for (let i = 0; i < 1000000; i++) console.log('x'); return 1;",
    }
    try:
        attacker_md = (("authorization", f"Bearer {token('flooder')}"),)
        victim_md = (("authorization", f"Bearer {token('bystander')}"),)
        with (
            LambdaClient(running.target, timeout=60, metadata=attacker_md) as attacker,
            LambdaClient(running.target, timeout=20, metadata=victim_md) as victim,
        ):
            sessions = {
                runtime: attacker.initialize(f"{runtime}-flood", script).request_id
                for runtime, script in flood.items()
            }
            quick = victim.initialize("python-bystander", "result = params['n'] + 1").request_id

            def latencies(count: int = 150) -> list[float]:
                samples = []
                for n in range(count):
                    started = time.perf_counter()
                    assert to_python(victim.execute(quick, {"n": n}).result) == n + 1
                    samples.append(time.perf_counter() - started)
                return samples

            latencies(20)  # warm
            with IdleCpu() as idle:
                alone = [p99(latencies())]
            counts: list[tuple[str, int, int, bool]] = []
            stop = threading.Event()

            def attack() -> None:
                while not stop.is_set():
                    for runtime, request_id in sessions.items():
                        chunks, _, response = collect(attacker, request_id)
                        assert not response.HasField("error"), response.error
                        size = sum(len(c.text.encode()) for _, c in chunks)
                        counts.append((runtime, len(chunks), size, response.logs_truncated))

            thread = threading.Thread(target=attack)
            thread.start()
            try:
                eventually(lambda: len(counts) >= 1, timeout=30)
                during = [p99(latencies()) for _ in range(2)]
            finally:
                stop.set()
                thread.join(120)
            alone.append(p99(latencies()))
    finally:
        running.stop()
    print(f"flood executions (runtime, messages, bytes, cut): {counts}")
    assert {runtime for runtime, *_ in counts} == set(flood)
    for runtime, messages, size, truncated in counts:
        # 256 lines at once, then at most 10 frames a second: never a message per line
        assert messages < 500, (runtime, messages)
        assert size <= 65536 and truncated, (runtime, size)
    assert_p99_within(alone, during, idle.fraction, factor=3.0)


def test_the_async_client_streams_too(server: ServerThread, client: LambdaClient) -> None:
    session = client.initialize("python-stream-async", "print('a')\nprint('b')\nresult = 9")

    async def run() -> list[object]:
        async with AsyncLambdaClient(server.target, timeout=20) as aclient:
            return [event async for event in aclient.execute_stream(session.request_id)]

    events = asyncio.run(run())
    assert all(isinstance(e, pb.OutputChunk) for e in events[:-1])
    assert "".join(e.text for e in events[:-1]) == "a\nb\n"  # type: ignore[attr-defined]
    assert isinstance(events[-1], pb.ExecuteResponse) and to_python(events[-1].result) == 9


def test_lambda_cli_exec_follow_prints_output_as_it_comes(server: ServerThread, client: LambdaClient) -> None:
    script = (
        "import sys, time\nprint('out line')\nsys.stderr.write('err line\\n')\ntime.sleep(1)\nresult = 5\n"
    )
    session = client.initialize("python-stream-cli", script)
    cli = Path(sys.executable).parent / "lambda-cli"
    argv = [str(cli), "--target", server.target, "exec", session.request_id, "--follow"]
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None and process.stderr is not None
        first = process.stdout.readline()
        first_at = time.monotonic()
        assert first == "out line\n"
        assert process.stderr.readline() == "err line\n"
        rest, err = process.communicate(timeout=30)
        ended = time.monotonic()
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, err
    assert ended - first_at >= 0.5  # the line came while it slept (1 s), not at the end (~0)
    answer = json.loads(rest)  # the output was printed once, as it came: not again in the answer
    assert answer["result"] == 5 and "logs" not in answer and "error" not in answer
    plain = subprocess.run(argv[:-1], capture_output=True, text=True, timeout=30, check=True)
    assert json.loads(plain.stdout)["logs"] == "out line\nerr line\n"  # without --follow: in the answer


# thousands of lines, each stream in turn: a frame a part would be 6,000 frames
ALTERNATING = {
    "python": "import sys\nfor i in range(3000):\n    print(i)\n    print(i, file=sys.stderr)\nresult = 1\n",
    "nodejs": "for (let i = 0; i < 3000; i++) { console.log(i); console.error(i); } return 1;",
    "rust": "use serde_json::Value;\n\npub fn handler(_event: Value) -> Result<Value, String> {\n"
    '    for i in 0..3000 {\n        println!("{}", i);\n        eprintln!("{}", i);\n    }\n'
    "    Ok(Value::from(1))\n}\n",
}


@pytest.mark.parametrize("runtime", ["python", "nodejs", "rust"])
def test_a_script_alternating_its_streams_thousands_of_times_streams_whole(
    client: LambdaClient, runtime: str
) -> None:
    rust_or_fail(client, runtime)
    session = client.initialize(TITLES[runtime], ALTERNATING[runtime], timeout=300)
    chunks, _, response = collect(client, session.request_id)
    assert not response.HasField("error"), response.error
    assert to_python(response.result) == 1 and not response.logs_truncated
    check_offsets([chunk for _, chunk in chunks], response.logs)
    for stream in (STDOUT, STDERR):  # each stream whole, in order
        text = "".join(chunk.text for _, chunk in chunks if chunk.stream == stream)
        assert text == "".join(f"{i}\n" for i in range(3000))
    if runtime != "rust":  # one writer: the two streams interleave as written
        assert response.logs == "".join(f"{i}\n{i}\n" for i in range(3000))


LOGGING = (
    "import logging\n\n"
    "def handler(event):\n"
    "    n = event['params']['n']\n"
    "    logging.basicConfig(level=logging.INFO, format='log %(message)s')  # its first call only\n"
    "    logging.info('n=%s', n)\n"
    "    print('out', n)\n"
    "    return n\n"
)


def test_a_logging_handler_made_in_one_execution_writes_to_each_later_one(client: LambdaClient) -> None:
    """logging.basicConfig() keeps the sys.stderr of its first execution: its later records
    go to the execution under way (streamed or batched), never as output of one that ended."""
    session = client.initialize("python-stream-logging", LOGGING)
    chunks, _, first = collect(client, session.request_id, {"n": 1})
    assert to_python(first.result) == 1 and first.logs == "log n=1\nout 1\n"
    check_offsets([chunk for _, chunk in chunks], first.logs)
    items = client.execute_batch(session.request_id, [{"n": n} for n in range(2, 6)])
    for n, item in zip(range(2, 6), items, strict=True):
        assert not item.HasField("error") and not item.HasField("status"), (n, item)
        assert to_python(item.result) == n and item.logs == f"log n={n}\nout {n}\n"
    for n in (6, 7):
        chunks, _, response = collect(client, session.request_id, {"n": n})
        assert to_python(response.result) == n and response.logs == f"log n={n}\nout {n}\n"
        check_offsets([chunk for _, chunk in chunks], response.logs)
        got = joined([(c.stream, c.text) for _, c in chunks])
        assert got == [(STDERR, f"log n={n}\n"), (STDOUT, f"out {n}\n")]


HANGING = {
    "python": "import sys, time\nprint('before')\nprint('err', file=sys.stderr)\ntime.sleep(30)\n",
    "nodejs": "console.log('before'); console.error('err'); await new Promise((r) => setTimeout(r, 30000));"
    " return 1;",
    "rust": "use serde_json::Value;\n\npub fn handler(_event: Value) -> Result<Value, String> {\n"
    '    println!("before");\n    eprintln!("err");\n'
    "    std::thread::sleep(std::time::Duration::from_secs(30));\n    Ok(Value::from(1))\n}\n",
}


@pytest.mark.parametrize("runtime", ["python", "nodejs", "rust"])
def test_a_streamed_script_past_its_timeout_answers_what_it_printed(
    client: LambdaClient, runtime: str
) -> None:
    rust_or_fail(client, runtime)
    session = client.initialize(TITLES[runtime], HANGING[runtime], options={"timeout": 1}, timeout=300)
    chunks, _, response = collect(client, session.request_id)
    assert response.error.code == pb.EXECUTION_ERROR_CODE_TIMEOUT
    texts = sorted("".join(c.text for _, c in chunks if c.stream == s) for s in (STDOUT, STDERR))
    assert texts == ["before\n", "err\n"]
    assert response.logs == "".join(c.text for _, c in chunks) and not response.logs_truncated
    check_offsets([chunk for _, chunk in chunks], response.logs)
    assert client.execute(session.request_id).logs == ""  # not streamed: as before, none


def test_a_streamed_script_that_crashes_or_floods_then_hangs_answers_its_cut_output(
    small_logs: ServerThread,
) -> None:
    crashing = "import os\nprint('bye', flush=True)\nos._exit(3)\n"
    flooding = "import time\nfor i in range(40):\n    print('é' * 2047)\ntime.sleep(30)\nresult = 1\n"
    with LambdaClient(small_logs.target, timeout=60) as client:
        session = client.initialize("python-stream-crash", crashing)
        chunks, _, response = collect(client, session.request_id)
        assert response.error.code == pb.EXECUTION_ERROR_CODE_RUNTIME_ERROR, response.error
        assert [c.text for _, c in chunks] == ["bye\n"] and response.logs == "bye\n"
        session = client.initialize("python-stream-flood", flooding, options={"timeout": 1})
        chunks, _, response = collect(client, session.request_id)
        assert response.error.code == pb.EXECUTION_ERROR_CODE_TIMEOUT
        assert response.logs_truncated and response.logs.endswith("\n[logs truncated]\n")
        assert LIMIT - 3 <= sum(len(c.text.encode()) for _, c in chunks) <= LIMIT
        check_offsets([chunk for _, chunk in chunks], response.logs)


LINGERING_THREAD = (
    "use serde_json::Value;\nuse std::sync::Once;\nuse std::time::Duration;\n\n"
    "static START: Once = Once::new();\n\n"
    "pub fn handler(_event: Value) -> Result<Value, String> {\n"
    "    START.call_once(|| {\n"
    "        std::thread::spawn(|| loop {\n"
    '            println!("late");\n'
    "            std::thread::sleep(Duration::from_millis(1));\n"
    "        });\n"
    "    });\n"
    "    std::thread::sleep(Duration::from_millis(50));\n"
    '    println!("done");\n'
    "    Ok(Value::from(1))\n"
    "}\n"
)


def test_rust_output_written_between_executions_is_in_no_execution(client: LambdaClient) -> None:
    """A thread the handler left prints all the time, between executions too: what it wrote
    during an execution is that execution's (streamed and in its logs), what it wrote
    between them is dropped, never in logs that no chunk carried."""
    rust_or_fail(client, "rust")
    session = client.initialize("rust-stream-thread", LINGERING_THREAD, timeout=300)
    for _ in range(3):
        chunks, _, response = collect(client, session.request_id)
        assert not response.HasField("error"), response.error
        assert "done\n" in response.logs and "late\n" in response.logs
        check_offsets([chunk for _, chunk in chunks], response.logs)


def test_python_sends_text_held_by_the_frame_rate_with_its_next_write_past_the_interval(
    client: LambdaClient,
) -> None:
    """Past its first 256 frames, Python's worker holds what comes within 100 ms of the last
    frame; its next write after that goes at once, and takes what was held with it."""
    script = (
        "import time\nfor i in range(400):\n    print(i)\ntime.sleep(0.5)\nprint('tick')\n"
        "time.sleep(1)\nresult = 1\n"
    )
    session = client.initialize("python-stream-held", script)
    chunks, final_at, response = collect(client, session.request_id)
    assert not response.HasField("error"), response.error
    check_offsets([chunk for _, chunk in chunks], response.logs)
    ticked = next(n for n, (_, chunk) in enumerate(chunks) if "tick\n" in chunk.text)
    lines = "".join(f"{i}\n" for i in range(400))
    assert "".join(c.text for _, c in chunks[: ticked + 1]) == lines + "tick\n"
    # it came while the script slept (1 s), not at its end (a gap of ~0)
    assert final_at - chunks[ticked][0] >= 0.5
