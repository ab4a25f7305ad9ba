"""Exact JSON: result_json and params_json keep integers of any size and 1 apart from 1.0, and
a result no client can read (too deep, a number JSON cannot carry, a string that is not valid
Unicode) is INVALID_RESULT with the environment kept, in each runtime where it can happen."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator

import asyncpg
import grpc
import pytest

from lambda_microservice import LambdaClient, to_python
from lambda_microservice.v1 import lambda_service_pb2 as pb
from lambda_microservice.v1 import lambda_service_pb2_grpc as pb_grpc
from lambda_server.app import new_event_loop
from lambda_server.runtimes.process import WorkerProcess
from tests.support import ServerThread, error_info, run_sync, server_settings

INVALID_RESULT = pb.EXECUTION_ERROR_CODE_INVALID_RESULT
RUNTIME_ERROR = pb.EXECUTION_ERROR_CODE_RUNTIME_ERROR
WARM = pb.ENVIRONMENT_STATE_WARM
BIG = 2**62 + 1  # no double holds it: 4611686018427388000 as a double
PAST_64_BITS = 2**80 + 1
DEPTH = 32  # MAX_JSON_DEPTH's default

# Each script counts its calls in its process: the count after a refused result shows
# that the same process (the same environment) went on.
PYTHON = r"""
calls = 0

def nested(depth):
    value = calls
    for _ in range(depth):
        value = [value]
    return value

def handler(event):
    global calls
    calls += 1
    params = event["params"]
    kind = params.get("kind")
    if kind == "big":
        return [2**62 + 1, -(2**62 + 1), 1, 1.0, 2.5, -0.0]
    if kind == "echo":
        n = params["n"]
        return {"n": n, "type": type(n).__name__, "next": n + 1 if isinstance(n, int) else None}
    if kind == "deep":
        return nested(params["depth"])
    if kind == "deep_objects":
        value = calls
        for _ in range(params["depth"]):
            value = {"a": value}
        return value
    if kind == "nan":
        return {"x": float("nan")}
    if kind == "infinity":
        return [float("inf")]
    if kind == "huge":
        return {"x": 10**400}
    if kind == "huge_float_text":
        return 2**1023  # within a double's range: carried exactly
    if kind == "surrogate":
        return {"s": "\ud800"}
    if kind == "surrogate_key":
        return {"\udc00": 1}
    if kind == "raise_surrogate":
        raise ValueError("bad \ud800 text")
    return calls
"""

NODE = r"""
let calls = 0;
function nested(depth) {
  let value = calls;
  for (let i = 0; i < depth; i++) value = [value];
  return value;
}
module.exports = async (event) => {
  calls += 1;
  const params = event.params;
  switch (params.kind) {
    case 'numbers': return [1, 1.5, -0, 2 ** 53];
    case 'deep': return nested(params.depth);
    case 'nan': return { x: NaN };
    case 'infinity': return [Infinity];
    case 'bigint': return 2n ** 62n;
    case 'surrogate': return { s: '\uD800' };
    case 'surrogate_key': return { '\uDC00': 1 };
    case 'escaped_backslash': return '\\ud800';
    case 'pair': return '\uD83D\uDE00';
    case 'raise_surrogate': throw new Error('bad \uD800 text');
    default: return calls;
  }
};
"""

RUST = r"""
use serde_json::{json, Value};
use std::sync::atomic::{AtomicU64, Ordering};

static CALLS: AtomicU64 = AtomicU64::new(0);

