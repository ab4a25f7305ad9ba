"""Scripts run in worker processes with the conventions of DESIGN.md, bounded by a parent-enforced timeout."""

from __future__ import annotations

import os
import time

import grpc
import pytest

from lambda_microservice import DeadlineExceededError, LambdaClient, to_python
from lambda_microservice.v1 import lambda_service_pb2 as pb
from lambda_server.runtimes.registry import Mapping, RuntimeRegistry, RuntimeSpec
from tests.support import descendants, eventually, pool_counts, settled

RUNTIME_ERROR = pb.EXECUTION_ERROR_CODE_RUNTIME_ERROR


def run(
    client: LambdaClient, title: str, script: str, params: dict[str, object] | None = None, **kw: object
) -> pb.ExecuteResponse:
    session = client.initialize(title, script, **kw)  # type: ignore[arg-type]
    return client.execute(session.request_id, params or {})


@pytest.mark.parametrize(
    "script",
    [
        "return event.params.x * 2;",
        "module.exports = async (event) => event.params.x * 2;",
        "module.exports = function (event) { return event.params.x * 2; };",
        "module.exports = (event, callback) => { setTimeout(() => callback(null, event.params.x * 2), 1); };",
        "exports.handler = async (event) => event.params.x * 2;",
        "const helper = (x) => x * 2;\nreturn await Promise.resolve(helper(params.x));",
    ],
    ids=["body", "async-export", "sync-export", "callback", "exports-handler", "await-in-body"],
)
def test_javascript_conventions(client: LambdaClient, script: str) -> None:
    response = run(client, "nodejs-conv", script, {"x": 21})
    assert not response.HasField("error"), response.error
    assert to_python(response.result) == 42


@pytest.mark.parametrize(
    "script",
    [
        "def handler(event):\n    return event['params']['x'] * 2",
        "def handle(params):\n    return params['x'] * 2",
        "result = params['x'] * 2",
        "async def handler(event):\n    return event['params']['x'] * 2",
        "import math\nresult = int(math.sqrt(params['x'] ** 2)) * 2",
    ],
    ids=["handler", "handle", "top-level", "async-handler", "stdlib"],
)
def test_python_conventions(client: LambdaClient, script: str) -> None:
    response = run(client, "python-conv", script, {"x": 21})
    assert not response.HasField("error"), response.error
    assert to_python(response.result) == 42


def test_the_event_carries_params_context_and_request_id(client: LambdaClient) -> None:
    session = client.initialize(
        "nodejs-event", "return [event.params.p, event.context.c, event.request_id];", context={"c": "ctx"}
    )
    response = client.execute(session.request_id, {"p": "par"})
    assert to_python(response.result) == ["par", "ctx", session.request_id]


def test_integers_reach_scripts_as_integers(client: LambdaClient) -> None:
    response = run(
        client, "python-int", "result = [type(params['n']).__name__, list(range(params['n']))]", {"n": 3}
    )
    assert to_python(response.result) == ["int", [0, 1, 2]]


@pytest.mark.parametrize(
    ("title", "script"),
    [
        ("nodejs-logs", "console.log('out', 1); console.error('err'); console.warn({a: 1}); return null;"),
        (
            "nodejs-streams",
            "process.stdout.write('out 1\\n'); process.stderr.write(Buffer.from('err\\n'));"
            " console.log({a: 1}); return null;",
        ),
        (
            "python-logs",
            "import sys\nprint('out', 1)\nprint('err', file=sys.stderr)\nprint({'a': 1})\nresult = None",
        ),
    ],
)
def test_console_output_is_captured_apart_from_the_result(
    client: LambdaClient, title: str, script: str
) -> None:
    response = run(client, title, script)
    assert not response.HasField("error"), response.error
    assert to_python(response.result) is None
    assert response.logs.startswith("out 1\nerr\n")
    assert "a" in response.logs


@pytest.mark.parametrize(
    ("title", "script"),
    [
        ("nodejs-noisy", "for (let i = 0; i < 200000; i++) console.log('line ' + i); return 1;"),
        ("python-noisy", "for i in range(200000):\n    print('line', i)\nresult = 1"),
    ],
)
def test_logs_are_cut_at_a_limit_with_a_marker(client: LambdaClient, title: str, script: str) -> None:
    response = run(client, title, script)
    assert to_python(response.result) == 1
    assert response.logs.endswith("[logs truncated]\n")
    assert len(response.logs.encode()) <= 64 * 1024 + 100


