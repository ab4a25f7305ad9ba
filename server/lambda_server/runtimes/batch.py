"""ExecuteBatch's runner: a batch's items on the session's environments, in parallel, several to a frame.

Items are run by lanes, one environment each, at most MAX_ENVIRONMENTS_PER_KEY of
them and within the owner's share: the first environment is acquired as an Execute
acquires one (it may wait in the fair queue, bounded); further ones only when there
is room for them now (EnvironmentPool.acquire_now), tried again after each chunk, so
that a batch never has more than one waiter in the queue nor takes more than its
owner's share. A lane takes a chunk of the items left (at most MANY_ITEMS, and
MANY_FRAME_BYTES of events, and no more than an even split over the lanes a key may
have) and sends it to its worker in one `many` frame (process.py); an environment not
bound yet gets a `load` with the chunk's first item, then a `many` with the rest.

An item whose worker timed out or crashed gets that outcome (TIMEOUT, RUNTIME_ERROR,
MEMORY_LIMIT, OUTPUT_LIMIT), the worker is dropped, and the items of its chunk that
never started go back to the queue: one item's failure fails no other. A script whose
`load` fails (its top level raised) fails every item alike, without a process each.

No chunk starts past the batch's stop time: the deadline less a margin for the
answer's conversion (stop_margin). An item running at that time is killed (TIMEOUT,
saying the batch's deadline came); the items left are returned unstarted (None), with
the error that kept them from starting when it was not the deadline (no environment
became free: RuntimeBusy or QuotaExceeded; the runtime could not start: Unavailable).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from lambda_server import json_text
from lambda_server.config import RuntimeSettings
from lambda_server.domain import (
    BatchJob,
    Deadline,
    EnvironmentState,
    ExecutionOutcome,
    FailureCode,
)
from lambda_server.errors import LambdaError
from lambda_server.runtimes.process import (
    FrameTooLarge,
    ManyInterrupted,
    WorkerCrashed,
    WorkerProcess,
    WorkerTimeout,
)

if TYPE_CHECKING:
    from lambda_server.runtimes.pool import EnvironmentKey, EnvironmentPool, _Slot

log = logging.getLogger(__name__)

# Items sent to a worker in one `many` frame at most: enough that a frame's round trip is
# shared by many items, few enough that the items are spread over the key's environments.
MANY_ITEMS = 32
# A `many` frame's events, in bytes, at most (a larger single item still goes alone).
MANY_FRAME_BYTES = 1024 * 1024
# The part of the deadline kept for converting and sending the answer: a base, and a
# little per item (a converted ExecuteResponse costs tens of microseconds; this is ten
# times that), never more than a fifth of the time the batch has.
STOP_MARGIN_BASE = 0.02
STOP_MARGIN_PER_ITEM = 0.0002


@dataclass(frozen=True)
class BatchOutcome:
    """Each item's outcome, by index (None: it did not start, or was not to run), and why
    the items that did not start did not, when it was not the deadline."""

    outcomes: list[ExecutionOutcome | None]
    refused: LambdaError | None = None


def stop_margin(items: int, remaining: float | None) -> float:
    """Seconds before the deadline at which a batch of `items` starts nothing more."""
    margin = STOP_MARGIN_BASE + STOP_MARGIN_PER_ITEM * items
    return margin if remaining is None else min(margin, remaining / 5)


class BatchRun:
    """One batch's run; `run()` once."""

    def __init__(
        self, pool: EnvironmentPool, batch: BatchJob, deadline: Deadline, settings: RuntimeSettings
    ) -> None:
        self._pool = pool
        self._job = batch.job
        self._events = batch.events
        self._queue: deque[int] = deque(batch.indices)
        self._outcomes: list[ExecutionOutcome | None] = [None] * len(batch.events)
        self._encoded: dict[int, bytes] = {}
        self._per_key = settings.max_environments_per_key
        remaining = deadline.remaining()
        self._stop_at = (
            None if deadline.at is None else deadline.at - stop_margin(len(batch.indices), remaining)
        )
        self._lanes: set[asyncio.Task[None]] = set()
        self._refused: LambdaError | None = None
        self._key: EnvironmentKey | None = None

    async def run(self) -> BatchOutcome:
        if not self._queue:
            return BatchOutcome(self._outcomes)
        self._key = self._pool.environment_key(self._job)
        try:
            while True:
                if self._queue and not self._stopped():
                    self._grow()
                    if not self._lanes:  # the batch's one waiter in the fair queue
                        try:
                            slot = await self._pool.acquire(self._key, Deadline(self._stop_at))
                        except LambdaError as exc:  # RuntimeBusy, QuotaExceeded: no room in time
                            self._refused = exc
                            break
                        self._start_lane(slot)
                        continue
                if not self._lanes:
                    break
                done, _ = await asyncio.wait(self._lanes, return_when=asyncio.FIRST_COMPLETED)
                self._lanes -= done
                for lane in done:
                    lane.result()  # a bug in a lane is the call's INTERNAL
        finally:
            for lane in self._lanes:
                lane.cancel()
            await asyncio.gather(*self._lanes, return_exceptions=True)
            self._lanes.clear()
        return BatchOutcome(self._outcomes, self._refused)

    def _stopped(self) -> bool:
        return self._stop_at is not None and time.monotonic() >= self._stop_at

    def _grow(self) -> None:
        """More lanes while items wait that the lanes running will not take, if there is room now."""
        assert self._key is not None
        while self._queue and len(self._lanes) < self._per_key and not self._stopped():
            slot = self._pool.acquire_now(self._key)
            if slot is None:
                return
            self._start_lane(slot)

    def _start_lane(self, slot: _Slot) -> None:
        self._lanes.add(asyncio.create_task(self._lane(slot)))

    async def _lane(self, slot: _Slot) -> None:
        """Chunks on one environment until no item is left, the stop time, or its worker is gone."""
        try:
            while self._queue and not self._stopped():
                chunk = self._take_chunk()
                try:
                    kept = await self._run_chunk(slot, chunk)
                except LambdaError as exc:  # the runtime could not start: the items did not
                    self._queue.extendleft(reversed([i for i in chunk if self._outcomes[i] is None]))
                    self._refused = exc
                    self._pool.drop(slot)
                    return
                if not kept:
                    return
                self._grow()
        finally:
            self._pool.release(slot)

    def _take_chunk(self) -> list[int]:
        size = max(1, min(MANY_ITEMS, math.ceil(len(self._queue) / self._per_key)))
        chunk: list[int] = []
        total = 0
        while self._queue and len(chunk) < size:
            data = self._event(self._queue[0])
            if chunk and total + len(data) > MANY_FRAME_BYTES:
                break
            chunk.append(self._queue.popleft())
            total += len(data)
        return chunk

    def _event(self, index: int) -> bytes:
        data = self._encoded.get(index)
        if data is None:  # params may hold integers past 64 bits
            data = self._encoded[index] = json_text.dumps(self._events[index])
        return data

    def _item_timeout(self) -> tuple[float, bool]:
        """An item's wait: its timeout, or less when the stop time comes sooner (True)."""
        timeout = self._job.timeout
        if self._stop_at is not None and self._stop_at - time.monotonic() < timeout:
            return max(0.0, self._stop_at - time.monotonic()), True
        return timeout, False

    def _timeout_message(self, capped: bool) -> str:
        if capped:
            return (
                f"the batch's deadline came while the item ran (its timeout is {self._job.timeout:g} s); "
                "it was stopped"
            )
        return ""

    async def _run_chunk(self, slot: _Slot, chunk: list[int]) -> bool:
        """Run the chunk on the slot's environment; whether the environment is kept."""
        items = list(chunk)
        started = time.perf_counter()
        state = EnvironmentState.WARM
        worker = slot.worker
        if not slot.loaded:
            first = items.pop(0)
            job = replace(self._job, event=self._events[first])
            timeout, capped = self._item_timeout()
            try:
                worker, state = await self._pool.bind(slot, job, Deadline(self._stop_at))
                load = {"op": "load", "script": job.script, "event": job.event}
                answer = await worker.request(load, timeout)
            except (WorkerTimeout, FrameTooLarge, WorkerCrashed) as exc:
                message = self._timeout_message(capped)
                self._outcomes[first] = self._pool.failed(slot, worker, exc, job, started, state, message)
                self._queue.extendleft(reversed(items))
                return False
            except BaseException:
                self._pool.drop(slot)
                raise
            outcome = self._pool.outcome(answer, started, state)
            self._outcomes[first] = outcome
            if answer.get("loaded") is False:  # its top level failed: so it would for every item
                self._pool.drop(slot)
                self._fail_all(outcome, items)
                return False
            slot.loaded = True
            if not self._pool.settle(slot, worker, outcome):
                self._queue.extendleft(reversed(items))
                return False
            if not items:
                return True
            state = EnvironmentState.WARM
        assert worker is not None
        return await self._many(slot, worker, items)

    async def _many(self, slot: _Slot, worker: WorkerProcess, items: list[int]) -> bool:
        clock = [time.perf_counter()]  # when the item being awaited started (the last answer)
        last: list[ExecutionOutcome] = []

        def answered(item: int, answer: dict[str, Any]) -> bool:
            outcome = self._pool.outcome(answer, clock[0], EnvironmentState.WARM)
            clock[0] = time.perf_counter()
            self._outcomes[items[item]] = outcome
            last[:] = [outcome]
            # a process that ran out of memory is not trusted again: the items after it wait
            return outcome.failure is None or outcome.failure.code is not FailureCode.MEMORY_LIMIT

        timeout = self._job.timeout
        try:
            count = await worker.request_many(
                [self._event(i) for i in items], timeout, self._stop_at, answered
            )
        except ManyInterrupted as stop:
            running = stop.answered
            cause = stop.cause
            if not isinstance(cause, WorkerTimeout | FrameTooLarge | WorkerCrashed):
                cause = WorkerCrashed(str(cause))
            message = self._timeout_message(stop.capped)
            job = replace(self._job, event=self._events[items[running]])
            outcome = self._pool.failed(slot, worker, cause, job, clock[0], EnvironmentState.WARM, message)
            self._outcomes[items[running]] = outcome
            self._queue.extendleft(reversed(items[running + 1 :]))
            return False
        except BaseException:
            self._pool.drop(slot)
            raise
        if count < len(items):  # stopped after a MEMORY_LIMIT (the worker is killed)
            self._pool.drop(slot)
            self._queue.extendleft(reversed(items[count:]))
            return False
        return self._pool.settle(slot, worker, last[0]) if last else True

    def _fail_all(self, outcome: ExecutionOutcome, items: list[int]) -> None:
        """The script did not load: every item left fails as its first did, without running."""
        failed = replace(outcome, duration=0.0, cpu_time=0.0, peak_memory=0)
        for index in [*items, *self._queue]:
            self._outcomes[index] = failed
        self._queue.clear()
