"""The sandbox: the layers every runtime process is started under, and what is active here.

As root, each environment's process is started by util-linux `unshare` in new
PID, network (nothing but a down `lo`), mount, IPC and UTS namespaces, then by
`jail.py`, which joins the environment's cgroups (memory, pids, cpu, freezer), pivots into a
fresh root of read-only binds with a size-bounded scratch /tmp, sets rlimits,
drops every capability and switches to a uid of the environment's own, with
no_new_privs and a parent-death signal, and last loads the seccomp filter
(seccomp.py: the syscalls no script may make). Killing the namespace's first
process ends every process of the environment. Each server draws its uids from a
range no other server on the host holds (uids.py). Between its executions an
environment is frozen (SANDBOX_IDLE=freeze), or ended when its script left threads
running (SANDBOX_IDLE=recycle, and where there is no freezer). An environment's
cgroups are made, moved and removed on a thread of the sandbox's own, never on the
event loop (confinement.py says why, and what it bills where).

`SANDBOX_MODE=strict` refuses to start without every layer; `auto` uses what
this machine allows and logs the rest; `off` runs workers unconfined (tests of
the engine on machines without root).

The sandbox knows no runtime: it runs the Command it is given (runtimes/launcher.py
makes one from a RuntimeSpec, the Rust compiler one for each build step).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lambda_server.config import SandboxSettings
from lambda_server.domain import ComponentHealth, ComponentStatus, Limits
from lambda_server.errors import SandboxUnavailable as SandboxUnavailable  # raised here, caught by runtimes
from lambda_server.sandbox import seccomp
from lambda_server.sandbox.cgroups import Cgroups, CgroupUnavailable, EnvironmentCgroup, thaw_process
from lambda_server.sandbox.confinement import CgroupThread, Freezes
from lambda_server.sandbox.confinement import Confinement as Confinement  # the runtimes name it here
from lambda_server.sandbox.uids import UidRange, UidRangeUnavailable

log = logging.getLogger(__name__)

JAIL = Path(__file__).resolve().parent / "jail.py"
WORKER_DIR = "/opt/lambda"
SYSTEM_BINDS = ("/usr", "/lib", "/lib64", "/lib32", "/bin", "/sbin", "/etc/alternatives")
NAMESPACES = ("--pid", "--net", "--ipc", "--uts", "--mount")
ADDRESS_SPACE_MARGIN_MB = 256  # RLIMIT_AS over the memory limit: code and mappings, not heap


@dataclass(frozen=True)
class Command:
    """A command to run confined, in host terms: what it runs, what it may read and
    write, and its limits.

    `files` are host files the command runs (a worker script, a compiled program):
    each is bound read-only at WORKER_DIR/<its name>, and an argument of `argv` that
    names one is rewritten to that place. `binds` are host folders it reads beyond
    the system's and `writable` those it writes (a build's work folder, owned by the
    environment's uid), each at its host path.
    """

    argv: tuple[str, ...]
    limits: Limits
    files: tuple[str, ...] = ()
    binds: tuple[str, ...] = ()
    writable: tuple[str, ...] = ()
    # RLIMIT_AS at the memory limit plus a margin, for programs that can start under one
    # (not Node: V8 reserves far more address space than it uses)
    cap_address_space: bool = False
    file_size_mb: int | None = None  # RLIMIT_FSIZE; None: SANDBOX_SCRATCH_MB


class Sandbox:
    """Knows which layers are active and wraps runtime commands in them."""

    def __init__(
        self,
        settings: SandboxSettings,
        layers: list[str],
        missing: dict[str, str],
        unshare: str | None = None,
        cgroups: Cgroups | None = None,
        uid_range: UidRange | None = None,
        seccomp_filter: Path | None = None,
    ) -> None:
        self._settings = settings
        self.layers = layers
        self.missing = missing
        self._unshare = unshare
        self._cgroups = cgroups
        self._uid_range = uid_range
        self._seccomp_filter = seccomp_filter  # the BPF program every jail loads
        # freeze needs a freezer; without one, recycling is what stops leftover threads
        self.idle = settings.idle
        if self.idle == "freeze" and (cgroups is None or "freezer" not in cgroups.controllers):
            self.idle = "recycle" if cgroups is not None else "off"
        self._uids: set[int] = set()
        self._next = 0
        self._root = Path(tempfile.gettempdir()) / "lambda-sandbox-root"
        self.cgroup_thread = CgroupThread()
        self._freezes = Freezes(settings.freeze_after_ms / 1000)
        self._freeze_at_once = settings.freeze_after_ms <= 0
        # freezer writes made, by the state written (lambda_sandbox_freezer_writes_total)
        self.freezer_writes = {"frozen": 0, "thawed": 0}
        # moves into owners' cpu groups that failed (the environment stays in the pre-started
        # group, outside its owner's share) or outlived a release's wait
        # (lambda_sandbox_owner_moves_total)
        self.owner_moves = {"failed": 0, "slow": 0}
        self._background: set[asyncio.Task[None]] = set()  # releases left to finish

    @classmethod
    async def start(cls, settings: SandboxSettings) -> Sandbox:
        """Probe this machine; SandboxUnavailable in strict mode when a layer is missing."""
        if settings.mode == "off":
            return cls(settings, [], {"all": "SANDBOX_MODE=off"})
        layers: list[str] = []
        missing: dict[str, str] = {}
        unshare = shutil.which("unshare")
        cgroups = None
        uid_range = None
        seccomp_filter = None
        if os.geteuid() != 0:
            missing["namespaces"] = "the server does not run as root"
        elif unshare is None:
            missing["namespaces"] = "util-linux unshare is not installed"
        elif not await _namespaces_work(unshare):
            missing["namespaces"] = "the kernel refused new namespaces"
            unshare = None
        if unshare is not None and "namespaces" not in missing:
            try:  # without a range of its own, no environment may start: uids would be shared
                uid_range = UidRange.claim(settings.uid_dir, settings.uid_base, settings.uid_range_size)
            except UidRangeUnavailable as exc:
                raise SandboxUnavailable(str(exc)) from None
            orphans = await asyncio.to_thread(uid_range.end_orphans, thaw_process)
            if orphans:
                log.warning(
                    "ended %d processes of uids %d-%d that a server which held them before left behind",
                    orphans,
                    uid_range.first,
                    uid_range.last,
                )
            layers += [
                "namespaces(pid,net,mount,ipc,uts)",
                "fresh-root",
                "scratch-tmpfs",
                f"uid-per-environment({uid_range.first}-{uid_range.last})",
            ]
            layers += ["no-capabilities", "no-new-privs"]
            if settings.seccomp:
                seccomp_filter = _seccomp_filter_path()
                try:
                    seccomp.build(seccomp_filter)
                    layers.append("seccomp")
                except seccomp.SeccompUnavailable as exc:
                    missing["seccomp"] = str(exc)
                    seccomp_filter.unlink(missing_ok=True)
                    seccomp_filter = None
            else:
                missing["seccomp"] = "SANDBOX_SECCOMP=off"
            try:
                # one group per server instance: a process may run several (tests do)
                cgroups = Cgroups.detect(
                    f"lambda-{os.getpid()}-{uuid.uuid4().hex[:8]}",
                    cpuset=settings.owner_cpuset and settings.cpu_cores > 0,
                )
                layers.append(f"cgroup-v{cgroups.version}({','.join(cgroups.controllers)})")
                if settings.cpu_cores > 0 and "cpu" not in cgroups.controllers:
                    missing["cpu"] = "no cpu controller to cap each environment's CPU"
            except CgroupUnavailable as exc:
                missing["cgroups"] = str(exc)
        else:
            unshare = None
            missing.setdefault("cgroups", "needs the namespaces layer")
            missing.setdefault("seccomp", "needs the namespaces layer (the jail loads the filter)")
        layers.append("rlimits")
        sandbox = cls(settings, layers, missing, unshare, cgroups, uid_range, seccomp_filter)
        if sandbox.idle != "off":
            layers.append(f"idle-{sandbox.idle}")
        if settings.mode == "strict" and missing:
            sandbox.close()
            raise SandboxUnavailable(
                "SANDBOX_MODE=strict, but these layers cannot be applied: "
                + "; ".join(f"{name}: {why}" for name, why in missing.items())
            )
        for name, why in missing.items():
            log.warning("sandbox layer %s is not active: %s", name, why)
        sandbox._root.mkdir(exist_ok=True)
        return sandbox

    def describe(self) -> str:
        text = f"{self._settings.mode}: " + (", ".join(self.layers) or "none")
        if self.missing:
            text += "; missing: " + ", ".join(sorted(self.missing))
        return text

    def health(self) -> ComponentHealth:
        """The sandbox as Health shows it: degraded while a layer is missing."""
        status = ComponentStatus.DEGRADED if self.missing else ComponentStatus.OK
        counts = {"layers": len(self.layers), "missing": len(self.missing)}
        return ComponentHealth("sandbox", status, self.describe(), counts=counts)

    def close(self) -> None:
        self._freezes.close()
        self.cgroup_thread.close()  # the moves and removals submitted are done
        if self._cgroups is not None:
            self._cgroups.close()
        if self._uid_range is not None:  # another server may claim the range now
            self._uid_range.close()
            self._uid_range = None
        if self._seccomp_filter is not None:
            self._seccomp_filter.unlink(missing_ok=True)
            self._seccomp_filter = None

    def _move_to_owner(
        self, cgroup: EnvironmentCgroup, owner: str, limits: Limits
    ) -> tuple[asyncio.Future[EnvironmentCgroup | None], EnvironmentCgroup] | None:
        """Start moving an environment into its owner's cpu group, on the cgroup thread: the
        move (its result the moved group, None when it failed), and where it goes; None
        when there is nothing to move."""
        cgroups = self._cgroups
        if cgroups is None or self._settings.cpu_cores <= 0:
            return None
        destination = cgroups.destination(cgroup, owner)
        if destination is None:
            return None
        limit = (limits.memory_mb * 1024 * 1024, limits.max_processes, self._settings.cpu_cores)

        def move() -> EnvironmentCgroup | None:
            try:
                return cgroups.join_owner(cgroup, owner, limit, self.cpu_cores_per_owner)
            except (OSError, CgroupUnavailable) as exc:  # the environment keeps its own cap
                log.warning("could not move an environment into its owner's cpu group: %s", exc)
            except Exception:  # never out of the thread: the environment stays where it is
                log.exception("could not move an environment into its owner's cpu group")
            self.owner_moves["failed"] += 1  # one thread writes it; the scrape reads an int
            return None

        try:
            return self.cgroup_thread.submit(move), destination
        except RuntimeError:  # closed: the server is stopping
            return None

    def in_background(self, release: Coroutine[Any, Any, None]) -> None:
        """Finish `release` on its own (a reference kept until it ends)."""
        task = asyncio.get_running_loop().create_task(release)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _freeze_later(self, confinement: Confinement, generation: int) -> None:
        if self._freeze_at_once:
            confinement.freeze_if_parked(generation)
        else:
            self._freezes.later(confinement, generation)

    def _leave_owner(self, owner: str) -> None:
        """On the cgroup thread: an environment of `owner` was removed."""
        if self._cgroups is not None:
            self._cgroups.leave_owner(owner)

    @property
    def cpu_cores_per_owner(self) -> float:
        """SANDBOX_CPU_CORES_PER_OWNER, or by default one core less than this server may use."""
        if self._settings.cpu_cores_per_owner > 0:
            return self._settings.cpu_cores_per_owner
        return float(max(1, len(os.sched_getaffinity(0)) - 1))

    async def confine(self, command: Command) -> Confinement:
        """How to start `command` inside every active layer (its cgroups made on the cgroup
        thread)."""
        rlimits = self._rlimits()
        if command.cap_address_space:
            rlimits["as"] = (command.limits.memory_mb + ADDRESS_SPACE_MARGIN_MB) * 1024 * 1024
        if command.file_size_mb is not None:
            rlimits["fsize"] = command.file_size_mb * 1024 * 1024
        files = {host: f"{WORKER_DIR}/{Path(host).name}" for host in command.files}
        confinement = await self._confine(
            [files.get(arg, arg) for arg in command.argv],
            list(command.argv),
            [*SYSTEM_BINDS, *command.binds],
            files,
            command.limits,
            rlimits,
            writable=list(command.writable),
        )
        if confinement.uid is not None and command.writable:  # a build runs as the environment's uid
            await asyncio.to_thread(_chown, command.writable, confinement.uid)
        return confinement

    def _rlimits(self) -> dict[str, int]:
        return {
            "nofile": self._settings.open_files,
            "fsize": self._settings.scratch_mb * 1024 * 1024,
            "core": 0,
            "cpu": self._settings.cpu_seconds,
        }

    async def _confine(
        self,
        inside: list[str],
        outside: list[str],
        binds: list[str],
        files: dict[str, str],
        limits: Limits,
        rlimits: dict[str, int],
        writable: list[str] | None = None,
    ) -> Confinement:
        """`inside` is the command as the jail sees it, `outside` as the host does."""
        if self._unshare is None:
            if self._settings.mode == "off":
                return Confinement(outside, None, None, self)
            prlimit = [f"--{name}={value}" for name, value in rlimits.items()]
            return Confinement(["prlimit", *prlimit, "--", *outside], None, None, self)
        uid = self._allocate_uid()
        rlimits["nproc"] = limits.max_processes  # per uid, and each environment has its own
        cgroup = None
        try:
            if self._cgroups is not None:
                cgroup = await self.cgroup_thread.run(
                    functools.partial(
                        self._cgroups.create,
                        f"env-{uid}",
                        limits.memory_mb * 1024 * 1024,
                        limits.max_processes,
                        self._settings.cpu_cores,
                    )
                )
        except (OSError, CgroupUnavailable) as exc:
            self._uids.discard(uid)
            raise SandboxUnavailable(f"cannot create the environment's cgroup: {exc}") from None
        except BaseException:
            self._uids.discard(uid)
            raise
        config = {
            "root": str(self._root),
            "binds": binds,
            "files": files,
            "writable": writable or [],
            "scratch_mb": self._settings.scratch_mb,
            "shm_mb": self._settings.shm_mb,
            "cgroups": cgroup.procs_files if cgroup else [],
            "rlimits": rlimits,
            "uid": uid,
            "gid": uid,
            "seccomp": str(self._seccomp_filter) if self._seccomp_filter else None,
        }
        argv = [
            self._unshare,
            "--fork",
            "--kill-child",
            *NAMESPACES,
            "--propagation",
            "private",
            "--",
            _python(),
            "-I",
            "-S",
            str(JAIL),
            json.dumps(config, separators=(",", ":")),
            "--",
            *inside,
        ]
        return Confinement(argv, uid, cgroup, self, _limits=limits)

    def _allocate_uid(self) -> int:
        """A free uid of this server's own range (never one another server may use)."""
        if self._uid_range is None:
            raise SandboxUnavailable("the sandbox holds no uid range (it is closed)")
        first, size = self._uid_range.first, self._uid_range.size
        for _ in range(size):
            uid = first + self._next
            self._next = (self._next + 1) % size
            if uid not in self._uids:
                self._uids.add(uid)
                return uid
        raise SandboxUnavailable(
            f"every uid of this server's range ({first}-{first + size - 1}) is in use: "
            "raise SANDBOX_UID_RANGE_SIZE"
        )


def _seccomp_filter_path() -> Path:
    """A file of this sandbox's own for the BPF program (several may run in one process)."""
    descriptor, path = tempfile.mkstemp(prefix="lambda-seccomp-", suffix=".bpf")
    os.close(descriptor)
    return Path(path)


def _chown(folders: tuple[str, ...], uid: int) -> None:
    for work in folders:
        for folder, dirs, names in os.walk(work):
            for name in [folder, *(os.path.join(folder, n) for n in dirs + names)]:
                os.chown(name, uid, uid)


def _python() -> str:
    return os.path.realpath(sys.executable)


async def _namespaces_work(unshare: str) -> bool:
    def probe() -> bool:
        try:
            result = subprocess.run(
                [unshare, "--fork", *NAMESPACES, "true"], capture_output=True, timeout=10, check=False
            )
        except (OSError, subprocess.TimeoutExpired):
            return False
        return result.returncode == 0

    return await asyncio.get_running_loop().run_in_executor(None, probe)
