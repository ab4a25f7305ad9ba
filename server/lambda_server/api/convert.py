"""Proto <-> domain conversion, hand-written for speed.

json_format is several times slower on the hot path, and turns every number
into a float; here an integral number within 2**53 becomes a Python int, so a
script receives 5 for 5 rather than 5.0. Exact JSON travels as text beside the
Structs and Values: params_json is read by json_text (integers of any size, 1
apart from 1.0), and result_json is the text the script's runtime wrote.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence
from datetime import datetime
from typing import Any, Protocol

from google.protobuf import struct_pb2
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from lambda_microservice.v1 import lambda_service_pb2 as pb
from lambda_server import json_text
from lambda_server.api import payloads
from lambda_server.api.errors import status_message
from lambda_server.config import MAX_JSON_DEPTH_CEILING
from lambda_server.domain import (
    JSON,
    CompileStatus,
    ComponentStatus,
    EnvironmentState,
    ExecutionResult,
    FunctionDefinition,
    FunctionType,
    HealthReport,
    OptimizationLevel,
    RequestedOptions,
    SessionOptions,
    SessionRecord,
    SessionStatus,
)
from lambda_server.errors import InvalidRequest, LambdaError
from lambda_server.logs import Payload, current_call
from lambda_server.usecases.batch import ANSWER_OVERHEAD_BYTES, ITEM_OVERHEAD_BYTES

_MAX_SAFE = 2**53

ENVIRONMENT_STATE = {
    None: pb.ENVIRONMENT_STATE_UNSPECIFIED,
    EnvironmentState.WARM: pb.ENVIRONMENT_STATE_WARM,
    EnvironmentState.PREWARMED: pb.ENVIRONMENT_STATE_PREWARMED,
    EnvironmentState.COLD: pb.ENVIRONMENT_STATE_COLD,
}

SESSION_STATUS = {
    SessionStatus.ACTIVE: pb.SESSION_STATUS_ACTIVE,
    SessionStatus.EXPIRED: pb.SESSION_STATUS_EXPIRED,
}

OPTIMIZATION_LEVELS: dict[int, OptimizationLevel] = {
    pb.OPTIMIZATION_LEVEL_UNSPECIFIED: OptimizationLevel.DEBUG,
    pb.OPTIMIZATION_LEVEL_DEBUG: OptimizationLevel.DEBUG,
    pb.OPTIMIZATION_LEVEL_RELEASE: OptimizationLevel.RELEASE,
}

COMPILE_STATUS = {
    None: pb.COMPILE_STATUS_UNSPECIFIED,
    CompileStatus.PENDING: pb.COMPILE_STATUS_PENDING,
    CompileStatus.SUCCESS: pb.COMPILE_STATUS_SUCCESS,
    CompileStatus.ERROR: pb.COMPILE_STATUS_ERROR,
}

COMPONENT_STATUS = {
    ComponentStatus.OK: pb.COMPONENT_STATUS_OK,
    ComponentStatus.DEGRADED: pb.COMPONENT_STATUS_DEGRADED,
    ComponentStatus.UNAVAILABLE: pb.COMPONENT_STATUS_UNAVAILABLE,
}

FUNCTION_TYPE = {
    FunctionType.PREDEFINED: pb.FUNCTION_TYPE_PREDEFINED,
    FunctionType.DYNAMIC: pb.FUNCTION_TYPE_DYNAMIC,
}
_FUNCTION_TYPE_FILTER: dict[int, FunctionType] = {int(value): key for key, value in FUNCTION_TYPE.items()}


# What Execute's handler receives: an ExecuteRequest whose params are still their wire
# bytes, for ExecutePayloads to decode (once, bounded, in slices).
RawExecuteRequest = payloads.raw_twin(pb.ExecuteRequest, "params")
RawExecuteBatchRequest = payloads.raw_twin(pb.ExecuteBatchRequest, "params")
# The deepest JSON an HTTP body may be: what a gRPC request carries at most (protobuf
# decodes 100 nested messages, and a JSON level costs two: MAX_JSON_DEPTH_CEILING, 48),
# and the body's own object. A context, say, is never deeper over HTTP than over gRPC.
HTTP_BODY_MAX_DEPTH = MAX_JSON_DEPTH_CEILING + 1
# ExecuteBatch's answers converted between two yields of the event loop
BATCH_ITEMS_PER_SLICE = 50


class ExecuteParams(Protocol):
    """The params of an ExecuteRequest as Execute receives it (RawExecuteRequest)."""

    params: bytes  # a google.protobuf.Struct's wire bytes
    params_json: str

    def HasField(self, field_name: str) -> bool: ...


class ExecuteBatchParams(Protocol):
    """The items of an ExecuteBatchRequest as ExecuteBatch receives it (RawExecuteBatchRequest)."""

    @property
    def params(self) -> Sequence[bytes]: ...  # each a google.protobuf.Struct's wire bytes

    @property
    def params_json(self) -> Sequence[str]: ...


def batch_size(request: ExecuteBatchParams) -> int:
    """An ExecuteBatchRequest's number of items; InvalidRequest when both fields hold some."""
    if request.params and request.params_json:
        message = "params and params_json are both set: send the items in one of them"
        call = current_call()
        if call is not None:
            call.params = Payload(None, 0, message)
        raise InvalidRequest(message, field="params_json")
    return len(request.params) or len(request.params_json)