pub fn handler(event: Value) -> Result<Value, String> {
    let calls = CALLS.fetch_add(1, Ordering::SeqCst) + 1;
    let params = &event["params"];
    match params["kind"].as_str().unwrap_or("") {
        "big" => Ok(json!([4611686018427387905u64, u64::MAX, i64::MIN, 1, 1.0])),
        "echo" => {
            let n = params["n"].as_u64().ok_or("n must be a u64")?;
            Ok(json!({"n": n, "next": n + 1}))
        }
        "deep" => {
            let mut value = Value::from(calls);
            for _ in 0..params["depth"].as_u64().unwrap_or(0) {
                value = json!([value]);
            }
            Ok(value)
        }
        "nan" => Ok(json!({"nan": f64::NAN, "infinity": f64::INFINITY})),
        _ => Ok(Value::from(calls)),
    }
}
"""


@pytest.fixture(scope="module")
def stub(server: ServerThread) -> Iterator[pb_grpc.LambdaServiceStub]:
    """The generated stub, to send what the client library would not (both params fields)."""
    with grpc.insecure_channel(server.target) as channel:
        yield pb_grpc.LambdaServiceStub(channel)


@pytest.fixture(scope="module")
def python_session(client: LambdaClient) -> str:
    return client.initialize("python-exact", PYTHON).request_id


@pytest.fixture(scope="module")
def node_session(client: LambdaClient) -> str:
    return client.initialize("nodejs-exact", NODE).request_id


@pytest.fixture(scope="module")
def rust_session(client: LambdaClient) -> str:
    status = client.health().components["runtime.rust"]
    if not status.startswith("ok"):
        pytest.fail(f"the Rust runtime is not available here: {status}")
    return client.initialize("rust-exact", RUST, timeout=120.0).request_id


def execute(client: LambdaClient, session: str, **params: object) -> pb.ExecuteResponse:
    return client.execute(session, params, timeout=60.0)


def calls(client: LambdaClient, session: str) -> tuple[int, pb.EnvironmentState.ValueType]:
    """The process's count of calls, and how this call found its environment."""
    response = execute(client, session)
    assert not response.HasField("error"), response.error
    return json.loads(response.result_json), response.environment_state


def assert_refused_and_kept(client: LambdaClient, session: str, kind: str, code: int = INVALID_RESULT) -> str:
    """`kind`'s result is refused with `code`; the same process answers the next call, warm."""
    before, _ = calls(client, session)
    response = execute(client, session, kind=kind)
    assert response.error.code == code, response
    assert response.environment_state == WARM
    assert not response.HasField("result") and response.result_json == ""
    after, state = calls(client, session)
    assert (after, state) == (before + 2, WARM)  # same process: it counted the refused call
    return response.error.message


# result_json: exact integers, 1 apart from 1.0


def test_python_integers_past_2_53_are_exact_in_result_json(
    client: LambdaClient, python_session: str
) -> None:
    response = execute(client, python_session, kind="big")
    assert not response.HasField("error"), response.error
    assert response.result_json == "[4611686018427387905, -4611686018427387905, 1, 1.0, 2.5, -0.0]"
    exact = json.loads(response.result_json)
    assert exact == [BIG, -BIG, 1, 1.0, 2.5, -0.0]
    assert [type(item) for item in exact] == [int, int, int, float, float, float]
    assert response.result.list_value.values[0].number_value == float(BIG)  # the Value holds a double
    assert to_python(response.result)[:3] == [float(BIG), -float(BIG), 1]


def test_an_integer_within_a_doubles_range_is_carried_whole(
    client: LambdaClient, python_session: str
) -> None:
    response = execute(client, python_session, kind="huge_float_text")
    assert not response.HasField("error"), response.error
    assert json.loads(response.result_json) == 2**1023
    assert response.result.number_value == float(2**1023)


def test_rust_64_bit_integers_are_exact_in_result_json(client: LambdaClient, rust_session: str) -> None:
    response = execute(client, rust_session, kind="big")
    assert not response.HasField("error"), response.error
    exact = json.loads(response.result_json)
    assert exact == [BIG, 2**64 - 1, -(2**63), 1, 1.0]
    assert [type(item) for item in exact] == [int, int, int, int, float]


