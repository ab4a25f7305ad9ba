"""Errors raised by the client: a class per gRPC status code, and under it a class per ErrorInfo reason.

LambdaError
├── InvalidArgumentError            INVALID_ARGUMENT    (reason INVALID_REQUEST)
│   ├── InvalidParamsError                              INVALID_PARAMS
│   ├── ScriptLimitExceededError                        SCRIPT_LIMIT_EXCEEDED
│   ├── DependencyUnresolvableError                     DEPENDENCY_UNRESOLVABLE
│   ├── DependencyNotAllowedError                       DEPENDENCY_NOT_ALLOWED
│   └── DependencyLimitExceededError                    DEPENDENCY_LIMIT_EXCEEDED
├── NotFoundError                   NOT_FOUND           (reason NOT_FOUND: no such session or function)
│   └── SessionExpiredError                             SESSION_EXPIRED
├── AlreadyExistsError              ALREADY_EXISTS
│   └── SessionConflictError                            SESSION_CONFLICT
├── FailedPreconditionError         FAILED_PRECONDITION
│   └── RuntimeNotAvailableError                        RUNTIME_NOT_AVAILABLE
├── UnauthenticatedError            UNAUTHENTICATED     (reason UNAUTHORIZED)
├── PermissionDeniedError           PERMISSION_DENIED   (reason FORBIDDEN)
├── ResourceExhaustedError          RESOURCE_EXHAUSTED
│   ├── RateLimitedError                                RATE_LIMITED (retry_after)
│   ├── QuotaExceededError                              QUOTA_EXCEEDED (retry_after)
│   └── RuntimeBusyError                                RUNTIME_BUSY
├── UnavailableError                UNAVAILABLE         (reason UNAVAILABLE: the work may have begun)
│   ├── NotStartedError                                 NOT_STARTED (safe to retry, Execute included)
│   ├── PackageIndexUnavailableError                    PACKAGE_INDEX_UNAVAILABLE (safe to retry)
│   └── SandboxUnavailableError                         SANDBOX_UNAVAILABLE
├── DeadlineExceededError           DEADLINE_EXCEEDED
├── UnimplementedError              UNIMPLEMENTED
├── CancelledError                  CANCELLED
└── InternalError                   INTERNAL (reason INTERNAL_ERROR), UNKNOWN and anything else

Branch on the class: `except SessionExpiredError` for one reason, `except NotFoundError`
for every failure of that status. Each error carries `code` (the grpc.StatusCode),
`reason` (the ErrorInfo reason, "" when the status had none), `metadata` and
`retry_after`. A reason this client does not know yet is raised as its status's class.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import grpc
from google.protobuf import any_pb2
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

#: the ErrorInfo domain of the service's errors
DOMAIN = "lambda-microservice"


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
    """The request is malformed (reason INVALID_REQUEST; a script that does not compile
    has `line` and `column` in `metadata`)."""


class InvalidParamsError(InvalidArgumentError):
    """Execute's params do not match the catalog function's schema."""


class ScriptLimitExceededError(InvalidArgumentError):
    """Checking or compiling the script went past a limit (time, memory, program size)."""


class DependencyUnresolvableError(InvalidArgumentError):
    """A dependency has no such package, no wheel for this platform, or conflicts
    (metadata `requirement`)."""


class DependencyNotAllowedError(InvalidArgumentError):
    """The server's DEPENDENCIES policy refuses a dependency (metadata `setting`, `requirement`)."""


class DependencyLimitExceededError(InvalidArgumentError):
    """Resolving or installing the dependencies went past a limit (metadata `setting`)."""


class NotFoundError(LambdaError):
    """No such session (also another user's) or function (reason NOT_FOUND)."""


class SessionExpiredError(NotFoundError):
    """The session exists but has expired: Initialize a new one."""


class AlreadyExistsError(LambdaError):
    """Something with this id exists already."""


class SessionConflictError(AlreadyExistsError):
    """A session with this request_id exists with another script."""


class FailedPreconditionError(LambdaError):
    """The request cannot be served by this server as configured."""


class RuntimeNotAvailableError(FailedPreconditionError):
    """The language is known, but its runtime is not available on this server."""


class UnauthenticatedError(LambdaError):
    """No valid credentials were sent (reason UNAUTHORIZED)."""


class PermissionDeniedError(LambdaError):
    """The credentials do not allow this call (reason FORBIDDEN)."""


class ResourceExhaustedError(LambdaError):
    """A limit was reached; retry later."""


class RateLimitedError(ResourceExhaustedError):
    """The caller's rate limit; `retry_after` says when to retry."""


class QuotaExceededError(ResourceExhaustedError):
    """An owner's share (sessions, script bytes, checkers, compilers, request bytes) is used
    up; `retry_after` says when to retry."""


