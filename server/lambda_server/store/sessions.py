"""Sessions in meta.sessions: create, claim for an execution, read; scripts cached by hash."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

import asyncpg

from lambda_server.domain import (
    JSON,
    ClaimedSession,
    CompileStatus,
    Deadline,
    LockedPackage,
    NewSession,
    OptimizationLevel,
    SessionDependencies,
    SessionOptions,
    SessionRecord,
    SessionStatus,
)
from lambda_server.errors import (
    InternalError,
    QuotaExceeded,
    SessionConflict,
    SessionExpired,
    SessionNotFound,
)
from lambda_server.store.claims import ClaimBatcher
from lambda_server.store.creates import CreateBatcher, OwnerQuota
from lambda_server.store.database import Database
from lambda_server.store.hot_sessions import CountWriter, SessionCache

__all__ = ["OwnerQuota", "ScriptCache", "SessionStore"]

# A refusal's RetryInfo when no session of the owner's expires sooner (the session alone
# is past the bytes cap, or the oldest expires within the second).
MIN_RETRY_SECONDS = 1.0

_SELECT = """
SELECT request_id, language_title, user_id, created_at, expires_at, last_executed_at,
       execution_count, script_hash, context, options, compile_status, compile_error, compile_options,
       dependencies, (status = 'active' AND expires_at > now()) AS live
FROM meta.sessions WHERE request_id = $1
"""

# Found, active, unexpired and counted in one statement: a claim that its batch
# (store/claims.py) could not make, made alone, waits for a row another holds.
_CLAIM = """
UPDATE meta.sessions
SET execution_count = execution_count + $3, last_executed_at = now()
WHERE request_id = $1 AND user_id IS NOT DISTINCT FROM $2 AND status = 'active' AND expires_at > now()
RETURNING language_title, user_id, script_hash, context, metadata, compile_options, options, compile_status,
          dependencies->>'layer_id' AS layer_id, extract(epoch FROM expires_at - now())::float8 AS expires_in
