"""The HTTP/JSON API: the original service's routes on a real server, called with aiohttp's client."""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

import aiohttp
import grpc
import jwt
import pytest
from multidict import CIMultiDict

from lambda_microservice import LambdaClient
from lambda_microservice import LambdaError as ClientError
from lambda_server import json_text
from lambda_server.api.http_json import ERRORS
from lambda_server.config import AuthSettings, GrpcSettings, RuntimeSettings
from lambda_server.errors import LambdaError
from tests.support import (
    ServerThread,
    eventually,
    free_port,
    run_sync,
    server_settings,
    serving_before_the_database,
)
from tests.test_request_logs import fetch

SECRET = "a-test-secret-of-at-least-32-bytes!!"
ADD = "return event.params.a + event.params.b;"
RANDOM = "return {n: event.params.n, r: Math.random()};"
# The original's test scripts: a calculator of module.exports, and a text processor of `result =`.
CALCULATOR = """
module.exports = async (event) => {
  const { operation, a, b } = event.params;
  switch (operation) {
    case 'add': return { result: a + b };
    case 'subtract': return { result: a - b };
    case 'multiply': return { result: a * b };
    case 'divide':
      if (b === 0) throw new Error('Division by zero');
      return { result: a / b };
    default: throw new Error('Unknown operation: ' + operation);
  }
};
"""
TEXT_PROCESSOR = """
text = params.get("text", "")
result = {
    "word_count": len(text.split()),
    "char_count": len(text),
    "uppercase": text.upper(),
}
"""


@dataclass
class Answer:
    status: int
    headers: CIMultiDict[str]
    body: bytes

    def json(self) -> Any:
        """The body, integers exact."""
        return json_text.loads(self.body)

    @property
    def error(self) -> dict[str, Any]:
        error: dict[str, Any] = self.json()["error"]
        return error


