"""The HTTP/JSON API: the original service's routes, on aiohttp beside gRPC, calling the same use cases.

A front door like the gRPC servicer: it translates HTTP and JSON to and from domain
values and holds no business logic. The same Gate authenticates callers and takes
their rate-limit tokens, the same ExecutePayloads bounds params and results (and
notes them for the request log), errors come from errors.py's one table (mapped to
HTTP in http_json.ERRORS), and one middleware does for each request what the gRPC
interceptor does for each call: marks it for the logs, holds its bytes in flight,
counts it in the metrics and, for Execute, writes its request-log row.

CORS is a middleware of our own rather than aiohttp-cors: the API needs one fixed
policy (CORS_ALLOWED_ORIGINS, three methods, five headers, a day's max-age), which is
a few lines, and aiohttp-cors wraps every route and has seen few releases.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from aiohttp import web

from lambda_microservice.v1 import lambda_service_pb2 as pb
from lambda_server import json_text
from lambda_server.api import http_json
from lambda_server.api.convert import ExecutePayloads
from lambda_server.api.errors import as_lambda_error
from lambda_server.api.gate import REFUSED_QUOTA, Gate
from lambda_server.api.interceptors import INFLIGHT_RETRY_AFTER, InflightBytes
from lambda_server.api.request_logs import RequestLog, execute_entry, log_call, logged_headers
from lambda_server.config import ConfigError
from lambda_server.domain import JSON, Caller, Deadline, OptimizationLevel
from lambda_server.errors import (
    InvalidRequest,
    LambdaError,
    QuotaExceeded,
    RateLimited,
    RouteNotFound,
)
from lambda_server.limits import LimitedCall
from lambda_server.logs import CallInfo, begin_call, current_call, end_call
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
UNMATCHED = "unmatched"  # the metrics' route of a path no route has: bounded labels

LANGUAGE_TITLE_HEADER = "Language-Title"
REQUEST_ID_HEADER = "X-Request-ID"
CACHE_CONTROL_HEADER = "X-Cache-Control"
AUTHORIZATION_HEADER = "Authorization"
CORS_METHODS = "GET, POST, OPTIONS"
CORS_HEADERS = "Content-Type, Authorization, Language-Title, X-Request-ID, X-Cache-Control"
CORS_EXPOSED = "X-RateLimit-Limit, X-RateLimit-Remaining, Retry-After, X-Function-Error, X-Request-ID"
CORS_MAX_AGE = "86400"
DEFAULT_PER_PAGE = 20
CLIENT_CLOSED = 499  # nginx's status for a request that ended unanswered, as the request log has it
_JSON = "application/json"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# What a request carries from its handler to the middleware.
_BODY = web.RequestKey("body", bytes)
_QUOTA = web.RequestKey("quota", tuple)  # the rate-limit headers to answer with
_ANSWER = web.RequestKey("answer", pb.ExecuteResponse)  # Execute's, for its request log


class HttpApi:
    """The routes and the per-request middleware; `start` serves them, `stop` drains them."""

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
    ) -> None:
        self._usecases = usecases
        self._gate = gate
        self._payloads = payloads
        self._metrics = metrics
        self._request_log = request_log
        self._inflight = inflight
        self._max_body_bytes = max_body_bytes
        self._origins = frozenset(cors_origins)
        self._grace = grace
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

    def application(self) -> web.Application:
        app = web.Application(client_max_size=self._max_body_bytes, middlewares=[self._served])
        app.router.add_post(INITIALIZE, self.initialize)
        app.router.add_post(EXECUTE, self.execute)
        app.router.add_get(SESSION, self.get_session, allow_head=False)
        app.router.add_get(FUNCTIONS, self.list_functions, allow_head=False)
        app.router.add_get(FUNCTION, self.get_function, allow_head=False)
        app.router.add_get(HEALTH, self.health, allow_head=False)
        app.router.add_get(API_HEALTH, self.health, allow_head=False)
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
        caller = self._caller(request)
        self._gate.admit(caller, LimitedCall.INITIALIZE)  # before any work: checks cost CPU
        body = await self._object_body(request, caller)
        title = http_json.text_field(body, "language_title") or request.headers.get(LANGUAGE_TITLE_HEADER, "")
        request_id = http_json.text_field(body, "request_id") or request.headers.get(REQUEST_ID_HEADER, "")
        record = await self._usecases.initialize(
            language_title=title,
            script=http_json.text_field(body, "script_content"),
            context=http_json.object_field(body, "context"),
            request_id=request_id or None,
            caller=caller,
            deadline=Deadline(None),
            options=http_json.requested_options(http_json.object_field(body, "options")),
            optimization=_optimization(http_json.object_field(body, "compile_options")),
            dependencies=http_json.strings_field(body, "dependencies"),
        )
        call = current_call()
        if call is not None:
            call.request_id = record.request_id
        return _json(http_json.initialize_body(record))

    async def execute(self, request: web.Request) -> web.StreamResponse:
        request_id = request.match_info["request_id"]
        caller = self._caller(request)
        try:
            request[_QUOTA] = self._gate.admit(caller)
        except RateLimited:
            request[_QUOTA] = REFUSED_QUOTA
            raise
        raw = await self._read(request)
        body = await self._object_body(request, caller, raw)
        params = body.get("params")
        params = await self._payloads.parsed_params({} if params is None else params, len(raw), caller.owner)
        cache_control = request.headers.get(CACHE_CONTROL_HEADER)
        cache_control = cache_control or http_json.text_field(body, "cache_control")
        execution = await self._usecases.execute(request_id, params, caller, Deadline(None), cache_control)
        response = await self._payloads.response(execution, caller.owner)
        request[_ANSWER] = response
        answer = _json(http_json.execute_body(response, execution))
        if response.HasField("error"):
            answer.headers[http_json.FUNCTION_ERROR_HEADER] = http_json.failure_code(response)
        return answer

    async def get_session(self, request: web.Request) -> web.StreamResponse:
        caller = self._caller(request)
        record = await self._usecases.get_session(request.match_info["request_id"], caller, Deadline(None))
        return _json(http_json.session_body(record))

    async def list_functions(self, request: web.Request) -> web.StreamResponse:
        caller = self._caller(request)
        query = request.query
        page = _query_int(query.get("page"), "page", 1)
        per_page = _query_int(query.get("per_page"), "per_page", DEFAULT_PER_PAGE)
        language = query.get("language", "")
        functions, total = await self._usecases.catalog.numbered_page(
            language, page, per_page, caller, Deadline(None)
        )
        return _json(
            {
                "total": total,
                "page": page,
                "per_page": per_page,
                "functions": [http_json.function_summary(f) for f in functions],
            }
        )

    async def get_function(self, request: web.Request) -> web.StreamResponse:
        caller = self._caller(request)
        function = await self._usecases.catalog.get_function(
            request.match_info["language_title"], caller, Deadline(None)
        )
        return _json(http_json.function_body(function))

    async def health(self, request: web.Request) -> web.StreamResponse:
        report = self._usecases.health()
        return _json(http_json.health_body(report), 200 if report.serving else 503)

    # --- what every route shares -------------------------------------------------------

    def _caller(self, request: web.Request) -> Caller:
        return self._gate.caller(request.headers.get(AUTHORIZATION_HEADER), _address(request))

    async def _read(self, request: web.Request) -> bytes:
        """The body, at most client_max_size (GRPC_MAX_RECEIVE_MESSAGE_BYTES)."""
        cached = request.get(_BODY)
        if cached is None:
            try:
                cached = await request.read()
            except web.HTTPRequestEntityTooLarge:
                raise _TooLarge(
                    f"the body is larger than GRPC_MAX_RECEIVE_MESSAGE_BYTES ({self._max_body_bytes})",
                    setting="GRPC_MAX_RECEIVE_MESSAGE_BYTES",
                    limit=str(self._max_body_bytes),
                ) from None
            request[_BODY] = cached
        body: bytes = cached
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
            what = http_json.kind(body)
            raise InvalidRequest(f"the body must be a JSON object, not a JSON {what}", field="body")
        return body

    @web.middleware
    async def _served(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """One request's life: CORS, its bytes in flight, the call marked for the logs, errors
        in the API's shape, counted in the metrics, and Execute's request-log row."""
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else UNMATCHED
        started_at, started = time.time(), time.perf_counter()
        info = CallInfo(METHODS.get(route, route), request.match_info.get("request_id", "")[:64])
        if not info.request_id:
            info.request_id = request.headers.get(REQUEST_ID_HEADER, "")[:64]
        token = begin_call(info)
        error: LambdaError | None = None
        held, peer = 0, _address(request)
        try:
            if request.method == "OPTIONS" and self._preflight_allowed(request):
                response: web.StreamResponse = web.Response(status=204)
                self._preflight(request, response)
            else:
                held = self._hold(request, peer, info.method)
                response = await handler(request)
        except web.HTTPException as exc:  # the router's 404 and 405
            error, status = _routing_error(request, exc)
            response = _error_response(error, status)
            if isinstance(exc, web.HTTPMethodNotAllowed):
                response.headers["Allow"] = ", ".join(sorted(exc.allowed_methods))
        except Exception as exc:  # our errors, and anything unexpected as INTERNAL_ERROR
            error = as_lambda_error(info.method, exc)
            response = _error_response(error, _TooLarge.status_of(error))
        except asyncio.CancelledError:  # the server stopped past its grace: counted and logged
            self._finish(
                request, route, info, grpc.StatusCode.CANCELLED, None, CLIENT_CLOSED, started_at, started
            )
            end_call(token)
            raise
        finally:
            if held:
                self._inflight.give_back(peer, held)
        try:
            for name, value in request.get(_QUOTA, ()):
                response.headers[name] = value
            if info.request_id:  # the session's id (or the caller's own X-Request-ID)
                response.headers[REQUEST_ID_HEADER] = info.request_id
            self._cors(request, response)
            code = grpc.StatusCode.OK if error is None else grpc.StatusCode[error.status]
            self._finish(request, route, info, code, error, response.status, started_at, started)
        finally:
            end_call(token)
        return response

    def _finish(
        self,
        request: web.Request,
        route: str,
        info: CallInfo,
        code: grpc.StatusCode,
        error: LambdaError | None,
        status: int,
        started_at: float,
        started: float,
    ) -> None:
        """Count the request; an Execute's row in the request log, as the gRPC interceptor writes it."""
        elapsed = time.perf_counter() - started
        self._metrics.http_requests.labels(request.method, route, str(status)).inc()
        self._metrics.http_seconds.labels(route).observe(elapsed)
        if route == EXECUTE and request.method == "POST" and self._request_log is not None:
            wire = _HttpWire(request, error, status)
            answer = request.get(_ANSWER)
            log_call(
                self._request_log, self._metrics, execute_entry, answer, code, wire, info, started_at, elapsed
            )

    def _hold(self, request: web.Request, peer: str, method: str) -> int:
        """Hold the request's bytes in flight, as the gRPC interceptor holds a call's, before
        its body is read: its Content-Length, or for a body sent in chunks (no length) the
        most it may be (GRPC_MAX_RECEIVE_MESSAGE_BYTES); QuotaExceeded (429) when they do
        not fit."""
        if request.method != "POST":
            return 0
        inflight = self._inflight
        size = request.content_length
        size = self._max_body_bytes if size is None else min(size, self._max_body_bytes)
        if not inflight.take(peer, size):
            self._metrics.inflight_refused.labels(method).inc()
            raise QuotaExceeded(
                f"the server holds {inflight.held} bytes of requests in flight, {inflight.of(peer)} of them "
                f"from {peer}; this one's {size} would go past MAX_INFLIGHT_REQUEST_BYTES ({inflight.limit}) "
                f"or a peer's share of it ({inflight.per_peer})",
                INFLIGHT_RETRY_AFTER,
                setting="MAX_INFLIGHT_REQUEST_BYTES",
                limit=str(inflight.limit),
            )
        return size

    def _preflight_allowed(self, request: web.Request) -> bool:
        """An OPTIONS request for a route that exists: answered whatever its Origin."""
        failure = request.match_info.http_exception
        return failure is None or failure.status == 405

    def _preflight(self, request: web.Request, response: web.StreamResponse) -> None:
        response.headers["Access-Control-Allow-Methods"] = CORS_METHODS
        response.headers["Access-Control-Allow-Headers"] = CORS_HEADERS
        response.headers["Access-Control-Max-Age"] = CORS_MAX_AGE

    def _cors(self, request: web.Request, response: web.StreamResponse) -> None:
        """Access-Control-Allow-Origin for an allowed Origin (`*` when every origin is)."""
        origin = request.headers.get("Origin")
        if origin is None:
            return
        if "*" in self._origins:
            response.headers["Access-Control-Allow-Origin"] = "*"
        elif origin.rstrip("/") in self._origins:
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Vary"] = "Origin"
        else:
            return
        response.headers["Access-Control-Expose-Headers"] = CORS_EXPOSED


