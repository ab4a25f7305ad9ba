"""Slots shared by tenants: a total, a share per owner, and waiters served round robin by owner."""

from __future__ import annotations

import asyncio
from collections import Counter, OrderedDict, deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class SlotWaitTimeout(Exception):
    """No slot came within the wait; `own_share` tells whether the owner's own share was
    full (its own work held it up) rather than every slot being held by others."""

    def __init__(self, own_share: bool) -> None:
        super().__init__("no slot came within the wait")
        self.own_share = own_share


class FairSlots:
    """`total` numbered slots, of which one owner holds `per_owner` at most.

    A caller that finds a free slot within its owner's share takes it at once;
    the others wait in a queue of their owner's. A freed slot goes to the waiting
    owner under its share that was served least recently (round robin by owner;
    first come first served among equals), so one owner's burst waits behind its
    own work, never in front of another owner's. Slots are
    numbered so that each can keep a worker of its own; the most recently freed
    is taken first, which keeps warm what is used.
    """

    def __init__(self, total: int, per_owner: int) -> None:
        self.total = total
        self.per_owner = min(per_owner, total)
        self._free = list(range(total - 1, -1, -1))  # a stack: slot 0 on top
        self._held: Counter[str] = Counter()
        self._waiting: OrderedDict[str, deque[asyncio.Future[int]]] = OrderedDict()
        # when each owner that holds or waits last took a slot (a count of slots taken)
        self._taken = 0
        self._last: dict[str, int] = {}

    @asynccontextmanager
    async def slot(self, owner: str, wait: float) -> AsyncIterator[int]:
        """Hold a slot (its number) for the block; SlotWaitTimeout after `wait` seconds."""
        number = await self.acquire(owner, wait)
        try:
            yield number
        finally:
            self.release(owner, number)

    async def acquire(self, owner: str, wait: float) -> int:
        if self._free and self._held[owner] < self.per_owner and owner not in self._waiting:
            return self._take(owner)
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(owner, deque()).append(future)
        try:
            async with asyncio.timeout(wait):
                return await future
        except BaseException as exc:
            if future.done() and not future.cancelled():
                self.release(owner, future.result())  # served as it gave up: the slot goes on
            else:
                future.cancel()
                self._forget(owner, future)
            if isinstance(exc, TimeoutError):
                raise SlotWaitTimeout(self._held[owner] >= self.per_owner) from None
            raise

    def release(self, owner: str, number: int) -> None:
        self._held[owner] -= 1
        if self._held[owner] <= 0:
            del self._held[owner]
            if owner not in self._waiting:
                self._last.pop(owner, None)
        self._free.append(number)
        self._serve()

    def _take(self, owner: str) -> int:
        self._held[owner] += 1
        self._taken += 1
        self._last[owner] = self._taken
        return self._free.pop()

    def _serve(self) -> None:
        """Give free slots to waiting owners in turn, skipping owners at their share."""
        while self._free:
            eligible = [o for o in self._waiting if self._held[o] < self.per_owner]
            if not eligible:
                return  # everyone waiting is at its share
            # min() keeps the first of equals: the owner that has waited longest
            owner = min(eligible, key=lambda o: self._last.get(o, -1))
            queue = self._waiting[owner]
            future = queue.popleft()
            if not queue:
                del self._waiting[owner]
            future.set_result(self._take(owner))

    def _forget(self, owner: str, future: asyncio.Future[int]) -> None:
        queue = self._waiting.get(owner)
        if queue is None:
            return
        try:
            queue.remove(future)
        except ValueError:
            return
        if not queue:
            del self._waiting[owner]
            if not self._held[owner]:
                self._last.pop(owner, None)
