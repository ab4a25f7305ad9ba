"""ExecuteBatch: claim the session once for all items, answer each from the cache or run them together."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Protocol

from lambda_server.domain import (
    JSON,
    BatchJob,
    BatchOutcome,
    Caller,
    Deadline,
    ExecutionResult,
    answer_size,
)
from lambda_server.errors import InvalidParams, InvalidRequest, LambdaError, NotStartedByDeadline, copy_of
from lambda_server.result_cache import parse_cache_control
from lambda_server.usecases.runs import SessionRuns

# Items checked (params' schema, the cache's key) between two yields of the event loop.
ITEMS_PER_SLICE = 100
# What an answer holds besides its items' payloads (answer_size): the message's own, and
# each item's fields, an OUTPUT_LIMIT failure's message or a not-run item's status with
# its ErrorInfo (a few hundred bytes), kept aside for every item so that they always fit.
ANSWER_OVERHEAD_BYTES = 1024
ITEM_OVERHEAD_BYTES = 512


class BatchExecutor(Protocol):
    """Runs batches (runtimes/batch.py's BatchRunner)."""

    async def execute_batch(self, batch: BatchJob, deadline: Deadline) -> BatchOutcome: ...


# An item's answer: its execution (run, or a hit of the cache), or why it did not run.
BatchItem = ExecutionResult | LambdaError


class ExecuteBatch:
    """Runs a session's script once for each of many params, as Execute would each.

    The session is claimed once and counted by the number of items (a cache hit counts, as
    in Execute; so does an attempt that fails NotStarted after the claim, the script or a
    Rust program not to be had: a retry is counted again, as Execute's is). Each item is
    checked against the params' schema (one that does not fit is answered InvalidParams,
    the others run), answered from the result cache when it may be, and the rest run
    together (runtimes/batch.py) within what is left of the answer's bound (`answer_bytes`,
    GRPC_MAX_SEND_MESSAGE_BYTES at wiring). Items the deadline left unstarted are answered
    NotStartedByDeadline; the others that did not start, with why (no environment, the
    runtime could not start, the answer is full).
    """

    def __init__(
        self, runs: SessionRuns, executor: BatchExecutor, max_batch_size: int, answer_bytes: int | None = None
    ) -> None:
        self._runs = runs
        self._executor = executor
        self.max_batch_size = max_batch_size
        self._answer_bytes = answer_bytes

    def check_size(self, count: int) -> None:
        """InvalidRequest for a batch of no item, or of more than MAX_BATCH_SIZE: before its
        items are decoded."""
        if count == 0:
            raise InvalidRequest(
                "the batch has no item: send params (or params_json) for each", field="params"
            )
        if count > self.max_batch_size:
            raise InvalidRequest(
                f"the batch has {count} items, more than MAX_BATCH_SIZE ({self.max_batch_size})",
                field="params",
                setting="MAX_BATCH_SIZE",
                limit=str(self.max_batch_size),
            )

    async def __call__(
        self,
        request_id: str,
        items: Sequence[dict[str, JSON]],
        caller: Caller,
        deadline: Deadline,
        cache_control: str = "",
    ) -> list[BatchItem]:
        """Each item's answer, in the order of `items`."""
        self.check_size(len(items))
        requested = parse_cache_control(cache_control)
        runs = self._runs
        claimed = await runs.claim(request_id, caller, deadline, requested, count=len(items))
        answers: list[BatchItem | None] = [None] * len(items)
        keys = [b""] * len(items)
        to_run: list[int] = []
        for index, params in enumerate(items):
            if index and index % ITEMS_PER_SLICE == 0:
                await asyncio.sleep(0)
            try:
                runs.check_params(claimed, params)
            except InvalidParams as exc:
                answers[index] = exc
                continue
            keys[index] = runs.cache_key(claimed, params)
            answers[index] = runs.cached(claimed, keys[index])
            if answers[index] is None:
                to_run.append(index)
        if to_run:
            job = await runs.job(claimed, caller, deadline)
            events: list[dict[str, JSON]] = [{} for _ in items]
            for index in to_run:
                events[index] = runs.event(claimed, items[index])
            budget = self._budget(answers)
            batch = await self._executor.execute_batch(
                BatchJob(job, tuple(events), tuple(to_run), budget), deadline
            )
            for index in to_run:
                outcome = batch.outcomes[index]
                reason = batch.unstarted.get(index)
                if outcome is not None:
                    answers[index] = runs.ran(claimed, keys[index], outcome)
                elif isinstance(reason, LambdaError):
                    answers[index] = copy_of(reason)
                else:
                    answers[index] = NotStartedByDeadline(
                        f"the batch's deadline came before item {index} started: it did not run",
                        item=str(index),
                    )
        done = [answer for answer in answers if answer is not None]
        assert len(done) == len(items), "an item of the batch has no answer"
        return done

    def _budget(self, answers: Sequence[BatchItem | None]) -> int | None:
        """What the items to run may add to the answer: its bound less the overheads and the
        payloads of the items answered already (the cache's hits)."""
        if self._answer_bytes is None:
            return None
        budget = self._answer_bytes - ANSWER_OVERHEAD_BYTES - ITEM_OVERHEAD_BYTES * len(answers)
        for answer in answers:
            if isinstance(answer, ExecutionResult):
                budget -= answer_size(answer.outcome)
        return max(0, budget)
