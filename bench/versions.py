"""Warm Execute and Initialize in a chain of versions of the server, in one run: each change's effect.

    python -m bench.versions --label before=/work/wt/v-before/.venv/bin/python \\
        --label cache=/work/wt/v-cache/.venv/bin/python --label this=.venv/bin/python
    python -m bench.versions /path/to/other/checkout/.venv/bin/python   # "other", then "this"

Each version is a checkout's venv Python, oldest first. Each runs its own server
(`python -m lambda_server` as deployed, every sandbox layer its code has) on a database
of its own, all of them alive for the whole run. A round visits every version in turn
(the order reversed every other round, so that a drift of the machine's load favours
none), and measures on its server:

- a warm Python Execute's p50 and p99 over sequential calls (concurrency 1);
- with h2load, at 16 calls in flight (2 connections x 8 streams) then at 64 (4 x 16):
  the floor (grpc.health.v1 Check), then warm Execute, its ratio to that floor;
- Initialize of a known script at 16 in flight, its ratio to the floor at 16;
- the CPU each call cost the server, its runtime processes and PostgreSQL (every
  postgres process on the machine).

It prints the medians over the rounds per version and each version against the one
before it in the chain, and writes the report to bench/results/versions.json.

Uids: each server claims a uid range of its own (a flock per range, sandbox/uids.py), so
servers alive at once never share uids. The bench holds the first range too: a version
older than the uid ranges (before 98c4108) numbers its uids from the base, and every
other server then draws its range past it (so at most one such version in a chain).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

from google.protobuf.struct_pb2 import Struct
from grpc_health.v1 import health_pb2

from bench.latency import percentiles, timed
from bench.server import RESULTS, BenchServer
from bench.throughput import H2LOAD, LOADS, SCRIPTS, SERVICE, Load, measure
from lambda_microservice import LambdaClient
from lambda_microservice.v1 import lambda_service_pb2 as pb
from tests.support import create_database, drop_database, run_sync, server_process, with_database

ADMIN_URL = os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
UID_DIR = Path("/run/lambda-microservice/uids")
REPORT = RESULTS / "versions.json"
CPU_PARTS = ("server", "runtimes", "postgres")


@dataclass(frozen=True)
class Version:
    label: str
    python: str  # a checkout's venv Python, as given (a venv's python is a symlink: not resolved)

    @property
    def checkout(self) -> Path:
        """The checkout the venv sits in (<checkout>/.venv/bin/python)."""
        return Path(self.python).parent.parent.parent

    def commit(self) -> str:
        """The checkout's commit, with "+changes" when its work tree differs from it."""

        def git(*args: str) -> str:
            done = subprocess.run(["git", "-C", str(self.checkout), *args], capture_output=True, text=True)
            return done.stdout.strip() if done.returncode == 0 else ""

        commit = git("rev-parse", "--short", "HEAD") or "?"
        return commit + ("+changes" if git("status", "--porcelain", "--untracked-files=no") else "")


@contextmanager
def server(version: Version) -> Iterator[BenchServer]:
    """The version's `python -m lambda_server` on a throwaway database, until the block ends;
    gRPC and metrics on free ports, the version's venv first on PATH."""
    name = run_sync(create_database(ADMIN_URL))
    url = with_database(ADMIN_URL, name)
    venv_bin = str(Path(version.python).parent)
    try:
        with server_process(
            url,
            python=version.python,
            cwd=Path("/tmp"),  # not a checkout: `-m` puts the working folder first on sys.path
            PATH=f"{venv_bin}:{os.environ.get('PATH', '')}",
            VIRTUAL_ENV=str(Path(venv_bin).parent),
            REQUEST_LOGS="on",
            RATE_LIMIT_PER_MINUTE="0",
            MAX_SESSIONS_PER_OWNER="10000000",  # Initialize at saturation makes thousands a round
        ) as process:
            with LambdaClient(process.target, timeout=30) as client:  # serving, past the database's start
                until = time.monotonic() + 60
                while client.health().status != pb.HEALTH_STATUS_SERVING:
                    if time.monotonic() > until:
                        raise RuntimeError(f"{version.label}: not SERVING within 60 s")
                    time.sleep(0.2)
            yield BenchServer(process.target, process.metrics_url, process.pid, url)
    finally:
        run_sync(drop_database(ADMIN_URL, name))


