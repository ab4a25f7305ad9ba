"""The service's errors, one class per kind of failure.

    LambdaError                     (reason)
    ├── InvalidRequest              INVALID_REQUEST
    │   ├── UnknownLanguage
    │   ├── ScriptTooLarge
    │   ├── ScriptSyntaxError       (line, column)
    │   ├── InvalidParams           INVALID_PARAMS    (params against the function's schema)
    │   └── ScriptLimitExceeded     SCRIPT_LIMIT_EXCEEDED (a check or compile past its limits)
    ├── SessionConflict             INVALID_REQUEST   (same request_id, other script)
    ├── RuntimeNotAvailable         UNAVAILABLE       (known language, runtime missing)
    ├── Unauthenticated             UNAUTHORIZED      (no token, or a bad one)
    ├── Forbidden                   FORBIDDEN         (a scope is missing)
    ├── RateLimited                 RATE_LIMITED      (retry_after seconds)
    ├── QuotaExceeded               QUOTA_EXCEEDED    (an owner's share is used up; retry_after)
    ├── SessionNotFound             NOT_FOUND         (also another user's session)
    │   └── SessionExpired          SESSION_EXPIRED
    ├── FunctionNotFound            NOT_FOUND
    ├── Unavailable                 UNAVAILABLE
    │   ├── DatabaseUnavailable
    │   └── RuntimeBusy
    ├── DeadlineExceeded            UNAVAILABLE
    └── InternalError               INTERNAL_ERROR

The api layer maps each class to a gRPC status code; nothing here knows gRPC.
A script's own failure is not an error of this tree: it is an ExecutionOutcome.
"""

from __future__ import annotations


class LambdaError(Exception):
    """Base of every error the service reports to a caller."""

    reason = "INTERNAL_ERROR"

    def __init__(self, message: str, **metadata: str) -> None:
        super().__init__(message)
        self.message = message
        self.metadata = metadata


class InvalidRequest(LambdaError):
    """The request is malformed."""

    reason = "INVALID_REQUEST"


class UnknownLanguage(InvalidRequest):
    """`language_title` is missing or matches no runtime."""


class ScriptTooLarge(InvalidRequest):
    """The script is larger than MAX_SCRIPT_SIZE."""


class ScriptSyntaxError(InvalidRequest):
    """The script does not compile."""

    def __init__(self, message: str, line: int, column: int) -> None:
        super().__init__(f"{message} (line {line}, column {column})", line=str(line), column=str(column))
        self.line = line
        self.column = column


class ScriptLimitExceeded(InvalidRequest):
    """The script could not be checked or compiled within its limits (time, memory, size):
    the script's fault, not the service's."""

    reason = "SCRIPT_LIMIT_EXCEEDED"


class InvalidParams(InvalidRequest):
    """Execute's params do not match the function's JSON schema."""

    reason = "INVALID_PARAMS"


class SessionConflict(InvalidRequest):
    """A session with this request_id exists with another script."""


class RuntimeNotAvailable(LambdaError):
    """The language is known but its runtime is not available here."""

    reason = "UNAVAILABLE"


class Unauthenticated(LambdaError):
    """The call carries no valid credentials."""

    reason = "UNAUTHORIZED"


class Forbidden(LambdaError):
    """The caller is known but lacks the scope this call needs."""

    reason = "FORBIDDEN"


class RateLimited(LambdaError):
    """The caller used up its executions for now; retry after `retry_after` seconds."""

    reason = "RATE_LIMITED"

    def __init__(self, message: str, retry_after: float, **metadata: str) -> None:
        super().__init__(message, **metadata)
        self.retry_after = retry_after


class QuotaExceeded(LambdaError):
    """The owner used up a share (sessions, script bytes, Initialize rate, compile slots,
    request bytes in flight); retry after `retry_after` seconds."""

    reason = "QUOTA_EXCEEDED"

    def __init__(self, message: str, retry_after: float, **metadata: str) -> None:
        super().__init__(message, **metadata)
        self.retry_after = retry_after


class SessionNotFound(LambdaError):
    """No session has this request_id."""

    reason = "NOT_FOUND"


class SessionExpired(SessionNotFound):
    """The session exists but has expired (by the database clock)."""

    reason = "SESSION_EXPIRED"


class FunctionNotFound(LambdaError):
    """No function of the catalog has this language_title."""

    reason = "NOT_FOUND"


class Unavailable(LambdaError):
    """A dependency cannot serve now; retrying later may succeed."""

    reason = "UNAVAILABLE"


class DatabaseUnavailable(Unavailable):
    """PostgreSQL did not answer within its bound."""


class RuntimeBusy(Unavailable):
    """Every environment for this script stayed busy until the deadline."""


class DeadlineExceeded(LambdaError):
    """The call's deadline passed before the work could finish."""

    reason = "UNAVAILABLE"


class InternalError(LambdaError):
    """A bug: something that should not happen did."""


def copy_of(error: LambdaError) -> LambdaError:
    """A new instance of `error`: same class, message and metadata, for one of the callers
    that waited on shared work which failed. Raising one instance in many tasks would chain
    their tracebacks and contexts into each other's."""
    copy = type(error).__new__(type(error))
    Exception.__init__(copy, *error.args)
    copy.__dict__.update(error.__dict__)
    copy.metadata = dict(error.metadata)
    return copy
