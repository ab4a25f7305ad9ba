"""Memory, process-count and CPU limits per environment, and its freezer, on cgroup v2 or v1.

v2 (one unified tree): a `lambda-<pid>` group beside the server's own, with the
memory, pids and cpu controllers enabled, and one child per environment. v1: the
same layout under the memory and pids hierarchies, and under cpu and freezer where
those are mounted. Either way an
environment's OOM kills are counted, so MEMORY_LIMIT is told apart from any
other crash; its CPU is capped by a CFS quota with the same weight for every
environment; and an idle environment can be frozen (v1 `freezer.state`, v2
`cgroup.freeze`), so nothing of a script runs between its executions. An owner's
environments share a cpu group (its quota) and, where the cpuset controller is there,
cores of their own: with every owner free to run on every core, a busy owner's scripts
held both cores of a 2-core machine for half of each CFS period, and another tenant's
call waited behind their time slices (its p99 5-8 ms against 2-3 alone; on cores of
their own, 2-2.5 ms).

Making, removing and moving groups is slow at times and blocks: the first write to a
`cgroup.procs` after a quiet spell waits for an RCU grace period (10-15 ms here, cgroup
v1 on Linux 6.18; the next ones 0.05 ms), holding the kernel's cgroup mutex, which every
mkdir and rmdir of a group waits for. The sandbox makes those calls on a thread of its
own (sandbox/__init__.py); `Cgroups`' owner bookkeeping is only touched there.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import math
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

ROOT = Path("/sys/fs/cgroup")
CPU_PERIOD_US = 100_000  # the kernel's default CFS period
CPU_SHARES = 1024  # v1: every environment weighs the same (the kernel's default)
CPU_WEIGHT = 100  # v2: likewise
# v1: an empty group of ours that stays frozen. While any group is frozen the kernel's
# freezer static key stays on; with none, every freeze and every thaw switches it, which
# patches kernel text on every CPU: about 100 us a write instead of 15-25 (measured here,
# Linux 6.18 on 2 vCPUs), on the event loop, twice an execution.
KEY_HOLDER = "frozen-key-holder"
MOVE_ROUNDS = 4  # reads of a moving environment's old group, for processes forked meanwhile


class CgroupUnavailable(Exception):
    """The memory and pids controllers cannot be used here; the message says why."""


@dataclass(frozen=True)
class EnvironmentCgroup:
    """The cgroup directories of one environment (one on v2, one per hierarchy on v1);
    cpu and freezer are None where that controller is not in use."""

    memory: Path
    pids: Path
    version: int
    cpu: Path | None = None
    freezer: Path | None = None
    # the pre-started group a move into the owner's left behind because processes were
    # still in it (forked while it moved): removed with the environment
    former: Path | None = None

    @functools.cached_property
    def memory_procs(self) -> str:
        return str(self.memory / "cgroup.procs")

    @property
    def directories(self) -> set[Path]:
        return {d for d in (self.memory, self.pids, self.cpu, self.freezer, self.former) if d is not None}

    @property
    def procs_files(self) -> list[str]:
        """The files a new process of the environment writes itself into (jail.py)."""
        groups = {d for d in (self.memory, self.pids, self.cpu, self.freezer) if d is not None}
        return [str(d / "cgroup.procs") for d in sorted(groups)]

    @functools.cached_property
    def _freeze_file(self) -> str | None:
        if self.freezer is None:
            return None
        return str(self.freezer / ("cgroup.freeze" if self.version == 2 else "freezer.state"))

    def freeze(self) -> None:
        """Stop every task of the environment; returns without waiting for them to stop
        (the kernel finishes freezing on its own, and a thaw cancels it)."""
        if self._freeze_file is not None:
            _write(self._freeze_file, b"1" if self.version == 2 else b"FROZEN")

    def thaw(self) -> None:
        """Let the environment's tasks run again (one write; they run at once)."""
        if self._freeze_file is not None:
            _write(self._freeze_file, b"0" if self.version == 2 else b"THAWED")

    @functools.cached_property
    def _threads_file(self) -> str:
        return str(self.pids / ("cgroup.threads" if self.version == 2 else "tasks"))

    def thread_count(self) -> int:
        """Threads (tasks) of every process in the environment."""
        return _count(self._threads_file)  # after every execution in the recycle mode

    def oom_kills(self) -> int:
        """How many processes of the environment the kernel killed for memory."""
        name = "memory.events" if self.version == 2 else "memory.oom_control"
        try:
            for line in (self.memory / name).read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
        except (OSError, ValueError):
            pass
        return 0

    def limit_reached(self) -> bool:
        """Whether the environment ever reached its own memory limit. `oom_kills` also
        counts kills by the host's (or an ancestor group's) OOM killer; this does not:
        v2's `max` and `oom` events, and v1's fail counts, are charged to the group
        whose limit refused the memory."""
        if self.version == 2:
            events = _counters(self.memory / "memory.events")
            return events.get("max", 0) > 0 or events.get("oom", 0) > 0
        # with swap accounting the memory+swap counter (same limit) is charged first
        if _number(self.memory / "memory.failcnt") or _number(self.memory / "memory.memsw.failcnt"):
            return True
        limit = _number(self.memory / "memory.limit_in_bytes")
        peak = _number(self.memory / "memory.max_usage_in_bytes")
        return limit > 0 and peak >= limit - max(limit // 32, 1 << 20)

    def process_count(self) -> int:
        """Processes (not threads) in the environment; its runtime alone is 1."""
        count = _count(self.memory_procs)  # after every execution
        if self.former is not None and self.version == 2:  # v1: the memory group never moves
            count += _count(str(self.former / "cgroup.procs"))
        return count

    def kill(self) -> None:
        """SIGKILL every process in the environment (the PID namespace's end does it too)."""
        if self.version == 2:
            for group in (self.memory, self.former):
                if group is not None:
                    with contextlib.suppress(OSError):
                        (group / "cgroup.kill").write_text("1")
            return
        with contextlib.suppress(OSError):
            for pid in (self.memory / "cgroup.procs").read_text().split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), 9)
        self.thaw()  # a frozen v1 task dies of its SIGKILL only once thawed

    def remove(self) -> bool:
        """Remove the directories whose processes are gone; whether none is left (blocking:
        a caller retries while the killed processes exit)."""
        removed = True
        for directory in self.directories:
            try:
                directory.rmdir()
            except FileNotFoundError:
                pass
            except OSError:
                removed = False
        return removed