@contextmanager
def first_uid_range_held() -> Iterator[None]:
    """Hold the first uid range's lock, as another server would: servers with uid ranges
    then draw theirs past the uids an older server numbers from the base up."""
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


def one_round(running: BenchServer, calls: int, seconds: float) -> tuple[dict[str, float], int]:
    """One version's measures in one round, by name; and the errors counted."""
    with LambdaClient(running.target, timeout=30) as client:
        session = client.initialize("python-versions", SCRIPTS["python"]).request_id
        timed(lambda: client.execute(session, {"n": 41}), max(1, calls // 10))  # bound, warm
        latency = percentiles(timed(lambda: client.execute(session, {"n": 41}), calls))
    found = {"p50_ms": latency["p50_ms"], "p99_ms": latency["p99_ms"]}
    params = Struct()
    params.update({"n": 41})
    execute = pb.ExecuteRequest(request_id=session, params=params)
    health = health_pb2.HealthCheckRequest()
    errors = 0

    def row(name: str, method: str, message: Any, load: Load) -> float:
        nonlocal errors
        measured = measure(running, name, method, message, load)
        errors += int(measured["errors"])
        key = f"{name}_{load.in_flight}"
        found[f"{key}_rps"] = measured["rps"]
        for part in CPU_PARTS:
            found[f"{key}_cpu_us_{part}"] = measured["cpu_us"][part]
        return float(measured["rps"])

    floors = {}
    for connections, streams in LOADS:
        load = Load(connections, streams, seconds)
        floors[load.in_flight] = row("floor", "grpc.health.v1.Health/Check", health, load)
        rps = row("execute", f"{SERVICE}/Execute", execute, load)
        found[f"execute_{load.in_flight}_ratio"] = rps / floors[load.in_flight]
    # last: its thousands of new sessions would weigh on the Executes after it
    load = Load(*LOADS[0], seconds)
    initialize = pb.InitializeRequest(language_title="python-initialize", script_content=SCRIPTS["python"])
    rps = row("initialize", f"{SERVICE}/Initialize", initialize, load)
    found[f"initialize_{load.in_flight}_ratio"] = rps / floors[load.in_flight]
    return found, errors


def medians(rounds: list[dict[str, float]]) -> dict[str, float]:
    return {name: statistics.median(found[name] for found in rounds) for name in rounds[0]}


def step(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """A version's medians as ratios to the ones of the version before it."""
    return {name: after[name] / before[name] if before[name] else float("nan") for name in after}


def print_report(report: dict[str, Any]) -> None:
    low, high = (a * b for a, b in LOADS)
    print(
        f"medians of {report['rounds']} rounds of {report['seconds']:g} s per h2load run; in flight: "
        "calls at once; x floor: to the version's own health check at that concurrency, same round"
    )
    print(
        f"{'version':>10} {'commit':>16} {f'floor@{low}':>9} {f'Execute@{low}':>10} {'x floor':>7} "
        f"{f'floor@{high}':>9} {f'Execute@{high}':>10} {'x floor':>7} {f'Init@{low}':>8} {'x floor':>7} "
        f"{'p50 ms':>7} {'p99 ms':>7} {f'CPU us an Execute@{low}:':>24} {'server':>6} {'runtimes':>8} "
        f"{'postgres':>8}"
    )
    for version in report["versions"]:
        m = version["medians"]
        print(
            f"{version['label']:>10} {version['commit']:>16} {m[f'floor_{low}_rps']:>9.0f} "
            f"{m[f'execute_{low}_rps']:>10.0f} {m[f'execute_{low}_ratio']:>7.2f} "
            f"{m[f'floor_{high}_rps']:>9.0f} {m[f'execute_{high}_rps']:>10.0f} "
            f"{m[f'execute_{high}_ratio']:>7.2f} {m[f'initialize_{low}_rps']:>8.0f} "
            f"{m[f'initialize_{low}_ratio']:>7.2f} {m['p50_ms']:>7.3f} {m['p99_ms']:>7.3f} {'':24} "
            f"{m[f'execute_{low}_cpu_us_server']:>6.0f} "
            f"{m[f'execute_{low}_cpu_us_runtimes']:>8.0f} {m[f'execute_{low}_cpu_us_postgres']:>8.0f}"
        )
    print("rounds (Execute's x floor at 16 and 64 in flight, p50 ms), for the spread:")
    for version in report["versions"]:
        by_round = (
            f"{found[f'execute_{low}_ratio']:.2f}/{found[f'execute_{high}_ratio']:.2f}/{found['p50_ms']:.2f}"
            for found in version["rounds"]
        )
        print(f"{version['label']:>10}: " + ", ".join(by_round))
    for before, after in pairwise(report["versions"]):
        a, b = before["medians"], after["medians"]
        ratio = step(a, b)
        print(
            f"{after['label']} / {before['label']}: Execute@{low} {ratio[f'execute_{low}_rps']:.2f}x "
            f"(x floor {a[f'execute_{low}_ratio']:.2f} -> {b[f'execute_{low}_ratio']:.2f}), "
            f"Execute@{high} {ratio[f'execute_{high}_rps']:.2f}x "
            f"({a[f'execute_{high}_ratio']:.2f} -> {b[f'execute_{high}_ratio']:.2f}), "
            f"Initialize@{low} {ratio[f'initialize_{low}_rps']:.2f}x "
            f"({a[f'initialize_{low}_ratio']:.2f} -> {b[f'initialize_{low}_ratio']:.2f}); "
            f"p50 {ratio['p50_ms']:.2f}x, p99 {ratio['p99_ms']:.2f}x; CPU an Execute@{low}: server "
            f"{ratio[f'execute_{low}_cpu_us_server']:.2f}x, postgres "
            f"{ratio[f'execute_{low}_cpu_us_postgres']:.2f}x"
        )
    print(f"errors: {report['errors']}")


def chain(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[Version]:
    if args.other_python and args.label:
        parser.error("either one other Python or --label LABEL=PYTHON for each version, not both")
    if args.other_python:
        return [Version("other", args.other_python), Version("this", sys.executable)]
    versions = []
    for given in args.label or []:
        label, _, python = given.partition("=")
        if not (label and python):
            parser.error(f"--label {given!r}: LABEL=PYTHON")
        if not os.access(python, os.X_OK):
            parser.error(f"--label {given!r}: {python} is not an executable")
        versions.append(Version(label, os.path.abspath(python)))
    if len(versions) < 2:
        parser.error("a chain is two versions or more: --label LABEL=PYTHON, oldest first")
    if len({version.label for version in versions}) < len(versions):
        parser.error("every version needs a label of its own")
    return versions


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.versions",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("other_python", nargs="?", help="another checkout's venv Python (against this one)")
    parser.add_argument(
        "--label",
        action="append",
        metavar="LABEL=PYTHON",
        help="a version of the chain, oldest first: its label and its checkout's venv Python",
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=1000, help="sequential Executes for p50 and p99")
    parser.add_argument("--seconds", type=float, default=4.0, help="each h2load run, after 1 s of warm-up")
    args = parser.parse_args()
    versions = chain(parser, args)
    if not Path(H2LOAD).exists():
        raise SystemExit("bench.versions: h2load is missing (`make bench` installs Debian's nghttp2-client)")
    rounds: dict[str, list[dict[str, float]]] = {version.label: [] for version in versions}
    errors = 0
    with ExitStack() as stack:
        stack.enter_context(first_uid_range_held())
        servers = {version.label: stack.enter_context(server(version)) for version in versions}
        for index in range(args.rounds):
            for version in versions if index % 2 == 0 else versions[::-1]:
                found, failed = one_round(servers[version.label], args.calls, args.seconds)
                rounds[version.label].append(found)
                errors += failed
    report = {
        "rounds": args.rounds,
        "seconds": args.seconds,
        "calls": args.calls,
        "in_flight": [connections * streams for connections, streams in LOADS],
        "errors": errors,
        "versions": [
            {
                "label": version.label,
                "python": version.python,
                "commit": version.commit(),
                "medians": medians(rounds[version.label]),
                "rounds": rounds[version.label],
            }
            for version in versions
        ],
    }
    report["steps"] = [
        {"from": before["label"], "to": after["label"], "ratios": step(before["medians"], after["medians"])}
        for before, after in pairwise(report["versions"])
    ]
    RESULTS.mkdir(parents=True, exist_ok=True)
    REPORT.write_text(json.dumps(report, indent=2))
    print_report(report)
    print(f"report: {REPORT.relative_to(RESULTS.parent.parent)}")
    sys.exit(1 if errors else 0)


if __name__ == "__main__":
    main()
