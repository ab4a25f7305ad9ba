"""Background tasks: what every owner of one does at its stop, and the periodic sweeps."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from lambda_server.errors import LambdaError


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
