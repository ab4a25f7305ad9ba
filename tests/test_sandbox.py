"""The sandbox's modes, its layers in Health, and per-session limits."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Iterator
from typing import Any

import pytest

from lambda_microservice import InvalidArgumentError, LambdaClient, to_python
from lambda_microservice.v1 import lambda_service_pb2 as pb
from lambda_server.config import RuntimeSettings, SandboxSettings
from lambda_server.domain import Deadline, Job, Limits
from lambda_server.runtimes.pool import EnvironmentPool
from lambda_server.runtimes.registry import discover
from lambda_server.sandbox import Sandbox, SandboxUnavailable, confinement
from tests.support import ServerThread, server_settings

as_root = pytest.mark.skipif(os.geteuid() != 0, reason="the sandbox's namespaces and cgroups need root")


@pytest.fixture(scope="module")
def strict_server(database_url: str) -> Iterator[ServerThread]:
    running = ServerThread(server_settings(sandbox=SandboxSettings(mode="strict")), database_url)
    yield running
    running.stop()


@as_root
def test_strict_mode_starts_with_every_layer_and_health_lists_them(strict_server: ServerThread) -> None:
    with LambdaClient(strict_server.target) as client:
        layers = client.health().components["sandbox"]
    assert layers.startswith("strict: ")
    for layer in (
        "namespaces(pid,net,mount,ipc,uts)",
        "uid-per-environment",
        "no-new-privs",
        "seccomp",
        "cgroup-v",
        "rlimits",
    ):
        assert layer in layers
    assert "missing" not in layers


def test_strict_mode_refuses_to_start_when_a_layer_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(SandboxUnavailable, match="namespaces"):
        asyncio.run(Sandbox.start(SandboxSettings(mode="strict")))


def test_auto_mode_warns_for_each_missing_layer_and_keeps_rlimits(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with caplog.at_level(logging.WARNING):
        sandbox = asyncio.run(Sandbox.start(SandboxSettings(mode="auto")))
    assert sandbox.layers == ["rlimits"]
    assert {"namespaces", "cgroups", "seccomp"} <= set(sandbox.missing)
    assert "missing: cgroups, namespaces, seccomp" in sandbox.describe()
    assert sum("sandbox layer" in record.message for record in caplog.records) == 3


def test_without_namespaces_rlimits_still_apply_through_prlimit() -> None:
    specs = discover(None)
    limits = Limits(256, 32)
    sandbox = Sandbox(SandboxSettings(open_files=77), ["rlimits"], {"namespaces": "not root"})

    async def run() -> object:
        pool = EnvironmentPool(RuntimeSettings(prewarm_per_runtime=0), specs, sandbox, limits)
        script = "import resource\nresult = resource.getrlimit(resource.RLIMIT_NOFILE)[0]"
        job = Job("python", "owner", "hash", script, {"params": {}, "context": {}}, 10.0, limits)
        try:
            outcome = await pool.execute(job, Deadline.after(30))
            assert outcome.failure is None, outcome.failure
            return outcome.result
        finally:
            await pool.close()

    assert asyncio.run(run()) == 77


@as_root
@pytest.mark.parametrize(
    ("title", "script"),
    [
        ("python-mem64", "data = bytearray(params['mb'] * 1024 * 1024)\nresult = len(data) // (1024 * 1024)"),
        ("nodejs-mem64", "return Buffer.alloc(params.mb * 1024 * 1024, 1).length / (1024 * 1024);"),
    ],
)
def test_context_memory_mb_sets_the_sessions_memory_limit(
    strict_server: ServerThread, title: str, script: str
) -> None:
    with LambdaClient(strict_server.target) as client:
        small = client.initialize(title, script, context={"memory_mb": 64})
        assert (
            client.execute(small.request_id, {"mb": 128}).error.code == pb.EXECUTION_ERROR_CODE_MEMORY_LIMIT
        )
        assert to_python(client.execute(small.request_id, {"mb": 8}).result) == 8
        default = client.initialize(title, script)  # 256 MiB
        assert to_python(client.execute(default.request_id, {"mb": 128}).result) == 128


@as_root
def test_context_max_processes_caps_the_sessions_processes(strict_server: ServerThread) -> None:
    script = (
        "import subprocess\nprocs = []\ntry:\n    for _ in range(params['n']):\n"
        "        procs.append(subprocess.Popen(['/bin/sleep', '5']))\n    result = len(procs)\n"
        "except OSError as e:\n    result = type(e).__name__\nfor p in procs:\n    p.kill()\n    p.wait()"
    )
    with LambdaClient(strict_server.target) as client:
        capped = client.initialize("python-procs", script, context={"max_processes": 3})
        assert to_python(client.execute(capped.request_id, {"n": 10}).result) == "BlockingIOError"
        assert to_python(client.execute(capped.request_id, {"n": 1}).result) == 1


@pytest.mark.parametrize(
    "context",
    [
        {"memory_mb": 999_999},
        {"memory_mb": 8},
        {"memory_mb": "lots"},
        {"max_processes": 0},
        {"max_processes": 10**6},
    ],
)
def test_limits_beyond_the_ceilings_are_invalid_argument(
    client: LambdaClient, context: dict[str, object]
) -> None:
    with pytest.raises(InvalidArgumentError) as caught:
        client.initialize("python-limits", "result = 1", context=context)
    assert next(iter(context)) in caught.value.message


def test_a_release_waits_for_a_stuck_owner_move_at_most_move_wait_seconds(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A move stuck in the kernel does not hold the release: it goes on in the background,
    the environment's uid kept taken until the move ends and the release is done."""
    monkeypatch.setattr(confinement, "MOVE_WAIT_SECONDS", 0.01)  # the wait under test, not a clock

    async def scenario() -> None:
        sandbox = Sandbox(SandboxSettings(), ["rlimits"], {"namespaces": "not root"})
        moving: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        confined = confinement.Confinement(["true"], 4242, None, sandbox)
        sandbox._uids.add(4242)
        confined._moving = moving
        await asyncio.wait_for(confined.release(), 30)  # returns though the move never ends
        assert sandbox.owner_moves == {"failed": 0, "slow": 1}
        assert 4242 in sandbox._uids  # not reused while the move may still bring processes
        moving.set_result(None)
        for _ in range(1000):
            if 4242 not in sandbox._uids:
                break
            await asyncio.sleep(0.01)
        assert 4242 not in sandbox._uids and not sandbox._background

    with caplog.at_level(logging.WARNING):
        asyncio.run(scenario())
    assert sum("has not ended after" in record.message for record in caplog.records) == 1


def test_a_failed_owner_move_is_logged_once_with_its_cause_and_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def scenario() -> Sandbox:
        sandbox = Sandbox(SandboxSettings(), ["rlimits"], {"namespaces": "not root"})
        confined = confinement.Confinement(["true"], None, None, sandbox)
        move: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        move.set_exception(OSError(16, "Device or resource busy"))
        confined._moving = move
        confined._moved("alice", move)
        assert confined._moving is None and confined._owner is None
        return sandbox

    with caplog.at_level(logging.WARNING):
        sandbox = asyncio.run(scenario())
    assert sandbox.owner_moves == {"failed": 1, "slow": 0}
    warnings = [r.message for r in caplog.records if "owner's cpu group" in r.message]
    assert len(warnings) == 1 and "Device or resource busy" in warnings[0]
