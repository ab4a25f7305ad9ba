"""The server interceptor: each call marked for the logs, counted in the metrics, executions logged."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from lambda_microservice.v1 import lambda_service_pb2 as pb
from lambda_server.api.errors import Context, to_status
from lambda_server.api.request_logs import (
    EntryMaker,
    GrpcWire,
    RequestLog,
    batch_entry,
    client_address,
    execute_entry,
    log_call,
)
from lambda_server.config import GrpcSettings
from lambda_server.errors import QuotaExceeded
from lambda_server.logs import CallInfo, begin_call, end_call
from lambda_server.metrics import Metrics

log = logging.getLogger(__name__)

# A caller's own correlation id, used for log lines when the request names no session.
REQUEST_ID_HEADER = "x-request-id"
_SERVICE = pb.DESCRIPTOR.services_by_name["LambdaService"].full_name
EXECUTE = f"/{_SERVICE}/Execute"
EXECUTE_STREAM = f"/{_SERVICE}/ExecuteStream"
EXECUTE_BATCH = f"/{_SERVICE}/ExecuteBatch"
# The calls the request log keeps, each with the function making its entry (ExecuteStream's
# from the ExecuteResponse its last message carried).
LOGGED: dict[str, EntryMaker] = {
    EXECUTE: execute_entry,
    EXECUTE_STREAM: execute_entry,
    EXECUTE_BATCH: batch_entry,
}

Unary = Callable[[Any, Context], Awaitable[Any]]
Streaming = Callable[[Any, Context], AsyncIterator[Any]]
# When a call refused for the bytes in flight may try again: calls end within seconds.
INFLIGHT_RETRY_AFTER = 1.0


class InflightBytes:
    """The request bytes held by calls received and not yet answered, within a budget
    (MAX_INFLIGHT_REQUEST_BYTES), and each peer address's part within its share: what a
    flood of large requests can make the server hold.

    A call whose message is still arriving holds a reservation (its size is not known
    until gRPC has the whole message, and gRPC holds all of it meanwhile); once the
    message is in, its encoded size replaces the reservation."""

    def __init__(self, limit: int, per_peer: int, reservation: int) -> None:
        self.limit = limit
        self.per_peer = per_peer
        self.reservation = reservation
        self.held = 0
        self._by_peer: dict[str, int] = {}

    def take(self, peer: str, size: int) -> bool:
        """Hold `size` more bytes for `peer`, if the budget and its share have room."""
        mine = self._by_peer.get(peer, 0)
        if self.held + size > self.limit or mine + size > self.per_peer:
            return False
        self.held += size
        self._by_peer[peer] = mine + size
        return True

    def of(self, peer: str) -> int:
        return self._by_peer.get(peer, 0)

    def refusal(self, peer: str, this: str) -> QuotaExceeded:
        """RESOURCE_EXHAUSTED for a request (`this`: "this one's N", or a new call's
        reservation) that does not fit in the budget, or in its peer's share, now."""
        return QuotaExceeded(
            f"the server holds {self.held} bytes of requests in flight, {self.of(peer)} of "
            f"them from {peer}; {this} would go past MAX_INFLIGHT_REQUEST_BYTES ({self.limit}) "
            f"or a peer's share of it ({self.per_peer})",
            INFLIGHT_RETRY_AFTER,
            setting="MAX_INFLIGHT_REQUEST_BYTES",
            limit=str(self.limit),
        )

    def give_back(self, peer: str, size: int) -> None:
        self.held -= size
        left = self._by_peer[peer] - size
        if left:
            self._by_peer[peer] = left
        else:
            del self._by_peer[peer]


def inflight_budget(settings: GrpcSettings) -> InflightBytes:
    limit = settings.max_inflight_request_bytes
    per_peer = settings.max_inflight_request_bytes_per_peer or limit // 2
    return InflightBytes(limit, per_peer, settings.inflight_request_reservation_bytes)


class CallInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Wraps every RPC of the server (ours, health, reflection).

    Each call is counted by method and status code, with its latency. A unary
    call (and ExecuteStream) is also marked for the logs (its method and
    request_id: the request's `request_id`, the answer's for a new session, else
    the `x-request-id` header), and each Execute, ExecuteStream and ExecuteBatch,
    answered, refused or cancelled, goes to the request log (a batch as one entry
    with its number of items).
    """

    def __init__(
        self, metrics: Metrics, request_log: RequestLog | None = None, inflight: InflightBytes | None = None
    ) -> None:
        self._metrics = metrics
        self._request_log = request_log
        self.inflight = inflight or InflightBytes(2**62, 2**62, 0)
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
            serve = self._unary(name, unary, LOGGED.get(method), reads=True)
            return grpc.stream_unary_rpc_method_handler(serve, *io)
        if handler.unary_stream is not None and method == EXECUTE_STREAM:
            serve = self._execute_stream(name, handler.unary_stream)
            return grpc.stream_stream_rpc_method_handler(serve, *io)
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(self._streaming(name, handler.unary_stream), *io)
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(self._streaming(name, handler.stream_unary), *io)
        if handler.stream_stream is not None:
            return grpc.stream_stream_rpc_method_handler(self._streaming(name, handler.stream_stream), *io)
        return handler

    def _unary(self, name: str, behavior: Any, logged: EntryMaker | None, reads: bool) -> Any:
        """A call that ends in one answer: a unary call (`reads`: served as a stream in, so
        that the bytes in flight are reserved before gRPC reads its message), or a stream
        in and one answer out."""

        async def serve(requests: Any, context: Context) -> Any:
            call = _Served(self, name, logged, context)
            response = None
            code = grpc.StatusCode.UNKNOWN
            try:
                request = await call.read(context) if reads else requests
                response = await behavior(request, context)
                code = _status(context, grpc.StatusCode.OK)
                answered = getattr(response, "request_id", "")
                if answered and isinstance(answered, str):
                    call.info.request_id = answered  # Initialize's new session
                return response
            except grpc.aio.AbortError:
                code = _status(context, grpc.StatusCode.UNKNOWN)
                raise
            except asyncio.CancelledError:
                code = grpc.StatusCode.CANCELLED
                raise
            finally:
                call.end(response, code, context)

        return serve

    def _execute_stream(self, name: str, behavior: Any) -> Any:
        """ExecuteStream: a unary call's life (its request's bytes reserved before gRPC reads
        it, served as a stream in; counted; logged like Execute, from the ExecuteResponse
        its last message carried), answered by a stream of messages."""

        async def serve(requests: Any, context: Context) -> AsyncIterator[Any]:
            call = _Served(self, name, execute_entry, context)
            response = None
            code = grpc.StatusCode.UNKNOWN
            try:
                request = await call.read(context)
                async for message in behavior(request, context):
                    if message.HasField("response"):
                        response = message.response
                    yield message
                code = _status(context, grpc.StatusCode.OK)
            except grpc.aio.AbortError:
                code = _status(context, grpc.StatusCode.UNKNOWN)
                raise
            except (asyncio.CancelledError, GeneratorExit):
                code = grpc.StatusCode.CANCELLED
                raise
            finally:
                call.end(response if code == grpc.StatusCode.OK else None, code, context)

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
        return self._unary(name, behavior, logged=None, reads=False)  # a stream in, one answer out

    async def _refuse(self, method: str, peer: str, size: int | None, context: Context) -> None:
        """RESOURCE_EXHAUSTED: the request's bytes (`size`, or a reservation for a message
        not read yet) do not fit in the budget, or in its peer's share, now."""
        self._metrics.inflight_refused.labels(method).inc()
        inflight = self.inflight
        this = f"this one's {size}" if size is not None else f"a new call's {inflight.reservation}"
        status = to_status(inflight.refusal(peer, this))
        await context.abort(status.code, status.details, status.trailing_metadata)

    def _count(self, method: str, code: grpc.StatusCode, seconds: float) -> None:
        self._metrics.rpcs.labels(method, code.name).inc()
        self._metrics.rpc_seconds.labels(method).observe(seconds)


class _Served:
    """One call served as a unary call is: marked for the logs from its start; its request's
    bytes held in flight (read()); at its end() counted, logged when `logged`, and its
    bytes given back."""

    def __init__(
        self, interceptor: CallInterceptor, name: str, logged: EntryMaker | None, context: Context
    ) -> None:
        self._interceptor = interceptor
        self._name = name
        self._logged = logged
        self.short = name.rpartition("/")[2]
        self._peer = client_address(context.peer() or "")  # now: see request_logs.GrpcWire
        self.info = CallInfo(self.short, "", address=self._peer)
        self._token = begin_call(self.info)
        self._started_at, self._started = time.time(), time.perf_counter()
        self._held = 0

    async def read(self, context: Context) -> Any:
        """The call's request message, its bytes held in flight (RESOURCE_EXHAUSTED when
        they do not fit). Refused before the message is read, the call's stream is reset:
        gRPC holds no more of it than its first window, and the client stops."""
        inflight, peer = self._interceptor.inflight, self._peer
        if not inflight.take(peer, inflight.reservation):
            await self._interceptor._refuse(self.short, peer, None, context)
        self._held = inflight.reservation
        request = await context.read()
        if request is grpc.aio.EOF:  # type: ignore[attr-defined]
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the call sent no request message")
        size = _size(request)
        inflight.give_back(peer, self._held)
        self._held = 0
        if not inflight.take(peer, size):
            await self._interceptor._refuse(self.short, peer, size, context)
        self._held = size
        self.info.request_id = _request_id(request, context)
        return request

    def end(self, response: Any, code: grpc.StatusCode, context: Context) -> None:
        if self._held:
            self._interceptor.inflight.give_back(self._peer, self._held)
            self._held = 0
        elapsed = time.perf_counter() - self._started
        self._interceptor._count(self._name, code, elapsed)
        if self._logged is not None and self._interceptor._request_log is not None:
            log_call(
                self._interceptor._request_log,
                self._interceptor._metrics,
                self._logged,
                response,
                code,
                GrpcWire(context, self._peer),
                self.info,
                self._started_at,
                elapsed,
            )
        with contextlib.suppress(ValueError):  # a stream closed from another context (its finalizer)
            end_call(self._token)


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
