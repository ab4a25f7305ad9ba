"""Test helpers: the PostgreSQL to test against, a server on port 0 in a thread, polling."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import grpc
from google.rpc import error_details_pb2, status_pb2
from prometheus_client.parser import text_string_to_metric_families

from lambda_microservice import LambdaClient, PackageIndexUnavailableError, to_python
from lambda_server.app import Server, build_server, new_event_loop
from lambda_server.config import DatabaseSettings, RuntimeSettings, Settings

ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")


def eventually(
    check: Callable[[], T],
    timeout: float = 10.0,
    interval: float = 0.05,
    message: Callable[[], str] = lambda: "",
) -> T:
    """Call `check` until it returns a truthy value without raising; fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = check()
            if value:
                return value
            error: BaseException | None = None
        except Exception as exc:
            error = exc
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout} s: {error!r} {message()}") from error
        time.sleep(interval)


def port_answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def with_database(url: str, name: str) -> str:
    """`url` pointing at database `name` (the path of a URL, or dbname for a socket URL)."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{name}"))


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


async def _fetchval(url: str, query: str, *args: Any) -> Any:
    conn = await asyncpg.connect(url, timeout=5)
    try:
        return await conn.fetchval(query, *args)
    finally:
        await conn.close()


def sql(url: str, query: str, *args: Any) -> Any:
    """The first value of `query`'s first row, on a connection of its own."""
    return run_sync(_fetchval(url, query, *args))


def move_expiry(url: str, request_id: str, interval: str) -> None:
    """Set the session's expires_at to PostgreSQL's now() plus `interval` (negative: past):
    a session expired, or about to, without waiting for it."""
    query = "UPDATE meta.sessions SET expires_at = now() + $2::text::interval WHERE request_id = $1::uuid"
    sql(url, query, request_id, interval)


async def create_database(admin_url: str) -> str:
    name = f"lambda_test_{uuid.uuid4().hex[:10]}"
    conn = await asyncpg.connect(admin_url, timeout=10)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return name


async def drop_database(admin_url: str, name: str) -> None:
    conn = await asyncpg.connect(admin_url, timeout=10)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


def server_settings(**overrides: Any) -> Settings:
    """Settings for a test server: port 0, short bounds so failures show fast."""
    database = DatabaseSettings(connect_timeout=2.0, command_timeout=2.0, statement_timeout_ms=2000)
    runtime = RuntimeSettings(timeout_seconds=5.0)
    settings = Settings(
        listen_addr="127.0.0.1:0",
        metrics_addr="127.0.0.1:0",
        http_addr="127.0.0.1:0",
        shutdown_grace_seconds=1.0,
        health_interval_seconds=0.2,
        database=database,
        runtime=runtime,
    )
    return replace(settings, **overrides)


def serving_before_the_database(settings: Settings) -> Settings:
    """`settings` with DATABASE_STARTUP_TIMEOUT_SECONDS=0: the server serves at once,
    NOT_SERVING until PostgreSQL answers, instead of waiting for it at start."""
    return replace(settings, database=replace(settings.database, startup_timeout=0.0))


class ServerThread:
    """A real server on its own event loop in a background thread, as in production."""

    def __init__(self, settings: Settings, database_url: str) -> None:
        self.loop = new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="server", daemon=True)
        self.thread.start()
        self.server: Server
        self.server, self.port = self.call(build_server(settings, database_url))
        self.call(self.server.start())

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def http_url(self) -> str:
        """The HTTP/JSON API's base URL (the server's HTTP_ADDR is on port 0)."""
        return f"http://127.0.0.1:{self.server.http_port}"

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self, grace: float = 1.0) -> None:
        try:
            self.call(self.server.stop(grace))
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()


def descendants(root: int | None = None) -> set[int]:
    """The live (non-zombie) processes below `root` (this process by default).

    Tests run the server in this process, so these are its environments: each
    is an `unshare` parent and the runtime in its namespaces.
    """
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            parents[int(stat.parent.name)] = int(fields[1])
    found: set[int] = set()
    frontier = {os.getpid() if root is None else root}
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def process_of(uid: int) -> int:
    """The host pid of this server's environment running as `uid` (its runtime: the
    process with the most threads, should the script have left another). Other servers
    on this machine may number their uids alike: only this process's descendants count."""
    found = []
    for pid in descendants():
        try:
            text = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
        if int(fields["Uid"].split()[0]) == uid:
            found.append((int(fields["Threads"]), pid))
    assert found, f"no process runs as uid {uid}"
    return max(found)[1]


