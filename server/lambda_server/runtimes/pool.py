"""The environment pool: warm worker processes per (owner, runtime, script_hash).

An environment runs one execution at a time and is never shared across owners
or scripts. Parallel executions of one key get more environments up to a cap,
beyond which they wait until their deadline. Idle environments are kept for
reuse, the least recently used dropped past a total and after an idle TTL.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from lambda_server.config import RuntimeSettings
from lambda_server.domain import (
    JSON,
    Deadline,
    ExecutionFailure,
    ExecutionOutcome,
    FailureCode,
)
from lambda_server.errors import RuntimeBusy, ScriptSyntaxError, Unavailable
from lambda_server.runtimes.process import (
    FrameTooLarge,
    WorkerCrashed,
    WorkerError,
    WorkerProcess,
    WorkerTimeout,
)
from lambda_server.runtimes.registry import RuntimeSpec

log = logging.getLogger(__name__)

CHECK_TIMEOUT = 10.0


@dataclass(frozen=True)
class EnvironmentKey:
    owner: str
    runtime: str
    script_hash: str


@dataclass(frozen=True)
class Job:
    """One execution to run."""

    runtime: RuntimeSpec
    owner: str
    script_hash: str
    script: str
    event: dict[str, JSON]
    timeout: float


class EnvironmentPool:
    """Runs jobs in warm environments; checks scripts in a per-runtime checker process."""

    def __init__(self, settings: RuntimeSettings, runtimes: dict[str, RuntimeSpec]) -> None:
        self._settings = settings
        self._runtimes = runtimes
        self._max_frame = settings.max_result_bytes + 6 * settings.max_log_bytes + 65536
        self._idle: dict[EnvironmentKey, list[WorkerProcess]] = defaultdict(list)
        self._busy: dict[EnvironmentKey, int] = defaultdict(int)
        self._slots = asyncio.Condition()
        self._live: set[WorkerProcess] = set()
        self._checkers: dict[str, WorkerProcess] = {}
        self._check_locks: dict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._closed = False

    async def start(self) -> None:
        """Start each available runtime's checker, so the first Initialize is fast."""
        for spec in self._runtimes.values():
            if spec.available:
                try:
                    await self._checker(spec, Deadline.after(self._settings.spawn_timeout_seconds))
                except Unavailable as exc:
                    log.warning("%s", exc)

    async def close(self) -> None:
        self._closed = True
        workers = list(self._live)
        self._live.clear()
        self._idle.clear()
        self._checkers.clear()
        await asyncio.gather(*(w.kill() for w in workers), return_exceptions=True)

    def status(self) -> dict[str, str]:
        idle: dict[str, int] = defaultdict(int)
        busy: dict[str, int] = defaultdict(int)
        for key, workers in self._idle.items():
            idle[key.runtime] += len(workers)
        for key, count in self._busy.items():
            busy[key.runtime] += count
        report = {}
        for name, spec in self._runtimes.items():
            if spec.available:
                report[f"runtime.{name}"] = f"ok (idle={idle[name]}, busy={busy[name]})"
            else:
                report[f"runtime.{name}"] = f"unavailable: {spec.missing}"
        return report

    # checking

    async def check(self, runtime: RuntimeSpec, script: str, deadline: Deadline) -> None:
        """Compile without running; ScriptSyntaxError with line and column when it fails."""
        lock = self._check_locks[runtime.name]
        try:
            async with asyncio.timeout(deadline.cap(CHECK_TIMEOUT)):
                await lock.acquire()
        except TimeoutError:
            raise RuntimeBusy(f"the {runtime.name} checker stayed busy") from None
        try:
            checker = await self._checker(runtime, deadline)
            answer = await checker.request({"op": "check", "script": script}, deadline.cap(CHECK_TIMEOUT))
        except WorkerError as exc:
            self._checkers.pop(runtime.name, None)
            raise Unavailable(f"the {runtime.name} checker failed: {exc}") from None
        finally:
            lock.release()
        if not answer.get("ok"):
            error = answer.get("error") or {}
            raise ScriptSyntaxError(
                str(error.get("message", "syntax error")),
                int(error.get("line", 0)),
                int(error.get("column", 0)),
            )

    async def _checker(self, runtime: RuntimeSpec, deadline: Deadline) -> WorkerProcess:
        checker = self._checkers.get(runtime.name)
        if checker is None or not checker.alive():
            checker = await self._spawn(runtime, deadline)
            self._checkers[runtime.name] = checker
        return checker

    # executing

    async def execute(self, job: Job, deadline: Deadline) -> ExecutionOutcome:
        key = EnvironmentKey(job.owner, job.runtime.name, job.script_hash)
        await self._enter(key, deadline)
        try:
            return await self._run(key, job, deadline)
        finally:
            async with self._slots:
                self._busy[key] -= 1
                if self._busy[key] == 0:
                    del self._busy[key]
                self._slots.notify_all()

    async def _enter(self, key: EnvironmentKey, deadline: Deadline) -> None:
        cap = self._settings.max_environments_per_key
        try:
            async with asyncio.timeout(deadline.remaining()), self._slots:
                await self._slots.wait_for(lambda: self._busy[key] < cap)
                self._busy[key] += 1
        except TimeoutError:
            raise RuntimeBusy(
                f"all {cap} environments of this script stayed busy until the deadline"
            ) from None

    async def _run(self, key: EnvironmentKey, job: Job, deadline: Deadline) -> ExecutionOutcome:
        started = time.perf_counter()
        timeout = deadline.cap(job.timeout)
        worker = self._take_idle(key)
        try:
            if worker is None:
                worker = await self._spawn(job.runtime, deadline)
                loaded = await worker.request({"op": "load", "script": job.script}, timeout)
                if not loaded.get("ok"):
                    await self._discard(worker)
                    return _outcome(loaded, started)
                timeout = max(0.0, timeout - (time.perf_counter() - started))
            answer = await worker.request({"op": "run", "event": job.event}, timeout)
        except WorkerTimeout:
            self._forget(worker)
            return _failed(FailureCode.TIMEOUT, f"the script ran past its {job.timeout:g} s timeout", started)
        except FrameTooLarge as exc:
            self._forget(worker)
            return _failed(FailureCode.OUTPUT_LIMIT, f"the script's output is too large: {exc}", started)
        except WorkerCrashed as exc:
            self._forget(worker)
            return _failed(FailureCode.RUNTIME_ERROR, f"the runtime process crashed: {exc}", started)
        except BaseException:
            self._forget(worker)
            raise
        self._put_idle(key, worker)
        return _outcome(answer, started)

    async def _spawn(self, runtime: RuntimeSpec, deadline: Deadline) -> WorkerProcess:
        if self._closed:
            raise Unavailable("the server is shutting down")
        env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "LANG": "C.UTF-8",
            "HOME": tempfile.gettempdir(),
            "LAMBDA_MAX_LOG_BYTES": str(self._settings.max_log_bytes),
            "LAMBDA_MAX_RESULT_BYTES": str(self._settings.max_result_bytes),
        }
        try:
            worker = await WorkerProcess.spawn(
                runtime.command,
                env,
                timeout=deadline.cap(self._settings.spawn_timeout_seconds),
                max_frame=self._max_frame,
                cwd=tempfile.gettempdir(),
            )
        except (OSError, WorkerError) as exc:
            raise Unavailable(f"the {runtime.name} runtime could not start: {exc}") from None
        self._live.add(worker)
        return worker

    def _take_idle(self, key: EnvironmentKey) -> WorkerProcess | None:
        self._evict_expired()
        workers = self._idle.get(key)
        while workers:
            worker = workers.pop()
            if worker.alive():
                if not workers:
                    del self._idle[key]
                return worker
            self._forget(worker)
        self._idle.pop(key, None)
        return None

    def _put_idle(self, key: EnvironmentKey, worker: WorkerProcess) -> None:
        if self._closed:
            self._forget(worker)
            return
        self._idle[key].append(worker)
        idle = [(w.last_used, k, w) for k, ws in self._idle.items() for w in ws]
        for _, k, w in sorted(idle, key=lambda item: item[0])[
            : max(0, len(idle) - self._settings.max_idle_environments)
        ]:
            self._remove_idle(k, w)

    def _evict_expired(self) -> None:
        limit = time.monotonic() - self._settings.idle_ttl_seconds
        for key, workers in list(self._idle.items()):
            for worker in [w for w in workers if w.last_used < limit]:
                self._remove_idle(key, worker)

    def _remove_idle(self, key: EnvironmentKey, worker: WorkerProcess) -> None:
        workers = self._idle.get(key, [])
        with contextlib.suppress(ValueError):
            workers.remove(worker)
        if not workers:
            self._idle.pop(key, None)
        self._forget(worker)

    def _forget(self, worker: WorkerProcess | None) -> None:
        """Kill a worker in the background; it is never used again."""
        if worker is None:
            return
        self._live.discard(worker)
        task = asyncio.get_running_loop().create_task(worker.kill())
        _background.add(task)
        task.add_done_callback(_background.discard)

    async def _discard(self, worker: WorkerProcess) -> None:
        self._live.discard(worker)
        await worker.kill()


_background: set[asyncio.Task[None]] = set()


def _outcome(answer: dict[str, Any], started: float) -> ExecutionOutcome:
    duration = time.perf_counter() - started
    logs = str(answer.get("logs", ""))
    if answer.get("ok"):
        return ExecutionOutcome(answer.get("result"), None, duration, logs)
    error = answer.get("error") or {}
    try:
        code = FailureCode(error.get("code", "RUNTIME_ERROR"))
    except ValueError:
        code = FailureCode.RUNTIME_ERROR
    failure = ExecutionFailure(
        code=code,
        message=str(error.get("message", "")),
        line=_int(error.get("line")),
        column=_int(error.get("column")),
        stack_trace=str(error.get("stack", "")),
    )
    return ExecutionOutcome(None, failure, duration, logs)


def _failed(code: FailureCode, message: str, started: float) -> ExecutionOutcome:
    return ExecutionOutcome(None, ExecutionFailure(code, message), time.perf_counter() - started, "")


def _int(value: object) -> int:
    return value if isinstance(value, int) and 0 <= value < 2**31 else 0