def test_node_numbers_are_doubles_written_as_javascript_writes_them(
    client: LambdaClient, node_session: str
) -> None:
    response = execute(client, node_session, kind="numbers")
    assert response.result_json == "[1,1.5,0,9007199254740992]"
    assert json.loads(response.result_json) == [1, 1.5, 0, 2**53]


def test_a_cached_hit_answers_the_same_result_json(client: LambdaClient) -> None:
    session = client.initialize(
        "python-exact-cached", "import random\nresult = [2**62 + 1, 1.0, random.random()]"
    )
    first = client.execute(session.request_id, cache_control="max-age=60")
    again = client.execute(session.request_id, cache_control="max-age=60")
    assert (first.cached, again.cached) == (False, True)
    assert again.result_json == first.result_json
    assert json.loads(again.result_json)[:2] == [BIG, 1.0]
    assert to_python(again.result) == to_python(first.result)


# params_json: read exactly, refused like params


@pytest.mark.parametrize("n", [BIG, PAST_64_BITS, -PAST_64_BITS])
def test_params_json_hands_a_python_script_its_integers_exactly(
    client: LambdaClient, stub: pb_grpc.LambdaServiceStub, python_session: str, n: int
) -> None:
    request = pb.ExecuteRequest(request_id=python_session, params_json=f'{{"kind": "echo", "n": {n}}}')
    response = stub.Execute(request, timeout=60)
    assert not response.HasField("error"), response.error
    assert json.loads(response.result_json) == {"n": n, "type": "int", "next": n + 1}


def test_params_json_keeps_1_apart_from_1_0(stub: pb_grpc.LambdaServiceStub, python_session: str) -> None:
    request = pb.ExecuteRequest(request_id=python_session, params_json='{"kind": "echo", "n": 1.0}')
    assert json.loads(stub.Execute(request, timeout=60).result_json) == {
        "n": 1.0,
        "type": "float",
        "next": None,
    }
    request = pb.ExecuteRequest(request_id=python_session, params_json='{"kind": "echo", "n": 1}')
    assert json.loads(stub.Execute(request, timeout=60).result_json)["type"] == "int"


def test_params_json_hands_a_rust_script_its_u64_exactly(
    stub: pb_grpc.LambdaServiceStub, rust_session: str
) -> None:
    request = pb.ExecuteRequest(request_id=rust_session, params_json=f'{{"kind": "echo", "n": {BIG}}}')
    response = stub.Execute(request, timeout=60)
    assert not response.HasField("error"), response.error
    assert json.loads(response.result_json) == {"n": BIG, "next": BIG + 1}


def test_params_and_params_json_both_set_is_invalid_argument(
    stub: pb_grpc.LambdaServiceStub, python_session: str
) -> None:
    for params in ({"kind": "echo"}, {}):  # an empty Struct sent is set too
        request = pb.ExecuteRequest(request_id=python_session, params=params, params_json='{"kind": "echo"}')
        with pytest.raises(grpc.RpcError) as refused:
            stub.Execute(request, timeout=60)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        info = error_info(refused.value)
        assert (info.reason, info.metadata["field"]) == ("INVALID_REQUEST", "params_json")


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("[1, 2]", "array, not an object"),
        ('"text"', "string, not an object"),
        ("{", "not JSON"),
        ('{"a": 1} trailing', "not JSON"),
        ('{"a": NaN}', "NaN"),
        ('{"a": -Infinity}', "Infinity"),
        ('{"a": 1e400}', "past a double's range"),
        ('{"a": 1' + "0" * 400 + "}", "past a double's range"),
        ('{"a": "\\ud800"}', "not valid Unicode"),
        ('{"\\udc00": 1}', "not valid Unicode"),
    ],
    ids=["array", "string", "truncated", "trailing", "nan", "infinity", "float-overflow", "int-overflow",
         "lone-surrogate", "lone-surrogate-key"],
)  # fmt: skip
def test_params_json_that_is_not_a_json_object_a_script_can_take_is_invalid_argument(
    stub: pb_grpc.LambdaServiceStub, python_session: str, text: str, says: str
) -> None:
    with pytest.raises(grpc.RpcError) as refused:
        stub.Execute(pb.ExecuteRequest(request_id=python_session, params_json=text), timeout=60)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    info = error_info(refused.value)
    assert (info.reason, info.metadata["field"]) == ("INVALID_REQUEST", "params_json")
    assert says in refused.value.details()