def http(
    server: ServerThread,
    method: str,
    path: str,
    body: Any = None,
    *,
    raw: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> Answer:
    """One request with aiohttp's client; `body` is sent as exact JSON (json_text)."""

    async def send() -> Answer:
        data = raw if raw is not None else (None if body is None else json_text.dumps(body))
        sent = {"Content-Type": "application/json", **(headers or {})} if data is not None else headers
        async with (
            aiohttp.ClientSession() as session,
            session.request(method, server.http_url + path, data=data, headers=sent) as response,
        ):
            return Answer(response.status, CIMultiDict(response.headers), await response.read())

    return asyncio.run(send())


def raw_http(server: ServerThread, head: bytes, body: bytes = b"", timeout: float = 60.0) -> Answer:
    """One request written as it is on a socket (what aiohttp's client will not send: bytes
    that are not UTF-8 in a header, a body shorter than its Content-Length); the answer read
    by its Content-Length, within `timeout` seconds."""

    async def send() -> Answer:
        host, port = server.http_url.removeprefix("http://").rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            writer.write(head.rstrip(b"\r\n") + b"\r\n\r\n" + body)
            await writer.drain()
            async with asyncio.timeout(timeout):
                status_line, _, raw_headers = (await reader.readuntil(b"\r\n\r\n")).partition(b"\r\n")
                headers: CIMultiDict[str] = CIMultiDict()
                for line in raw_headers.decode("latin-1").strip().split("\r\n"):
                    name, _, value = line.partition(":")
                    headers.add(name.strip(), value.strip())
                content = await reader.readexactly(int(headers.get("Content-Length", "0")))
        finally:
            writer.close()
        return Answer(int(status_line.split()[1]), headers, content)

    return asyncio.run(send())


def initialize(server: ServerThread, title: str, script: str, **fields: Any) -> str:
    answer = http(
        server,
        "POST",
        "/api/v1/initialize",
        {"script_content": script, **fields},
        headers={"Language-Title": title},
    )
    assert answer.status == 200, answer.body
    request_id: str = answer.json()["request_id"]
    return request_id


def execute(server: ServerThread, request_id: str, params: Any, **headers: str) -> Answer:
    sent = {name.replace("_", "-"): value for name, value in headers.items()}
    return http(server, "POST", f"/api/v1/execute/{request_id}", {"params": params}, headers=sent)


def token(sub: str = "alice", scope: str = "execute:all read:functions", **claims: Any) -> str:
    payload = {"sub": sub, "scope": scope, "exp": int(time.time()) + 300, **claims}
    return jwt.encode(payload, SECRET, algorithm="HS256")


def bearer(value: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {value}"}


@pytest.fixture(scope="module")
def api(database_url: str) -> Iterator[ServerThread]:
    running = ServerThread(server_settings(), database_url)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def jwt_api(database_url: str) -> Iterator[ServerThread]:
    auth = AuthSettings(mode="jwt", jwt_secret=SECRET, rate_limit_per_minute=3)
    running = ServerThread(server_settings(auth=auth), database_url)
    yield running
    running.stop()


# --- the routes -------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/health", "/api/v1/health"])
def test_health_answers_ok_with_the_version_and_the_components(api: ServerThread, path: str) -> None:
    answer = http(api, "GET", path)
    assert answer.status == 200
    body = answer.json()
    assert body["status"] == "ok" and body["version"]
    assert body["components"]["postgres"] == "ok"
    assert {check["name"] for check in body["checks"]} >= {"postgres", "sandbox", "runtime.python"}


def test_health_is_503_while_the_database_is_away() -> None:
    settings = serving_before_the_database(server_settings())
    running = ServerThread(settings, f"postgresql://nobody@127.0.0.1:{free_port()}/none")
    try:
        answer = http(running, "GET", "/health")
        assert answer.status == 503
        assert answer.json()["status"] == "unavailable"
        assert answer.json()["components"]["postgres"].startswith("unavailable")
        # a call that needs the database: UNAVAILABLE, 503, within the database's bounds
        session = http(running, "GET", f"/api/v1/sessions/{uuid.uuid4()}")
        assert session.status == 503 and session.error["code"] == "INTERNAL_ERROR"
        assert session.error["details"]["grpc_status"] == "UNAVAILABLE"
    finally:
        running.stop()


def test_a_language_whose_runtime_this_server_lacks_is_503(database_url: str) -> None:
    runtime = replace(RuntimeSettings(timeout_seconds=5.0), rustc="/nonexistent/rustc")
    running = ServerThread(server_settings(runtime=runtime), database_url)
    try:
        answer = http(
            running,
            "POST",
            "/api/v1/initialize",
            {"script_content": "x"},
            headers={"Language-Title": "rust-missing"},
        )
        assert answer.status == 503, answer.body
        assert answer.error["details"]["reason"] == "RUNTIME_NOT_AVAILABLE"
    finally:
        running.stop()


def test_a_script_past_its_timeout_is_200_with_a_timeout_error(api: ServerThread) -> None:
    request_id = initialize(api, "python-slow_timeout", "while True:\n    pass", options={"timeout": 0.5})
    answer = execute(api, request_id, {})
    assert answer.status == 200 and answer.headers["X-Function-Error"] == "TIMEOUT"
    assert answer.json()["error"]["code"] == "TIMEOUT" and answer.json()["result"] is None
    session = http(api, "GET", f"/api/v1/sessions/{request_id}").json()
    assert session["options"]["timeout"] == 0.5 and session["execution_count"] == 1


def test_the_calculator_as_a_return_body(api: ServerThread) -> None:
    request_id = initialize(api, "nodejs-calculator_http", ADD)
    answer = execute(api, request_id, {"a": 5, "b": 3})
    assert answer.status == 200
    body = answer.json()
    assert body["result"] == 8 and body["cached"] is False
    assert body["request_id"] == request_id and body["language_title"] == "nodejs-calculator_http"
    assert isinstance(body["execution_time"], float) and body["logs"] == ""
    assert "error" not in body


def test_initialize_answers_the_originals_shape_and_takes_the_title_from_the_body(api: ServerThread) -> None:
    wanted = str(uuid.uuid4())
    answer = http(
        api,
        "POST",
        "/api/v1/initialize",
        {"language_title": "python-body_title", "script_content": "result = 1", "context": {"k": 1}},
        headers={"X-Request-ID": wanted},
    )
    assert answer.status == 200
    body = answer.json()
    assert body["request_id"] == wanted and body["status"] == "active"
    assert answer.headers["X-Request-ID"] == wanted
    assert body["expires_at"].endswith("Z")
    # the same id and script again: the same session (a retry)
    again = http(
        api,
        "POST",
        "/api/v1/initialize",
        {"language_title": "python-body_title", "script_content": "result = 1", "context": {"k": 1}},
        headers={"X-Request-ID": wanted},
    )
    assert again.status == 200 and again.json()["request_id"] == wanted


def test_the_catalog_calculator_divides_and_a_division_by_zero_is_its_runtime_error(
    api: ServerThread,
) -> None:
    answer = http(api, "POST", "/api/v1/initialize", {}, headers={"Language-Title": "nodejs-calculator"})
    assert answer.status == 200, answer.body
    request_id = answer.json()["request_id"]
    divided = execute(api, request_id, {"operation": "divide", "a": 10, "b": 4})
    assert divided.status == 200 and divided.json()["result"] == {"result": 2.5}
    by_zero = execute(api, request_id, {"operation": "divide", "a": 1, "b": 0})
    # a script's failure: 200 with `error` (the call worked; the script did not), named in a header
    assert by_zero.status == 200
    assert by_zero.headers["X-Function-Error"] == "RUNTIME_ERROR"
    error = by_zero.json()["error"]
    assert error["code"] == "RUNTIME_ERROR" and "Division by zero" in error["message"]
    assert set(error["details"]) == {"line", "column", "stack_trace"}
    assert by_zero.json()["result"] is None
    # params against the catalog's schema: INVALID_PARAMS, 400
    refused = execute(api, request_id, {"operation": "divide", "a": "x", "b": 1})
    assert refused.status == 400
    assert (
        refused.error["code"] == "INVALID_PARAMS"
        and refused.error["details"]["metadata"]["field"] == "params.a"
    )


def test_the_module_exports_calculator(api: ServerThread) -> None:
    request_id = initialize(api, "nodejs-calculator_exports", CALCULATOR)
    results = {
        operation: execute(api, request_id, {"operation": operation, "a": 6, "b": 3}).json()["result"]
        for operation in ("add", "subtract", "multiply", "divide")
    }
    assert results == {
        "add": {"result": 9},
        "subtract": {"result": 3},
        "multiply": {"result": 18},
        "divide": {"result": 2},
    }
    by_zero = execute(api, request_id, {"operation": "divide", "a": 1, "b": 0}).json()
    assert by_zero["error"]["code"] == "RUNTIME_ERROR" and "Division by zero" in by_zero["error"]["message"]
    assert by_zero["error"]["details"]["line"] > 0


def test_the_text_processor_with_result_equals(api: ServerThread) -> None:
    request_id = initialize(api, "python-text_processor_http", TEXT_PROCESSOR)
    body = execute(api, request_id, {"text": "Hello World from HTTP"}).json()
    assert body["result"] == {"word_count": 4, "char_count": 21, "uppercase": "HELLO WORLD FROM HTTP"}


def test_integers_past_2_to_the_53_stay_exact_both_ways(api: ServerThread) -> None:
    request_id = initialize(api, "python-big_http", "result = {'n': params['n'] + 1, 'm': params['m']}")
    n = 2**70
    answer = execute(api, request_id, {"n": n, "m": 2**53 + 1})
    assert answer.status == 200, answer.body
    assert answer.json()["result"] == {"n": n + 1, "m": 2**53 + 1}
    assert str(n + 1).encode() in answer.body  # written as digits, not as a float


def test_get_session_counts_the_executions(api: ServerThread) -> None:
    request_id = initialize(api, "python-session_http", "result = 1")
    for _ in range(3):
        assert execute(api, request_id, {}).status == 200
    body = http(api, "GET", f"/api/v1/sessions/{request_id}").json()
    assert body["request_id"] == request_id and body["status"] == "active"
    assert body["execution_count"] == 3 and body["last_executed_at"].endswith("Z")
    assert body["language_title"] == "python-session_http" and body["created_at"] < body["expires_at"]


def test_the_catalog_lists_pages_and_one_function_with_its_schema(api: ServerThread) -> None:
    every = http(api, "GET", "/api/v1/functions").json()
    assert every["page"] == 1 and every["per_page"] == 20 and every["total"] >= 3
    titles = [f["language_title"] for f in every["functions"]]
    assert {"nodejs-calculator", "python-text_processor", "rust-data_validator"} <= set(titles)
    assert titles == sorted(titles)
    node = http(api, "GET", "/api/v1/functions?language=nodejs&page=1&per_page=1").json()
    assert node["total"] == 1 and [f["language_title"] for f in node["functions"]] == ["nodejs-calculator"]
    assert set(node["functions"][0]) >= {"language", "title", "language_title", "description", "created_at"}
    second = http(api, "GET", f"/api/v1/functions?page=2&per_page={every['total']}").json()
    assert second["functions"] == [] and second["total"] == every["total"]
    one = http(api, "GET", "/api/v1/functions/nodejs-calculator").json()
    assert one["schema"]["params"]["required"] == ["operation", "a", "b"]
    assert one["schema"]["result"] is not None and one["examples"]


# --- caching ----------------------------------------------------------------------------


def test_x_cache_control_max_age_answers_from_the_cache_and_no_cache_runs_again(api: ServerThread) -> None:
    request_id = initialize(api, "nodejs-cache_http", RANDOM)
    first = execute(api, request_id, {"n": 1}, X_Cache_Control="max-age=60").json()
    second = execute(api, request_id, {"n": 1}, X_Cache_Control="max-age=60").json()
    assert (first["cached"], second["cached"]) == (False, True)
    assert second["result"] == first["result"]
    fresh = execute(api, request_id, {"n": 1}, X_Cache_Control="no-cache").json()
    assert fresh["cached"] is False and fresh["result"]["r"] != first["result"]["r"]
    # without the header (and DEFAULT_CACHE_TTL_SECONDS 0): no caching
    plain = [execute(api, request_id, {"n": 2}).json() for _ in range(2)]
    assert [p["cached"] for p in plain] == [False, False]
    bad = execute(api, request_id, {"n": 1}, X_Cache_Control="forever")
    assert bad.status == 400 and bad.error["details"]["metadata"]["field"] == "cache_control"


def test_default_cache_ttl_seconds_caches_what_the_session_leaves_unset(database_url: str) -> None:
    runtime = replace(RuntimeSettings(timeout_seconds=5.0), default_cache_ttl_seconds=3600.0)
    running = ServerThread(server_settings(runtime=runtime), database_url)
    try:
        request_id = initialize(running, "nodejs-default_ttl", RANDOM)
        answers = [execute(running, request_id, {"n": 1}).json() for _ in range(2)]
        assert [a["cached"] for a in answers] == [False, True]
        session = http(running, "GET", f"/api/v1/sessions/{request_id}").json()
        assert session["options"]["cache_ttl"] == 3600
        # a session that says otherwise keeps its own
        off = initialize(running, "nodejs-default_ttl", RANDOM, options={"cache_ttl": 0})
        assert [execute(running, off, {"n": 1}).json()["cached"] for _ in range(2)] == [False, False]
    finally:
        running.stop()


# --- errors -----------------------------------------------------------------------------


def test_every_reason_of_the_table_has_an_http_status_and_an_original_code() -> None:
    reasons = {cls.reason for cls in _subclasses(LambdaError)}
    assert reasons <= set(ERRORS), sorted(reasons - set(ERRORS))
    codes = {code for _, code in ERRORS.values()}
    assert codes <= {
        "INVALID_REQUEST",
        "INVALID_PARAMS",
        "UNAUTHORIZED",
        "FORBIDDEN",
        "NOT_FOUND",
        "RATE_LIMITED",
        "TIMEOUT",
        "INTERNAL_ERROR",
    }
    assert {status for status, _ in ERRORS.values()} <= {400, 401, 403, 404, 429, 500, 503, 504}


def _subclasses(cls: type[LambdaError]) -> set[type[LambdaError]]:
    found = {cls}
    for sub in cls.__subclasses__():
        found |= _subclasses(sub)
    return found


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        (b"{not json", "body"),
        (b"[1, 2]", "body"),
        (b'{"script_content": 5}', "script_content"),
        (b'{"script_content": "result = 1", "context": []}', "context"),
        (b'{"script_content": "result = 1", "options": {"timeout": "soon"}}', "options.timeout"),
        (b'{"script_content": "result = 1", "options": {"nope": 1}}', "options.nope"),
        # float() reads these; no Duration's JSON text is one, and NaN would pass every bound
        (b'{"script_content": "result = 1", "options": {"timeout": "nans"}}', "options.timeout"),
        (b'{"script_content": "result = 1", "options": {"timeout": "infs"}}', "options.timeout"),
        (b'{"script_content": "result = 1", "options": {"cache_ttl": "NaNs"}}', "options.cache_ttl"),
        (b'{"script_content": "result = 1", "options": {"cache_ttl": "-infs"}}', "options.cache_ttl"),
        (b'{"script_content": "result = 1", "options": {"timeout": "1_0s"}}', "options.timeout"),
        (b'{"script_content": "result = 1", "options": {"timeout": "1e400"}}', "options.timeout"),
        (b'{"script_content": "result = 1", "options": {"timeout": NaN}}', "body"),
        (b'{"script_content": "result = 1", "options": {"memory_mb": Infinity}}', "body"),
        (b'{"script_content": "result = 1", "options": {"memory_mb": 64.5}}', "options.memory_mb"),
        (b'{"script_content": "result = 1", "options": {"max_processes": "4"}}', "options.max_processes"),
        (b'{"script_content": "result = 1", "dependencies": "attrs"}', "dependencies"),
    ],
)
def test_a_malformed_initialize_body_is_400_naming_the_field(
    api: ServerThread, raw: bytes, field: str
) -> None:
    answer = http(api, "POST", "/api/v1/initialize", raw=raw, headers={"Language-Title": "python-bad"})
    assert answer.status == 400, answer.body
    assert answer.error["code"] == "INVALID_REQUEST"
    assert answer.error["details"]["reason"] == "INVALID_REQUEST"
    assert answer.error["details"]["metadata"]["field"] == field