class ExecutePayloads:
    """Execute's params and result, each converted once, within MAX_JSON_NODES and
    MAX_JSON_DEPTH; the call's request log reuses what was converted (CallInfo).

    MAX_JSON_DEPTH's default, 32, keeps every result within what protobuf clients decode
    by default: 100 nested messages, and a JSON level costs two (a Value, then its Struct or
    ListValue), so the project's Python client reads 49 levels and fails at 50
    (tests/test_exact_json.py reads a result at the limit with it). No setting goes past
    MAX_JSON_DEPTH_CEILING, 48."""

    def __init__(self, max_nodes: int, max_depth: int, answer_bytes: int | None = None) -> None:
        """`answer_bytes`: GRPC_MAX_SEND_MESSAGE_BYTES, what an ExecuteBatchResponse holds at most."""
        self._max_nodes = max_nodes
        self._max_depth = max_depth
        self._answer_bytes = answer_bytes
        self._pacer = payloads.Pacer()

    async def params(self, request: ExecuteParams, owner: str) -> dict[str, JSON]:
        """The params of an ExecuteRequest, from `params` (a Struct's wire bytes) or
        `params_json` (the text of a JSON object, read exactly); InvalidRequest when they do not
        hold, or when both are set."""
        text = request.params_json
        call = current_call()
        if text and request.HasField("params"):
            message = "params and params_json are both set: send the parameters in one of them"
            if call is not None:
                call.params = Payload(None, 0, message)
            raise InvalidRequest(message, field="params_json")
        field = "params_json" if text else "params"
        try:
            params, size = await self._decode(text, request.params, owner)
        except (payloads.PastBound, payloads.Malformed) as exc:
            error, reason = _refusal(exc, field, "ExecuteRequest")
            if call is not None:
                call.params = Payload(None, 0, reason)
            raise error from None
        if call is not None:
            call.params = Payload(params, size)
        return params

    async def json_body(self, body: bytes, owner: str) -> JSON:
        """An HTTP request's JSON body, read exactly (integers of any size), a large one in its
        owner's turn as a large params_json is; InvalidRequest when it is not JSON."""
        try:
            return await self._pacer.run(self._read_body(body), owner)
        except (payloads.PastBound, payloads.Malformed) as exc:
            call = current_call()
            error, reason = _refusal(exc, "body", "JSON body")
            if call is not None:
                call.params = Payload(None, 0, reason)
            raise error from None

    async def parsed_params(self, params: JSON, size: int, owner: str) -> dict[str, JSON]:
        """Params read already (the HTTP API's body), measured against MAX_JSON_NODES and
        MAX_JSON_DEPTH as params_json's are; InvalidRequest naming `params` when they do not
        hold. `size` is about their JSON text's bytes, for the request log."""
        call = current_call()
        try:
            if not isinstance(params, dict):
                raise payloads.Malformed(f"params is a JSON {json_kind(params)}, not an object")
            tally = payloads.Tally(self._max_nodes, self._max_depth)
            await self._pacer.run(payloads.measure(params, tally), owner)
        except (payloads.PastBound, payloads.Malformed) as exc:
            error, reason = _refusal(exc, "params", "request body")
            if call is not None:
                call.params = Payload(None, 0, reason)
            raise error from None
        if call is not None:
            call.params = Payload(params, size)
        return params

    def _read_body(self, body: bytes) -> payloads.Steps:
        """The body's value, nested at most HTTP_BODY_MAX_DEPTH levels; Malformed else."""
        if len(body) > payloads.PARSED_AT_ONCE:
            yield  # a large body is parsed in its owner's turn (Pacer.run)
        deep = payloads.Malformed(
            f"it is nested more than {HTTP_BODY_MAX_DEPTH} levels deep, deeper than a gRPC request carries"
        )
        try:
            value = json_text.loads(body)
        except json_text.TooDeep:
            raise deep from None
        except json_text.Refused as exc:
            raise payloads.Malformed(f"it is not JSON: {exc}") from None
        try:
            yield from payloads.measure(value, payloads.Tally(sys.maxsize, HTTP_BODY_MAX_DEPTH))
        except payloads.PastBound:
            raise deep from None
        return value

    async def batch_params(self, request: ExecuteBatchParams, owner: str) -> list[dict[str, JSON]]:
        """The items of an ExecuteBatchRequest, each decoded as an ExecuteRequest's params (its
        own MAX_JSON_NODES and MAX_JSON_DEPTH), one at a time with the loop's other work in
        between; InvalidRequest (the item in its metadata) when one does not hold, or when
        both fields are set. The call's request log gets the list."""
        batch_size(request)  # both fields set: InvalidRequest
        texts, structs = request.params_json, request.params
        call = current_call()
        field = "params_json" if texts else "params"
        items: list[dict[str, JSON]] = []
        total = 0
        for index in range(len(texts) if texts else len(structs)):
            try:
                if texts:
                    params, size = await self._decode(texts[index] or "{}", b"", owner)
                else:
                    params, size = await self._decode("", structs[index], owner)
            except (payloads.PastBound, payloads.Malformed) as exc:
                error, reason = _refusal(exc, f"{field}[{index}]", "ExecuteBatchRequest")
                error.metadata["item"] = str(index)
                if call is not None:
                    call.params = Payload(None, 0, reason)
                raise error from None
            items.append(params)
            total += size + 2
        if call is not None:
            call.params = Payload(items, total)
        return items

    async def _decode(self, text: str, struct: bytes, owner: str) -> tuple[dict[str, JSON], int]:
        """Params from JSON text (when not empty) or a Struct's bytes, and their size about."""
        tally = payloads.Tally(self._max_nodes, self._max_depth)
        steps = self._parse(text, tally) if text else payloads.decode_struct(struct, tally)
        params: dict[str, JSON] = await self._pacer.run(steps, owner)
        return params, tally.size

    def _parse(self, text: str, tally: payloads.Tally) -> payloads.Steps:
        """params_json's object, measured against the bounds; Malformed or PastBound."""
        if len(text) > payloads.PARSED_AT_ONCE:
            yield  # a large text is parsed in its owner's turn (Pacer.run)
        try:
            params = json_text.loads(text.encode())
        except json_text.TooDeep:  # deeper than the parser goes, so past any MAX_JSON_DEPTH
            raise payloads.PastBound(
                "MAX_JSON_DEPTH", self._max_depth, f"nested more than {self._max_depth} levels deep"
            ) from None
        except json_text.Refused as exc:
            raise payloads.Malformed(f"params_json is not JSON a script can be given: {exc}") from None
        if not isinstance(params, dict):
            raise payloads.Malformed(f"params_json is a JSON {json_kind(params)}, not an object")
        yield from payloads.measure(params, tally)
        tally.size = len(text)
        return params

    async def response(self, execution: ExecutionResult, owner: str) -> pb.ExecuteResponse:
        """The answer; a result past the bounds (or not JSON) is an INVALID_RESULT error."""
        response, payload = await self._response(execution, owner)
        call = current_call()
        if call is not None and payload is not None:
            call.result = payload
        return response

    async def batch_response(
        self, request_id: str, items: Sequence[ExecutionResult | LambdaError], owner: str
    ) -> pb.ExecuteBatchResponse:
        """Each item's answer, in order: converted as Execute's (`response`), or, for an item
        that did not run, its `status`. The loop's other work runs between items. The use case
        kept the items' payloads within `answer_bytes` (about: answer_size); here the answer
        is measured exactly, and an item that would take it past the bound (each item after
        it keeping ITEM_OVERHEAD_BYTES) is answered OUTPUT_LIMIT instead of its result."""
        results: list[pb.ExecuteResponse] = []
        logged: list[JSON] = []
        total = 0
        spent = ANSWER_OVERHEAD_BYTES
        title = next((item.language_title for item in items if isinstance(item, ExecutionResult)), "")
        for index, item in enumerate(items):
            if isinstance(item, LambdaError):
                response = pb.ExecuteResponse(request_id=request_id, language_title=title)
                response.status.CopyFrom(status_message(item))
                logged.append(
                    {"status": {"code": item.status, "reason": item.reason, "message": item.message}}
                )
                total += 64 + len(item.message)
            else:
                response, payload = await self._response(item, owner)
                if self._answer_bytes is not None:
                    room = self._answer_bytes - spent - ITEM_OVERHEAD_BYTES * (len(items) - index - 1)
                    if response.ByteSize() + 8 > room:
                        response, payload = _answer_full(response, self._answer_bytes), None
                if response.HasField("error"):
                    code = pb.ExecutionErrorCode.Name(response.error.code).removeprefix(
                        "EXECUTION_ERROR_CODE_"
                    )
                    logged.append({"error": {"code": code, "message": response.error.message}})
                    total += 64 + len(response.error.message)
                elif payload is not None:
                    logged.append(payload.value)
                    total += payload.size
            spent += response.ByteSize() + 8  # with its field's tag and length
            results.append(response)
            if index % BATCH_ITEMS_PER_SLICE == BATCH_ITEMS_PER_SLICE - 1:
                await asyncio.sleep(0)
        call = current_call()
        if call is not None:
            call.result = Payload(logged, total)
        return pb.ExecuteBatchResponse(results=results)

    async def _response(
        self, execution: ExecutionResult, owner: str
    ) -> tuple[pb.ExecuteResponse, Payload | None]:
        """The answer, and its result for the request log (None when it failed)."""
        response = execute_response(execution)
        if execution.outcome.failure is not None:
            return response, None
        tally = payloads.Tally(self._max_nodes, self._max_depth)
        result = execution.outcome.result
        try:
            await self._pacer.run(payloads.fill_value(result, response.result, tally), owner)
        except (payloads.PastBound, TypeError, ValueError, OverflowError) as exc:
            if isinstance(exc, payloads.PastBound):
                message = f"the result: {exc.what}, past {exc.setting} ({exc.limit})"
            else:  # what json_text refuses already; a second line
                message = f"the result cannot be carried as JSON: {exc}"
            response.ClearField("result")
            code = pb.EXECUTION_ERROR_CODE_INVALID_RESULT
            response.error.CopyFrom(pb.ExecutionError(code=code, message=message))
            return response, Payload(None, 0, message)
        response.result_json = execution.outcome.result_json
        return response, Payload(result, tally.size)