class Cgroups:
    """Creates one cgroup per environment under this server's own group."""

    def __init__(
        self,
        memory_base: Path,
        pids_base: Path,
        version: int,
        cpu_base: Path | None = None,
        freezer_base: Path | None = None,
        cpuset_base: Path | None = None,
    ) -> None:
        self._memory = memory_base
        self._pids = pids_base
        self.version = version
        self._cpu = cpu_base
        self._freezer = freezer_base
        self._owners: Counter[str] = Counter()  # environments in each owner's cpu group
        # owners' cores (SANDBOX_OWNER_CPUSET): none on a single core, where there is no choice
        cpus = os.sched_getaffinity(0)
        self._cpuset = cpuset_base if len(cpus) > 1 else None
        self._owner_cpus: dict[str, tuple[int, ...]] = {}  # owners with environments, placed
        self._cpu_owners: Counter[int] = Counter({cpu: 0 for cpu in cpus})

    @property
    def controllers(self) -> list[str]:
        """The controllers in use, as Health's sandbox layers name them."""
        names = ["memory", "pids"]
        if self._cpu is not None:
            names.append("cpu")
        if self._freezer is not None:
            names.append("freezer")
        if self._cpuset is not None:
            names.append("cpuset")
        return names

    @classmethod
    def detect(cls, name: str, cpuset: bool = False) -> Cgroups:
        """Set up `name` groups for this server, on v2 when it has the controllers, else v1;
        with `cpuset`, owners' cpusets too where the controller is there."""
        own = own_paths()
        unified = ROOT / "cgroup.controllers"
        if unified.exists() and {"memory", "pids"} <= set(unified.read_text().split()):
            return cls._v2(own.get("", "/"), name, cpuset)
        memory, pids = ROOT / "memory", ROOT / "pids"
        if (memory / "cgroup.procs").exists() and (pids / "cgroup.procs").exists():
            memory_base = memory / own.get("memory", "/").lstrip("/") / name
            pids_base = pids / own.get("pids", "/").lstrip("/") / name
            for base in (memory_base, pids_base):
                _make(base)
            # cpu may be mounted alone or with cpuacct (cpu,cpuacct): found by its mount
            mounts = _v1_mounts()
            optional: dict[str, Path | None] = {}
            for controller in ("cpu", "freezer", "cpuset"):
                mount = mounts.get(controller)
                optional[controller] = None
                if mount is not None and controller in own and (cpuset or controller != "cpuset"):
                    base = mount / own[controller].lstrip("/") / name
                    with contextlib.suppress(CgroupUnavailable, OSError):
                        _make(base)
                        if controller == "cpuset":  # a v1 cpuset takes no task before both are set
                            _inherit_cpuset(base)
                        optional[controller] = base
            if optional["freezer"] is not None:
                holder = optional["freezer"] / KEY_HOLDER
                with contextlib.suppress(CgroupUnavailable):
                    _make(holder)
                    _write(str(holder / "freezer.state"), b"FROZEN")
            return cls(memory_base, pids_base, 1, optional["cpu"], optional["freezer"], optional["cpuset"])
        raise CgroupUnavailable(
            "no cgroup v2 with memory and pids controllers, nor v1 memory and pids hierarchies"
        )

    @classmethod
    def _v2(cls, own: str, name: str, want_cpuset: bool = False) -> Cgroups:
        # A group that holds processes cannot hand controllers to children
        # (the "no internal processes" rule), so ours sits beside the server's.
        parent = ROOT / own.lstrip("/")
        if own != "/":
            parent = parent.parent
        base = parent / name
        _make(base)
        try:
            (base / "cgroup.subtree_control").write_text("+memory +pids")
        except OSError as exc:
            raise CgroupUnavailable(f"cannot enable memory and pids controllers in {base}: {exc}") from None
        cpu = None
        if "cpu" in (base / "cgroup.controllers").read_text().split():
            with contextlib.suppress(OSError):
                (base / "cgroup.subtree_control").write_text("+cpu")
                cpu = base
        freezer = base if (base / "cgroup.freeze").exists() else None  # in every non-root group since 5.2
        cpuset = None
        if want_cpuset and cpu is not None and "cpuset" in (base / "cgroup.controllers").read_text().split():
            with contextlib.suppress(OSError):
                (base / "cgroup.subtree_control").write_text("+cpuset")
                cpuset = base
        return cls(base, base, 2, cpu, freezer, cpuset)

    def create(
        self, name: str, memory_bytes: int, max_processes: int, cpu_cores: float = 0.0
    ) -> EnvironmentCgroup:
        """An environment's group; `cpu_cores` 0 leaves its CPU unlimited (no cpu group)."""
        cpu = self._cpu / name if self._cpu is not None and cpu_cores > 0 else None
        freezer = self._freezer / name if self._freezer is not None else None
        group = EnvironmentCgroup(self._memory / name, self._pids / name, self.version, cpu, freezer)
        for directory in group.directories:
            _make(directory)
        if self.version == 2:
            (group.memory / "memory.max").write_text(str(memory_bytes))
            with contextlib.suppress(OSError):  # absent without swap accounting
                (group.memory / "memory.swap.max").write_text("0")
            (group.pids / "pids.max").write_text(str(max_processes))
        else:
            (group.memory / "memory.limit_in_bytes").write_text(str(memory_bytes))
            with contextlib.suppress(OSError):  # absent without swap accounting
                (group.memory / "memory.memsw.limit_in_bytes").write_text(str(memory_bytes))
            (group.pids / "pids.max").write_text(str(max_processes))
        if group.cpu is not None:
            if self.version == 2:
                quota = max(1000, round(cpu_cores * CPU_PERIOD_US))  # the kernel's least quota is 1 ms
                (group.cpu / "cpu.weight").write_text(str(CPU_WEIGHT))
                (group.cpu / "cpu.max").write_text(f"{quota} {CPU_PERIOD_US}")
            else:
                _write_limits_v1(group.cpu, cpu_cores)
        return group

    def destination(self, group: EnvironmentCgroup, owner: str) -> EnvironmentCgroup | None:
        """Where `join_owner` puts the environment (paths only, nothing is made); None when
        it has no cpu group to move."""
        if self._cpu is None or group.cpu is None:
            return None
        target = self._cpu / _owner_name(owner) / group.cpu.name
        if self.version == 2:  # one group holds every controller: the whole group moves
            return EnvironmentCgroup(target, target, 2, target, target if self._freezer is not None else None)
        return dataclasses.replace(group, cpu=target)

    def join_owner(
        self,
        group: EnvironmentCgroup,
        owner: str,
        limits: tuple[int, int, float],
        owner_cores: float,
    ) -> EnvironmentCgroup | None:
        """Move an environment's processes into its owner's cpu group, where all the owner's
        environments share `owner_cores` (each still capped at `cores`): the owner's
        processes compete as one, with one weight, whatever their number. On v1 only the
        cpu hierarchy changes; on v2, where one group holds every controller, the
        environment's group is made anew under the owner's, limits and all (memory
        charged before the move stays with the old group's parent: the runtime's start).
        The moved group, counted in the owner's; None when there is no cpu group to move.

        Blocking (the sandbox calls it on its thread), and the processes may run meanwhile:
        one forked while its parent moves stays behind, so the old group is read again
        until it is empty (a fork holds the kernel's threadgroup lock that a move takes:
        a child forked after its parent's move is born in the new group)."""
        moved = self.destination(group, owner)
        if moved is None or group.cpu is None:
            return None
        parent = self._owner_group(owner, owner_cores)
        if self._cpuset is not None and owner not in self._owner_cpus:  # placed with its first
            with contextlib.suppress(CgroupUnavailable):  # the owner's quota holds all the same
                self._owner_cpuset(owner, owner_cores)
        placed = owner in self._owner_cpus
        name = group.cpu.name
        if self.version == 2:
            moved = _relative(self, parent).create(name, *limits)
        else:
            assert moved.cpu is not None
            _make(moved.cpu)
            _write_limits_v1(moved.cpu, limits[2])
        assert moved.cpu is not None
        cores = None
        if placed and self.version == 1 and self._cpuset is not None:
            cores = str(self._cpuset / _owner_name(owner) / "cgroup.procs")  # v2: the new group's
        for _ in range(MOVE_ROUNDS):
            pids = (_read(group.cpu / "cgroup.procs") or "").split()
            if not pids:
                break
            for pid in pids:
                if cores is not None:
                    _write(cores, pid.encode())
                _write(str(moved.cpu / "cgroup.procs"), pid.encode())  # gone meanwhile: ignored
        try:
            group.cpu.rmdir()
        except FileNotFoundError:
            pass
        except OSError:  # still busy (a fork bomb outran the rounds): removed with the environment
            moved = dataclasses.replace(moved, former=group.cpu)
        self._owners[owner] += 1
        return moved

    def _owner_cpuset(self, owner: str, cores: float) -> None:
        """Place a new owner on as many cores as `cores` needs, at most all but one, those the
        fewest owners run on now (the lowest numbers first among equals), and write its
        cpuset (v1: a group of the cpuset hierarchy; v2: its group's cpuset.cpus)."""
        assert self._cpuset is not None
        available = sorted(self._cpu_owners)
        count = max(1, min(len(available) - 1, math.ceil(cores)))
        placed = tuple(sorted(sorted(available, key=lambda cpu: (self._cpu_owners[cpu], cpu))[:count]))
        cpus = ",".join(str(cpu) for cpu in placed).encode()
        if self.version == 2:
            assert self._cpu is not None
            _write_strict(self._cpu / _owner_name(owner) / "cpuset.cpus", cpus)
        else:
            group = self._cpuset / _owner_name(owner)
            _make(group)
            _write_strict(group / "cpuset.mems", (_read(self._cpuset / "cpuset.mems") or "0").encode())
            _write_strict(group / "cpuset.cpus", cpus)
        self._owner_cpus[owner] = placed  # only once its cpuset is written
        self._cpu_owners.update(placed)

    def leave_owner(self, owner: str) -> None:
        """An environment of the owner was removed: its groups, and its hold on its cores,
        go with its last one."""
        self._owners[owner] -= 1
        if self._owners[owner] <= 0:
            del self._owners[owner]
            placed = self._owner_cpus.pop(owner, ())
            self._cpu_owners.subtract(placed)
            for base in (self._cpu, self._cpuset if self.version == 1 else None):
                if base is not None:
                    with contextlib.suppress(OSError):
                        (base / _owner_name(owner)).rmdir()

    def _owner_group(self, owner: str, cores: float) -> Path:
        assert self._cpu is not None
        group = self._cpu / _owner_name(owner)
        if not group.exists():
            _make(group)
            if self.version == 2:
                controllers = "+memory +pids +cpu" + (" +cpuset" if self._cpuset is not None else "")
                (group / "cgroup.subtree_control").write_text(controllers)
                (group / "cpu.weight").write_text(str(CPU_WEIGHT))
                (group / "cpu.max").write_text(f"{max(1000, round(cores * CPU_PERIOD_US))} {CPU_PERIOD_US}")
            else:
                _write_limits_v1(group, cores)
        return group

    def close(self) -> None:
        if self._freezer is not None and self.version == 1:
            _write(str(self._freezer / KEY_HOLDER / "freezer.state"), b"THAWED")
            with contextlib.suppress(OSError):
                (self._freezer / KEY_HOLDER).rmdir()
        for base in {self._memory, self._pids, self._cpu, self._freezer, self._cpuset}:
            if base is not None:
                with contextlib.suppress(OSError):
                    base.rmdir()


