"""Rust programs by script: a local file, else the one stored in PostgreSQL, else compiled now.

A program is kept under its artifact key (script hash, optimization level,
toolchain): in meta.artifacts, so that another replica or a restart runs a script
without compiling it again, and as a file of the local cache, which is what an
environment starts. Concurrent requests for one key share one compile.

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
from pathlib import Path

from lambda_server.domain import Deadline
from lambda_server.errors import LambdaError
from lambda_server.runtimes.rust import RustCompiler
from lambda_server.store.artifacts import ArtifactStore

log = logging.getLogger(__name__)

# a program's file name: its artifact key
_PROGRAM = re.compile(r"(?P<hash>[0-9a-f]{64})-(?P<level>debug|release)-[0-9a-f]+")
SWEEP_BATCH = 500  # local programs looked up in one statement
SWEEP_SECONDS = 5.0


class RustBuilds:
    """Finds or makes the program of a script."""

    def __init__(
        self,
        compiler: RustCompiler,
        store: ArtifactStore,
        cache_dir: Path,
        retention_seconds: float = 86400.0,
        sweep_interval: float = 60.0,
    ) -> None:
        self._compiler = compiler
        self._store = store
        self._retention = retention_seconds
        self._sweep_interval = sweep_interval
        self._sweeper: asyncio.Task[None] | None = None
        self._folder = cache_dir / "programs"
        self._folder.mkdir(parents=True, exist_ok=True)
        self._building: dict[str, asyncio.Future[bool]] = {}
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
        sweeper, self._sweeper = self._sweeper, None
        if sweeper is not None:
            sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweeper
        await self._compiler.close()

    @property
    def dependencies_state(self) -> str:
        return self._compiler.dependencies_state

    def _key(self, script_hash: str, optimization: str) -> str:
        return f"{script_hash}-{optimization}-{self._compiler.toolchain.identity}"

    async def prepare(
        self, script: str, script_hash: str, optimization: str, deadline: Deadline, owner: str = ""
    ) -> bool:
        """Make sure the program exists here; True when it was compiled now, False when it
        was found (here, or in PostgreSQL). ScriptSyntaxError when it does not compile,
        ScriptLimitExceeded past a compile's limits; a compile is billed to `owner`."""
        key = self._key(script_hash, optimization)
        if key in self._stored:
            return False
        running = self._building.get(key)
        if running is not None:
            await asyncio.shield(running)
            return False
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._building[key] = future
        try:
            compiled = await self._make(key, script, script_hash, optimization, deadline, owner)
            future.set_result(compiled)
            return compiled
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: a waiter re-raises it, and no waiter is fine too
            raise
        finally:
            del self._building[key]

    async def program(
        self, script: str, script_hash: str, optimization: str, deadline: Deadline, owner: str = ""
    ) -> str:
        """The path of the script's program, prepared first when it is not here."""
        key = self._key(script_hash, optimization)
        path = self._folder / key
        seen = self._stored.get(key)
        if seen is not None and time.monotonic() - seen > self._sweep_interval:
            if await asyncio.to_thread(path.exists):
                self._stored[key] = time.monotonic()
            else:
                del self._stored[key]  # swept by another server sharing the folder
        await self.prepare(script, script_hash, optimization, deadline, owner)
        return str(path)

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
        while True:
            await asyncio.sleep(self._sweep_interval)
            try:
                removed = await self.sweep()
            except LambdaError as exc:  # the database is away: the next pass tries again
                log.warning("program sweep: %s", exc.message)
                continue
            except Exception:  # a bug: say so, and keep sweeping
                log.exception("program sweep failed")
                continue
            if removed:
                log.info("program sweep: %d unused programs removed from %s", removed, self._folder)

    async def _make(
        self, key: str, script: str, script_hash: str, optimization: str, deadline: Deadline, owner: str
    ) -> bool:
        path = self._folder / key
        program = await self._store.get(key, deadline)
        compiled = False
        if program is None:
            if await asyncio.to_thread(path.exists):  # kept here, but not in this database
                program = await asyncio.to_thread(path.read_bytes)
            else:
                program = await self._compiler.compile(script, optimization, deadline, owner)
                compiled = True
            toolchain = self._compiler.toolchain.version
            await self._store.put(key, script_hash, optimization, toolchain, program, deadline)
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
