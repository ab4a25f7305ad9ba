"""One environment's place in the sandbox: its move into its owner's cpu group, its freezes
between executions, and its release; the calls that may block made off the event loop.

A move into the owner's group runs on the sandbox's thread for cgroup calls, and the
execution that bound the environment does not wait for it: the first write to a
`cgroup.procs` after a quiet spell takes 10-15 ms here (an RCU grace period), against
2-5 ms for the whole first execution. That execution starts in the pre-started group (one
environment's quota, any core) and moves when the write is done: its first milliseconds
are billed to the pre-started group, not to its owner's share. What follows a move (a
freeze, a release, a straggler count) waits for it or counts both groups.

An idle environment is frozen (SANDBOX_IDLE=freeze) once it has been idle
SANDBOX_FREEZE_AFTER_MS (up to a quarter more): one reused sooner, as at saturation, is
neither frozen nor thawed (two writes, and the kernel's work on each of its threads, every
execution). Until then a script's leftover threads may run, in its owner's cpu group
(billed to the owner; in the pre-started one while a first execution's move is pending).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

from lambda_server.domain import Limits
from lambda_server.sandbox.cgroups import EnvironmentCgroup

if TYPE_CHECKING:
    from lambda_server.sandbox import Sandbox

log = logging.getLogger(__name__)

T = TypeVar("T")

REMOVE_ATTEMPTS = 50  # an environment's groups, while its killed processes exit
REMOVE_PAUSE = 0.02  # seconds between them
# How long a release waits for the environment's move into its owner's group (10-15 ms
# as a rule, see above) before it goes on in the background: past it the cgroup thread is
# stuck in the kernel, and the caller (the pool freeing a slot) is not held with it.
MOVE_WAIT_SECONDS = 10.0


class CgroupThread:
    """The sandbox's one thread for cgroup calls that may block: making, moving and
    removing groups wait for the kernel's cgroup mutex, held through an RCU grace period
    by a `cgroup.procs` write. One thread keeps them in order (an owner's group is made
    before its first environment moves in, removed after its last leaves) and keeps
    `Cgroups`' bookkeeping on one thread; writes that follow each other closely share a
    grace period."""

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sandbox-cgroups")

    def submit(self, call: Callable[[], T]) -> asyncio.Future[T]:
        """`call` on the thread; RuntimeError once closed."""
        return asyncio.get_running_loop().run_in_executor(self._executor, call)

    async def run(self, call: Callable[[], T]) -> T:
        """`call` on the thread; once it is closed (the server stopping), here."""
        try:
            future = self.submit(call)
        except RuntimeError:
            return call()
        return await future

    def close(self) -> None:
        """Wait for the calls submitted (moves, removals) and end the thread."""
        self._executor.shutdown(wait=True)


class Freezes:
    """Freezes parked environments once they have been idle `grace` seconds: a queue in the
    order they were parked (the grace is the same for every one) and one timer, which runs
    at most every quarter of the grace (so an environment is frozen within 1.25 times it),
    so that a park costs an append and a resume nothing. At saturation nearly every entry
    is stale (its environment taken again within the grace): a sweep drops those from the
    head whether due or not."""

    def __init__(self, grace: float) -> None:
        self._grace = grace
        self._due: collections.deque[tuple[float, Confinement, int]] = collections.deque()
        self._timer: asyncio.TimerHandle | None = None

    def later(self, confinement: Confinement, generation: int) -> None:
        """Freeze `confinement` after the grace, if it is still in its park `generation`."""
        loop = asyncio.get_running_loop()
        due = loop.time() + self._grace
        self._due.append((due, confinement, generation))
        if self._timer is None:
            self._timer = loop.call_at(due, self._sweep)

    def _sweep(self) -> None:
        self._timer = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        due = self._due
        while due:
            when, confinement, generation = due[0]
            if when <= now:
                due.popleft()
                try:
                    confinement.freeze_if_parked(generation)
                except Exception:  # one environment's failure must not leave the others unfrozen
                    log.exception("could not freeze an idle environment")
            elif not confinement.parked_in(generation):
                due.popleft()
            else:
                break
        if due:
            self._timer = loop.call_at(max(due[0][0], now + self._grace / 4), self._sweep)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._due.clear()


@dataclass
class Confinement:
    """One environment's place in the sandbox: how to start it, and what to release.

    Its methods run on the event loop; what may block there runs on the sandbox's
    CgroupThread."""

    argv: list[str]
    uid: int | None
    cgroup: EnvironmentCgroup | None
    _sandbox: Sandbox
    _threads: int = 0  # the runtime's own threads at its start (SANDBOX_IDLE=recycle)
    _limits: Limits | None = None
    _owner: str | None = None  # whose cpu group the environment is in, once moved there
    # the move into the owner's group while it runs, and where it goes
    _moving: asyncio.Future[EnvironmentCgroup | None] | None = None
    _destination: EnvironmentCgroup | None = None
    _parked: bool = False  # idle since its last execution (SANDBOX_IDLE=freeze)
    _parks: int = 0  # parks so far: a freeze due for an earlier one no longer applies
    _frozen: bool = False
    _after_move: list[Callable[[], None]] = field(default_factory=list)
    _tasks_file: int | None = None  # its pids.current, kept open: a count in one pread

    def join_owner(self, owner: str) -> None:
        """The environment is bound to `owner`'s script: from now on its CPU counts in the
        owner's share (SANDBOX_CPU_CORES_PER_OWNER), with its other environments. Returns at
        once: the move is made on the sandbox's thread (see the module's docstring)."""
        if self.cgroup is None or self._owner is not None or self._moving is not None or self._limits is None:
            return
        move = self._sandbox._move_to_owner(self.cgroup, owner, self._limits)
        if move is None:
            return
        self._moving, self._destination = move
        self._moving.add_done_callback(functools.partial(self._moved, owner))

    def _moved(self, owner: str, move: asyncio.Future[EnvironmentCgroup | None]) -> None:
        self._moving = self._destination = None
        failure = None if move.cancelled() else move.exception()
        if failure is not None:  # the move logs and counts its own failures: this one escaped it
            self._sandbox.owner_moves["failed"] += 1
            log.warning("could not move an environment into its owner's cpu group: %r", failure)
        moved = None if move.cancelled() or failure is not None else move.result()
        if moved is not None and self.cgroup is not None:
            if moved.pids != self.cgroup.pids:  # v2: the file kept open is the old group's
                self._close_tasks_file()
            self.cgroup = moved
            self._owner = owner
        waiting, self._after_move = self._after_move, []
        for then in waiting:
            then()

    def memory_exhausted(self) -> bool:
        """Whether the environment's own memory limit (not the host's OOM killer) killed it."""
        return self.cgroup is not None and self.cgroup.oom_kills() > 0 and self.cgroup.limit_reached()

    def started(self) -> None:
        """The runtime is ready and no script has run in it: count its own threads."""
        if self.cgroup is not None and self._sandbox.idle == "recycle":
            self._threads = self.cgroup.thread_count()

    def park(self) -> None:
        """The environment goes idle: under SANDBOX_IDLE=freeze every process of it is
        stopped once it has been idle SANDBOX_FREEZE_AFTER_MS (at once with 0), unless an
        execution takes it before."""
        if self.cgroup is None or self._sandbox.idle != "freeze":
            return
        self._parked = True
        self._parks += 1
        self._sandbox._freeze_later(self, self._parks)

    def parked_in(self, generation: int) -> bool:
        """Whether the environment is still idle since its park `generation`."""
        return self._parked and generation == self._parks

    def freeze_if_parked(self, generation: int) -> None:
        """Freeze the environment if it is still idle since its park `generation` (once its
        move into its owner's group is done)."""
        if not self.parked_in(generation) or self._frozen or self.cgroup is None:
            return  # taken again, or released, since it was parked
        if self._moving is not None:  # v2: a process moved into a thawed group thaws
            self._after_move.append(functools.partial(self.freeze_if_parked, generation))
            return
        self.cgroup.freeze()  # returns at once: the kernel freezes the tasks on its own
        self._frozen = True
        self._sandbox.freezer_writes["frozen"] += 1

    def resume(self) -> None:
        """The environment is about to run an execution: a freeze still due is dropped,
        and the environment thawed if it was frozen."""
        self._parked = False
        if self._frozen and self.cgroup is not None:
            self.cgroup.thaw()
            self._frozen = False
            self._sandbox.freezer_writes["thawed"] += 1

    def has_stragglers(self) -> bool:
        """Whether the script left processes behind (the runtime itself is the only one
        allowed) or, under SANDBOX_IDLE=recycle, threads beyond the runtime's own.

        After every execution: a count of the environment's tasks first (pids.current, a
        pread of a file kept open, under 1 us), and the list of its processes (an open, a
        read and a close of cgroup.procs, 4 us) only when there is more than one task: one
        task is the runtime's one thread (a Python runtime's whole, until a script starts
        a thread), so no other process is there, nor any thread of a script."""
        cgroup = self.cgroup
        if cgroup is None:
            return False
        moving_to = self._destination
        if moving_to is None or moving_to.pids == cgroup.pids:  # v2 moving: two groups to count
            tasks = self._tasks()
            if tasks is not None and tasks <= 1:
                return False
        if self._processes() > 1:
            return True
        return self._sandbox.idle == "recycle" and self._thread_count() > self._threads

    def _tasks(self) -> int | None:
        """The tasks (threads of every process) in the environment's pids group; None when
        the file cannot be read."""
        assert self.cgroup is not None
        try:
            if self._tasks_file is None:
                self._tasks_file = os.open(self.cgroup.pids / "pids.current", os.O_RDONLY)
            return int(os.pread(self._tasks_file, 32, 0))
        except (OSError, ValueError):
            self._close_tasks_file()
            return None

    def _close_tasks_file(self) -> None:
        if self._tasks_file is not None:
            with contextlib.suppress(OSError):
                os.close(self._tasks_file)
            self._tasks_file = None

    def _processes(self) -> int:
        count = self.cgroup.process_count() if self.cgroup is not None else 0
        # v2, while it moves (v1's memory group stays): the old group read first, then the
        # new one, so none is missed (one that moves between the reads counts twice: the
        # environment is ended for nothing, at worst)
        moving_to = self._destination
        if moving_to is not None and self.cgroup is not None and moving_to.memory != self.cgroup.memory:
            count += moving_to.process_count()
        return count

    def _thread_count(self) -> int:
        count = self.cgroup.thread_count() if self.cgroup is not None else 0
        moving_to = self._destination
        if moving_to is not None and self.cgroup is not None and moving_to.pids != self.cgroup.pids:
            count += moving_to.thread_count()
        return count

    async def release(self) -> None:
        """After the process is dead: end any straggler, remove the cgroup, free the uid."""
        self._parked = False  # a freeze still due is dropped
        self._close_tasks_file()
        moving = self._moving
        if moving is not None:  # the move finishes first (it may make the groups removed here)
            done, _ = await asyncio.wait([moving], timeout=MOVE_WAIT_SECONDS)
            if not done:
                self._sandbox.owner_moves["slow"] += 1
                log.warning(
                    "an environment's move into its owner's cpu group has not ended after %g s "
                    "(the cgroup thread is blocked in the kernel); its release goes on once it has",
                    MOVE_WAIT_SECONDS,
                )
                self._sandbox.in_background(self._release_after(moving))
                return
        await self._release_groups()

    async def _release_after(self, moving: asyncio.Future[EnvironmentCgroup | None]) -> None:
        """The rest of a release whose move outlived MOVE_WAIT_SECONDS: its uid stays
        taken until its groups are killed and removed."""
        await asyncio.wait([moving])
        await self._release_groups()

    async def _release_groups(self) -> None:
        cgroup, self.cgroup = self.cgroup, None
        if cgroup is not None:
            thread = self._sandbox.cgroup_thread
            await thread.run(cgroup.kill)
            for _ in range(REMOVE_ATTEMPTS):
                if await thread.run(cgroup.remove):
                    break
                await asyncio.sleep(REMOVE_PAUSE)
            if self._owner is not None:
                await thread.run(functools.partial(self._sandbox._leave_owner, self._owner))
                self._owner = None
        if self.uid is not None:
            self._sandbox._uids.discard(self.uid)
            self.uid = None
