"""The server interceptor: each call marked for the logs, counted in the metrics, Execute logged."""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from lambda_microservice.v1 import lambda_service_pb2 as pb
from lambda_server.api.errors import Context, to_status
from lambda_server.api.request_logs import RequestLog, execute_entry, fallback_entry, is_unloggable
from lambda_server.errors import QuotaExceeded
from lambda_server.logs import CallInfo, begin_call, end_call
from lambda_server.metrics import Metrics

log = logging.getLogger(__name__)

# A caller's own correlation id, used for log lines when the request names no session.
REQUEST_ID_HEADER = "x-request-id"
EXECUTE = f"/{pb.DESCRIPTOR.services_by_name['LambdaService'].full_name}/Execute"

Unary = Callable[[Any, Context], Awaitable[Any]]
Streaming = Callable[[Any, Context], AsyncIterator[Any]]
# When a call refused for the bytes in flight may try again: calls end within seconds.
INFLIGHT_RETRY_AFTER = 1.0


class InflightBytes:
    """The request bytes held by calls received and not yet answered, within a budget
    (MAX_INFLIGHT_REQUEST_BYTES): what a flood of large requests can make the server hold."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0

    def take(self, size: int) -> bool:
        if self.held + size > self.limit:
            return False
        self.held += size
        return True

    def give_back(self, size: int) -> None:
        self.held -= size


class CallInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Wraps every RPC of the server (ours, health, reflection).

    Each call is counted by method and status code, with its latency. A unary
    call is also marked for the logs (its method and request_id: the request's
    `request_id`, the answer's for a new session, else the `x-request-id`
    header), and each Execute, answered or refused, goes to the request log.
    """

    def __init__(
        self, metrics: Metrics, request_log: RequestLog | None = None, max_inflight_bytes: int = 0
    ) -> None:
        self._metrics = metrics
        self._request_log = request_log
        self.inflight = InflightBytes(max_inflight_bytes or 2**62)
        metrics.on_scrape(lambda: metrics.inflight_bytes.set(self.inflight.held))
        # the wrapped handler of each method, made once: only registered methods get here
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler[Any, Any], grpc.RpcMethodHandler[Any, Any]]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        if handler is None:  # an unknown method: gRPC answers UNIMPLEMENTED
            return handler
        method = handler_call_details.method
        known = self._wrapped.get(method)
        if known is not None and known[0] is handler:
            return known[1]
        wrapped = self._wrap(method, handler)
        self._wrapped[method] = (handler, wrapped)
        return wrapped

    def _wrap(self, method: str, handler: grpc.RpcMethodHandler[Any, Any]) -> grpc.RpcMethodHandler[Any, Any]:
        name = method.lstrip("/")
        io = (handler.request_deserializer, handler.response_serializer)
        unary: Any = handler.unary_unary
        if unary is not None:
            if not inspect.iscoroutinefunction(unary):
                return handler  # a synchronous handler: none here
            return grpc.unary_unary_rpc_method_handler(self._unary(name, unary, method == EXECUTE), *io)
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(self._streaming(name, handler.unary_stream), *io)
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(self._streaming(name, handler.stream_unary), *io)
        if handler.stream_stream is not None:
            return grpc.stream_stream_rpc_method_handler(self._streaming(name, handler.stream_stream), *io)
        return handler

    def _unary(self, name: str, behavior: Unary, logged: bool) -> Unary:
        """A call that ends in one answer (a unary call, or a stream in and one answer out)."""
        short = name.rpartition("/")[2]

        async def serve(request: Any, context: Context) -> Any:
            call = CallInfo(short, _request_id(request, context))
            token = begin_call(call)
            started_at, started = time.time(), time.perf_counter()
            response = None
            code = grpc.StatusCode.UNKNOWN
            size = _size(request)
            held = self.inflight.take(size)
            try:
                if not held:
                    await self._refuse(short, size, context)
                response = await behavior(request, context)
                code = _status(context, grpc.StatusCode.OK)
                answered = getattr(response, "request_id", "")
                if answered and isinstance(answered, str):
                    call.request_id = answered  # Initialize's new session
                return response
            except grpc.aio.AbortError:
                code = _status(context, grpc.StatusCode.UNKNOWN)
                raise
            except asyncio.CancelledError:
                code = grpc.StatusCode.CANCELLED
                raise
            finally:
                if held:
                    self.inflight.give_back(size)
                elapsed = time.perf_counter() - started
                self._count(name, code, elapsed)
                if logged and self._request_log is not None:
                    self._log(response, code, context, call, started_at, elapsed)
                end_call(token)

        return serve

    def _streaming(self, name: str, behavior: Any) -> Any:
        """Count a streaming call (health Watch, reflection): an async generator or a coroutine."""
        if inspect.isasyncgenfunction(behavior):

            async def stream(request: Any, context: Context) -> AsyncIterator[Any]:
                started, code = time.perf_counter(), grpc.StatusCode.UNKNOWN
                try:
                    async for item in behavior(request, context):
                        yield item
                    code = _status(context, grpc.StatusCode.OK)
                except grpc.aio.AbortError:
                    code = _status(context, grpc.StatusCode.UNKNOWN)
                    raise
                except (asyncio.CancelledError, GeneratorExit):
                    code = grpc.StatusCode.CANCELLED
                    raise
                finally:
                    self._count(name, code, time.perf_counter() - started)

            return stream
        if not inspect.iscoroutinefunction(behavior):
            return behavior  # a synchronous handler: none here
        return self._unary(name, behavior, logged=False)  # a stream in, one answer out

    async def _refuse(self, method: str, size: int, context: Context) -> None:
        """RESOURCE_EXHAUSTED: the request's bytes do not fit in the budget now."""
        self._metrics.inflight_refused.labels(method).inc()
        inflight = self.inflight
        status = to_status(
            QuotaExceeded(
                f"the server holds {inflight.held} bytes of requests in flight; this one's {size} "
                f"would go past MAX_INFLIGHT_REQUEST_BYTES ({inflight.limit})",
                INFLIGHT_RETRY_AFTER,
                setting="MAX_INFLIGHT_REQUEST_BYTES",
                limit=str(inflight.limit),
            )
        )
        await context.abort(status.code, status.details, status.trailing_metadata)

    def _count(self, method: str, code: grpc.StatusCode, seconds: float) -> None:
        self._metrics.rpcs.labels(method, code.name).inc()
        self._metrics.rpc_seconds.labels(method).observe(seconds)

    def _log(
        self,
        response: Any,
        code: grpc.StatusCode,
        context: Context,
        call: CallInfo,
        started_at: float,
        elapsed: float,
    ) -> None:
        """Every Execute gets its entry, whatever it answered; nothing raises out of here."""
        assert self._request_log is not None
        try:
            try:
                entry = execute_entry(response, code, context, call, started_at, elapsed)
            except Exception as exc:  # a bug: the call still gets an entry, with markers
                log.exception("could not make the request log entry; logging a marker")
                entry = fallback_entry(code, call, started_at, elapsed, f"{type(exc).__name__}: {exc}")
            for which, payload in (("params", entry.request_payload), ("result", entry.response_payload)):
                if is_unloggable(payload):
                    self._metrics.log_unloggable.labels(which).inc()
            self._request_log.record(entry)
        except Exception:  # the call it describes is answered already: never fail it
            log.exception("could not log the request")


def _status(context: Context, default: grpc.StatusCode) -> grpc.StatusCode:
    """The code the call ended with: the one it was aborted with or set, else `default`."""
    code = context.code()
    return code if isinstance(code, grpc.StatusCode) else default


def _size(request: Any) -> int:
    """The bytes a request holds: its encoded size (a decoded message holds about as much)."""
    byte_size = getattr(request, "ByteSize", None)
    return byte_size() if callable(byte_size) else 0


def _request_id(request: Any, context: Context) -> str:
    request_id = getattr(request, "request_id", "")
    if isinstance(request_id, str) and request_id:
        return request_id[:64]
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_HEADER and isinstance(value, str):
            return value[:64]
    return ""
