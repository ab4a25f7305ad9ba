"""Background tasks' end: what every owner of one does at its stop."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any


async def cancel_and_wait(task: asyncio.Task[Any]) -> None:
    """Cancel a task this owner started, and wait until it has ended (its cancellation is
    the expected end, not an error)."""
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
