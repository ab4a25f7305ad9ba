"""Checks scripts at Initialize: each runtime compiles them, without running them, in workers of its own.

Each runtime has SCRIPT_CHECKERS checker workers, each checking one script at a
time, and an owner holds SCRIPT_CHECKS_PER_OWNER of them at most: the checks an
owner sends beyond its share wait behind its own, and waiting checks are served
round robin by owner (runtimes/slots.py). The wait is bounded by
SCRIPT_CHECK_QUEUE_TIMEOUT_SECONDS and the call's deadline; past it the call gets
QuotaExceeded (RESOURCE_EXHAUSTED with a RetryInfo), whether its own checks or
every checker being busy held it up (the message says which), so that clients
back off either way.

A script that cannot be checked within SCRIPT_CHECK_TIMEOUT_SECONDS, or whose
check goes past the checker's memory limit (the default environment limits:
the cgroup's and RLIMIT_AS), is the script's fault: ScriptLimitExceeded
(INVALID_ARGUMENT), never UNAVAILABLE, which clients retry. Its checker is
killed, and started again by the next check that takes its place (mostly the
same owner's next one: a freed place goes to whoever waits first in turn).
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from typing import Any

from lambda_server.domain import Deadline, Limits
from lambda_server.errors import (
    DeadlineExceeded,
    LambdaError,
    QuotaExceeded,
    RuntimeBusy,
    ScriptLimitExceeded,
    ScriptSyntaxError,
    Unavailable,
)
from lambda_server.runtimes.launcher import Launcher
from lambda_server.runtimes.process import WorkerError, WorkerProcess, WorkerTimeout, answer_int
from lambda_server.runtimes.registry import RuntimeSpec
from lambda_server.runtimes.slots import FairSlots, SlotWaitTimeout

log = logging.getLogger(__name__)

# Scripts that compiled, by runtime and hash: the same script sent again (the
# one-shot pattern: Initialize, Execute, again and again) is not compiled again.
MAX_PASSED = 4096


class ScriptChecker:
    """SCRIPT_CHECKERS checker workers per runtime, shared fairly by owners."""

    def __init__(self, launcher: Launcher, limits: Limits) -> None:
        self._launcher = launcher
        self._settings = launcher.settings
        self._limits = limits
        self._slots: dict[str, FairSlots] = {}
        # each slot's worker (None until started, or after it was killed), and a lock
        # that keeps start() and a check from starting two workers for one slot
        self._workers: dict[str, list[WorkerProcess | None]] = {}
        self._locks: dict[str, list[asyncio.Lock]] = {}
        self._passed: OrderedDict[tuple[str, str], None] = OrderedDict()  # least recent first

    async def start(self, runtime: RuntimeSpec, deadline: Deadline) -> None:
        """Start the runtime's checkers now, side by side: the first Initializes are fast, and
        a tenant never waits for a checker's cold start while another tenant's check runs."""
        self._slots_of(runtime)

        async def start_one(number: int) -> None:
            async with self._locks[runtime.name][number]:
                try:
                    await self._worker(runtime, number, deadline)
                except (Unavailable, RuntimeBusy) as exc:  # the first check starts it again
                    log.warning("%s", exc.message)

        await asyncio.gather(*(start_one(n) for n in range(self._settings.checkers)))

    async def check(
        self, runtime: RuntimeSpec, script: str, script_hash: str, deadline: Deadline, owner: str = ""
    ) -> bool:
        """Compile without running; ScriptSyntaxError with line and column when it fails.

        `script_hash` is the script's SHA-256: a script that compiled before passes at
        once. True when it was compiled now, False when it was known. `owner` is whom
        the check is billed to (Caller.owner).
        """
        key = (runtime.name, script_hash)
        if key in self._passed:
            self._passed.move_to_end(key)
            return False
        await self._compile(runtime, script, owner, deadline)
        self._passed[key] = None
        if len(self._passed) > MAX_PASSED:
            self._passed.popitem(last=False)
        return True

    def _slots_of(self, runtime: RuntimeSpec) -> FairSlots:
        slots = self._slots.get(runtime.name)
        if slots is None:
            count = self._settings.checkers
            slots = self._slots[runtime.name] = FairSlots(count, self._settings.checks_per_owner)
            self._workers[runtime.name] = [None] * count
            self._locks[runtime.name] = [asyncio.Lock() for _ in range(count)]
        return slots

    async def _compile(self, runtime: RuntimeSpec, script: str, owner: str, deadline: Deadline) -> None:
        slots = self._slots_of(runtime)
        wait = deadline.cap(self._settings.check_queue_timeout_seconds)
        try:
            async with slots.slot(owner, wait) as number:
                answer = await self._request(runtime, number, script, deadline)
        except SlotWaitTimeout as exc:
            raise self._no_checker(runtime, slots, exc.own_share, wait) from None
        if not answer.get("ok"):
            error = answer.get("error") or {}
            raise ScriptSyntaxError(
                str(error.get("message", "syntax error")),
                answer_int(error.get("line")),
                answer_int(error.get("column")),
            )

    async def _request(
        self, runtime: RuntimeSpec, number: int, script: str, deadline: Deadline
    ) -> dict[str, Any]:
        limit = self._settings.check_timeout_seconds
        async with self._locks[runtime.name][number]:
            worker = await self._worker(runtime, number, deadline)
            timeout = deadline.cap(limit)
            try:
                answer = await worker.request({"op": "check", "script": script}, timeout)
            except WorkerError as exc:
                raise self._failed(runtime, number, worker, exc, timeout < limit) from None
            if answer.get("limit") == "memory":  # a MemoryError in the compiler: start afresh
                self._drop(runtime, number)
                raise self._past_memory(runtime)
            return answer

    def _failed(
        self,
        runtime: RuntimeSpec,
        number: int,
        worker: WorkerProcess,
        exc: WorkerError,
        cut_by_deadline: bool,
    ) -> LambdaError:
        """What a checker's failure means for the call; the checker is ended either way."""
        out_of_memory = self._launcher.out_of_memory(worker)  # before its cgroup is released
        self._drop(runtime, number)
        if isinstance(exc, WorkerTimeout):
            if cut_by_deadline:
                return DeadlineExceeded("the call's deadline passed while the script was being checked")
            limit = self._settings.check_timeout_seconds
            return ScriptLimitExceeded(
                f"the script could not be checked within {limit:g} s (SCRIPT_CHECK_TIMEOUT_SECONDS)",
                limit="SCRIPT_CHECK_TIMEOUT_SECONDS",
            )
        if out_of_memory:
            return self._past_memory(runtime)
        return Unavailable(f"the {runtime.name} checker failed: {exc}")

    def _past_memory(self, runtime: RuntimeSpec) -> ScriptLimitExceeded:
        return ScriptLimitExceeded(
            f"checking the script went past the {runtime.name} checker's memory limit of "
            f"{self._limits.memory_mb} MiB (SANDBOX_MEMORY_MB)",
            limit="SANDBOX_MEMORY_MB",
        )

    def _no_checker(
        self, runtime: RuntimeSpec, slots: FairSlots, own_share: bool, wait: float
    ) -> QuotaExceeded:
        if own_share:
            why = f"this caller's {slots.per_owner} checks at once (SCRIPT_CHECKS_PER_OWNER) stayed busy"
            limit = "SCRIPT_CHECKS_PER_OWNER"
        else:
            why = f"every {runtime.name} checker (SCRIPT_CHECKERS: {slots.total}) stayed busy"
            limit = "SCRIPT_CHECKERS"
        return QuotaExceeded(
            f"{why} for {wait:g} s (SCRIPT_CHECK_QUEUE_TIMEOUT_SECONDS, or the call's deadline)",
            retry_after=self._settings.check_timeout_seconds,
            limit=limit,
        )

    def _drop(self, runtime: RuntimeSpec, number: int) -> None:
        worker, self._workers[runtime.name][number] = self._workers[runtime.name][number], None
        if worker is not None:
            self._launcher.discard(worker)  # killed, its pipes and sandbox place released

    async def _worker(self, runtime: RuntimeSpec, number: int, deadline: Deadline) -> WorkerProcess:
        workers = self._workers[runtime.name]
        worker = workers[number]
        if worker is not None and not worker.alive():
            log.warning(
                "the %s checker had exited (%s); starting another", runtime.name, worker.stderr_tail()[-200:]
            )
            self._drop(runtime, number)
            worker = None
        if worker is None:
            worker = await self._launcher.start(runtime, self._limits, deadline)
            workers[number] = worker
        return worker