def _answer_full(response: pb.ExecuteResponse, limit: int) -> pb.ExecuteResponse:
    """An item's answer without its payload: the batch's answer has no room for it."""
    full = pb.ExecuteResponse()
    full.CopyFrom(response)
    for name in ("result", "result_json", "logs", "logs_truncated"):
        full.ClearField(name)
    message = (
        f"the batch's answer is full: this item's result and logs did not fit in what is left of "
        f"GRPC_MAX_SEND_MESSAGE_BYTES ({limit}); they were dropped"
    )
    full.error.CopyFrom(pb.ExecutionError(code=pb.EXECUTION_ERROR_CODE_OUTPUT_LIMIT, message=message))
    return full


def _refusal(
    exc: payloads.PastBound | payloads.Malformed, field: str, message_type: str
) -> tuple[InvalidRequest, str]:
    """The InvalidRequest of params that do not hold, and the reason the request log keeps."""
    if isinstance(exc, payloads.PastBound):
        message = f"{field}: {exc.what}, past {exc.setting} ({exc.limit})"
        return InvalidRequest(message, field=field, setting=exc.setting, limit=str(exc.limit)), message
    return InvalidRequest(f"the request is not a valid {message_type}: {exc}", field=field), str(exc)


def json_kind(value: object) -> str:
    """What a JSON value is, in JSON's words (for a message saying what was sent instead)."""
    if isinstance(value, dict):
        return "object"
    if isinstance(value, list):
        return "array"
    if isinstance(value, str):
        return "string"
    if isinstance(value, bool):
        return "boolean"
    return "null" if value is None else "number"


