"""Memory and process-count limits per environment, on cgroup v2 or v1.

v2 (one unified tree): a `lambda-<pid>` group beside the server's own, with the
memory and pids controllers enabled, and one child per environment. v1: the same
layout under the memory and pids hierarchies. Either way an environment's OOM
kills are counted, so MEMORY_LIMIT is told apart from any other crash.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
from dataclasses import dataclass
from pathlib import Path

ROOT = Path("/sys/fs/cgroup")


class CgroupUnavailable(Exception):
    """The memory and pids controllers cannot be used here; the message says why."""


@dataclass(frozen=True)
class EnvironmentCgroup:
    """The cgroup directories of one environment (one on v2, two on v1)."""

    memory: Path
    pids: Path
    version: int

    @functools.cached_property
    def memory_procs(self) -> str:
        return str(self.memory / "cgroup.procs")

    @property
    def procs_files(self) -> list[str]:
        dirs = {self.memory, self.pids}
        return [str(d / "cgroup.procs") for d in sorted(dirs)]

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
        try:  # after every execution: the os calls on a path made once, at a fifth of pathlib's cost
            fd = os.open(self.memory_procs, os.O_RDONLY)
            try:
                return len(os.read(fd, 1 << 16).split())
            finally:
                os.close(fd)
        except OSError:
            return 0

    def kill(self) -> None:
        """SIGKILL every process in the environment (the PID namespace's end does it too)."""
        if self.version == 2:
            with contextlib.suppress(OSError):
                (self.memory / "cgroup.kill").write_text("1")
            return
        with contextlib.suppress(OSError):
            for pid in (self.memory / "cgroup.procs").read_text().split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), 9)

    async def remove(self) -> None:
        """Remove the directories once their processes are gone (retried briefly)."""
        for directory in {self.memory, self.pids}:
            for _ in range(50):
                try:
                    directory.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    await asyncio.sleep(0.02)


class Cgroups:
    """Creates one cgroup per environment under this server's own group."""

    def __init__(self, memory_base: Path, pids_base: Path, version: int) -> None:
        self._memory = memory_base
        self._pids = pids_base
        self.version = version

    @classmethod
    def detect(cls, name: str) -> Cgroups:
        """Set up `name` groups for this server, on v2 when it has the controllers, else v1."""
        own = _own_paths()
        unified = ROOT / "cgroup.controllers"
        if unified.exists() and {"memory", "pids"} <= set(unified.read_text().split()):
            return cls._v2(own.get("", "/"), name)
        memory, pids = ROOT / "memory", ROOT / "pids"
        if (memory / "cgroup.procs").exists() and (pids / "cgroup.procs").exists():
            memory_base = memory / own.get("memory", "/").lstrip("/") / name
            pids_base = pids / own.get("pids", "/").lstrip("/") / name
            for base in (memory_base, pids_base):
                _make(base)
            return cls(memory_base, pids_base, 1)
        raise CgroupUnavailable(
            "no cgroup v2 with memory and pids controllers, nor v1 memory and pids hierarchies"
        )

    @classmethod
    def _v2(cls, own: str, name: str) -> Cgroups:
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
        return cls(base, base, 2)

    def create(self, name: str, memory_bytes: int, max_processes: int) -> EnvironmentCgroup:
        group = EnvironmentCgroup(self._memory / name, self._pids / name, self.version)
        for directory in {group.memory, group.pids}:
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
        return group

    def close(self) -> None:
        for base in {self._memory, self._pids}:
            with contextlib.suppress(OSError):
                base.rmdir()


def _own_paths() -> dict[str, str]:
    """This process's cgroup path per v1 controller, and under "" for v2."""
    paths = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for controller in controllers.split(",") if controllers else [""]:
            paths[controller] = path
    return paths


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
