"""Layers: a session's dependencies, resolved into a lock and installed once per host.

A *lock* is what a runtime's resolver made of a session's requirements: every
package, its exact version and its archive's hash, as text the resolver can
install from again (`Lock.text`). A *layer* is one lock installed: a folder
`LAYER_DIR/layers/<layer_id>` (what it is, its size and lock, in
`LAYER_DIR/info/<layer_id>.json`), where the layer id is a hash of the runtime and the
lock's text, so every session whose requirements resolve to the same lock shares
one folder, whichever replica or session installed it.

Installing is work that callers share, so it is a task of the LayerStore's, one per
layer at a time, not a caller's: each caller waits for it under its own deadline,
and a caller that leaves (its deadline, its cancellation) ends its own call only;
the install goes on, bounded by DEPENDENCY_INSTALL_TIMEOUT_SECONDS, and is kept.
An install goes into a folder of its own under `LAYER_DIR/staging`, is measured while
the resolver's tool writes it (killed past MAX_LAYER_BYTES: runtimes/installer_process.py)
and once done (past it, removed and refused), then renamed into place: a layer
is whole or absent. Several servers of one host share LAYER_DIR: a lock file per
layer (`LAYER_DIR/locks/<layer_id>.lock`, flock) lets one of them install it while
the others wait, then find it.

A runtime takes dependencies by a Resolver of its own (Python: runtimes/uv.py), registered
by its name in app.py (`_layer_store`). Its `install` fills `target` with what its workers
read (Python: `site-packages`); each worker gets the layer's folder in its `load` frame
(`"layer": "<LAYER_DIR>/layers/<id>"`) and puts it on its module path for that script.

Layers that no unexpired session uses, installed or last used (the folder's mtime, touched
by each use at most once a USE_TOUCH_SECONDS) longer than LAYER_RETENTION_SECONDS ago, are
removed by each server's sweep (every CLEANUP_INTERVAL_SECONDS), as Rust programs are
(usecases/builds.py); the sweep looks again under the layer's flock (its mtime, and whether a
session stored since uses it), and a layer removed all the same (by hand, or a session of
another server adopting it within that gap) is installed again from the session's stored
lock by the next Execute that needs it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import fcntl
import functools
import hashlib
import json
import logging
import os
import shutil
import stat
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from lambda_server.domain import Deadline, LockedPackage
from lambda_server.errors import (
    DeadlineExceeded,
    DependencyLimitExceeded,
    DependencyNotAllowed,
    QuotaExceeded,
    Unavailable,
)
from lambda_server.runtimes.installer_process import folder_size, too_large
from lambda_server.runtimes.slots import FairSlots, SlotWaitTimeout
from lambda_server.tasks import cancel_and_wait, outcome, retrieve, sweep_every

__all__ = ["Layer", "LayerStore", "Lock", "LockedPackage", "Resolver"]

log = logging.getLogger(__name__)

INFO = "info"  # LAYER_DIR/info/<layer id>.json: a layer's runtime, size and lock, outside its folder
LOCK_POLL_SECONDS = 0.05  # how often a server waiting for another's install looks again
SWEEP_SECONDS = 5.0
# A lock is reused for the same requirements this long: Initializes of one function's
# sessions resolve once (a resolve costs tens of milliseconds with uv's cache warm, more
# when the index is asked), and a range like `attrs>=23` sees a new release this late.
LOCK_REUSE_SECONDS = 60.0
MAX_LOCKS_KEPT = 1024
SWEEP_BATCH = 500
USE_TOUCH_SECONDS = 60.0  # a layer's folder is touched at most this often by its sessions' use


@dataclass(frozen=True)
class Lock:
    """A resolved set of packages, and the resolver's text to install exactly them again."""

    runtime: str
    requirements: tuple[str, ...]  # as asked
    packages: tuple[LockedPackage, ...]  # every package installed, ordered by name
    text: str
    # the archives' sizes together, as the lock gives them (0: unknown): what the installed
    # layer takes at least, about, so a lock too large is refused before it is downloaded
    archive_bytes: int = 0

    @functools.cached_property
    def layer_id(self) -> str:
        """The layer's name: the same lock of the same runtime, the same layer (a hash of the
        lock, taken once: an Initialize reads it several times)."""
        digest = hashlib.sha256(f"{self.runtime}\n{self.text}".encode()).hexdigest()
        return digest[:32]


@dataclass(frozen=True)
class Layer:
    """An installed layer: its folder and installed size."""

    layer_id: str
    path: Path
    bytes: int


