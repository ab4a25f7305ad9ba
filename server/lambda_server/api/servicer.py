"""The LambdaService servicer: proto in, use case, proto out. No business logic here."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

import grpc
from google.protobuf.message import DecodeError, Message
from google.protobuf.message_factory import GetMessageClass

from lambda_microservice.v1 import lambda_service_pb2 as pb
from lambda_microservice.v1 import lambda_service_pb2_grpc as pb_grpc
from lambda_server.api import convert
from lambda_server.api.errors import Context, Undecodable, reports_errors, reports_stream_errors
from lambda_server.api.gate import REFUSED_QUOTA, Gate
from lambda_server.api.request_logs import client_address
from lambda_server.domain import Caller, Deadline, OutputChunk
from lambda_server.errors import RateLimited
from lambda_server.limits import LimitedCall
from lambda_server.logs import current_call
from lambda_server.usecases import UseCases
from lambda_server.usecases.stream import streamed

LANGUAGE_TITLE_HEADER = "language-title"
AUTHORIZATION_HEADER = "authorization"
RESPONSE_MARGIN = 0.05  # seconds
OUTPUT_STREAM = {"stdout": pb.OUTPUT_STREAM_STDOUT, "stderr": pb.OUTPUT_STREAM_STDERR}


class ExecuteRequestView(convert.ExecuteParams, Protocol):
    """An ExecuteRequest as Execute receives it: params still in their wire bytes."""

    request_id: str
    cache_control: str


class ExecuteBatchRequestView(convert.ExecuteBatchParams, Protocol):
    """An ExecuteBatchRequest as ExecuteBatch receives it: each item's params still in their wire bytes."""

    request_id: str
    cache_control: str


class LambdaServicer(pb_grpc.LambdaServiceServicer):
    def __init__(
        self,
        usecases: UseCases,
        gate: Gate,
        payloads: convert.ExecutePayloads,
    ) -> None:
        self._usecases = usecases
        self._gate = gate
        self._payloads = payloads

    def _caller(self, context: Context) -> Caller:
        """Who calls, from the `authorization` metadata; Unauthenticated when it does not hold."""
        call = current_call()  # the interceptor read the address once, as the call began
        address = call.address if call is not None and call.address else client_address(context.peer() or "")
        return self._gate.caller(_metadata(context, AUTHORIZATION_HEADER), address)

    def _admit(self, caller: Caller, context: Context, count: int = 1) -> None:
        """Take `count` of the caller's executions (RateLimited when they are not there), and
        say in the trailing metadata what is left."""
        try:
            quota = self._gate.admit(caller, count=count)
        except RateLimited:  # the status's RetryInfo says when to retry
            context.set_trailing_metadata(REFUSED_QUOTA)
            raise
        if quota:
            context.set_trailing_metadata(quota)

    @reports_errors
    async def Initialize(self, request: pb.InitializeRequest, context: Context) -> pb.InitializeResponse:
        caller = self._caller(context)  # who calls comes first: a stranger learns nothing else
        self._gate.admit(caller, LimitedCall.INITIALIZE)  # before any work: checks cost CPU
        title = request.language_title or _metadata(context, LANGUAGE_TITLE_HEADER)
        record = await self._usecases.initialize(
            language_title=title,
            script=request.script_content,
            context=convert.struct_to_dict(request.context),
            request_id=request.request_id or None,
            caller=caller,
            deadline=_deadline(context),
            options=convert.requested_options(request.options),
            optimization=convert.optimization_level(request.compile_options.optimization_level),
            dependencies=tuple(request.dependencies),
        )
        return pb.InitializeResponse(
            request_id=record.request_id,
            status=convert.SESSION_STATUS[record.status],
            expires_at=convert.timestamp(record.expires_at),
        )

    @reports_errors
    async def Execute(self, request: ExecuteRequestView, context: Context) -> pb.ExecuteResponse:  # type: ignore[override]
        caller = self._caller(context)
        self._admit(caller, context)
        execution = await self._usecases.execute(
            request.request_id,
            await self._payloads.params(request, caller.owner),
            caller,
            _deadline(context),
            request.cache_control,
        )
        return await self._payloads.response(execution, caller.owner)

    @reports_stream_errors
    async def ExecuteStream(  # type: ignore[override]
        self, request: ExecuteRequestView, context: Context
    ) -> AsyncIterator[pb.ExecuteStreamResponse]:
        caller = self._caller(context)
        self._admit(caller, context)
        params = await self._payloads.params(request, caller.owner)
        deadline = _deadline(context)
        execute = self._usecases.execute
        async for event in streamed(
            lambda sink: execute(request.request_id, params, caller, deadline, request.cache_control, sink)
        ):
            if isinstance(event, OutputChunk):
                chunk = pb.OutputChunk(
                    stream=OUTPUT_STREAM[event.stream], text=event.text, offset=event.offset
                )
                yield pb.ExecuteStreamResponse(output=chunk)
            else:
                response = await self._payloads.response(event, caller.owner)
                yield pb.ExecuteStreamResponse(response=response)

    @reports_errors
    async def ExecuteBatch(  # type: ignore[override]
        self, request: ExecuteBatchRequestView, context: Context
    ) -> pb.ExecuteBatchResponse:
        caller = self._caller(context)
        count = convert.batch_size(request)
        call = current_call()
        if call is not None:
            call.items = count
        self._usecases.execute_batch.check_size(count)  # before its items cost a token or a decode
        self._admit(caller, context, count)
        items = await self._payloads.batch_params(request, caller.owner)
        answers = await self._usecases.execute_batch(
            request.request_id, items, caller, _deadline(context), request.cache_control
        )
        return await self._payloads.batch_response(request.request_id, answers, caller.owner)

    @reports_errors
    async def Health(self, request: pb.HealthRequest, context: Context) -> pb.HealthResponse:
        return convert.health_response(self._usecases.health())

    @reports_errors
    async def GetSession(self, request: pb.GetSessionRequest, context: Context) -> pb.GetSessionResponse:
        record = await self._usecases.get_session(
            request.request_id, self._caller(context), _deadline(context)
        )
        return pb.GetSessionResponse(session=convert.session_message(record))

    @reports_errors
    async def ListFunctions(
        self, request: pb.ListFunctionsRequest, context: Context
    ) -> pb.ListFunctionsResponse:
        caller = self._caller(context)
        page = await self._usecases.catalog.list_functions(
            language=request.language,
            function_type=convert.function_type_filter(request.function_type),
            page_size=request.page_size,
            page_token=request.page_token,
            caller=caller,
            deadline=_deadline(context),
        )
        return pb.ListFunctionsResponse(
            functions=[convert.function_message(f) for f in page.functions],
            next_page_token=page.next_page_token,
        )

    @reports_errors
    async def GetFunction(self, request: pb.GetFunctionRequest, context: Context) -> pb.GetFunctionResponse:
        function = await self._usecases.catalog.get_function(
            request.language_title, self._caller(context), _deadline(context)
        )
        return pb.GetFunctionResponse(function=convert.function_message(function))


