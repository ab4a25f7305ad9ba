"""Saturating throughput with h2load, against the gRPC floor measured in the same run.

h2load (Debian's nghttp2-client) posts one prepared gRPC frame, made from our
own messages, over and over on several HTTP/2 connections. It sees only HTTP
statuses, and gRPC answers 200 even for a failed call, so every run is checked
afterwards against the server's own counters (lambda_rpc_requests_total by
status code, lambda_executions_total by outcome): a call that failed in gRPC or
in its script counts as an error.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import Message
from google.protobuf.struct_pb2 import Struct
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.server import BenchServer, cpu_per_call
from lambda_microservice import AsyncLambdaClient, LambdaClient
from lambda_microservice.v1 import lambda_service_pb2 as pb

H2LOAD = os.environ.get("H2LOAD") or shutil.which("h2load") or "/usr/bin/h2load"
SERVICE = "lambda_microservice.v1.LambdaService"
BATCH_ITEMS = 100
SCRIPTS = {
    "python": "def handler(event):\n    return event['params']['n'] + 1",
    "nodejs": "return event.params.n + 1;",
}


@dataclass(frozen=True)
class Load:
    """How hard h2load pushes: connections, streams in flight on each, and for how long."""

    connections: int
    streams: int
    seconds: float

    @property
    def in_flight(self) -> int:
        return self.connections * self.streams


def grpc_frame(message: Message) -> bytes:
    """A gRPC length-prefixed message: uncompressed flag, 4-byte length, the bytes."""
    body = message.SerializeToString()
    return b"\x00" + len(body).to_bytes(4, "big") + body


def h2load(
    server: BenchServer, path: str, message: Message, load: Load, requests: int | None = None
) -> dict[str, float]:
    """Post `message` to `path` under `load` (for its seconds, or `requests` times)."""
    with tempfile.NamedTemporaryFile(suffix=".bin") as body:
        body.write(grpc_frame(message))
        body.flush()
        amount = (
            [f"--requests={requests}"] if requests else [f"--duration={load.seconds:g}", "--warm-up-time=1"]
        )
        command = [
            H2LOAD,
            f"--clients={load.connections}",
            f"--max-concurrent-streams={load.streams}",
            *amount,
            f"--data={body.name}",
            "--header=content-type: application/grpc",
            "--header=te: trailers",
            f"http://{server.target}{path}",
        ]
        finished_run = subprocess.run(command, capture_output=True, text=True, timeout=load.seconds + 600)
        output = finished_run.stdout + finished_run.stderr
    finished = re.search(r"finished in ([\d.]+)m?s, ([\d.]+) req/s", output)
    counts = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed", output)
    if not (finished and counts):
        raise RuntimeError(f"h2load said:\n{output}")
    return {
        "rps": float(finished.group(2)),
        "done": int(counts.group(1)),
        "succeeded": int(counts.group(2)),
        "failed": int(counts.group(3)),
    }


def _failures(server: BenchServer) -> float:
    """Calls that failed, in gRPC (any status but OK) or in their script.

    CANCELLED is left out: h2load resets the streams still in flight when its
    time is up, and the server counts those as cancelled calls.
    """
    rpcs = server.samples("lambda_rpc_requests_total")
    failed_rpcs = sum(
        value for labels, value in rpcs.items() if dict(labels).get("code") not in ("OK", "CANCELLED")
    )
    executions = server.samples("lambda_executions_total")
    failed_scripts = sum(value for labels, value in executions.items() if dict(labels)["outcome"] != "ok")
    return failed_rpcs + failed_scripts


def _ok(server: BenchServer, method: str) -> float:
    rpcs = server.samples("lambda_rpc_requests_total")
    return sum(v for labels, v in rpcs.items() if dict(labels) == {"method": method, "code": "OK"})


def measure(
    server: BenchServer, name: str, method: str, message: Message, load: Load, requests: int | None = None
) -> dict[str, Any]:
    """One h2load run, checked against the server's counters."""
    failures_before, ok_before = _failures(server), _ok(server, method)
    cpu_before = server.cpu_seconds()
    row: dict[str, Any] = h2load(server, f"/{method}", message, load, requests)
    cpu_after = server.cpu_seconds()
    answered = _ok(server, method) - ok_before
    row["cpu_us"] = cpu_per_call(cpu_before, cpu_after, answered)
    row["errors"] = int(_failures(server) - failures_before) + row["failed"]
    # warm-up requests are answered but not counted by h2load: the server saw at least as many
    if answered < row["succeeded"]:
        row["errors"] += int(row["succeeded"] - answered)
    row["name"] = name
    row["in_flight"] = load.in_flight
    return row


async def _one_shot(target: str, runtime: str, seconds: float, tasks: int) -> tuple[float, float, int]:
    """Initialize then Execute, as many times as `tasks` callers manage in `seconds`;
    and the health check the same way, the floor for this client."""
    done = {"one-shot": 0, "floor": 0}
    errors = 0
    async with AsyncLambdaClient(target, timeout=30) as client:
        channel = grpc.aio.insecure_channel(target)
        health = health_pb2_grpc.HealthStub(channel)

        async def one_shot(stop: float) -> None:
            nonlocal errors
            while time.perf_counter() < stop:
                session = await client.initialize(f"{runtime}-one-shot", SCRIPTS[runtime])
                response = await client.execute(session.request_id, {"n": 41})
                if response.HasField("error"):
                    errors += 1
                done["one-shot"] += 1

        async def check(stop: float) -> None:
            while time.perf_counter() < stop:
                await health.Check(health_pb2.HealthCheckRequest(), timeout=30)
                done["floor"] += 1

        rates = {}
        for name, worker in (("floor", check), ("one-shot", one_shot)):
            started = time.perf_counter()
            await asyncio.gather(*(worker(started + seconds) for _ in range(tasks)))
            rates[name] = done[name] / (time.perf_counter() - started)
        await channel.close()
    return rates["one-shot"], rates["floor"], errors


