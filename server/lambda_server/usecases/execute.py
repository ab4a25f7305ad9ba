"""Execute: claim the session, answer from the result cache or run the script in a runtime."""

from __future__ import annotations

from dataclasses import replace
from typing import Protocol

from lambda_server.domain import (
    JSON,
    Caller,
    Deadline,
    ExecutionOutcome,
    ExecutionResult,
    Job,
    OutputSink,
)
from lambda_server.result_cache import parse_cache_control
from lambda_server.usecases.runs import ANONYMOUS, SessionRuns

__all__ = ["ANONYMOUS", "Execute", "Executor"]


class Executor(Protocol):
    """Runs jobs (the environment pool)."""

    async def execute(
        self, job: Job, deadline: Deadline, output: OutputSink | None = None
    ) -> ExecutionOutcome: ...


class Execute:
    """Runs a session's script with params."""

    def __init__(self, runs: SessionRuns, executor: Executor) -> None:
        self._runs = runs
        self._executor = executor

    async def __call__(
        self,
        request_id: str,
        params: dict[str, JSON],
        caller: Caller,
        deadline: Deadline,
        cache_control: str = "",
        output: OutputSink | None = None,
    ) -> ExecutionResult:
        """Run the session's script with params, under the options stored with the session;
        a hit of the result cache is counted as an execution of the session too (it was asked
        for and answered), without a runtime. `output` gets the console output as the script
        writes it (ExecuteStream); a cached result has none."""
        requested = parse_cache_control(cache_control)  # before the session counts this call
        claimed = await self._runs.claim(request_id, caller, deadline, requested)
        self._runs.check_params(claimed, params)
        key = self._runs.cache_key(claimed, params)
        cached = self._runs.cached(claimed, key)
        if cached is not None:
            return cached
        job = replace(
            await self._runs.job(claimed, caller, deadline), event=self._runs.event(claimed, params)
        )
        outcome = await self._executor.execute(job, deadline, output)
        return self._runs.ran(claimed, key, outcome)
