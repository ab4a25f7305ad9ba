"""Bad requests get a clear status with an ErrorInfo reason; a script's failure is an OK response."""

from __future__ import annotations

import uuid

import grpc
import pytest

from lambda_microservice import (
    InvalidArgumentError,
    LambdaClient,
    NotFoundError,
)
from lambda_microservice.v1 import lambda_service_pb2 as pb
from lambda_microservice.v1 import lambda_service_pb2_grpc as pb_grpc
from tests.support import ServerThread, nested_execute_request, raw_execute_error


@pytest.mark.parametrize("title", ["", "ruby-app", "nodejs-", "python", "x" * 200])
def test_missing_or_unknown_language_is_invalid_argument_naming_the_known_prefixes(
    client: LambdaClient, title: str
) -> None:
    with pytest.raises(InvalidArgumentError) as caught:
        client.initialize(title, "return 1;")
    assert caught.value.reason == "INVALID_REQUEST"
    if len(title) < 128:
        for prefix in ("nodejs-", "python-", "rust-"):
            assert prefix in caught.value.message


@pytest.mark.parametrize("request_id", ["not-a-uuid", "1234", "' OR 1=1 --", "\x00"])
def test_a_malformed_request_id_is_invalid_argument(client: LambdaClient, request_id: str) -> None:
    with pytest.raises(InvalidArgumentError) as caught:
        client.execute(request_id)
    assert caught.value.reason == "INVALID_REQUEST"
    with pytest.raises(InvalidArgumentError):
        client.get_session(request_id)
    with pytest.raises(InvalidArgumentError):
        client.initialize("python-x", "result = 1", request_id=request_id)


def test_an_unknown_session_is_not_found(client: LambdaClient) -> None:
    unknown = str(uuid.uuid4())
    with pytest.raises(NotFoundError) as caught:
        client.execute(unknown)
    assert caught.value.reason == "NOT_FOUND"
    with pytest.raises(NotFoundError):
        client.get_session(unknown)


def test_a_script_over_max_script_size_is_invalid_argument(client: LambdaClient) -> None:
    script = "// padding\n" * (1024 * 1024 // 11 + 1)
    with pytest.raises(InvalidArgumentError) as caught:
        client.initialize("nodejs-big", script)
    assert "MAX_SCRIPT_SIZE" in caught.value.message


def test_an_empty_script_is_invalid_argument(client: LambdaClient) -> None:
    with pytest.raises(InvalidArgumentError):
        client.initialize("python-empty", "   \n")


@pytest.mark.parametrize(
    ("title", "script", "line", "column"),
    [
        ("python-bad", "x = 1\ny = (\n", 2, 5),
        ("python-bad", "def handler(event):\n    return event[\n\nz = 1\n", 2, 17),
        ("nodejs-bad", "const a = 1;\nconst b = ;\nreturn a;", 2, 11),
        ("nodejs-bad", "module.exports = async (event) => {\n  return event.params..a;\n};", 2, 23),
    ],
)
def test_a_syntax_error_is_invalid_argument_with_line_and_column(
    client: LambdaClient, title: str, script: str, line: int, column: int
) -> None:
    with pytest.raises(InvalidArgumentError) as caught:
        client.initialize(title, script)
    assert caught.value.reason == "INVALID_REQUEST"
    assert caught.value.metadata["line"] == str(line), caught.value
    assert caught.value.metadata["column"] == str(column), caught.value
    assert f"line {line}" in caught.value.message


def test_a_script_is_checked_without_being_run(client: LambdaClient, tmp_path: object) -> None:
    # Initialize compiles only: a script whose top level would fail is accepted.
    session = client.initialize("python-lazy", "raise SystemExit('ran at Initialize')")
    response = client.execute(session.request_id)
    assert response.error.code == pb.EXECUTION_ERROR_CODE_RUNTIME_ERROR
    assert "ran at Initialize" in response.error.message


def test_a_rust_handler_of_another_signature_is_invalid_argument(client: LambdaClient) -> None:
    with pytest.raises(InvalidArgumentError) as caught:
        client.initialize("rust-data_validator", "pub fn handler() {}", timeout=120.0)
    assert caught.value.reason == "INVALID_REQUEST"
    assert "handler" in caught.value.message


@pytest.mark.parametrize("timeout_ms", [-1, 0, "fast", True, [1]])
def test_a_bad_timeout_ms_is_invalid_argument(client: LambdaClient, timeout_ms: object) -> None:
    with pytest.raises(InvalidArgumentError) as caught:
        client.initialize("python-x", "result = 1", context={"timeout_ms": timeout_ms})
    assert "timeout_ms" in caught.value.message


@pytest.mark.parametrize(
    ("title", "script", "context", "field"),
    [
        ("python-x", "result = 1", {"note": "a\x00b"}, "context"),
        ("python-x", "result = 1", {"key\x00": 1}, "context"),
        ("python-x", "result = 1", {"deep": [{"x": ["\x00"]}]}, "context"),
        ("nodejs-x", 'return "\x00";', {}, "script_content"),  # valid JavaScript
        ("python-a\x00b", "result = 1", {}, "language_title"),
    ],
)
def test_nul_which_postgresql_cannot_store_is_invalid_argument_not_internal(
    client: LambdaClient, title: str, script: str, context: dict[str, object], field: str
) -> None:
    """Found by tests/test_fuzz.py: NUL reached the INSERT, and PostgreSQL's refusal was INTERNAL."""
    with pytest.raises(InvalidArgumentError) as caught:
        client.initialize(title, script, context=context)
    assert caught.value.metadata["field"] == field
    assert "NUL" in caught.value.message


def test_a_context_too_large_to_read_back_is_invalid_argument(client: LambdaClient) -> None:
    """Found by tests/test_fuzz.py: a context just under 4 MiB was stored, and GetSession's
    answer, a little larger, could not be sent."""
    with pytest.raises(InvalidArgumentError) as caught:
        client.initialize("python-big-context", "result = 1", context={"blob": "x" * (2 * 1024 * 1024)})
    assert caught.value.metadata["field"] == "context"


@pytest.mark.parametrize(
    "body",
    [b"\xff\xff\xff", nested_execute_request(str(uuid.uuid4()), 60)],
    ids=["corrupt", "nested-past-protobuf-limit"],
)
def test_an_undecodable_request_is_invalid_argument_not_unknown(server: ServerThread, body: bytes) -> None:
    error = raw_execute_error(server.target, body)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = error.details() or ""
    # params nested past protobuf's limit are past MAX_JSON_DEPTH (32) before it
    assert "not a valid ExecuteRequest" in details or "past MAX_JSON_DEPTH" in details


def test_raw_calls_never_answer_unknown(server: ServerThread) -> None:
    """Requests a generated stub in another service might send, straight on the wire."""
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.LambdaServiceStub(channel)
        calls = [
            (stub.Initialize, pb.InitializeRequest()),
            (stub.Initialize, pb.InitializeRequest(language_title="python-x")),
            (stub.Initialize, pb.InitializeRequest(language_title="\u0000\uffff", script_content="\ud7ff")),
            (stub.Execute, pb.ExecuteRequest()),
            (stub.GetSession, pb.GetSessionRequest()),
            (stub.ListFunctions, pb.ListFunctionsRequest(page_size=-5)),
            (stub.GetFunction, pb.GetFunctionRequest()),
        ]
        for method, request in calls:
            with pytest.raises(grpc.RpcError) as caught:
                method(request, timeout=10)
            assert caught.value.code() not in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL)
        assert stub.Health(pb.HealthRequest(), timeout=10).status == pb.HEALTH_STATUS_SERVING
