"""The environment pool: warm runtime processes bound to (owner, runtime, script_hash, layer).

An environment is one worker process bound to one script of one owner; it is
never shared across owners or scripts, and runs one execution at a time. Each
runtime keeps a few pre-started, unbound processes, so binding a new script
costs a `load` message rather than a process start. Executions of one key get
up to `max_environments_per_key` environments; at most `max_environments` are
bound at once, and each owner holds at most its share of them
(`max_environments_per_owner`) and of the memory budget (the same fraction of
SANDBOX_TOTAL_MEMORY_MB). Every live process holds its memory limit in the
budget (runtimes/budget.py).

Room for a new environment is made by evicting idle ones, least recently used
first: an owner at its share only ever evicts its own; an owner under it evicts
first its own or those of owners over their fair share, then anyone's. Beyond
that an execution waits, for a bounded time, then fails RuntimeBusy
(RESOURCE_EXHAUSTED); waiting executions are served round robin across owners.
Idle environments past their TTL are killed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict, defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from lambda_server.config import RuntimeSettings
from lambda_server.domain import (
    ComponentHealth,
    ComponentStatus,
    Deadline,
    EnvironmentState,
    ExecutionFailure,
    ExecutionOutcome,
    FailureCode,
    Job,
    Limits,
    OutputSink,
)
from lambda_server.errors import QuotaExceeded, RuntimeBusy, RuntimeNotAvailable, Unavailable
from lambda_server.runtimes.budget import MemoryBudget
from lambda_server.runtimes.checker import ScriptChecker
from lambda_server.runtimes.fairqueue import FairQueue
from lambda_server.runtimes.launcher import Launcher
from lambda_server.runtimes.process import (
    FrameTooLarge,
    WorkerCrashed,
    WorkerProcess,
    WorkerTimeout,
    answer_int,
)
from lambda_server.runtimes.registry import RuntimeSpec
from lambda_server.runtimes.shares import Held, Shares, Usage
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
    layer: str | None = None  # the folder of the script's dependencies: its own environments


@dataclass
class Slot:
    """An execution's claim on an environment: an idle one (`loaded`), a pre-started
    process to bind, or (worker None) room to start one, its memory `reserved`. Outside
    this module it is read only (runtimes/batch.py: `loaded`, `worker`)."""

    key: EnvironmentKey
    worker: WorkerProcess | None
    loaded: bool = True
    reserved: bool = False


@dataclass(frozen=True)
class Ran:
    """An execution in a slot's environment (EnvironmentPool.run): its outcome, whether the
    environment may run more (`kept`; else it was dropped), and whether the script loaded
    (False: its top level failed, so it would for any event)."""

    outcome: ExecutionOutcome
    kept: bool
    loaded: bool = True


@dataclass(eq=False)
class _Waiter:
    """An execution waiting for a slot; served by the release that makes room for it."""

    key: EnvironmentKey
    slot: asyncio.Future[Slot]


class EnvironmentPool:
    """Runs jobs in environments; checks scripts in a per-runtime checker process."""

    def __init__(
        self,
        settings: RuntimeSettings,
        runtimes: Mapping[str, RuntimeSpec],  # the registry's view: follows its bind()
        sandbox: Sandbox,
        default_limits: Limits,
        total_memory_mb: int | None = None,
    ) -> None:
        """`total_memory_mb`: the memory budget (SANDBOX_TOTAL_MEMORY_MB, resolved); None: none."""
        self._settings = settings
        self._runtimes = runtimes
        self._default_limits = default_limits
        self._budget = MemoryBudget(total_memory_mb)
        self._budget.on_free = self._memory_freed
        self._budget.reclaim = self._reclaim
        self._shares = Shares(settings.max_environments, settings.max_environments_per_owner, total_memory_mb)
        self._launcher = Launcher(settings, sandbox, self._budget)
        self._checker = ScriptChecker(self._launcher, default_limits)
        self._idle: OrderedDict[WorkerProcess, EnvironmentKey] = OrderedDict()  # least recent first
        self._busy: dict[EnvironmentKey, int] = defaultdict(int)
        self._bound = 0  # idle + busy-or-binding environments
        self._owners: dict[str, Usage] = {}  # only owners that hold some
        # executions waiting for a slot; none can be served while they wait (every change
        # that frees room serves them, in _serve_waiting)
        self._waiting: FairQueue[_Waiter] = FairQueue()
        self._warm: dict[str, list[WorkerProcess]] = defaultdict(list)
        self._refills: dict[str, asyncio.Task[None]] = {}
        self._refill_paused = False
        # an execution found the budget short since the waiters were last served: what
        # memory is given back goes to them, not to pre-starting processes
        self._short_of_memory = False
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

    def status(self) -> list[ComponentHealth]:
        """Each runtime (its processes' counts) and the environments (bound, owners, waiting,
        memory); counts only: owners' names are not for every caller of Health."""
        counts = self.counts()
        report = []
        for name, spec in self._runtimes.items():
            if spec.available:
                c = counts[name]
                toolchain = f"{spec.version}, " if spec.version else ""
                detail = f"ok ({toolchain}warm={c['warm']}, busy={c['busy']}, idle={c['idle']})"
                report.append(ComponentHealth(f"runtime.{name}", ComponentStatus.OK, detail, counts=c))
            else:
                detail = f"unavailable: {spec.missing}"
                report.append(ComponentHealth(f"runtime.{name}", ComponentStatus.UNAVAILABLE, detail))
        environments = {
            "bound": self._bound,
            "max_environments": self._settings.max_environments,
            "owners": len(self._owners),
            "waiting": len(self._waiting),
            "memory_mb": self._budget.used,
        }
        if self._budget.total is not None:
            environments["memory_total_mb"] = self._budget.total
        detail = (
            f"ok (bound={self._bound}/{self._settings.max_environments}, owners={len(self._owners)}, "
            f"waiting={len(self._waiting)}, memory={self._budget.describe()})"
        )
        report.append(ComponentHealth("environments", ComponentStatus.OK, detail, counts=environments))
        return report

    async def check(
        self, runtime: RuntimeSpec, script: str, script_hash: str, deadline: Deadline, owner: str = ""
    ) -> bool:
        """Compile without running (True), or pass a script that compiled before (False);
        ScriptSyntaxError with line and column when it fails. `owner` is billed for it."""
        return await self._checker.check(runtime, script, script_hash, deadline, owner)

    # executing

    async def execute(
        self, job: Job, deadline: Deadline, output: OutputSink | None = None
    ) -> ExecutionOutcome:
        """Run the job; with `output`, its console output goes there too as it is written.
        A caller cancelled meanwhile (ExecuteStream's) kills the execution's environment."""
        slot = await self.acquire(self.environment_key(job), deadline)
        try:
            return (await self.run(slot, job, deadline, output)).outcome
        finally:
            self._release(slot)

    def _refuse_what_never_fits(self, key: EnvironmentKey) -> None:
        share = self._shares.owner_memory_mb
        if key.limits.memory_mb > share:
            raise RuntimeBusy(
                f"an environment of {key.limits.memory_mb} MiB can never fit in an owner's share "
                f"({share:.0f} MiB) of the environments' memory budget of {self._budget.total} MiB "
                f"(SANDBOX_TOTAL_MEMORY_MB * MAX_ENVIRONMENTS_PER_OWNER / MAX_ENVIRONMENTS)"
            )

    async def _wait_for_slot(self, key: EnvironmentKey, deadline: Deadline) -> Slot:
        if len(self._waiting) >= self._settings.max_queued:
            raise RuntimeBusy(f"{len(self._waiting)} executions are already waiting for an environment")
        if self._waiting.waiting(key.owner) >= self._settings.max_queued_per_owner:
            raise QuotaExceeded(
                f"{self._waiting.waiting(key.owner)} of this caller's executions are already waiting "
                f"for an environment (MAX_QUEUED_EXECUTIONS_PER_OWNER)",
                retry_after=1.0,
            )
        waiter = _Waiter(key, asyncio.get_running_loop().create_future())
        self._waiting.push(key.owner, waiter)
        wait = deadline.cap(self._settings.queue_timeout_seconds)
        try:
            async with asyncio.timeout(wait):
                return await waiter.slot
        except BaseException as exc:
            if waiter.slot.done() and not waiter.slot.cancelled():
                self._release(waiter.slot.result())  # served as it gave up: the slot goes back
            else:
                self._waiting.remove(key.owner, waiter)
            if isinstance(exc, TimeoutError):
                raise RuntimeBusy(
                    f"no environment for this script became free within {wait:g} s "
                    f"(RUNTIME_QUEUE_TIMEOUT_SECONDS, or the call's deadline; "
                    f"{self._settings.max_environments_per_key} per script, "
                    f"{self._settings.max_environments_per_owner} per caller, "
                    f"{self._settings.max_environments} in all; memory {self._budget.describe()}, "
                    f"SANDBOX_TOTAL_MEMORY_MB)"
                ) from None
            raise

    def _serve_waiting(self) -> None:
        """Hand the room just freed to the executions waiting, owners in turn."""
        # Whether a waiter can be served depends on its key (an idle environment of it, the
        # per-script cap) or else on its owner and limits (room for a new one): one refusal
        # answers for every waiter alike until someone is served, so that a release costs
        # little however many one owner has waiting.
        refused: set[EnvironmentKey] = set()
        no_room: set[tuple[str, Limits]] = set()
        idle_keys = set(self._idle.values())

        def take(waiter: _Waiter) -> bool:
            nonlocal idle_keys
            key = waiter.key
            if waiter.slot.done() or key in refused:  # a done one leaves by itself
                return False
            if key not in idle_keys and (
                (key.owner, key.limits) in no_room
                or (self._bound >= self._settings.max_environments and not self._idle)
            ):
                return False
            slot = self._try_acquire(key)
            if slot is None:
                refused.add(key)
                if key not in idle_keys and self._busy.get(key, 0) < self._settings.max_environments_per_key:
                    no_room.add((key.owner, key.limits))
                return False
            refused.clear()
            no_room.clear()
            idle_keys = set(self._idle.values())
            waiter.slot.set_result(slot)
            return True

        self._short_of_memory = False
        self._waiting.serve(take)

    def _try_acquire(self, key: EnvironmentKey) -> Slot | None:
        if self._busy.get(key, 0) >= self._settings.max_environments_per_key:
            return None
        for worker in reversed(self._idle):  # the most recently used first
            if self._idle[worker] == key:
                if worker.alive():
                    del self._idle[worker]
                    self._launcher.resume(worker)
                    self._busy[key] += 1
                    return Slot(key, worker)
                self._evict(worker)
                return self._try_acquire(key)
        prestarted = self._prestarted(key)
        victims = self._room_for(key, 0 if prestarted is not None else key.limits.memory_mb)
        if victims is None:
            return None
        for victim in victims:
            self._evict(victim)
        usage = self._owners.setdefault(key.owner, Usage())
        usage.environments += 1
        usage.memory_mb += key.limits.memory_mb
        self._bound += 1
        self._busy[key] += 1
        if prestarted is not None:
            self._warm[key.runtime].remove(prestarted)
            # after the bind this worker is taken for: a start (fork, sandbox set-up) next to
            # it would take a millisecond of its CPU
            asyncio.get_running_loop().call_later(REFILL_DELAY, self._refill, self._runtimes[key.runtime])
            return Slot(key, prestarted, loaded=False)
        self._budget.take(key.limits.memory_mb)
        return Slot(key, None, loaded=False, reserved=True)

    def _prestarted(self, key: EnvironmentKey) -> WorkerProcess | None:
        """A live pre-started process that can take the key: they have the default limits
        (its memory is held already); a compiled runtime has none."""
        if key.limits != self._default_limits:
            return None
        warm = self._warm.get(key.runtime)
        while warm:
            if warm[-1].alive():
                return warm[-1]
            self._discard(warm.pop())
        return None

    def _room_for(self, key: EnvironmentKey, budget_need_mb: int) -> list[WorkerProcess] | None:
        """The idle environments (and pre-started processes) to evict so that the key's owner
        can bind one more environment, `budget_need_mb` of it new to the budget; None when
        there is no such room now."""
        room = self._shares.room_for(
            key.owner,
            key.limits.memory_mb,
            budget_need_mb,
            self._bound,
            self._budget.free,
            [Held(w, k.owner, k.limits.memory_mb) for w, k in self._idle.items()],
            [Held(w, None, self._default_limits.memory_mb) for warm in self._warm.values() for w in warm],
            self._owners,
            self._waiting.owners(),
        )
        self._short_of_memory |= room.short_of_memory
        return room.victims

    def _evict(self, worker: WorkerProcess) -> None:
        """End an idle environment or a pre-started process, making room."""
        key = self._idle.pop(worker, None)
        if key is not None:
            self._unbind(key)
        else:
            for warm in self._warm.values():
                if worker in warm:
                    warm.remove(worker)
        self._discard(worker)

    def _unbind(self, key: EnvironmentKey) -> None:
        self._bound -= 1
        usage = self._owners[key.owner]
        usage.environments -= 1
        usage.memory_mb -= key.limits.memory_mb
        if usage.environments == 0:
            del self._owners[key.owner]

    def _reclaim(self, memory_mb: int) -> bool:
        """For a process the server itself needs (a checker): evict idle environments, least
        recently used first, and pre-started processes until `memory_mb` fits."""
        free = self._budget.free
        if free is None:
            return True
        candidates = [*self._idle, *(w for warm in self._warm.values() for w in warm)]
        for worker in candidates:
            if free >= memory_mb:
                break
            key = self._idle.get(worker)
            free += key.limits.memory_mb if key is not None else self._default_limits.memory_mb
        if free < memory_mb:
            return False
        for worker in candidates:
            if self._budget.fits(memory_mb):
                break
            self._evict(worker)
        return True

    def _memory_freed(self) -> None:
        if not self._closed:
            self._serve_waiting()
            self._resume_refills()

    def _resume_refills(self) -> None:
        """Pre-start again what a full queue or budget paused, once they have room."""
        if self._refill_paused and not (self._waiting and self._short_of_memory):
            self._refill_paused = False
            for spec in self._runtimes.values():
                if spec.available and not spec.compiled:
                    self._refill(spec)

    def _release(self, slot: Slot) -> None:
        self._busy[slot.key] -= 1
        if self._busy[slot.key] == 0:
            del self._busy[slot.key]
        if slot.reserved:  # its start never began
            slot.reserved = False
            self._budget.give_back(slot.key.limits.memory_mb)
        if slot.worker is not None and slot.loaded and slot.worker.alive() and not self._closed:
            self._launcher.park(slot.worker)
            self._idle[slot.worker] = slot.key
        else:
            if slot.worker is not None:
                self._discard(slot.worker)
            self._unbind(slot.key)
        if self._waiting:
            self._serve_waiting()
        self._resume_refills()

    # what Execute and a batch (runtimes/batch.py) share

    async def run(
        self,
        slot: Slot,
        job: Job,
        deadline: Deadline,
        output: OutputSink | None = None,
        deadline_message: str = "",
    ) -> Ran:
        """Run the job in the slot's environment: a bound one runs the job's event (`run`);
        one not bound yet is bound now (bind) and loads the script with the event in one
        round trip (`load`). The job's timeout counts from here, the bind included; the wait
        for the answer is set after the bind, capped by the deadline (a timeout the deadline
        cut short says `deadline_message`, when given). The slot's worker is dropped when it
        timed out, answered too much, crashed, ran out of memory or left processes behind,
        when the script did not load, and when this is cancelled or the runtime could not
        start (then re-raised: the LambdaError of the launcher)."""
        started = time.perf_counter()
        state = EnvironmentState.WARM
        worker = slot.worker
        capped = False
        try:
            if not slot.loaded:
                worker, state = await self._bind(slot, job, deadline)
                left = max(0.0, job.timeout - (time.perf_counter() - started))
                timeout = deadline.cap(left)
                capped = timeout < left
                # bind and run in one round trip; `loaded` is false when the script did not load
                bind = {"op": "load", "script": job.script, "event": job.event}
                if job.layer:  # the worker puts the layer's packages first on its path
                    bind["layer"] = job.layer
                answer = await worker.request(bind, timeout, output)
                if answer.get("loaded") is False:
                    self._drop(slot)
                    return Ran(_outcome(answer, started, state), kept=False, loaded=False)
                slot.loaded = True
            else:
                assert worker is not None  # a loaded slot has its environment
                timeout = deadline.cap(job.timeout)
                capped = timeout < job.timeout
                answer = await worker.request({"op": "run", "event": job.event}, timeout, output)
        except (WorkerTimeout, FrameTooLarge, WorkerCrashed) as exc:
            message = ""
            if capped:  # the call's deadline, not the script's timeout, ended it: said so, both doors alike
                message = deadline_message or (
                    f"the call's deadline stopped the script after {timeout:.3g} s "
                    f"(before its timeout of {job.timeout:g} s)"
                )
            return Ran(self.failed(slot, worker, exc, job, started, state, message), kept=False)
        except BaseException:  # cancelled, or the runtime could not start
            self._drop(slot)
            raise
        outcome = _outcome(answer, started, state)
        return Ran(outcome, self.settle(slot, worker, outcome))

    def environment_key(self, job: Job) -> EnvironmentKey:
        """The key of the environments that may run the job; RuntimeBusy when none ever fits."""
        if job.runtime not in self._runtimes:  # the use cases resolve titles with our registry
            raise RuntimeNotAvailable(f"no {job.runtime} runtime in this server", runtime=job.runtime)
        key = EnvironmentKey(job.owner, job.runtime, job.script_hash, job.limits, job.layer)
        self._refuse_what_never_fits(key)
        return key

    def acquire_now(self, key: EnvironmentKey) -> Slot | None:
        """A slot if there is room for one now (the per-key cap, the owner's share) and no
        other owner waits for room (theirs comes first), else None."""
        if self.others_waiting(key.owner):
            return None
        return self._try_acquire(key)

    def others_waiting(self, owner: str) -> bool:
        """Whether executions of another owner wait in the fair queue."""
        return len(self._waiting) > self._waiting.waiting(owner)

    async def acquire(self, key: EnvironmentKey, deadline: Deadline) -> Slot:
        """A slot, waiting in the fair queue (bounded) when there is no room now."""
        return self._try_acquire(key) or await self._wait_for_slot(key, deadline)

    def release(self, slot: Slot) -> None:
        self._release(slot)

    def drop(self, slot: Slot) -> None:
        self._drop(slot)

    async def _bind(self, slot: Slot, job: Job, deadline: Deadline) -> tuple[WorkerProcess, EnvironmentState]:
        """The process of a slot not bound yet: its pre-started one, or one started now (cold),
        assigned to the job's owner; the caller sends the `load` (run())."""
        worker = slot.worker
        if worker is None:
            slot.reserved = False  # the launcher holds the memory from here
            worker = await self._launcher.start(
                self._runtimes[job.runtime], job.limits, deadline, job.program, reserved=True
            )
            slot.worker, state = worker, EnvironmentState.COLD
        else:
            state = EnvironmentState.PREWARMED
        self._launcher.assign(worker, job.owner)
        return worker, state

    def failed(
        self,
        slot: Slot,
        worker: WorkerProcess | None,
        exc: WorkerTimeout | FrameTooLarge | WorkerCrashed,
        job: Job,
        started: float,
        state: EnvironmentState,
        timeout_message: str = "",
    ) -> ExecutionOutcome:
        """The outcome of an execution whose worker timed out, answered too much or crashed;
        the slot's worker is dropped. Its logs: the output streamed before (WorkerError.logs)."""
        if isinstance(exc, WorkerTimeout):
            code = FailureCode.TIMEOUT
            message = timeout_message or f"the script ran past its timeout of {job.timeout:g} s"
        elif isinstance(exc, FrameTooLarge):
            code, message = FailureCode.OUTPUT_LIMIT, f"the script's output is too large: {exc}"
        else:
            code, message = FailureCode.RUNTIME_ERROR, f"the runtime process crashed: {exc}"
            if worker is not None and self._launcher.out_of_memory(worker):
                code = FailureCode.MEMORY_LIMIT
                message = f"the script went past its memory limit of {job.limits.memory_mb} MiB"
            elif worker is not None and self._launcher.killed_by_host(worker):
                message = (
                    "the runtime process was killed by the host's out-of-memory killer (the host "
                    "or the server's container ran out of memory, not this environment: its "
                    f"limit is {job.limits.memory_mb} MiB)"
                )
        self._drop(slot)
        return _failed(code, message, started, state, exc.logs, exc.logs_truncated)

    def settle(self, slot: Slot, worker: WorkerProcess | None, outcome: ExecutionOutcome) -> bool:
        """After an answered execution: whether the slot's worker is kept (False: dropped)."""
        if outcome.failure is not None and outcome.failure.code is FailureCode.MEMORY_LIMIT:
            self._drop(slot)  # a process that ran out of memory is not trusted again
            return False
        if worker is not None and self._launcher.has_stragglers(worker):
            self._drop(slot)  # processes the script left behind end with their environment
            return False
        return True

    @staticmethod
    def outcome(answer: dict[str, Any], started: float, state: EnvironmentState) -> ExecutionOutcome:
        """An execution's outcome from its worker's answer."""
        return _outcome(answer, started, state)

    def _drop(self, slot: Slot) -> None:
        """The slot's worker is killed (if it is not dead already) and never used again."""
        if slot.worker is not None:
            self._discard(slot.worker)
            slot.worker = None

    def _refill(self, runtime: RuntimeSpec) -> None:
        """Start processes in the background until the runtime has its pre-started few."""
        task = self._refills.get(runtime.name)
        if self._closed or (task is not None and not task.done()):
            return
        if len(self._warm[runtime.name]) < self._settings.prewarm_per_runtime:
            self._refills[runtime.name] = asyncio.create_task(self._refill_loop(runtime))

    async def _refill_loop(self, runtime: RuntimeSpec) -> None:
        failures = 0
        memory_mb = self._default_limits.memory_mb
        while not self._closed and len(self._warm[runtime.name]) < self._settings.prewarm_per_runtime:
            if (self._waiting and self._short_of_memory) or not self._budget.fits(memory_mb):
                self._refill_paused = True  # executions waiting come first: _resume_refills
                return
            self._budget.take(memory_mb)
            try:
                deadline = Deadline.after(self._settings.spawn_timeout_seconds)
                worker = await self._launcher.start(runtime, self._default_limits, deadline, reserved=True)
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
                self._evict(worker)
            if expired and self._waiting:
                self._serve_waiting()

    def _discard(self, worker: WorkerProcess) -> None:
        self._launcher.discard(worker)


def _outcome(answer: dict[str, Any], started: float, state: EnvironmentState) -> ExecutionOutcome:
    duration = time.perf_counter() - started
    logs = str(answer.get("logs", ""))
    cpu = _float(answer.get("cpu"))
    peak = answer_int(answer.get("peak"), limit=2**62)
    cut = answer.get("cut") is True
    if answer.get("ok"):
        result_json = str(answer.get("result_json", ""))
        return ExecutionOutcome(
            answer.get("result"), None, duration, logs, state, cpu, peak, result_json, cut
        )
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
    return ExecutionOutcome(None, failure, duration, logs, state, cpu, peak, logs_truncated=cut)


def _failed(
    code: FailureCode,
    message: str,
    started: float,
    state: EnvironmentState,
    logs: str = "",
    cut: bool = False,
) -> ExecutionOutcome:
    failure = ExecutionFailure(code, message)
    return ExecutionOutcome(None, failure, time.perf_counter() - started, logs, state, logs_truncated=cut)


def _float(value: object) -> float:
    return float(value) if isinstance(value, int | float) and value >= 0 else 0.0
