"""The service's errors, one class per kind of failure, each with its gRPC status and reason.

    LambdaError                     status               reason
    ├── InvalidRequest              INVALID_ARGUMENT     INVALID_REQUEST
    │   ├── UnknownLanguage
    │   ├── ScriptTooLarge
    │   ├── ScriptSyntaxError       (line, column)
    │   ├── RequestTooLarge         (an HTTP body past GRPC_MAX_RECEIVE_MESSAGE_BYTES: HTTP 413)
    │   ├── BodyTimeout             (an HTTP body not sent within HTTP_BODY_TIMEOUT_SECONDS: HTTP 408)
    │   ├── InvalidParams           INVALID_ARGUMENT     INVALID_PARAMS (params against the schema)
    │   ├── ScriptLimitExceeded     INVALID_ARGUMENT     SCRIPT_LIMIT_EXCEEDED (a check or compile)
    │   ├── DependencyUnresolvable  INVALID_ARGUMENT     DEPENDENCY_UNRESOLVABLE (requirement)
    │   ├── DependencyNotAllowed    INVALID_ARGUMENT     DEPENDENCY_NOT_ALLOWED (setting, requirement)
    │   └── DependencyLimitExceeded INVALID_ARGUMENT     DEPENDENCY_LIMIT_EXCEEDED (setting)
    ├── SessionConflict             ALREADY_EXISTS       SESSION_CONFLICT (same request_id, other script)
    ├── RuntimeNotAvailable         FAILED_PRECONDITION  RUNTIME_NOT_AVAILABLE (known language, no runtime)
    ├── Unauthenticated             UNAUTHENTICATED      UNAUTHORIZED (no token, or a bad one)
    ├── Forbidden                   PERMISSION_DENIED    FORBIDDEN (a scope is missing)
    ├── RateLimited                 RESOURCE_EXHAUSTED   RATE_LIMITED (retry_after seconds)
    ├── QuotaExceeded               RESOURCE_EXHAUSTED   QUOTA_EXCEEDED (an owner's share; retry_after)
    ├── RuntimeBusy                 RESOURCE_EXHAUSTED   RUNTIME_BUSY (every environment stayed busy)
    ├── AnswerFull                  RESOURCE_EXHAUSTED   QUOTA_EXCEEDED (an ExecuteBatch's answer is full)
    ├── SessionNotFound             NOT_FOUND            NOT_FOUND (also another user's session)
    │   └── SessionExpired          NOT_FOUND            SESSION_EXPIRED
    ├── FunctionNotFound            NOT_FOUND            NOT_FOUND
    ├── RouteNotFound               NOT_FOUND            NOT_FOUND (the HTTP API has no such route)
    ├── Unavailable                 UNAVAILABLE          UNAVAILABLE (the work may have begun)
    │   ├── DatabaseUnavailable
    │   ├── NotStarted              UNAVAILABLE          NOT_STARTED (the work did not begin)
    │   ├── PackageIndexUnavailable UNAVAILABLE          PACKAGE_INDEX_UNAVAILABLE (nothing stored)
    │   └── SandboxUnavailable      UNAVAILABLE          SANDBOX_UNAVAILABLE (SANDBOX_MODE asks too much)
    ├── DeadlineExceeded            DEADLINE_EXCEEDED    DEADLINE_EXCEEDED
    │   └── NotStartedByDeadline    (an ExecuteBatch item the batch's deadline left unstarted)
    └── InternalError               INTERNAL             INTERNAL_ERROR

This is the one table: each class carries its row as `status` (a gRPC status code's
name) and `reason` (an ErrorReason of the contract without its `ERROR_REASON_` prefix),
and a subclass without a row of its own answers with its parent's. A reason never
names a status other than its own, so a client that branches on the reason and one
that branches on the status agree. The api layer turns `status` into a gRPC code;
nothing here imports gRPC. A script's own failure is not an error of this tree: it is
an ExecutionOutcome.
"""

from __future__ import annotations


class LambdaError(Exception):
    """Base of every error the service reports to a caller."""

    status = "INTERNAL"
    reason = "INTERNAL_ERROR"

    def __init__(self, message: str, **metadata: str) -> None:
        super().__init__(message)
        self.message = message
        self.metadata = metadata


class InvalidRequest(LambdaError):
    """The request is malformed."""

    status = "INVALID_ARGUMENT"
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


class RequestTooLarge(InvalidRequest):
    """An HTTP/JSON API request's body is larger than a request may be
    (GRPC_MAX_RECEIVE_MESSAGE_BYTES, the gRPC side's bound too); the HTTP API answers 413."""


class BodyTimeout(InvalidRequest):
    """An HTTP/JSON API request's body did not arrive within HTTP_BODY_TIMEOUT_SECONDS (a
    client that stalls would hold its bytes in flight); the HTTP API answers 408."""


class ScriptLimitExceeded(InvalidRequest):
    """The script could not be checked or compiled within its limits (time, memory, size):
    the script's fault, not the service's."""

    reason = "SCRIPT_LIMIT_EXCEEDED"