@pytest.mark.parametrize(
    ("text", "setting"),
    [
        ('{"a": [' + ",".join(["1"] * 100_000) + "]}", "MAX_JSON_NODES"),  # 100,002 values
        ('{"a": ' * (DEPTH + 1) + "1" + "}" * (DEPTH + 1), "MAX_JSON_DEPTH"),  # 33 objects
        ('{"a": ' + "[" * 5000 + "]" * 5000 + "}", "MAX_JSON_DEPTH"),  # past the parsers' own limits
    ],
    ids=["nodes", "depth", "parser-depth"],
)
def test_params_json_past_the_json_bounds_is_invalid_argument_naming_the_setting(
    stub: pb_grpc.LambdaServiceStub, python_session: str, text: str, setting: str
) -> None:
    with pytest.raises(grpc.RpcError) as refused:
        stub.Execute(pb.ExecuteRequest(request_id=python_session, params_json=text), timeout=60)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    info = error_info(refused.value)
    assert (info.metadata["field"], info.metadata["setting"]) == ("params_json", setting)
    assert setting in refused.value.details()


def test_params_json_at_the_json_bounds_is_served(
    stub: pb_grpc.LambdaServiceStub, python_session: str
) -> None:
    deep = '{"a": ' * (DEPTH - 1) + '{"kind": "echo", "n": 7}' + "}" * (DEPTH - 1)  # 32 objects
    assert not stub.Execute(
        pb.ExecuteRequest(request_id=python_session, params_json=deep), timeout=60
    ).error.code
    many = '{"kind": "echo", "n": 1, "a": [' + ",".join(["1"] * 99_996) + "]}"  # 100,000 values
    response = stub.Execute(pb.ExecuteRequest(request_id=python_session, params_json=many), timeout=60)
    assert json.loads(response.result_json)["next"] == 2


# Results nested up to MAX_JSON_DEPTH are read by the project's client; one level more is refused


@pytest.mark.parametrize("runtime", ["python", "node", "rust"])
def test_a_result_at_the_depth_limit_is_read_by_the_client_and_one_past_it_is_invalid_result(
    client: LambdaClient, runtime: str, request: pytest.FixtureRequest
) -> None:
    session = request.getfixturevalue(f"{runtime}_session")
    response = execute(client, session, kind="deep", depth=DEPTH)  # decoded by LambdaClient itself
    assert not response.HasField("error"), response.error
    exact, converted = json.loads(response.result_json), to_python(response.result)
    for _ in range(DEPTH):
        assert isinstance(exact, list) and isinstance(converted, list)
        exact, converted = exact[0], converted[0]
    assert exact == converted and isinstance(exact, int)
    before, _ = calls(client, session)
    refused = execute(client, session, kind="deep", depth=DEPTH + 1)
    assert refused.error.code == INVALID_RESULT
    assert "MAX_JSON_DEPTH" in refused.error.message
    assert (refused.environment_state, refused.result_json) == (WARM, "")
    assert calls(client, session) == (before + 2, WARM)


def test_a_result_of_objects_at_the_depth_limit_is_read_by_the_client(
    client: LambdaClient, python_session: str
) -> None:
    response = execute(client, python_session, kind="deep_objects", depth=DEPTH)
    assert not response.HasField("error"), response.error
    assert json.loads(response.result_json) == to_python(response.result)
    assert execute(client, python_session, kind="deep_objects", depth=DEPTH + 1).error.code == INVALID_RESULT


