"""Maps our errors to gRPC statuses with a google.rpc.ErrorInfo detail, at one boundary."""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from lambda_server import errors

log = logging.getLogger(__name__)

DOMAIN = "lambda-microservice"
_DETAILS_KEY = "grpc-status-details-bin"

Context = grpc.aio.ServicerContext[Any, Any]


def status_code(error: errors.LambdaError) -> grpc.StatusCode:
    """The gRPC code of the error's row in the one table (lambda_server.errors)."""
    return grpc.StatusCode[error.status]


def to_status(error: errors.LambdaError) -> grpc.Status:
    return rpc_status.to_status(status_message(error))


def status_message(error: errors.LambdaError) -> status_pb2.Status:
    """The google.rpc.Status of the error: its code, message, ErrorInfo (and RetryInfo)."""
    code = status_code(error)
    info = error_details_pb2.ErrorInfo(
        reason=error.reason, domain=DOMAIN, metadata={k: str(v) for k, v in error.metadata.items()}
    )
    detail = any_pb2.Any()
    detail.Pack(info)
    details = [detail]
    if isinstance(error, errors.RateLimited | errors.QuotaExceeded):
        retry = error_details_pb2.RetryInfo()
        retry.retry_delay.FromNanoseconds(int(error.retry_after * 1e9))
        details.append(any_pb2.Any())
        details[-1].Pack(retry)
    return status_pb2.Status(code=getattr(code_pb2, code.name), message=error.message, details=details)


Handler = TypeVar("Handler", bound=Callable[..., Awaitable[Any]])
StreamHandler = TypeVar("StreamHandler", bound=Callable[..., AsyncIterator[Any]])


class Undecodable:
    """What a request that protobuf could not decode is handed to the servicer as."""

    def __init__(self, message_type: str, problem: str) -> None:
        self.error = errors.InvalidRequest(f"the request is not a valid {message_type}: {problem}")


def reports_errors(method: Handler) -> Handler:
    """Turn our errors into rich statuses, and anything unexpected into INTERNAL (never UNKNOWN)."""

    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: Context) -> Any:
        try:
            if isinstance(request, Undecodable):
                raise request.error
            return await method(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            failure = as_lambda_error(method.__name__, exc)
        await _abort(context, failure)

    return wrapper  # type: ignore[return-value]


def reports_stream_errors(method: StreamHandler) -> StreamHandler:
    """reports_errors for a method that answers with a stream (an async generator): a refused
    call ends with the same status and ErrorInfo as its unary twin."""

    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: Context) -> AsyncIterator[Any]:
        try:
            if isinstance(request, Undecodable):
                raise request.error
            async for message in method(self, request, context):
                yield message
            return
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            failure = as_lambda_error(method.__name__, exc)
        await _abort(context, failure)

    return wrapper  # type: ignore[return-value]


def as_lambda_error(method: str, exc: Exception) -> errors.LambdaError:
    """Our error as it is, logged; anything unexpected as an INTERNAL one (both front doors)."""
    if isinstance(exc, errors.LambdaError):
        level = (
            logging.WARNING
            if isinstance(exc, errors.Unavailable | errors.RuntimeBusy | errors.InternalError)
            else logging.DEBUG
        )
        log.log(level, "%s failed: %s", method, exc.message)
        return exc
    log.error("unexpected error in %s", method, exc_info=exc)
    return errors.InternalError(f"internal error: {type(exc).__name__}")


async def _abort(context: Context, failure: errors.LambdaError) -> None:
    status = to_status(failure)
    # what the handler set (rate-limit headers) goes out with the error's details
    kept = tuple((key, value) for key, value in context.trailing_metadata() or () if key != _DETAILS_KEY)
    await context.abort(status.code, status.details, tuple(status.trailing_metadata) + kept)
