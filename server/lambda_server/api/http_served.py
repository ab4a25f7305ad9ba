"""The HTTP/JSON API's middleware: for each request, what the gRPC interceptor does for each call.

It marks the request for the logs (its method and request_id), holds its body's bytes
in the budget gRPC calls share (MAX_INFLIGHT_REQUEST_BYTES), answers errors in the
API's shape (and the router's 404 and 405), applies CORS, counts the request in
lambda_http_requests_total, and writes an Execute's request-log row from the HTTP
request (its wire, as GrpcWire is a gRPC call's).

CORS is this middleware's rather than aiohttp-cors's: the API has one fixed policy
(CORS_ALLOWED_ORIGINS, three methods, five headers, a day's max-age), a few lines here,
while aiohttp-cors wraps every route and has seen few releases.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable, Mapping

import grpc
from aiohttp import web

from lambda_microservice.v1 import lambda_service_pb2 as pb
from lambda_server import json_text
from lambda_server.api import http_json
from lambda_server.api.errors import as_lambda_error
from lambda_server.api.interceptors import InflightBytes
from lambda_server.api.request_logs import RequestLog, execute_entry, log_call, logged_headers
from lambda_server.domain import JSON
from lambda_server.errors import (
    BodyTimeout,
    InvalidRequest,
    LambdaError,
    QuotaExceeded,
    RateLimited,
    RequestTooLarge,
    RouteNotFound,
)
from lambda_server.logs import CallInfo, begin_call, end_call
from lambda_server.metrics import Metrics
from lambda_server.usecases.inputs import parse_request_id

log = logging.getLogger(__name__)

REQUEST_ID_HEADER = "X-Request-ID"
CORS_METHODS = "GET, POST, OPTIONS"
CORS_HEADERS = "Content-Type, Authorization, Language-Title, X-Request-ID, X-Cache-Control, X-Request-Timeout"
CORS_EXPOSED = "X-RateLimit-Limit, X-RateLimit-Remaining, Retry-After, X-Function-Error, X-Request-ID"
CORS_MAX_AGE = "86400"
CLIENT_CLOSED = 499  # nginx's status for a request that ended unanswered, as the request log has it
UNMATCHED = "unmatched"  # the metrics' route of a path no route has: bounded labels
# A caller's own X-Request-ID (on a route without a session id) is echoed only when it is
# visible ASCII that a header can carry as it is: nothing unchecked goes back into a header.
_ECHOABLE = re.compile(r"[!-~](?:[ -~]{0,62}[!-~])?", re.ASCII)
_JSON = "application/json"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ClientGone(Exception):
    """The client closed its connection before its request could be read: not a failure of
    the server. Counted and logged as nginx's 499 (CANCELLED), as a gRPC call cancelled."""


# What a request's handler leaves for the middleware.
QUOTA = web.RequestKey("quota", tuple)  # the rate-limit headers to answer with
ANSWER = web.RequestKey("answer", pb.ExecuteResponse)  # Execute's, for its request log


class ServedRequests:
    """The middleware, with what it counts and logs into."""

    def __init__(
        self,
        metrics: Metrics,
        request_log: RequestLog | None,
        inflight: InflightBytes,
        *,
        methods: Mapping[str, str],  # route -> the method it is logged and counted as
        logged: str,  # the route whose requests the request log keeps (Execute's)
        max_body_bytes: int,
        cors_origins: tuple[str, ...],
    ) -> None:
        self._metrics = metrics
        self._request_log = request_log
        self._inflight = inflight
        self._methods = methods
        self._logged = logged
        self._max_body_bytes = max_body_bytes
        self._origins = frozenset(cors_origins)

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """One request's life: CORS, its bytes in flight, the call marked for the logs, errors
        in the API's shape, counted in the metrics, and Execute's request-log row."""
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else UNMATCHED
        started_at, started = time.time(), time.perf_counter()
        info = CallInfo(self._methods.get(route, route), request.match_info.get("request_id", "")[:64])
        if not info.request_id:
            info.request_id = request.headers.get(REQUEST_ID_HEADER, "")[:64]
        token = begin_call(info)
        error: LambdaError | None = None
        gone = False
        held, peer = 0, peer_address(request)
        try:
            if request.method == "OPTIONS" and self._preflight_allowed(request):
                response: web.StreamResponse = web.Response(status=204)
                self._preflight(request, response)
            else:
                held = self._hold(request, peer, info.method)
                response = await handler(request)
        except ClientGone as exc:  # nobody reads this answer: counted and logged 499
            log.debug("%s: %s", info.method, exc)
            gone = True
            response = web.Response(status=CLIENT_CLOSED)
        except web.HTTPException as exc:  # the router's 404 and 405
            error, status = _routing_error(request, exc)
            response = error_response(error, status)
            if isinstance(exc, web.HTTPMethodNotAllowed):
                response.headers["Allow"] = ", ".join(_allowed(exc))
        except Exception as exc:  # our errors, and anything unexpected as INTERNAL_ERROR
            error = as_lambda_error(info.method, exc)
            response = error_response(error, _status_of(error))
            if isinstance(error, RequestTooLarge | BodyTimeout):
                response.force_close()  # the body's rest is not read: the connection ends here
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
            for name, value in request.get(QUOTA, ()):
                response.headers[name] = value
            echoed = _echoed_request_id(request, info)
            if echoed:  # the session's id (or the caller's own X-Request-ID)
                response.headers[REQUEST_ID_HEADER] = echoed
            self._cors(request, response)
            code = grpc.StatusCode.OK if error is None else grpc.StatusCode[error.status]
            code = grpc.StatusCode.CANCELLED if gone else code
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
        if route == self._logged and request.method == "POST" and self._request_log is not None:
            wire = _HttpWire(request, error, status)
            answer = request.get(ANSWER)
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
        if size is not None and size > self._max_body_bytes:  # refused from the header, unread
            raise body_too_large(self._max_body_bytes)
        size = self._max_body_bytes if size is None else size
        if not inflight.take(peer, size):
            self._metrics.inflight_refused.labels(method).inc()
            raise inflight.refusal(peer, f"this one's {size}")
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
        """Access-Control-Allow-Origin for an allowed Origin (`*` when every origin is). With
        a list of origins every answer says `Vary: Origin`, refused or without an Origin too:
        a shared cache must not hand one origin's answer (with or without Allow-Origin) to
        another."""
        wildcard = "*" in self._origins
        if not wildcard:
            _vary_origin(response)
        origin = request.headers.get("Origin")
        if origin is None:
            return
        if wildcard:
            response.headers["Access-Control-Allow-Origin"] = "*"
        elif origin.rstrip("/") in self._origins:
            response.headers["Access-Control-Allow-Origin"] = origin
        else:
            return
        response.headers["Access-Control-Expose-Headers"] = CORS_EXPOSED