@pytest.mark.parametrize("value", ["soon", "0", "-1", "nan", "inf", "1e3", ""])
def test_a_malformed_request_timeout_is_400_naming_the_header(api: ServerThread, value: str) -> None:
    answer = http(api, "GET", f"/api/v1/sessions/{uuid.uuid4()}", headers={"X-Request-Timeout": value})
    assert answer.status == 400, answer.body
    assert answer.error["code"] == "INVALID_REQUEST"
    assert answer.error["details"]["metadata"]["field"] == "X-Request-Timeout"


def test_a_request_timeout_becomes_the_calls_deadline_and_504_when_it_passes(api: ServerThread) -> None:
    """X-Request-Timeout is the call's deadline, less the margin gRPC keeps for its answer
    (RESPONSE_MARGIN, 0.05 s): 0.01 s has passed before the database is reached, whatever
    the machine's speed, so the call answers 504 TIMEOUT; a long one changes nothing."""
    request_id = initialize(api, "python-deadline_http", "result = 1")
    missing = f"/api/v1/sessions/{uuid.uuid4()}"
    late = http(api, "GET", missing, headers={"X-Request-Timeout": "0.01"})
    assert late.status == 504, late.body
    assert late.error["code"] == "TIMEOUT" and late.error["details"]["reason"] == "DEADLINE_EXCEEDED"
    for path in (f"/api/v1/sessions/{request_id}", "/api/v1/functions"):
        assert http(api, "GET", path, headers={"X-Request-Timeout": "0.01"}).status == 504
        assert http(api, "GET", path, headers={"X-Request-Timeout": "30"}).status == 200
    assert execute(api, request_id, {}, X_Request_Timeout="0.01").status == 504
    answered = execute(api, request_id, {}, X_Request_Timeout="99999999.5")  # cut to the maximum
    assert answered.status == 200 and answered.json()["result"] == 1


