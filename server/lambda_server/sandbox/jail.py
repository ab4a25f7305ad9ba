"""Sets up one environment's jail, then execs its runtime. Runs as root, as PID 1.

Started by util-linux `unshare --fork --pid --kill-child --net --ipc --uts --mount`
as `python -I -S jail.py CONFIG_JSON -- COMMAND...`, so it is already alone in
fresh PID, network, IPC, UTS and mount namespaces. It imports nothing of the
server (only the standard library) and, in order:

1. joins the environment's cgroups (memory and pids limits);
2. builds a new root on a tmpfs: read-only binds of what the runtime needs,
   a minimal /dev, a size-bounded /tmp (the scratch directory) and /dev/shm,
   then pivots into it and mounts a /proc that shows only this namespace;
3. sets rlimits, drops every capability from the bounding set, switches to the
   environment's own unprivileged uid and gid, sets no_new_privs and a
   parent-death signal;
4. loads the seccomp filter the server built (a BPF program in a file, read
   before the pivot hides it), so that only COMMAND runs under it;
5. execs COMMAND with the environment the server passed (no secrets).

The config holds paths, ids and limits only: nothing secret is ever in argv.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import signal
import socket
import sys
from typing import Any

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MNT_DETACH = 0x2
PR_SET_PDEATHSIG = 1
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2
BPF_INSTRUCTION_BYTES = 8  # struct sock_filter: u16 code, u8 jt, u8 jf, u32 k
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}

RLIMITS = {
    "cpu": resource.RLIMIT_CPU,
    "fsize": resource.RLIMIT_FSIZE,
    "nofile": resource.RLIMIT_NOFILE,
    "nproc": resource.RLIMIT_NPROC,
    "core": resource.RLIMIT_CORE,
    "as": resource.RLIMIT_AS,
}

libc = ctypes.CDLL(None, use_errno=True)


class JailError(Exception):
    pass


def check(result: int, what: str) -> None:
    if result != 0:
        error = ctypes.get_errno()
        raise JailError(f"{what}: {os.strerror(error)}")


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    check(
        libc.mount(
            source.encode() if source else None,
            target.encode(),
            fstype.encode() if fstype else None,
            ctypes.c_ulong(flags),
            data.encode() if data else None,
        ),
        f"mount {source or fstype} on {target}",
    )


def bind(source: str, target: str, writable: bool = False) -> None:
    if os.path.isdir(source):
        os.makedirs(target, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target, "a"):
            pass
    mount(source, target, None, MS_BIND | MS_REC)
    flags = MS_REMOUNT | MS_BIND | MS_NOSUID | (0 if writable else MS_RDONLY)
    if not source.startswith("/dev/"):
        flags |= MS_NODEV
    mount(None, target, None, flags)


def build_root(config: dict[str, Any]) -> None:
    root = config["root"]
    mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=4m,mode=0755")
    # the scratch folders first: a bind of a host path under /tmp (a build's folders)
    # is then made on them, not hidden under them
    for name, size in (("/tmp", config["scratch_mb"]), ("/dev/shm", config["shm_mb"])):
        os.makedirs(root + name, exist_ok=True)
        mount("tmpfs", root + name, "tmpfs", MS_NOSUID | MS_NODEV, f"size={size}m,mode=1777")
    for path in config["binds"]:
        target = root + path
        if os.path.islink(path):
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.symlink(os.readlink(path), target)
        elif os.path.exists(path):
            bind(path, target)
    for source, target in config.get("files", {}).items():
        bind(source, root + target)
    os.makedirs(root + "/dev", exist_ok=True)
    for device in ("null", "zero", "random", "urandom"):
        bind("/dev/" + device, f"{root}/dev/{device}", writable=True)
    os.symlink("/proc/self/fd", root + "/dev/fd")
    for path in config.get("writable", []):  # a build's own work folder, at its host path
        bind(path, root + path, writable=True)
    os.makedirs(root + "/proc", exist_ok=True)
    os.makedirs(root + "/etc", exist_ok=True)
    os.chdir(root)
    # pivot_root(".", "."): the old root stacks under the new one; detach it.
    check(libc.syscall(SYS_PIVOT_ROOT[os.uname().machine], b".", b"."), "pivot_root")
    check(libc.umount2(b".", MNT_DETACH), "umount old root")
    os.chdir("/")
    mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)


def drop_privileges(config: dict[str, Any]) -> None:
    os.setpriority(os.PRIO_PROCESS, 0, 0)  # the server's own nice value is not the script's
    for name, value in config["rlimits"].items():
        resource.setrlimit(RLIMITS[name], (value, value))
    for capability in range(64):
        if libc.prctl(PR_CAPBSET_DROP, capability, 0, 0, 0) != 0:
            break  # past the last capability this kernel knows
    uid, gid = config["uid"], config["gid"]
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)  # from root to a non-zero uid: every capability is cleared
    check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
    # set after the uid change, which clears it; the parent is the unshare process
    check(libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "pdeathsig")


class SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def load_seccomp(program: bytes) -> None:
    """Install the BPF program as this process's seccomp filter (kept across execve,
    inherited by every process and thread it starts). Needs no_new_privs, set before."""
    if not program or len(program) % BPF_INSTRUCTION_BYTES:
        raise JailError(f"the seccomp filter is not a BPF program ({len(program)} bytes)")
    buffer = ctypes.create_string_buffer(program, len(program))
    fprog = SockFprog(len(program) // BPF_INSTRUCTION_BYTES, ctypes.addressof(buffer))
    check(
        libc.prctl(
            PR_SET_SECCOMP,
            ctypes.c_ulong(SECCOMP_MODE_FILTER),
            ctypes.byref(fprog),
            ctypes.c_ulong(0),
            ctypes.c_ulong(0),
        ),
        "seccomp",
    )


def main() -> None:
    config = json.loads(sys.argv[1])
    command = sys.argv[sys.argv.index("--") + 1 :]
    seccomp = None
    if config.get("seccomp"):
        with open(config["seccomp"], "rb") as file:
            seccomp = file.read()
    for procs in config["cgroups"]:
        with open(procs, "w") as file:
            file.write("0")  # this process, and so everything it starts
    socket.sethostname("lambda")
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    build_root(config)
    drop_privileges(config)
    os.chdir("/tmp")
    if seccomp is not None:
        load_seccomp(seccomp)
    os.execv(command[0], command)


if __name__ == "__main__":
    try:
        main()
    except (JailError, OSError, ValueError, KeyError) as exc:
        print(f"jail: {exc}", file=sys.stderr)
        sys.exit(121)