class _HttpWire:
    """An HTTP request's side of its request-log entry."""

    def __init__(self, request: web.Request, error: LambdaError | None, status: int) -> None:
        self._request = request
        self._error = error
        self._status = status

    def address(self) -> str:
        return peer_address(self._request)

    def headers(self) -> dict[str, str]:
        return logged_headers(self._request.headers.items())

    def refusal(self) -> tuple[str, dict[str, str], str]:
        if self._error is None:
            return "", {}, ""
        return self._error.reason, {k: str(v) for k, v in self._error.metadata.items()}, self._error.message

    def http_status(self, code: grpc.StatusCode) -> int:
        return self._status


def _echoed_request_id(request: web.Request, info: CallInfo) -> str:
    """The X-Request-ID to answer with: a session's id only when it is a UUID (then in its
    canonical form; a path id may hold anything, a control character too), the caller's own
    header only when _ECHOABLE; else none."""
    session_id = request.match_info.get("request_id")
    if session_id is not None or info.method == "Initialize":
        try:
            return parse_request_id(info.request_id if session_id is None else session_id)
        except InvalidRequest:
            return ""
    own = request.headers.get(REQUEST_ID_HEADER, "")
    return own if _ECHOABLE.fullmatch(own) else ""


def _vary_origin(response: web.StreamResponse) -> None:
    vary = [name.strip() for name in response.headers.get("Vary", "").split(",") if name.strip()]
    if not any(name.lower() in ("origin", "*") for name in vary):
        response.headers["Vary"] = ", ".join([*vary, "Origin"])


def _routing_error(request: web.Request, exc: web.HTTPException) -> tuple[LambdaError, int]:
    if isinstance(exc, web.HTTPMethodNotAllowed):
        allowed = ", ".join(_allowed(exc))
        message = f"{request.path} does not take {request.method}; it takes {allowed}"
        return InvalidRequest(message, field="method"), http_json.METHOD_NOT_ALLOWED
    if exc.status == 404:
        return RouteNotFound(f"no route {request.method} {request.path[:200]}"), 404
    return InvalidRequest(exc.reason or "a malformed request"), exc.status


def _allowed(exc: web.HTTPMethodNotAllowed) -> list[str]:
    """The route's methods (HEAD with every GET), and OPTIONS: the middleware answers a
    preflight on every route."""
    return sorted({*exc.allowed_methods, "OPTIONS"})


def _status_of(error: LambdaError) -> int | None:
    """The answers outside the table's statuses: 413 for a body past its bound, 408 for one
    that did not arrive in time."""
    if isinstance(error, RequestTooLarge):
        return http_json.PAYLOAD_TOO_LARGE
    if isinstance(error, BodyTimeout):
        return http_json.REQUEST_TIMEOUT
    return None


def body_too_large(max_body_bytes: int) -> RequestTooLarge:
    """A body past GRPC_MAX_RECEIVE_MESSAGE_BYTES, by its Content-Length or as it was read."""
    return RequestTooLarge(
        f"the body is larger than GRPC_MAX_RECEIVE_MESSAGE_BYTES ({max_body_bytes})",
        field="body",
        setting="GRPC_MAX_RECEIVE_MESSAGE_BYTES",
        limit=str(max_body_bytes),
    )


def error_response(error: LambdaError, status: int | None = None) -> web.Response:
    mapped, code = http_json.error_status(error)
    response = json_answer(http_json.error_body(error, code), status or mapped)
    if isinstance(error, RateLimited | QuotaExceeded):
        response.headers["Retry-After"] = str(max(1, int(error.retry_after + 0.999)))
    if response.status == 401:  # RFC 9110 §11.6.1: a 401 names the scheme it asks for
        response.headers["WWW-Authenticate"] = 'Bearer realm="lambda-microservice"'
    return response


def json_answer(body: dict[str, JSON], status: int = 200) -> web.Response:
    """Exact JSON text: integers past 2**53 (or 64 bits) are written as they are."""
    return web.Response(body=json_text.dumps(body), status=status, content_type=_JSON)


def peer_address(request: web.Request) -> str:
    peer = request.transport.get_extra_info("peername") if request.transport is not None else None
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return request.remote or ""