def cgroup_file(pid: int, controller: str, name: str) -> Path:
    """A file of the process's own group of `controller` (v1), or of its v2 group."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controller in controllers.split(","):
            return Path("/sys/fs/cgroup") / controller / path.lstrip("/") / name
        if controllers == "" and Path("/sys/fs/cgroup/cgroup.controllers").exists():
            return Path("/sys/fs/cgroup") / path.lstrip("/") / name
    raise AssertionError(f"pid {pid} is in no {controller} group")


def frozen(pid: int) -> bool:
    """Whether the freezer group of the process (v1 `freezer.state`, v2 `cgroup.events`)
    says its tasks are frozen."""
    if Path("/sys/fs/cgroup/cgroup.controllers").exists():
        return "frozen 1" in cgroup_file(pid, "", "cgroup.events").read_text().splitlines()
    return cgroup_file(pid, "freezer", "freezer.state").read_text().strip() == "FROZEN"


def metric_value(metrics_url: str, name: str, **labels: str) -> float:
    """One sample of a server's /metrics (0 when it has none yet)."""
    with urllib.request.urlopen(metrics_url, timeout=10) as answer:
        text = answer.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return 0.0


def quiet_descendants(settle: float = 0.3) -> set[int]:
    """descendants(), once no process has come or gone for `settle` seconds.

    Other tests' servers run in this process and may still be starting or
    ending environments; a snapshot taken while they do would mislead.
    """

    def stable() -> tuple[set[int]] | None:  # a tuple: an empty set is a fine answer
        first = descendants()
        time.sleep(settle)
        return (first,) if descendants() == first else None

    return eventually(stable, timeout=15)[0]


def health_check(client: Any, name: str) -> Any:
    """The component `name` of Health's structured checks (a ComponentHealth)."""
    checks = {check.name: check for check in client.health().checks}
    return checks[name]


def pool_counts(client: Any, runtime: str) -> dict[str, int]:
    """warm, busy and idle of a runtime, from the Health checks."""
    return dict(health_check(client, f"runtime.{runtime}").counts)


def settled(client: Any) -> bool:
    """Every runtime has its pre-started processes and nothing is running."""
    counts = [pool_counts(client, runtime) for runtime in ("python", "nodejs")]
    return all(c["warm"] == 2 and c["busy"] == 0 for c in counts)


def env_without_database() -> dict[str, str]:
    """This process's environment for a server of its own: no DATABASE_URL, and the
    metrics endpoint on a free port so that servers never compete for one."""
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    env["METRICS_ADDR"] = "127.0.0.1:0"
    env["HTTP_ADDR"] = "127.0.0.1:0"
    return env


# Requests written straight on the wire, past what a generated client would send.


