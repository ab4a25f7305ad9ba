"""The lambda-microservice client: `LambdaClient`, `AsyncLambdaClient` and their errors."""

from __future__ import annotations

from lambda_microservice.client import (
    EXECUTE_RETRY,
    NO_RETRY,
    AsyncLambdaClient,
    LambdaClient,
    RetryPolicy,
)
from lambda_microservice.errors import (
    AlreadyExistsError,
    CancelledError,
    DeadlineExceededError,
    DependencyLimitExceededError,
    DependencyNotAllowedError,
    DependencyUnresolvableError,
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    InvalidParamsError,
    LambdaError,
    NotFoundError,
    NotStartedError,
    PackageIndexUnavailableError,
    PermissionDeniedError,
    QuotaExceededError,
    RateLimitedError,
    ResourceExhaustedError,
    RuntimeBusyError,
    RuntimeNotAvailableError,
    SandboxUnavailableError,
    ScriptLimitExceededError,
    SessionConflictError,
    SessionExpiredError,
    UnauthenticatedError,
    UnavailableError,
    UnimplementedError,
)
from lambda_microservice.errors import from_status as _from_status
from lambda_microservice.v1 import lambda_service_pb2 as _pb
from lambda_microservice.values import execution_options, result, to_python, to_struct


def item_error(response: _pb.ExecuteResponse) -> LambdaError | None:
    """The error an ExecuteBatch item that did not run stands for (its `status`), or None
    when it ran (its script's own failure, if any, is `response.error`)."""
    return _from_status(response.status) if response.HasField("status") else None


__all__ = [
    "EXECUTE_RETRY",
    "NO_RETRY",
    "AlreadyExistsError",
    "AsyncLambdaClient",
    "CancelledError",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "InternalError",
    "InvalidArgumentError",
    "InvalidParamsError",
    "LambdaClient",
    "LambdaError",
    "NotFoundError",
    "NotStartedError",
    "PermissionDeniedError",
    "QuotaExceededError",
    "RateLimitedError",
    "ResourceExhaustedError",
    "RetryPolicy",
    "RuntimeBusyError",
    "RuntimeNotAvailableError",
    "SandboxUnavailableError",
    "ScriptLimitExceededError",
    "DependencyUnresolvableError",
    "DependencyNotAllowedError",
    "DependencyLimitExceededError",
    "PackageIndexUnavailableError",
    "SessionConflictError",
    "SessionExpiredError",
    "UnauthenticatedError",
    "UnavailableError",
    "UnimplementedError",
    "execution_options",
    "item_error",
    "result",
    "to_python",
    "to_struct",
]
