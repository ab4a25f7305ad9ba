"""Rust programs by script: a local file, else the one stored in PostgreSQL, else compiled now.

A program is kept under its artifact key (script hash, optimization level,
toolchain): in meta.artifacts, so that another replica or a restart runs a script
without compiling it again, and as a file of the local cache, which is what an
environment starts. Concurrent requests for one key share one compile.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from pathlib import Path

from lambda_server.domain import Deadline
from lambda_server.runtimes.rust import RustCompiler
from lambda_server.store.artifacts import ArtifactStore


class RustBuilds:
    """Finds or makes the program of a script."""

    def __init__(self, compiler: RustCompiler, store: ArtifactStore, cache_dir: Path) -> None:
        self._compiler = compiler
        self._store = store
        self._folder = cache_dir / "programs"
        self._folder.mkdir(parents=True, exist_ok=True)
        self._building: dict[str, asyncio.Future[bool]] = {}
        # keys this process has seen in meta.artifacts: a local file of another
        # database's (a machine's cache outlives a deployment) is stored once more
        self._stored: set[str] = set()

    def start(self) -> None:
        """Begin the compiler's one-time dependency build in the background."""
        self._compiler.start()

    async def close(self) -> None:
        await self._compiler.close()

    @property
    def dependencies_state(self) -> str:
        return self._compiler.dependencies_state

    def _key(self, script_hash: str, optimization: str) -> str:
        return f"{script_hash}-{optimization}-{self._compiler.toolchain.identity}"

    async def prepare(self, script: str, script_hash: str, optimization: str, deadline: Deadline) -> bool:
        """Make sure the program exists here; True when it was compiled now, False when it
        was found (here, or in PostgreSQL). ScriptSyntaxError when it does not compile."""
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
            compiled = await self._make(key, script, script_hash, optimization, deadline)
            future.set_result(compiled)
            return compiled
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: a waiter re-raises it, and no waiter is fine too
            raise
        finally:
            del self._building[key]

    async def program(self, script: str, script_hash: str, optimization: str, deadline: Deadline) -> str:
        """The path of the script's program, prepared first when it is not here."""
        await self.prepare(script, script_hash, optimization, deadline)
        return str(self._folder / self._key(script_hash, optimization))

    async def _make(
        self, key: str, script: str, script_hash: str, optimization: str, deadline: Deadline
    ) -> bool:
        path = self._folder / key
        program = await self._store.get(key, deadline)
        compiled = False
        if program is None:
            if await asyncio.to_thread(path.exists):  # kept here, but not in this database
                program = await asyncio.to_thread(path.read_bytes)
            else:
                program = await self._compiler.compile(script, optimization, deadline)
                compiled = True
            toolchain = self._compiler.toolchain.version
            await self._store.put(key, script_hash, optimization, toolchain, program, deadline)
        if compiled or not await asyncio.to_thread(path.exists):
            await asyncio.to_thread(_write_program, path, program)
        self._stored.add(key)
        return compiled


def _write_program(path: Path, program: bytes) -> None:
    """Written whole, then renamed: an environment never starts half a program."""
    fd, staged = tempfile.mkstemp(dir=path.parent, prefix=".program-")
    with os.fdopen(fd, "wb") as file:
        file.write(program)
    os.chmod(staged, 0o755)
    os.replace(staged, path)
