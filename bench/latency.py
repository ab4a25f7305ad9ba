"""Execution latency at concurrency 1: warm, cold bind (pre-started pool) and spawn-per-execution.

Drives the server with the blocking client and reports p50/p99 with ratios
against baselines measured in the same run: the gRPC health check (the floor
of any call) and a process spawned per execution (what Piston and Judge0 do).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.server import BenchServer, running_server
from lambda_microservice import LambdaClient
from lambda_microservice.v1 import lambda_service_pb2 as pb
from lambda_microservice.v1 import lambda_service_pb2_grpc as pb_grpc

NODE = os.environ.get("NODE_BINARY") or "node"

SCRIPTS = {
    "python": "def handler(event):\n    return event['params']['n'] + 1  # {tag}",
    "nodejs": "return event.params.n + 1; // {tag}",
    "rust": (
        "use serde_json::Value;\n// {tag}\n"
        "pub fn handler(event: Value) -> Result<Value, String> {{\n"
        '    Ok(Value::from(event["params"]["n"].as_i64().unwrap_or(0) + 1))\n}}\n'
    ),
}


# ExecuteStream's scripts: a line of output, then 50 ms of work, then the result. The first
# chunk's latency is what a caller of a long script waits before it sees anything.
STREAM_SCRIPTS = {
    "python": "import time\ndef handler(event):\n    print('started')\n    time.sleep(0.05)\n    return 1",
    "nodejs": (
        "console.log('started');\nawait new Promise((resolve) => setTimeout(resolve, 50));\nreturn 1;"
    ),
}


def percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "n": len(ordered),
        "p50_ms": 1000 * statistics.median(ordered),
        "p99_ms": 1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
    }


def timed(call: Callable[[], object], count: int) -> list[float]:
    samples = []
    for _ in range(count):
        started = time.perf_counter()
        call()
        samples.append(time.perf_counter() - started)
    return samples


def wait_for_warm_pool(client: LambdaClient, runtime: str, size: int = 2) -> None:
    deadline = time.monotonic() + 10
    while f"warm={size}" not in client.health().components[f"runtime.{runtime}"]:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the {runtime} pool did not refill")
        time.sleep(0.01)


def spawn_per_execution(runtime: str) -> None:
    """A fresh interpreter per execution, as peers that start a process per job do."""
    if runtime == "python":
        command = [sys.executable, "-I", "-S", "-c", "import json; print(json.dumps(41 + 1))"]
    else:
        command = [NODE, "-e", "console.log(JSON.stringify(41 + 1))"]
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    assert output.strip() == "42"


def sandboxed_spawns(server: BenchServer, runtime: str, count: int) -> list[float]:
    """The first Execute of new scripts on a server with no pre-started processes: each
    starts a runtime inside the full sandbox, as Piston (isolate) and Judge0 do per job."""
    samples: list[float] = []
    with LambdaClient(server.target, timeout=30) as client:
        for i in range(count):
            fresh = client.initialize(
                f"{runtime}-spawn", SCRIPTS[runtime].format(tag=f"spawn {i} {time.time()}")
            )
            samples.extend(timed(lambda rid=fresh.request_id: client.execute(rid, {"n": 41}), 1))
    return samples


def run(server: BenchServer, quick: bool, unpooled: BenchServer | None = None) -> dict[str, Any]:
    """Every latency scenario at concurrency 1; rows carry p50/p99 and the ratio to the floor."""
    warm_n, cold_n, spawn_n = (50, 5, 3) if quick else (3000, 60, 30)
    report: dict[str, dict[str, float]] = {}
    errors = 0
    with LambdaClient(server.target, timeout=30) as client:
        with grpc.insecure_channel(server.target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            request = health_pb2.HealthCheckRequest()
            timed(lambda: health.Check(request), warm_n // 10)
            report["floor: grpc.health.v1 Check"] = percentiles(timed(lambda: health.Check(request), warm_n))
        for runtime in ("python", "nodejs"):
            session = client.initialize(f"{runtime}-bench", SCRIPTS[runtime].format(tag="warm"))

            def execute(request_id: str = session.request_id) -> None:
                nonlocal errors
                response = client.execute(request_id, {"n": 41})
                if response.HasField("error") or response.result.number_value != 42:
                    errors += 1

            timed(execute, warm_n // 10)
            report[f"{runtime}: warm Execute"] = percentiles(timed(execute, warm_n))
            cold = []
            for i in range(cold_n):
                wait_for_warm_pool(client, runtime)
                fresh = client.initialize(
                    f"{runtime}-cold", SCRIPTS[runtime].format(tag=f"cold {i} {time.time()}")
                )
                cold.extend(timed(lambda rid=fresh.request_id: execute(rid), 1))
            report[f"{runtime}: first Execute of a new script"] = percentiles(cold)
            report[f"{runtime}: process spawned per execution"] = percentiles(
                timed(lambda rt=runtime: spawn_per_execution(rt), spawn_n)
            )
            if unpooled is not None:
                report[f"{runtime}: sandboxed process per execution"] = percentiles(
                    sandboxed_spawns(unpooled, runtime, spawn_n)
                )
        rust(client, warm_n, cold_n, report)
        errors += stream(client, server.target, warm_n // 10, report)
    if not quick:
        first_dependency_build(report)
    floor = report["floor: grpc.health.v1 Check"]["p50_ms"]
    for row in report.values():
        row["ratio"] = row["p50_ms"] / floor
    return {"rows": report, "errors": errors}


def stream(client: LambdaClient, target: str, count: int, report: dict[str, dict[str, float]]) -> int:
    """ExecuteStream at concurrency 1: the time to its first output chunk, and to its last
    message, of a script that prints a line and then works 50 ms. Returns the errors."""
    errors = 0
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.LambdaServiceStub(channel)
        for runtime, script in STREAM_SCRIPTS.items():
            session = client.initialize(f"{runtime}-stream", script)
            request = pb.ExecuteRequest(request_id=session.request_id)
            first, last = [], []
            for i in range(count + count // 10):
                started = time.perf_counter()
                first_at = None
                response = None
                for message in stub.ExecuteStream(request, timeout=30):
                    if message.HasField("output") and first_at is None:
                        first_at = time.perf_counter()
                    elif message.HasField("response"):
                        response = message.response
                ended = time.perf_counter()
                if first_at is None or response is None or response.HasField("error"):
                    errors += 1
                    continue
                if i >= count // 10:  # the first tenth warms up
                    first.append(first_at - started)
                    last.append(ended - started)
            report[f"{runtime}: ExecuteStream, first chunk (50 ms script)"] = percentiles(first or [0.0])
            report[f"{runtime}: ExecuteStream, last message (50 ms script)"] = percentiles(last or [0.0])
    return errors


def first_dependency_build(report: dict[str, dict[str, float]]) -> None:
    """What the first start on a machine pays for Rust, in the background: a server with an
    empty RUST_CACHE_DIR, from its process's start to Health's `crates: ready`."""
    with tempfile.TemporaryDirectory(prefix="bench-rust-cache-") as cache:  # in /tmp: the jail sees it
        started = time.perf_counter()
        with running_server(RUST_CACHE_DIR=cache) as cold, LambdaClient(cold.target) as client:
            while "crates: ready" not in client.health().components["runtime.rust"]:
                if time.perf_counter() - started > 600:
                    raise RuntimeError("the crates were not built within 600 s")
                time.sleep(0.1)
            seconds = time.perf_counter() - started
    report["rust: crates built from start-up (cold cache, once)"] = {
        "n": 1,
        "p50_ms": 1000 * seconds,
        "p99_ms": 1000 * seconds,
    }


def rust(client: LambdaClient, warm_n: int, compile_n: int, report: dict[str, dict[str, float]]) -> None:
    """Rust beside Python and Node.js: Initialize of a new script (a compile, with the
    dependencies built already), and warm Execute. Skipped where there is no toolchain."""
    if not client.health().components["runtime.rust"].startswith("ok"):
        return
    client.initialize("rust-bench", SCRIPTS["rust"].format(tag="dependencies"), timeout=600)
    for level in ("debug", "release"):
        compiles = []
        for i in range(max(1, compile_n // 10)):  # quick: one of each
            script = SCRIPTS["rust"].format(tag=f"compile {level} {i} {time.time()}")
            compiles.extend(
                timed(lambda s=script, o=level: client.initialize("rust-bench", s, optimization_level=o), 1)
            )
        report[f"rust: Initialize, compiling ({level})"] = percentiles(compiles)
    session = client.initialize("rust-bench", SCRIPTS["rust"].format(tag="warm"))

    def execute() -> None:
        response = client.execute(session.request_id, {"n": 41})
        if response.HasField("error") or response.result.number_value != 42:
            raise RuntimeError(f"rust Execute failed: {response}")

    first = timed(execute, 1)
    report["rust: first Execute (a sandboxed start)"] = percentiles(first)
    timed(execute, warm_n // 10)
    report["rust: warm Execute"] = percentiles(timed(execute, warm_n))


def print_report(report: dict[str, Any]) -> None:
    rows = report["rows"]
    print(f"{'scenario (concurrency 1)':48} {'n':>6} {'p50 ms':>9} {'p99 ms':>9} {'p50/floor':>10}")
    for name, row in rows.items():
        print(f"{name:48} {row['n']:>6} {row['p50_ms']:>9.3f} {row['p99_ms']:>9.3f} {row['ratio']:>10.2f}")
    for runtime in ("python", "nodejs"):
        cold = rows[f"{runtime}: first Execute of a new script"]["p50_ms"]
        for baseline in ("process spawned per execution", "sandboxed process per execution"):
            if f"{runtime}: {baseline}" in rows:
                spawn = rows[f"{runtime}: {baseline}"]["p50_ms"]
                print(f"{runtime}: first Execute is {spawn / cold:.1f}x faster than a {baseline}")
