"""How much memory this server's environments may have: the host's, or the container's when lower.

Read once at start (blocking file reads: call it from a thread, or before the loop).
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from lambda_server.config import SandboxSettings
from lambda_server.sandbox.cgroups import own_paths

log = logging.getLogger(__name__)

ROOT = Path("/sys/fs/cgroup")
MIB = 1024 * 1024


async def memory_budget_mb(settings: SandboxSettings) -> int | None:
    """SANDBOX_TOTAL_MEMORY_MB, or when it is 0 the host's or container's memory less
    SERVER_MEMORY_RESERVE_MB (at least one environment's); None when it cannot be read."""
    if settings.total_memory_mb:
        return settings.total_memory_mb
    try:
        available = await asyncio.to_thread(available_memory_mb)
    except (OSError, ValueError) as exc:
        log.warning("no memory budget for environments: cannot read this machine's memory: %s", exc)
        return None
    total = available - settings.memory_reserve_mb
    if total < settings.memory_mb:
        log.warning(
            "%d MiB of memory, less SERVER_MEMORY_RESERVE_MB=%d, leaves less than one environment's "
            "%d MiB; the environments' budget is that one",
            available,
            settings.memory_reserve_mb,
            settings.memory_mb,
        )
    return max(total, settings.memory_mb)


def available_memory_mb(root: Path = ROOT, proc: Path = Path("/proc")) -> int:
    """The least of the host's MemTotal and every memory limit on the way from this
    process's cgroup to the root (v2 `memory.max`, v1 `memory.limit_in_bytes`): a
    container's limit sits on an ancestor as often as on the process's own group."""
    limits = [_mem_total(proc)]
    own = own_paths(proc)
    if "" in own:  # v2, where it is mounted at the root
        limits += _limits_up(root, own[""], "memory.max")
    if "memory" in own:
        limits += _limits_up(root / "memory", own["memory"], "memory.limit_in_bytes")
    return min(limits) // MIB


def _mem_total(proc: Path) -> int:
    for line in (proc / "meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    raise ValueError("no MemTotal in /proc/meminfo")


def _limits_up(base: Path, path: str, name: str) -> list[int]:
    limits = []
    directory = base / path.lstrip("/")
    while True:
        try:
            text = (directory / name).read_text().strip()
        except OSError:
            text = ""  # not this hierarchy's mount, or the root's (which has no limit file on v2)
        if text.isdigit():  # "max" (v2) means none; v1's "none" is a huge number, above MemTotal
            limits.append(int(text))
        if directory == base or base not in directory.parents:
            return limits
        directory = directory.parent
