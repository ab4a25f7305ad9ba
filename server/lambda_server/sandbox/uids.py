"""Each server's own range of sandbox uids, which no other server on the host holds.

RLIMIT_NPROC counts a uid's processes and threads across the whole host, so two
servers that gave environments the same uid would share each other's caps (two
replicas on one Kubernetes node). The uids from `uid_base` are cut into ranges
of `uid_range_size`; a server claims the first range whose lock file
(`<uid_dir>/<first uid>.lock`) it can flock, and holds the lock for its life.
The kernel releases it when the server exits, even on a crash; a lock file is
never removed (removing one under a holder would let a third server lock a new
file of the same name).

flock locks belong to an open file description, so two sandboxes in one process
(tests) exclude each other as two servers do. Every server on a host must use the
same uid_dir (on Kubernetes: a hostPath volume).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
from collections.abc import Callable
from pathlib import Path

SPAN = 60000  # uids from uid_base that ranges are cut from


class UidRangeUnavailable(Exception):
    """Every range is held by another server, or the lock folder cannot be used."""


class UidRange:
    """A claimed range: uids first .. first + size - 1, held while the lock is open."""

    def __init__(self, first: int, size: int, lock: int) -> None:
        self.first = first
        self.size = size
        self._lock: int | None = lock

    @classmethod
    def claim(cls, folder: Path, base: int, size: int) -> UidRange:
        count = SPAN // size
        if count == 0:
            raise UidRangeUnavailable(f"SANDBOX_UID_RANGE_SIZE ({size}) is over the {SPAN} sandbox uids")
        try:
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(count):
                first = base + index * size
                lock = os.open(folder / f"{first}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(lock)
                    continue
                except OSError:
                    os.close(lock)
                    raise
                # who holds it, for an operator reading the folder
                os.ftruncate(lock, 0)
                os.write(lock, f"{os.getpid()}\n".encode())
                return cls(first, size, lock)
        except OSError as exc:
            raise UidRangeUnavailable(f"cannot claim a uid range under {folder}: {exc}") from None
        raise UidRangeUnavailable(
            f"all {count} uid ranges of {size} uids from {base} are held by other servers on this "
            f"host (lock files in {folder}); set a smaller SANDBOX_UID_RANGE_SIZE or run fewer servers"
        )

    def end_orphans(self, thaw: Callable[[int], None]) -> int:
        """Kill the processes of this range's uids: what a server that held the range before
        left behind when it died without ending its environments (SIGKILL, an OOM kill, a
        crashed test run; a frozen environment never even reads the EOF of its pipes). Left
        alive, they count against RLIMIT_NPROC of the uids this server now gives out, and a
        new environment cannot start a process. `thaw(pid)` first: a frozen process does not
        die until thawed. Blocking (/proc reads): call it from a thread. Returns how many."""
        ended = 0
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            pid = int(entry.name)
            try:
                status = Path(f"/proc/{pid}/status").read_text()
                uid = int(status.split("\nUid:", 1)[1].split()[0])  # the real uid
            except (OSError, IndexError, ValueError):
                continue
            if self.first <= uid <= self.last:
                thaw(pid)
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
                    ended += 1
        return ended

    @property
    def last(self) -> int:
        return self.first + self.size - 1

    def close(self) -> None:
        """Release the range (for another server to claim)."""
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None
