"""Warm Execute in two versions of the server, in one run: this checkout's against another's.

    python -m bench.versions /path/to/other/checkout/.venv/bin/python [--rounds 5]

Each server runs as `python -m lambda_server` (the other checkout's with its own venv's
Python) on a database of its own, with every sandbox layer its code has. Rounds visit
both in turn: a warm Python Execute's p50 over sequential calls (concurrency 1), then
h2load's throughput at 16 calls in flight, with the CPU an Execute costs the server and
PostgreSQL (every postgres process on the machine); medians over the rounds, and this checkout's
as a ratio to the other's. The other server runs with uids of its own: this one is made
to claim a uid range past the one the other's code numbers from.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from google.protobuf.struct_pb2 import Struct

from bench.latency import timed
from bench.server import BenchServer
from bench.throughput import SCRIPTS, SERVICE, Load, measure
from lambda_microservice import LambdaClient
from lambda_microservice.v1 import lambda_service_pb2 as pb
from tests.support import create_database, drop_database, port_answers, run_sync, with_database

ADMIN_URL = os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
UID_DIR = Path("/run/lambda-microservice/uids")


@contextmanager
def server(python: str, port: int, metrics_port: int) -> Iterator[BenchServer]:
    """`python -m lambda_server` on a throwaway database, until the block ends."""
    name = run_sync(create_database(ADMIN_URL))
    url = with_database(ADMIN_URL, name)
    env = {
        **os.environ,
        "DATABASE_URL": url,
        "LISTEN_ADDR": f"127.0.0.1:{port}",
        "METRICS_ADDR": f"127.0.0.1:{metrics_port}",
        "REQUEST_LOGS": "on",
        "LOG_LEVEL": "WARNING",
        "RATE_LIMIT_PER_MINUTE": "0",
    }
    process = subprocess.Popen([python, "-m", "lambda_server"], env=env, cwd="/tmp")
    try:
        until = time.monotonic() + 120
        while not port_answers("127.0.0.1", port):
            if process.poll() is not None or time.monotonic() > until:
                raise RuntimeError(f"{python} -m lambda_server did not start")
            time.sleep(0.2)
        target = f"127.0.0.1:{port}"
        with LambdaClient(target, timeout=30) as client:  # serving, past the database's start
            until = time.monotonic() + 60
            while client.health().status != pb.HEALTH_STATUS_SERVING:
                if time.monotonic() > until:
                    raise RuntimeError("not SERVING within 60 s")
                time.sleep(0.2)
        yield BenchServer(target, f"http://127.0.0.1:{metrics_port}/metrics", process.pid, url)
    finally:
        process.terminate()
        process.wait(30)
        run_sync(drop_database(ADMIN_URL, name))


@contextmanager
def first_uid_range_held() -> Iterator[None]:
    """Hold the first uid range's lock, as another server would: this checkout's server
    then draws its uids past the ones an older server numbers from the base up."""
    UID_DIR.mkdir(parents=True, exist_ok=True)
    fd = os.open(UID_DIR / "100000.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # another server holds it already: as good
            pass
        yield
    finally:
        os.close(fd)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("other_python", help="the other checkout's venv Python")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=4.0)
    args = parser.parse_args()
    load = Load(connections=2, streams=8, seconds=args.seconds)
    pythons = {"other": args.other_python, "this": sys.executable}
    p50: dict[str, list[float]] = {name: [] for name in pythons}
    rps: dict[str, list[float]] = {name: [] for name in pythons}
    cpu: dict[str, dict[str, list[float]]] = {
        part: {name: [] for name in pythons} for part in ("server", "postgres")
    }
    failed = 0
    with ExitStack() as stack:
        stack.enter_context(first_uid_range_held())
        servers = {
            name: stack.enter_context(server(python, 50071 + i, 9191 + i))
            for i, (name, python) in enumerate(pythons.items())
        }
        sessions = {}
        for name, running in servers.items():
            with LambdaClient(running.target, timeout=30) as client:
                sessions[name] = client.initialize("python-versions", SCRIPTS["python"]).request_id
        for _ in range(args.rounds):
            for name, running in servers.items():
                request_id = sessions[name]
                with LambdaClient(running.target, timeout=30) as client:
                    timed(lambda r=request_id: client.execute(r, {"n": 41}), args.calls // 10)
                    samples = timed(lambda r=request_id: client.execute(r, {"n": 41}), args.calls)
                p50[name].append(1000 * statistics.median(samples))
                params = Struct()
                params.update({"n": 41})
                request = pb.ExecuteRequest(request_id=request_id, params=params)
                row = measure(running, "warm Execute", f"{SERVICE}/Execute", request, load)
                rps[name].append(row["rps"])
                for part in ("server", "postgres"):
                    cpu[part][name].append(row["cpu_us"][part])
                failed += int(row["errors"])
    for name in pythons:
        print(
            f"{name:>6}: warm Execute p50 {statistics.median(p50[name]):.3f} ms "
            f"{[round(x, 3) for x in p50[name]]}, throughput {statistics.median(rps[name]):.0f}/s "
            f"{[round(x) for x in rps[name]]}; CPU us an Execute: server "
            f"{statistics.median(cpu['server'][name]):.0f} {[round(x) for x in cpu['server'][name]]}, "
            f"postgres {statistics.median(cpu['postgres'][name]):.0f} "
            f"{[round(x) for x in cpu['postgres'][name]]}"
        )
    print(
        f"this/other: p50 {statistics.median(p50['this']) / statistics.median(p50['other']):.3f}x, "
        f"throughput {statistics.median(rps['this']) / statistics.median(rps['other']):.3f}x; "
        f"errors {failed}"
    )


if __name__ == "__main__":
    main()
