"""Errors raised by the client: one class per gRPC status code, carrying the ErrorInfo reason.

LambdaError
├── InvalidArgumentError        INVALID_ARGUMENT
├── NotFoundError               NOT_FOUND (reason NOT_FOUND or SESSION_EXPIRED)
├── AlreadyExistsError          ALREADY_EXISTS
├── FailedPreconditionError     FAILED_PRECONDITION
├── UnauthenticatedError        UNAUTHENTICATED
├── PermissionDeniedError       PERMISSION_DENIED
├── ResourceExhaustedError      RESOURCE_EXHAUSTED
├── UnavailableError            UNAVAILABLE
├── DeadlineExceededError       DEADLINE_EXCEEDED
├── UnimplementedError          UNIMPLEMENTED
├── CancelledError              CANCELLED
└── InternalError               INTERNAL, UNKNOWN and anything else
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import grpc
from google.rpc import error_details_pb2, status_pb2

STATUS_DETAILS_KEY = "grpc-status-details-bin"


class LambdaError(Exception):
    """A call failed. `code` is the gRPC status code, `reason` the ErrorInfo reason."""

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        reason: str = "",
        metadata: Mapping[str, str] | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(f"{code.name}: {message}" + (f" [{reason}]" if reason else ""))
        self.code = code
        self.message = message
        self.reason = reason
        self.metadata: dict[str, str] = dict(metadata or {})
        #: seconds after which a retry may succeed (google.rpc.RetryInfo), e.g. when RATE_LIMITED
        self.retry_after = retry_after


class InvalidArgumentError(LambdaError):
    """The request is malformed (reason INVALID_REQUEST or INVALID_PARAMS)."""


class NotFoundError(LambdaError):
    """No such session (reason NOT_FOUND), or it expired (reason SESSION_EXPIRED)."""


class AlreadyExistsError(LambdaError):
    """A session with this request_id exists with another script."""


class FailedPreconditionError(LambdaError):
    """The request cannot be served by this server as configured."""


class UnauthenticatedError(LambdaError):
    """No valid credentials were sent."""


class PermissionDeniedError(LambdaError):
    """The credentials do not allow this call."""


class ResourceExhaustedError(LambdaError):
    """A limit was reached (rate limit, busy environments); retry later."""


class UnavailableError(LambdaError):
    """The service or its database cannot serve now; retry later."""


class DeadlineExceededError(LambdaError):
    """The call's deadline passed."""


class UnimplementedError(LambdaError):
    """The server does not implement this call."""


class CancelledError(LambdaError):
    """The call was cancelled."""


class InternalError(LambdaError):
    """The server failed unexpectedly."""


ERRORS_BY_CODE: dict[grpc.StatusCode, type[LambdaError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExistsError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.UNIMPLEMENTED: UnimplementedError,
    grpc.StatusCode.CANCELLED: CancelledError,
}


def from_rpc_error(error: grpc.RpcError) -> LambdaError:
    """The LambdaError for a failed call, with the reason from its ErrorInfo detail."""
    code = error.code()
    message = error.details() or ""
    reason, metadata = "", {}
    retry_after: float | None = None
    trailing: Any = error.trailing_metadata()
    for key, value in trailing or ():
        if key == STATUS_DETAILS_KEY and isinstance(value, bytes):
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                info = error_details_pb2.ErrorInfo()
                retry = error_details_pb2.RetryInfo()
                if detail.Unpack(info):
                    reason, metadata = info.reason, dict(info.metadata)
                elif detail.Unpack(retry):
                    retry_after = retry.retry_delay.ToNanoseconds() / 1e9
    return ERRORS_BY_CODE.get(code, InternalError)(code, message, reason, metadata, retry_after)
