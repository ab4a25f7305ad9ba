"""The use cases: Initialize, Execute, GetSession, Health and the catalog, free of gRPC and SQL."""

from __future__ import annotations

import hashlib
import os
import uuid
from dataclasses import replace
from typing import Protocol

import orjson

from lambda_server import __version__
from lambda_server.auth import require_execute, require_read_functions
from lambda_server.builds import RustBuilds
from lambda_server.config import Settings
from lambda_server.domain import (
    JSON,
    Caller,
    CompileStatus,
    Deadline,
    ExecutionOutcome,
    ExecutionResult,
    FunctionDefinition,
    FunctionPage,
    FunctionType,
    HealthReport,
    Limits,
    NewSession,
    SessionRecord,
)
from lambda_server.errors import (
    InvalidRequest,
    RuntimeNotAvailable,
    ScriptLimitExceeded,
    ScriptSyntaxError,
    ScriptTooLarge,
    UnknownLanguage,
)
from lambda_server.metrics import Metrics
from lambda_server.result_cache import ResultCache, cache_key, parse_cache_control, session_ttl
from lambda_server.runtimes.pool import Job
from lambda_server.runtimes.registry import RuntimeRegistry, RuntimeSpec
from lambda_server.store.catalog import FunctionCatalog
from lambda_server.store.sessions import SessionStore
from lambda_server.validation import ParamsValidator

ANONYMOUS = "anonymous"
# A session is read back whole (GetSession, every Execute's claim): its context stays
# well under the 4 MiB a message may have.
MAX_CONTEXT_BYTES = 1024 * 1024