def _deadline(context: Context) -> Deadline:
    """The caller's deadline, less a margin so that our own answer (TIMEOUT, UNAVAILABLE) arrives in time."""
    remaining = context.time_remaining()
    return Deadline.after(None if remaining is None else max(0.0, remaining - RESPONSE_MARGIN))


def _metadata(context: Context, name: str) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == name:
            return value if isinstance(value, str) else value.decode("utf-8", "replace")
    return ""


def add_to_server(servicer: LambdaServicer, server: grpc.aio.Server) -> None:
    """Register the servicer like the generated helper does, but with forgiving deserializers.

    A request that does not decode (corrupt, or nested past protobuf's limit)
    reaches the servicer as Undecodable and is answered INVALID_ARGUMENT; the
    generated helper would let gRPC answer UNKNOWN.
    """
    service = pb.DESCRIPTOR.services_by_name["LambdaService"]
    handlers = {}
    for method in service.methods:
        request_class = GetMessageClass(method.input_type)
        if method.name in ("Execute", "ExecuteStream"):
            request_class = convert.RawExecuteRequest
        elif method.name == "ExecuteBatch":
            request_class = convert.RawExecuteBatchRequest
        response_class = GetMessageClass(method.output_type)
        handler = (
            grpc.unary_stream_rpc_method_handler
            if method.server_streaming
            else grpc.unary_unary_rpc_method_handler
        )
        handlers[method.name] = handler(
            getattr(servicer, method.name),
            request_deserializer=_forgiving(request_class),
            response_serializer=response_class.SerializeToString,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))


def _forgiving(message_class: type[Message]) -> Callable[[bytes], Any]:
    def deserialize(data: bytes) -> Any:
        try:
            return message_class.FromString(data)
        except (DecodeError, RecursionError, ValueError) as exc:
            return Undecodable(message_class.DESCRIPTOR.name, str(exc))

    return deserialize