@pytest.mark.parametrize(
    ("title", "script"),
    [
        ("nodejs-fdwrite", "require('fs').writeSync(1, 'garbage'); process.stdout.write('more'); return 5;"),
        ("python-fdwrite", "import os\nos.write(1, b'garbage')\nos.write(2, b'more')\nresult = 5"),
    ],
)
def test_writing_to_the_raw_stdout_cannot_corrupt_the_protocol(
    client: LambdaClient, title: str, script: str
) -> None:
    response = run(client, title, script)
    assert not response.HasField("error"), response.error
    assert to_python(response.result) == 5


@pytest.mark.parametrize(
    ("title", "script", "line", "text"),
    [
        ("nodejs-throw", "const a = 1;\nthrow new Error('boom');", 2, "Error: boom"),
        (
            "nodejs-reject",
            "module.exports = async () => {\n  await null;\n  throw new TypeError('bad');\n};",
            3,
            "TypeError: bad",
        ),
        ("nodejs-callback-err", "module.exports = (e, cb) => cb(new Error('cb failed'));", 1, "cb failed"),
        ("python-raise", "x = 1\nraise ValueError('boom')", 2, "ValueError: boom"),
        ("python-handler-raise", "def handler(event):\n    y = 0\n    return 1 / y", 3, "ZeroDivisionError"),
    ],
)
def test_a_script_error_is_an_ok_response_with_message_line_and_stack(
    client: LambdaClient, title: str, script: str, line: int, text: str
) -> None:
    response = run(client, title, script)
    assert response.HasField("error")
    assert response.error.code == RUNTIME_ERROR
    assert text in response.error.message
    assert response.error.line == line
    assert "script" in response.error.stack_trace
    assert "worker" not in response.error.stack_trace  # trimmed to the user's frames


@pytest.mark.parametrize(
    ("title", "script"),
    [
        ("nodejs-nan", "return NaN;"),
        ("nodejs-fn", "return {f: () => 1};"),
        ("nodejs-cycle", "const a = {}; a.a = a; return a;"),
        ("python-set", "result = {1, 2}"),
        ("python-nan", "result = float('nan')"),
        ("python-object", "result = object()"),
    ],
)
def test_a_result_that_is_not_json_is_invalid_result(client: LambdaClient, title: str, script: str) -> None:
    response = run(client, title, script)
    assert response.error.code == pb.EXECUTION_ERROR_CODE_INVALID_RESULT, response


def test_undefined_is_null(client: LambdaClient) -> None:
    response = run(client, "nodejs-undef", "return undefined;")
    assert not response.HasField("error")
    assert to_python(response.result) is None


def test_results_of_every_json_type_round_trip(client: LambdaClient) -> None:
    value = {"s": "text ✓", "n": 1.5, "i": -7, "b": True, "z": None, "l": [1, "a", [], {}], "o": {"k": {}}}
    response = run(client, "python-echo", "result = params['v']", {"v": value})
    assert to_python(response.result) == value


@pytest.mark.parametrize(
    ("title", "script"),
    [
        ("nodejs-spin", "if (event.params.spin) { while (true) {} }\nreturn 'alive';"),
        ("python-spin", "while params.get('spin'):\n    pass\nresult = 'alive'"),
    ],
)
def test_a_script_past_its_timeout_is_killed_and_the_next_execution_works(
    client: LambdaClient, title: str, script: str
) -> None:
    session = client.initialize(title, script, context={"timeout_ms": 500})
    eventually(lambda: settled(client))
    baseline = len(descendants())
    started = time.monotonic()
    response = client.execute(session.request_id, {"spin": True})
    elapsed = time.monotonic() - started
    assert response.error.code == pb.EXECUTION_ERROR_CODE_TIMEOUT
    # cut by its own 0.5 s: the kill, the answer and the round trip may take seconds on a busy
    # machine, yet stay well under the server's default timeout (5 s), which an ignored one would reach
    assert 0.5 <= elapsed < 3.0
    # the killed environment's processes are gone; a pre-started one replaced the one it used
    eventually(lambda: settled(client) and len(descendants()) <= baseline)
    again = client.execute(session.request_id, {"spin": False})
    assert to_python(again.result) == "alive"


