"""Values passed between the layers: sessions, options, jobs, deadlines, outcomes, health."""

from __future__ import annotations

import enum
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

# Any JSON value: what params, contexts and results are.
JSON = Any


@dataclass(frozen=True)
class Deadline:
    """A point on the monotonic clock by which a call must be done."""

    at: float | None

    @classmethod
    def after(cls, seconds: float | None) -> Deadline:
        return cls(None if seconds is None else time.monotonic() + seconds)

    def remaining(self) -> float | None:
        return None if self.at is None else self.at - time.monotonic()

    def cap(self, seconds: float) -> float:
        """`seconds`, or less when the deadline comes sooner (never below 0)."""
        remaining = self.remaining()
        return seconds if remaining is None else max(0.0, min(seconds, remaining))


@dataclass(frozen=True)
class Caller:
    """Who makes a call: a JWT's subject and scopes, or anonymous (AUTH_MODE=none).

    `address` is the peer's address, what anonymous callers are counted by.
    """

    user_id: str | None
    scopes: frozenset[str]
    address: str = ""

    @property
    def anonymous(self) -> bool:
        return self.user_id is None

    @property
    def owner(self) -> str:
        """Whom the resources this call uses are billed to: the user, else the address."""
        return f"user:{self.user_id}" if self.user_id is not None else f"address:{self.address}"


class SessionStatus(enum.Enum):
    ACTIVE = "active"
    EXPIRED = "expired"


class CompileStatus(enum.Enum):
    """meta.sessions.compile_status: a Rust script is pending until rustc has answered."""

    PENDING = "pending"
    SUCCESS = "success"
    ERROR = "error"


class OptimizationLevel(enum.Enum):
    """How a compiled runtime (Rust) compiles a script; the value is what meta.sessions
    and meta.artifacts store."""

    DEBUG = "debug"
    RELEASE = "release"


@dataclass(frozen=True)
class Limits:
    """What one environment may use."""

    memory_mb: int
    max_processes: int


@dataclass(frozen=True)
class RequestedOptions:
    """A session's options as Initialize's caller set them: None where unset, which the
    session's context (the original service's keys), else the server's default, fills."""

    timeout_seconds: float | None = None
    memory_mb: int | None = None
    max_processes: int | None = None
    cache_ttl_seconds: float | None = None


@dataclass(frozen=True)
class SessionOptions:
    """How every execution of a session runs: resolved once at Initialize (defaults filled
    in, bounds checked) and stored with the session."""

    timeout_seconds: float
    memory_mb: int
    max_processes: int
    cache_ttl_seconds: float  # the result cache's default for the session; 0: off

    @property
    def limits(self) -> Limits:
        return Limits(self.memory_mb, self.max_processes)


@dataclass(frozen=True)
class LockedPackage:
    """One package of a resolved lock: its name (normalized as its index spells it), the
    exact version, and the archive's hash (`sha256:<hex>` for a Python wheel)."""

    name: str
    version: str
    hash: str


@dataclass(frozen=True)
class SessionDependencies:
    """What a session asked for and what it resolved to, stored with it (meta.sessions.dependencies):
    the lock's text is what any replica installs its layer from."""

    requirements: tuple[str, ...]
    runtime: str
    layer_id: str
    lock: str
    packages: tuple[LockedPackage, ...]


@dataclass(frozen=True)
class SessionRecord:
    """A session as stored, with its state decided by the database clock."""

    request_id: str
    language_title: str
    user_id: str | None
    status: SessionStatus
    created_at: datetime
    expires_at: datetime
    last_executed_at: datetime | None
    execution_count: int
    script_hash: str
    context: dict[str, JSON]
    # None for a session stored before options had a column of their own (0007): its
    # options are its context's keys
    options: SessionOptions | None = None
    # None for a runtime that does not compile (the column says 'success' for a checked one)
    compile_status: CompileStatus | None = None
    compile_error: str | None = None
    dependencies: SessionDependencies | None = None  # None: it asked for none