def wire_field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field."""
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def nested_execute_request(request_id: str, depth: int) -> bytes:
    """An ExecuteRequest whose params are {"x": {"a": {"a": ...}}}, `depth` objects deep."""
    value = b""
    for _ in range(depth):
        entry = wire_field(1, b"a") + wire_field(2, value)  # map entry: key, value
        value = wire_field(5, wire_field(1, entry))  # Value.struct_value.fields
    params = wire_field(1, wire_field(1, b"x") + wire_field(2, value))
    return wire_field(1, request_id.encode()) + wire_field(2, params)


def raw_execute_error(target: str, body: bytes) -> grpc.RpcError:
    """The error a raw Execute call with `body` ends in (AssertionError if it succeeds)."""
    with grpc.insecure_channel(target) as channel:
        execute = channel.unary_unary(
            "/lambda_microservice.v1.LambdaService/Execute",
            request_serializer=lambda raw: raw,
            response_deserializer=lambda raw: raw,
        )
        try:
            execute(body, timeout=10)
        except grpc.RpcError as error:
            return error
    raise AssertionError("the call succeeded")


def varint(n: int) -> bytes:
    """A protobuf base-128 varint."""
    out = b""
    while True:
        low, n = n & 0x7F, n >> 7
        if not n:
            return out + bytes([low])
        out += bytes([low | 0x80])


BUF = ROOT / ".tools" / "node_modules" / ".bin" / "buf"


def buf_curl(target: str, method: str, body: dict[str, Any]) -> dict[str, Any]:
    """Call `lambda_microservice.v1.LambdaService/<method>` with `buf curl`, as the README does."""
    assert BUF.exists(), "buf is installed by `make lint`"
    result = subprocess.run(
        [
            str(BUF),
            "curl",
            "--protocol",
            "grpc",
            "--http2-prior-knowledge",
            "-d",
            json.dumps(body),
            f"http://{target}/lambda_microservice.v1.LambdaService/{method}",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    answer: dict[str, Any] = json.loads(result.stdout)
    return answer


class ServerProcess:
    """`python -m lambda_server` in a process of its own, as deployed, its stderr kept in `lines`."""

    def __init__(
        self, process: subprocess.Popen[str], target: str, metrics_url: str, lines: list[str]
    ) -> None:
        self.process = process
        self.target = target  # host:port of its gRPC server
        self.metrics_url = metrics_url
        self.pid = process.pid
        self.lines = lines
        # keep reading its log, or a full pipe would stall the server
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line)

    def stop(self) -> int:
        """SIGTERM, wait for the exit (SIGKILL past a minute); the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait(10)
        self._reader.join(10)  # it ends at the log's end, once the process is gone
        if self.process.stderr is not None:
            self.process.stderr.close()
        return code


@contextmanager
def server_process(
    database_url: str, *, python: str = sys.executable, cwd: Path = ROOT, **env_overrides: str
) -> Iterator[ServerProcess]:
    """The server as its own process on `database_url` with the default settings (anonymous
    callers unlimited), once it serves; stopped at the end. LOG_LEVEL must stay INFO or
    below: its start-up lines are read. `python`: another checkout's venv Python runs its
    own server (bench.versions)."""
    env = {
        **env_without_database(),
        "DATABASE_URL": database_url,
        "LISTEN_ADDR": "127.0.0.1:0",
        "LOG_LEVEL": "INFO",
        "LOG_FORMAT": "text",
        **env_overrides,
    }
    process = subprocess.Popen(
        [python, "-m", "lambda_server"],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        cwd=cwd,
    )
    try:
        assert process.stderr is not None
        metrics_url = ""
        lines: list[str] = []
        for line in process.stderr:  # text or JSON lines alike
            lines.append(line)
            found = re.search(r'metrics at (http://[^\s"]+)', line)
            if found:
                metrics_url = found.group(1)
            match = re.search(r"serving \S+ on ([^\s\"]+:\d+)", line)
            if match:
                break
        else:
            raise RuntimeError("the server exited before serving:\n" + "".join(lines[-20:]))
    except BaseException:
        process.kill()
        process.wait(10)
        if process.stderr is not None:
            process.stderr.close()
        raise
    server = ServerProcess(process, match.group(1), metrics_url, lines)
    try:
        yield server
    finally:
        server.stop()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def error_info(error: grpc.RpcError) -> error_details_pb2.ErrorInfo:
    """The google.rpc.ErrorInfo detail of a refused call's status."""
    for key, value in error.trailing_metadata() or ():  # type: ignore[attr-defined]
        if key == "grpc-status-details-bin":
            for detail in status_pb2.Status.FromString(value).details:
                info = error_details_pb2.ErrorInfo()
                if detail.Unpack(info):
                    return info
    raise AssertionError("no ErrorInfo")


def p99(samples: list[float]) -> float:
    """The 99th percentile of latencies (the largest of fewer than 100)."""
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


class IdleCpu:
    """The machine's idle share of CPU time over a block (from /proc/stat): how much
    headroom a measurement had."""

    fraction = 1.0

    def __enter__(self) -> IdleCpu:
        self._start = _cpu_times()
        return self

    def __exit__(self, *exc: object) -> None:
        idle, total = (after - before for after, before in zip(_cpu_times(), self._start, strict=True))
        self.fraction = idle / total if total > 0 else 1.0


