"""The client alone, on grpcio-testing's channel: errors by reason, safe retries, metadata, the pager,
exact results. (tests/test_contract.py and the others test the client against a real server.)"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import grpc
import grpc_testing
import pytest
from google.protobuf import any_pb2, struct_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

import lambda_microservice
from lambda_microservice import (
    LambdaClient,
    LambdaError,
    NotStartedError,
    RetryPolicy,
    UnavailableError,
    result,
    to_python,
)
from lambda_microservice import errors as client_errors
from lambda_microservice.client import SERVICE_CONFIG, _retry_delay
from lambda_microservice.v1 import lambda_service_pb2 as pb

SERVICE = pb.DESCRIPTOR.services_by_name["LambdaService"]
FAST = RetryPolicy(max_attempts=3, initial_backoff=0.01, max_backoff=0.02)
SESSION = str(uuid.uuid4())


class Fake:
    """A LambdaClient on grpc_testing's channel, and the test's side of that channel: each
    call the client makes is taken here and answered by the test."""

    def __init__(self, retry: RetryPolicy = FAST, metadata: tuple[tuple[str, str], ...] = ()) -> None:
        self.channel = grpc_testing.channel([SERVICE], grpc_testing.strict_real_time())
        self.client = LambdaClient(channel=self.channel, execute_retry=retry, metadata=metadata, timeout=30)
        self._calls = ThreadPoolExecutor(max_workers=1)

    def call(self, invoke: Callable[[LambdaClient], Any]) -> Future[Any]:
        """Start a call of the client; it blocks until the test answers it."""
        return self._calls.submit(invoke, self.client)

    def take(self, method: str) -> tuple[dict[str, str], Any, Any]:
        """The next call of `method`: its metadata, its request, and the handle to answer it."""
        metadata, request, rpc = self.channel.take_unary_unary(SERVICE.methods_by_name[method])
        return dict(metadata), request, rpc

    def take_stream(self, method: str) -> tuple[dict[str, str], Any, Any]:
        """The next call of a method that answers with a stream."""
        metadata, request, rpc = self.channel.take_unary_stream(SERVICE.methods_by_name[method])
        return dict(metadata), request, rpc

    def close(self) -> None:
        # a call still waiting (a test failed: the client made a call not answered) stays
        self._calls.shutdown(wait=False, cancel_futures=True)
        self.client.close()


@pytest.fixture
def fake() -> Iterator[Fake]:
    made = Fake()
    yield made
    made.close()


def refusal(
    code: grpc.StatusCode, message: str, reason: str = "", retry_after: float | None = None
) -> grpc.Status:
    """A status as the service sends it: ErrorInfo (and RetryInfo) in its details."""
    details = []
    if reason:
        detail = any_pb2.Any()
        detail.Pack(
            error_details_pb2.ErrorInfo(reason=reason, domain="lambda-microservice", metadata={"k": "v"})
        )
        details.append(detail)
    if retry_after is not None:
        retry = error_details_pb2.RetryInfo()
        retry.retry_delay.FromNanoseconds(int(retry_after * 1e9))
        details.append(any_pb2.Any())
        details[-1].Pack(retry)
    status = status_pb2.Status(code=getattr(code_pb2, code.name), message=message, details=details)
    return rpc_status.to_status(status)


def refuse(rpc: Any, status: grpc.Status) -> None:
    rpc.terminate(None, status.trailing_metadata, status.code, status.details)


def get_session_refused(fake: Fake, status: grpc.Status) -> LambdaError:
    call = fake.call(lambda client: client.get_session(SESSION))
    refuse(fake.take("GetSession")[2], status)
    error = call.exception(timeout=30)
    assert isinstance(error, LambdaError), error
    return error


# --- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "reason", "raised", "status_class"),
    [
        ("NOT_FOUND", "SESSION_EXPIRED", "SessionExpiredError", "NotFoundError"),
        ("NOT_FOUND", "NOT_FOUND", "NotFoundError", "NotFoundError"),
        ("ALREADY_EXISTS", "SESSION_CONFLICT", "SessionConflictError", "AlreadyExistsError"),
        ("INVALID_ARGUMENT", "INVALID_PARAMS", "InvalidParamsError", "InvalidArgumentError"),
        ("INVALID_ARGUMENT", "SCRIPT_LIMIT_EXCEEDED", "ScriptLimitExceededError", "InvalidArgumentError"),
        ("INVALID_ARGUMENT", "INVALID_REQUEST", "InvalidArgumentError", "InvalidArgumentError"),
        ("RESOURCE_EXHAUSTED", "QUOTA_EXCEEDED", "QuotaExceededError", "ResourceExhaustedError"),
        ("RESOURCE_EXHAUSTED", "RUNTIME_BUSY", "RuntimeBusyError", "ResourceExhaustedError"),
        (
            "FAILED_PRECONDITION",
            "RUNTIME_NOT_AVAILABLE",
            "RuntimeNotAvailableError",
            "FailedPreconditionError",
        ),
        ("UNAVAILABLE", "NOT_STARTED", "NotStartedError", "UnavailableError"),
        ("UNAVAILABLE", "SANDBOX_UNAVAILABLE", "SandboxUnavailableError", "UnavailableError"),
        ("UNAVAILABLE", "UNAVAILABLE", "UnavailableError", "UnavailableError"),
        ("UNAUTHENTICATED", "UNAUTHORIZED", "UnauthenticatedError", "UnauthenticatedError"),
        ("PERMISSION_DENIED", "FORBIDDEN", "PermissionDeniedError", "PermissionDeniedError"),
        ("DEADLINE_EXCEEDED", "DEADLINE_EXCEEDED", "DeadlineExceededError", "DeadlineExceededError"),
        ("INTERNAL", "INTERNAL_ERROR", "InternalError", "InternalError"),
    ],
)
def test_a_status_with_error_info_raises_its_reasons_class_under_its_status_class(
    fake: Fake, code: str, reason: str, raised: str, status_class: str
) -> None:
    error = get_session_refused(fake, refusal(grpc.StatusCode[code], "refused", reason))
    assert type(error) is getattr(lambda_microservice, raised)  # exported for callers
    assert isinstance(error, getattr(lambda_microservice, status_class))
    assert (error.code, error.reason, error.message, error.metadata) == (
        grpc.StatusCode[code],
        reason,
        "refused",
        {"k": "v"},
    )


def test_a_rate_limit_carries_its_retry_delay(fake: Fake) -> None:
    status = refusal(grpc.StatusCode.RESOURCE_EXHAUSTED, "slow down", "RATE_LIMITED", retry_after=2.5)
    error = get_session_refused(fake, status)
    assert isinstance(error, lambda_microservice.RateLimitedError)
    assert error.retry_after == 2.5


def test_a_status_without_details_is_its_codes_class(fake: Fake) -> None:
    """What a proxy, or gRPC itself (a server going away), answers."""
    call = fake.call(lambda client: client.get_session(SESSION))
    fake.take("GetSession")[2].terminate(None, (), grpc.StatusCode.UNAVAILABLE, "connection reset")
    error = call.exception(timeout=30)
    assert type(error) is UnavailableError and (error.reason, error.message) == ("", "connection reset")


def test_details_that_contradict_the_status_are_ignored(fake: Fake) -> None:
    """rpc_status refuses details whose code is not the call's: the call's code is trusted."""
    other = refusal(grpc.StatusCode.NOT_FOUND, "gone", "SESSION_EXPIRED")
    call = fake.call(lambda client: client.get_session(SESSION))
    fake.take("GetSession")[2].terminate(None, other.trailing_metadata, grpc.StatusCode.INTERNAL, "gone")
    error = call.exception(timeout=30)
    assert type(error) is client_errors.InternalError and error.reason == ""


def test_a_reason_sent_with_another_status_is_raised_as_the_statuss_class(fake: Fake) -> None:
    """A server of another version (before the one table: RuntimeBusy was RESOURCE_EXHAUSTED
    with reason UNAVAILABLE) is not taken to mean what its reason says."""
    error = get_session_refused(fake, refusal(grpc.StatusCode.RESOURCE_EXHAUSTED, "busy", "UNAVAILABLE"))
    assert type(error) is client_errors.ResourceExhaustedError
    error = get_session_refused(fake, refusal(grpc.StatusCode.UNAVAILABLE, "busy", "RUNTIME_BUSY"))
    assert type(error) is UnavailableError


def test_the_tree_in_the_client_errors_docstring_shows_every_class_under_its_parent() -> None:
    lines = (client_errors.__doc__ or "").splitlines()
    start = lines.index("LambdaError")
    parents, shown = ["LambdaError"], {"LambdaError": ""}
    for line in lines[start + 1 :]:
        if not line.strip():
            break
        match = re.match(r"^(?P<branch>[│ ]*[├└]── )(?P<name>\w+)", line)
        assert match, line
        depth = len(match["branch"]) // 4
        parents[depth:] = [match["name"]]
        shown[match["name"]] = parents[depth - 1]
    classes = {
        name: cls
        for name, cls in vars(client_errors).items()
        if isinstance(cls, type) and issubclass(cls, LambdaError)
    }
    assert set(shown) == set(classes)
    for name, cls in classes.items():
        if cls is not LambdaError:
            assert shown[name] == cls.__bases__[0].__name__, name
        assert name in lambda_microservice.__all__, name


# --- retries -----------------------------------------------------------------------------------


def test_initialize_sends_a_request_id_of_its_own_so_that_a_retry_is_the_same_session(fake: Fake) -> None:
    ids = []
    for _ in range(2):
        call = fake.call(lambda client: client.initialize("python-x", "result = 1"))
        _, request, rpc = fake.take("Initialize")
        ids.append(request.request_id)
        rpc.terminate(pb.InitializeResponse(request_id=request.request_id), (), grpc.StatusCode.OK, "")
        assert call.result(timeout=30).request_id == request.request_id
    assert all(uuid.UUID(request_id).version == 4 for request_id in ids)
    assert ids[0] != ids[1]
    mine = str(uuid.uuid4())
    call = fake.call(lambda client: client.initialize("python-x", "result = 1", request_id=mine))
    _, request, rpc = fake.take("Initialize")
    rpc.terminate(pb.InitializeResponse(request_id=mine), (), grpc.StatusCode.OK, "")
    assert request.request_id == mine and call.result(timeout=30).request_id == mine


def test_execute_is_retried_when_the_server_says_it_did_not_start(fake: Fake) -> None:
    call = fake.call(lambda client: client.execute(SESSION, {"n": 1}))
    _, first, rpc = fake.take("Execute")
    refuse(rpc, refusal(grpc.StatusCode.UNAVAILABLE, "database unavailable", "NOT_STARTED"))
    _, second, rpc = fake.take("Execute")  # the client's own retry
    rpc.terminate(pb.ExecuteResponse(request_id=SESSION, result_json="2"), (), grpc.StatusCode.OK, "")
    assert result(call.result(timeout=30)) == 2
    assert first == second


def test_execute_batch_is_retried_when_nothing_ran(fake: Fake) -> None:
    call = fake.call(lambda client: client.execute_batch(SESSION, [{"n": 2**60}, {"n": 1}]))
    _, first, rpc = fake.take("ExecuteBatch")
    refuse(rpc, refusal(grpc.StatusCode.UNAVAILABLE, "database unavailable", "NOT_STARTED"))
    _, second, rpc = fake.take("ExecuteBatch")  # the client's own retry
    rpc.terminate(
        pb.ExecuteBatchResponse(results=[pb.ExecuteResponse(result_json="2")]), (), grpc.StatusCode.OK, ""
    )
    assert [result(r) for r in call.result(timeout=30)] == [2]
    assert first == second
    # an item past 2**53: every item goes as exact JSON text
    assert list(first.params_json) == ['{"n": 1152921504606846976}', '{"n": 1}'] and not first.params


def test_execute_retries_end_after_max_attempts(fake: Fake) -> None:
    call = fake.call(lambda client: client.execute(SESSION))
    for _ in range(FAST.max_attempts):
        refuse(fake.take("Execute")[2], refusal(grpc.StatusCode.UNAVAILABLE, "down", "NOT_STARTED"))
    # a fourth call would wait here for an answer; the client gave up after the third
    assert isinstance(call.exception(timeout=30), NotStartedError)


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        ("UNAVAILABLE", "UNAVAILABLE"),  # the script may have run
        ("UNAVAILABLE", ""),  # no details: nothing says it did not run
        ("UNAVAILABLE", "SANDBOX_UNAVAILABLE"),
        ("RESOURCE_EXHAUSTED", "RUNTIME_BUSY"),
        ("DEADLINE_EXCEEDED", "DEADLINE_EXCEEDED"),
    ],
)
def test_execute_is_not_retried_when_the_script_may_have_run(fake: Fake, code: str, reason: str) -> None:
    call = fake.call(lambda client: client.execute(SESSION))
    refuse(fake.take("Execute")[2], refusal(grpc.StatusCode[code], "refused", reason))
    # a retry would wait for an answer that never comes: the call ends with the first refusal
    error = call.exception(timeout=30)
    assert isinstance(error, LambdaError) and not isinstance(error, NotStartedError)
    assert error.code == grpc.StatusCode[code]


def test_an_execute_retry_never_goes_past_the_deadline() -> None:
    slow = RetryPolicy(max_attempts=10, initial_backoff=5.0, max_backoff=5.0)
    assert _retry_delay(slow, 1, left=0.0) is None
    assert _retry_delay(slow, 10, left=100.0) is None  # attempts used up
    delay = _retry_delay(slow, 1, left=100.0)
    assert delay is not None and 0 <= delay <= 5.0


def test_the_service_config_lets_grpc_retry_every_method_but_execute() -> None:
    config = json.loads(SERVICE_CONFIG)
    retried = {
        name["method"]
        for method in config["methodConfig"]
        if "UNAVAILABLE" in method.get("retryPolicy", {}).get("retryableStatusCodes", [])
        for name in method["name"]
    }
    assert all("method" in name for method in config["methodConfig"] for name in method["name"])
    # the calls that run a script are not idempotent: retried only on NotStartedError
    assert retried == set(SERVICE.methods_by_name) - {"Execute", "ExecuteStream", "ExecuteBatch"}


# --- metadata, pages, results ------------------------------------------------------------------

CALLS: dict[str, tuple[Callable[..., Any], Any]] = {
    "Initialize": (lambda c, m: c.initialize("python-x", "result = 1", metadata=m), pb.InitializeResponse()),
    "Execute": (lambda c, m: c.execute(SESSION, metadata=m), pb.ExecuteResponse()),
    "ExecuteBatch": (lambda c, m: c.execute_batch(SESSION, [{}], metadata=m), pb.ExecuteBatchResponse()),
    "Health": (lambda c, m: c.health(metadata=m), pb.HealthResponse()),
    "GetSession": (lambda c, m: c.get_session(SESSION, metadata=m), pb.GetSessionResponse()),
    "ListFunctions": (lambda c, m: c.list_functions(metadata=m), pb.ListFunctionsResponse()),
    "GetFunction": (lambda c, m: c.get_function("python-x", metadata=m), pb.GetFunctionResponse()),
    "ExecuteStream": (lambda c, m: list(c.execute_stream(SESSION, metadata=m)), None),
}
STREAMING = {"ExecuteStream"}


@pytest.mark.parametrize("method", sorted(CALLS))
def test_every_method_sends_the_clients_metadata_and_its_own(method: str) -> None:
    assert set(CALLS) == set(SERVICE.methods_by_name)
    fake = Fake(metadata=(("authorization", "Bearer t"),))
    try:
        invoke, answer = CALLS[method]
        call = fake.call(lambda client: invoke(client, [("x-request-id", "abc")]))
        if method in STREAMING:
            metadata, _, rpc = fake.take_stream(method)
            rpc.send_response(pb.ExecuteStreamResponse(response=pb.ExecuteResponse()))
            rpc.terminate((), grpc.StatusCode.OK, "")
        else:
            metadata, _, rpc = fake.take(method)
            rpc.terminate(answer, (), grpc.StatusCode.OK, "")
        call.result(timeout=30)
        assert (metadata["authorization"], metadata["x-request-id"]) == ("Bearer t", "abc")
    finally:
        fake.close()


def test_iter_functions_follows_next_page_token_with_the_same_filters(fake: Fake) -> None:
    pages = {"": ("a", "t1"), "t1": ("b", "t2"), "t2": ("c", "")}
    call = fake.call(
        lambda client: [
            f.language_title
            for f in client.iter_functions(
                language="python", function_type=pb.FUNCTION_TYPE_PREDEFINED, page_size=1
            )
        ]
    )
    asked = []
    for _ in pages:
        _, request, rpc = fake.take("ListFunctions")
        asked.append(request.page_token)
        assert (request.language, request.function_type, request.page_size) == (
            "python",
            pb.FUNCTION_TYPE_PREDEFINED,
            1,
        )
        title, token = pages[request.page_token]
        page = pb.ListFunctionsResponse(
            functions=[pb.Function(language_title=f"python-{title}")], next_page_token=token
        )
        rpc.terminate(page, (), grpc.StatusCode.OK, "")
    assert call.result(timeout=30) == ["python-a", "python-b", "python-c"]
    assert asked == ["", "t1", "t2"]


def test_to_python_gives_ints_for_integral_numbers() -> None:
    value = struct_pb2.Value()
    value.struct_value.update(
        {"n": 400000, "half": 0.5, "list": [1, 2.0, "x", None, True], "deep": {"k": -3}}
    )
    assert to_python(value) == {"n": 400000, "half": 0.5, "list": [1, 2, "x", None, True], "deep": {"k": -3}}
    converted = to_python(value)
    assert type(converted["n"]) is int and type(converted["list"][1]) is int
    assert type(converted["half"]) is float
    struct = struct_pb2.Struct()
    struct.update({"a": 1.0})
    assert type(to_python(struct)["a"]) is int


def test_result_is_exact_from_result_json_and_falls_back_to_result() -> None:
    big = 2**62 + 1
    exact = pb.ExecuteResponse(result_json=json.dumps({"big": big, "one": 1, "float": 1.0}))
    exact.result.number_value = float(big)  # what the Value holds: the nearest double
    answer = result(exact)
    assert answer == {"big": big, "one": 1, "float": 1.0}
    assert type(answer["one"]) is int and type(answer["float"]) is float
    huge = "9" * 5000  # past Python's limit on int() of a string
    assert result(pb.ExecuteResponse(result_json=huge)) == 10**5000 - 1
    older = pb.ExecuteResponse()  # a server that sends no result_json
    older.result.number_value = 400000
    assert result(older) == 400000 and type(result(older)) is int
    assert result(pb.ExecuteResponse(error=pb.ExecutionError(message="boom"))) is None


def test_a_stream_is_retried_when_it_did_not_start(fake: Fake) -> None:
    not_started = refusal(grpc.StatusCode.UNAVAILABLE, "database down", "NOT_STARTED")
    call = fake.call(lambda client: list(client.execute_stream(SESSION)))
    _, _, rpc = fake.take_stream("ExecuteStream")
    rpc.terminate(not_started.trailing_metadata, not_started.code, not_started.details)
    _, _, rpc = fake.take_stream("ExecuteStream")  # retried
    rpc.send_response(
        pb.ExecuteStreamResponse(output=pb.OutputChunk(stream=pb.OUTPUT_STREAM_STDOUT, text="a"))
    )
    rpc.send_response(pb.ExecuteStreamResponse(response=pb.ExecuteResponse(logs="a")))
    rpc.terminate((), grpc.StatusCode.OK, "")
    events = call.result(timeout=30)
    assert [type(e).__name__ for e in events] == ["OutputChunk", "ExecuteResponse"]