def test_a_worker_that_exits_is_a_runtime_error_and_is_replaced(client: LambdaClient) -> None:
    session = client.initialize(
        "python-exit", "import os\nif params.get('die'):\n    os._exit(3)\nresult = 'ok'"
    )
    response = client.execute(session.request_id, {"die": True})
    assert response.error.code == RUNTIME_ERROR
    assert "exit status 3" in response.error.message
    assert to_python(client.execute(session.request_id).result) == "ok"


def test_the_timeout_never_goes_beyond_the_calls_deadline(client: LambdaClient) -> None:
    session = client.initialize("python-deadline", "while True:\n    pass", context={"timeout_ms": 60_000})
    eventually(lambda: settled(client))
    baseline = len(descendants())
    started = time.monotonic()
    try:
        response = client.execute(session.request_id, timeout=1.5)
        assert response.error.code == pb.EXECUTION_ERROR_CODE_TIMEOUT
    except DeadlineExceededError:
        pass
    assert time.monotonic() - started < 3.0
    eventually(lambda: settled(client) and len(descendants()) <= baseline)


def test_a_cancelled_call_leaves_no_orphan_process(client: LambdaClient) -> None:
    session = client.initialize(
        "python-cancel", "import time\ntime.sleep(60)", context={"timeout_ms": 60_000}
    )
    eventually(lambda: settled(client))
    baseline = len(descendants())
    future = client._stub.Execute.future(pb.ExecuteRequest(request_id=session.request_id), timeout=30)
    eventually(lambda: pool_counts(client, "python")["busy"] == 1)
    future.cancel()
    with pytest.raises(grpc.FutureCancelledError):
        future.result()
    eventually(lambda: settled(client) and len(descendants()) <= baseline)


def test_scripts_get_no_secret_from_the_servers_environment(client: LambdaClient) -> None:
    os.environ["LAMBDA_TEST_SECRET"] = "s3cret"
    try:
        response = run(client, "python-env", "import os\nresult = dict(os.environ)")
        env = to_python(response.result)
        assert "LAMBDA_TEST_SECRET" not in env
        assert "DATABASE_URL" not in env
    finally:
        del os.environ["LAMBDA_TEST_SECRET"]


def test_an_error_thrown_in_a_callback_ends_the_execution_as_a_runtime_error(client: LambdaClient) -> None:
    script = "module.exports = (event, cb) => { setTimeout(() => { throw new RangeError('late'); }, 1); };"
    session = client.initialize("nodejs-late-throw", script, context={"timeout_ms": 5000})
    started = time.monotonic()
    response = client.execute(session.request_id)
    assert time.monotonic() - started < 2.0
    assert response.error.code == RUNTIME_ERROR
    assert "RangeError: late" in response.error.message


def test_a_node_script_writing_to_fd_2_is_not_refused_with_eagain(client: LambdaClient) -> None:
    """fs.writeSync(2, ...) past the pipe's 64 KiB waits for the server to drain it, as on
    any blocking pipe: the worker's own process.stdout and process.stderr (captured into
    the logs) never open Node's real ones, which would make fds 1 and 2 non-blocking."""
    script = (
        "const fs = require('fs'); const chunk = Buffer.alloc(61440, 120);"
        " for (let i = 0; i < 4; i++) fs.writeSync(2, chunk);"
        " process.stdout.write('out'); return 'done';"
    )
    response = run(client, "nodejs-fd2", script)
    assert not response.HasField("error"), response.error
    assert to_python(response.result) == "done" and "out" in response.logs


def test_a_title_resolved_before_the_layer_bind_sees_it_after() -> None:
    """The registry remembers resolved titles: binding the layers' folder (app wiring)
    after a title was resolved must not leave that title on the spec without the bind."""
    python = RuntimeSpec("python", interpreter="/usr/bin/python3")
    rust = RuntimeSpec("rust", interpreter="rustc")
    registry = RuntimeRegistry(
        [Mapping("python-", "prefix", "python"), Mapping("rust-", "prefix", "rust")],
        {"python": python, "rust": rust},
    )
    assert registry.resolve("python-early").binds == ()
    registry.bind("/layers")
    assert registry.resolve("python-early").binds == ("/layers",)
    assert registry.specs["python"].binds == ("/layers",)
    assert registry.resolve("rust-early").binds == ()  # compiled programs bind no layers
    registry.bind("/layers")  # once is enough
    assert registry.resolve("python-late").binds == ("/layers",)
    with pytest.raises(TypeError):
        registry.specs["python"] = python  # type: ignore[index]  # only through bind()
