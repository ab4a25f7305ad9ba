"""Initialize: check a script (or compile it), resolve the session's options, store the session."""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import replace
from typing import Protocol

from lambda_server import json_text
from lambda_server.auth import require_execute
from lambda_server.domain import (
    JSON,
    Caller,
    Deadline,
    NewSession,
    OptimizationLevel,
    RequestedOptions,
    SessionRecord,
)
from lambda_server.errors import (
    InvalidRequest,
    RuntimeNotAvailable,
    ScriptTooLarge,
)
from lambda_server.metrics import Metrics
from lambda_server.runtimes.registry import RuntimeRegistry, RuntimeSpec
from lambda_server.store.sessions import SessionStore
from lambda_server.usecases.builds import RustBuilds
from lambda_server.usecases.catalog import Catalog
from lambda_server.usecases.dependencies import Dependencies
from lambda_server.usecases.inputs import parse_request_id, refuse_control, refuse_nul, refuse_nul_in
from lambda_server.usecases.options import SessionOptionsPolicy

# A session is read back whole (GetSession, every Execute's claim): its context stays
# well under the 4 MiB a message may have.
MAX_CONTEXT_BYTES = 1024 * 1024


class ScriptChecker(Protocol):
    """Checks a script of a runtime that is not compiled (the environment pool)."""

    async def check(
        self, runtime: RuntimeSpec, script: str, script_hash: str, deadline: Deadline, owner: str = ""
    ) -> bool:
        """Compile the script (True), or pass one that compiled before (False); `owner` pays."""
        ...


class Initialize:
    """Checks a script and stores a session for it."""

    def __init__(
        self,
        registry: RuntimeRegistry,
        sessions: SessionStore,
        checker: ScriptChecker,
        catalog: Catalog,
        options: SessionOptionsPolicy,
        metrics: Metrics,
        builds: RustBuilds | None,
        dependencies: Dependencies,
        *,
        max_script_size: int,  # MAX_SCRIPT_SIZE
        expiry_seconds: int,  # SESSION_EXPIRY_SECONDS
    ) -> None:
        self._registry = registry
        self._sessions = sessions
        self._checker = checker
        self._catalog = catalog
        self._options = options
        self._metrics = metrics
        self._builds = builds
        self._dependencies = dependencies
        self._max_script_size = max_script_size
        self._expiry_seconds = expiry_seconds

    async def __call__(
        self,
        language_title: str,
        script: str,
        context: dict[str, JSON],
        request_id: str | None,
        caller: Caller,
        deadline: Deadline,
        options: RequestedOptions | None = None,
        optimization: OptimizationLevel = OptimizationLevel.DEBUG,
        dependencies: tuple[str, ...] = (),
    ) -> SessionRecord:
        """Check a script and store a session for it, with its options resolved (`options`
        unset or None: the context's keys, else the server's defaults).

        A Rust script is stored pending, then compiled at `optimization`, and its
        session marked success or error; a program compiled before (here or by
        another replica) is not compiled again.

        With no script_content, a function of the catalog with this title runs its
        registered script, and Execute checks params against its schema; with none
        registered, script_content is required. A script sent with a registered
        title is allowed: it runs as a dynamic script of the caller's, without the
        catalog's schema (the catalog names what its own script expects, not what
        any script under that title does).
        """
        runtime = self._registry.resolve(language_title)
        require_execute(caller, runtime.name)
        refuse_control(language_title, "language_title")
        refuse_nul(script, "script_content")
        refuse_nul_in(context, "context")
        requirements = self._dependencies.check(runtime, dependencies)  # refused before any work
        metadata: dict[str, JSON] | None = None
        if not script.strip():
            script, metadata = await self._catalog.registered_script(language_title, deadline)
        size = len(script.encode())
        if size > self._max_script_size:
            raise ScriptTooLarge(
                f"script_content is {size} bytes, over MAX_SCRIPT_SIZE ({self._max_script_size})",
                size=str(size),
                limit=str(self._max_script_size),
            )
        resolved = self._options.resolve(
            options or RequestedOptions(), context
        )  # bad options fail now, not at Execute
        context_size = len(json_text.dumps(context))  # exact: integers of any size, as jsonb keeps them
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
            expiry_seconds=self._expiry_seconds,
            options=resolved,
            metadata=metadata,
            owner=caller.owner,
        )
        if runtime.compiled:
            return await self._initialize_compiled(runtime, new, optimization, deadline)
        compiled = await self._checker.check(runtime, script, script_hash, deadline, caller.owner)
        self._metrics.script_checks.labels(runtime.name, "compiled" if compiled else "known").inc()
        # resolved and installed before the session is stored: a session's layer is there
        # (on this host) when it is created, and nothing is stored when it cannot be
        layered = await self._dependencies.resolve(runtime, requirements, caller.owner, deadline)
        if layered is None:
            return await self._sessions.create(new, deadline)
        try:
            return await self._sessions.create(replace(new, dependencies=layered), deadline)
        finally:
            self._dependencies.stored(layered)

    async def _initialize_compiled(
        self,
        runtime: RuntimeSpec,
        new: NewSession,
        optimization: OptimizationLevel,
        deadline: Deadline,
    ) -> SessionRecord:
        """Store the session pending and compile (or find) its program: RustBuilds.compile_session,
        whose build records `success` or `error` however this call ends."""
        if self._builds is None:
            raise RuntimeNotAvailable(f"the {runtime.name} runtime is not available", runtime=runtime.name)
        # the build, not this call, records how it ended on the session
        record, compiled = await self._builds.compile_session(new, optimization, deadline)
        self._metrics.script_checks.labels(runtime.name, "compiled" if compiled else "known").inc()
        return record