class Resolver(Protocol):
    """A runtime's package manager: resolves requirements into a lock, installs a lock."""

    runtime: str

    async def lock(self, requirements: tuple[str, ...], deadline: Deadline) -> Lock:
        """The lock of these requirements. DependencyUnresolvable (no such package, no
        wheel, a conflict), PackageIndexUnavailable (the index did not answer), and
        DependencyLimitExceeded when the deadline passes first."""
        ...

    async def install(
        self, lock: Lock, target: Path, deadline: Deadline, max_bytes: int | None = None
    ) -> None:
        """Install exactly the lock's packages into `target` (an empty folder), running none
        of their code; DependencyLimitExceeded when the deadline passes first, or when what it
        writes passes `max_bytes` (MAX_LAYER_BYTES) while it runs."""
        ...


InUse = Callable[[list[str], Deadline], Awaitable[set[str]]]


class LayerStore:
    """Locks requirements with a runtime's resolver, and installs each lock once per host."""

    def __init__(
        self,
        layer_dir: Path,
        resolvers: dict[str, Resolver],
        *,
        max_layer_bytes: int,
        install_timeout_seconds: float,
        retention_seconds: float = 86400.0,
        sweep_interval: float = 60.0,
        in_use: InUse | None = None,
        on_install: Callable[[str], None] | None = None,
        slots: int = 2,
        slots_per_owner: int = 1,
    ) -> None:
        """`in_use`: which of some layer ids an unexpired session uses (the sweep asks it;
        None: nothing is swept). `on_install`: told the runtime of each layer installed here.
        `slots`, `slots_per_owner`: resolves and installs at once (DEPENDENCY_SLOTS, per owner)."""
        self._slots = FairSlots(slots, slots_per_owner)
        self._resolvers = resolvers
        self._max_bytes = max_layer_bytes
        self._timeout = install_timeout_seconds
        self._retention = retention_seconds
        self._sweep_interval = sweep_interval
        self._in_use = in_use
        self._on_install = on_install
        layer_dir.mkdir(parents=True, exist_ok=True)
        layer_dir = layer_dir.resolve()  # bound at its real path: the jail makes no symlinks
        self.folder = layer_dir / "layers"  # what environments see (read-only)
        self._staging = layer_dir / "staging"
        self._locks = layer_dir / "locks"
        # beside the layers, not in them: what environments see holds packages only (a
        # lock names its index's URLs)
        self._info = layer_dir / INFO
        for folder in (self.folder, self._staging, self._locks, self._info):
            folder.mkdir(exist_ok=True)
        # searchable, not readable, by the environments' uids: a script reaches the layer
        # its worker was given by its path, and cannot list the others (other owners'
        # packages, perhaps from a private index); a layer id is the hash of its lock
        os.chmod(self.folder, 0o711)
        self._installing: dict[str, asyncio.Task[Layer]] = {}  # by layer id, while it runs
        self._ready: dict[str, tuple[Layer, float]] = {}
        self._locks_kept: collections.OrderedDict[tuple[str, tuple[str, ...]], tuple[Lock, float]] = (
            collections.OrderedDict()
        )  # found installed, and when (monotonic)
        # layers an Initialize installed or found and has not stored its session for yet:
        # no session uses them, and no sweep may take them
        self._held: collections.Counter[str] = collections.Counter()
        self._touched: dict[str, float] = {}  # layer id: when `used` last touched its folder (monotonic)
        self._sweeper: asyncio.Task[None] | None = None
        self._closing = False

    @property
    def runtimes(self) -> tuple[str, ...]:
        """The runtimes whose dependencies this store installs."""
        return tuple(sorted(self._resolvers))

    def start(self) -> None:
        if self._sweeper is None and self._in_use is not None:
            self._sweeper = asyncio.create_task(self._sweep_loop())

    async def close(self) -> None:
        """Stop the sweep and every install under way (its staging folder is removed)."""
        self._closing = True
        sweeper, self._sweeper = self._sweeper, None
        if sweeper is not None:
            await cancel_and_wait(sweeper)
        installs = list(self._installing.values())
        for task in installs:
            task.cancel()
        await asyncio.gather(*installs, return_exceptions=True)

    # resolving

    async def lock(
        self, runtime: str, requirements: tuple[str, ...], deadline: Deadline, owner: str = ""
    ) -> Lock:
        """The runtime's resolver's lock of the requirements, within the call's deadline and
        DEPENDENCY_INSTALL_TIMEOUT_SECONDS (DependencyLimitExceeded naming it past it); the
        same requirements resolved in the last LOCK_REUSE_SECONDS get the same lock."""
        resolver = self._resolvers.get(runtime)
        if resolver is None:
            raise DependencyNotAllowed(
                f"this server installs no dependencies for {runtime}",
                setting="DEPENDENCIES",
                requirement=requirements[0][:256] if requirements else "",
            )
        key = (runtime, requirements)
        kept = self._locks_kept.get(key)
        if kept is not None and time.monotonic() - kept[1] < LOCK_REUSE_SECONDS:
            return kept[0]
        bound = Deadline.after(self._timeout)
        caller_first = deadline.at is not None and bound.at is not None and deadline.at < bound.at
        try:
            async with self._slot(owner, deadline.cap(self._timeout)):
                lock = await resolver.lock(requirements, deadline if caller_first else bound)
        except DependencyLimitExceeded:
            if caller_first:
                raise DeadlineExceeded("the call's deadline passed while its dependencies resolved") from None
            raise
        self._locks_kept[key] = (lock, time.monotonic())
        self._locks_kept.move_to_end(key)
        while len(self._locks_kept) > MAX_LOCKS_KEPT:
            self._locks_kept.popitem(last=False)
        return lock

    # installing

    def path(self, layer_id: str) -> Path:
        return self.folder / layer_id

    def installed(self, layer_id: str) -> Layer | None:
        """The layer when this server knows it is installed and its folder is there (one stat)."""
        ready = self._ready.get(layer_id)
        if ready is None:
            return None
        layer, seen = ready
        if time.monotonic() - seen > self._sweep_interval or not layer.path.is_dir():
            self._ready.pop(layer_id, None)
            return None  # looked at again by ensure(): another server may have swept it
        return layer

    async def used(self, layer_id: str) -> None:
        """A session uses the layer now: its folder's mtime says so (at most once a
        USE_TOUCH_SECONDS), which keeps every server's sweep from it for LAYER_RETENTION_SECONDS."""
        now = time.monotonic()
        if now - self._touched.get(layer_id, -USE_TOUCH_SECONDS) < USE_TOUCH_SECONDS:
            return
        self._touched[layer_id] = now
        if len(self._touched) > MAX_LOCKS_KEPT:
            self._touched.pop(next(iter(self._touched)))
        with contextlib.suppress(OSError):
            await asyncio.to_thread(os.utime, self.path(layer_id))

    def hold(self, layer_id: str) -> None:
        """Keep the layer from the sweep until `release` (a session about to be stored uses it)."""
        self._held[layer_id] += 1

    def release(self, layer_id: str) -> None:
        self._held[layer_id] -= 1
        if self._held[layer_id] <= 0:
            del self._held[layer_id]

    async def find(self, layer_id: str) -> Layer | None:
        """The layer when it is installed on this host (by this server or another)."""
        found = await asyncio.to_thread(self._read, layer_id)
        if found is not None:
            self._ready[layer_id] = (found, time.monotonic())
        else:
            self._ready.pop(layer_id, None)
        return found

    async def ensure(self, lock: Lock, deadline: Deadline, owner: str = "") -> Layer:
        """The lock's layer, installed now when this host has none (or waiting for the install
        under way here or by another server of the host). DependencyLimitExceeded past
        MAX_LAYER_BYTES or DEPENDENCY_INSTALL_TIMEOUT_SECONDS; DeadlineExceeded when the
        call's deadline passes first, while the install goes on and is kept. An install this
        call starts takes a slot of `owner`'s."""
        layer_id = lock.layer_id
        layer = self.installed(layer_id)
        if layer is not None:
            return layer
        install = self._installing.get(layer_id)
        if install is None:
            found = await self.find(layer_id)
            if found is not None:
                return found
            if self._closing:
                raise Unavailable("the server is stopping")
            if lock.archive_bytes > self._max_bytes:  # never downloaded
                raise DependencyLimitExceeded(
                    f"the dependencies' archives take {lock.archive_bytes} bytes, over MAX_LAYER_BYTES "
                    f"({self._max_bytes})",
                    setting="MAX_LAYER_BYTES",
                    limit=str(self._max_bytes),
                    bytes=str(lock.archive_bytes),
                )
            install = self._installing.get(layer_id)  # started while this one looked
            if install is None:
                install = self._installing[layer_id] = asyncio.create_task(self._install(lock, owner))
                install.add_done_callback(retrieve)
                install.add_done_callback(lambda _: self._installing.pop(layer_id, None))
        return await outcome(
            install,
            deadline,
            "the call's deadline passed while its dependencies were installed; the install goes on, "
            "and a later call finds the layer",
            "the server stopped before the dependencies were installed",
            internal=(log, "internal error while installing dependencies"),
        )

    async def _install(self, lock: Lock, owner: str) -> Layer:
        layer_id = lock.layer_id
        deadline = Deadline.after(self._timeout)
        resolver = self._resolvers.get(lock.runtime)
        if resolver is None:
            raise DependencyNotAllowed(
                f"this server installs no dependencies for {lock.runtime}", setting="DEPENDENCIES"
            )
        handle = await self._host_lock(layer_id, deadline)
        try:
            found = await asyncio.to_thread(self._read, layer_id)
            if found is None:  # not installed by another server meanwhile
                started = time.monotonic()
                async with self._slot(owner, deadline.cap(self._timeout)):
                    found = await self._install_locked(resolver, lock, deadline)
                log.info(
                    "installed layer %s (%s, %d bytes) in %.1f s",
                    layer_id,
                    lock.runtime,
                    found.bytes,
                    time.monotonic() - started,
                )
                if self._on_install is not None:
                    self._on_install(lock.runtime)
            self._ready[layer_id] = (found, time.monotonic())
            return found
        finally:
            os.close(handle)  # releases the flock

    async def _install_locked(self, resolver: Resolver, lock: Lock, deadline: Deadline) -> Layer:
        made = await asyncio.to_thread(tempfile.mkdtemp, dir=self._staging, prefix=lock.layer_id + "-")
        staging = Path(made)
        try:
            await resolver.install(lock, staging, deadline, self._max_bytes)  # killed past it
            size = await asyncio.to_thread(folder_size, staging)
            if size > self._max_bytes:  # grown past it between two looks of the watchdog
                raise too_large(size, self._max_bytes)
            info = {"runtime": lock.runtime, "bytes": size, "lock": lock.text}
            await asyncio.to_thread(self._publish, staging, lock.layer_id, info)
            return Layer(lock.layer_id, self.path(lock.layer_id), size)
        finally:
            await asyncio.to_thread(shutil.rmtree, staging, True)  # gone once renamed

    async def _host_lock(self, layer_id: str, deadline: Deadline) -> int:
        """This layer's lock file, held (flock): no other server of the host installs it meanwhile."""
        fd = await self._lock_file(layer_id)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    return fd
                except OSError as exc:
                    if exc.errno not in (errno.EAGAIN, errno.EACCES):
                        raise
                remaining = deadline.remaining()
                if remaining is not None and remaining <= 0:
                    raise DependencyLimitExceeded(
                        "another server of this host was still installing the layer after "
                        f"DEPENDENCY_INSTALL_TIMEOUT_SECONDS ({self._timeout:g})",
                        setting="DEPENDENCY_INSTALL_TIMEOUT_SECONDS",
                    )
                await asyncio.sleep(LOCK_POLL_SECONDS)
        except BaseException:
            os.close(fd)
            raise

    @contextlib.asynccontextmanager
    async def _slot(self, owner: str, wait: float) -> AsyncIterator[None]:
        """One of the DEPENDENCY_SLOTS for the block; QuotaExceeded when none comes in `wait`
        (the call's deadline or DEPENDENCY_INSTALL_TIMEOUT_SECONDS, whichever is sooner: the
        wait is part of the resolve's or install's time, so no call without a deadline, nor an
        install no caller waits for any more, waits unbounded)."""
        try:
            number = await self._slots.acquire(owner, wait)
        except SlotWaitTimeout as exc:
            setting = "DEPENDENCY_SLOTS_PER_OWNER" if exc.own_share else "DEPENDENCY_SLOTS"
            raise QuotaExceeded(
                f"no slot to resolve or install dependencies came within {wait:g} s ({setting} full; "
                "a wait for one ends at the call's deadline or after DEPENDENCY_INSTALL_TIMEOUT_SECONDS, "
                "which it counts toward, whichever comes first)",
                retry_after=1.0,
                setting=setting,
            ) from None
        try:
            yield
        finally:
            self._slots.release(owner, number)

    # collecting

    async def sweep(self) -> int:
        """Remove layers no unexpired session uses, installed before LAYER_RETENTION_SECONDS
        ago; how many were removed."""
        if self._in_use is None:
            return 0
        # what an install left when its server died (a live one's is younger than its timeout)
        await asyncio.to_thread(_remove_older, self._staging, time.time() - 2 * self._timeout)
        before = time.time() - self._retention
        old = await asyncio.to_thread(_old_layers, self.folder, before)
        removed = 0
        for start in range(0, len(old), SWEEP_BATCH):
            batch = [
                name
                for name in old[start : start + SWEEP_BATCH]
                if name not in self._installing and name not in self._held
            ]
            used = await self._in_use(batch, Deadline.after(SWEEP_SECONDS))
            for layer_id in batch:
                if layer_id in used:
                    continue
                handle = await self._lock_file(layer_id)
                try:
                    try:
                        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except OSError:
                        continue  # being installed by another server: not old
                    if layer_id in self._held:  # an Initialize came for it meanwhile
                        continue
                    # a session of this server's or another's adopted it since it was listed:
                    # its use touched the folder, or its session is stored by now
                    if not await asyncio.to_thread(_unused_since, self.path(layer_id), before):
                        continue
                    if await self._in_use([layer_id], Deadline.after(SWEEP_SECONDS)):
                        continue
                    self._ready.pop(layer_id, None)
                    with contextlib.suppress(FileNotFoundError):
                        await asyncio.to_thread(os.unlink, self._info_file(layer_id))  # absent first
                    if await asyncio.to_thread(_remove, self.path(layer_id), self._staging):
                        removed += 1
                finally:
                    os.close(handle)
        return removed

    async def _lock_file(self, layer_id: str) -> int:
        """The layer's lock file (`LAYER_DIR/locks/<layer_id>.lock`), open, not yet locked."""
        return await asyncio.to_thread(
            os.open, self._locks / f"{layer_id}.lock", os.O_RDWR | os.O_CREAT, 0o600
        )

    def _info_file(self, layer_id: str) -> Path:
        return self._info / f"{layer_id}.json"

    def _read(self, layer_id: str) -> Layer | None:
        """The installed layer, when both its folder and its info are there (a thread's work)."""
        try:
            info = json.loads(self._info_file(layer_id).read_text())
        except (OSError, ValueError):
            return None
        path = self.path(layer_id)
        if not path.is_dir():
            return None
        return Layer(layer_id, path, int(info.get("bytes", 0)))

    def _publish(self, staging: Path, layer_id: str, info: dict[str, object]) -> None:
        """Rename the finished install into place, then write its info (the layer counts as
        installed once both are there); a folder a dead server left without info goes first.
        Files readable by every environment's uid, writable by none but the server."""
        for root, dirs, names in os.walk(staging):
            for name in (*dirs, *names):
                path = os.path.join(root, name)
                mode = os.lstat(path).st_mode
                if not stat.S_ISLNK(mode):
                    os.chmod(path, (mode | 0o444 | (0o111 if stat.S_ISDIR(mode) else 0)) & 0o755)
        os.chmod(staging, 0o755)
        final = self.path(layer_id)
        if final.exists():
            _remove(final, self._staging)
        os.replace(staging, final)
        fd, written = tempfile.mkstemp(dir=self._info, prefix=f".{layer_id}-")
        with os.fdopen(fd, "w") as file:
            file.write(json.dumps(info))
        os.replace(written, self._info_file(layer_id))

    async def _sweep_loop(self) -> None:
        await sweep_every(self._sweep_interval, self.sweep, "layer", self.folder, log)


