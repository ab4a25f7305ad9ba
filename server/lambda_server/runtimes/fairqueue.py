"""Waiters of several owners, served in turn: first come first served within an owner,
round robin between owners, so that one owner's many waiters never delay another's one."""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class FairQueue(Generic[T]):
    def __init__(self) -> None:
        self._queues: OrderedDict[str, deque[T]] = OrderedDict()  # whose turn it is first
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def waiting(self, owner: str) -> int:
        queue = self._queues.get(owner)
        return len(queue) if queue is not None else 0

    def owners(self) -> list[str]:
        return list(self._queues)

    def push(self, owner: str, item: T) -> None:
        """An owner new to the queue takes its turn after those already waiting."""
        self._queues.setdefault(owner, deque()).append(item)
        self._size += 1

    def remove(self, owner: str, item: T) -> None:
        queue = self._queues[owner]
        queue.remove(item)
        self._size -= 1
        if not queue:
            del self._queues[owner]

    def serve(self, take: Callable[[T], bool]) -> None:
        """Offer the waiters, in turn, to `take`, which returns whether it served one (and
        it leaves the queue). An owner served goes to the back of the turns; it ends when
        a whole round serves nobody."""
        served = True
        while served and self._queues:
            served = False
            for owner, queue in list(self._queues.items()):
                for item in list(queue):
                    if take(item):
                        queue.remove(item)
                        self._size -= 1
                        if queue:
                            self._queues.move_to_end(owner)
                        else:
                            del self._queues[owner]
                        served = True
                        break
                if served:
                    break  # the turn passes to whoever is now first
