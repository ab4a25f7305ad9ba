"""Background tasks: what every owner of one does at its stop, and the periodic sweeps."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from lambda_server.domain import Deadline
from lambda_server.errors import DeadlineExceeded, InternalError, LambdaError, Unavailable, own_instance

T = TypeVar("T")


async def cancel_and_wait(task: asyncio.Task[Any]) -> None:
    """Cancel a task this owner started, and wait until it has ended (its cancellation is
    the expected end, not an error)."""
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def sweep_every(
    interval: float, sweep: Callable[[], Awaitable[int]], what: str, where: object, log: logging.Logger
) -> None:
    """Run `sweep` every `interval` seconds until cancelled, logging what it removed (`what`
    from `where`); a failed pass is logged and the next one tries again (the database away:
    a warning; a bug: its traceback)."""
    while True:
        await asyncio.sleep(interval)
        try:
            removed = await sweep()
        except LambdaError as exc:
            log.warning("%s sweep: %s", what, exc.message)
            continue
        except Exception:
            log.exception("%s sweep failed", what)
            continue
        if removed:
            log.info("%s sweep: %d unused %ss removed from %s", what, removed, what, where)


async def outcome(
    task: asyncio.Task[T],
    deadline: Deadline,
    passed: str,
    stopped: str,
    internal: tuple[logging.Logger, str] | None = None,
) -> T:
    """What shared work (a task its component owns) ended with, waited for until this
    caller's deadline: the task goes on when the caller stops waiting (its deadline, its
    cancellation). DeadlineExceeded(`passed`) past the deadline, Unavailable(`stopped`) when
    the task was cancelled (the server stopping); its failure is raised as an instance of
    this caller's own, or, with `internal` (a log and a message), a failure that is not a
    LambdaError is logged there and raised as InternalError(message)."""
    if not task.done():
        remaining = deadline.remaining()
        await asyncio.wait((task,), timeout=None if remaining is None else max(0.0, remaining))
    if not task.done():
        raise DeadlineExceeded(passed)
    if task.cancelled():
        raise Unavailable(stopped)
    error = task.exception()
    if error is not None:
        if internal is not None and not isinstance(error, LambdaError):
            log, message = internal
            log.error("%s", message, exc_info=error)
            raise InternalError(f"{message}: {type(error).__name__}")
        raise own_instance(error)
    return task.result()


def retrieve(task: asyncio.Task[Any]) -> None:
    """Mark a shared task's failure as seen (a done callback): a failure whose callers all
    left is no loose end."""
    if not task.cancelled():
        task.exception()