def _old_layers(folder: Path, before: float) -> list[str]:
    """The layers last used (or installed) before `before` (time.time())."""
    found = []
    with os.scandir(folder) as entries:
        for entry in entries:
            with contextlib.suppress(OSError):
                if entry.is_dir(follow_symlinks=False) and entry.stat().st_mtime < before:
                    found.append(entry.name)
    return found


def _unused_since(path: Path, before: float) -> bool:
    """Whether the layer's folder was last used (or installed) before `before` (time.time())."""
    try:
        return path.stat().st_mtime < before
    except OSError:
        return False


def _remove_older(folder: Path, before: float) -> None:
    """Remove what `folder` holds that was last changed before `before` (time.time())."""
    with os.scandir(folder) as entries:
        for entry in entries:
            with contextlib.suppress(OSError):
                if entry.stat(follow_symlinks=False).st_mtime < before:
                    if entry.is_dir(follow_symlinks=False):
                        shutil.rmtree(entry.path, ignore_errors=True)
                    else:
                        os.unlink(entry.path)


def _remove(path: Path, staging: Path) -> bool:
    """Move the layer out of sight at once (a rename), then delete it."""
    gone = staging / f".gone-{path.name}-{os.getpid()}-{time.monotonic_ns()}"
    try:
        os.replace(path, gone)
    except FileNotFoundError:
        return False
    shutil.rmtree(gone, ignore_errors=True)
    return True
