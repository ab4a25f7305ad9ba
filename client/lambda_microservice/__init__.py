"""The lambda-microservice client: `LambdaClient`, `AsyncLambdaClient` and their errors."""

from __future__ import annotations

from lambda_microservice.client import (
    AsyncLambdaClient,
    LambdaClient,
    to_python,
    to_struct,
)
from lambda_microservice.errors import (
    AlreadyExistsError,
    DeadlineExceededError,
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    LambdaError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
    UnimplementedError,
)

__all__ = [
    "AlreadyExistsError",
    "AsyncLambdaClient",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "InternalError",
    "InvalidArgumentError",
    "LambdaClient",
    "LambdaError",
    "NotFoundError",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "UnauthenticatedError",
    "UnavailableError",
    "UnimplementedError",
    "to_python",
    "to_struct",
]
