"""Execute and ExecuteBatch calls as request-log entries: the HTTP status, bounded payloads, no secrets.

An entry is made from the answer (an ExecuteResponse) and from what the call's wire
tells (a CallWire): the gRPC call's context (GrpcWire), or the HTTP request (the HTTP
API's own), so that an Execute over either front door is logged alike."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any, Protocol

import grpc
from google.rpc import error_details_pb2, status_pb2

from lambda_microservice.v1 import lambda_service_pb2 as pb
from lambda_server.api.errors import Context
from lambda_server.domain import JSON, ErrorLogEntry, RequestLogEntry
from lambda_server.logs import CallInfo, Payload
from lambda_server.metrics import Metrics

log = logging.getLogger(__name__)

# The usual HTTP equivalent of each gRPC status (as grpc-gateway and Google APIs map them).
HTTP_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
}
# An OK answer whose script failed (ExecuteResponse.error): an error for the analytics views.
SCRIPT_FAILED_STATUS = 500

# Payloads past this (params or result, about their JSON size) are not logged: the
# column holds {"truncated": true, "limit_bytes": ...} instead. They cost the writer's
# queue memory, and PostgreSQL's disk; 64 KiB keeps both small. A payload the call could
# not convert (past MAX_JSON_NODES or MAX_JSON_DEPTH, or not JSON) is logged as
# {"unloggable": true, "reason": ...}.
MAX_PAYLOAD_BYTES = 64 * 1024
# Headers never logged: credentials. Binary (-bin) headers are left out too.
HIDDEN_HEADERS = frozenset({"authorization", "cookie", "proxy-authorization", "x-api-key"})
MAX_HEADERS = 32
MAX_HEADER_CHARS = 1024
_ENTRY_OVERHEAD = 1024  # bytes an entry holds besides its payloads, roughly


class RequestLog(Protocol):
    """Where request-log entries go (the store's RequestLogWriter)."""

    def record(self, entry: RequestLogEntry) -> None: ...


class CallWire(Protocol):
    """What an entry reads of the call as its front door received and answered it."""

    def address(self) -> str:
        """The caller's address, without its port."""
        ...

    def headers(self) -> dict[str, str]:
        """The request's headers (metadata), secrets left out (logged_headers)."""
        ...

    def refusal(self) -> tuple[str, dict[str, str], str]:
        """A refused call's ErrorInfo reason, its metadata and the message."""
        ...

    def http_status(self, code: grpc.StatusCode) -> int:
        """The HTTP status the call is logged with when it ended with `code`."""
        ...


class GrpcWire:
    """A gRPC call's side of its entry: its context, and the caller's address read when the
    call began. `context.peer()` asks gRPC's core for the call, which a call that ended
    (cancelled, past its deadline) may no longer have: read then, it crashed the process
    (a segmentation fault in the full suite); the metadata and the status are Python's own."""

    __slots__ = ("_address", "_context")

    def __init__(self, context: Context, address: str) -> None:
        self._context = context
        self._address = address

    def address(self) -> str:
        return self._address

    def headers(self) -> dict[str, str]:
        return logged_headers(self._context.invocation_metadata() or ())

    def refusal(self) -> tuple[str, dict[str, str], str]:
        reason, metadata = _error_info(self._context)
        return reason, metadata, self._context.details() or ""

    def http_status(self, code: grpc.StatusCode) -> int:
        return HTTP_STATUS.get(code, 500)


# Makes one call's entry: (answer, code, wire, call, started_at, duration) -> entry.
EntryMaker = Callable[[Any, grpc.StatusCode, CallWire, CallInfo, float, float], RequestLogEntry]


def log_call(
    request_log: RequestLog,
    metrics: Metrics,
    entry_for: EntryMaker,
    answer: Any,
    code: grpc.StatusCode,
    wire: CallWire,
    call: CallInfo,
    started_at: float,
    elapsed: float,
) -> None:
    """Every Execute (or ExecuteBatch) gets its entry, whatever it answered, from either front
    door; an entry that cannot be made is logged with markers; nothing raises out of here."""
    try:
        try:
            entry = entry_for(answer, code, wire, call, started_at, elapsed)
        except Exception as exc:  # a bug: the call still gets an entry, with markers
            log.exception("could not make the request log entry; logging a marker")
            entry = fallback_entry(code, call, started_at, elapsed, f"{type(exc).__name__}: {exc}")
            entry = replace(entry, items=call.items)
        for which, payload in (("params", entry.request_payload), ("result", entry.response_payload)):
            if is_unloggable(payload):
                metrics.log_unloggable.labels(which).inc()
        request_log.record(entry)
    except Exception:  # the call it describes is answered already: never fail it
        log.exception("could not log the request")


def execute_entry(
    response: pb.ExecuteResponse | None,
    code: grpc.StatusCode,
    wire: CallWire,
    call: CallInfo,
    started_at: float,
    duration: float,
) -> RequestLogEntry:
    """The entry for one Execute: answered (`response`), or refused with `code`.

    Its params and result are the ones the call converted (`call`), never converted again.
    """
    request_payload, request_size = _payload(call.params)
    response_payload, response_size = _payload(call.result)
    runtime_metrics: dict[str, JSON] | None = None
    error: ErrorLogEntry | None = None
    error_details: dict[str, JSON] | None = None
    status = wire.http_status(code)
    if response is not None:
        runtime_metrics = {
            "environment_state": environment_state(response.environment_state),
            "cpu_time_ms": response.cpu_time.ToNanoseconds() / 1e6,
            "peak_memory_bytes": response.peak_memory_bytes,
        }
        if response.HasField("error"):
            status = SCRIPT_FAILED_STATUS
            failure = response.error
            failure_code = pb.ExecutionErrorCode.Name(failure.code).removeprefix("EXECUTION_ERROR_CODE_")
            where: dict[str, JSON] = {"line": failure.line, "column": failure.column}
            error = ErrorLogEntry(failure_code, failure.message, failure.stack_trace, where)
            error_details = {"code": failure_code, "message": failure.message, **where}
    elif code != grpc.StatusCode.OK:
        reason, metadata, message = wire.refusal()
        error = ErrorLogEntry(reason or code.name, message, "", {"grpc_code": code.name, **metadata})
        error_details = {"reason": reason, "message": message, "metadata": dict(metadata)}
    request_id = response.request_id if response is not None else (call.request_id or None)
    return RequestLogEntry(
        request_id=(request_id or "")[:64] or None,
        language_title=response.language_title if response is not None else "",
        timestamp=datetime.fromtimestamp(started_at, UTC),
        client_ip=wire.address() or None,
        user_id=call.user_id,
        request_headers=wire.headers(),
        request_payload=request_payload,
        response_payload=response_payload,
        status_code=status,
        grpc_code=code.name,
        duration_ms=round(duration * 1000),
        cached=response.cached if response is not None else False,
        error_details=error_details,
        runtime_metrics=runtime_metrics,
        error=error,
        size=_ENTRY_OVERHEAD + request_size + response_size,
    )


def batch_entry(
    response: pb.ExecuteBatchResponse | None,
    code: grpc.StatusCode,
    wire: CallWire,
    call: CallInfo,
    started_at: float,
    duration: float,
) -> RequestLogEntry:
    """The ONE entry of an ExecuteBatch call (not one per item; migrations/0008): `items`
    is its number of items, the payloads are the arrays of their params and answers.
    Answered, it is 200 when every item has a result, else 500 with the counts of items
    that failed and did not run in error_details; refused, as a refused Execute."""
    entry = execute_entry(None, code, wire, call, started_at, duration)
    if response is None:
        return replace(entry, items=call.items)
    results = response.results
    failed = sum(1 for item in results if item.HasField("error"))
    not_run = sum(1 for item in results if item.HasField("status"))
    cached = sum(1 for item in results if item.cached)
    metrics: dict[str, JSON] = {
        "items": len(results),
        "cached": cached,
        "cpu_time_ms": sum(item.cpu_time.ToNanoseconds() for item in results) / 1e6,
        "peak_memory_bytes": max((item.peak_memory_bytes for item in results), default=0),
    }
    details: dict[str, JSON] | None = None
    status = HTTP_STATUS[grpc.StatusCode.OK]
    if failed or not_run:
        status = SCRIPT_FAILED_STATUS
        details = {"items": len(results), "failed": failed, "not_run": not_run}
    return replace(
        entry,
        request_id=response.results[0].request_id[:64] if results else entry.request_id,
        language_title=next((item.language_title for item in results if item.language_title), ""),
        status_code=status,
        cached=bool(results) and cached == len(results),
        error_details=details,
        runtime_metrics=metrics,
        items=len(results),
    )


def fallback_entry(
    code: grpc.StatusCode, call: CallInfo, started_at: float, duration: float, reason: str
) -> RequestLogEntry:
    """The entry for an Execute whose full entry could not be made: who, when, how it
    ended, and markers in place of its payloads. Made of plain values: it cannot fail."""
    marker = unloggable(reason)
    return RequestLogEntry(
        request_id=call.request_id[:64] or None,
        language_title="",
        timestamp=datetime.fromtimestamp(started_at, UTC),
        client_ip=None,
        user_id=call.user_id,
        request_headers={},
        request_payload=marker,
        response_payload=marker,
        status_code=HTTP_STATUS.get(code, 500),
        grpc_code=code.name,
        duration_ms=round(duration * 1000),
        cached=False,
        error_details=None,
        runtime_metrics=None,
        error=None,
        size=_ENTRY_OVERHEAD,
    )


def client_address(peer: str) -> str:
    """The peer's address without its port: `ipv4:127.0.0.1:5000` -> `127.0.0.1`."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv6":
        return rest.rpartition(":")[0].strip("[]")
    if kind == "ipv4":
        return rest.rpartition(":")[0]
    return peer


def environment_state(state: int) -> str | None:
    """ENVIRONMENT_STATE_WARM -> "warm"; None when unspecified (both front doors' words)."""
    if state == pb.ENVIRONMENT_STATE_UNSPECIFIED:
        return None
    return pb.EnvironmentState.Name(state).removeprefix("ENVIRONMENT_STATE_").lower()  # type: ignore[arg-type]


def logged_headers(pairs: Iterable[tuple[str, Any]]) -> dict[str, str]:
    """The headers (or metadata) a row keeps: lower-case names, no credentials, no binary
    values, at most MAX_HEADERS of MAX_HEADER_CHARS each."""
    headers: dict[str, str] = {}
    for key, value in pairs:
        if len(headers) >= MAX_HEADERS:
            break
        name = key.lower()
        if name in HIDDEN_HEADERS or name.endswith("-bin") or not isinstance(value, str):
            continue
        headers[name] = value[:MAX_HEADER_CHARS]
    return headers


def _error_info(context: Context) -> tuple[str, dict[str, str]]:
    """The ErrorInfo reason and metadata of the status the call was aborted with."""
    for key, value in context.trailing_metadata() or ():
        if key != "grpc-status-details-bin" or not isinstance(value, bytes):
            continue
        status = status_pb2.Status.FromString(value)
        for detail in status.details:
            info = error_details_pb2.ErrorInfo()
            if detail.Unpack(info):
                return info.reason, dict(info.metadata)
    return "", {}


def _payload(payload: Payload | None) -> tuple[JSON, int]:
    """What the call converted, for the column, and the bytes it costs: a note when it is
    past MAX_PAYLOAD_BYTES, a marker when it could not be converted."""
    if payload is None:
        return None, 0
    if payload.unloggable:
        return unloggable(payload.unloggable), 0
    if payload.size > MAX_PAYLOAD_BYTES:
        return {"truncated": True, "limit_bytes": MAX_PAYLOAD_BYTES}, 0
    return payload.value, payload.size


def unloggable(reason: str) -> dict[str, JSON]:
    """The marker logged in place of a payload that could not be converted."""
    return {"unloggable": True, "reason": reason[:MAX_HEADER_CHARS]}


def is_unloggable(payload: JSON) -> bool:
    return isinstance(payload, dict) and payload.get("unloggable") is True