def thaw_process(pid: int) -> None:
    """Thaw the freezer group a process is in (v1 `freezer.state`, v2 `cgroup.freeze`), so
    that a signal sent to it is acted on: a frozen process does not die of SIGKILL until
    thawed. Blocking (/proc and cgroup files); nothing when it is not frozen or gone."""
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except OSError:
        return
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2
            _write(str(ROOT / path.lstrip("/") / "cgroup.freeze"), b"0")
        elif "freezer" in controllers.split(","):
            _write(str(ROOT / controllers / path.lstrip("/") / "freezer.state"), b"THAWED")


def _write_limits_v1(directory: Path, cores: float) -> None:
    """A v1 cpu group's weight and CFS quota (the kernel's least quota is 1 ms)."""
    (directory / "cpu.shares").write_text(str(CPU_SHARES))
    (directory / "cpu.cfs_period_us").write_text(str(CPU_PERIOD_US))
    (directory / "cpu.cfs_quota_us").write_text(str(max(1000, round(cores * CPU_PERIOD_US))))


def _inherit_cpuset(group: Path) -> None:
    """A new v1 cpuset group's cores and memory nodes: its parent's (it starts empty)."""
    for name in ("cpuset.mems", "cpuset.cpus"):
        _write_strict(group / name, (_read(group.parent / name) or "").encode())