# value_to_python's recursion is bounded: protobuf refuses messages nested deeper than
# 100 levels (50 levels of JSON) before they reach it.


def struct_to_dict(struct: struct_pb2.Struct) -> dict[str, JSON]:
    return {key: value_to_python(value) for key, value in struct.fields.items()}


def value_to_python(value: struct_pb2.Value) -> JSON:
    kind = value.WhichOneof("kind")
    if kind == "number_value":
        number = value.number_value
        if number.is_integer() and -_MAX_SAFE <= number <= _MAX_SAFE:
            return int(number)
        return number
    if kind == "string_value":
        return value.string_value
    if kind == "bool_value":
        return value.bool_value
    if kind == "struct_value":
        return struct_to_dict(value.struct_value)
    if kind == "list_value":
        return [value_to_python(item) for item in value.list_value.values]
    return None  # null_value, or unset


def python_to_value(data: Any, target: struct_pb2.Value) -> None:
    """Fill `target` with a JSON value (as decoded from a worker's answer)."""
    if data is None:
        target.null_value = struct_pb2.NULL_VALUE
    elif isinstance(data, bool):
        target.bool_value = data
    elif isinstance(data, int | float):
        target.number_value = float(data)
    elif isinstance(data, str):
        target.string_value = data
    elif isinstance(data, dict):
        fields = target.struct_value.fields
        if not data:
            target.struct_value.SetInParent()
        for key, item in data.items():
            python_to_value(item, fields[str(key)])
    elif isinstance(data, list):
        values = target.list_value.values
        if not data:
            target.list_value.SetInParent()
        for item in data:
            python_to_value(item, values.add())
    else:
        raise TypeError(f"{type(data).__name__} is not a JSON value")


