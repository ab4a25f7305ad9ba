"""The environment pool: warm runtime processes bound to (owner, runtime, script_hash).

An environment is one worker process bound to one script of one owner; it is
never shared across owners or scripts, and runs one execution at a time. Each
runtime keeps a few pre-started, unbound processes, so binding a new script
costs a `load` message rather than a process start. Executions of one key get
up to `max_environments_per_key` environments; at most `max_environments` are
bound at once, the least recently used idle one making room for a new one.
Beyond those caps an execution waits, for a bounded time, then fails
RuntimeBusy (RESOURCE_EXHAUSTED). Idle environments past their TTL are killed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict, defaultdict, deque
from dataclasses import dataclass
from typing import Any

from lambda_server.config import RuntimeSettings
from lambda_server.domain import (
    JSON,
    Deadline,
    EnvironmentState,
    ExecutionFailure,
    ExecutionOutcome,
    FailureCode,
    Limits,
)
from lambda_server.errors import RuntimeBusy, Unavailable
from lambda_server.runtimes.checker import ScriptChecker
from lambda_server.runtimes.launcher import Launcher
from lambda_server.runtimes.process import (
    FrameTooLarge,
    WorkerCrashed,
    WorkerProcess,
    WorkerTimeout,
    answer_int,
)
from lambda_server.runtimes.registry import RuntimeSpec
from lambda_server.sandbox import Sandbox

log = logging.getLogger(__name__)

REAP_INTERVAL = 5.0
REFILL_DELAY = 0.02  # seconds: a first execution in a pre-started process takes about 3 ms


@dataclass(frozen=True)
class EnvironmentKey:
    owner: str
    runtime: str
    script_hash: str
    limits: Limits


@dataclass(frozen=True)
class Job:
    """One execution to run."""

    runtime: RuntimeSpec
    owner: str
    script_hash: str
    script: str
    event: dict[str, JSON]
    timeout: float
    limits: Limits
    program: str | None = None  # a compiled runtime's program for the script (Rust)


@dataclass
class _Slot:
    """An execution's claim on an environment: an idle one, or room to bind a new one."""

    key: EnvironmentKey
    worker: WorkerProcess | None


@dataclass(eq=False)
class _Waiter:
    """An execution waiting for a slot; served by the release that makes room for it."""

    key: EnvironmentKey
    slot: asyncio.Future[_Slot]


