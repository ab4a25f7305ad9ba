"""The LayerStore's shared work, against a resolver of our own (the Resolver seam), and uv's
answers when the index is away: no server, no database."""

from __future__ import annotations

import asyncio
import functools
import os
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from lambda_server.domain import Deadline, LockedPackage
from lambda_server.errors import (
    DeadlineExceeded,
    DependencyLimitExceeded,
    PackageIndexUnavailable,
    QuotaExceeded,
)
from lambda_server.runtimes.installer_process import redacted, run_tool
from lambda_server.runtimes.layers import LayerStore, Lock
from lambda_server.runtimes.uv import UvResolver, find_uv
from tests.support import free_port


def synchronous(test: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """The coroutine test run on an event loop of its own."""

    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> None:
        asyncio.run(test(*args, **kwargs))

    return run


PYTHON = os.path.realpath(sys.executable)


class SlowResolver:
    """Installs a file after `release` is set; counts its installs."""

    runtime = "python"

    def __init__(self, size: int = 10) -> None:
        self.release = asyncio.Event()
        self.resolving = asyncio.Event()  # set: resolves answer at once
        self.installs = 0
        self.locks = 0
        self.size = size

    async def lock(self, requirements: tuple[str, ...], deadline: Deadline) -> Lock:
        self.locks += 1
        await self.resolving.wait()
        packages = tuple(LockedPackage(r, "1", "sha256:0") for r in requirements)
        return Lock(self.runtime, requirements, packages, "\n".join(requirements))

    async def install(
        self, lock: Lock, target: Path, deadline: Deadline, max_bytes: int | None = None
    ) -> None:
        self.installs += 1
        await self.release.wait()
        (target / "site-packages").mkdir()
        (target / "site-packages" / "data").write_bytes(b"x" * self.size)


async def resolving(resolver: SlowResolver, locks: int, timeout: float = 10.0) -> None:
    """Wait until `locks` resolves have begun (the store reaches them through threads and
    file locks: on a busy machine, after any fixed sleep); fail past `timeout`."""
    deadline = time.monotonic() + timeout
    while resolver.locks < locks:
        assert time.monotonic() < deadline, f"{resolver.locks} resolves began, not {locks}"
        await asyncio.sleep(0.02)
    assert resolver.locks == locks, resolver.locks


def store(folder: Path, resolver: SlowResolver, **kwargs: object) -> LayerStore:
    resolver.resolving.set()
    options = {"max_layer_bytes": 1_000_000, "install_timeout_seconds": 60.0, **kwargs}
    return LayerStore(folder, {"python": resolver}, **options)  # type: ignore[arg-type]


@synchronous
async def test_concurrent_callers_share_one_install_and_a_caller_leaving_ends_only_its_call(
    tmp_path: Path,
) -> None:
    resolver = SlowResolver()
    layers = store(tmp_path, resolver)
    lock = await layers.lock("python", ("a", "b"), Deadline.after(10))
    impatient = asyncio.create_task(layers.ensure(lock, Deadline.after(0.2)))
    cancelled = asyncio.create_task(layers.ensure(lock, Deadline.after(30)))
    patient = asyncio.create_task(layers.ensure(lock, Deadline.after(30)))
    with pytest.raises(DeadlineExceeded):
        await impatient
    cancelled.cancel()
    resolver.release.set()
    layer = await patient
    assert resolver.installs == 1
    assert (layer.path / "site-packages" / "data").is_file()
    assert layer.path.name == lock.layer_id
    again = await layers.ensure(lock, Deadline.after(1))  # found, not installed again
    assert again.path == layer.path and resolver.installs == 1
    assert await layers.lock("python", ("a", "b"), Deadline.after(10)) == lock  # resolved once, kept
    assert resolver.locks == 1
    await layers.close()


@synchronous
async def test_two_servers_of_one_host_install_a_layer_once(tmp_path: Path) -> None:
    first, second = SlowResolver(), SlowResolver()
    one, other = store(tmp_path, first), store(tmp_path, second)
    lock = await one.lock("python", ("shared",), Deadline.after(10))
    both = [
        asyncio.create_task(one.ensure(lock, Deadline.after(30))),
        asyncio.create_task(other.ensure(lock, Deadline.after(30))),
    ]
    await asyncio.sleep(0.3)
    first.release.set()
    second.release.set()
    layers = await asyncio.gather(*both)
    assert first.installs + second.installs == 1
    assert layers[0].path == layers[1].path
    await one.close()
    await other.close()


@synchronous
async def test_a_layer_past_max_layer_bytes_leaves_nothing(tmp_path: Path) -> None:
    resolver = SlowResolver(size=5000)
    resolver.release.set()
    layers = store(tmp_path, resolver, max_layer_bytes=1000)
    lock = await layers.lock("python", ("big",), Deadline.after(10))
    with pytest.raises(DependencyLimitExceeded) as refused:
        await layers.ensure(lock, Deadline.after(30))
    assert refused.value.metadata["setting"] == "MAX_LAYER_BYTES"
    assert not list((tmp_path / "layers").iterdir())
    assert not list((tmp_path / "staging").iterdir())
    await layers.close()


@synchronous
async def test_unused_layers_are_swept_after_the_retention(tmp_path: Path) -> None:
    resolver = SlowResolver()
    resolver.release.set()
    used: set[str] = set()

    async def in_use(ids: list[str], deadline: Deadline) -> set[str]:
        return used & set(ids)

    layers = store(tmp_path, resolver, retention_seconds=0.0, in_use=in_use)
    kept = await layers.ensure(await layers.lock("python", ("kept",), Deadline.after(10)), Deadline.after(30))
    gone = await layers.ensure(await layers.lock("python", ("gone",), Deadline.after(10)), Deadline.after(30))
    used.add(kept.layer_id)
    old = 1_000_000_000
    for layer in (kept, gone):
        os.utime(layer.path, (old, old))
    assert await layers.sweep() == 1
    assert kept.path.is_dir() and not gone.path.exists()
    await layers.close()


@synchronous
async def test_a_layer_adopted_while_the_sweep_looks_is_kept(tmp_path: Path) -> None:
    """The sweep listed the layer and asked which are in use before a session adopted it (on
    another server of the host: no hold here): under the layer's flock it looks again, at the
    folder's mtime (touched by the use) and at the sessions (stored since), and keeps it."""
    resolver = SlowResolver()
    resolver.release.set()
    stored: set[str] = set()
    adopt: list[Callable[[], None]] = []  # what happens while the sweep's first question is asked

    async def in_use(ids: list[str], deadline: Deadline) -> set[str]:
        answer = stored & set(ids)
        while adopt:
            await asyncio.sleep(0.05)  # past the coarse clock's tick of the file system's times
            adopt.pop()()
        return answer

    layers = store(tmp_path, resolver, retention_seconds=3600.0, in_use=in_use)
    touched = await layers.ensure(await layers.lock("python", ("a",), Deadline.after(10)), Deadline.after(30))
    joined = await layers.ensure(await layers.lock("python", ("b",), Deadline.after(10)), Deadline.after(30))
    old = 1_000_000_000
    for layer in (touched, joined):
        os.utime(layer.path, (old, old))
    adopt.append(lambda: os.utime(touched.path))  # another server's `used`
    adopt.append(lambda: stored.add(joined.layer_id))  # a session stored, its layer not yet touched
    assert await layers.sweep() == 0
    assert touched.path.is_dir() and joined.path.is_dir()
    # used here: the mtime is new, so the next sweep keeps it too, with no session
    os.utime(touched.path, (old, old))
    await layers.used(touched.layer_id)
    stored.clear()
    assert await layers.sweep() == 1  # `joined`, unused and old by now
    assert touched.path.is_dir() and not joined.path.exists()
    await layers.close()


@synchronous
async def test_a_layer_gone_from_disk_is_not_answered_from_memory(tmp_path: Path) -> None:
    resolver = SlowResolver()
    resolver.release.set()
    layers = store(tmp_path, resolver)
    lock = await layers.lock("python", ("a",), Deadline.after(10))
    layer = await layers.ensure(lock, Deadline.after(30))
    assert layers.installed(layer.layer_id) == layer
    os.rename(layer.path, tmp_path / "staging" / "moved-away")  # another server's sweep, by hand
    assert layers.installed(layer.layer_id) is None
    again = await layers.ensure(lock, Deadline.after(30))
    assert again.path.is_dir() and resolver.installs == 2
    await layers.close()


@synchronous
async def test_an_installer_filling_its_folder_past_the_bound_is_killed(tmp_path: Path) -> None:
    """The watchdog measures the folder while the tool runs, and kills it past max_bytes:
    the error names MAX_LAYER_BYTES, not the install timeout the tool would reach otherwise."""
    script = "import time\nopen('big', 'wb').write(b'x' * 100_000)\ntime.sleep(60)\n"
    with pytest.raises(DependencyLimitExceeded) as refused:
        await run_tool([PYTHON, "-c", script], tmp_path, {}, Deadline.after(30), tmp_path, 10_000)
    assert refused.value.metadata["setting"] == "MAX_LAYER_BYTES"
    assert int(refused.value.metadata["bytes"]) >= 100_000
    # within the bound, the tool ends on its own
    code, _ = await run_tool([PYTHON, "-c", "print(1)"], tmp_path, {}, Deadline.after(30), tmp_path, 10**9)
    assert code == 0


def test_credentials_in_a_tools_words_are_redacted() -> None:
    index = "https://lambda-user:s3cret@pypi.example/simple"
    said = f"error: Failed to fetch {index}/attrs/ (also tried http://other:pw@mirror.example/x and {index})"
    shown = redacted(said, (index,))
    assert "s3cret" not in shown and "pw@" not in shown and "lambda-user" not in shown
    assert "https://***@pypi.example/simple/attrs/" in shown and "http://***@mirror.example/x" in shown
    assert redacted("no URL here: a@b", (None,)) == "no URL here: a@b"


@synchronous
async def test_an_index_with_credentials_that_does_not_answer_hides_them(tmp_path: Path) -> None:
    uv = find_uv()
    assert uv is not None, "uv is a dependency of the server"
    resolver = UvResolver(uv, PYTHON, f"http://lambda-user:s3cret@127.0.0.1:{free_port()}/simple", tmp_path)
    with pytest.raises(PackageIndexUnavailable) as refused:
        await resolver.lock(("attrs",), Deadline.after(60))
    assert "s3cret" not in refused.value.message and "lambda-user" not in refused.value.message


@synchronous
async def test_an_index_that_does_not_answer_is_unavailable(tmp_path: Path) -> None:
    uv = find_uv()
    assert uv is not None, "uv is a dependency of the server"
    resolver = UvResolver(uv, PYTHON, f"http://127.0.0.1:{free_port()}/simple", tmp_path)
    with pytest.raises(PackageIndexUnavailable) as refused:
        await resolver.lock(("attrs",), Deadline.after(60))
    assert refused.value.metadata["setting"] == "PYTHON_PACKAGE_INDEX"


@synchronous
async def test_a_resolve_past_its_time_is_stopped_and_names_the_setting(tmp_path: Path) -> None:
    """An index that accepts the connection and never answers: uv is killed at the deadline."""

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.read()  # until uv is gone
        finally:
            writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    uv = find_uv()
    assert uv is not None
    resolver = UvResolver(uv, PYTHON, f"http://127.0.0.1:{port}/simple", tmp_path)
    try:
        with pytest.raises(DependencyLimitExceeded) as refused:
            await resolver.lock(("attrs",), Deadline.after(2.0))
        assert refused.value.metadata["setting"] == "DEPENDENCY_INSTALL_TIMEOUT_SECONDS"
    finally:
        server.close()
        await server.wait_closed()


@synchronous
async def test_an_index_that_takes_the_connection_and_never_answers_is_unavailable(tmp_path: Path) -> None:
    """PACKAGE_INDEX_TIMEOUT_SECONDS bounds uv's wait for an answer: UNAVAILABLE (retryable)
    naming the index, long before the resolve's own bound (uv's default waits 30 s a read)."""

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.read()  # until uv is gone
        finally:
            writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    uv = find_uv()
    assert uv is not None
    resolver = UvResolver(uv, PYTHON, f"http://127.0.0.1:{port}/simple", tmp_path, index_timeout=1)
    try:
        with pytest.raises(PackageIndexUnavailable) as refused:
            await resolver.lock(("attrs",), Deadline.after(40.0))
        assert refused.value.metadata["setting"] == "PYTHON_PACKAGE_INDEX"
        assert "PACKAGE_INDEX_TIMEOUT_SECONDS" in refused.value.message
    finally:
        server.close()
        await server.wait_closed()


@synchronous
async def test_an_index_that_answers_slowly_is_bounded_by_the_install_timeout(tmp_path: Path) -> None:
    """An index that keeps sending, a byte at a time, is slow, not away: uv's wait between
    two reads (PACKAGE_INDEX_TIMEOUT_SECONDS) never passes, and the resolve's own bound
    (DEPENDENCY_INSTALL_TIMEOUT_SECONDS) stops it."""

    async def trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: 100000\r\n\r\n")
            while True:
                writer.write(b" ")
                await writer.drain()
                await asyncio.sleep(0.2)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(trickle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    uv = find_uv()
    assert uv is not None
    resolver = UvResolver(uv, PYTHON, f"http://127.0.0.1:{port}/simple", tmp_path, index_timeout=1)
    try:
        with pytest.raises(DependencyLimitExceeded) as refused:
            await resolver.lock(("attrs",), Deadline.after(4.0))
        assert refused.value.metadata["setting"] == "DEPENDENCY_INSTALL_TIMEOUT_SECONDS"
    finally:
        server.close()
        await server.wait_closed()


@synchronous
async def test_an_owner_at_its_share_of_slots_waits_while_another_owner_resolves(tmp_path: Path) -> None:
    resolver = SlowResolver()
    layers = store(tmp_path, resolver, slots=2, slots_per_owner=1)
    resolver.resolving.clear()
    busy = asyncio.create_task(layers.lock("python", ("first",), Deadline.after(30), owner="a"))
    await resolving(resolver, 1)  # the first holds its owner's one slot (past a thread's flock)
    with pytest.raises(QuotaExceeded) as refused:  # its one slot is held: it waits, bounded
        await layers.lock("python", ("second",), Deadline.after(0.3), owner="a")
    assert refused.value.metadata["setting"] == "DEPENDENCY_SLOTS_PER_OWNER"
    other = asyncio.create_task(layers.lock("python", ("third",), Deadline.after(30), owner="b"))
    await resolving(resolver, 2)  # the other owner's resolve runs beside the first
    resolver.resolving.set()
    await asyncio.gather(busy, other)
    await layers.close()


@synchronous
async def test_a_wait_for_a_slot_ends_at_the_install_bound_when_the_call_has_longer(tmp_path: Path) -> None:
    """The wait counts toward DEPENDENCY_INSTALL_TIMEOUT_SECONDS (README, DEPENDENCY_SLOTS): a
    call whose deadline is later is refused at that bound, and the message says so."""
    resolver = SlowResolver()
    layers = store(tmp_path, resolver, slots=2, slots_per_owner=1, install_timeout_seconds=0.5)
    resolver.resolving.clear()
    held = asyncio.create_task(layers.lock("python", ("held",), Deadline.after(30), owner="a"))
    await asyncio.sleep(0.1)
    with pytest.raises(QuotaExceeded) as capped:
        await layers.lock("python", ("waits",), Deadline.after(30), owner="a")
    assert capped.value.metadata["setting"] == "DEPENDENCY_SLOTS_PER_OWNER"
    assert "within 0.5 s" in capped.value.message
    assert "DEPENDENCY_INSTALL_TIMEOUT_SECONDS" in capped.value.message, "the message names what bounds it"
    resolver.resolving.set()
    await held
    await layers.close()