def _write_strict(path: Path, value: bytes) -> None:
    """A cgroup file's write whose failure matters (CgroupUnavailable)."""
    try:
        path.write_bytes(value)
    except OSError as exc:
        raise CgroupUnavailable(f"cannot write {path}: {exc}") from None


def _owner_name(owner: str) -> str:
    """An owner's group name: a digest, so that no owner's text reaches a path."""
    return "owner-" + hashlib.sha256(owner.encode()).hexdigest()[:16]


def _relative(cgroups: Cgroups, parent: Path) -> Cgroups:
    """v2: the same tree's controllers, with groups made under `parent`."""
    return Cgroups(parent, parent, 2, parent, parent if cgroups._freezer is not None else None)


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def own_paths(proc: Path = Path("/proc")) -> dict[str, str]:
    """This process's cgroup path per v1 controller, and under "" for v2."""
    paths = {}
    for line in (proc / "self" / "cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for controller in controllers.split(",") if controllers else [""]:
            paths[controller] = path
    return paths


def _v1_mounts() -> dict[str, Path]:
    """Where each v1 controller's hierarchy is mounted (one mount may hold several)."""
    mounts: dict[str, Path] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mounts").read_text().splitlines():
            fields = line.split()
            if len(fields) >= 4 and fields[2] == "cgroup":
                for option in fields[3].split(","):
                    mounts.setdefault(option, Path(fields[1]))
    return mounts


def _count(path: str) -> int:
    """The ids listed in a cgroup file (0 when it cannot be read): os calls on a path made
    once, at a fifth of pathlib's cost, as this runs after every execution."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            return len(os.read(fd, 1 << 16).split())
        finally:
            os.close(fd)
    except OSError:
        return 0


def _write(path: str, value: bytes) -> None:
    """One write to a cgroup file, on the warm path: os calls on a path made once."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_WRONLY)
        try:
            os.write(fd, value)
        finally:
            os.close(fd)


def _make(directory: Path) -> None:
    try:
        directory.mkdir(exist_ok=True)
    except OSError as exc:
        raise CgroupUnavailable(f"cannot create {directory}: {exc}") from None


def _number(path: Path) -> int:
    """A cgroup file holding one integer; 0 when it is absent or says "max"."""
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return 0


def _counters(path: Path) -> dict[str, int]:
    """A flat-keyed cgroup file ("name value" lines), such as memory.events."""
    counters = {}
    try:
        for line in path.read_text().splitlines():
            key, _, value = line.partition(" ")
            counters[key] = int(value)
    except (OSError, ValueError):
        pass
    return counters