class EnvironmentPool:
    """Runs jobs in environments; checks scripts in a per-runtime checker process."""

    def __init__(
        self,
        settings: RuntimeSettings,
        runtimes: dict[str, RuntimeSpec],
        sandbox: Sandbox,
        default_limits: Limits,
    ) -> None:
        self._settings = settings
        self._runtimes = runtimes
        self._default_limits = default_limits
        self._launcher = Launcher(settings, sandbox)
        self._checker = ScriptChecker(self._launcher, default_limits)
        self._idle: OrderedDict[WorkerProcess, EnvironmentKey] = OrderedDict()  # least recent first
        self._busy: dict[EnvironmentKey, int] = defaultdict(int)
        self._bound = 0  # idle + busy-or-binding environments
        # executions waiting for a slot, first come first served; none can be served while
        # they wait (every change that frees room serves them, in _serve_waiting)
        self._waiting: deque[_Waiter] = deque()
        self._warm: dict[str, list[WorkerProcess]] = defaultdict(list)
        self._refills: dict[str, asyncio.Task[None]] = {}
        self._reaper: asyncio.Task[None] | None = None
        self._closed = False

    # life cycle

    async def start(self) -> None:
        """Start each runtime's checker and pre-started processes."""
        for spec in self._runtimes.values():
            if spec.available and not spec.compiled:  # a program of its own per script
                await self._checker.start(spec, Deadline.after(self._settings.spawn_timeout_seconds))
                self._refill(spec)
        self._reaper = asyncio.create_task(self._reap_idle())

    async def close(self) -> None:
        self._closed = True
        tasks = [*self._refills.values(), *([self._reaper] if self._reaper else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._idle.clear()
        self._warm.clear()
        await self._launcher.close()

    def counts(self) -> dict[str, dict[str, int]]:
        """Processes of each available runtime: warm (pre-started, unbound), busy, idle (bound)."""
        counts = {
            name: {"warm": len(self._warm.get(name, ())), "busy": 0, "idle": 0}
            for name, spec in self._runtimes.items()
            if spec.available
        }
        for key in self._idle.values():
            counts[key.runtime]["idle"] += 1
        for key, busy in self._busy.items():
            counts[key.runtime]["busy"] += busy
        return counts

    def status(self) -> dict[str, str]:
        counts = self.counts()
        report = {}
        for name, spec in self._runtimes.items():
            if spec.available:
                c = counts[name]
                toolchain = f"{spec.version}, " if spec.version else ""
                report[f"runtime.{name}"] = (
                    f"ok ({toolchain}warm={c['warm']}, busy={c['busy']}, idle={c['idle']})"
                )
            else:
                report[f"runtime.{name}"] = f"unavailable: {spec.missing}"
        return report

    async def check(
        self, runtime: RuntimeSpec, script: str, script_hash: str, deadline: Deadline, owner: str = ""
    ) -> bool:
        """Compile without running (True), or pass a script that compiled before (False);
        ScriptSyntaxError with line and column when it fails. `owner` is billed for it."""
        return await self._checker.check(runtime, script, script_hash, deadline, owner)

    # executing

    async def execute(self, job: Job, deadline: Deadline) -> ExecutionOutcome:
        key = EnvironmentKey(job.owner, job.runtime.name, job.script_hash, job.limits)
        slot = self._try_acquire(key) or await self._wait_for_slot(key, deadline)
        try:
            return await self._run(slot, job, deadline)
        finally:
            self._release(slot)

    async def _wait_for_slot(self, key: EnvironmentKey, deadline: Deadline) -> _Slot:
        if len(self._waiting) >= self._settings.max_queued:
            raise RuntimeBusy(f"{len(self._waiting)} executions are already waiting for an environment")
        waiter = _Waiter(key, asyncio.get_running_loop().create_future())
        self._waiting.append(waiter)
        wait = deadline.cap(self._settings.queue_timeout_seconds)
        try:
            async with asyncio.timeout(wait):
                return await waiter.slot
        except BaseException as exc:
            if waiter.slot.done() and not waiter.slot.cancelled():
                self._release(waiter.slot.result())  # served as it gave up: the slot goes back
            else:
                self._waiting.remove(waiter)
            if isinstance(exc, TimeoutError):
                raise RuntimeBusy(
                    f"no environment for this script became free within {wait:g} s "
                    f"(RUNTIME_QUEUE_TIMEOUT_SECONDS, or the call's deadline; "
                    f"{self._settings.max_environments_per_key} per script, "
                    f"{self._settings.max_environments} in all)"
                ) from None
            raise

    def _serve_waiting(self) -> None:
        """Hand the room just freed to the executions waiting, in their order."""
        for waiter in list(self._waiting):
            if self._bound >= self._settings.max_environments and not self._idle:
                return  # no room for any key
            if waiter.slot.done():  # cancelled (it timed out, or its call ended): it leaves itself
                continue
            slot = self._try_acquire(waiter.key)
            if slot is not None:
                self._waiting.remove(waiter)
                waiter.slot.set_result(slot)

    def _try_acquire(self, key: EnvironmentKey) -> _Slot | None:
        if self._busy.get(key, 0) >= self._settings.max_environments_per_key:
            return None
        for worker in reversed(self._idle):  # the most recently used first
            if self._idle[worker] == key:
                del self._idle[worker]
                if worker.alive():
                    self._launcher.resume(worker)
                    self._busy[key] += 1
                    return _Slot(key, worker)
                self._discard(worker)
                self._bound -= 1
                return self._try_acquire(key)
        if self._bound >= self._settings.max_environments:
            if not self._idle:
                return None
            victim, _ = self._idle.popitem(last=False)  # least recently used makes room
            self._discard(victim)
            self._bound -= 1
        self._bound += 1
        self._busy[key] += 1
        return _Slot(key, None)

    def _release(self, slot: _Slot) -> None:
        self._busy[slot.key] -= 1
        if self._busy[slot.key] == 0:
            del self._busy[slot.key]
        if slot.worker is not None and slot.worker.alive() and not self._closed:
            self._launcher.park(slot.worker)
            self._idle[slot.worker] = slot.key
        else:
            if slot.worker is not None:
                self._discard(slot.worker)
            self._bound -= 1
        if self._waiting:
            self._serve_waiting()

    async def _run(self, slot: _Slot, job: Job, deadline: Deadline) -> ExecutionOutcome:
        started = time.perf_counter()
        timeout = deadline.cap(job.timeout)
        state = EnvironmentState.WARM
        worker = slot.worker
        try:
            if worker is None:
                worker, state = await self._take_unbound(job, deadline)
                slot.worker = worker
                timeout = max(0.0, timeout - (time.perf_counter() - started))
                # bind and run in one round trip; `loaded` is false when the script did not load
                bind = {"op": "load", "script": job.script, "event": job.event}
                answer = await worker.request(bind, timeout)
                if answer.get("loaded") is False:
                    self._drop(slot)
                    return _outcome(answer, started, state)
            else:
                answer = await worker.request({"op": "run", "event": job.event}, timeout)
        except WorkerTimeout:
            self._drop(slot)
            message = f"the script ran past its timeout of {job.timeout:g} s"
            return _failed(FailureCode.TIMEOUT, message, started, state)
        except FrameTooLarge as exc:
            self._drop(slot)
            return _failed(
                FailureCode.OUTPUT_LIMIT, f"the script's output is too large: {exc}", started, state
            )
        except WorkerCrashed as exc:
            if worker is not None and self._launcher.out_of_memory(worker):
                self._drop(slot)
                message = f"the script went past its memory limit of {job.limits.memory_mb} MiB"
                return _failed(FailureCode.MEMORY_LIMIT, message, started, state)
            self._drop(slot)
            return _failed(FailureCode.RUNTIME_ERROR, f"the runtime process crashed: {exc}", started, state)
        except BaseException:  # cancelled, or the runtime could not start
            self._drop(slot)
            raise
        outcome = _outcome(answer, started, state)
        if outcome.failure is not None and outcome.failure.code is FailureCode.MEMORY_LIMIT:
            self._drop(slot)  # a process that ran out of memory is not trusted again
        elif self._launcher.has_stragglers(worker):
            self._drop(slot)  # processes the script left behind end with their environment
        return outcome

    def _drop(self, slot: _Slot) -> None:
        """The slot's worker is killed (if it is not dead already) and never used again."""
        if slot.worker is not None:
            self._discard(slot.worker)
            slot.worker = None

    async def _take_unbound(self, job: Job, deadline: Deadline) -> tuple[WorkerProcess, EnvironmentState]:
        """A pre-started process of the runtime, or a new one when none is ready.

        Pre-started processes have the default limits; other limits start a process,
        and so does a compiled program (its script is bound when it starts).
        """
        runtime, limits = job.runtime, job.limits
        if job.program is not None:
            return await self._launcher.start(runtime, limits, deadline, job.program), EnvironmentState.COLD
        if limits != self._default_limits:
            return await self._launcher.start(runtime, limits, deadline), EnvironmentState.COLD
        warm = self._warm[runtime.name]
        while warm:
            worker = warm.pop()
            # after the bind this worker is taken for: a start (fork, sandbox set-up) next to
            # it would take a millisecond of its CPU
            asyncio.get_running_loop().call_later(REFILL_DELAY, self._refill, runtime)
            if worker.alive():
                return worker, EnvironmentState.PREWARMED
            self._discard(worker)
        self._refill(runtime)
        return await self._launcher.start(runtime, limits, deadline), EnvironmentState.COLD

    def _refill(self, runtime: RuntimeSpec) -> None:
        """Start processes in the background until the runtime has its pre-started few."""
        task = self._refills.get(runtime.name)
        if self._closed or (task is not None and not task.done()):
            return
        if len(self._warm[runtime.name]) < self._settings.prewarm_per_runtime:
            self._refills[runtime.name] = asyncio.create_task(self._refill_loop(runtime))

    async def _refill_loop(self, runtime: RuntimeSpec) -> None:
        failures = 0
        while not self._closed and len(self._warm[runtime.name]) < self._settings.prewarm_per_runtime:
            try:
                deadline = Deadline.after(self._settings.spawn_timeout_seconds)
                worker = await self._launcher.start(runtime, self._default_limits, deadline)
            except Unavailable as exc:
                failures += 1
                log.warning("could not pre-start a %s process: %s", runtime.name, exc)
                await asyncio.sleep(min(30.0, 0.5 * 2**failures))
                continue
            failures = 0
            self._warm[runtime.name].append(worker)

    async def _reap_idle(self) -> None:
        """Kill environments idle for longer than their TTL."""
        while True:
            await asyncio.sleep(min(REAP_INTERVAL, self._settings.idle_ttl_seconds))
            limit = time.monotonic() - self._settings.idle_ttl_seconds
            expired = [worker for worker in self._idle if worker.last_used < limit]
            for worker in expired:
                del self._idle[worker]
                self._discard(worker)
                self._bound -= 1
            if expired and self._waiting:
                self._serve_waiting()

    def _discard(self, worker: WorkerProcess) -> None:
        self._launcher.discard(worker)


def _outcome(answer: dict[str, Any], started: float, state: EnvironmentState) -> ExecutionOutcome:
    duration = time.perf_counter() - started
    logs = str(answer.get("logs", ""))
    cpu = _float(answer.get("cpu"))
    peak = answer_int(answer.get("peak"), limit=2**62)
    if answer.get("ok"):
        return ExecutionOutcome(answer.get("result"), None, duration, logs, state, cpu, peak)
    error = answer.get("error") or {}
    try:
        code = FailureCode(error.get("code"))
    except ValueError:
        code = FailureCode.RUNTIME_ERROR
    failure = ExecutionFailure(
        code=code,
        message=str(error.get("message", "")),
        line=answer_int(error.get("line")),
        column=answer_int(error.get("column")),
        stack_trace=str(error.get("stack", "")),
    )
    return ExecutionOutcome(None, failure, duration, logs, state, cpu, peak)


def _failed(code: FailureCode, message: str, started: float, state: EnvironmentState) -> ExecutionOutcome:
    failure = ExecutionFailure(code, message)
    return ExecutionOutcome(None, failure, time.perf_counter() - started, "", state)


def _float(value: object) -> float:
    return float(value) if isinstance(value, int | float) and value >= 0 else 0.0
