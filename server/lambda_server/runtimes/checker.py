"""Checks scripts at Initialize: each runtime compiles them, without running them, in a worker of its own."""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict, defaultdict

from lambda_server.domain import Deadline, Limits
from lambda_server.errors import RuntimeBusy, ScriptSyntaxError, Unavailable
from lambda_server.runtimes.launcher import Launcher
from lambda_server.runtimes.process import WorkerError, WorkerProcess, answer_int
from lambda_server.runtimes.registry import RuntimeSpec

log = logging.getLogger(__name__)

CHECK_TIMEOUT = 10.0
# Scripts that compiled, by runtime and hash: the same script sent again (the
# one-shot pattern: Initialize, Execute, again and again) is not compiled again.
MAX_PASSED = 4096


class ScriptChecker:
    """One checker worker per runtime, one check at a time, replaced when it fails."""

    def __init__(self, launcher: Launcher, limits: Limits) -> None:
        self._launcher = launcher
        self._limits = limits
        self._workers: dict[str, WorkerProcess] = {}
        self._locks: dict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._passed: OrderedDict[tuple[str, str], None] = OrderedDict()  # least recent first

    async def start(self, runtime: RuntimeSpec, deadline: Deadline) -> None:
        """Start the runtime's checker now, so that the first Initialize is fast."""
        try:
            await self._worker(runtime, deadline)
        except Unavailable as exc:
            log.warning("%s", exc.message)

    async def check(self, runtime: RuntimeSpec, script: str, script_hash: str, deadline: Deadline) -> bool:
        """Compile without running; ScriptSyntaxError with line and column when it fails.

        `script_hash` is the script's SHA-256: a script that compiled before passes at
        once. True when it was compiled now, False when it was known.
        """
        key = (runtime.name, script_hash)
        if key in self._passed:
            self._passed.move_to_end(key)
            return False
        await self._compile(runtime, script, deadline)
        self._passed[key] = None
        if len(self._passed) > MAX_PASSED:
            self._passed.popitem(last=False)
        return True

    async def _compile(self, runtime: RuntimeSpec, script: str, deadline: Deadline) -> None:
        lock = self._locks[runtime.name]
        wait = deadline.cap(CHECK_TIMEOUT)
        try:
            async with asyncio.timeout(wait):
                await lock.acquire()
        except TimeoutError:
            raise RuntimeBusy(f"the {runtime.name} checker stayed busy for {wait:g} s") from None
        try:
            worker = await self._worker(runtime, deadline)
            answer = await worker.request({"op": "check", "script": script}, deadline.cap(CHECK_TIMEOUT))
        except WorkerError as exc:
            dead = self._workers.pop(runtime.name, None)
            if dead is not None:
                self._launcher.discard(dead)
            raise Unavailable(f"the {runtime.name} checker failed: {exc}") from None
        finally:
            lock.release()
        if not answer.get("ok"):
            error = answer.get("error") or {}
            raise ScriptSyntaxError(
                str(error.get("message", "syntax error")),
                answer_int(error.get("line")),
                answer_int(error.get("column")),
            )

    async def _worker(self, runtime: RuntimeSpec, deadline: Deadline) -> WorkerProcess:
        worker = self._workers.get(runtime.name)
        if worker is not None and not worker.alive():
            log.warning(
                "the %s checker had exited (%s); starting another", runtime.name, worker.stderr_tail()[-200:]
            )
            self._launcher.discard(worker)  # its pipes and sandbox place are released too
            worker = None
        if worker is None:
            worker = await self._launcher.start(runtime, self._limits, deadline)
            self._workers[runtime.name] = worker
        return worker
