"""The HTTP/JSON API: the original service's routes, on aiohttp beside gRPC, calling the same use cases.

A front door like the gRPC servicer: it translates HTTP and JSON to and from domain
values (http_json) and holds no business logic. The same Gate authenticates callers and
takes their rate-limit tokens, the same ExecutePayloads bounds params and results (and
notes them for the request log), errors come from errors.py's one table (mapped to HTTP
in http_json.ERRORS), and the middleware (http_served) does for each request what the
gRPC interceptor does for each call.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from typing import Any

from aiohttp import web

from lambda_server.api import http_json
from lambda_server.api.convert import ExecutePayloads, json_kind
from lambda_server.api.gate import REFUSED_QUOTA, Gate
from lambda_server.api.http_served import (
    ANSWER,
    QUOTA,
    REQUEST_ID_HEADER,
    ClientGone,
    ServedRequests,
    body_too_large,
    json_answer,
    peer_address,
)
from lambda_server.api.interceptors import InflightBytes
from lambda_server.api.request_logs import RequestLog
from lambda_server.api.servicer import RESPONSE_MARGIN
from lambda_server.config import ConfigError
from lambda_server.domain import JSON, Caller, Deadline, OptimizationLevel
from lambda_server.errors import BodyTimeout, InvalidRequest, RateLimited
from lambda_server.limits import LimitedCall
from lambda_server.logs import current_call
from lambda_server.metrics import Metrics
from lambda_server.usecases import UseCases

INITIALIZE = "/api/v1/initialize"
EXECUTE = "/api/v1/execute/{request_id}"
SESSION = "/api/v1/sessions/{request_id}"
FUNCTIONS = "/api/v1/functions"
FUNCTION = "/api/v1/functions/{language_title}"
HEALTH = "/health"
API_HEALTH = "/api/v1/health"
# The method each route is logged and counted as (the gRPC method it stands for).
METHODS = {
    INITIALIZE: "Initialize",
    EXECUTE: "Execute",
    SESSION: "GetSession",
    FUNCTIONS: "ListFunctions",
    FUNCTION: "GetFunction",
    HEALTH: "Health",
    API_HEALTH: "Health",
}

LANGUAGE_TITLE_HEADER = "Language-Title"
CACHE_CONTROL_HEADER = "X-Cache-Control"
# The caller's time for the call, in seconds (a gRPC caller's deadline): the call's answer
# comes within it, DEADLINE_EXCEEDED (504) when the work does not fit.
REQUEST_TIMEOUT_HEADER = "X-Request-Timeout"
# Any length of whole seconds (a longer one is cut to HTTP_MAX_REQUEST_TIMEOUT_SECONDS), up to
# nanoseconds; never what float() also reads (nan, inf, 1e3, +2, 1_0).
_TIMEOUT = re.compile(r"[0-9]{1,40}(?:\.[0-9]{1,9})?", re.ASCII)
AUTHORIZATION_HEADER = "Authorization"
_INTEGER = re.compile(r"[+-]?[0-9]+", re.ASCII)
_LONGEST_INTEGER = 40
DEFAULT_PER_PAGE = 20


class HttpApi:
    """The routes; `start` serves them (through the middleware), `stop` drains them."""

    def __init__(
        self,
        usecases: UseCases,
        gate: Gate,
        payloads: ExecutePayloads,
        metrics: Metrics,
        request_log: RequestLog | None,
        inflight: InflightBytes,
        *,
        max_body_bytes: int,  # GRPC_MAX_RECEIVE_MESSAGE_BYTES: the same bound as a gRPC request's
        cors_origins: tuple[str, ...],
        grace: float,  # SHUTDOWN_GRACE_SECONDS: requests in flight at stop
        max_request_timeout: float,  # HTTP_MAX_REQUEST_TIMEOUT_SECONDS: X-Request-Timeout's cap
        body_timeout: float,  # HTTP_BODY_TIMEOUT_SECONDS: the most a body takes to arrive
    ) -> None:
        self._max_request_timeout = max_request_timeout
        self._body_timeout = body_timeout
        self._usecases = usecases
        self._gate = gate
        self._payloads = payloads
        self._max_body_bytes = max_body_bytes
        self._served = ServedRequests(
            metrics,
            request_log,
            inflight,
            methods=METHODS,
            logged=EXECUTE,
            max_body_bytes=max_body_bytes,
            cors_origins=cors_origins,
        )
        self._grace = grace
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

    def application(self) -> web.Application:
        app = web.Application(client_max_size=self._max_body_bytes, middlewares=[self._served.middleware])
        app.router.add_post(INITIALIZE, self.initialize)
        app.router.add_post(EXECUTE, self.execute)
        app.router.add_get(SESSION, self.get_session)
        app.router.add_get(FUNCTIONS, self.list_functions)
        app.router.add_get(FUNCTION, self.get_function)
        app.router.add_get(HEALTH, self.health)
        app.router.add_get(API_HEALTH, self.health)
        return app

    async def start(self, address: str) -> int:
        """Listen on `address` (HOST:PORT, port 0 picks one); ConfigError naming HTTP_ADDR
        when it cannot. The port bound."""
        host, _, port = address.rpartition(":")
        runner = web.AppRunner(
            self.application(), access_log=None, handle_signals=False, shutdown_timeout=self._grace
        )
        await runner.setup()
        site = web.TCPSite(runner, host.strip("[]"), int(port), reuse_port=False)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise ConfigError(f"HTTP_ADDR={address!r}: cannot listen there: {exc.strerror or exc}") from None
        self._runner = runner
        self.port = int(runner.addresses[0][1])
        return self.port

    async def stop(self) -> None:
        """Stop listening, give requests in flight SHUTDOWN_GRACE_SECONDS, close the rest."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    # --- the routes ---------------------------------------------------------------------

    async def initialize(self, request: web.Request) -> web.StreamResponse:
        deadline = self._deadline(request)  # from the request's start, as a gRPC call's
        caller = self._caller(request)
        self._gate.admit(caller, LimitedCall.INITIALIZE)  # before any work: checks cost CPU
        body = await self._object_body(request, caller)
        title = _header_or_field(request, LANGUAGE_TITLE_HEADER, body, "language_title")
        request_id = _header_or_field(request, REQUEST_ID_HEADER, body, "request_id")
        record = await self._usecases.initialize(
            language_title=title,
            script=http_json.text_field(body, "script_content"),
            context=http_json.object_field(body, "context"),
            request_id=request_id or None,
            caller=caller,
            deadline=deadline,
            options=http_json.requested_options(http_json.object_field(body, "options")),
            optimization=_optimization(http_json.object_field(body, "compile_options")),
            dependencies=http_json.strings_field(body, "dependencies"),
        )
        call = current_call()
        if call is not None:
            call.request_id = record.request_id
        return json_answer(http_json.initialize_body(record))

    async def execute(self, request: web.Request) -> web.StreamResponse:
        request_id = request.match_info["request_id"]
        deadline = self._deadline(request)
        caller = self._caller(request)
        try:
            request[QUOTA] = self._gate.admit(caller)
        except RateLimited:
            request[QUOTA] = REFUSED_QUOTA
            raise
        raw = await self._read(request)
        body = await self._object_body(request, caller, raw)
        params = body.get("params")
        params = await self._payloads.parsed_params({} if params is None else params, len(raw), caller.owner)
        cache_control = _header_or_field(request, CACHE_CONTROL_HEADER, body, "cache_control")
        execution = await self._usecases.execute(request_id, params, caller, deadline, cache_control)
        response = await self._payloads.response(execution, caller.owner)
        request[ANSWER] = response
        answer = json_answer(http_json.execute_body(response, execution))
        if response.HasField("error"):
            answer.headers[http_json.FUNCTION_ERROR_HEADER] = http_json.failure_code(response)
        return answer

    async def get_session(self, request: web.Request) -> web.StreamResponse:
        deadline = self._deadline(request)
        caller = self._caller(request)
        record = await self._usecases.get_session(request.match_info["request_id"], caller, deadline)
        return json_answer(http_json.session_body(record))

    async def list_functions(self, request: web.Request) -> web.StreamResponse:
        deadline = self._deadline(request)
        caller = self._caller(request)
        query = request.query
        page = _query_int(query.get("page"), "page", 1)
        per_page = _query_int(query.get("per_page"), "per_page", DEFAULT_PER_PAGE)
        language = query.get("language", "")
        functions, total = await self._usecases.catalog.numbered_page(
            language, page, per_page, caller, deadline
        )
        return json_answer(
            {
                "total": total,
                "page": page,
                "per_page": per_page,
                "functions": [http_json.function_summary(f) for f in functions],
            }
        )

    async def get_function(self, request: web.Request) -> web.StreamResponse:
        deadline = self._deadline(request)
        caller = self._caller(request)
        function = await self._usecases.catalog.get_function(
            request.match_info["language_title"], caller, deadline
        )
        return json_answer(http_json.function_body(function))

    async def health(self, request: web.Request) -> web.StreamResponse:
        self._deadline(request)  # nothing here waits, but a malformed header is 400 on every route
        report = self._usecases.health()
        return json_answer(http_json.health_body(report), 200 if report.serving else 503)

    # --- what every route shares -------------------------------------------------------

    def _deadline(self, request: web.Request) -> Deadline:
        """X-Request-Timeout's seconds (at most HTTP_MAX_REQUEST_TIMEOUT_SECONDS), less the
        margin the gRPC servicer keeps so the answer arrives in time; none without the header
        (the settings' own bounds then apply). InvalidRequest naming the header when it is
        not a positive number of seconds."""
        raw = request.headers.get(REQUEST_TIMEOUT_HEADER)
        if raw is None:
            return Deadline(None)
        seconds = float(raw) if _TIMEOUT.fullmatch(raw.strip()) else 0.0
        if seconds <= 0:
            raise InvalidRequest(
                f"{REQUEST_TIMEOUT_HEADER} must be a positive number of seconds, not {raw[:40]!r}",
                field=REQUEST_TIMEOUT_HEADER,
            )
        seconds = min(seconds, self._max_request_timeout)
        return Deadline.after(max(0.0, seconds - RESPONSE_MARGIN))

    def _caller(self, request: web.Request) -> Caller:
        return self._gate.caller(request.headers.get(AUTHORIZATION_HEADER), peer_address(request))

    async def _read(self, request: web.Request) -> bytes:
        """The body, at most client_max_size (GRPC_MAX_RECEIVE_MESSAGE_BYTES), within
        HTTP_BODY_TIMEOUT_SECONDS: RequestTooLarge (413) past the size, BodyTimeout (408)
        past the time, InvalidRequest naming `body` when it cannot be decoded under its
        Content-Encoding, ClientGone when the client hung up before sending it all."""
        try:
            async with asyncio.timeout(self._body_timeout):
                body: bytes = await request.read()  # aiohttp keeps it: a second read costs nothing
        except web.HTTPRequestEntityTooLarge:
            raise body_too_large(self._max_body_bytes) from None
        except TimeoutError:
            raise BodyTimeout(
                f"the body did not arrive within HTTP_BODY_TIMEOUT_SECONDS ({self._body_timeout:g} s)",
                field="body",
                setting="HTTP_BODY_TIMEOUT_SECONDS",
                limit=f"{self._body_timeout:g}",
            ) from None
        except (ConnectionResetError, web.RequestPayloadError) as exc:
            transport = request.transport
            if isinstance(exc, ConnectionResetError) or transport is None or transport.is_closing():
                raise ClientGone("the client closed the connection before sending its body") from None
            # aiohttp's only other payload error: a body its Content-Encoding does not decode
            raise InvalidRequest(f"the body cannot be read: {exc}", field="body") from None
        return body

    async def _object_body(
        self, request: web.Request, caller: Caller, raw: bytes | None = None
    ) -> dict[str, JSON]:
        """The body's JSON object ({} for an empty body); InvalidRequest (400) when it is not."""
        raw = await self._read(request) if raw is None else raw
        if not raw.strip():
            return {}
        body = await self._payloads.json_body(raw, caller.owner)
        if not isinstance(body, dict):
            what = json_kind(body)
            raise InvalidRequest(f"the body must be a JSON object, not a JSON {what}", field="body")
        return body


