"""Bad requests get a clear status with an ErrorInfo reason from one table; a script's failure
is an OK response."""

from __future__ import annotations

import re
import uuid
from dataclasses import replace

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

import lambda_server.app  # noqa: F401  every module of the server: every error class is defined
from lambda_microservice import (
    DependencyNotAllowedError,
    InvalidArgumentError,
    LambdaClient,
    NotFoundError,
)
from lambda_microservice.errors import ERRORS_BY_CODE, ERRORS_BY_REASON, error_class
from lambda_microservice.v1 import lambda_service_pb2 as pb
from lambda_microservice.v1 import lambda_service_pb2_grpc as pb_grpc
from lambda_server import errors
from lambda_server.api.errors import DOMAIN, to_status
from lambda_server.config import DependencySettings
from tests.support import ROOT, ServerThread, nested_execute_request, raw_execute_error, server_settings

# --- the one table: lambda_server.errors --------------------------------------------------------

REASONS = {name.removeprefix("ERROR_REASON_") for name in pb.ErrorReason.keys()} - {"UNSPECIFIED"}


def error_classes() -> list[type[errors.LambdaError]]:
    found, todo = [], [errors.LambdaError]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo.extend(cls.__subclasses__())
    return found


def names_another_status(status: str, reason: str) -> bool:
    """Whether the words of a gRPC status other than `status` appear in `reason`."""
    words = reason.split("_")
    for other in grpc.StatusCode.__members__:
        if other == status:
            continue
        part = other.split("_")
        if any(words[i : i + len(part)] == part for i in range(len(words) - len(part) + 1)):
            return True
    return False


# a line of the tree: its branch (the depth), the class, and its status and reason, if shown
TREE_LINE = (
    r"^ {4}(?P<branch>[│ ]*[├└]── )(?P<name>\w+)" + r"(?: +(?P<status>[A-Z_]{2,}) +(?P<reason>[A-Z_]{2,})\b)?"
)


def tree() -> dict[str, tuple[str, str | None, str | None]]:
    """The tree in errors.py's docstring: each class's parent (by indentation), and the
    status and reason its line shows, if any."""
    lines = (errors.__doc__ or "").splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith("LambdaError"))
    shown: dict[str, tuple[str, str | None, str | None]] = {"LambdaError": ("", None, None)}
    parents = ["LambdaError"]
    for line in lines[start + 1 :]:
        if not line.strip():
            break
        match = re.match(TREE_LINE, line)
        assert match, f"not a line of the tree: {line!r}"
        depth = len(match["branch"]) // 4
        parents[depth:] = [match["name"]]
        shown[match["name"]] = (parents[depth - 1], match["status"], match["reason"])
    return shown


def test_the_check_for_a_reason_naming_another_status_finds_the_old_rows() -> None:
    assert names_another_status("RESOURCE_EXHAUSTED", "UNAVAILABLE")  # the old RuntimeBusy
    assert names_another_status("FAILED_PRECONDITION", "UNAVAILABLE")  # the old RuntimeNotAvailable
    assert names_another_status("ALREADY_EXISTS", "INVALID_REQUEST") is False  # not a status's words
    assert names_another_status("INTERNAL", "INTERNAL_ERROR") is False


@pytest.mark.parametrize("cls", error_classes(), ids=lambda cls: cls.__name__)
def test_every_error_class_has_a_row_of_the_contract_in_errors_py(cls: type[errors.LambdaError]) -> None:
    assert cls.__module__ == "lambda_server.errors", "the table is one module: errors.py"
    assert cls.status in grpc.StatusCode.__members__ and cls.status != "OK", cls.status
    assert cls.reason in REASONS, f"{cls.reason} is not an ErrorReason of the proto"
    assert not names_another_status(cls.status, cls.reason), (cls.status, cls.reason)


def test_every_reason_of_the_proto_is_a_row_and_comes_with_one_status() -> None:
    statuses: dict[str, set[str]] = {}
    for cls in error_classes():
        statuses.setdefault(cls.reason, set()).add(cls.status)
    assert set(statuses) == REASONS
    assert {reason: codes for reason, codes in statuses.items() if len(codes) > 1} == {}
    for reason, (status,) in statuses.items():  # the proto's comment names the same status
        comment = _reason_comment(reason)
        assert comment.startswith(f"{status}:"), (reason, comment)


