"""LambdaClient and AsyncLambdaClient: one typed method per RPC of LambdaService."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

import grpc
from google.protobuf import json_format, struct_pb2

from lambda_microservice.errors import from_rpc_error
from lambda_microservice.v1 import lambda_service_pb2 as pb
from lambda_microservice.v1 import lambda_service_pb2_grpc as pb_grpc

DEFAULT_TARGET = "127.0.0.1:50051"
DEFAULT_TIMEOUT = 30.0
SERVICE = "lambda_microservice.v1.LambdaService"

# Retries on UNAVAILABLE, declared in the channel's service config so that gRPC
# itself retries, within each call's deadline.
SERVICE_CONFIG = json.dumps(
    {
        "methodConfig": [
            {
                "name": [{"service": SERVICE}],
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


def to_struct(data: Mapping[str, Any] | None) -> struct_pb2.Struct:
    """A google.protobuf.Struct from a JSON-like mapping."""
    struct = struct_pb2.Struct()
    if data:
        struct.update(data)
    return struct


def to_python(value: struct_pb2.Value | struct_pb2.Struct) -> Any:
    """The JSON value (dict, list, str, float, bool or None) held by a Value or Struct."""
    return json_format.MessageToDict(value)


def _initialize_request(
    language_title: str,
    script_content: str,
    context: Mapping[str, Any] | None,
    request_id: str | None,
    optimization_level: str | None = None,
) -> pb.InitializeRequest:
    levels = {None: pb.OPTIMIZATION_LEVEL_UNSPECIFIED, "debug": pb.OPTIMIZATION_LEVEL_DEBUG}
    levels["release"] = pb.OPTIMIZATION_LEVEL_RELEASE
    if optimization_level not in levels:
        raise ValueError(f"optimization_level must be 'debug' or 'release', not {optimization_level!r}")
    return pb.InitializeRequest(
        language_title=language_title,
        script_content=script_content,
        context=to_struct(context),
        request_id=request_id or "",
        compile_options=pb.CompileOptions(optimization_level=levels[optimization_level]),
    )


def _execute_request(
    request_id: str, params: Mapping[str, Any] | None, cache_control: str
) -> pb.ExecuteRequest:
    return pb.ExecuteRequest(request_id=request_id, params=to_struct(params), cache_control=cache_control)


def _list_functions_request(
    language: str, function_type: pb.FunctionType.ValueType, page_size: int, page_token: str
) -> pb.ListFunctionsRequest:
    return pb.ListFunctionsRequest(
        language=language, function_type=function_type, page_size=page_size, page_token=page_token
    )


class LambdaClient:
    """A blocking client. Use as a context manager, or call `close()`.

    Every call has a deadline (`timeout` seconds, 30 by default) and is retried
    on UNAVAILABLE within it. Failures raise `lambda_microservice.errors.LambdaError`
    subclasses carrying the status code and the ErrorInfo reason.
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        metadata: Metadata = (),
        channel: grpc.Channel | None = None,
    ) -> None:
        self._channel = channel or grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
        self._stub = pb_grpc.LambdaServiceStub(self._channel)
        self._timeout = timeout
        self._metadata = tuple(metadata)

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
        timeout: float | None = None,
        metadata: Metadata = (),
    ) -> pb.InitializeResponse:
        """Create a session for a script; pass `request_id` to make retries return the same one,
        and `optimization_level` ("debug" or "release") to say how a Rust script is compiled."""
        request = _initialize_request(language_title, script_content, context, request_id, optimization_level)
        return self._call(self._stub.Initialize, request, timeout, metadata)

    def execute(
        self,
        request_id: str,
        params: Mapping[str, Any] | None = None,
        *,
        cache_control: str = "",
        timeout: float | None = None,
    ) -> pb.ExecuteResponse:
        """Run a session's script with `params`; a script's failure is in `response.error`."""
        request = _execute_request(request_id, params, cache_control)
        return self._call(self._stub.Execute, request, timeout)

    def health(self, *, timeout: float | None = None) -> pb.HealthResponse:
        """The service's status, version and components."""
        return self._call(self._stub.Health, pb.HealthRequest(), timeout)

    def get_session(self, request_id: str, *, timeout: float | None = None) -> pb.Session:
        """What is stored about a session."""
        request = pb.GetSessionRequest(request_id=request_id)
        return self._call(self._stub.GetSession, request, timeout).session

    def list_functions(
        self,
        *,
        language: str = "",
        function_type: pb.FunctionType.ValueType = pb.FUNCTION_TYPE_UNSPECIFIED,
        page_size: int = 0,
        page_token: str = "",
        timeout: float | None = None,
    ) -> pb.ListFunctionsResponse:
        """One page of the function catalog, ordered by language_title.

        Filter by `language` (e.g. "python") and `function_type`
        (`pb.FUNCTION_TYPE_PREDEFINED` or `pb.FUNCTION_TYPE_DYNAMIC`). `page_size`
        is 20 when 0 and at most 100; pass `next_page_token` of the previous page,
        with the same filters, as `page_token` for the next one.
        """
        request = _list_functions_request(language, function_type, page_size, page_token)
        return self._call(self._stub.ListFunctions, request, timeout)

    def get_function(self, language_title: str, *, timeout: float | None = None) -> pb.Function:
        """One function of the catalog: description, params and result schemas, examples;
        the script too for a dynamic function. NotFoundError when there is none."""
        request = pb.GetFunctionRequest(language_title=language_title)
        return self._call(self._stub.GetFunction, request, timeout).function