def timestamp(moment: datetime | None) -> Timestamp | None:
    if moment is None:
        return None
    stamp = Timestamp()
    stamp.FromDatetime(moment)
    return stamp


def dict_to_struct(data: dict[str, JSON]) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    for key, item in data.items():
        python_to_value(item, struct.fields[key])
    return struct


def optimization_level(value: int) -> OptimizationLevel:
    """CompileOptions.optimization_level; InvalidRequest for a number this server does not know
    (a newer client's)."""
    found = OPTIMIZATION_LEVELS.get(value)
    if found is None:
        raise InvalidRequest(
            f"compile_options.optimization_level {value} is not DEBUG or RELEASE",
            field="compile_options.optimization_level",
        )
    return found


def requested_options(options: pb.ExecutionOptions) -> RequestedOptions:
    """InitializeRequest.options: None for each field the caller left unset."""
    return RequestedOptions(
        timeout_seconds=_seconds(options.timeout) if options.HasField("timeout") else None,
        memory_mb=options.memory_mb if options.HasField("memory_mb") else None,
        max_processes=options.max_processes if options.HasField("max_processes") else None,
        cache_ttl_seconds=_seconds(options.cache_ttl) if options.HasField("cache_ttl") else None,
    )


def options_message(options: SessionOptions) -> pb.ExecutionOptions:
    return pb.ExecutionOptions(
        timeout=_duration(options.timeout_seconds),
        memory_mb=options.memory_mb,
        max_processes=options.max_processes,
        cache_ttl=_duration(options.cache_ttl_seconds),
    )


