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
running (SANDBOX_IDLE=recycle, and where there is no freezer).

`SANDBOX_MODE=strict` refuses to start without every layer; `auto` uses what
this machine allows and logs the rest; `off` runs workers unconfined (tests of
the engine on machines without root).

The sandbox knows no runtime: it runs the Command it is given (runtimes/launcher.py
makes one from a RuntimeSpec, the Rust compiler one for each build step).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

from lambda_server.config import SandboxSettings
from lambda_server.domain import ComponentHealth, ComponentStatus, Limits
from lambda_server.errors import SandboxUnavailable as SandboxUnavailable  # raised here, caught by runtimes
from lambda_server.sandbox import seccomp
from lambda_server.sandbox.cgroups import Cgroups, CgroupUnavailable, EnvironmentCgroup, thaw_process
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


@dataclass
class Confinement:
    """One environment's place in the sandbox: how to start it, and what to release."""

    argv: list[str]
    uid: int | None
    cgroup: EnvironmentCgroup | None
    _sandbox: Sandbox
    _threads: int = 0  # the runtime's own threads at its start (SANDBOX_IDLE=recycle)
    _limits: Limits | None = None
    _owner: str | None = None  # whose cpu group the environment is in, once bound

    def join_owner(self, owner: str) -> None:
        """The environment is bound to `owner`'s script: from now on its CPU counts in the
        owner's share (SANDBOX_CPU_CORES_PER_OWNER), with its other environments."""
        if self.cgroup is None or self._owner is not None or self._limits is None:
            return
        self.cgroup = self._sandbox._join_owner(self.cgroup, owner, self._limits)
        self._owner = owner

    def memory_exhausted(self) -> bool:
        """Whether the environment's own memory limit (not the host's OOM killer) killed it."""
        return self.cgroup is not None and self.cgroup.oom_kills() > 0 and self.cgroup.limit_reached()

    def started(self) -> None:
        """The runtime is ready and no script has run in it: count its own threads."""
        if self.cgroup is not None and self._sandbox.idle == "recycle":
            self._threads = self.cgroup.thread_count()

    def freeze(self) -> None:
        """Stop every process of the environment between executions (nothing of a script
        runs while it is idle). Returns at once: the kernel freezes the tasks on its own."""
        if self.cgroup is not None and self._sandbox.idle == "freeze":
            self.cgroup.freeze()

    def thaw(self) -> None:
        """Let the environment's processes run again, before its next execution."""
        if self.cgroup is not None and self._sandbox.idle == "freeze":
            self.cgroup.thaw()

    def has_stragglers(self) -> bool:
        """Whether the script left processes behind (the runtime itself is the only one
        allowed) or, under SANDBOX_IDLE=recycle, threads beyond the runtime's own."""
        if self.cgroup is None:
            return False
        if self.cgroup.process_count() > 1:
            return True
        return self._sandbox.idle == "recycle" and self.cgroup.thread_count() > self._threads

    async def release(self) -> None:
        """After the process is dead: end any straggler, remove the cgroup, free the uid."""
        if self.cgroup is not None:
            self.cgroup.kill()
            await self.cgroup.remove()
            self.cgroup = None
            if self._owner is not None:
                self._sandbox._leave_owner(self._owner)
                self._owner = None
        if self.uid is not None:
            self._sandbox._uids.discard(self.uid)
            self.uid = None


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
        if self._cgroups is not None:
            self._cgroups.close()
        if self._uid_range is not None:  # another server may claim the range now
            self._uid_range.close()
            self._uid_range = None
        if self._seccomp_filter is not None:
            self._seccomp_filter.unlink(missing_ok=True)
            self._seccomp_filter = None

    def _join_owner(self, cgroup: EnvironmentCgroup, owner: str, limits: Limits) -> EnvironmentCgroup:
        if self._cgroups is None or self._settings.cpu_cores <= 0:
            return cgroup
        try:
            return self._cgroups.join_owner(
                cgroup,
                owner,
                (limits.memory_mb * 1024 * 1024, limits.max_processes, self._settings.cpu_cores),
                self.cpu_cores_per_owner,
            )
        except (OSError, CgroupUnavailable) as exc:  # the environment keeps its own cap
            log.warning("could not move an environment into its owner's cpu group: %s", exc)
            return cgroup

    def _leave_owner(self, owner: str) -> None:
        if self._cgroups is not None:
            self._cgroups.leave_owner(owner)

    @property
    def cpu_cores_per_owner(self) -> float:
        """SANDBOX_CPU_CORES_PER_OWNER, or by default one core less than this server may use."""
        if self._settings.cpu_cores_per_owner > 0:
            return self._settings.cpu_cores_per_owner
        return float(max(1, len(os.sched_getaffinity(0)) - 1))

    def confine(self, command: Command) -> Confinement:
        """How to start `command` inside every active layer."""
        rlimits = self._rlimits()
        if command.cap_address_space:
            rlimits["as"] = (command.limits.memory_mb + ADDRESS_SPACE_MARGIN_MB) * 1024 * 1024
        if command.file_size_mb is not None:
            rlimits["fsize"] = command.file_size_mb * 1024 * 1024
        files = {host: f"{WORKER_DIR}/{Path(host).name}" for host in command.files}
        confinement = self._confine(
            [files.get(arg, arg) for arg in command.argv],
            list(command.argv),
            [*SYSTEM_BINDS, *command.binds],
            files,
            command.limits,
            rlimits,
            writable=list(command.writable),
        )
        if confinement.uid is not None:  # a build runs as the environment's own uid
            for work in command.writable:
                for folder, dirs, names in os.walk(work):
                    for name in [folder, *(os.path.join(folder, n) for n in dirs + names)]:
                        os.chown(name, confinement.uid, confinement.uid)
        return confinement

    def _rlimits(self) -> dict[str, int]:
        return {
            "nofile": self._settings.open_files,
            "fsize": self._settings.scratch_mb * 1024 * 1024,
            "core": 0,
            "cpu": self._settings.cpu_seconds,
        }

    def _confine(
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
                cgroup = self._cgroups.create(
                    f"env-{uid}",
                    limits.memory_mb * 1024 * 1024,
                    limits.max_processes,
                    self._settings.cpu_cores,
                )
        except (OSError, CgroupUnavailable) as exc:
            self._uids.discard(uid)
            raise SandboxUnavailable(f"cannot create the environment's cgroup: {exc}") from None
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
