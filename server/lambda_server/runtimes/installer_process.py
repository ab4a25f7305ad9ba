"""What the resolvers (runtimes/uv.py, runtimes/npm.py) share: running their tool, bounded in
time and in the bytes it writes, and putting its words in front of callers without secrets.

A tool runs as the compilers do (runtimes/process.run_command): in a process group of its
own, started with subprocess.Popen in a thread, as workers are (uvloop's own subprocesses
crash in the child when it forks while gRPC's threads run). It is killed, as a group, when
the deadline passes, when the caller is cancelled, or when the folder it fills (`watched`)
grows past `max_bytes`: the size is looked at every WATCH_SECONDS while it runs, so a small
archive that unpacks into gigabytes stops there, not once the disk is full.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import subprocess
import threading
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from lambda_server.domain import Deadline
from lambda_server.errors import DependencyLimitExceeded
from lambda_server.runtimes.process import WorkerTimeout, kill_group, run_command

WATCH_SECONDS = 0.2  # how often the folder a tool fills is measured while it runs
# userinfo in a URL (`https://user:token@host`): never shown to a caller
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/@\s'\"]+@")


def passed_on(names: Iterable[str], environ: Mapping[str, str] | None) -> dict[str, str]:
    """The variables of `environ` (the server's own when None) a tool may see."""
    source = os.environ if environ is None else environ
    return {name: source[name] for name in names if name in source}


def redacted(text: str, secrets: Iterable[str | None] = ()) -> str:
    """`text` without URLs' userinfo (`https://***@host`) nor any of `secrets` (the configured
    index's or registry's URLs) when they carry one."""
    for secret in secrets:
        if secret and _USERINFO.search(secret):
            text = text.replace(secret, _USERINFO.sub(r"\1***@", secret))
    return _USERINFO.sub(r"\1***@", text)


def folder_size(folder: Path) -> int:
    """Bytes of the files under `folder` (links counted as themselves)."""
    total = 0
    for root, dirs, names in os.walk(folder):
        for name in (*dirs, *names):
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


def too_large(size: int, max_bytes: int) -> DependencyLimitExceeded:
    return DependencyLimitExceeded(
        f"the dependencies take {size} bytes installed, over MAX_LAYER_BYTES ({max_bytes})",
        setting="MAX_LAYER_BYTES",
        limit=str(max_bytes),
        bytes=str(size),
    )


async def run_tool(
    argv: list[str],
    cwd: Path,
    env: Mapping[str, str],
    deadline: Deadline,
    watched: Path | None = None,
    max_bytes: int | None = None,
) -> tuple[int, str]:
    """The tool's exit code and stderr. DependencyLimitExceeded (its process group killed) when
    the deadline passes first (DEPENDENCY_INSTALL_TIMEOUT_SECONDS) or `watched` grows past
    `max_bytes` (MAX_LAYER_BYTES); killed too when the caller is cancelled."""
    over: list[int] = []  # the size that passed the bound, when the watchdog killed the tool
    stop = threading.Event()
    watchdogs: list[threading.Thread] = []

    def watch(process: subprocess.Popen[bytes]) -> None:
        if watched is not None and max_bytes is not None:
            watchdog = threading.Thread(
                target=_watch, args=(process, watched, max_bytes, stop, over.append), daemon=True
            )
            watchdog.start()
            watchdogs.append(watchdog)

    try:
        code, _, stderr = await run_command(argv, env, str(cwd), deadline.remaining(), started=watch)
    except WorkerTimeout:
        raise DependencyLimitExceeded(
            "resolving or installing the dependencies took longer than DEPENDENCY_INSTALL_TIMEOUT_SECONDS",
            setting="DEPENDENCY_INSTALL_TIMEOUT_SECONDS",
        ) from None
    finally:
        stop.set()
        for watchdog in watchdogs:
            await asyncio.to_thread(watchdog.join)
    if over and max_bytes is not None:
        raise too_large(over[0], max_bytes)
    return code or 0, stderr.decode(errors="replace")


def _watch(
    process: subprocess.Popen[bytes],
    folder: Path,
    max_bytes: int,
    stop: threading.Event,
    report: Callable[[int], None],
) -> None:
    """Measure `folder` every WATCH_SECONDS until `stop`; past `max_bytes`, kill the tool."""
    while not stop.wait(WATCH_SECONDS):
        size = folder_size(folder)
        if size > max_bytes:
            report(size)
            kill_group(process)
            return


def named(words: str, requirements: tuple[str, ...], names: Callable[[str], Iterable[str]]) -> str:
    """The requirement a tool's message is about (the first named, at the earliest of the
    places `names` gives for it: what to look for, lower case), else the first."""
    lowered = words.lower()
    best: tuple[int, str] | None = None
    for requirement in requirements:
        positions = [p for p in (lowered.find(name) for name in names(requirement) if name) if p >= 0]
        if positions and (best is None or min(positions) < best[0]):
            best = (min(positions), requirement)
    chosen = best[1] if best is not None else (requirements[0] if requirements else "")
    return chosen[:256]