"""

_COMPILED = """
UPDATE meta.sessions SET compile_status = $2, compile_error = $3 WHERE request_id = ANY($1::uuid[])
"""

_UNSETTLED = (CompileStatus.PENDING, CompileStatus.ERROR)

_SCRIPT = "SELECT script_content FROM meta.sessions WHERE request_id = $1"


class ScriptCache:
    """Scripts by hash, least recently used dropped past a total size."""

    def __init__(self, max_bytes: int) -> None:
        self._max_bytes = max_bytes
        self._bytes = 0
        self._scripts: OrderedDict[str, str] = OrderedDict()

    def get(self, script_hash: str) -> str | None:
        script = self._scripts.get(script_hash)
        if script is not None:
            self._scripts.move_to_end(script_hash)
        return script

    def put(self, script_hash: str, script: str) -> None:
        if script_hash in self._scripts:
            self._scripts.move_to_end(script_hash)
            return
        self._scripts[script_hash] = script
        self._bytes += len(script)
        while self._bytes > self._max_bytes and len(self._scripts) > 1:
            _, dropped = self._scripts.popitem(last=False)
            self._bytes -= len(dropped)


class SessionStore:
    """The only place that reads and writes sessions."""

    def __init__(
        self,
        db: Database,
        script_cache_bytes: int = 64 * 1024 * 1024,
        observe_claim_batch: Callable[[int], None] | None = None,
        quota: OwnerQuota | None = None,
        observe_create_batch: Callable[[int], None] | None = None,
        cache_seconds: float = 0.0,
        count_flush_ms: int = 5,
    ) -> None:
        """`quota`: each owner's caps; None (tools and tests) caps nobody.
        `observe_*_batch`: told the size of each batch of claims, and of creates.
        `cache_seconds`: how long a claimed session is kept in memory (store/hot_sessions.py),
        its executions counted write-behind, flushed every `count_flush_ms`; 0: never."""
        self._db = db
        self._quota = quota
        self._creates = CreateBatcher(db, quota, observe_create_batch)
        self._scripts = ScriptCache(script_cache_bytes)
        self._claims = ClaimBatcher(db, observe_claim_batch)
        self._cache = SessionCache(cache_seconds) if cache_seconds > 0 else None
        self._counts = CountWriter(db, count_flush_ms)

    async def close(self) -> None:
        """Stop the claim and create batches, flush the counts; before the database closes."""
        await self._creates.close()
        await self._claims.close()
        await self._counts.close()

    async def create(self, new: NewSession, deadline: Deadline) -> SessionRecord:
        """Store a session; a retry with the same request_id and script returns the first one
        (not counted again). QuotaExceeded when the owner's active sessions or their bytes
        would pass the store's quota."""
        quota = self._quota if new.owner is not None else None
        row = await self._creates.create(new, deadline)
        if row is None or row["request_id"] is None:
            existing = await self._db.fetchrow(deadline, _SELECT, new.request_id)
            if existing is None and quota is not None and row is not None:  # refused
                raise _refusal(new, row, quota)
            if existing is None:  # inserted and deleted in between: cannot happen today
                raise InternalError("session vanished while being created")
            stored = _dependencies(existing["dependencies"])
            same = (
                existing["script_hash"] == new.script_hash
                and existing["language_title"] == new.language_title
                and existing["user_id"] == new.user_id
                # the same requirements (a retry), whatever they resolve to now
                and (stored.requirements if stored else ())
                == (new.dependencies.requirements if new.dependencies else ())
            )
            if not same:
                raise SessionConflict(
                    f"session {new.request_id} already exists with another script or other dependencies",
                    request_id=new.request_id,
                )
            row = existing
        self._scripts.put(new.script_hash, new.script_content)
        return _record(row)

    async def compiled(
        self, request_ids: list[str], status: CompileStatus, error: str | None, deadline: Deadline
    ) -> None:
        """Record how the compile of these sessions' script ended (success or error)."""
        await self._db.fetchrow(deadline, _COMPILED, request_ids, status.value, error)

    async def claim(
        self, request_id: str, user_id: str | None, deadline: Deadline, count: int = 1
    ) -> ClaimedSession:
        """Find an active session of `user_id` and count `count` executions of it (an
        ExecuteBatch's items), in one statement (shared with the claims of other calls);
        alone when the batch did not claim it. A session claimed recently is found in memory,
        and counted write-behind (store/hot_sessions.py)."""
        if self._cache is not None:
            cached = self._cache.get(request_id, user_id)
            if cached is not None:
                self._counts.add(request_id, count)
                return cached
        sent_at = time.monotonic()
        row = await self._claims.claim(request_id, user_id, deadline, count)
        if row is None:
            row = await self._db.fetchrow(deadline, _CLAIM, request_id, user_id, count)
        if row is None:
            raise await self._why_not_found(request_id, user_id, deadline)
        session = ClaimedSession(
            request_id=request_id,
            language_title=row["language_title"],
            user_id=row["user_id"],
            script_hash=row["script_hash"],
            context=row["context"],
            metadata=row["metadata"],
            optimization=_optimization(row["compile_options"]),
            options=_options(row["options"]),
            compile_status=CompileStatus(row["compile_status"]) if row["compile_status"] else None,
            layer_id=row["layer_id"],
        )
        # one whose compile is not known to have succeeded is read again: its Execute records
        # how the compile ends (usecases/builds.py), once
        if self._cache is not None and session.compile_status not in _UNSETTLED:
            self._cache.put(session, sent_at, row["expires_in"])
        return session

    async def script(self, session: ClaimedSession, deadline: Deadline) -> str:
        """The session's script, from the cache when another session already had it."""
        script = self._scripts.get(session.script_hash)
        if script is None:
            row = await self._db.fetchrow(deadline, _SCRIPT, session.request_id)
            if row is None or row["script_content"] is None:
                raise SessionNotFound(f"session {session.request_id} has no script")
            script = str(row["script_content"])
            self._scripts.put(session.script_hash, script)
        return script

    async def get(self, request_id: str, user_id: str | None, deadline: Deadline) -> SessionRecord:
        """A session of `user_id`; another user's session is not found, as if it did not exist.
        Its executions counted on this replica and not yet written are written first."""
        await self._counts.flush_session(request_id)
        row = await self._db.fetchrow(deadline, _SELECT, request_id)
        if row is None or row["user_id"] != user_id:
            raise SessionNotFound(f"session {request_id} not found", request_id=request_id)
        return _record(row)

    async def _why_not_found(
        self, request_id: str, user_id: str | None, deadline: Deadline
    ) -> SessionNotFound:
        try:
            record = await self.get(request_id, user_id, deadline)
        except SessionNotFound as missing:
            return missing
        expired_at = record.expires_at.isoformat()
        return SessionExpired(
            f"session {request_id} expired at {expired_at}", request_id=request_id, expires_at=expired_at
        )