class ExecutionEngine(Protocol):
    """The seam between the use cases and the runtimes."""

    async def check(
        self, runtime: RuntimeSpec, script: str, script_hash: str, deadline: Deadline, owner: str = ""
    ) -> bool:
        """Compile the script (True), or pass one that compiled before (False); `owner` pays."""
        ...

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
        cache: ResultCache,
        catalog: FunctionCatalog,
        metrics: Metrics,
        builds: RustBuilds | None = None,
    ) -> None:
        self._builds = builds
        self._metrics = metrics
        self._catalog = catalog
        self._params = ParamsValidator()
        self._cache = cache
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
        optimization: str = "",
    ) -> SessionRecord:
        """Check a script and store a session for it.

        A Rust script is stored pending, then compiled (`optimization`: debug, the
        default, or release), and its session marked success or error; a program
        compiled before (here or by another replica) is not compiled again.

        With no script_content, a function of the catalog with this title runs its
        registered script, and Execute checks params against its schema; with none
        registered, script_content is required. A script sent with a registered
        title is allowed: it runs as a dynamic script of the caller's, without the
        catalog's schema (the catalog names what its own script expects, not what
        any script under that title does).
        """
        runtime = self._registry.resolve(language_title)
        require_execute(caller, runtime.name)
        _refuse_nul(language_title, "language_title")
        _refuse_nul(script, "script_content")
        _refuse_nul_in(context, "context")
        metadata: dict[str, JSON] | None = None
        if not script.strip():
            script, metadata = await self._registered_script(language_title, deadline)
        size = len(script.encode())
        if size > self._settings.runtime.max_script_size:
            raise ScriptTooLarge(
                f"script_content is {size} bytes, over MAX_SCRIPT_SIZE "
                f"({self._settings.runtime.max_script_size})",
                size=str(size),
                limit=str(self._settings.runtime.max_script_size),
            )
        self._timeout(context)  # reject bad limits now, not at every Execute
        self._limits(context)
        session_ttl(context)
        context_size = len(orjson.dumps(context))
        if context_size > MAX_CONTEXT_BYTES:  # a session too large to read back whole
            raise InvalidRequest(
                f"context is {context_size} bytes as JSON, over {MAX_CONTEXT_BYTES}", field="context"
            )
        session_id = parse_request_id(request_id) if request_id else str(uuid.uuid4())
        script_hash = hashlib.sha256(script.encode()).hexdigest()
        new = NewSession(
            request_id=session_id,
            language_title=language_title,
            user_id=caller.user_id,
            context=context,
            script_content=script,
            script_hash=script_hash,
            expiry_seconds=self._settings.session_expiry_seconds,
            metadata=metadata,
            owner=caller.owner,
        )
        if runtime.compiled:
            return await self._initialize_compiled(runtime, new, optimization, caller.owner, deadline)
        compiled = await self._engine.check(runtime, script, script_hash, deadline, caller.owner)
        self._metrics.script_checks.labels(runtime.name, "compiled" if compiled else "known").inc()
        return await self._sessions.create(new, deadline)

    async def _initialize_compiled(
        self, runtime: RuntimeSpec, new: NewSession, optimization: str, owner: str, deadline: Deadline
    ) -> SessionRecord:
        """Store the session pending, compile (or find) its program, record how that ended."""
        optimization = optimization or "debug"
        if optimization not in ("debug", "release"):
            raise InvalidRequest(
                f"compile_options.optimization_level {optimization!r} is not debug or release",
                field="compile_options",
            )
        if self._builds is None:
            raise RuntimeNotAvailable(f"the {runtime.name} runtime is not available", runtime=runtime.name)
        new = replace(
            new, compile_status=CompileStatus.PENDING, compile_options={"optimization_level": optimization}
        )
        record = await self._sessions.create(new, deadline)
        try:
            compiled = await self._builds.prepare(
                new.script_content, new.script_hash, optimization, deadline, owner
            )
        except (ScriptSyntaxError, ScriptLimitExceeded) as exc:
            await self._sessions.compiled(new.request_id, CompileStatus.ERROR, exc.message, deadline)
            raise
        await self._sessions.compiled(new.request_id, CompileStatus.SUCCESS, None, deadline)
        self._metrics.script_checks.labels(runtime.name, "compiled" if compiled else "known").inc()
        return record

    async def execute(
        self,
        request_id: str,
        params: dict[str, JSON],
        caller: Caller,
        deadline: Deadline,
        cache_control: str = "",
    ) -> ExecutionResult:
        """Run the session's script with params; a hit of the result cache is counted as an
        execution of the session too (it was asked for and answered), without a runtime."""
        session_id = parse_request_id(request_id)
        requested = parse_cache_control(cache_control)  # before the session counts this call
        session = await self._sessions.claim(session_id, caller.user_id, deadline)
        runtime = self._registry.resolve(session.language_title)
        require_execute(caller, runtime.name)
        self._check_params(session.metadata, params)
        owner = session.user_id or ANONYMOUS
        policy = requested.policy(session_ttl(session.context))
        key = (
            cache_key(owner, runtime.name, session.script_hash, session.context, params)
            if policy.active
            else b""
        )
        if policy.read_max_age > 0:
            cached = self._cache.get(key, policy.read_max_age)
            if cached is not None:
                self._metrics.cached(runtime.name)
                outcome = ExecutionOutcome(cached.result, None, 0.0, "", result_json=cached.result_json)
                return ExecutionResult(session_id, session.language_title, outcome, cached=True)
        script = await self._sessions.script(session, deadline)
        program = None
        if runtime.compiled and self._builds is not None:
            options = session.compile_options or {}
            optimization = str(options.get("optimization_level") or "debug")
            program = await self._builds.program(
                script, session.script_hash, optimization, deadline, caller.owner
            )
        job = Job(
            runtime=runtime,
            owner=caller.owner,  # whom its environment is billed to
            # a program's environments are its own: one per optimization level
            script_hash=session.script_hash if program is None else os.path.basename(program),
            script=script,
            event={"params": params, "context": session.context, "request_id": session_id},
            timeout=self._timeout(session.context),
            limits=self._limits(session.context),
            program=program,
        )
        outcome = await self._engine.execute(job, deadline)
        self._metrics.executed(runtime.name, outcome)
        if policy.keep_for > 0 and outcome.failure is None:
            self._cache.put(key, outcome.result_json, policy.keep_for)
        return ExecutionResult(session_id, session.language_title, outcome)

    async def get_session(self, request_id: str, caller: Caller, deadline: Deadline) -> SessionRecord:
        return await self._sessions.get(parse_request_id(request_id), caller.user_id, deadline)

    async def list_functions(
        self,
        language: str,
        function_type: FunctionType | None,
        page_size: int,
        page_token: str,
        caller: Caller,
        deadline: Deadline,
    ) -> FunctionPage:
        """A page of the catalog (see FunctionCatalog.list for paging); never with scripts."""
        require_read_functions(caller)
        _refuse_nul(language, "language")
        page = await self._catalog.list(language or None, function_type, page_size, page_token, deadline)
        return FunctionPage([self._shown(f, False) for f in page.functions], page.next_page_token)

    async def get_function(
        self, language_title: str, caller: Caller, deadline: Deadline
    ) -> FunctionDefinition:
        """A function of the catalog; its script is shown for a dynamic function only."""
        require_read_functions(caller)
        if not language_title:
            raise InvalidRequest("language_title is required", field="language_title")
        _refuse_nul(language_title, "language_title")
        function = await self._catalog.get(language_title, deadline)
        return self._shown(function, function.function_type is FunctionType.DYNAMIC)

    def _shown(self, function: FunctionDefinition, with_script: bool) -> FunctionDefinition:
        try:
            self._registry.resolve(function.language_title)
            available = True
        except (RuntimeNotAvailable, UnknownLanguage):
            available = False
        return replace(function, script=function.script if with_script else None, available=available)

    async def _registered_script(
        self, language_title: str, deadline: Deadline
    ) -> tuple[str, dict[str, JSON]]:
        """The catalog function's script, and the session metadata naming it and its params schema."""
        function = await self._catalog.find(language_title, deadline)
        script = function.script if function is not None else None
        if function is None or script is None or not script.strip():
            raise InvalidRequest(
                f"script_content is required: no function of the catalog is named {language_title[:128]!r}",
                field="script_content",
            )
        metadata: dict[str, JSON] = {
            "function": {
                "id": function.id,
                "language_title": function.language_title,
                "version": function.version,
            }
        }
        if function.params_schema is not None:
            metadata["params_schema"] = function.params_schema
            metadata["params_schema_key"] = self._params.prepare(function.params_schema)
        return script, metadata

    def _check_params(self, metadata: dict[str, JSON] | None, params: dict[str, JSON]) -> None:
        """InvalidParams unless params fit the session's schema; a session without one takes any."""
        if not metadata:
            return
        schema = metadata.get("params_schema")
        if isinstance(schema, dict):
            key = metadata.get("params_schema_key")
            self._params.check(params, schema, key if isinstance(key, str) else None)

    def health(self) -> HealthReport:
        components = {"postgres": self._database.description, **self._engine.status()}
        if self._builds is not None and "runtime.rust" in components:
            components["runtime.rust"] += f"; serde_json: {self._builds.dependencies_state}"
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


def _refuse_nul(value: str, field: str) -> None:
    """PostgreSQL text cannot hold NUL: refuse it here rather than fail in the database."""
    if "\x00" in value:
        raise InvalidRequest(f"{field} must not contain NUL characters", field=field)


def _refuse_nul_in(value: JSON, field: str) -> None:
    """jsonb cannot hold NUL either, in a key or a string; the depth is bounded by protobuf's."""
    if isinstance(value, str):
        _refuse_nul(value, field)
    elif isinstance(value, dict):
        for key, item in value.items():
            _refuse_nul(key, field)
            _refuse_nul_in(item, field)
    elif isinstance(value, list):
        for item in value:
            _refuse_nul_in(item, field)


def parse_request_id(raw: str) -> str:
    """The canonical form of a request_id; InvalidRequest unless it is a UUID."""
    try:
        return str(uuid.UUID(raw))
    except (ValueError, TypeError, AttributeError):
        raise InvalidRequest(f"request_id {raw[:64]!r} is not a UUID", field="request_id") from None
