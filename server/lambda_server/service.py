"""The use cases: Initialize, Execute, GetSession and Health, free of gRPC and SQL."""

from __future__ import annotations

import hashlib
import uuid
from typing import Protocol

from lambda_server import __version__
from lambda_server.auth import require_execute
from lambda_server.config import Settings
from lambda_server.domain import (
    JSON,
    Caller,
    Deadline,
    ExecutionOutcome,
    ExecutionResult,
    HealthReport,
    Limits,
    NewSession,
    SessionRecord,
)
from lambda_server.errors import InvalidRequest, ScriptTooLarge
from lambda_server.runtimes.pool import Job
from lambda_server.runtimes.registry import RuntimeRegistry, RuntimeSpec
from lambda_server.store.sessions import SessionStore

ANONYMOUS = "anonymous"


class ExecutionEngine(Protocol):
    """The seam between the use cases and the runtimes."""

    async def check(self, runtime: RuntimeSpec, script: str, deadline: Deadline) -> None: ...

    async def execute(self, job: Job, deadline: Deadline) -> ExecutionOutcome: ...

    def status(self) -> dict[str, str]: ...


class DatabaseState(Protocol):
    """What Health needs to know about PostgreSQL; kept up to date by the app."""

    @property
    def ready(self) -> bool: ...

    @property
    def description(self) -> str: ...


class LambdaService:
    """Initialize, Execute, GetSession and Health."""

    def __init__(
        self,
        settings: Settings,
        sessions: SessionStore,
        engine: ExecutionEngine,
        registry: RuntimeRegistry,
        database: DatabaseState,
        sandbox_description: str,
    ) -> None:
        self._settings = settings
        self._sessions = sessions
        self._engine = engine
        self._registry = registry
        self._database = database
        self._sandbox_description = sandbox_description

    async def initialize(
        self,
        language_title: str,
        script: str,
        context: dict[str, JSON],
        request_id: str | None,
        caller: Caller,
        deadline: Deadline,
    ) -> SessionRecord:
        runtime = self._registry.resolve(language_title)
        require_execute(caller, runtime.name)
        size = len(script.encode())
        if size > self._settings.runtime.max_script_size:
            raise ScriptTooLarge(
                f"script_content is {size} bytes, over MAX_SCRIPT_SIZE "
                f"({self._settings.runtime.max_script_size})",
                size=str(size),
                limit=str(self._settings.runtime.max_script_size),
            )
        if not script.strip():
            raise InvalidRequest("script_content is required")
        self._timeout(context)  # reject bad limits now, not at every Execute
        self._limits(context)
        session_id = parse_request_id(request_id) if request_id else str(uuid.uuid4())
        await self._engine.check(runtime, script, deadline)
        new = NewSession(
            request_id=session_id,
            language_title=language_title,
            user_id=caller.user_id,
            context=context,
            script_content=script,
            script_hash=hashlib.sha256(script.encode()).hexdigest(),
            expiry_seconds=self._settings.session_expiry_seconds,
        )
        return await self._sessions.create(new, deadline)

    async def execute(
        self, request_id: str, params: dict[str, JSON], caller: Caller, deadline: Deadline
    ) -> ExecutionResult:
        session_id = parse_request_id(request_id)
        session = await self._sessions.claim(session_id, caller.user_id, deadline)
        runtime = self._registry.resolve(session.language_title)
        require_execute(caller, runtime.name)
        script = await self._sessions.script(session, deadline)
        job = Job(
            runtime=runtime,
            owner=session.user_id or ANONYMOUS,
            script_hash=session.script_hash,
            script=script,
            event={"params": params, "context": session.context, "request_id": session_id},
            timeout=self._timeout(session.context),
            limits=self._limits(session.context),
        )
        outcome = await self._engine.execute(job, deadline)
        return ExecutionResult(session_id, session.language_title, outcome)

    async def get_session(self, request_id: str, caller: Caller, deadline: Deadline) -> SessionRecord:
        return await self._sessions.get(parse_request_id(request_id), caller.user_id, deadline)

    def health(self) -> HealthReport:
        components = {"postgres": self._database.description, **self._engine.status()}
        components["sandbox"] = self._sandbox_description
        return HealthReport(self._database.ready, __version__, components)

    def _timeout(self, context: dict[str, JSON]) -> float:
        """The session's timeout: context.timeout_ms, else the default, capped by the maximum."""
        runtime = self._settings.runtime
        raw = context.get("timeout_ms")
        if raw is None:
            return min(runtime.timeout_seconds, runtime.max_timeout_seconds)
        if isinstance(raw, bool) or not isinstance(raw, int | float) or not 0 < raw < 2**53:
            raise InvalidRequest(f"context.timeout_ms must be a positive number of milliseconds, not {raw!r}")
        return min(raw / 1000.0, runtime.max_timeout_seconds)

    def _limits(self, context: dict[str, JSON]) -> Limits:
        """The session's limits: context.memory_mb and context.max_processes, within the ceilings."""
        sandbox = self._settings.sandbox
        return Limits(
            memory_mb=_bounded(context, "memory_mb", sandbox.memory_mb, 16, sandbox.max_memory_mb),
            max_processes=_bounded(
                context, "max_processes", sandbox.max_processes, 1, sandbox.max_max_processes
            ),
        )


def _bounded(context: dict[str, JSON], name: str, default: int, low: int, high: int) -> int:
    raw = context.get(name)
    if raw is None:
        return default
    if isinstance(raw, bool) or not isinstance(raw, int) or not low <= raw <= high:
        raise InvalidRequest(
            f"context.{name} must be an integer from {low} to {high}, not {raw!r}", field=name
        )
    return raw


def parse_request_id(raw: str) -> str:
    """The canonical form of a request_id; InvalidRequest unless it is a UUID."""
    try:
        return str(uuid.UUID(raw))
    except (ValueError, TypeError, AttributeError):
        raise InvalidRequest(f"request_id {raw[:64]!r} is not a UUID", field="request_id") from None
