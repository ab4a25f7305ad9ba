"""Rust programs by script: a local file, else the one stored in PostgreSQL, else compiled now.

A program is kept under its artifact key (script hash, optimization level,
toolchain): in meta.artifacts, so that another replica or a restart runs a script
without compiling it again, and as a file of the local cache, which is what an
environment starts.

Making a program (a build) is work that callers share, so it is a task of
RustBuilds', one per key at a time, not a caller's: each caller (Initialize, or
Execute of a script whose program is not here) waits for it under its own
deadline, and its deadline or cancellation ends its own call only. A build is
bounded by the service's settings (RUST_COMPILE_QUEUE_TIMEOUT_SECONDS,
RUST_COMPILE_TIMEOUT_SECONDS, the database's timeouts; the one-time
dependency build by RUST_DEPENDENCIES_TIMEOUT_SECONDS); a program made after
its callers left is kept all the same. The build, not its callers, records how
it ended on every session that waits for it (meta.sessions.compile_status
`success`, or `error` with the message of any failure), so no session stays
`pending` while the database answers; an outcome the database did not take is
recorded by the session's next Execute or Initialize (see `program`). Each
caller of a failed build raises an instance of the failure of its own.

Programs no unexpired session uses, older than RUST_ARTIFACT_RETENTION_SECONDS,
are removed: from meta.artifacts by the periodic cleanup (one replica at a
time, store/cleanup.py), and from the local folder by each server's own sweep
(`sweep`, every CLEANUP_INTERVAL_SECONDS). A program removed while a new
session came to use it is made again when that session next runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TypeVar

from lambda_server.domain import (
    ClaimedSession,
    CompileStatus,
    Deadline,
    NewSession,
    OptimizationLevel,
    SessionRecord,
)
from lambda_server.errors import InternalError, LambdaError, Unavailable
from lambda_server.runtimes.rust import RustCompiler
from lambda_server.store.artifacts import ArtifactStore
from lambda_server.store.sessions import SessionStore
from lambda_server.tasks import cancel_and_wait, outcome, retrieve, sweep_every

log = logging.getLogger(__name__)

T = TypeVar("T")

# a program's file name: its artifact key
_PROGRAM = re.compile(r"(?P<hash>[0-9a-f]{64})-(?P<level>debug|release)-[0-9a-f]+")
SWEEP_BATCH = 500  # local programs looked up in one statement
SWEEP_SECONDS = 5.0
# A build's own statements (artifacts, compile outcomes) have no caller's deadline:
# DATABASE_COMMAND_TIMEOUT_SECONDS bounds each
_UNBOUNDED = Deadline(None)
PASSED = "the call's deadline passed "  # and what it waited for
STOPPED = "the server stopped before the script's compile ended; Initialize or Execute compiles it again"
COMPILING = (
    "while the script compiled; the compile goes on, and a later Initialize or Execute of this "
    "script finds its program"
)
STORING = (
    "while its session was being stored; once stored, it is compiled all the same, and its "
    "compile status tells how that ended"
)


@dataclass(eq=False)
class _Build:
    """The making of one key's program, and the sessions whose outcome it records."""

    task: asyncio.Task[bool] | None = None  # True when it compiled, False when it found the program
    sessions: list[str] = field(default_factory=list)  # request ids not recorded yet