def _seconds(duration: Duration) -> float:
    return duration.seconds + duration.nanos / 1e9


def _duration(seconds: float) -> Duration:
    duration = Duration()
    duration.FromNanoseconds(round(seconds * 1e9))
    return duration


def session_message(record: SessionRecord) -> pb.Session:
    message = pb.Session(
        request_id=record.request_id,
        language_title=record.language_title,
        status=SESSION_STATUS[record.status],
        created_at=timestamp(record.created_at),
        expires_at=timestamp(record.expires_at),
        last_executed_at=timestamp(record.last_executed_at),
        execution_count=record.execution_count,
        script_hash=record.script_hash,
        context=dict_to_struct(record.context),
        compile_status=COMPILE_STATUS[record.compile_status],
        compile_error=record.compile_error or "",
    )
    if record.options is not None:
        message.options.CopyFrom(options_message(record.options))
    if record.dependencies is not None:
        message.dependencies.extend(record.dependencies.requirements)
        message.locked.extend(
            pb.LockedPackage(name=package.name, version=package.version, hash=package.hash)
            for package in record.dependencies.packages
        )
    return message


def health_response(report: HealthReport) -> pb.HealthResponse:
    """Both forms: `components` (text, for people) and `checks` (values, for programs)."""
    status = pb.HEALTH_STATUS_SERVING if report.serving else pb.HEALTH_STATUS_NOT_SERVING
    checks = [
        pb.ComponentHealth(
            name=component.name,
            status=COMPONENT_STATUS[component.status],
            detail=component.detail,
            required=component.required,
            counts=component.counts,
            packages=component.packages,
        )
        for component in report.components
    ]
    return pb.HealthResponse(status=status, version=report.version, components=report.text(), checks=checks)


def execute_response(execution: ExecutionResult) -> pb.ExecuteResponse:
    """The answer, without its result (see ExecutePayloads.response)."""
    outcome = execution.outcome
    duration = Duration()
    duration.FromNanoseconds(int(outcome.duration * 1e9))
    cpu_time = Duration()
    cpu_time.FromNanoseconds(int(outcome.cpu_time * 1e9))
    response = pb.ExecuteResponse(
        request_id=execution.request_id,
        language_title=execution.language_title,
        execution_time=duration,
        cached=execution.cached,
        logs=outcome.logs,
        environment_state=ENVIRONMENT_STATE[outcome.environment],
        cpu_time=cpu_time,
        peak_memory_bytes=outcome.peak_memory,
        logs_truncated=outcome.logs_truncated,
    )
    if outcome.failure is not None:  # a result is filled by ExecutePayloads.response
        failure = outcome.failure
        response.error.CopyFrom(
            pb.ExecutionError(
                code=pb.ExecutionErrorCode.Value(f"EXECUTION_ERROR_CODE_{failure.code.value}"),
                message=failure.message,
                line=failure.line,
                column=failure.column,
                stack_trace=failure.stack_trace,
            )
        )
    return response


def function_type_filter(value: int) -> FunctionType | None:
    """ListFunctionsRequest.function_type: None for UNSPECIFIED (every type)."""
    if value == pb.FUNCTION_TYPE_UNSPECIFIED:
        return None
    found = _FUNCTION_TYPE_FILTER.get(value)
    if found is None:
        raise InvalidRequest(f"function_type {value} is not a FunctionType", field="function_type")
    return found


def function_message(function: FunctionDefinition) -> pb.Function:
    message = pb.Function(
        language_title=function.language_title,
        description=function.description,
        language=function.language,
        title=function.title,
        function_type=FUNCTION_TYPE[function.function_type],
        tags=function.tags,
        version=function.version,
        script=function.script or "",
        is_available=function.available,
        created_at=timestamp(function.created_at),
        updated_at=timestamp(function.updated_at),
    )
    if function.params_schema is not None:
        message.params_schema.CopyFrom(dict_to_struct(function.params_schema))
    if function.result_schema is not None:
        message.result_schema.CopyFrom(dict_to_struct(function.result_schema))
    for example in function.examples:
        if isinstance(example, dict):  # the column allows any JSON; the contract shows objects
            message.examples.append(dict_to_struct(example))
    return message