@dataclass(frozen=True)
class NewSession:
    """What Initialize stores."""

    request_id: str
    language_title: str
    user_id: str | None
    context: dict[str, JSON]
    script_content: str
    script_hash: str
    expiry_seconds: int
    # Stored in meta.sessions.options; None (a tool's or test's session) is read back
    # from the context's keys, like a session stored before the column
    options: SessionOptions | None = None
    # Stored in meta.sessions.metadata: where the script came from (a catalog
    # function) and the JSON schema its params must match. None for a script sent in.
    metadata: dict[str, JSON] | None = None
    # meta.sessions.compile_status and compile_options: a compiled runtime's script
    # is stored pending, before it compiles, with its level; a checked one is stored compiled
    compile_status: CompileStatus = CompileStatus.SUCCESS
    optimization: OptimizationLevel | None = None
    # Caller.owner, whose session quotas it counts against; None for a session stored
    # by a tool or test directly, which no quota counts
    owner: str | None = None
    dependencies: SessionDependencies | None = None  # meta.sessions.dependencies


@dataclass(frozen=True)
class ClaimedSession:
    """A session found active and counted by Execute's single statement."""

    request_id: str
    language_title: str
    user_id: str | None
    script_hash: str
    context: dict[str, JSON]
    metadata: dict[str, JSON] | None = None  # as given in NewSession.metadata
    optimization: OptimizationLevel | None = None  # a compiled runtime's (NewSession's)
    options: SessionOptions | None = None  # None: stored before 0007 (see SessionRecord)
    # how its compile last ended (None: a checked runtime's session of before compile
    # statuses); an Execute of one not yet `success` records how its own compile ends
    compile_status: CompileStatus | None = None
    layer_id: str | None = None  # its dependencies' layer (meta.sessions.dependencies), if any


@dataclass(frozen=True)
class Job:
    """One execution to run: the use case's order to the runtimes."""

    runtime: str  # the runtime's name (RuntimeSpec.name)
    owner: str  # whom its environment is billed to
    script_hash: str  # with owner and runtime, which environments may run it
    script: str
    event: dict[str, JSON]
    timeout: float  # seconds
    limits: Limits
    program: str | None = None  # a compiled runtime's program for the script (Rust)
    layer: str | None = None  # the folder of the session's installed dependencies, if any


@dataclass(frozen=True)
class BatchJob:
    """A batch's items to run, each as `job` with the item's event (job.event is unused)."""

    job: Job
    events: tuple[dict[str, JSON], ...]  # every item's event, by its index in the batch
    indices: tuple[int, ...]  # the items to run; the others were answered without running
    # what the items that run may add to the answer, in bytes (answer_size); None: no bound
    answer_bytes: int | None = None


@dataclass(frozen=True)
class BatchOutcome:
    """Each item's outcome, by index (None: it did not start, or was not to run), and, for
    an item that did not start for another reason than the batch's deadline, why: a
    LambdaError (errors.py; domain imports nothing of the package)."""

    outcomes: list[ExecutionOutcome | None]
    unstarted: dict[int, Exception] = field(default_factory=dict)


class FailureCode(enum.Enum):
    RUNTIME_ERROR = "RUNTIME_ERROR"
    TIMEOUT = "TIMEOUT"
    MEMORY_LIMIT = "MEMORY_LIMIT"
    OUTPUT_LIMIT = "OUTPUT_LIMIT"
    INVALID_RESULT = "INVALID_RESULT"


@dataclass(frozen=True)
class ExecutionFailure:
    """A script's own failure: reported to the caller in an OK response."""

    code: FailureCode
    message: str
    line: int = 0
    column: int = 0
    stack_trace: str = ""


class EnvironmentState(enum.Enum):
    """How an execution found its environment."""

    WARM = "warm"  # bound to this script already
    PREWARMED = "prewarmed"  # a pre-started process, bound now
    COLD = "cold"  # a process started for this execution


@dataclass(frozen=True)
class ExecutionOutcome:
    """What one execution produced."""

    result: JSON
    failure: ExecutionFailure | None
    duration: float
    logs: str
    environment: EnvironmentState | None = None
    cpu_time: float = 0.0
    peak_memory: int = 0
    result_json: str = ""  # the result's JSON text as the script's runtime wrote it (exact)
    logs_truncated: bool = False  # the console output went past MAX_LOG_BYTES: `logs` is cut


