"""Owners' shares of the environment pool, and which idle environments make room for whom.

Every owner may hold `per_owner` of the pool's `max_environments` and the same
fraction of the memory budget. Within its own share only an owner's own idle
environments make room; for the pool's caps, first its own and those of owners
over an equal part of the pool, then anyone's, least recently used first (the
owner is within its share by then, so it never takes more than its share).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar

W = TypeVar("W")  # a worker


@dataclass
class Usage:
    """What one owner holds: environments bound or binding, and their memory limits."""

    environments: int = 0
    memory_mb: int = 0


@dataclass(frozen=True)
class Held(Generic[W]):
    """An idle environment (or, without an owner, a pre-started process) that could be evicted."""

    worker: W
    owner: str | None
    memory_mb: int


@dataclass(frozen=True)
class Room(Generic[W]):
    """The evictions that make room (`victims`), or None when there is none now;
    `short_of_memory`: the budget, not only a count, stood in the way."""

    victims: list[W] | None
    short_of_memory: bool = False


@dataclass(frozen=True)
class Shares:
    max_environments: int
    per_owner: int
    total_memory_mb: int | None  # None: no memory budget

    @property
    def owner_memory_mb(self) -> float:
        if self.total_memory_mb is None:
            return float("inf")
        return self.total_memory_mb * min(1.0, self.per_owner / self.max_environments)

    def room_for(
        self,
        owner: str,
        memory_mb: int,
        budget_need_mb: int,
        bound: int,
        free_mb: int | None,
        idle: list[Held[W]],
        prestarted: list[Held[W]],
        owners: dict[str, Usage],
        waiting_owners: list[str],
    ) -> Room[W]:
        """Room for `owner` to bind one more environment of `memory_mb`, of which
        `budget_need_mb` is new to the budget (0 when a pre-started process is bound).
        `idle` is least recently used first; `bound` counts bound and binding environments."""
        usage = owners.get(owner) or Usage()
        chosen: list[Held[W]] = []
        over_count = usage.environments + 1 - self.per_owner
        over_memory = usage.memory_mb + memory_mb - self.owner_memory_mb
        for held in idle:
            if over_count <= 0 and over_memory <= 0:
                break
            if held.owner == owner:
                chosen.append(held)
                over_count -= 1
                over_memory -= held.memory_mb
        if over_count > 0 or over_memory > 0:
            return Room(None)  # an owner at its share waits for its own environments
        missing_count = bound - len(chosen) + 1 - self.max_environments
        missing_memory = (
            -1 if free_mb is None else budget_need_mb - free_mb - sum(h.memory_mb for h in chosen)
        )
        over_fair = self._over_fair(owner, owners, waiting_owners)
        rest = [held for held in idle if held not in chosen]
        preferred = [h for h in rest if h.owner == owner or over_fair(h.owner)]
        others = [h for h in rest if h not in preferred]
        for held in [*preferred, *others, *prestarted]:  # pre-started processes come back later
            if missing_count <= 0 and missing_memory <= 0:
                break
            if held.owner is None and missing_memory <= 0:
                break  # they hold memory, not a place in the pool
            chosen.append(held)
            missing_count -= held.owner is not None
            missing_memory -= held.memory_mb
        if missing_count > 0 or missing_memory > 0:
            return Room(None, short_of_memory=missing_memory > 0)
        return Room([held.worker for held in chosen])

    def _over_fair(self, asking: str, owners: dict[str, Usage], waiting: list[str]) -> _OverFair:
        count = len({asking, *owners, *waiting})
        return _OverFair(self.max_environments / count, (self.total_memory_mb or 0) / count, owners, self)


@dataclass(frozen=True)
class _OverFair:
    """Whether an owner holds more than an equal part of the pool, among the owners that
    hold environments or wait for one."""

    environments: float
    memory_mb: float
    owners: dict[str, Usage]
    shares: Shares

    def __call__(self, owner: str | None) -> bool:
        usage = self.owners.get(owner) if owner is not None else None
        return usage is not None and (
            usage.environments > self.environments
            or (self.shares.total_memory_mb is not None and usage.memory_mb > self.memory_mb)
        )
