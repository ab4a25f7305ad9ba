"""A py-spy flame graph of the server's Execute hot path at saturation: bench/flame-execute.svg.

    make flame                                  # or: python -m bench.flame [--seconds 20]

A server as `make bench` runs it (its own database, request logs on, every sandbox
layer), one warm Python session, and h2load driving its Execute at 16 calls in flight
(2 connections x 8 streams) while `py-spy record` samples the server process (its
threads, the gRPC core's included, and native frames where py-spy can read them). The
first second of load is left out of the profile, as h2load's warm-up is of its count.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from google.protobuf.struct_pb2 import Struct

from bench.server import ROOT, running_server
from bench.throughput import H2LOAD, SCRIPTS, SERVICE, Load, h2load
from lambda_microservice import LambdaClient
from lambda_microservice.v1 import lambda_service_pb2 as pb

SVG = ROOT / "bench" / "flame-execute.svg"


def py_spy() -> str:
    found = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(found).exists():
        raise SystemExit("bench.flame: py-spy is missing (`make venv` installs it from requirements-dev.txt)")
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="how long py-spy samples")
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples a second")
    parser.add_argument("--output", type=Path, default=SVG)
    parser.add_argument("--raw", action="store_true", help="collapsed stacks (text) instead of an SVG")
    args = parser.parse_args()
    if not Path(H2LOAD).exists():
        raise SystemExit("bench.flame: h2load is missing (`make bench` installs Debian's nghttp2-client)")
    spy = py_spy()
    with running_server() as server:
        with LambdaClient(server.target, timeout=30) as client:
            session = client.initialize("python-flame", SCRIPTS["python"])
            client.execute(session.request_id, {"n": 41})  # bind the environment first
        params = Struct()
        params.update({"n": 41})
        request = pb.ExecuteRequest(request_id=session.request_id, params=params)
        load = Load(connections=2, streams=8, seconds=args.seconds + 2)
        result: dict[str, float] = {}
        driver = threading.Thread(
            target=lambda: result.update(h2load(server, f"/{SERVICE}/Execute", request, load)), daemon=True
        )
        driver.start()
        time.sleep(1.0)  # past h2load's warm-up
        subprocess.run(
            [
                spy,
                "record",
                f"--pid={server.pid}",
                f"--duration={args.seconds:g}",
                f"--rate={args.rate}",
                "--threads",
                "--format=raw" if args.raw else "--format=flamegraph",
                f"--output={args.output}",
                "--nonblocking",
            ],
            check=True,
            timeout=args.seconds + 120,
        )
        driver.join(load.seconds + 600)
    print(
        f"flame graph: {args.output} ({args.seconds:g} s of warm Executes at {load.in_flight} in flight, "
        f"{result.get('rps', 0):.0f} req/s with py-spy sampling, {result.get('failed', 0):.0f} failed)"
    )


if __name__ == "__main__":
    main()
