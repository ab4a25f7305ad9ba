"""The LayerStore's shared work, against a resolver of our own (the Resolver seam), and uv's
answers when the index is away: no server, no database."""

from __future__ import annotations

import asyncio
import functools
import os
import sys
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

    async def install(self, lock: Lock, target: Path, deadline: Deadline) -> None:
        self.installs += 1
        await self.release.wait()
        (target / "site-packages").mkdir()
        (target / "site-packages" / "data").write_bytes(b"x" * self.size)


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
async def test_an_owner_at_its_share_of_slots_waits_while_another_owner_resolves(tmp_path: Path) -> None:
    resolver = SlowResolver()
    layers = store(tmp_path, resolver, slots=2, slots_per_owner=1)
    resolver.resolving.clear()
    busy = asyncio.create_task(layers.lock("python", ("first",), Deadline.after(30), owner="a"))
    await asyncio.sleep(0.1)
    with pytest.raises(QuotaExceeded) as refused:  # its one slot is held: it waits, bounded
        await layers.lock("python", ("second",), Deadline.after(0.3), owner="a")
    assert refused.value.metadata["setting"] == "DEPENDENCY_SLOTS_PER_OWNER"
    other = asyncio.create_task(layers.lock("python", ("third",), Deadline.after(30), owner="b"))
    await asyncio.sleep(0.1)
    assert resolver.locks == 2  # the other owner's resolve runs beside the first
    resolver.resolving.set()
    await asyncio.gather(busy, other)
    await layers.close()
