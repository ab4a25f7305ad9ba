"""The sandbox's modes, its layers in Health, and per-session limits."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Iterator

import pytest

from lambda_microservice import InvalidArgumentError, LambdaClient, to_python
from lambda_microservice.v1 import lambda_service_pb2 as pb
from lambda_server.config import RuntimeSettings, SandboxSettings
from lambda_server.domain import Deadline, Job, Limits
from lambda_server.runtimes.pool import EnvironmentPool
from lambda_server.runtimes.registry import discover
from lambda_server.sandbox import Sandbox, SandboxUnavailable
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
