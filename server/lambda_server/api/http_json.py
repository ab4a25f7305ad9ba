"""The HTTP/JSON API's shapes: the original service's snake_case JSON, from domain values and answers.

Errors are `{"error": {"code", "message", "details"}}` with the original's codes. Each
reason of errors.py's one table maps to one (HTTP status, code) here (ERRORS); the
reason, its ErrorInfo metadata and the gRPC status go in `details`, so an HTTP caller
loses nothing a gRPC caller learns.
"""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime

from lambda_microservice.v1 import lambda_service_pb2 as pb
from lambda_server.api.convert import json_kind
from lambda_server.api.errors import DOMAIN
from lambda_server.api.request_logs import environment_state
from lambda_server.domain import (
    JSON,
    ExecutionResult,
    FunctionDefinition,
    HealthReport,
    RequestedOptions,
    SessionOptions,
    SessionRecord,
)
from lambda_server.errors import InvalidRequest, LambdaError, QuotaExceeded, RateLimited

# The original service's error codes, as HTTP statuses answer them.
INVALID_REQUEST = "INVALID_REQUEST"
INVALID_PARAMS = "INVALID_PARAMS"
UNAUTHORIZED = "UNAUTHORIZED"
FORBIDDEN = "FORBIDDEN"
NOT_FOUND = "NOT_FOUND"
RATE_LIMITED = "RATE_LIMITED"
INTERNAL_ERROR = "INTERNAL_ERROR"
TIMEOUT = "TIMEOUT"

# A google.protobuf.Duration's JSON text: seconds, up to 9 fractional digits, then "s".
_DURATION = re.compile(r"-?[0-9]{1,12}(?:\.[0-9]{1,9})?s", re.ASCII)

# Every reason of errors.py's table (the proto's ErrorReason) -> (HTTP status, code).
ERRORS: dict[str, tuple[int, str]] = {
    "INVALID_REQUEST": (400, INVALID_REQUEST),
    "INVALID_PARAMS": (400, INVALID_PARAMS),
    "SCRIPT_LIMIT_EXCEEDED": (400, INVALID_REQUEST),
    "DEPENDENCY_UNRESOLVABLE": (400, INVALID_REQUEST),
    "DEPENDENCY_NOT_ALLOWED": (400, INVALID_REQUEST),
    "DEPENDENCY_LIMIT_EXCEEDED": (400, INVALID_REQUEST),
    # the request_id is in use with another script: the request cannot be honoured as sent
    "SESSION_CONFLICT": (400, INVALID_REQUEST),
    "UNAUTHORIZED": (401, UNAUTHORIZED),
    "FORBIDDEN": (403, FORBIDDEN),
    "NOT_FOUND": (404, NOT_FOUND),
    # the original's "Session not found or expired"
    "SESSION_EXPIRED": (404, NOT_FOUND),
    "RATE_LIMITED": (429, RATE_LIMITED),
    "QUOTA_EXCEEDED": (429, RATE_LIMITED),
    # the service is at its capacity, or cannot serve this language or call now: try later
    "RUNTIME_BUSY": (503, INTERNAL_ERROR),
    "RUNTIME_NOT_AVAILABLE": (503, INTERNAL_ERROR),
    "UNAVAILABLE": (503, INTERNAL_ERROR),
    "NOT_STARTED": (503, INTERNAL_ERROR),
    "PACKAGE_INDEX_UNAVAILABLE": (503, INTERNAL_ERROR),
    "SANDBOX_UNAVAILABLE": (503, INTERNAL_ERROR),
    "DEADLINE_EXCEEDED": (504, TIMEOUT),
    "INTERNAL_ERROR": (500, INTERNAL_ERROR),
}
# The answers outside the original's table: a body past the bound or late, a method the route has not.
PAYLOAD_TOO_LARGE = 413
REQUEST_TIMEOUT = 408
METHOD_NOT_ALLOWED = 405
# A script's failure answers 200 with `error` set (as gRPC answers OK with it), and names
# its code in this header, as AWS Lambda's X-Amz-Function-Error does.
FUNCTION_ERROR_HEADER = "X-Function-Error"
_FAILURES = {
    value: name.removeprefix("EXECUTION_ERROR_CODE_") for name, value in pb.ExecutionErrorCode.items()
}


