"""The memory budget: what the memory limits of every live environment may add up to.

Each live runtime process (bound, binding, pre-started, or a checker) holds its
`Limits.memory_mb` from the moment its start is decided until it is discarded, so
the limits never promise more memory than the host (or container) has.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from lambda_server.errors import RuntimeBusy


class MemoryBudget:
    """MiB held against SANDBOX_TOTAL_MEMORY_MB; `total` None: no budget (nothing waits)."""

    def __init__(self, total_mb: int | None) -> None:
        self.total = total_mb
        self.used = 0
        # Called (soon, not inside `give_back`) when memory was given back: whoever waits
        # for some is served then.
        self.on_free: Callable[[], None] | None = None
        # Makes room for `mb` MiB (evicting idle environments) for a start the server
        # itself needs (a checker); returns whether it now fits.
        self.reclaim: Callable[[int], bool] | None = None
        self._notify: asyncio.Handle | None = None

    @property
    def free(self) -> int | None:
        return None if self.total is None else self.total - self.used

    def fits(self, mb: int) -> bool:
        return self.total is None or self.used + mb <= self.total

    def take(self, mb: int) -> None:
        """Hold `mb` MiB; the caller has checked that it fits."""
        self.used += mb

    def take_or_reclaim(self, mb: int, what: str) -> None:
        """Hold `mb` MiB, evicting idle environments to make room; RuntimeBusy when even
        that is not enough."""
        if not self.fits(mb) and (self.reclaim is None or not self.reclaim(mb)):
            raise RuntimeBusy(
                f"{what} needs {mb} MiB, and {self.used} of the {self.total} MiB the environments "
                f"may hold are in use (SANDBOX_TOTAL_MEMORY_MB)"
            )
        self.used += mb

    def give_back(self, mb: int) -> None:
        self.used -= mb
        if mb and self.on_free is not None and self._notify is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # the loop is closing: nobody waits any more
                return
            self._notify = loop.call_soon(self._notify_free)

    def _notify_free(self) -> None:
        self._notify = None
        if self.on_free is not None:
            self.on_free()

    def describe(self) -> str:
        return f"{self.used}/{self.total} MiB" if self.total is not None else f"{self.used} MiB (no budget)"