def _cpu_times() -> tuple[int, int]:
    """(idle, total) jiffies of every CPU so far."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return fields[3] + fields[4], sum(fields)


# Below this idle share while the second tenant was measured alone, the machine had no
# headroom before the attack began (other jobs on a shared CI box): any added work, fair
# or not, then lengthens every queue on it.
SATURATED = 0.05


def assert_p99_within(
    alone: list[float], during: list[float], idle: float = 1.0, factor: float = 2.0
) -> None:
    """Issue 14's measure of an attack: the second tenant's p99 under it stays within
    `factor` times its p99 alone.

    `alone` holds its p99s measured without the attack, before it and after it; the
    larger counts, since a loaded machine may have grown busier meanwhile. `during`
    holds the p99s of the windows measured while the attack went on; the best counts.
    On a loaded 2-core machine the p99 of a few hundred calls moves by up to 2x from
    one quiet window to the next, while the attacks of issue 14 moved it 3-9x in every
    window: a sustained starvation fails all of them.

    `idle` is the machine's idle share while the tenant was measured alone (IdleCpu).
    Under SATURATED the comparison is reported, not asserted: on a machine whose every
    core was busy before the attack (two CPU hogs beside the suite on 2 cores), the
    attack's own CPU, however fairly shared, lengthens every queue, and the ratio
    measures the machine, not the service. The attack's states and counts are still
    asserted by each test.
    """
    baseline, attacked = max(alone), min(during)
    print(
        f"\nsecond tenant's p99: alone {[round(1000 * a, 1) for a in alone]} ms, "
        f"under attack {[round(1000 * d, 1) for d in during]} ms; idle CPU alone {idle:.0%}"
    )
    if idle < SATURATED:
        print(f"no headroom before the attack (idle {idle:.0%} < {SATURATED:.0%}): not compared")
        return
    assert attacked <= factor * baseline, (
        f"the second tenant's p99 under attack, {1000 * attacked:.1f} ms, is over {factor:g}x "
        f"its p99 alone, {1000 * baseline:.1f} ms"
    )


def alternated_executes(one: Any, two: Any, request_id: str, calls: int) -> list[Any]:
    """The results of `calls` Executes of a session (params {"n": n}), 16 in flight, sent in
    turn to two clients (two replicas)."""
    with ThreadPoolExecutor(max_workers=16) as pool:
        return list(
            pool.map(
                lambda n: to_python((one if n % 2 else two).execute(request_id, {"n": n}).result),
                range(calls),
            )
        )


def serde_json_registry(folder: Path) -> Path:
    """A crate registry in `folder` (under /tmp, readable by the jail's uid) with the sources
    of serde_json and its dependencies only: its build is seconds where the whole set's is a
    minute, and every other crate of the set is left out (serde: serde_derive is not there)."""
    real = RuntimeSettings().rust_crate_registry
    folder.chmod(0o755)
    for name in ("serde_json", "serde", "itoa", "ryu"):
        for crate in sorted(real.glob(f"{name}-[0-9]*")):
            shutil.copytree(crate, folder / crate.name)
    return folder


class RegistryClient(LambdaClient):
    """A client for tests that reach a real package registry: an Initialize the registry did
    not answer (PACKAGE_INDEX_UNAVAILABLE, retryable by the contract: a network hiccup) is
    sent again, twice, 5 s apart. Every other answer is the test's to judge."""

    def initialize(self, *args: Any, **kwargs: Any) -> Any:
        for attempt in range(3):
            try:
                return super().initialize(*args, **kwargs)
            except PackageIndexUnavailableError:
                if attempt == 2:
                    raise
                time.sleep(5)
        raise AssertionError("unreachable")


def once_client(target: str, timeout: float) -> LambdaClient:
    """A client whose calls are sent once: no retry on UNAVAILABLE (the channel has no
    service config), for tests that expect UNAVAILABLE and would wait out every retry."""
    return LambdaClient(target, timeout=timeout, channel=grpc.insecure_channel(target))