class _TooLarge(InvalidRequest):
    """A body past client_max_size: 413, reason INVALID_REQUEST."""

    @staticmethod
    def status_of(error: LambdaError) -> int | None:
        return http_json.PAYLOAD_TOO_LARGE if isinstance(error, _TooLarge) else None


class _HttpWire:
    """An HTTP request's side of its request-log entry."""

    def __init__(self, request: web.Request, error: LambdaError | None, status: int) -> None:
        self._request = request
        self._error = error
        self._status = status

    def address(self) -> str:
        return _address(self._request)

    def headers(self) -> dict[str, str]:
        return logged_headers(self._request.headers.items())

    def refusal(self) -> tuple[str, dict[str, str], str]:
        if self._error is None:
            return "", {}, ""
        return self._error.reason, {k: str(v) for k, v in self._error.metadata.items()}, self._error.message

    def http_status(self, code: grpc.StatusCode) -> int:
        return self._status


def _routing_error(request: web.Request, exc: web.HTTPException) -> tuple[LambdaError, int]:
    if exc.status == http_json.METHOD_NOT_ALLOWED:
        allowed = ", ".join(sorted(getattr(exc, "allowed_methods", ()) or ()))
        message = f"{request.path} does not take {request.method}; it takes {allowed}"
        return InvalidRequest(message, field="method"), http_json.METHOD_NOT_ALLOWED
    if exc.status == 404:
        return RouteNotFound(f"no route {request.method} {request.path[:200]}"), 404
    return InvalidRequest(exc.reason or "a malformed request"), exc.status


def _error_response(error: LambdaError, status: int | None = None) -> web.Response:
    mapped, code = http_json.error_status(error)
    response = _json(http_json.error_body(error, code), status or mapped)
    if isinstance(error, RateLimited | QuotaExceeded):
        response.headers["Retry-After"] = str(max(1, int(error.retry_after + 0.999)))
    return response


def _json(body: dict[str, JSON], status: int = 200) -> web.Response:
    """Exact JSON text: integers past 2**53 (or 64 bits) are written as they are."""
    return web.Response(body=json_text.dumps(body), status=status, content_type=_JSON)


def _address(request: web.Request) -> str:
    peer = request.transport.get_extra_info("peername") if request.transport is not None else None
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return request.remote or ""


def _query_int(raw: str | None, name: str, default: int) -> int:
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise InvalidRequest(f"{name} must be an integer, not {raw[:40]!r}", field=name) from None


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