def test_an_unexpected_exception_is_500_internal_error_in_the_apis_shape(
    api: ServerThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No request reaches INTERNAL_ERROR deterministically (every known failure has its
    own reason), so a use case is made to raise what nothing expects."""

    async def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("an unexpected bug, with a secret: s3cr3t")

    http_api = api.server.http_api
    assert http_api is not None
    monkeypatch.setattr(http_api, "_usecases", replace(http_api._usecases, get_session=broken))
    answer = http(api, "GET", f"/api/v1/sessions/{uuid.uuid4()}")
    assert answer.status == 500, answer.body
    assert answer.headers["Content-Type"].startswith("application/json")
    assert answer.error["code"] == "INTERNAL_ERROR"
    assert answer.error["details"]["reason"] == "INTERNAL_ERROR"
    assert "s3cr3t" not in answer.body.decode()


def test_a_syntax_error_and_an_unknown_language_are_400_with_what_the_grpc_side_says(
    api: ServerThread,
) -> None:
    broken = http(
        api,
        "POST",
        "/api/v1/initialize",
        {"script_content": "def f(:\n"},
        headers={"Language-Title": "python-broken"},
    )
    assert broken.status == 400 and broken.error["code"] == "INVALID_REQUEST"
    assert broken.error["details"]["metadata"]["line"] == "1"
    unknown = http(
        api,
        "POST",
        "/api/v1/initialize",
        {"script_content": "x"},
        headers={"Language-Title": "cobol-payroll"},
    )
    assert unknown.status == 400 and "nodejs" in unknown.error["message"]


def test_execute_refuses_params_that_are_not_an_object_and_malformed_json(api: ServerThread) -> None:
    request_id = initialize(api, "python-params_http", "result = 1")
    listed = execute(api, request_id, [1, 2])
    assert listed.status == 400 and listed.error["details"]["metadata"]["field"] == "params"
    garbled = http(api, "POST", f"/api/v1/execute/{request_id}", raw=b'{"params": {')
    assert garbled.status == 400 and garbled.error["code"] == "INVALID_REQUEST"


def test_unknown_sessions_functions_and_routes_are_404_a_wrong_method_405(api: ServerThread) -> None:
    missing = str(uuid.uuid4())
    for method, path in (
        ("POST", f"/api/v1/execute/{missing}"),
        ("GET", f"/api/v1/sessions/{missing}"),
        ("GET", "/api/v1/functions/python-no_such_function"),
        ("GET", "/api/v1/nothing/here"),
    ):
        answer = http(api, method, path, {} if method == "POST" else None)
        assert answer.status == 404, (path, answer.body)
        assert answer.error["code"] == "NOT_FOUND" and answer.error["details"]["reason"] == "NOT_FOUND"
    malformed = http(api, "GET", "/api/v1/sessions/not-a-uuid")
    assert malformed.status == 400 and malformed.error["details"]["metadata"]["field"] == "request_id"
    wrong = http(api, "DELETE", "/api/v1/initialize")
    assert wrong.status == 405 and wrong.headers["Allow"] == "OPTIONS, POST"
    assert wrong.error["code"] == "INVALID_REQUEST"
    pages = http(api, "GET", "/api/v1/functions?per_page=1000")
    assert pages.status == 400 and pages.error["details"]["metadata"]["field"] == "per_page"
    assert http(api, "GET", "/api/v1/functions?page=x").status == 400


def test_a_body_past_the_request_bound_is_413(database_url: str) -> None:
    grpc_settings = replace(GrpcSettings(), max_receive_message_bytes=1000)
    running = ServerThread(server_settings(grpc=grpc_settings), database_url)
    try:
        answer = http(
            running,
            "POST",
            "/api/v1/initialize",
            {"script_content": "#" * 2000},
            headers={"Language-Title": "python-big"},
        )
        assert answer.status == 413
        assert answer.error["details"]["metadata"]["setting"] == "GRPC_MAX_RECEIVE_MESSAGE_BYTES"
    finally:
        running.stop()


# --- auth and rate limits -----------------------------------------------------------------


def test_without_a_token_or_with_a_bad_one_it_is_401(jwt_api: ServerThread) -> None:
    for headers in (
        {},
        bearer("not.a.token"),
        bearer(token(exp=int(time.time()) - 60)),
        {"Authorization": "Basic x"},
    ):
        answer = http(
            jwt_api,
            "POST",
            "/api/v1/initialize",
            {"script_content": "result = 1"},
            headers={"Language-Title": "python-auth", **headers},
        )
        assert answer.status == 401, headers
        assert (
            answer.error["code"] == "UNAUTHORIZED"
            and answer.error["details"]["grpc_status"] == "UNAUTHENTICATED"
        )
    # health asks for no token, as the gRPC Health does
    assert http(jwt_api, "GET", "/health").status == 200


def test_a_missing_scope_is_403_naming_it(jwt_api: ServerThread) -> None:
    reader = bearer(token(scope="read:functions"))
    answer = http(
        jwt_api,
        "POST",
        "/api/v1/initialize",
        {"script_content": "result = 1"},
        headers={"Language-Title": "python-auth", **reader},
    )
    assert answer.status == 403 and answer.error["code"] == "FORBIDDEN"
    assert answer.error["details"]["metadata"]["scope"] == "execute:python"
    runner = bearer(token(scope="execute:all"))
    listing = http(jwt_api, "GET", "/api/v1/functions", headers=runner)
    assert listing.status == 403 and listing.error["details"]["metadata"]["scope"] == "read:functions"
    assert http(jwt_api, "GET", "/api/v1/functions", headers=reader).status == 200


def test_a_session_is_its_owners_and_the_rate_limit_is_429_with_retry_after(jwt_api: ServerThread) -> None:
    alice = bearer(token("alice-http"))
    answer = http(
        jwt_api,
        "POST",
        "/api/v1/initialize",
        {"script_content": ADD},
        headers={"Language-Title": "nodejs-auth", **alice},
    )
    request_id = answer.json()["request_id"]
    # another user's session is not found, as over gRPC
    stranger = http(jwt_api, "GET", f"/api/v1/sessions/{request_id}", headers=bearer(token("mallory-http")))
    assert stranger.status == 404
    remaining = []
    for _ in range(3):  # RATE_LIMIT_PER_MINUTE 3: a bucket of 3
        admitted = execute(jwt_api, request_id, {"a": 1, "b": 2}, **alice)
        assert admitted.status == 200 and admitted.json()["result"] == 3
        assert admitted.headers["X-RateLimit-Limit"] == "3"
        remaining.append(int(admitted.headers["X-RateLimit-Remaining"]))
    assert remaining == [2, 1, 0]
    refused = execute(jwt_api, request_id, {"a": 1, "b": 2}, **alice)
    assert refused.status == 429
    assert refused.error["code"] == "RATE_LIMITED" and refused.error["details"]["reason"] == "RATE_LIMITED"
    assert "RATE_LIMIT_PER_MINUTE" in refused.error["message"]
    assert 1 <= int(refused.headers["Retry-After"]) <= 20
    assert refused.headers["X-RateLimit-Remaining"] == "0"
    assert refused.error["details"]["retry_after_seconds"] > 0
    session = http(jwt_api, "GET", f"/api/v1/sessions/{request_id}", headers=alice).json()
    assert session["execution_count"] == 3  # the refused call never reached the session


# --- CORS -------------------------------------------------------------------------------


def test_a_preflight_is_answered_with_the_specs_methods_headers_and_max_age(api: ServerThread) -> None:
    answer = http(
        api,
        "OPTIONS",
        "/api/v1/execute/anything",
        headers={
            "Origin": "https://app.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type, x-cache-control",
        },
    )
    assert answer.status == 204
    assert answer.headers["Access-Control-Allow-Origin"] == "*"
    assert answer.headers["Access-Control-Allow-Methods"] == "GET, POST, OPTIONS"
    allowed = {h.strip().lower() for h in answer.headers["Access-Control-Allow-Headers"].split(",")}
    assert allowed == {
        "content-type",
        "authorization",
        "language-title",
        "x-request-id",
        "x-cache-control",
        "x-request-timeout",
    }
    assert answer.headers["Access-Control-Max-Age"] == "86400"
    simple = http(api, "GET", "/health", headers={"Origin": "https://app.example"})
    assert simple.headers["Access-Control-Allow-Origin"] == "*"
    assert "X-RateLimit-Remaining" in simple.headers["Access-Control-Expose-Headers"]
    assert http(api, "OPTIONS", "/api/v1/nowhere", headers={"Origin": "https://app.example"}).status == 404


def test_cors_allowed_origins_echoes_a_listed_origin_and_ignores_others(database_url: str) -> None:
    settings = server_settings(cors_allowed_origins=("https://app.example", "http://localhost:3000"))
    running = ServerThread(settings, database_url)
    try:
        listed = http(running, "GET", "/health", headers={"Origin": "http://localhost:3000"})
        assert listed.headers["Access-Control-Allow-Origin"] == "http://localhost:3000"
        assert listed.headers["Vary"] == "Origin"
        other = http(running, "GET", "/health", headers={"Origin": "https://evil.example"})
        assert other.status == 200 and "Access-Control-Allow-Origin" not in other.headers
        # every answer depends on the Origin: a shared cache must not give a refused one's
        # (or an Origin-less one's) answer to an allowed origin
        assert other.headers["Vary"] == "Origin"
        assert http(running, "GET", "/health").headers["Vary"] == "Origin"
        preflight = {"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
        refused = http(running, "OPTIONS", "/api/v1/initialize", headers=preflight)
        assert refused.status == 204 and "Access-Control-Allow-Origin" not in refused.headers
        assert refused.headers["Vary"] == "Origin"
        preflight["Origin"] = "https://app.example"
        allowed = http(running, "OPTIONS", "/api/v1/initialize", headers=preflight)
        assert allowed.headers["Access-Control-Allow-Origin"] == "https://app.example"
        assert allowed.headers["Vary"] == "Origin"
    finally:
        running.stop()


# --- request logs and metrics -------------------------------------------------------------


def test_an_http_execute_writes_a_request_log_row_like_grpcs(api: ServerThread, database_url: str) -> None:
    request_id = initialize(api, "python-logged_http", "result = {'twice': params['n'] * 2}")
    assert execute(api, request_id, {"n": 21}, X_Trace="t-http", Authorization="Bearer hidden").status == 200
    missing = str(uuid.uuid4())
    assert execute(api, missing, {"n": 1}).status == 404

    def rows() -> list[Any]:
        found = run_sync(
            fetch(
                database_url,
                "SELECT * FROM public.request_logs WHERE request_id = ANY($1) ORDER BY timestamp",
                [request_id, missing],
            )
        )
        return found if len(found) == 2 else []

    answered, refused = eventually(rows)
    assert answered["status_code"] == 200 and answered["grpc_code"] == "OK"
    assert answered["request_payload"] == {"n": 21} and answered["response_payload"] == {"twice": 42}
    assert answered["request_headers"]["x-trace"] == "t-http"
    assert "authorization" not in answered["request_headers"]
    assert answered["client_ip"] is not None
    assert refused["status_code"] == 404 and refused["grpc_code"] == "NOT_FOUND"


def test_http_requests_are_counted_by_route_and_status(api: ServerThread) -> None:
    registry = api.server.metrics.registry

    def count(method: str, route: str, status: str) -> float:
        labels = {"method": method, "route": route, "status": status}
        return registry.get_sample_value("lambda_http_requests_total", labels) or 0.0

    before = count("GET", "/api/v1/sessions/{request_id}", "404"), count("GET", "unmatched", "404")
    http(api, "GET", f"/api/v1/sessions/{uuid.uuid4()}")
    http(api, "GET", f"/no/such/{uuid.uuid4()}")
    after = count("GET", "/api/v1/sessions/{request_id}", "404"), count("GET", "unmatched", "404")
    assert (after[0] - before[0], after[1] - before[1]) == (1, 1)


def test_the_http_port_is_off_with_http_addr_off(database_url: str) -> None:
    running = ServerThread(server_settings(http_addr=None), database_url)
    try:
        assert running.server.http_port is None
    finally:
        running.stop()


def test_json_body_shapes_are_snake_case(api: ServerThread) -> None:
    request_id = initialize(api, "python-shape_http", "result = 1")
    body = execute(api, request_id, {}).json()
    assert all(key == key.lower() for key in body), json.dumps(body)


def test_a_stop_drains_health_turns_503_and_requests_in_flight_are_answered(database_url: str) -> None:
    settings = server_settings(shutdown_drain_seconds=2.0, shutdown_grace_seconds=10.0)
    running = ServerThread(settings, database_url)
    try:
        request_id = initialize(running, "python-slow_http", "import time\ntime.sleep(3)\nresult = 'done'")
        with ThreadPoolExecutor(2) as pool:
            slow = pool.submit(execute, running, request_id, {})

            def busy() -> bool:
                checks = http(running, "GET", "/health").json()["checks"]
                python = next(check for check in checks if check["name"] == "runtime.python")
                return bool(python["counts"]["busy"] == 1)

            eventually(busy, timeout=30)
            stopping = pool.submit(running.call, running.server.stop(10.0))
            # drained first: still answering, NOT_SERVING
            eventually(lambda: http(running, "GET", "/health").status == 503, timeout=10)
            answer = slow.result(timeout=60)
            stopping.result(timeout=60)
        assert answer.status == 200 and answer.json()["result"] == "done"
    finally:
        running.stop()


def test_request_bytes_in_flight_share_grpcs_budget_and_are_refused_past_it(database_url: str) -> None:
    grpc_settings = replace(GrpcSettings(), max_inflight_request_bytes=4000)  # a peer's share: 2000
    running = ServerThread(server_settings(grpc=grpc_settings), database_url)
    try:
        small = http(
            running,
            "POST",
            "/api/v1/initialize",
            {"script_content": "result = 1"},
            headers={"Language-Title": "python-inflight"},
        )
        assert small.status == 200
        big = http(
            running,
            "POST",
            "/api/v1/initialize",
            {"script_content": "#" * 3000},
            headers={"Language-Title": "python-inflight"},
        )
        assert big.status == 429 and big.error["details"]["reason"] == "QUOTA_EXCEEDED"
        assert big.error["details"]["metadata"]["setting"] == "MAX_INFLIGHT_REQUEST_BYTES"
        assert int(big.headers["Retry-After"]) >= 1
        assert (
            running.server.metrics.registry.get_sample_value(
                "lambda_inflight_refused_total", {"method": "Initialize"}
            )
            == 1
        )
    finally:
        running.stop()


def test_a_body_nested_deeper_than_a_grpc_request_carries_is_400(api: ServerThread) -> None:
    deep: dict[str, Any] = {}
    inner = deep
    for _ in range(300):  # past orjson's own limit too
        inner["a"] = {}
        inner = inner["a"]
    answer = http(
        api,
        "POST",
        "/api/v1/initialize",
        {"script_content": "result = 1", "context": deep},
        headers={"Language-Title": "python-deep"},
    )
    assert answer.status == 400 and answer.error["details"]["metadata"]["field"] == "body"
    assert "49 levels" in answer.error["message"]
    # as deep as gRPC allows is fine
    inner = shallow = {}
    for _ in range(40):
        inner["a"] = {}
        inner = inner["a"]
    request_id = initialize(api, "python-deep", "result = 1", context=shallow)
    assert execute(api, request_id, {}).json()["result"] == 1


# --- what the review of the HTTP API found ------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/api/v1/sessions/%00"),
        ("GET", "/api/v1/sessions/%0a"),
        ("POST", "/api/v1/execute/%0d%0aX:1"),
        ("POST", "/api/v1/execute/a%C3%A9"),
        ("GET", "/api/v1/sessions/not-a-uuid"),
    ],
)
def test_an_id_that_is_not_a_uuid_is_400_and_never_echoed_into_a_header(
    api: ServerThread, method: str, path: str
) -> None:
    answer = http(api, method, path, {} if method == "POST" else None)
    assert answer.status == 400, answer.body
    assert answer.error["code"] == "INVALID_REQUEST" and "is not a UUID" in answer.error["message"]
    assert answer.error["details"]["metadata"]["field"] == "request_id"
    assert "X-Request-ID" not in answer.headers
    # a session's id in another spelling is echoed in its canonical form
    spelled = str(uuid.uuid4())
    found = http(api, "GET", f"/api/v1/sessions/{spelled.upper()}")
    assert found.status == 404 and found.headers["X-Request-ID"] == spelled


def test_a_callers_own_request_id_is_echoed_only_when_a_header_can_carry_it(api: ServerThread) -> None:
    assert http(api, "GET", "/health", headers={"X-Request-ID": "trace-42"}).headers["X-Request-ID"] == (
        "trace-42"
    )
    for sent in ("a\u00e9b", "x" * 65):
        answer = http(api, "GET", "/health", headers={"X-Request-ID": sent})
        assert answer.status == 200 and "X-Request-ID" not in answer.headers


@pytest.mark.parametrize(
    "query",
    [
        "page=99999999999999999999999",
        "page=9223372036854775807&per_page=100",
        "page=2147483648",
        "page=" + "9" * 5000,
        "page=0",
        "page=1e3",
        "page=%201",
    ],
)
def test_a_page_past_the_highest_is_400_naming_page_never_a_database_error(
    api: ServerThread, query: str
) -> None:
    answer = http(api, "GET", f"/api/v1/functions?{query}")
    assert answer.status == 400, answer.body
    assert answer.error["code"] == "INVALID_REQUEST"
    assert answer.error["details"]["metadata"]["field"] == "page"
    assert "database" not in answer.error["message"]


def test_the_highest_page_is_an_empty_page(api: ServerThread) -> None:
    answer = http(api, "GET", "/api/v1/functions?page=2147483647&per_page=100")
    assert answer.status == 200, answer.body
    assert answer.json()["functions"] == [] and answer.json()["page"] == 2147483647


def test_a_context_with_integers_past_64_bits_is_stored_and_read_back_exactly(api: ServerThread) -> None:
    context = {"v": -9223372036854775809, "a": {"b": 99999999999999999999, "c": [2**70, 1.5]}}
    request_id = initialize(api, "python-big_context", "result = context", context=context)
    session = http(api, "GET", f"/api/v1/sessions/{request_id}")
    assert session.status == 200 and session.json()["context"] == context
    answer = execute(api, request_id, {})
    assert answer.status == 200, answer.body
    assert answer.json()["result"] == context
    assert b"99999999999999999999" in answer.body and str(2**70).encode() in answer.body


@pytest.mark.parametrize("header", ["Language-Title", "X-Request-ID", "X-Cache-Control"])
def test_a_text_header_that_is_not_utf8_is_400_naming_it(api: ServerThread, header: str) -> None:
    request_id = initialize(api, "python-utf8_header", "result = 1")
    body = b'{"script_content": "result = 1"}'
    path = "/api/v1/initialize" if header != "X-Cache-Control" else f"/api/v1/execute/{request_id}"
    title = b"" if header == "Language-Title" else b"Language-Title: python-utf8\r\n"
    head = (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n".encode()
        + title
        + header.encode()
        + b": python-\xff\r\n"
    )
    answer = raw_http(api, head, body)
    assert answer.status == 400, answer.body
    assert answer.error["code"] == "INVALID_REQUEST"
    assert answer.error["details"]["metadata"]["field"] == header
    assert "database" not in answer.error["message"]


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
def test_a_body_its_content_encoding_does_not_decode_is_400_naming_body(
    api: ServerThread, encoding: str
) -> None:
    request_id = initialize(api, "python-encoded", "result = 1")
    answer = http(
        api,
        "POST",
        f"/api/v1/execute/{request_id}",
        raw=b'{"params": {}}',
        headers={"Content-Encoding": encoding},
    )
    assert answer.status == 400, answer.body
    assert answer.error["code"] == "INVALID_REQUEST"
    assert answer.error["details"]["metadata"]["field"] == "body"
    # a body that decodes is read
    compressed = gzip.compress(b'{"params": {}}')
    good = http(
        api, "POST", f"/api/v1/execute/{request_id}", raw=compressed, headers={"Content-Encoding": "gzip"}
    )
    assert good.status == 200 and good.json()["result"] == 1


def test_a_client_that_hangs_up_mid_body_is_499_not_a_server_error(
    api: ServerThread, database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    registry = api.server.metrics.registry
    route = "/api/v1/execute/{request_id}"

    def count(status: str) -> float:
        labels = {"method": "POST", "route": route, "status": status}
        return registry.get_sample_value("lambda_http_requests_total", labels) or 0.0

    before = count("499"), count("500")
    request_id = str(uuid.uuid4())

    async def hang_up() -> None:
        host, port = api.http_url.removeprefix("http://").rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(
            f"POST /api/v1/execute/{request_id} HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{{".encode()
        )
        await writer.drain()
        writer.close()
        await writer.wait_closed()

    asyncio.run(hang_up())
    eventually(lambda: count("499") - before[0] == 1)
    assert count("500") == before[1]

    def rows() -> list[Any]:
        return run_sync(
            fetch(database_url, "SELECT * FROM public.request_logs WHERE request_id = $1", request_id)
        )

    (row,) = eventually(rows)
    assert row["status_code"] == 499 and row["grpc_code"] == "CANCELLED"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


def test_a_content_length_past_the_bound_is_413_from_the_header(api: ServerThread) -> None:
    head = (
        f"POST /api/v1/execute/{uuid.uuid4()} HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999\r\n"
    ).encode()
    answer = raw_http(api, head, b"{", timeout=20)  # the body is never sent: not waited for
    assert answer.status == 413, answer.body
    assert answer.error["details"]["metadata"]["setting"] == "GRPC_MAX_RECEIVE_MESSAGE_BYTES"


def test_a_body_that_stalls_is_408_and_its_bytes_in_flight_are_given_back(database_url: str) -> None:
    running = ServerThread(server_settings(http_body_timeout_seconds=1.0), database_url)
    try:
        http_api = running.server.http_api
        assert http_api is not None
        head = f"POST /api/v1/execute/{uuid.uuid4()} HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n".encode()
        answer = raw_http(running, head, b"{", timeout=30)
        assert answer.status == 408, answer.body
        assert answer.headers["Content-Type"].startswith("application/json")
        assert answer.error["code"] == "INVALID_REQUEST"
        assert answer.error["details"]["metadata"]["setting"] == "HTTP_BODY_TIMEOUT_SECONDS"
        assert http_api._served._inflight.held == 0
        # the server still answers
        assert http(running, "GET", "/health").status == 200
    finally:
        running.stop()


def test_stalled_bodies_fill_only_their_senders_share_until_the_body_timeout_frees_it(
    database_url: str,
) -> None:
    """An attacker at 127.0.0.1 opens requests whose bodies never come, each declaring
    300 kB: they fill its share of the bytes in flight (its next is 429), while a second
    tenant at 127.0.0.2 initializes and executes as ever; HTTP_BODY_TIMEOUT_SECONDS ends
    the stalled ones (408) and the attacker's share is its own again."""
    grpc_settings = GrpcSettings(
        max_inflight_request_bytes=4_000_000, max_inflight_request_bytes_per_peer=1_000_000
    )
    running = ServerThread(server_settings(http_body_timeout_seconds=3.0, grpc=grpc_settings), database_url)
    port = running.server.http_port
    declared = 300_000

    async def stall() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=("127.0.0.1", 0))
        head = (
            f"POST /api/v1/execute/{uuid.uuid4()} HTTP/1.1\r\nHost: x\r\nContent-Length: {declared}\r\n\r\n{{"
        )
        writer.write(head.encode())
        await writer.drain()
        return reader, writer

    async def status_of(reader: asyncio.StreamReader) -> int:
        async with asyncio.timeout(60):
            return int((await reader.readline()).split()[1])

    async def victim() -> tuple[int, Any]:
        """The second tenant, from 127.0.0.2: an Initialize and an Execute over HTTP."""
        connector = aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))
        async with aiohttp.ClientSession(f"http://127.0.0.1:{port}", connector=connector) as session:
            body = json_text.dumps({"script_content": "result = params['n'] + 1"})
            headers = {"Language-Title": "python-stall_victim"}
            async with session.post("/api/v1/initialize", data=body, headers=headers) as made:
                assert made.status == 200, await made.text()
                request_id = (await made.json())["request_id"]
            run = json_text.dumps({"params": {"n": 41}})
            async with session.post(f"/api/v1/execute/{request_id}", data=run) as answer:
                return answer.status, json_text.loads(await answer.read())

    async def attack() -> None:
        stalled = [await stall() for _ in range(3)]  # 900 kB of the peer's 1 MB
        refused_reader, refused_writer = await stall()  # 1.2 MB: past its share
        assert await status_of(refused_reader) == 429
        refused_writer.close()
        status, answer = await victim()  # meanwhile, the other tenant
        assert status == 200 and answer["result"] == 42, answer
        for reader, writer in stalled:  # the body timeout ends them
            assert await status_of(reader) == 408
            writer.close()
        assert running.server.http_api is not None
        assert running.server.http_api._served._inflight.of("127.0.0.1") == 0
        # the attacker's share is its own again: 900 kB more are admitted (an unknown session)
        async with aiohttp.ClientSession() as session:
            body = json_text.dumps({"params": {"pad": "x" * 900_000}})
            async with session.post(
                f"http://127.0.0.1:{port}/api/v1/execute/{uuid.uuid4()}", data=body
            ) as late:
                assert late.status == 404, await late.text()

    try:
        run_sync(attack())
    finally:
        running.stop()