class RustBuilds:
    """Finds or makes the program of a script, and records how that ended on its sessions."""

    def __init__(
        self,
        compiler: RustCompiler,
        store: ArtifactStore,
        sessions: SessionStore,
        cache_dir: Path,
        retention_seconds: float = 86400.0,
        sweep_interval: float = 60.0,
    ) -> None:
        self._compiler = compiler
        self._store = store
        self._sessions = sessions
        self._retention = retention_seconds
        self._sweep_interval = sweep_interval
        self._sweeper: asyncio.Task[None] | None = None
        self._folder = cache_dir / "programs"
        self._folder.mkdir(parents=True, exist_ok=True)
        self._building: dict[str, _Build] = {}  # by artifact key, while it runs
        # Initializes between storing their session and joining its build: that step is
        # this object's too, so that a caller who leaves in between leaves no session
        # that no build records
        self._joining: set[asyncio.Task[tuple[SessionRecord, _Build, bool]]] = set()
        self._closing = False
        # keys this process has seen in meta.artifacts: a local file of another
        # database's (a machine's cache outlives a deployment) is stored once more
        self._stored: dict[str, float] = {}
        # when each stored key's file was last seen here (time.monotonic): another server
        # sharing the folder may sweep it, which is looked for once a sweep interval, not
        # on every Execute (a thread's round trip each)

    def start(self) -> None:
        """Begin the compiler's one-time dependency build, and the local sweep, in the background."""
        self._compiler.start()
        if self._sweeper is None:
            self._sweeper = asyncio.create_task(self._sweep_loop())

    async def close(self) -> None:
        """Stop the sweep and every build (recording `error` on their sessions: the server
        stopped), then the compiler's dependency build; before the database closes."""
        self._closing = True
        sweeper, self._sweeper = self._sweeper, None
        if sweeper is not None:
            await cancel_and_wait(sweeper)
        # a session stored by now joins its build (bounded by the database's timeouts),
        # which records it as the build ends
        await asyncio.gather(*self._joining, return_exceptions=True)
        await asyncio.sleep(0)  # a build just started runs to its first wait: its cancellation records
        builds = [build.task for build in self._building.values() if build.task is not None]
        for task in builds:
            task.cancel()
        await asyncio.gather(*builds, return_exceptions=True)
        await self._compiler.close()

    @property
    def dependencies_state(self) -> str:
        return self._compiler.dependencies_state

    @property
    def packages(self) -> tuple[str, ...]:
        return self._compiler.packages

    def _key(self, script_hash: str, level: OptimizationLevel) -> str:
        return f"{script_hash}-{level.value}-{self._compiler.toolchain.program_identity}"

    async def compile_session(
        self, new: NewSession, level: OptimizationLevel, deadline: Deadline
    ) -> tuple[SessionRecord, bool]:
        """Store the session `pending`, then find or compile its program (at `level`:
        debug or release); the build records `success` or `error` on the session however
        this call ends. The session, and True when this call started a build that compiled.
        ScriptSyntaxError, ScriptLimitExceeded, QuotaExceeded (no compile slot), Unavailable
        (the crates, the database) as the build failed; DeadlineExceeded when the deadline
        passed first, while the build goes on and keeps its program for a later call."""
        if self._closing:
            raise Unavailable("the server is stopping")
        new = replace(new, compile_status=CompileStatus.PENDING, optimization=level)
        joining = asyncio.create_task(self._store_and_join(new, level, deadline))
        self._joining.add(joining)
        joining.add_done_callback(self._joining.discard)
        joining.add_done_callback(retrieve)
        record, build, started = await outcome(joining, deadline, PASSED + STORING, STOPPED)
        assert build.task is not None
        compiled = await outcome(build.task, deadline, PASSED + COMPILING, STOPPED)
        return record, compiled and started

    async def program(
        self,
        session: ClaimedSession,
        script: str,
        level: OptimizationLevel,
        deadline: Deadline,
        owner: str = "",
    ) -> str:
        """The path of the session's program, made first when it is not here (waiting for
        the build under way, if any). A session whose compile status is not `success` (its
        build failed, or its outcome was not recorded) has this build's outcome recorded."""
        key = self._key(session.script_hash, level)
        path = self._folder / key
        seen = self._stored.get(key)
        if seen is not None and time.monotonic() - seen > self._sweep_interval:
            if await asyncio.to_thread(path.exists):
                self._stored[key] = time.monotonic()
            else:
                del self._stored[key]  # swept by another server sharing the folder
        unrecorded = session.compile_status in (CompileStatus.PENDING, CompileStatus.ERROR)
        if key not in self._stored or unrecorded:
            if self._closing:
                raise Unavailable("the server is stopping")
            recorded_here = session.request_id if unrecorded else None
            build, _ = self._join(key, script, session.script_hash, level, owner, recorded_here)
            assert build.task is not None
            await outcome(build.task, deadline, PASSED + COMPILING, STOPPED)
        return str(path)

    async def _store_and_join(
        self, new: NewSession, level: OptimizationLevel, deadline: Deadline
    ) -> tuple[SessionRecord, _Build, bool]:
        record = await self._sessions.create(new, deadline)
        key = self._key(new.script_hash, level)
        build, started = self._join(
            key, new.script_content, new.script_hash, level, new.owner or "", new.request_id
        )
        return record, build, started

    def _join(
        self,
        key: str,
        script: str,
        script_hash: str,
        level: OptimizationLevel,
        owner: str,
        session: str | None,
    ) -> tuple[_Build, bool]:
        """The build of `key` under way, else a new one (billed to `owner`), with `session`
        among those it records; and whether it is new."""
        build = self._building.get(key)
        started = build is None
        if build is None:
            build = self._building[key] = _Build()
            making = self._build(key, build, script, script_hash, level, owner)
            build.task = asyncio.create_task(making)
            build.task.add_done_callback(retrieve)
        if session is not None:
            build.sessions.append(session)
        return build, started

    async def _build(
        self, key: str, build: _Build, script: str, script_hash: str, level: OptimizationLevel, owner: str
    ) -> bool:
        try:
            try:
                compiled = await self._make(key, script, script_hash, level, owner)
            except asyncio.CancelledError:  # close(): the sessions learn why, then the task ends
                await self._record(build, CompileStatus.ERROR, STOPPED)
                raise
            except LambdaError as exc:
                await self._record(build, CompileStatus.ERROR, exc.message)
                raise
            except Exception as exc:
                log.exception("the build of Rust program %s failed", key)
                error = InternalError(f"internal error while compiling: {type(exc).__name__}")
                await self._record(build, CompileStatus.ERROR, error.message)
                raise error from exc
            await self._record(build, CompileStatus.SUCCESS, None)
            return compiled
        finally:
            # no await since _record found no session left: one joining now starts a new build
            del self._building[key]

    async def _record(self, build: _Build, status: CompileStatus, error: str | None) -> None:
        """Record the outcome on every session waiting, those that join meanwhile included."""
        while build.sessions:
            sessions, build.sessions = build.sessions, []
            try:
                await self._sessions.compiled(sessions, status, error, _UNBOUNDED)
            except Exception as exc:  # the database is away: the sessions' next call records it
                if not isinstance(exc, LambdaError):
                    log.exception("recording a compile outcome failed")
                log.warning(
                    "the compile outcome (%s) of %d sessions was not recorded, and is at their next "
                    "Execute or Initialize: %s (sessions %s)",
                    status.value,
                    len(sessions),
                    exc,
                    ", ".join(sessions[:10]),
                )

    async def sweep(self) -> int:
        """Remove local programs that no unexpired session uses and that are older than
        RUST_ARTIFACT_RETENTION_SECONDS; how many were removed."""
        old = await asyncio.to_thread(_old_programs, self._folder, time.time() - self._retention)
        removed = 0
        for start in range(0, len(old), SWEEP_BATCH):
            batch = old[start : start + SWEEP_BATCH]
            used = await self._store.in_use(sorted({h for _, h, _ in batch}), Deadline.after(SWEEP_SECONDS))
            for name, script_hash, level in batch:
                if (script_hash, level) in used or name in self._building:
                    continue
                if await asyncio.to_thread(_remove_if_older, self._folder / name, self._retention):
                    self._stored.pop(name, None)
                    removed += 1
        return removed

    async def _sweep_loop(self) -> None:
        await sweep_every(self._sweep_interval, self.sweep, "program", self._folder, log)

    async def _make(
        self, key: str, script: str, script_hash: str, level: OptimizationLevel, owner: str
    ) -> bool:
        if key in self._stored:  # made before: the build only records its sessions
            return False
        path = self._folder / key
        program = await self._store.get(key, _UNBOUNDED)
        compiled = False
        if program is None:
            if await asyncio.to_thread(path.exists):  # kept here, but not in this database
                program = await asyncio.to_thread(path.read_bytes)
            else:
                program = await self._compiler.compile(script, level, owner)
                compiled = True
            toolchain = self._compiler.toolchain.version
            await self._store.put(key, script_hash, level.value, toolchain, program, _UNBOUNDED)
        if compiled or not await asyncio.to_thread(path.exists):
            await asyncio.to_thread(_write_program, path, program)
        self._stored[key] = time.monotonic()
        return compiled


def _write_program(path: Path, program: bytes) -> None:
    """Written whole, then renamed: an environment never starts half a program."""
    fd, staged = tempfile.mkstemp(dir=path.parent, prefix=".program-")
    with os.fdopen(fd, "wb") as file:
        file.write(program)
    os.chmod(staged, 0o755)
    os.replace(staged, path)


def _old_programs(folder: Path, before: float) -> list[tuple[str, str, str]]:
    """(file name, script hash, optimization level) of the programs last written before `before`."""
    found = []
    with os.scandir(folder) as entries:
        for entry in entries:
            match = _PROGRAM.fullmatch(entry.name)
            if match is None:
                continue
            with contextlib.suppress(OSError):
                if entry.stat(follow_symlinks=False).st_mtime < before:
                    found.append((entry.name, match["hash"], match["level"]))
    return found


def _remove_if_older(path: Path, retention: float) -> bool:
    """Remove the file unless it was written again since it was found (a compile just now)."""
    try:
        if path.stat().st_mtime >= time.time() - retention:
            return False
        path.unlink()
    except FileNotFoundError:
        return False
    return True