# Numbers JSON cannot carry, and strings that are not valid Unicode: INVALID_RESULT, environment kept


@pytest.mark.parametrize(
    ("kind", "says"),
    [
        ("nan", "Out of range float"),
        ("infinity", "Out of range float"),
        ("huge", "past a double's range"),
        ("surrogate", "not valid Unicode"),
        ("surrogate_key", "not valid Unicode"),
    ],
)
def test_python_results_json_cannot_carry_are_invalid_result_and_the_environment_is_kept(
    client: LambdaClient, python_session: str, kind: str, says: str
) -> None:
    assert says in assert_refused_and_kept(client, python_session, kind)


@pytest.mark.parametrize(
    ("kind", "says"),
    [
        ("nan", "NaN"),
        ("infinity", "Infinity"),
        ("bigint", "bigint"),
        ("surrogate", "not valid Unicode"),
        ("surrogate_key", "not valid Unicode"),
    ],
)
def test_node_results_json_cannot_carry_are_invalid_result_and_the_environment_is_kept(
    client: LambdaClient, node_session: str, kind: str, says: str
) -> None:
    assert says in assert_refused_and_kept(client, node_session, kind)


def test_node_strings_that_only_look_like_surrogate_escapes_are_results(
    client: LambdaClient, node_session: str
) -> None:
    assert json.loads(execute(client, node_session, kind="escaped_backslash").result_json) == "\\ud800"
    assert json.loads(execute(client, node_session, kind="pair").result_json) == "\U0001f600"


@pytest.mark.parametrize("runtime", ["python", "node"])
def test_an_error_message_with_a_lone_surrogate_is_a_runtime_error_and_the_environment_is_kept(
    client: LambdaClient, runtime: str, request: pytest.FixtureRequest
) -> None:
    session = request.getfixturevalue(f"{runtime}_session")
    message = assert_refused_and_kept(client, session, "raise_surrogate", RUNTIME_ERROR)
    assert "bad" in message and "text" in message


def test_rust_non_finite_floats_become_null_as_serde_json_makes_them(
    client: LambdaClient, rust_session: str
) -> None:
    response = execute(client, rust_session, kind="nan")
    assert not response.HasField("error"), response.error
    assert json.loads(response.result_json) == {"nan": None, "infinity": None}


# The server's own line: what a worker writes is read by json_text, whatever the worker is

FAKE_WORKER = r"""
import os, sys
fd = int(os.environ["LAMBDA_RESPONSE_FD"])
def send(body):
    os.write(fd, len(body).to_bytes(4, "big") + body)
send(b'{"op": "ready"}')
results = [b"10" + b"0" * 400, b"NaN", b"[1e400]", b'"\\ud800"', b'"\xed\xa0\x80"', b"\xff", b"[1,"]
results.append(b"[18446744073709551617, 1.0]")
answers = [b"}\n" + result for result in results]
for answer in answers:
    size = int.from_bytes(sys.stdin.buffer.read(4), "big")
    request = sys.stdin.buffer.read(size)
    request_id = request.split(b'"id":')[1].split(b"}")[0].split(b",")[0]
    send(b'{"id":' + request_id + b',"ok":true,"logs":"","cpu":0,"peak":0' + answer)
sys.stdin.buffer.read()
"""


def test_the_server_refuses_a_result_json_cannot_carry_whatever_the_worker_and_keeps_the_worker() -> None:
    async def scenario() -> list[dict[str, object]]:
        worker = await WorkerProcess.spawn(
            [sys.executable, "-c", FAKE_WORKER], {"PATH": os.environ["PATH"]}, timeout=10, max_frame=4096
        )
        try:
            answers = [await worker.request({"op": "run", "event": {}}, timeout=10) for _ in range(8)]
            assert worker.alive()
            return answers
        finally:
            await worker.kill()

    loop = new_event_loop()
    try:
        answers = loop.run_until_complete(scenario())
    finally:
        loop.close()
    for answer in answers[:-1]:
        assert answer["ok"] is False and "result" not in answer, answer
        assert answer["error"]["code"] == "INVALID_RESULT"  # type: ignore[index]
    exact = answers[-1]
    assert exact["ok"] is True
    assert exact["result"] == [2**64 + 1, 1.0]
    assert exact["result_json"] == "[18446744073709551617, 1.0]"