def error_status(error: LambdaError) -> tuple[int, str]:
    """The HTTP status and the code of a refusal: by its reason, else INTERNAL_ERROR."""
    return ERRORS.get(error.reason, (500, INTERNAL_ERROR))


def error_body(error: LambdaError, code: str) -> dict[str, JSON]:
    details: dict[str, JSON] = {
        "reason": error.reason,
        "domain": DOMAIN,
        "grpc_status": error.status,
        "metadata": {key: str(value) for key, value in error.metadata.items()},
    }
    if isinstance(error, RateLimited | QuotaExceeded):
        details["retry_after_seconds"] = round(error.retry_after, 3)
    return {"error": {"code": code, "message": error.message, "details": details}}


def timestamp(moment: datetime | None) -> str | None:
    """RFC 3339 in UTC with a Z, as the original wrote times; None stays null."""
    if moment is None:
        return None
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def initialize_body(record: SessionRecord) -> dict[str, JSON]:
    return {
        "request_id": record.request_id,
        "status": record.status.value,
        "expires_at": timestamp(record.expires_at),
    }


def execute_body(response: pb.ExecuteResponse, execution: ExecutionResult) -> dict[str, JSON]:
    """Execute's answer. `response` is the gRPC answer the payloads made (a result past the
    bounds is INVALID_RESULT there too); the result is the execution's own value, exact."""
    body: dict[str, JSON] = {
        "request_id": response.request_id,
        "language_title": response.language_title,
        "execution_time": _milliseconds(response.execution_time.ToNanoseconds()),
        "cached": response.cached,
        "result": None,
        "logs": response.logs,
        "logs_truncated": response.logs_truncated,
        "environment_state": environment_state(response.environment_state),
        "cpu_time": _milliseconds(response.cpu_time.ToNanoseconds()),
        "peak_memory_bytes": response.peak_memory_bytes,
    }
    if response.HasField("error"):
        failure = response.error
        body["error"] = {
            "code": failure_code(response),
            "message": failure.message,
            "details": {"line": failure.line, "column": failure.column, "stack_trace": failure.stack_trace},
        }
    else:
        body["result"] = execution.outcome.result
    return body


def failure_code(response: pb.ExecuteResponse) -> str:
    """RUNTIME_ERROR, TIMEOUT, MEMORY_LIMIT, OUTPUT_LIMIT or INVALID_RESULT."""
    return _FAILURES.get(response.error.code, "RUNTIME_ERROR")


def session_body(record: SessionRecord) -> dict[str, JSON]:
    return {
        "request_id": record.request_id,
        "language_title": record.language_title,
        "status": record.status.value,
        "created_at": timestamp(record.created_at),
        "expires_at": timestamp(record.expires_at),
        "execution_count": record.execution_count,
        "last_executed_at": timestamp(record.last_executed_at),
        "script_hash": record.script_hash,
        "context": record.context,
        "options": None if record.options is None else options_body(record.options),
        "compile_status": None if record.compile_status is None else record.compile_status.value,
        "compile_error": record.compile_error,
        # as GetSession's `dependencies` and `locked`: what it asked for, what that resolved to
        "dependencies": list(record.dependencies.requirements) if record.dependencies else [],
        "locked": [
            {"name": package.name, "version": package.version, "hash": package.hash}
            for package in (record.dependencies.packages if record.dependencies else ())
        ],
    }


def options_body(options: SessionOptions) -> dict[str, JSON]:
    """Options in seconds and numbers, the names Initialize's `options` takes."""
    return {
        "timeout": options.timeout_seconds,
        "memory_mb": options.memory_mb,
        "max_processes": options.max_processes,
        "cache_ttl": options.cache_ttl_seconds,
    }