@pytest.mark.parametrize(
    "path", ["/health", "/api/v1/health", "/api/v1/functions", "/api/v1/functions/nodejs-calculator"]
)
def test_head_answers_every_get_route_without_a_body(api: ServerThread, path: str) -> None:
    got = http(api, "GET", path)
    head = http(api, "HEAD", path)
    assert head.status == got.status == 200
    assert head.body == b"" and head.headers["Content-Type"] == got.headers["Content-Type"]
    wrong = http(api, "PUT", path, {})
    assert wrong.status == 405 and wrong.headers["Allow"] == "GET, HEAD, OPTIONS"


def test_a_header_and_a_body_field_that_differ_are_400_naming_both(api: ServerThread) -> None:
    script = {"script_content": "result = 1"}
    titled = http(
        api,
        "POST",
        "/api/v1/initialize",
        {"language_title": "python-x_conflict", **script},
        headers={"Language-Title": "nodejs-x_conflict"},
    )
    assert titled.status == 400, titled.body
    assert titled.error["details"]["metadata"] == {"field": "language_title", "header": "Language-Title"}
    assert "python-x_conflict" in titled.error["message"] and "nodejs-x_conflict" in titled.error["message"]
    one, other = str(uuid.uuid4()), str(uuid.uuid4())
    ids = http(
        api,
        "POST",
        "/api/v1/initialize",
        {"request_id": other, **script},
        headers={"Language-Title": "python-x_conflict", "X-Request-ID": one},
    )
    assert ids.status == 400 and ids.error["details"]["metadata"]["field"] == "request_id"
    # the same value in both (a UUID in any spelling) is fine
    same = http(
        api,
        "POST",
        "/api/v1/initialize",
        {"request_id": one.upper(), "language_title": "python-x_conflict", **script},
        headers={"Language-Title": "python-x_conflict", "X-Request-ID": one},
    )
    assert same.status == 200 and same.json()["request_id"] == one
    cached = http(
        api,
        "POST",
        f"/api/v1/execute/{one}",
        {"params": {}, "cache_control": "no-cache"},
        headers={"X-Cache-Control": "max-age=60"},
    )
    assert cached.status == 400 and cached.error["details"]["metadata"]["header"] == "X-Cache-Control"


