"""The cost of the fairness layers on the warm path: one run, servers with each layer
set on and off, measured interleaved, as ratios to the server with them off.

The layers: the seccomp filter (SANDBOX_SECCOMP), a cpu cgroup per environment inside
one per owner (SANDBOX_CPU_CORES), and what keeps a script from running between
executions (SANDBOX_IDLE: freeze, at once or after SANDBOX_FREEZE_AFTER_MS, or recycle on
thread growth). A layer added later
adds its switch to LAYERS_OFF.
"""

from __future__ import annotations

import statistics
from contextlib import ExitStack
from typing import Any

from google.protobuf.struct_pb2 import Struct

from bench.latency import timed
from bench.server import BenchServer, running_server
from bench.throughput import SCRIPTS, SERVICE, Load, measure
from lambda_microservice import LambdaClient
from lambda_microservice.v1 import lambda_service_pb2 as pb

# every layer of issue 14 on the warm path switched off
LAYERS_OFF = {"SANDBOX_CPU_CORES": "0", "SANDBOX_IDLE": "off", "SANDBOX_SECCOMP": "off"}
VARIANTS = {
    "off": LAYERS_OFF,
    "seccomp + cpu + freeze": {"SANDBOX_IDLE": "freeze"},
    # the operator's trade (issue 17): frozen only once idle 25 ms, so a busy environment
    # is neither frozen nor thawed
    "seccomp + cpu + freeze after 25 ms": {"SANDBOX_IDLE": "freeze", "SANDBOX_FREEZE_AFTER_MS": "25"},
    "seccomp + cpu + recycle": {"SANDBOX_IDLE": "recycle"},
}


def run(quick: bool) -> dict[str, Any]:
    """Warm Execute p50 (concurrency 1) and throughput (h2load) per variant and runtime,
    in rounds that visit every variant in turn; medians over the rounds."""
    rounds, calls = (1, 50) if quick else (5, 1000)
    load = Load(connections=2, streams=8, seconds=1 if quick else 4)
    p50: dict[str, list[float]] = {}
    rps: dict[str, list[float]] = {}
    errors = 0
    with ExitStack() as stack:
        # quick (the suite's smoke run): the layers off and the defaults, two servers of four
        variants = {name: VARIANTS[name] for name in list(VARIANTS)[:2]} if quick else VARIANTS
        servers = {name: stack.enter_context(running_server(**env)) for name, env in variants.items()}
        sessions = {name: _sessions(server) for name, server in servers.items()}
        for _ in range(rounds):
            for name, server in servers.items():
                with LambdaClient(server.target, timeout=30) as client:
                    for runtime, request_id in sessions[name].items():
                        row = f"{name}|{runtime}"
                        timed(lambda r=request_id: client.execute(r, {"n": 41}), calls // 10)
                        samples = timed(lambda r=request_id: client.execute(r, {"n": 41}), calls)
                        p50.setdefault(row, []).append(1000 * statistics.median(samples))
                        params = Struct()
                        params.update({"n": 41})
                        request = pb.ExecuteRequest(request_id=request_id, params=params)
                        result = measure(server, row, f"{SERVICE}/Execute", request, load)
                        rps.setdefault(row, []).append(result["rps"])
                        errors += result["errors"]
    rows = {}
    for row in p50:
        name, runtime = row.split("|")
        off = f"off|{runtime}"
        rows[row] = {
            "variant": name,
            "runtime": runtime,
            "p50_ms": statistics.median(p50[row]),
            "rps": statistics.median(rps[row]),
            "p50_ratio": statistics.median(p50[row]) / statistics.median(p50[off]),
            "rps_ratio": statistics.median(rps[row]) / statistics.median(rps[off]),
        }
    return {"rows": rows, "rounds": rounds, "calls": calls, "errors": errors}


def _sessions(server: BenchServer) -> dict[str, str]:
    with LambdaClient(server.target, timeout=30) as client:
        ids = {}
        for runtime in ("python", "nodejs"):
            session = client.initialize(f"{runtime}-layers", SCRIPTS[runtime])
            client.execute(session.request_id, {"n": 41})  # bind its environment
            ids[runtime] = session.request_id
        return ids


def print_report(report: dict[str, Any]) -> None:
    print(
        f"{'layers (warm Execute), medians of ' + str(report['rounds']) + ' interleaved rounds':48}"
        f" {'p50 ms':>8} {'x off':>6} {'req/s':>8} {'x off':>6}"
    )
    for row in report["rows"].values():
        print(
            f"{row['runtime'] + ': ' + row['variant']:48} {row['p50_ms']:>8.3f} {row['p50_ratio']:>6.2f}"
            f" {row['rps']:>8.0f} {row['rps_ratio']:>6.2f}"
        )