def _refusal(new: NewSession, row: asyncpg.Record, quota: OwnerQuota) -> QuotaExceeded:
    """Which cap the session would pass, the owner's use, and when its oldest session
    expires (by the database clock): the earliest a retry can find room."""
    sessions, used, size = row["used_sessions"], row["used_bytes"], row["new_bytes"]
    oldest = row["oldest_expires_in"]
    retry_after = max(MIN_RETRY_SECONDS, oldest if oldest is not None else 0.0)
    if sessions >= quota.max_sessions:
        setting, limit = "MAX_SESSIONS_PER_OWNER", quota.max_sessions
        what = f"holds {sessions} active sessions, the most it may (MAX_SESSIONS_PER_OWNER {limit})"
    else:
        setting, limit = "MAX_SCRIPT_BYTES_PER_OWNER", quota.max_bytes
        what = (
            f"stores {used} bytes of scripts and contexts in {sessions} active sessions; "
            f"{size} more would pass MAX_SCRIPT_BYTES_PER_OWNER ({limit})"
        )
    return QuotaExceeded(
        f"{new.owner} {what}; its oldest session expires in {retry_after:.0f} s",
        retry_after=retry_after,
        setting=setting,
        limit=str(limit),
        sessions=str(sessions),
        bytes=str(used),
    )


def _record(row: asyncpg.Record) -> SessionRecord:
    return SessionRecord(
        request_id=str(row["request_id"]),
        language_title=row["language_title"],
        user_id=row["user_id"],
        status=SessionStatus.ACTIVE if row["live"] else SessionStatus.EXPIRED,
        created_at=row["created_at"],
        expires_at=row["expires_at"],
        last_executed_at=row["last_executed_at"],
        execution_count=row["execution_count"],
        script_hash=row["script_hash"] or "",
        context=row["context"] or {},
        options=_options(row["options"]),
        # a checked (not compiled) script's session has no compile options, and says
        # 'success': its status is not a compile's
        compile_status=(
            CompileStatus(row["compile_status"])
            if row["compile_options"] is not None and row["compile_status"] is not None
            else None
        ),
        compile_error=row["compile_error"],
        dependencies=_dependencies(row["dependencies"]),
    )


def _dependencies(column: dict[str, JSON] | None) -> SessionDependencies | None:
    """meta.sessions.dependencies, as creates.py writes it (dependencies_column); None: none asked."""
    if column is None:
        return None
    return SessionDependencies(
        requirements=tuple(str(r) for r in column.get("requirements") or ()),
        runtime=str(column.get("runtime") or ""),
        layer_id=str(column.get("layer_id") or ""),
        lock=str(column.get("lock") or ""),
        packages=tuple(LockedPackage(str(n), str(v), str(h)) for n, v, h in column.get("packages") or ()),
    )


def _optimization(compile_options: dict[str, JSON] | None) -> OptimizationLevel | None:
    """meta.sessions.compile_options, as creates.py writes it; None for a checked script."""
    if compile_options is None:
        return None
    return OptimizationLevel(compile_options.get("optimization_level") or OptimizationLevel.DEBUG.value)


def _options(column: dict[str, JSON] | None) -> SessionOptions | None:
    """meta.sessions.options, as creates.py writes it (options_column); None for a session
    stored without (before the column, or by a tool), whose options are its context's.
    Read key by key: a newer replica may store more."""
    if column is None:
        return None
    return SessionOptions(
        timeout_seconds=float(column["timeout_seconds"]),
        memory_mb=int(column["memory_mb"]),
        max_processes=int(column["max_processes"]),
        cache_ttl_seconds=float(column["cache_ttl_seconds"]),
    )
