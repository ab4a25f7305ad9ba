"""LambdaClient and AsyncLambdaClient: one typed method per RPC of LambdaService."""

from __future__ import annotations

import asyncio
import json
import random
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from lambda_microservice.errors import LambdaError, NotStartedError, from_rpc_error
from lambda_microservice.v1 import lambda_service_pb2 as pb
from lambda_microservice.v1 import lambda_service_pb2_grpc as pb_grpc
from lambda_microservice.values import execution_options, needs_exact_json, to_struct

DEFAULT_TARGET = "127.0.0.1:50051"
DEFAULT_TIMEOUT = 30.0
SERVICE = "lambda_microservice.v1.LambdaService"

# The calls that are safe to repeat are retried on UNAVAILABLE by gRPC itself, within each
# call's deadline, as the channel's service config says: Initialize is among them because
# the client always sends a request_id (the same id and script return the same session).
# Execute is not: it counts, and its script may have side effects, so it has no retry
# policy here and the client retries it only when the server says the script did not run
# (NotStartedError; see EXECUTE_RETRY). ExecuteBatch likewise.
RETRIED_METHODS = ("Initialize", "Health", "GetSession", "ListFunctions", "GetFunction")
SERVICE_CONFIG = json.dumps(
    {
        "methodConfig": [
            {
                "name": [{"service": SERVICE, "method": method} for method in RETRIED_METHODS],
                "retryPolicy": {
                    "maxAttempts": 4,
                    "initialBackoff": "0.1s",
                    "maxBackoff": "2s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    }
)
CHANNEL_OPTIONS: Sequence[tuple[str, Any]] = (
    ("grpc.service_config", SERVICE_CONFIG),
    ("grpc.enable_retries", 1),
)

Response = TypeVar("Response")
Metadata = Sequence[tuple[str, str]]
#: what ExecuteStream yields: the output's chunks, as they come, then the response
StreamEvent = pb.OutputChunk | pb.ExecuteResponse


@dataclass(frozen=True)
class RetryPolicy:
    """How Execute is retried on NotStartedError: at most `max_attempts` calls in all, the
    n-th retry after a random delay up to `initial_backoff * multiplier**(n-1)` seconds
    (at most `max_backoff`), and never past the call's deadline (gRPC's retry rules)."""

    max_attempts: int = 4
    initial_backoff: float = 0.1
    max_backoff: float = 2.0
    multiplier: float = 2.0

    def delay(self, retry: int) -> float:
        """The delay before the `retry`-th retry (1 for the first)."""
        ceiling = min(self.initial_backoff * self.multiplier ** (retry - 1), self.max_backoff)
        return random.uniform(0, ceiling)


EXECUTE_RETRY = RetryPolicy()
NO_RETRY = RetryPolicy(max_attempts=1)


def _initialize_request(
    language_title: str,
    script_content: str,
    context: Mapping[str, Any] | None,
    request_id: str | None,
    optimization_level: str | None = None,
    options: pb.ExecutionOptions | Mapping[str, Any] | None = None,
    dependencies: Sequence[str] = (),
) -> pb.InitializeRequest:
    levels = {None: pb.OPTIMIZATION_LEVEL_UNSPECIFIED, "debug": pb.OPTIMIZATION_LEVEL_DEBUG}
    levels["release"] = pb.OPTIMIZATION_LEVEL_RELEASE
    if optimization_level not in levels:
        raise ValueError(f"optimization_level must be 'debug' or 'release', not {optimization_level!r}")
    return pb.InitializeRequest(
        language_title=language_title,
        script_content=script_content,
        context=to_struct(context),
        # a request_id of our own makes the call safe to retry: a retry of a call that
        # created the session returns the same session rather than another one
        request_id=request_id or str(uuid.uuid4()),
        compile_options=pb.CompileOptions(optimization_level=levels[optimization_level]),
        options=execution_options(options),
        dependencies=list(dependencies),
    )


def _execute_request(
    request_id: str, params: Mapping[str, Any] | None, cache_control: str
) -> pb.ExecuteRequest:
    """Params as a Struct, or as exact JSON text (params_json, and no Struct) when they hold
    an integer a Struct's doubles would round."""
    if params and needs_exact_json(params):
        return pb.ExecuteRequest(
            request_id=request_id, params_json=json.dumps(params), cache_control=cache_control
        )
    return pb.ExecuteRequest(request_id=request_id, params=to_struct(params), cache_control=cache_control)


def _execute_batch_request(
    request_id: str, items: Sequence[Mapping[str, Any] | None], cache_control: str
) -> pb.ExecuteBatchRequest:
    """Items as Structs, or all as exact JSON texts (params_json) when one of them holds an
    integer a Struct's doubles would round: a request carries its items one way only."""
    if any(item and needs_exact_json(item) for item in items):
        texts = [json.dumps(dict(item) if item else {}) for item in items]
        return pb.ExecuteBatchRequest(request_id=request_id, params_json=texts, cache_control=cache_control)
    structs = [to_struct(item) for item in items]
    return pb.ExecuteBatchRequest(request_id=request_id, params=structs, cache_control=cache_control)


def _retry_delay(policy: RetryPolicy, attempt: int, left: float) -> float | None:
    """The delay before retrying an Execute that did not start, after `attempt` calls and
    with `left` seconds to its deadline; None when it may not be retried."""
    if attempt >= policy.max_attempts:
        return None
    delay = policy.delay(attempt)
    return delay if delay < left else None


def _stream_event(message: pb.ExecuteStreamResponse) -> StreamEvent:
    return message.output if message.HasField("output") else message.response


def _stream_retry_delay(
    policy: RetryPolicy, error: grpc.RpcError, received: bool, attempt: int, left: float
) -> tuple[LambdaError, float | None]:
    """The error an ExecuteStream ended with, and the delay before retrying it: only when
    the server said the script did not run, and before any message arrived."""
    failure = from_rpc_error(error)
    if received or not isinstance(failure, NotStartedError):
        return failure, None
    return failure, _retry_delay(policy, attempt, left)


def _list_functions_request(
    language: str, function_type: pb.FunctionType.ValueType, page_size: int, page_token: str
) -> pb.ListFunctionsRequest:
    return pb.ListFunctionsRequest(
        language=language, function_type=function_type, page_size=page_size, page_token=page_token
    )


class LambdaClient:
    """A blocking client. Use as a context manager, or call `close()`.

    Every call has a deadline (`timeout` seconds, 30 by default) and sends `metadata`
    (the client's, then the call's). Calls that are safe to repeat are retried on
    UNAVAILABLE within their deadline; Execute only on NotStartedError (`execute_retry`).
    Failures raise `lambda_microservice.errors.LambdaError` subclasses carrying the status
    code and the ErrorInfo reason.
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        metadata: Metadata = (),
        channel: grpc.Channel | None = None,
        execute_retry: RetryPolicy = EXECUTE_RETRY,
    ) -> None:
        self._channel = channel or grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
        self._stub = pb_grpc.LambdaServiceStub(self._channel)
        self._timeout = timeout
        self._metadata = tuple(metadata)
        self._execute_retry = execute_retry

    def __enter__(self) -> LambdaClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _call(
        self,
        method: Callable[..., Response],
        request: Any,
        timeout: float | None,
        metadata: Metadata = (),
    ) -> Response:
        try:
            return method(
                request,
                timeout=self._timeout if timeout is None else timeout,
                metadata=self._metadata + tuple(metadata),
            )
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None

    def initialize(
        self,
        language_title: str,
        script_content: str,
        *,
        context: Mapping[str, Any] | None = None,
        request_id: str | None = None,
        optimization_level: str | None = None,
        options: pb.ExecutionOptions | Mapping[str, Any] | None = None,
        dependencies: Sequence[str] = (),
        timeout: float | None = None,
        metadata: Metadata = (),
    ) -> pb.InitializeResponse:
        """Create a session for a script; `request_id` (a UUID) names it, and is chosen here
        when not given, so that a retry returns the same session. `optimization_level`
        ("debug" or "release") says how a Rust script is compiled. `options` says how each
        execution runs: an ExecutionOptions, or a mapping of `timeout` and `cache_ttl` (seconds),
        `memory_mb` and `max_processes`; what it leaves out takes the server's defaults.
        `dependencies`: packages the script imports (`attrs>=23` for Python, `dayjs@1.11.13`
        for Node.js), resolved and locked by the server."""
        request = _initialize_request(
            language_title, script_content, context, request_id, optimization_level, options, dependencies
        )
        return self._call(self._stub.Initialize, request, timeout, metadata)

    def execute(
        self,
        request_id: str,
        params: Mapping[str, Any] | None = None,
        *,
        cache_control: str = "",
        timeout: float | None = None,
        metadata: Metadata = (),
    ) -> pb.ExecuteResponse:
        """Run a session's script with `params`; a script's failure is in `response.error`,
        and `lambda_microservice.result(response)` is its exact result. Retried only when the
        server says the script did not run (NotStartedError), within the deadline."""
        request = _execute_request(request_id, params, cache_control)
        deadline = time.monotonic() + (self._timeout if timeout is None else timeout)
        attempt = 1
        while True:
            try:
                return self._call(self._stub.Execute, request, deadline - time.monotonic(), metadata)
            except NotStartedError:
                delay = _retry_delay(self._execute_retry, attempt, deadline - time.monotonic())
                if delay is None:
                    raise
            time.sleep(delay)
            attempt += 1

    def execute_stream(
        self,
        request_id: str,
        params: Mapping[str, Any] | None = None,
        *,
        cache_control: str = "",
        timeout: float | None = None,
        metadata: Metadata = (),
    ) -> Iterator[StreamEvent]:
        """Run a session's script with `params` (ExecuteStream) and iterate over its console
        output as the script writes it: `pb.OutputChunk` messages (`stream`, `text`, `offset`),
        then the `pb.ExecuteResponse`, as `execute` returns it. Leaving the loop early (or
        closing the iterator) cancels the call, and the server stops the execution. Retried
        like `execute` (NotStartedError), and only before a message arrived."""
        request = _execute_request(request_id, params, cache_control)
        deadline = time.monotonic() + (self._timeout if timeout is None else timeout)
        attempt = 1
        while True:
            received = False
            call = self._stub.ExecuteStream(
                request, timeout=deadline - time.monotonic(), metadata=self._metadata + tuple(metadata)
            )
            try:
                for message in call:
                    received = True
                    yield _stream_event(message)
                return
            except grpc.RpcError as error:
                left = deadline - time.monotonic()
                failure, delay = _stream_retry_delay(self._execute_retry, error, received, attempt, left)
                if delay is None:
                    raise failure from None
            finally:
                call.cancel()  # type: ignore[no-untyped-call]  # the caller left early: the server stops
            time.sleep(delay)
            attempt += 1

    def execute_batch(
        self,
        request_id: str,
        items: Sequence[Mapping[str, Any] | None],
        *,
        cache_control: str = "",
        timeout: float | None = None,
        metadata: Metadata = (),
    ) -> list[pb.ExecuteResponse]:
        """Run a session's script once for each of `items` (params), in one call: a response
        per item, in order. An item's script failure is in its `error`; an item that did not
        run (its params did not fit the schema, the deadline came before it started, no
        environment became free) has its `status` set (`lambda_microservice.item_error` turns
        it into the error an Execute of it would have raised). The session counts one execution
        per item. Retried only when the server says nothing ran (NotStartedError), within the
        deadline: items are not idempotent."""
        request = _execute_batch_request(request_id, items, cache_control)
        deadline = time.monotonic() + (self._timeout if timeout is None else timeout)
        attempt = 1
        while True:
            try:
                response = self._call(self._stub.ExecuteBatch, request, deadline - time.monotonic(), metadata)
                return list(response.results)
            except NotStartedError:
                delay = _retry_delay(self._execute_retry, attempt, deadline - time.monotonic())
                if delay is None:
                    raise
            time.sleep(delay)
            attempt += 1

    def health(self, *, timeout: float | None = None, metadata: Metadata = ()) -> pb.HealthResponse:
        """The service's status, version and components."""
        return self._call(self._stub.Health, pb.HealthRequest(), timeout, metadata)

    def get_session(
        self, request_id: str, *, timeout: float | None = None, metadata: Metadata = ()
    ) -> pb.Session:
        """What is stored about a session."""
        request = pb.GetSessionRequest(request_id=request_id)
        return self._call(self._stub.GetSession, request, timeout, metadata).session

    def list_functions(
        self,
        *,
        language: str = "",
        function_type: pb.FunctionType.ValueType = pb.FUNCTION_TYPE_UNSPECIFIED,
        page_size: int = 0,
        page_token: str = "",
        timeout: float | None = None,
        metadata: Metadata = (),
    ) -> pb.ListFunctionsResponse:
        """One page of the function catalog, ordered by language_title (`iter_functions`
        goes through every page).

        Filter by `language` (e.g. "python") and `function_type`
        (`pb.FUNCTION_TYPE_PREDEFINED` or `pb.FUNCTION_TYPE_DYNAMIC`). `page_size`
        is 20 when 0 and at most 100; pass `next_page_token` of the previous page,
        with the same filters, as `page_token` for the next one.
        """
        request = _list_functions_request(language, function_type, page_size, page_token)
        return self._call(self._stub.ListFunctions, request, timeout, metadata)

    def iter_functions(
        self,
        *,
        language: str = "",
        function_type: pb.FunctionType.ValueType = pb.FUNCTION_TYPE_UNSPECIFIED,
        page_size: int = 0,
        timeout: float | None = None,
        metadata: Metadata = (),
    ) -> Iterator[pb.Function]:
        """Every function of the catalog that matches the filters (see `list_functions`),
        page after page, as they are iterated; `timeout` is each page's."""
        token = ""
        while True:
            page = self.list_functions(
                language=language,
                function_type=function_type,
                page_size=page_size,
                page_token=token,
                timeout=timeout,
                metadata=metadata,
            )
            yield from page.functions
            token = page.next_page_token
            if not token:
                return

    def get_function(
        self, language_title: str, *, timeout: float | None = None, metadata: Metadata = ()
    ) -> pb.Function:
        """One function of the catalog: description, params and result schemas, examples;
        the script too for a dynamic function. NotFoundError when there is none."""
        request = pb.GetFunctionRequest(language_title=language_title)
        return self._call(self._stub.GetFunction, request, timeout, metadata).function


class AsyncLambdaClient:
    """The asyncio client: the same methods as LambdaClient, awaitable (`iter_functions` is
    an async iterator)."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        metadata: Metadata = (),
        channel: grpc.aio.Channel | None = None,
        execute_retry: RetryPolicy = EXECUTE_RETRY,
    ) -> None:
        self._channel = channel or grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
        self._stub = pb_grpc.LambdaServiceStub(self._channel)
        self._timeout = timeout
        self._metadata = tuple(metadata)
        self._execute_retry = execute_retry

    async def __aenter__(self) -> AsyncLambdaClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close(None)

    async def _call(
        self,
        method: Callable[..., Awaitable[Response]],
        request: Any,
        timeout: float | None,
        metadata: Metadata = (),
    ) -> Response:
        try:
            return await method(
                request,
                timeout=self._timeout if timeout is None else timeout,
                metadata=self._metadata + tuple(metadata),
            )
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None

    async def initialize(
        self,
        language_title: str,
        script_content: str,
        *,
        context: Mapping[str, Any] | None = None,
        request_id: str | None = None,
        optimization_level: str | None = None,
        options: pb.ExecutionOptions | Mapping[str, Any] | None = None,
        dependencies: Sequence[str] = (),
        timeout: float | None = None,
        metadata: Metadata = (),
    ) -> pb.InitializeResponse:
        """Create a session for a script; `request_id` (a UUID) names it, and is chosen here
        when not given, so that a retry returns the same session. `optimization_level`
        ("debug" or "release") says how a Rust script is compiled. `options` says how each
        execution runs: an ExecutionOptions, or a mapping of `timeout` and `cache_ttl` (seconds),
        `memory_mb` and `max_processes`; what it leaves out takes the server's defaults.
        `dependencies`: packages the script imports (`attrs>=23` for Python, `dayjs@1.11.13`
        for Node.js), resolved and locked by the server."""
        request = _initialize_request(
            language_title, script_content, context, request_id, optimization_level, options, dependencies
        )
        return await self._call(self._stub.Initialize, request, timeout, metadata)

    async def execute(
        self,
        request_id: str,
        params: Mapping[str, Any] | None = None,
        *,
        cache_control: str = "",
        timeout: float | None = None,
        metadata: Metadata = (),
    ) -> pb.ExecuteResponse:
        """Run a session's script with `params`; a script's failure is in `response.error`,
        and `lambda_microservice.result(response)` is its exact result. Retried only when the
        server says the script did not run (NotStartedError), within the deadline."""
        request = _execute_request(request_id, params, cache_control)
        deadline = time.monotonic() + (self._timeout if timeout is None else timeout)
        attempt = 1
        while True:
            try:
                return await self._call(self._stub.Execute, request, deadline - time.monotonic(), metadata)
            except NotStartedError:
                delay = _retry_delay(self._execute_retry, attempt, deadline - time.monotonic())
                if delay is None:
                    raise
            await asyncio.sleep(delay)
            attempt += 1

    async def execute_stream(
        self,
        request_id: str,
        params: Mapping[str, Any] | None = None,
        *,
        cache_control: str = "",
        timeout: float | None = None,
        metadata: Metadata = (),
    ) -> AsyncIterator[StreamEvent]:
        """Run a session's script with `params` (ExecuteStream) and iterate (`async for`) over
        its console output as the script writes it: `pb.OutputChunk` messages, then the
        `pb.ExecuteResponse`. Leaving the loop early cancels the call, and the server stops
        the execution. Retried like `execute`, and only before a message arrived."""
        request = _execute_request(request_id, params, cache_control)
        deadline = time.monotonic() + (self._timeout if timeout is None else timeout)
        attempt = 1
        while True:
            received = False
            call = self._stub.ExecuteStream(
                request, timeout=deadline - time.monotonic(), metadata=self._metadata + tuple(metadata)
            )
            try:
                async for message in call:
                    received = True
                    yield _stream_event(message)
                return
            except grpc.RpcError as error:
                left = deadline - time.monotonic()
                failure, delay = _stream_retry_delay(self._execute_retry, error, received, attempt, left)
                if delay is None:
                    raise failure from None
            finally:
                call.cancel()
            await asyncio.sleep(delay)
            attempt += 1

    async def execute_batch(
        self,
        request_id: str,
        items: Sequence[Mapping[str, Any] | None],
        *,
        cache_control: str = "",
        timeout: float | None = None,
        metadata: Metadata = (),
    ) -> list[pb.ExecuteResponse]:
        """Run a session's script once for each of `items`, in one call: a response per item,
        in order (see LambdaClient.execute_batch)."""
        request = _execute_batch_request(request_id, items, cache_control)
        deadline = time.monotonic() + (self._timeout if timeout is None else timeout)
        attempt = 1
        while True:
            try:
                response = await self._call(
                    self._stub.ExecuteBatch, request, deadline - time.monotonic(), metadata
                )
                return list(response.results)
            except NotStartedError:
                delay = _retry_delay(self._execute_retry, attempt, deadline - time.monotonic())
                if delay is None:
                    raise
            await asyncio.sleep(delay)
            attempt += 1

    async def health(self, *, timeout: float | None = None, metadata: Metadata = ()) -> pb.HealthResponse:
        """The service's status, version and components."""
        return await self._call(self._stub.Health, pb.HealthRequest(), timeout, metadata)

    async def get_session(
        self, request_id: str, *, timeout: float | None = None, metadata: Metadata = ()
    ) -> pb.Session:
        """What is stored about a session."""
        request = pb.GetSessionRequest(request_id=request_id)
        return (await self._call(self._stub.GetSession, request, timeout, metadata)).session

    async def list_functions(
        self,
        *,
        language: str = "",
        function_type: pb.FunctionType.ValueType = pb.FUNCTION_TYPE_UNSPECIFIED,
        page_size: int = 0,
        page_token: str = "",
        timeout: float | None = None,
        metadata: Metadata = (),
    ) -> pb.ListFunctionsResponse:
        """One page of the function catalog, ordered by language_title (`iter_functions`
        goes through every page).

        Filter by `language` (e.g. "python") and `function_type`
        (`pb.FUNCTION_TYPE_PREDEFINED` or `pb.FUNCTION_TYPE_DYNAMIC`). `page_size`
        is 20 when 0 and at most 100; pass `next_page_token` of the previous page,
        with the same filters, as `page_token` for the next one.
        """
        request = _list_functions_request(language, function_type, page_size, page_token)
        return await self._call(self._stub.ListFunctions, request, timeout, metadata)

    async def iter_functions(
        self,
        *,
        language: str = "",
        function_type: pb.FunctionType.ValueType = pb.FUNCTION_TYPE_UNSPECIFIED,
        page_size: int = 0,
        timeout: float | None = None,
        metadata: Metadata = (),
    ) -> AsyncIterator[pb.Function]:
        """Every function of the catalog that matches the filters (see `list_functions`),
        page after page, as they are iterated (`async for`); `timeout` is each page's."""
        token = ""
        while True:
            page = await self.list_functions(
                language=language,
                function_type=function_type,
                page_size=page_size,
                page_token=token,
                timeout=timeout,
                metadata=metadata,
            )
            for function in page.functions:
                yield function
            token = page.next_page_token
            if not token:
                return

    async def get_function(
        self, language_title: str, *, timeout: float | None = None, metadata: Metadata = ()
    ) -> pb.Function:
        """One function of the catalog: description, params and result schemas, examples;
        the script too for a dynamic function. NotFoundError when there is none."""
        request = pb.GetFunctionRequest(language_title=language_title)
        return (await self._call(self._stub.GetFunction, request, timeout, metadata)).function