class AsyncLambdaClient:
    """The asyncio client: the same methods as LambdaClient, awaitable."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        metadata: Metadata = (),
        channel: grpc.aio.Channel | None = None,
    ) -> None:
        self._channel = channel or grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
        self._stub = pb_grpc.LambdaServiceStub(self._channel)
        self._timeout = timeout
        self._metadata = tuple(metadata)

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
        timeout: float | None = None,
        metadata: Metadata = (),
    ) -> pb.InitializeResponse:
        """Create a session for a script; pass `request_id` to make retries return the same one,
        and `optimization_level` ("debug" or "release") to say how a Rust script is compiled."""
        request = _initialize_request(language_title, script_content, context, request_id, optimization_level)
        return await self._call(self._stub.Initialize, request, timeout, metadata)

    async def execute(
        self,
        request_id: str,
        params: Mapping[str, Any] | None = None,
        *,
        cache_control: str = "",
        timeout: float | None = None,
    ) -> pb.ExecuteResponse:
        """Run a session's script with `params`; a script's failure is in `response.error`."""
        request = _execute_request(request_id, params, cache_control)
        return await self._call(self._stub.Execute, request, timeout)

    async def health(self, *, timeout: float | None = None) -> pb.HealthResponse:
        """The service's status, version and components."""
        return await self._call(self._stub.Health, pb.HealthRequest(), timeout)

    async def get_session(self, request_id: str, *, timeout: float | None = None) -> pb.Session:
        """What is stored about a session."""
        request = pb.GetSessionRequest(request_id=request_id)
        return (await self._call(self._stub.GetSession, request, timeout)).session

    async def list_functions(
        self,
        *,
        language: str = "",
        function_type: pb.FunctionType.ValueType = pb.FUNCTION_TYPE_UNSPECIFIED,
        page_size: int = 0,
        page_token: str = "",
        timeout: float | None = None,
    ) -> pb.ListFunctionsResponse:
        """One page of the function catalog, ordered by language_title.

        Filter by `language` (e.g. "python") and `function_type`
        (`pb.FUNCTION_TYPE_PREDEFINED` or `pb.FUNCTION_TYPE_DYNAMIC`). `page_size`
        is 20 when 0 and at most 100; pass `next_page_token` of the previous page,
        with the same filters, as `page_token` for the next one.
        """
        request = _list_functions_request(language, function_type, page_size, page_token)
        return await self._call(self._stub.ListFunctions, request, timeout)

    async def get_function(self, language_title: str, *, timeout: float | None = None) -> pb.Function:
        """One function of the catalog: description, params and result schemas, examples;
        the script too for a dynamic function. NotFoundError when there is none."""
        request = pb.GetFunctionRequest(language_title=language_title)
        return (await self._call(self._stub.GetFunction, request, timeout)).function