def batch(server: BenchServer, client: LambdaClient, runtime: str, load: Load) -> dict[str, Any]:
    """ExecuteBatch of BATCH_ITEMS items at saturation: its rate in executions a second (calls
    a second times the items), and its CPU a call per item."""
    session = client.initialize(f"{runtime}-batch", SCRIPTS[runtime])
    client.execute(session.request_id, {"n": 41})  # bind an environment first
    request = pb.ExecuteBatchRequest(request_id=session.request_id)
    for n in range(BATCH_ITEMS):
        request.params.add().update({"n": n})
    name = f"{runtime}: ExecuteBatch of {BATCH_ITEMS}"
    row = measure(server, name, f"{SERVICE}/ExecuteBatch", request, load)
    row["rps"] *= BATCH_ITEMS  # executions a second
    row["items"] = BATCH_ITEMS
    row["cpu_us"] = {part: value / BATCH_ITEMS for part, value in row["cpu_us"].items()}
    return row


def _at(server: BenchServer, client: LambdaClient, load: Load) -> list[dict[str, Any]]:
    """The floor, then warm Execute and ExecuteBatch in each runtime, then Initialize, at one load."""
    floor = measure(
        server,
        "floor: grpc.health.v1 Check",
        "grpc.health.v1.Health/Check",
        health_pb2.HealthCheckRequest(),
        load,
    )
    rows = [floor]
    for runtime in ("python", "nodejs"):
        session = client.initialize(f"{runtime}-throughput", SCRIPTS[runtime])
        client.execute(session.request_id, {"n": 41})  # bind the environment first
        params = Struct()
        params.update({"n": 41})
        request = pb.ExecuteRequest(request_id=session.request_id, params=params)
        rows.append(measure(server, f"{runtime}: warm Execute", f"{SERVICE}/Execute", request, load))
        rows.append(batch(server, client, runtime, load))
    initialize = pb.InitializeRequest(language_title="python-initialize", script_content=SCRIPTS["python"])
    rows.append(measure(server, "python: Initialize", f"{SERVICE}/Initialize", initialize, load))
    for row in rows:
        row["ratio"] = row["rps"] / floor["rps"]
        row["floor_rps"] = floor["rps"]
    return rows


# 16 calls in flight (2 connections x 8 streams), then 64 (4 x 16): the floor drops at 64,
# so each row's ratio is to the floor measured at its own concurrency.
LOADS = ((2, 8), (4, 16))


def run(server: BenchServer, quick: bool) -> dict[str, Any]:
    """Every scenario at saturation, at each of LOADS; rows carry requests/s and the ratio
    to the floor at the same concurrency."""
    seconds = 1 if quick else 8
    rows = []
    with LambdaClient(server.target, timeout=30) as client:
        for connections, streams in LOADS[:1] if quick else LOADS:  # quick: 16 in flight only
            load = Load(connections=connections, streams=streams, seconds=seconds)
            rows.extend(_at(server, client, load))
    load = Load(*LOADS[0], seconds=seconds)
    one_shot, client_floor, errors = asyncio.run(
        _one_shot(server.target, "python", 1 if quick else 5, tasks=load.in_flight)
    )
    rows.append(
        {
            "name": "python: Initialize + Execute (Python client)",
            "rps": one_shot,
            "ratio": one_shot / client_floor,
            "errors": errors,
            "in_flight": load.in_flight,
            "floor_rps": client_floor,
        }
    )
    environments, environments_rss = server.environments_rss()
    return {
        "rows": rows,
        "server_rss_bytes": server.rss_bytes(),
        "environments": environments,
        "environments_rss_bytes": environments_rss,
    }


def print_report(report: dict[str, Any]) -> None:
    print(
        f"{'scenario (saturating)':48} {'in flight':>9} {'req/s':>9} {'x floor':>8} {'errors':>7}"
        f"   CPU us a call: {'server':>6} {'runtimes':>8} {'postgres':>8}"
    )
    print(
        "(an ExecuteBatch row counts executions a second, items of all its calls, and CPU an item;"
        " x floor is to the floor at the row's own concurrency)"
    )
    for row in report["rows"]:
        cpu = row.get("cpu_us")
        parts = (
            f"   {'':15}{cpu['server']:>6.0f} {cpu['runtimes']:>8.0f} {cpu['postgres']:>8.0f}" if cpu else ""
        )
        print(
            f"{row['name']:48} {row['in_flight']:>9} {row['rps']:>9.0f} "
            f"{row['ratio']:>8.2f} {row['errors']:>7}{parts}"
        )
    floors = [row for row in report["rows"] if row["name"].startswith("floor")]
    at_each = (f"{row['rps']:.0f} req/s at {row['in_flight']} in flight" for row in floors)
    print("the floor: " + ", ".join(at_each))
    mib = 1024 * 1024
    total = report["environments_rss_bytes"]
    each = total / max(1, report["environments"])
    print(
        f"server RSS {report['server_rss_bytes'] / mib:.0f} MiB; {report['environments']} runtime processes "
        f"(pre-started, bound and checkers) {total / mib:.0f} MiB in all, {each / mib:.0f} MiB each"
    )
