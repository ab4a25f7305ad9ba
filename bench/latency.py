"""Execution latency at concurrency 1: warm, cold bind (pre-started pool) and spawn-per-execution.

Starts the server as its own process on a throwaway database, drives it with
the blocking client, and prints p50/p99 with ratios against baselines measured
in the same run: the gRPC health check (the floor of any call) and a process
spawned per execution (what Piston and Judge0 do).

    make bench              # full run
    make bench BENCH_ARGS=--quick
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lambda_microservice import LambdaClient
from tests.support import (
    create_database,
    drop_database,
    env_without_database,
    port_answers,
    run_sync,
    with_database,
)

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
NODE = os.environ.get("NODE_BINARY") or "node"

SCRIPTS = {
    "python": "def handler(event):\n    return event['params']['n'] + 1  # {tag}",
    "nodejs": "return event.params.n + 1; // {tag}",
}


def admin_url() -> str:
    if os.environ.get("DATABASE_URL"):
        return os.environ["DATABASE_URL"]
    if port_answers("127.0.0.1", 5432):
        return "postgresql://postgres@127.0.0.1:5432/postgres"
    from lambda_server.store.embedded import start_embedded

    return start_embedded(ROOT / ".data" / "bench-postgres")


@contextmanager
def running_server() -> Iterator[str]:
    """`python -m lambda_server` on a database of its own; yields its address."""
    admin = admin_url()
    name = run_sync(create_database(admin))
    env = {
        **env_without_database(),
        "DATABASE_URL": with_database(admin, name),
        "LISTEN_ADDR": "127.0.0.1:0",
        "RATE_LIMIT_ANONYMOUS_PER_MINUTE": "0",
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "lambda_server"], env=env, stderr=subprocess.PIPE, text=True, cwd=ROOT
    )
    try:
        assert process.stderr is not None
        for line in process.stderr:
            match = re.search(r"serving \S+ on (\S+:\d+)", line)
            if match:
                break
        else:
            raise RuntimeError("the server exited before serving")
        yield match.group(1)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(30)
        run_sync(drop_database(admin, name))


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


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a few iterations: checks that it runs")
    args = parser.parse_args()
    warm_n, cold_n, spawn_n = (50, 5, 3) if args.quick else (3000, 60, 30)
    report: dict[str, dict[str, float]] = {}
    errors = 0
    with running_server() as target, LambdaClient(target, timeout=30) as client:
        with grpc.insecure_channel(target) as channel:
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
    floor = report["floor: grpc.health.v1 Check"]["p50_ms"]
    print(f"{'scenario':48} {'n':>6} {'p50 ms':>9} {'p99 ms':>9} {'p50/floor':>10}")
    for name, row in report.items():
        print(
            f"{name:48} {row['n']:>6} {row['p50_ms']:>9.3f} {row['p99_ms']:>9.3f} {row['p50_ms'] / floor:>10.2f}"
        )
    for runtime in ("python", "nodejs"):
        spawn = report[f"{runtime}: process spawned per execution"]["p50_ms"]
        cold = report[f"{runtime}: first Execute of a new script"]["p50_ms"]
        print(f"{runtime}: first Execute is {spawn / cold:.1f}x faster than a process spawned per execution")
    print(f"errors: {errors}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "latency.json").write_text(json.dumps({"report": report, "errors": errors}, indent=2))
    if errors:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
