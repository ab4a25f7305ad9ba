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

A lane is started with its first chunk (no slot is taken that no chunk needs: a slot
not used would cost a pre-started process, or evict someone's idle environment), and
gives its environment back after a chunk when another owner waits for room: the batch
then waits its turn in the fair queue like any execution. Each slot goes back to the
pool when its lane's task is done, however it ended (cancelled before it began too).

An item whose worker timed out or crashed gets that outcome (TIMEOUT, RUNTIME_ERROR,
MEMORY_LIMIT, OUTPUT_LIMIT), the worker is dropped, and the items of its chunk that
never started go back to the queue: one item's failure fails no other. A script whose
`load` fails (its top level raised) fails every item alike, without a process each.

No chunk starts past the batch's stop time: the deadline less a margin for the
answer's conversion (stop_margin). An item running at that time is killed (TIMEOUT,
saying the batch's deadline came); the items left are returned unstarted (None), with
the error that kept them from starting when it was not the deadline (no environment
became free: RuntimeBusy or QuotaExceeded; the runtime could not start: Unavailable,
NotStarted, SandboxUnavailable; the answer is full: AnswerFull). Once an environment
was refused (the runtime could not start) no lane starts again: the running ones finish.

The answer is bounded (BatchJob.answer_bytes): each answered item is charged its
payload (domain.answer_size); the item that does not fit is answered OUTPUT_LIMIT, its
payload dropped at once, and no chunk starts after it (its worker stops there too).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from dataclasses import replace
from typing import Any

from lambda_server import json_text
from lambda_server.config import RuntimeSettings
from lambda_server.domain import (
    BatchJob,
    BatchOutcome,
    Deadline,
    EnvironmentState,
    ExecutionFailure,
    ExecutionOutcome,
    FailureCode,
    answer_size,
)
from lambda_server.errors import AnswerFull, LambdaError
from lambda_server.runtimes.pool import EnvironmentKey, EnvironmentPool, Slot
from lambda_server.runtimes.process import (
    FrameTooLarge,
    ManyInterrupted,
    WorkerCrashed,
    WorkerProcess,
    WorkerTimeout,
)

log = logging.getLogger(__name__)

# Items sent to a worker in one `many` frame at most: enough that a frame's round trip is
# shared by many items, few enough that the items are spread over the key's environments.
MANY_ITEMS = 32
# A `many` frame's events, in bytes, at most (a larger single item still goes alone).
MANY_FRAME_BYTES = 1024 * 1024
# The part of the deadline kept for killing what still runs, converting and sending the
# answer: a base, and a little per item (a converted ExecuteResponse costs tens of
# microseconds; this is ten times that), never more than a fifth of the time the batch
# has. The base is for a busy host, where a kill, the conversion and the send may wait
# for a core longer than the 20 ms the base was: past the deadline, the caller gets
# DEADLINE_EXCEEDED and loses every finished item's answer.
STOP_MARGIN_BASE = 0.2
STOP_MARGIN_PER_ITEM = 0.0002
ANSWER_SETTING = "GRPC_MAX_SEND_MESSAGE_BYTES"


def stop_margin(items: int, remaining: float | None) -> float:
    """Seconds before the deadline at which a batch of `items` starts nothing more."""
    margin = STOP_MARGIN_BASE + STOP_MARGIN_PER_ITEM * items
    return margin if remaining is None else min(margin, remaining / 5)


class BatchRunner:
    """Runs batches on the pool's environments (usecases/batch.py's BatchExecutor)."""

    def __init__(self, pool: EnvironmentPool, settings: RuntimeSettings) -> None:
        self._pool = pool
        self._settings = settings

    async def execute_batch(self, batch: BatchJob, deadline: Deadline) -> BatchOutcome:
        """Run a batch's items; the deadline bounds the whole batch."""
        return await BatchRun(self._pool, batch, deadline, self._settings).run()


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
        self._refused: LambdaError | None = None  # an environment could not be had: no lane starts
        self._budget = batch.answer_bytes  # what answers may still add; None: no bound
        self._full: AnswerFull | None = None  # the answer is full: no chunk starts
        self._key: EnvironmentKey | None = None

    async def run(self) -> BatchOutcome:
        if not self._queue:
            return BatchOutcome(self._outcomes)
        self._key = self._pool.environment_key(self._job)
        try:
            while True:
                if self._may_start():
                    self._grow()
                    if not self._lanes:  # the batch's one waiter in the fair queue
                        try:
                            slot = await self._pool.acquire(self._key, Deadline(self._stop_at))
                        except LambdaError as exc:  # RuntimeBusy, QuotaExceeded: no room in time
                            self._refused = exc
                            break
                        if self._may_start():
                            self._start_lane(slot)
                        else:
                            self._pool.release(slot)
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
        return BatchOutcome(self._outcomes, self._unstarted())

    def _stopped(self) -> bool:
        return self._stop_at is not None and time.monotonic() >= self._stop_at

    def _may_start(self) -> bool:
        """Whether a chunk may start: items wait, and neither the stop time, a refusal nor a
        full answer came."""
        return bool(self._queue) and self._refused is None and self._full is None and not self._stopped()

    def _unstarted(self) -> dict[int, Exception]:
        """Why the items left did not start, when it was not the deadline."""
        reason: LambdaError | None = self._full
        if reason is None and self._refused is not None and not self._stopped():
            reason = self._refused
        return {} if reason is None else {index: reason for index in self._queue}

    def _grow(self) -> None:
        """More lanes while items wait that the lanes running will not take, if there is room
        now; each lane takes its first chunk as it is started, so no slot goes unused."""
        assert self._key is not None
        while self._may_start() and len(self._lanes) < self._per_key:
            slot = self._pool.acquire_now(self._key)
            if slot is None:
                return
            self._start_lane(slot)

    def _start_lane(self, slot: Slot) -> None:
        lane = asyncio.create_task(self._lane(slot, self._take_chunk()))
        # released when the task is done however it ended: a task cancelled before its first
        # step never runs the coroutine's `finally`
        lane.add_done_callback(lambda _: self._pool.release(slot))
        self._lanes.add(lane)

    async def _lane(self, slot: Slot, chunk: list[int]) -> None:
        """Chunks on one environment until no item is left, the stop time, a full answer, its
        worker is gone, or another owner waits for room (the slot is theirs first)."""
        assert self._key is not None
        while True:
            if not self._may_run():
                self._queue.extendleft(reversed(chunk))
                return
            try:
                kept = await self._run_chunk(slot, chunk)
            except LambdaError as exc:  # the runtime could not start: the items did not
                self._queue.extendleft(reversed([i for i in chunk if self._outcomes[i] is None]))
                self._refused = self._refused or exc
                return
            if not kept or not self._may_start() or self._pool.others_waiting(self._key.owner):
                return
            chunk = self._take_chunk()
            self._grow()

    def _may_run(self) -> bool:
        return self._refused is None and self._full is None and not self._stopped()

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

    def _deadline_message(self) -> str:
        return (
            f"the batch's deadline came while the item ran (its timeout is {self._job.timeout:g} s); "
            "it was stopped"
        )

    def _answer(self, index: int, outcome: ExecutionOutcome) -> ExecutionOutcome:
        """Keep an item's outcome, charged to the answer's budget: one that does not fit is an
        OUTPUT_LIMIT failure without its payload, and the answer is full."""
        if self._budget is not None:
            size = answer_size(outcome)
            if size > self._budget:
                if self._full is None:
                    self._full = AnswerFull(
                        f"the batch's answer is full (its size is bounded by {ANSWER_SETTING}): "
                        "this item did not run",
                        setting=ANSWER_SETTING,
                    )
                message = (
                    f"the batch's answer is full: this item's result and logs (about {size} bytes) "
                    f"did not fit in what is left of it ({ANSWER_SETTING}); they were dropped"
                )
                failure = ExecutionFailure(FailureCode.OUTPUT_LIMIT, message)
                outcome = replace(
                    outcome, result=None, failure=failure, logs="", result_json="", logs_truncated=False
                )
            else:
                self._budget -= size
        self._outcomes[index] = outcome
        return outcome

    async def _run_chunk(self, slot: Slot, chunk: list[int]) -> bool:
        """Run the chunk on the slot's environment; whether the environment is kept."""
        items = list(chunk)
        if not slot.loaded:  # the first item loads the script, in one round trip
            first = items.pop(0)
            job = replace(self._job, event=self._events[first])
            ran = await self._pool.run(slot, job, Deadline(self._stop_at), None, self._deadline_message())
            outcome = self._answer(first, ran.outcome)
            if not ran.loaded:  # its top level failed: so it would for every item
                self._fail_all(outcome, items)
                return False
            if not ran.kept or not items or not self._may_run():
                self._queue.extendleft(reversed(items))
                return ran.kept
        assert slot.worker is not None
        return await self._many(slot, slot.worker, items)

    async def _many(self, slot: Slot, worker: WorkerProcess, items: list[int]) -> bool:
        """The items on a bound worker in one `many`; whether the environment is kept.

        Accepted: a hostile script can forge the item frames of the items after it (it can
        write to the answer pipe), so that its worker is put back while it still runs the
        `many`. Only its owner is hurt (the environment is of that owner and script only):
        the next execution there gets a stale answer or waits into its timeout, which kills
        the worker."""
        clock = [time.perf_counter()]  # when the item being awaited started (the last answer)
        last: list[ExecutionOutcome] = []

        def answered(item: int, answer: dict[str, Any]) -> bool:
            outcome = self._pool.outcome(answer, clock[0], EnvironmentState.WARM)
            clock[0] = time.perf_counter()
            last[:] = [self._answer(items[item], outcome)]
            # a process that ran out of memory is not trusted again: the items after it wait;
            # after a full answer, none runs
            memory = outcome.failure is not None and outcome.failure.code is FailureCode.MEMORY_LIMIT
            return not memory and self._full is None

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
            message = self._deadline_message() if stop.capped else ""
            job = replace(self._job, event=self._events[items[running]])
            outcome = self._pool.failed(slot, worker, cause, job, clock[0], EnvironmentState.WARM, message)
            self._answer(items[running], outcome)
            self._queue.extendleft(reversed(items[running + 1 :]))
            return False
        except BaseException:
            self._pool.drop(slot)
            raise
        if count < len(items):  # stopped after a MEMORY_LIMIT or a full answer (the worker is killed)
            self._pool.drop(slot)
            self._queue.extendleft(reversed(items[count:]))
            return False
        return self._pool.settle(slot, worker, last[0]) if last else True

    def _fail_all(self, outcome: ExecutionOutcome, items: list[int]) -> None:
        """The script did not load: every item left fails as its first did, without running."""
        failed = replace(outcome, duration=0.0, cpu_time=0.0, peak_memory=0)
        for index in [*items, *self._queue]:
            self._answer(index, failed)
        self._queue.clear()
