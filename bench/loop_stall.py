"""The event loop's longest stall while one Execute with large params runs (issue 14, finding 5).

    python -m bench.loop_stall [--keys 180000]

A server runs in this process; a 1 ms ticker on its event loop records the longest
gap between two ticks while an Execute with `--keys` small keys in its params is
sent (pre-encoded), then while a warm Execute with tiny params is, for comparison.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

import grpc
from google.protobuf import struct_pb2

from bench.server import admin_url
from lambda_microservice import LambdaClient
from lambda_microservice.v1 import lambda_service_pb2 as pb
from tests.support import (
    ServerThread,
    create_database,
    drop_database,
    run_sync,
    server_settings,
    with_database,
)

EXECUTE = "/lambda_microservice.v1.LambdaService/Execute"


class Ticker:
    def __init__(self) -> None:
        self.worst = 0.0
        self.running = True

    async def run(self) -> None:
        last = time.perf_counter()
        while self.running:
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            self.worst = max(self.worst, now - last - 0.001)
            last = now


def stall(server: ServerThread, send: Any) -> tuple[float, float]:
    """(the loop's longest stall, the call's time) while `send()` runs, in ms."""
    ticker = Ticker()
    task = asyncio.run_coroutine_threadsafe(ticker.run(), server.loop)
    time.sleep(0.05)
    ticker.worst = 0.0
    started = time.perf_counter()
    send()
    took = time.perf_counter() - started
    time.sleep(0.01)
    ticker.running = False
    task.result(5)
    return ticker.worst * 1000, took * 1000


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--keys", type=int, nargs="*", default=[180_000, 90_000, 10_000])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    admin = admin_url()
    name = run_sync(create_database(admin))
    server = ServerThread(server_settings(), with_database(admin, name))
    report: dict[str, Any] = {}
    try:
        with (
            LambdaClient(server.target, timeout=60) as client,
            grpc.insecure_channel(server.target) as channel,
        ):
            session = client.initialize("python-stall", "result = 1").request_id
            call = channel.unary_unary(EXECUTE, lambda raw: raw, lambda raw: raw)

            def send(body: bytes) -> None:
                try:
                    call(body, timeout=60)
                except grpc.RpcError as error:
                    report.setdefault("codes", {})[error.code().name] = 1

            for keys in args.keys:
                params = struct_pb2.Struct()
                params.update({f"{i:x}": 1 for i in range(keys)})
                body = pb.ExecuteRequest(request_id=session, params=params).SerializeToString()
                runs = [stall(server, lambda body=body: send(body)) for _ in range(args.repeat)]
                report[f"{keys} keys ({len(body)} bytes)"] = {
                    "max_stall_ms": round(max(r[0] for r in runs), 1),
                    "call_ms": round(min(r[1] for r in runs), 1),
                }
            small = pb.ExecuteRequest(request_id=session).SerializeToString()
            runs = [stall(server, lambda: send(small)) for _ in range(args.repeat)]
            report["tiny params"] = {"max_stall_ms": round(max(r[0] for r in runs), 1)}
    finally:
        server.stop()
        run_sync(drop_database(admin, name))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