def answer_size(outcome: ExecutionOutcome) -> int:
    """About what an outcome's payload adds to an answer, in bytes: result_json twice (the
    answer carries it as the `result` Value too), the logs, the failure's texts."""
    size = 2 * len(outcome.result_json.encode()) + len(outcome.logs.encode())
    if outcome.failure is not None:
        size += len(outcome.failure.message.encode()) + len(outcome.failure.stack_trace.encode())
    return size


@dataclass(frozen=True)
class OutputChunk:
    """A piece of an execution's console output, as the script wrote it."""

    stream: str  # "stdout" or "stderr"
    text: str
    offset: int  # its first byte's offset (UTF-8) within the execution's console output


class OutputSink(Protocol):
    """Where an execution's console output goes as the script writes it (ExecuteStream):
    each chunk with its stream ("stdout" or "stderr") and its byte offset (UTF-8) within
    the execution's console output. Called on the event loop; it must not block."""

    def __call__(self, stream: str, text: str, offset: int) -> None: ...


@dataclass(frozen=True)
class ExecutionResult:
    """An execution as the caller sees it."""

    request_id: str
    language_title: str
    outcome: ExecutionOutcome
    cached: bool = False


class ComponentStatus(enum.Enum):
    OK = "ok"
    DEGRADED = "degraded"  # works, with less than it could (a sandbox layer missing)
    UNAVAILABLE = "unavailable"


@dataclass(frozen=True)
class ComponentHealth:
    """One component's state: `detail` for people, `counts` for programs."""

    name: str
    status: ComponentStatus
    detail: str
    required: bool = False  # the service is NOT_SERVING while it is UNAVAILABLE
    counts: Mapping[str, int] = field(default_factory=dict)
    packages: tuple[str, ...] = ()  # `name version`: what its scripts may use without asking


@dataclass(frozen=True)
class HealthReport:
    serving: bool
    version: str
    components: tuple[ComponentHealth, ...]  # ordered by name

    def text(self) -> dict[str, str]:
        """Each component's detail by name: the human form."""
        return {component.name: component.detail for component in self.components}


@dataclass(frozen=True)
class ErrorLogEntry:
    """Why a logged call failed: an ExecutionError code, or a refused call's ErrorInfo reason."""

    code: str
    message: str
    stack_trace: str = ""
    context: dict[str, JSON] | None = None


@dataclass(frozen=True)
class RequestLogEntry:
    """One answered Execute or ExecuteBatch, as public.request_logs (and error_logs) keep it.

    `status_code` is the HTTP equivalent of the gRPC status, 500 for a script
    that failed in an OK answer; `size` estimates the bytes the entry holds, so
    that the writer's queue is bounded in bytes as well as in entries.
    """

    request_id: str | None
    language_title: str
    timestamp: datetime
    client_ip: str | None
    user_id: str | None
    request_headers: dict[str, str]
    request_payload: JSON
    response_payload: JSON
    status_code: int
    grpc_code: str
    duration_ms: int
    cached: bool
    error_details: dict[str, JSON] | None
    runtime_metrics: dict[str, JSON] | None
    error: ErrorLogEntry | None
    size: int = 0
    items: int | None = None  # an ExecuteBatch's items (one row per batch); None for an Execute


class FunctionType(enum.Enum):
    """A catalog function shipped with the service, or one registered at run time."""

    PREDEFINED = "predefined"
    DYNAMIC = "dynamic"


@dataclass(frozen=True)
class FunctionDefinition:
    """A registered function of the catalog (meta.functions)."""

    id: str
    language_title: str
    language: str
    title: str
    description: str
    function_type: FunctionType
    params_schema: dict[str, JSON] | None  # the JSON schema Execute's params must match
    result_schema: dict[str, JSON] | None
    examples: list[JSON]
    tags: tuple[str, ...]
    version: str
    created_at: datetime
    updated_at: datetime
    script: str | None = None  # filled when asked for (GetFunction of a dynamic function, Initialize)
    available: bool = True  # whether this server has the function's runtime


@dataclass(frozen=True)
class FunctionPage:
    """One page of the catalog; `next_page_token` is empty on the last page."""

    functions: list[FunctionDefinition]
    next_page_token: str
