"""Starts runtime processes inside the sandbox, and ends them with their place in it."""

from __future__ import annotations

import asyncio
import tempfile
from typing import Any

from lambda_server.config import RuntimeSettings
from lambda_server.domain import Deadline, Limits
from lambda_server.errors import Unavailable
from lambda_server.runtimes.process import WorkerError, WorkerProcess, WorkerTimeout
from lambda_server.runtimes.registry import RuntimeSpec
from lambda_server.sandbox import Confinement, Sandbox, SandboxUnavailable


class Launcher:
    """Owns every live worker: starts it confined, ends it (now or in the background)."""

    def __init__(self, settings: RuntimeSettings, sandbox: Sandbox) -> None:
        self._settings = settings
        self._sandbox = sandbox
        self._max_frame = settings.max_result_bytes + 6 * settings.max_log_bytes + 65536
        self._confinements: dict[WorkerProcess, Confinement] = {}
        self._endings: set[asyncio.Task[Any]] = set()
        self._closed = False

    @property
    def settings(self) -> RuntimeSettings:
        return self._settings

    async def start(
        self, runtime: RuntimeSpec, limits: Limits, deadline: Deadline, program: str | None = None
    ) -> WorkerProcess:
        """A worker of `runtime` (or a compiled `program` of it), ready for requests,
        inside every active sandbox layer."""
        if self._closed:
            raise Unavailable("the server is shutting down")
        try:
            confinement = self._sandbox.confine(runtime, limits, program)
        except SandboxUnavailable as exc:
            raise Unavailable(f"the {runtime.name} runtime could not be confined: {exc.message}") from None
        env = {  # all a worker gets: never the server's own environment
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "LANG": "C.UTF-8",
            "HOME": tempfile.gettempdir(),
            "LAMBDA_MAX_LOG_BYTES": str(self._settings.max_log_bytes),
            "LAMBDA_MAX_RESULT_BYTES": str(self._settings.max_result_bytes),
        }
        try:
            worker = await WorkerProcess.spawn(
                confinement.argv,
                env,
                timeout=deadline.cap(self._settings.spawn_timeout_seconds),
                max_frame=self._max_frame,
                cwd=tempfile.gettempdir(),
            )
        except (OSError, WorkerError) as exc:
            await confinement.release()
            why = str(exc) or type(exc).__name__
            if isinstance(exc, WorkerTimeout):
                why += " (RUNTIME_START_TIMEOUT_SECONDS)"
            raise Unavailable(f"the {runtime.name} runtime could not start: {why}") from None
        except BaseException:
            await confinement.release()
            raise
        self._confinements[worker] = confinement
        if self._closed:
            await self.end(worker)
            raise Unavailable("the server is shutting down")
        return worker

    async def end(self, worker: WorkerProcess) -> None:
        """Kill a worker and release its place in the sandbox."""
        await worker.kill()
        confinement = self._confinements.pop(worker, None)
        if confinement is not None:
            await confinement.release()

    def discard(self, worker: WorkerProcess) -> None:
        """End a worker in the background; it is never used again."""
        task = asyncio.get_running_loop().create_task(self.end(worker))
        self._endings.add(task)
        task.add_done_callback(self._endings.discard)

    def out_of_memory(self, worker: WorkerProcess) -> bool:
        """Whether the kernel's OOM killer (cgroup) or V8's heap limit ended the worker."""
        confinement = self._confinements.get(worker)
        if confinement is not None and confinement.memory_exhausted():
            return True
        tail = worker.stderr_tail()  # V8's heap limit, or the Rust worker's failed allocation
        return "heap out of memory" in tail or "memory allocation failed" in tail

    def park(self, worker: WorkerProcess) -> None:
        """The worker goes idle: nothing of its script runs until `resume`."""
        confinement = self._confinements.get(worker)
        if confinement is not None:
            confinement.freeze()

    def resume(self, worker: WorkerProcess) -> None:
        """The worker is about to run an execution."""
        confinement = self._confinements.get(worker)
        if confinement is not None:
            confinement.thaw()

    def has_stragglers(self, worker: WorkerProcess) -> bool:
        """Whether the script left processes behind in the worker's environment."""
        confinement = self._confinements.get(worker)
        return confinement is not None and confinement.has_stragglers()

    async def close(self) -> None:
        """End every worker still alive; no start succeeds after this."""
        self._closed = True
        await asyncio.gather(*self._endings, return_exceptions=True)
        await asyncio.gather(*(self.end(w) for w in list(self._confinements)), return_exceptions=True)
