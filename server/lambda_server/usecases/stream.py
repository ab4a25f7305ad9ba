"""ExecuteStream's use: an execution whose console output comes out as it is written."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

from lambda_server.domain import ExecutionResult, OutputChunk, OutputSink

_DONE = OutputChunk("", "", -1)


async def streamed(
    run: Callable[[OutputSink], Coroutine[Any, Any, ExecutionResult]],
) -> AsyncIterator[OutputChunk | ExecutionResult]:
    """Run `run(sink)` (an Execute given the sink) as a task of its own, and yield the console
    output it writes to the sink, in order, then its result; its error is raised.

    The queue between the two needs no bound of its own: the runtimes hand on at most
    MAX_LOG_BYTES of output an execution, each chunk a byte of it or more (runtimes/process.py).
    Chunks of one stream that queued up while the caller took the previous one go out as one.
    A caller that stops iterating (cancelled, or past its deadline) cancels the execution, and
    waits for its end: the pool kills its environment.
    """
    queue: asyncio.Queue[OutputChunk] = asyncio.Queue()

    def sink(stream: str, text: str, offset: int) -> None:
        queue.put_nowait(OutputChunk(stream, text, offset))

    task = asyncio.create_task(run(sink))
    task.add_done_callback(lambda _: queue.put_nowait(_DONE))  # after the last chunk
    try:
        done = False
        while not done:
            batch = [await queue.get()]
            while not queue.empty():
                batch.append(queue.get_nowait())
            if batch[-1] is _DONE:
                batch.pop()
                done = True
            for chunk in _merged(batch):
                yield chunk
        yield task.result()
    finally:
        if not task.done():
            task.cancel()
            await asyncio.wait([task])  # bounded: a cancelled execution's worker is killed at once
        if not task.cancelled():
            task.exception()  # seen: an error raised after the caller left is not news


def _merged(chunks: list[OutputChunk]) -> list[OutputChunk]:
    """Adjacent chunks of one stream as one."""
    merged: list[OutputChunk] = []
    for chunk in chunks:
        last = merged[-1] if merged else None
        if last is not None and last.stream == chunk.stream:
            merged[-1] = OutputChunk(last.stream, last.text + chunk.text, last.offset)
        else:
            merged.append(chunk)
    return merged