@pytest.mark.parametrize("title", ["python-a\r\nb", "python-a\tb", "python-a\x7fb", "python-a\x85b"])
def test_a_control_character_in_a_language_title_is_400_on_both_front_doors(
    api: ServerThread, title: str
) -> None:
    answer = http(
        api,
        "POST",
        "/api/v1/initialize",
        {"language_title": title, "script_content": "result = 1"},
    )
    assert answer.status == 400, answer.body
    assert answer.error["details"]["metadata"]["field"] == "language_title"
    assert "control characters" in answer.error["message"]
    with LambdaClient(api.target, timeout=20.0) as client, pytest.raises(ClientError) as refused:
        client.initialize(title, "result = 1")
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "control characters" in str(refused.value)


def test_a_script_cut_by_the_calls_deadline_says_so(api: ServerThread) -> None:
    """X-Request-Timeout shorter than the script's timeout (5 s here): TIMEOUT naming the
    call's deadline, not "past its timeout of 5 s" (the gRPC deadline's words too: one pool)."""
    request_id = initialize(
        api, "python-deadline_cut", "import time\ntime.sleep(params['s'])\nresult = 'done'"
    )
    answer = execute(api, request_id, {"s": 30}, X_Request_Timeout="3")
    assert answer.status == 200 and answer.headers["X-Function-Error"] == "TIMEOUT", answer.body
    message = answer.json()["error"]["message"]
    assert "the call's deadline stopped the script" in message and "past its timeout" not in message
    # the script's own timeout still says so
    own = execute(api, request_id, {"s": 30})
    assert "past its timeout of 5 s" in own.json()["error"]["message"]


