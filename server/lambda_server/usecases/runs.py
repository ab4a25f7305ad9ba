"""What Execute and ExecuteBatch share: the claim, the job, the result cache's policy, the params' check."""

from __future__ import annotations

import os
from dataclasses import dataclass

from lambda_server.auth import require_execute
from lambda_server.domain import (
    JSON,
    Caller,
    ClaimedSession,
    Deadline,
    ExecutionOutcome,
    ExecutionResult,
    Job,
    OptimizationLevel,
    SessionOptions,
)
from lambda_server.errors import DatabaseUnavailable, NotStarted, Unavailable
from lambda_server.metrics import Metrics
from lambda_server.result_cache import CacheControl, CachePolicy, ResultCache, cache_key
from lambda_server.runtimes.registry import RuntimeRegistry, RuntimeSpec
from lambda_server.store.sessions import SessionStore
from lambda_server.usecases.builds import RustBuilds
from lambda_server.usecases.dependencies import Dependencies
from lambda_server.usecases.inputs import parse_request_id
from lambda_server.usecases.options import SessionOptionsPolicy
from lambda_server.validation import ParamsValidator

ANONYMOUS = "anonymous"  # the result cache's owner of an anonymous caller's sessions


@dataclass(frozen=True)
class Claimed:
    """A session claimed for executions: its runtime, options and the call's cache policy."""

    session_id: str
    session: ClaimedSession
    runtime: RuntimeSpec
    options: SessionOptions
    cache: CachePolicy


class SessionRuns:
    """The steps of running a session's script, for Execute (one) and ExecuteBatch (many)."""

    def __init__(
        self,
        sessions: SessionStore,
        registry: RuntimeRegistry,
        cache: ResultCache,
        params: ParamsValidator,
        options: SessionOptionsPolicy,
        metrics: Metrics,
        builds: RustBuilds | None,
        dependencies: Dependencies | None = None,
    ) -> None:
        self._sessions = sessions
        self._registry = registry
        self._cache = cache
        self._params = params
        self._options = options
        self.metrics = metrics
        self._builds = builds
        self._dependencies = dependencies

    async def claim(
        self, request_id: str, caller: Caller, deadline: Deadline, requested: CacheControl, count: int = 1
    ) -> Claimed:
        """Find the caller's active session and count `count` executions of it; NotStarted when
        the database did not answer (nothing ran: a retry is safe); Forbidden without the scope."""
        session_id = parse_request_id(request_id)
        try:
            session = await self._sessions.claim(session_id, caller.user_id, deadline, count)
        except DatabaseUnavailable as exc:  # the script did not run: a retry is safe
            raise NotStarted(exc.message, **exc.metadata) from exc
        runtime = self._registry.resolve(session.language_title)
        require_execute(caller, runtime.name)
        # a session stored before meta.sessions.options has them in its context
        options = session.options or self._options.from_context(session.context)
        return Claimed(session_id, session, runtime, options, requested.policy(options.cache_ttl_seconds))

    def check_params(self, claimed: Claimed, params: dict[str, JSON]) -> None:
        """InvalidParams unless params fit the session's schema; a session without one takes any."""
        metadata = claimed.session.metadata
        if not metadata:
            return
        schema = metadata.get("params_schema")
        if isinstance(schema, dict):
            key = metadata.get("params_schema_key")
            self._params.check(params, schema, key if isinstance(key, str) else None)

    def cache_key(self, claimed: Claimed, params: dict[str, JSON]) -> bytes:
        """The result cache's key of params (b"" when the policy leaves the cache alone)."""
        if not claimed.cache.active:
            return b""
        session = claimed.session
        owner = session.user_id or ANONYMOUS
        # the same script with other dependencies may answer otherwise: its layer is part of the key
        script = f"{session.script_hash}:{session.layer_id}" if session.layer_id else session.script_hash
        return cache_key(owner, claimed.runtime.name, script, session.context, params)

    def cached(self, claimed: Claimed, key: bytes) -> ExecutionResult | None:
        """A hit of the result cache, counted in the metrics; None on a miss or when not read."""
        if claimed.cache.read_max_age <= 0:
            return None
        cached = self._cache.get(key, claimed.cache.read_max_age)
        if cached is None:
            return None
        self.metrics.cached(claimed.runtime.name)
        outcome = ExecutionOutcome(cached.result, None, 0.0, "", result_json=cached.result_json)
        return ExecutionResult(claimed.session_id, claimed.session.language_title, outcome, cached=True)

    def ran(self, claimed: Claimed, key: bytes, outcome: ExecutionOutcome) -> ExecutionResult:
        """An execution that ran: counted in the metrics, its result kept as the policy says."""
        self.metrics.executed(claimed.runtime.name, outcome)
        if claimed.cache.keep_for > 0 and outcome.failure is None and outcome.result_json:
            self._cache.put(key, outcome.result_json, claimed.cache.keep_for)
        return ExecutionResult(claimed.session_id, claimed.session.language_title, outcome)

    async def job(self, claimed: Claimed, caller: Caller, deadline: Deadline) -> Job:
        """The order to the runtimes, without its event (`event()`): the script, a compiled
        runtime's program (built now when it is not yet), and the folder of the session's
        dependencies (installed on this host now, from the session's lock, when it is not yet).
        NotStarted when the script, the program or the layer could not be had (the database,
        a build the server stopped, an install that failed): nothing ran, but the claim
        counted the session's executions already (a retry counts them again)."""
        session, runtime = claimed.session, claimed.runtime
        try:
            script = await self._sessions.script(session, deadline)
            program = None
            if runtime.compiled and self._builds is not None:
                optimization = session.optimization or OptimizationLevel.DEBUG
                program = await self._builds.program(session, script, optimization, deadline, caller.owner)
            layer = None
            if session.layer_id and self._dependencies is not None:  # installed here first, if need be
                layer = await self._dependencies.layer(session, runtime, deadline, caller.owner)
        except NotStarted:
            raise
        except Unavailable as exc:
            raise NotStarted(exc.message, **exc.metadata) from exc
        return Job(
            runtime=runtime.name,
            owner=caller.owner,  # whom its environment is billed to
            # a program's environments are its own: one per optimization level
            script_hash=session.script_hash if program is None else os.path.basename(program),
            script=script,
            event={},
            timeout=claimed.options.timeout_seconds,
            limits=claimed.options.limits,
            program=program,
            layer=layer,
        )

    @staticmethod
    def event(claimed: Claimed, params: dict[str, JSON]) -> dict[str, JSON]:
        """What the script is given: `{params, context, request_id}`."""
        return {"params": params, "context": claimed.session.context, "request_id": claimed.session_id}