def _header_or_field(request: web.Request, header: str, body: dict[str, JSON], field: str) -> str:
    """A value a caller may send as a header or as a body field ('' when neither); both may
    be sent when they agree (request ids as UUIDs: in any spelling), else InvalidRequest
    naming both, rather than one silently winning."""
    sent = _text_header(request, header)
    given = http_json.text_field(body, field)
    if sent and given and sent != given and not _same_uuid(sent, given):
        raise InvalidRequest(
            f"the {header} header ({sent[:64]!r}) and the body's {field} ({given[:64]!r}) differ: "
            "send one of them, or the same value in both",
            field=field,
            header=header,
        )
    return given or sent


def _same_uuid(one: str, other: str) -> bool:
    try:
        return uuid.UUID(one) == uuid.UUID(other)
    except ValueError:
        return False


def _text_header(request: web.Request, name: str) -> str:
    """A header read as text ('' when absent); InvalidRequest naming it when its bytes are not
    UTF-8 (aiohttp hands them on as lone surrogates, which no use case or database takes)."""
    value = request.headers.get(name, "")
    try:
        value.encode()
    except UnicodeEncodeError:
        raise InvalidRequest(f"the {name} header is not valid UTF-8", field=name) from None
    return value


def _query_int(raw: str | None, name: str, default: int) -> int:
    """A query parameter of ASCII digits (and a sign); its range is the use case's to check."""
    if raw is None or raw == "":
        return default
    if not _INTEGER.fullmatch(raw):
        raise InvalidRequest(f"{name} must be an integer, not {raw[:40]!r}", field=name)
    if len(raw) > _LONGEST_INTEGER:  # past any bound, and past what int() reads quickly
        raise InvalidRequest(f"{name} {raw[:20]}... is out of range ({len(raw)} digits)", field=name)
    return int(raw)


def _optimization(options: dict[str, Any]) -> OptimizationLevel:
    level = options.get("optimization_level")
    if level is None:
        return OptimizationLevel.DEBUG
    name = str(level).lower().removeprefix("optimization_level_")
    try:
        return OptimizationLevel(name)
    except ValueError:
        raise InvalidRequest(
            f"compile_options.optimization_level must be debug or release, not {str(level)[:40]!r}",
            field="compile_options.optimization_level",
        ) from None