class RuntimeBusyError(ResourceExhaustedError):
    """Every environment for the script stayed busy: the service is at its capacity."""


class UnavailableError(LambdaError):
    """The service or its database cannot serve now (reason UNAVAILABLE). The call may
    have done its work: the client retries it only where that is safe."""


class NotStartedError(UnavailableError):
    """The call failed before its work began (an Execute's script did not run): safe to
    retry, and the client retries Execute on it within the call's deadline."""


class PackageIndexUnavailableError(UnavailableError):
    """The server's package index did not answer; nothing was stored: safe to retry."""


class SandboxUnavailableError(UnavailableError):
    """The server's sandbox cannot start an environment as its SANDBOX_MODE asks."""


class DeadlineExceededError(LambdaError):
    """The call's deadline passed."""


class UnimplementedError(LambdaError):
    """The server does not implement this call."""


class CancelledError(LambdaError):
    """The call was cancelled."""


class InternalError(LambdaError):
    """The server failed unexpectedly (reason INTERNAL_ERROR)."""


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
    grpc.StatusCode.INTERNAL: InternalError,
}

# The reasons that name a narrower failure than their status (the contract's ErrorReason,
# without its prefix); the others (INVALID_REQUEST, NOT_FOUND, UNAVAILABLE, ...) are
# their status's class.
ERRORS_BY_REASON: dict[str, type[LambdaError]] = {
    "INVALID_PARAMS": InvalidParamsError,
    "SCRIPT_LIMIT_EXCEEDED": ScriptLimitExceededError,
    "DEPENDENCY_UNRESOLVABLE": DependencyUnresolvableError,
    "DEPENDENCY_NOT_ALLOWED": DependencyNotAllowedError,
    "DEPENDENCY_LIMIT_EXCEEDED": DependencyLimitExceededError,
    "SESSION_EXPIRED": SessionExpiredError,
    "SESSION_CONFLICT": SessionConflictError,
    "RUNTIME_NOT_AVAILABLE": RuntimeNotAvailableError,
    "RATE_LIMITED": RateLimitedError,
    "QUOTA_EXCEEDED": QuotaExceededError,
    "RUNTIME_BUSY": RuntimeBusyError,
    "NOT_STARTED": NotStartedError,
    "PACKAGE_INDEX_UNAVAILABLE": PackageIndexUnavailableError,
    "SANDBOX_UNAVAILABLE": SandboxUnavailableError,
}


def error_class(code: grpc.StatusCode, reason: str) -> type[LambdaError]:
    """The class for a status and reason: the reason's, when it belongs under the status
    (a reason sent with another status, by a server of another version, is not trusted
    over the status), else the status's."""
    by_code = ERRORS_BY_CODE.get(code, InternalError)
    by_reason = ERRORS_BY_REASON.get(reason)
    return by_reason if by_reason is not None and issubclass(by_reason, by_code) else by_code


def from_rpc_error(error: grpc.RpcError) -> LambdaError:
    """The LambdaError for a failed call, with the reason and retry delay of its details."""
    call: grpc.Call = error  # type: ignore[assignment]  # every RpcError of a call is its Call too
    code = call.code()
    return _error(code, call.details() or "", _details(call))


def from_status(status: status_pb2.Status) -> LambdaError:
    """The LambdaError a google.rpc.Status stands for: an ExecuteBatch item's `status` (the
    item did not run), as the call would have raised it."""
    code = next((c for c in grpc.StatusCode if c.value[0] == status.code), grpc.StatusCode.UNKNOWN)
    return _error(code, status.message, status.details)


def _error(code: grpc.StatusCode, message: str, details: Iterable[any_pb2.Any]) -> LambdaError:
    """The error of a status: its reason and metadata from an ErrorInfo, its delay from a RetryInfo."""
    reason, metadata = "", {}
    retry_after: float | None = None
    for detail in details:
        info = error_details_pb2.ErrorInfo()
        retry = error_details_pb2.RetryInfo()
        if detail.Unpack(info):
            reason, metadata = info.reason, dict(info.metadata)
        elif detail.Unpack(retry):
            retry_after = retry.retry_delay.ToNanoseconds() / 1e9
    return error_class(code, reason)(code, message, reason, metadata, retry_after)


def _details(call: grpc.Call) -> list[any_pb2.Any]:
    """The status's details (google.protobuf.Any), or none: a status without them (from a
    proxy, or gRPC itself), or with details that do not match or decode, is its code alone."""
    try:
        status: status_pb2.Status | None = rpc_status.from_call(call)
    except (ValueError, DecodeError):
        return []
    return list(status.details) if status is not None else []