def function_summary(function: FunctionDefinition) -> dict[str, JSON]:
    return {
        "language": function.language,
        "title": function.title,
        "language_title": function.language_title,
        "description": function.description,
        "function_type": function.function_type.value,
        "version": function.version,
        "tags": list(function.tags),
        "is_available": function.available,
        "created_at": timestamp(function.created_at),
        "updated_at": timestamp(function.updated_at),
    }


def function_body(function: FunctionDefinition) -> dict[str, JSON]:
    body = function_summary(function)
    body["schema"] = {"params": function.params_schema, "result": function.result_schema}
    body["examples"] = function.examples
    if function.script is not None:  # a dynamic function's
        body["script"] = function.script
    return body


def health_body(report: HealthReport) -> dict[str, JSON]:
    return {
        "status": "ok" if report.serving else "unavailable",
        "version": report.version,
        "components": report.text(),
        "checks": [
            {
                "name": component.name,
                "status": component.status.value,
                "detail": component.detail,
                "required": component.required,
                "counts": dict(component.counts),
            }
            for component in report.components
        ],
    }


# Initialize's body -> the use case's arguments


def text_field(body: dict[str, JSON], name: str) -> str:
    """A string field of the body ('' when absent or null); InvalidRequest for another type."""
    value = body.get(name)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise InvalidRequest(f"{name} must be a string, not a JSON {json_kind(value)}", field=name)
    return value


def object_field(body: dict[str, JSON], name: str) -> dict[str, JSON]:
    value = body.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidRequest(f"{name} must be a JSON object, not a JSON {json_kind(value)}", field=name)
    return value


def strings_field(body: dict[str, JSON], name: str) -> tuple[str, ...]:
    value = body.get(name)
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise InvalidRequest(f"{name} must be a list of strings", field=name)
    return tuple(value)


def requested_options(options: dict[str, JSON]) -> RequestedOptions:
    """Initialize's `options`: `timeout` and `cache_ttl` in seconds (a number, or a Duration's
    JSON text such as "1.5s"), `memory_mb` and `max_processes` integers; unknown names refused."""
    unknown = sorted(set(options) - {"timeout", "memory_mb", "max_processes", "cache_ttl"})
    if unknown:
        raise InvalidRequest(
            f"options.{unknown[0]} is not an option: timeout, memory_mb, max_processes, cache_ttl",
            field=f"options.{unknown[0]}",
        )
    return RequestedOptions(
        timeout_seconds=_seconds(options, "timeout"),
        memory_mb=_integer(options, "memory_mb"),
        max_processes=_integer(options, "max_processes"),
        cache_ttl_seconds=_seconds(options, "cache_ttl"),
    )


def _seconds(options: dict[str, JSON], name: str) -> float | None:
    """A number of seconds: a JSON number or a Duration's JSON text ("1.5s", what protobuf's
    JSON mapping writes); never "nans", "infs", "1e9s" or "1_0s", which float() would read."""
    value = options.get(name)
    if value is None:
        return None
    if isinstance(value, str) and _DURATION.fullmatch(value):
        return float(value[:-1])
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    raise InvalidRequest(
        f'options.{name} must be a number of seconds (or a duration such as "1.5s"), not {value!r:.40}',
        field=f"options.{name}",
    )


def _integer(options: dict[str, JSON], name: str) -> int | None:
    value = options.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(f"options.{name} must be an integer, not {value!r:.40}", field=f"options.{name}")
    if abs(value) >= 2**31:  # past the contract's int32 (the option's own bounds come after)
        raise InvalidRequest(
            f"options.{name} must be an integer of 32 bits (below 2**31 in size), not {value!r:.40}",
            field=f"options.{name}",
        )
    return value


def _milliseconds(nanoseconds: int) -> float:
    return round(nanoseconds / 1e6, 3)
