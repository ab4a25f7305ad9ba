"""Values passed between the layers: sessions, deadlines, execution outcomes."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

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


class SessionStatus(enum.Enum):
    ACTIVE = "active"
    EXPIRED = "expired"


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


@dataclass(frozen=True)
class ClaimedSession:
    """A session found active and counted by Execute's single statement."""

    request_id: str
    language_title: str
    user_id: str | None
    script_hash: str
    context: dict[str, JSON]


@dataclass(frozen=True)
class Limits:
    """What one environment may use."""

    memory_mb: int
    max_processes: int


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


@dataclass(frozen=True)
class ExecutionResult:
    """An execution as the caller sees it."""

    request_id: str
    language_title: str
    outcome: ExecutionOutcome


@dataclass(frozen=True)
class HealthReport:
    serving: bool
    version: str
    components: dict[str, str]