def _reason_comment(reason: str) -> str:
    """The proto's comment on an ErrorReason value, in one line."""
    text = (ROOT / "protos/lambda_microservice/v1/lambda_service.proto").read_text()
    found = re.search(rf"((?:[ \t]*//[^\n]*\n)+)[ \t]*ERROR_REASON_{reason} =", text)
    assert found, reason
    return " ".join(line.strip().removeprefix("//").strip() for line in found[1].splitlines())


def test_the_tree_in_the_docstring_shows_every_class_its_parent_and_its_own_row() -> None:
    shown = tree()
    classes = {cls.__name__: cls for cls in error_classes()}
    assert set(shown) == set(classes)
    for name, cls in classes.items():
        parent, status, reason = shown[name]
        if cls is errors.LambdaError:
            continue
        base = cls.__bases__[0]
        assert parent == base.__name__, name
        if (cls.status, cls.reason) != (base.status, base.reason) or status is not None:
            assert (status, reason) == (cls.status, cls.reason), name


def _instance(cls: type[errors.LambdaError]) -> errors.LambdaError:
    if issubclass(cls, errors.RateLimited | errors.QuotaExceeded):
        return cls("refused", 2.5)  # type: ignore[call-arg]
    if issubclass(cls, errors.ScriptSyntaxError):
        return cls("bad", 1, 2)  # type: ignore[call-arg]
    return cls("refused")


@pytest.mark.parametrize("cls", error_classes(), ids=lambda cls: cls.__name__)
def test_the_api_answers_each_class_with_its_row_and_the_client_raises_its_class(
    cls: type[errors.LambdaError],
) -> None:
    status = to_status(_instance(cls))
    assert status.code.name == cls.status
    details = dict(status.trailing_metadata)["grpc-status-details-bin"]
    info = error_details_pb2.ErrorInfo()
    assert status_pb2.Status.FromString(details).details[0].Unpack(info)
    assert (info.reason, info.domain) == (cls.reason, DOMAIN)
    raised = error_class(status.code, info.reason)
    assert issubclass(raised, ERRORS_BY_CODE[status.code])  # code that branches on the status works
    assert raised is ERRORS_BY_REASON.get(cls.reason, ERRORS_BY_CODE[status.code])


def test_the_client_tells_every_reason_of_a_status_apart() -> None:
    """Under each status, at most one reason is the status's class itself; the others have
    a subclass of their own (SessionExpiredError, RuntimeBusyError, ...)."""
    by_status: dict[str, set[str]] = {}
    for cls in error_classes():
        by_status.setdefault(cls.status, set()).add(cls.reason)
    for status, reasons in by_status.items():
        plain = {reason for reason in reasons if reason not in ERRORS_BY_REASON}
        assert len(plain) <= 1, (status, plain)
    assert set(ERRORS_BY_REASON) <= REASONS


# --- over the wire ------------------------------------------------------------------------------


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


def test_dependencies_are_refused_with_their_reason_when_the_policy_is_off(database_url: str) -> None:
    """DEPENDENCIES=off: never silently ignored, a session asking for packages is
    INVALID_ARGUMENT, reason DEPENDENCY_NOT_ALLOWED, naming the setting and the requirement,
    before anything is resolved."""
    settings = replace(server_settings(), dependencies=DependencySettings(mode="off"))
    running = ServerThread(settings, database_url)
    try:
        with LambdaClient(running.target, timeout=20) as client:
            with pytest.raises(DependencyNotAllowedError) as refused:
                client.initialize("python-deps", "import attrs\nresult = 1", dependencies=["attrs>=23"])
            assert refused.value.reason == "DEPENDENCY_NOT_ALLOWED"
            assert refused.value.metadata["setting"] == "DEPENDENCIES"
            assert refused.value.metadata["requirement"] == "attrs>=23"
            session = client.initialize("python-deps", "result = 1")  # without any: as ever
            assert client.execute(session.request_id, {}).result_json == "1"
    finally:
        running.stop()
