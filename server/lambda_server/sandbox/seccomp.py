"""The seccomp layer: the syscalls no runtime or compiler process may make.

`POLICY` is the whole policy, one line per rule, for a reader to audit: every
syscall is allowed except these, which fail with the errno given (a script sees
an ordinary error, never a kill). The server builds the filter once, at start,
with libseccomp (through `pyseccomp`, a ctypes binding to the system's
libseccomp.so.2), exports it as a BPF program to a file, and each environment's
jail loads that program (`prctl(PR_SET_SECCOMP)`) as its last step before it
execs the runtime: the jail itself imports only the standard library. This is
what bubblewrap does with `--seccomp FD`.

The filter is for the machine's native architecture only; libseccomp kills a
process that makes a syscall through another ABI (i386's `int 0x80`, x32), so
the rules cannot be bypassed through a second syscall table.
"""

from __future__ import annotations

import errno
import os
import platform
from pathlib import Path

# A rule's condition on the syscall's first argument: None (always), or
# ("flag", bit): the bit is set; ("==", value); (">", value).
Condition = tuple[str, int] | None
Rule = tuple[str, int, Condition]

# clone's flags are its first argument on x86_64 and aarch64 (not on s390).
ARCHITECTURES = ("x86_64", "aarch64")
# Every CLONE_NEW* flag clone(2) takes: NEWNS, NEWCGROUP, NEWUTS, NEWIPC, NEWUSER,
# NEWPID, NEWNET. (CLONE_NEWTIME, 0x80, is only taken by clone3 and unshare: in
# clone's flags that bit is part of the exit signal.)
CLONE_NEW = (0x00020000, 0x02000000, 0x04000000, 0x08000000, 0x10000000, 0x20000000, 0x40000000)
# The socket families a script may use: AF_UNIX (1), AF_INET (2), AF_INET6 (10).
# Every other family is refused: AF_UNSPEC (0), 3 to 9 (AX25, IPX, APPLETALK,
# NETROM, BRIDGE, ATMPVC, X25), and every family above AF_INET6 (NETLINK,
# PACKET, VSOCK, ...).
FAMILIES_REFUSED_BELOW_INET6 = (0, 3, 4, 5, 6, 7, 8, 9)
AF_INET6 = 10

ALWAYS: Condition = None

POLICY: tuple[Rule, ...] = (
    # namespaces: none may be created or joined
    ("unshare", errno.EPERM, ALWAYS),
    *(("clone", errno.EPERM, ("flag", flag)) for flag in CLONE_NEW),
    # clone3's flags are in memory a filter cannot read; ENOSYS makes glibc fall
    # back to clone (for threads and posix_spawn), as Docker's profile does
    ("clone3", errno.ENOSYS, ALWAYS),
    ("setns", errno.EPERM, ALWAYS),
    # io_uring: a second syscall interface of its own
    ("io_uring_setup", errno.EPERM, ALWAYS),
    ("io_uring_enter", errno.EPERM, ALWAYS),
    ("io_uring_register", errno.EPERM, ALWAYS),
    # the kernel's keyrings
    ("keyctl", errno.EPERM, ALWAYS),
    ("add_key", errno.EPERM, ALWAYS),
    ("request_key", errno.EPERM, ALWAYS),
    # kernel programs, performance counters, other processes' memory
    ("bpf", errno.EPERM, ALWAYS),
    ("perf_event_open", errno.EPERM, ALWAYS),
    ("ptrace", errno.EPERM, ALWAYS),
    # mounts, old and new API
    ("mount", errno.EPERM, ALWAYS),
    ("umount2", errno.EPERM, ALWAYS),
    ("pivot_root", errno.EPERM, ALWAYS),
    ("fsopen", errno.EPERM, ALWAYS),
    ("fsconfig", errno.EPERM, ALWAYS),
    ("fsmount", errno.EPERM, ALWAYS),
    ("fspick", errno.EPERM, ALWAYS),
    ("move_mount", errno.EPERM, ALWAYS),
    ("open_tree", errno.EPERM, ALWAYS),
    ("mount_setattr", errno.EPERM, ALWAYS),
    # modules, kexec, reboot
    ("init_module", errno.EPERM, ALWAYS),
    ("finit_module", errno.EPERM, ALWAYS),
    ("delete_module", errno.EPERM, ALWAYS),
    ("kexec_load", errno.EPERM, ALWAYS),
    ("kexec_file_load", errno.EPERM, ALWAYS),
    ("reboot", errno.EPERM, ALWAYS),
    ("userfaultfd", errno.EPERM, ALWAYS),
    # socket families other than AF_UNIX, AF_INET and AF_INET6
    *(
        (call, errno.EAFNOSUPPORT, ("==", family))
        for call in ("socket", "socketpair")
        for family in FAMILIES_REFUSED_BELOW_INET6
    ),
    ("socket", errno.EAFNOSUPPORT, (">", AF_INET6)),
    ("socketpair", errno.EAFNOSUPPORT, (">", AF_INET6)),
)


class SeccompUnavailable(Exception):
    """The filter cannot be built here (no pyseccomp or libseccomp, another architecture)."""


def build(path: Path) -> None:
    """Build the filter of `POLICY` and write it to `path` as a BPF program (readable by
    root only); SeccompUnavailable when this machine cannot."""
    machine = platform.machine()
    if machine not in ARCHITECTURES:
        raise SeccompUnavailable(f"the policy is written for {' and '.join(ARCHITECTURES)}, not {machine}")
    try:
        import pyseccomp  # type: ignore[import-untyped]  # a ctypes binding, no type marker
    except (ImportError, RuntimeError, OSError) as exc:  # RuntimeError: no libseccomp.so.2
        raise SeccompUnavailable(f"pyseccomp or libseccomp is missing: {exc}") from None
    operators = {"flag": pyseccomp.MASKED_EQ, "==": pyseccomp.EQ, ">": pyseccomp.GT}
    try:
        syscalls = pyseccomp.SyscallFilter(pyseccomp.ALLOW)
        # a syscall through another ABI ends the whole process, not only its thread
        syscalls.set_attr(pyseccomp.Attr.ACT_BADARCH, pyseccomp.KILL_PROCESS)
        for name, error, condition in POLICY:
            number = pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, name)
            if number == -1:  # __NR_SCMP_ERROR: a libseccomp too old to know the syscall
                raise SeccompUnavailable(f"libseccomp does not know the syscall {name}")
            args = []
            if condition is not None:
                operator, value = condition
                second = value if operator == "flag" else 0  # MASKED_EQ: (arg & value) == value
                args.append(pyseccomp.Arg(0, operators[operator], value, second))
            syscalls.add_rule(pyseccomp.ERRNO(error), name, *args)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with os.fdopen(descriptor, "wb") as file:
            syscalls.export_bpf(file)
    except OSError as exc:
        raise SeccompUnavailable(f"libseccomp could not build the filter: {exc}") from None