def test_the_request_log_keeps_params_json_and_result_integers_exactly(database_url: str) -> None:
    server = ServerThread(server_settings(), database_url)
    try:
        with LambdaClient(server.target, timeout=60) as client:
            session = client.initialize("python-exact-logged", PYTHON).request_id
            with grpc.insecure_channel(server.target) as channel:
                request = pb.ExecuteRequest(
                    request_id=session, params_json=f'{{"kind": "echo", "n": {PAST_64_BITS}}}'
                )
                assert not pb_grpc.LambdaServiceStub(channel).Execute(request, timeout=60).HasField("error")
    finally:
        server.stop()  # graceful: the queued log rows are written now
    rows = run_sync(fetch_logs(database_url, session))
    assert len(rows) == 1
    assert json.loads(rows[0]["request_payload"]) == {"kind": "echo", "n": PAST_64_BITS}
    assert json.loads(rows[0]["response_payload"])["next"] == PAST_64_BITS + 1


async def fetch_logs(url: str, request_id: str) -> list[asyncpg.Record]:
    """The session's request-log rows, their payloads as JSON text."""
    conn = await asyncpg.connect(url, timeout=10)
    try:
        query = (
            "SELECT request_payload::text, response_payload::text"
            " FROM public.request_logs WHERE request_id = $1"
        )
        rows: list[asyncpg.Record] = await conn.fetch(query, request_id)
        return rows
    finally:
        await conn.close()


def test_the_client_sends_big_integers_as_params_json_and_reads_them_back_exactly(
    client: LambdaClient, python_session: str
) -> None:
    """LambdaClient.execute sends params holding an integer past 2**53 as params_json (a
    Struct would round it), and lambda_microservice.result reads result_json exactly."""
    from lambda_microservice import result
    from lambda_microservice.client import _execute_request

    assert not _execute_request(python_session, {"n": 5}, "").params_json
    sent = _execute_request(python_session, {"kind": "echo", "n": BIG}, "")
    assert sent.params_json and not sent.HasField("params")
    response = execute(client, python_session, kind="echo", n=BIG)
    assert not response.HasField("error"), response.error
    assert result(response) == {"n": BIG, "type": "int", "next": BIG + 1}
    small = execute(client, python_session, kind="echo", n=400000)
    assert result(small) == {"n": 400000, "type": "int", "next": 400001}


def test_the_deepest_depth_a_setting_allows_is_what_a_protobuf_client_reads() -> None:
    """MAX_JSON_DEPTH_CEILING: an answer nested that deep decodes with protobuf's default
    limit (the client's); two levels more do not, so the ceiling is not loose."""
    from google.protobuf import struct_pb2
    from google.protobuf.message import DecodeError

    from lambda_server.config import MAX_JSON_DEPTH_CEILING

    def answer(depth: int) -> bytes:
        """An answer whose result is `depth` lists deep."""
        value: object = 1
        for _ in range(depth):
            value = [value]
        response = pb.ExecuteResponse(request_id="x")
        struct = struct_pb2.Struct()
        struct.update({"v": value})
        response.result.CopyFrom(struct.fields["v"])
        return response.SerializeToString()

    assert pb.ExecuteResponse.FromString(answer(MAX_JSON_DEPTH_CEILING)).request_id == "x"
    with pytest.raises((DecodeError, RecursionError)):
        pb.ExecuteResponse.FromString(answer(MAX_JSON_DEPTH_CEILING + 2))
