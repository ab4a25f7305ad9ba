"""Starts runtime processes inside the sandbox, and ends them with their place in it."""

from __future__ import annotations

import asyncio
import tempfile
from typing import Any

from lambda_server.config import RuntimeSettings
from lambda_server.domain import Deadline, Limits
from lambda_server.errors import NotStarted
from lambda_server.runtimes.budget import MemoryBudget
from lambda_server.runtimes.process import WorkerError, WorkerProcess, WorkerTimeout
from lambda_server.runtimes.registry import RuntimeSpec
from lambda_server.sandbox import Command, Confinement, Sandbox, SandboxUnavailable
from lambda_server.sandbox.cgroups import EnvironmentCgroup


def command(runtime: RuntimeSpec, limits: Limits, program: str | None = None) -> Command:
    """The sandbox's command for a process of `runtime`: its worker, or the compiled
    `program` a compiled runtime (Rust) runs in place of one."""
    worker = str(program or runtime.worker)
    return Command(
        tuple(runtime.argv(worker, limits.memory_mb)),
        limits,
        files=(worker,),
        binds=runtime.binds,
        cap_address_space=runtime.caps_address_space,
    )


class Launcher:
    """Owns every live worker: starts it confined, ends it (now or in the background).

    Each live worker holds its memory limit in the memory budget until it is discarded.
    """

    def __init__(
        self, settings: RuntimeSettings, sandbox: Sandbox, budget: MemoryBudget | None = None
    ) -> None:
        self._settings = settings
        self._sandbox = sandbox
        self.budget = budget or MemoryBudget(None)
        self._max_frame = settings.max_result_bytes + 6 * settings.max_log_bytes + 65536
        self._confinements: dict[WorkerProcess, Confinement] = {}
        self._held: dict[WorkerProcess, int] = {}  # MiB of the budget each worker holds
        self._endings: set[asyncio.Task[Any]] = set()
        self._closed = False

    @property
    def settings(self) -> RuntimeSettings:
        return self._settings

    async def start(
        self,
        runtime: RuntimeSpec,
        limits: Limits,
        deadline: Deadline,
        program: str | None = None,
        reserved: bool = False,
    ) -> WorkerProcess:
        """A worker of `runtime` (or a compiled `program` of it), ready for requests,
        inside every active sandbox layer.

        `reserved`: the caller took `limits.memory_mb` from the budget already (the pool
        does, to wait for it fairly), and hands it over here; otherwise it is taken here,
        evicting idle environments if need be, or RuntimeBusy.
        """
        if not reserved:
            self.budget.take_or_reclaim(limits.memory_mb, f"a {runtime.name} process")
        try:
            return await self._start(runtime, limits, deadline, program)
        except BaseException:
            self.budget.give_back(limits.memory_mb)
            raise

    async def _start(
        self, runtime: RuntimeSpec, limits: Limits, deadline: Deadline, program: str | None
    ) -> WorkerProcess:
        if self._closed:
            raise NotStarted("the server is shutting down")
        try:
            confinement = await self._sandbox.confine(command(runtime, limits, program))
        except SandboxUnavailable as exc:
            why = exc.message
            raise SandboxUnavailable(f"the {runtime.name} runtime could not be confined: {why}") from None
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
                max_output=self._settings.max_log_bytes,
            )
        except (OSError, WorkerError) as exc:
            await confinement.release()
            why = str(exc) or type(exc).__name__
            if isinstance(exc, WorkerTimeout):
                why += " (RUNTIME_START_TIMEOUT_SECONDS)"
            raise NotStarted(f"the {runtime.name} runtime could not start: {why}") from None
        except BaseException:
            await confinement.release()
            raise
        confinement.started()
        if self._closed:
            await worker.kill()
            await confinement.release()
            raise NotStarted("the server is shutting down")
        self._confinements[worker] = confinement
        self._held[worker] = limits.memory_mb
        return worker

    async def end(self, worker: WorkerProcess) -> None:
        """Kill a worker and release its place in the sandbox."""
        self.budget.give_back(self._held.pop(worker, 0))
        await worker.kill()
        confinement = self._confinements.pop(worker, None)
        if confinement is not None:
            await confinement.release()

    def discard(self, worker: WorkerProcess) -> None:
        """End a worker in the background; it is never used again. Its memory is given
        back at once: the SIGKILL that follows frees it within milliseconds."""
        self.budget.give_back(self._held.pop(worker, 0))
        task = asyncio.get_running_loop().create_task(self.end(worker))
        self._endings.add(task)
        task.add_done_callback(self._endings.discard)

    def out_of_memory(self, worker: WorkerProcess) -> bool:
        """Whether the environment's own memory limit (its cgroup's, with an OOM kill)
        or V8's heap limit ended the worker."""
        cgroup = self._cgroup(worker)
        if cgroup is not None and cgroup.oom_kills() > 0 and cgroup.limit_reached():
            return True
        tail = worker.stderr_tail()  # V8's heap limit, or the Rust worker's failed allocation
        return "heap out of memory" in tail or "memory allocation failed" in tail

    def assign(self, worker: WorkerProcess, owner: str) -> None:
        """The worker is bound to a script of `owner`: its CPU is billed to the owner's share
        once the move started here is done (on the sandbox's thread, not waited for: a
        first execution's first milliseconds are billed to the pre-started group)."""
        confinement = self._confinements.get(worker)
        if confinement is not None:
            confinement.join_owner(owner)

    def killed_by_host(self, worker: WorkerProcess) -> bool:
        """Whether an OOM killer other than the environment's own limit ended the worker:
        the host's, or a limit above the server's environments (its container's)."""
        cgroup = self._cgroup(worker)
        return cgroup is not None and cgroup.oom_kills() > 0 and not cgroup.limit_reached()

    def _cgroup(self, worker: WorkerProcess) -> EnvironmentCgroup | None:
        confinement = self._confinements.get(worker)
        return confinement.cgroup if confinement is not None else None

    def park(self, worker: WorkerProcess) -> None:
        """The worker goes idle: nothing of its script runs from SANDBOX_FREEZE_AFTER_MS on
        until `resume`."""
        confinement = self._confinements.get(worker)
        if confinement is not None:
            confinement.park()

    def resume(self, worker: WorkerProcess) -> None:
        """The worker is about to run an execution."""
        confinement = self._confinements.get(worker)
        if confinement is not None:
            confinement.resume()

    def has_stragglers(self, worker: WorkerProcess) -> bool:
        """Whether the script left processes behind in the worker's environment."""
        confinement = self._confinements.get(worker)
        return confinement is not None and confinement.has_stragglers()

    async def close(self) -> None:
        """End every worker still alive; no start succeeds after this."""
        self._closed = True
        await asyncio.gather(*self._endings, return_exceptions=True)
        await asyncio.gather(*(self.end(w) for w in list(self._confinements)), return_exceptions=True)
