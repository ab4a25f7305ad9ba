"""Execute: claim the session, answer from the result cache or run the script in a runtime."""

from __future__ import annotations

import os
from typing import Protocol

from lambda_server.auth import require_execute
from lambda_server.domain import (
    JSON,
    Caller,
    Deadline,
    ExecutionOutcome,
    ExecutionResult,
    Job,
    OptimizationLevel,
    OutputSink,
)
from lambda_server.errors import DatabaseUnavailable, NotStarted, Unavailable
from lambda_server.metrics import Metrics
from lambda_server.result_cache import ResultCache, cache_key, parse_cache_control
from lambda_server.runtimes.registry import RuntimeRegistry
from lambda_server.store.sessions import SessionStore
from lambda_server.usecases.builds import RustBuilds
from lambda_server.usecases.inputs import parse_request_id
from lambda_server.usecases.options import SessionOptionsPolicy
from lambda_server.validation import ParamsValidator

ANONYMOUS = "anonymous"  # the result cache's owner of an anonymous caller's sessions


class Executor(Protocol):
    """Runs jobs (the environment pool)."""

    async def execute(
        self, job: Job, deadline: Deadline, output: OutputSink | None = None
    ) -> ExecutionOutcome: ...


class Execute:
    """Runs a session's script with params."""

    def __init__(
        self,
        sessions: SessionStore,
        registry: RuntimeRegistry,
        executor: Executor,
        cache: ResultCache,
        params: ParamsValidator,
        options: SessionOptionsPolicy,
        metrics: Metrics,
        builds: RustBuilds | None,
    ) -> None:
        self._sessions = sessions
        self._registry = registry
        self._executor = executor
        self._cache = cache
        self._params = params
        self._options = options
        self._metrics = metrics
        self._builds = builds

    async def __call__(
        self,
        request_id: str,
        params: dict[str, JSON],
        caller: Caller,
        deadline: Deadline,
        cache_control: str = "",
        output: OutputSink | None = None,
    ) -> ExecutionResult:
        """Run the session's script with params, under the options stored with the session;
        a hit of the result cache is counted as an execution of the session too (it was asked
        for and answered), without a runtime. `output` gets the console output as the script
        writes it (ExecuteStream); a cached result has none."""
        session_id = parse_request_id(request_id)
        requested = parse_cache_control(cache_control)  # before the session counts this call
        try:
            session = await self._sessions.claim(session_id, caller.user_id, deadline)
        except DatabaseUnavailable as exc:  # the script did not run: a retry is safe
            raise NotStarted(exc.message, **exc.metadata) from exc
        runtime = self._registry.resolve(session.language_title)
        require_execute(caller, runtime.name)
        self._check_params(session.metadata, params)
        # a session stored before meta.sessions.options has them in its context
        options = session.options or self._options.from_context(session.context)
        owner = session.user_id or ANONYMOUS
        policy = requested.policy(options.cache_ttl_seconds)
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
        try:
            script = await self._sessions.script(session, deadline)
            program = None
            if runtime.compiled and self._builds is not None:
                optimization = session.optimization or OptimizationLevel.DEBUG
                program = await self._builds.program(session, script, optimization, deadline, caller.owner)
        except NotStarted:
            raise
        except Unavailable as exc:  # the database, or a build the server stopped: no script ran
            raise NotStarted(exc.message, **exc.metadata) from exc
        job = Job(
            runtime=runtime.name,
            owner=caller.owner,  # whom its environment is billed to
            # a program's environments are its own: one per optimization level
            script_hash=session.script_hash if program is None else os.path.basename(program),
            script=script,
            event={"params": params, "context": session.context, "request_id": session_id},
            timeout=options.timeout_seconds,
            limits=options.limits,
            program=program,
        )
        outcome = await self._executor.execute(job, deadline, output)
        self._metrics.executed(runtime.name, outcome)
        if policy.keep_for > 0 and outcome.failure is None and outcome.result_json:
            self._cache.put(key, outcome.result_json, policy.keep_for)
        return ExecutionResult(session_id, session.language_title, outcome)

    def _check_params(self, metadata: dict[str, JSON] | None, params: dict[str, JSON]) -> None:
        """InvalidParams unless params fit the session's schema; a session without one takes any."""
        if not metadata:
            return
        schema = metadata.get("params_schema")
        if isinstance(schema, dict):
            key = metadata.get("params_schema_key")
            self._params.check(params, schema, key if isinstance(key, str) else None)