class InvalidParams(InvalidRequest):
    """Execute's params do not match the function's JSON schema."""

    reason = "INVALID_PARAMS"


class DependencyUnresolvable(InvalidRequest):
    """A dependency cannot be resolved: no such package, no wheel for this platform, or a
    conflict; the message carries the resolver's words, `requirement` names it."""

    reason = "DEPENDENCY_UNRESOLVABLE"


class DependencyNotAllowed(InvalidRequest):
    """The DEPENDENCIES policy (or DEPENDENCY_ALLOWLIST) refuses a dependency."""

    reason = "DEPENDENCY_NOT_ALLOWED"


class DependencyLimitExceeded(InvalidRequest):
    """Resolving or installing dependencies went past a limit (time, bytes, count): `setting`."""

    reason = "DEPENDENCY_LIMIT_EXCEEDED"


class SessionConflict(LambdaError):
    """A session with this request_id exists with another script."""

    status = "ALREADY_EXISTS"
    reason = "SESSION_CONFLICT"


class RuntimeNotAvailable(LambdaError):
    """The language is known but its runtime is not available here."""

    status = "FAILED_PRECONDITION"
    reason = "RUNTIME_NOT_AVAILABLE"


class Unauthenticated(LambdaError):
    """The call carries no valid credentials."""

    status = "UNAUTHENTICATED"
    reason = "UNAUTHORIZED"


class Forbidden(LambdaError):
    """The caller is known but lacks the scope this call needs."""

    status = "PERMISSION_DENIED"
    reason = "FORBIDDEN"


class RateLimited(LambdaError):
    """The caller used up its executions for now; retry after `retry_after` seconds."""

    status = "RESOURCE_EXHAUSTED"
    reason = "RATE_LIMITED"

    def __init__(self, message: str, retry_after: float, **metadata: str) -> None:
        super().__init__(message, **metadata)
        self.retry_after = retry_after


class QuotaExceeded(LambdaError):
    """The owner used up a share (sessions, script bytes, Initialize rate, compile slots,
    request bytes in flight); retry after `retry_after` seconds."""

    status = "RESOURCE_EXHAUSTED"
    reason = "QUOTA_EXCEEDED"

    def __init__(self, message: str, retry_after: float, **metadata: str) -> None:
        super().__init__(message, **metadata)
        self.retry_after = retry_after


class RuntimeBusy(LambdaError):
    """Every environment for this script stayed busy until the queue's bound, or the
    environments' memory budget has no room: the service is at its capacity."""

    status = "RESOURCE_EXHAUSTED"
    reason = "RUNTIME_BUSY"


class AnswerFull(LambdaError):
    """An ExecuteBatch item that did not start because the batch's answer had no room left
    for it (GRPC_MAX_SEND_MESSAGE_BYTES): it did not run (the item's `status`)."""

    status = "RESOURCE_EXHAUSTED"
    reason = "QUOTA_EXCEEDED"


class SessionNotFound(LambdaError):
    """No session has this request_id."""

    status = "NOT_FOUND"
    reason = "NOT_FOUND"


class SessionExpired(SessionNotFound):
    """The session exists but has expired (by the database clock)."""

    reason = "SESSION_EXPIRED"


class FunctionNotFound(LambdaError):
    """No function of the catalog has this language_title."""

    status = "NOT_FOUND"
    reason = "NOT_FOUND"


class RouteNotFound(LambdaError):
    """The HTTP/JSON API has no route at this path (or not for this method)."""

    status = "NOT_FOUND"
    reason = "NOT_FOUND"


class Unavailable(LambdaError):
    """A dependency cannot serve now; retrying later may succeed. The call's work may
    have begun (an Execute's script may have run): retry only what is idempotent."""

    status = "UNAVAILABLE"
    reason = "UNAVAILABLE"


class DatabaseUnavailable(Unavailable):
    """PostgreSQL did not answer within its bound."""


class NotStarted(Unavailable):
    """A dependency could not serve before the call's work began (an Execute's script did
    not run): safe to retry, Execute included."""

    reason = "NOT_STARTED"


class PackageIndexUnavailable(Unavailable):
    """The package index did not answer; nothing was stored, a retry is safe."""

    reason = "PACKAGE_INDEX_UNAVAILABLE"


class SandboxUnavailable(Unavailable):
    """SANDBOX_MODE=strict and a layer cannot be applied on this machine."""

    reason = "SANDBOX_UNAVAILABLE"


class DeadlineExceeded(LambdaError):
    """The call's deadline passed before the work could finish."""

    status = "DEADLINE_EXCEEDED"
    reason = "DEADLINE_EXCEEDED"


class NotStartedByDeadline(DeadlineExceeded):
    """An ExecuteBatch item that had not started when the batch's deadline came: it did not
    run (the item's `status` in the answer; the call itself is answered)."""


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


def own_instance(error: BaseException) -> LambdaError:
    """A waiter's own instance of shared work's failure: a copy of our error, or an
    InternalError for anything else (a bug, logged where it happened)."""
    if isinstance(error, LambdaError):
        return copy_of(error)
    return InternalError(f"internal error: {type(error).__name__}")