def test_a_401_names_the_bearer_scheme(jwt_api: ServerThread) -> None:
    for headers in ({}, bearer("not.a.token")):
        answer = http(jwt_api, "GET", "/api/v1/functions", headers=headers)
        assert answer.status == 401
        assert answer.headers["WWW-Authenticate"].startswith("Bearer")
    assert (
        "WWW-Authenticate" not in http(jwt_api, "GET", "/api/v1/functions", headers=bearer(token())).headers
    )


def test_a_huge_request_timeout_is_cut_and_health_checks_the_header_too(api: ServerThread) -> None:
    request_id = initialize(api, "python-huge_timeout", "result = 1")
    answer = execute(api, request_id, {}, X_Request_Timeout="99999999999999999999999")
    assert answer.status == 200 and answer.json()["result"] == 1, answer.body
    bad = http(api, "GET", "/health", headers={"X-Request-Timeout": "abc"})
    assert bad.status == 400 and bad.error["details"]["metadata"]["field"] == "X-Request-Timeout"
    assert http(api, "GET", "/health", headers={"X-Request-Timeout": "5"}).status == 200


def test_an_integer_option_past_32_bits_is_not_called_a_non_integer(api: ServerThread) -> None:
    answer = http(
        api,
        "POST",
        "/api/v1/initialize",
        {"script_content": "result = 1", "options": {"memory_mb": 99999999999999999999999}},
        headers={"Language-Title": "python-big_option"},
    )
    assert answer.status == 400 and answer.error["details"]["metadata"]["field"] == "options.memory_mb"
    assert "must be an integer of 32 bits" in answer.error["message"]
