"""The embedded PostgreSQL is supervised: a killed postmaster is restarted and the service
recovers by itself; when it cannot be restarted, liveness turns NOT_SERVING."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lambda_microservice import LambdaClient, to_python
from lambda_microservice.v1 import lambda_service_pb2 as pb
from lambda_microservice.v1 import lambda_service_pb2_grpc as pb_grpc
from tests.support import ServerProcess, eventually, server_process

pytestmark = pytest.mark.slow

DEADLINE = 10.0  # each call's own: a call that hangs on the dead database ends DEADLINE_EXCEEDED
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture
def data(tmp_path: Path) -> Iterator[Path]:
    """A data folder for an embedded PostgreSQL, outside pytest's temporary folders: PostgreSQL
    runs as its own user (when tests run as root), and every pytest session that starts on
    this machine makes pytest-of-<user> private again (0700), mid-test."""
    home = Path(tempfile.mkdtemp(prefix="lambda-embedded-"))
    yield home / "pgdata"
    shutil.rmtree(home, ignore_errors=True)


def postmaster(data: Path) -> int:
    """The embedded PostgreSQL's postmaster pid, from its lock file."""
    return int((data / "postmaster.pid").read_text().split("\n", 1)[0])


def runs(pid: int) -> bool:
    """Whether process `pid` runs (a zombie, dead but not reaped yet, does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def health_status(target: str, service: str) -> int:
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        status: int = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
        return status


def serves(target: str) -> bool:
    """A new session is saved and runs: PostgreSQL answers the service again."""
    with grpc.insecure_channel(target) as channel:  # no retries: the answer of this one call
        client = LambdaClient(channel=channel, timeout=5)
        session = client.initialize("python-after", "result = params['n'] * 2")
        return to_python(client.execute(session.request_id, {"n": 21}).result) == 42


class Load:
    """Callers in threads, each on a channel without retries, recording every call's status
    code and how long it took, until stopped."""

    def __init__(self, target: str, request_id: str, callers: int = 4) -> None:
        self.outcomes: list[tuple[str, grpc.StatusCode, float]] = []
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._call, args=(target, request_id, n % 2 == 0)) for n in range(callers)
        ]
        for thread in self._threads:
            thread.start()

    def _call(self, target: str, request_id: str, creates: bool) -> None:
        with grpc.insecure_channel(target) as channel:
            stub = pb_grpc.LambdaServiceStub(channel)
            while not self._stop.is_set():
                started = time.monotonic()
                try:
                    if creates:
                        stub.Initialize(
                            pb.InitializeRequest(language_title="python-load", script_content="result = 1"),
                            timeout=DEADLINE,
                        )
                    else:
                        stub.Execute(pb.ExecuteRequest(request_id=request_id), timeout=DEADLINE)
                    code = grpc.StatusCode.OK
                except grpc.RpcError as error:
                    code = error.code()
                method = "Initialize" if creates else "Execute"
                self.outcomes.append((method, code, time.monotonic() - started))
                if code != grpc.StatusCode.OK:
                    time.sleep(0.05)  # a failed call is fast: no busy loop

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(2 * DEADLINE)

    def codes(self) -> Counter[tuple[str, grpc.StatusCode]]:
        return Counter((method, code) for method, code, _ in self.outcomes)


def test_a_killed_postmaster_is_restarted_and_the_service_recovers_without_a_restart(data: Path) -> None:
    with server_process("", EMBEDDED_DATA_DIR=str(data)) as server:
        with LambdaClient(server.target, timeout=30) as client:
            kept = client.initialize("python-kept", "result = params['n'] + 1")  # committed before the kill
            assert to_python(client.execute(kept.request_id, {"n": 1}).result) == 2
        load = Load(server.target, kept.request_id)
        try:
            eventually(lambda: load.codes()[("Execute", grpc.StatusCode.OK)] > 20, timeout=30)
            killed = postmaster(data)
            os.kill(killed, signal.SIGKILL)
            killed_at = time.monotonic()
            # within 10 s a new postmaster, and the service serves on it: no restart of the server
            eventually(lambda: postmaster(data) != killed and serves(server.target), timeout=10)
            print(f"\nserving again {time.monotonic() - killed_at:.1f} s after the kill")
            served_at = len(load.outcomes)
            eventually(lambda: len(load.outcomes) > served_at + 20, timeout=30)  # the load goes on
        finally:
            load.stop()
        codes = load.codes()
        print(f"calls under load around the kill: {dict(codes)}")
        # the outage was seen, as UNAVAILABLE, and never as a hang, UNKNOWN or INTERNAL
        assert codes[("Initialize", grpc.StatusCode.UNAVAILABLE)] > 0, codes
        assert {code for _, code in codes} <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}, codes
        assert max(seconds for _, _, seconds in load.outcomes) < DEADLINE
        # the callers recovered on their own channels: each method's last call succeeded
        last = {method: code for method, code, _ in load.outcomes}
        assert last == {"Initialize": grpc.StatusCode.OK, "Execute": grpc.StatusCode.OK}, last
        assert server.process.poll() is None  # the same process serves: never restarted
        assert health_status(server.target, "liveness") == SERVING
        with LambdaClient(server.target, timeout=30) as client:
            # readiness follows at the monitor's next ping
            eventually(lambda: client.health().components["postgres"] == "ok", timeout=10)
            assert health_status(server.target, "") == SERVING
            assert to_python(client.execute(kept.request_id, {"n": 41}).result) == 42
        assert any("the embedded PostgreSQL restarted" in line for line in server.lines), server.lines[-20:]
        restarted = postmaster(data)
    # the restarted postmaster stops with the server, as the first one would have
    eventually(lambda: not (data / "postmaster.pid").exists(), timeout=30)
    assert not runs(restarted)
    assert not any("Traceback" in line for line in server.lines), "".join(server.lines)


def watch_health(server: ServerProcess, seen: list[str], stop: threading.Event) -> None:
    """The postgres component of Health, every time it changes, until `stop`."""
    with grpc.insecure_channel(server.target) as channel:
        client = LambdaClient(channel=channel, timeout=5)
        while not stop.is_set():
            try:
                text = client.health().components["postgres"]
            except grpc.RpcError:
                continue
            if not seen or seen[-1] != text:
                seen.append(text)
            time.sleep(0.05)


def test_a_postmaster_that_cannot_be_restarted_turns_liveness_not_serving(data: Path) -> None:
    moved = data.parent / "moved"
    with server_process("", EMBEDDED_DATA_DIR=str(data), EMBEDDED_RESTART_ATTEMPTS="3") as server:
        assert health_status(server.target, "liveness") == SERVING
        seen: list[str] = []
        stop = threading.Event()
        watcher = threading.Thread(target=watch_health, args=(server, seen, stop))
        watcher.start()
        try:
            killed = postmaster(data)
            data.rename(moved)  # the data folder is gone: no restart can work
            os.kill(killed, signal.SIGKILL)
            # 3 attempts, 0.5 s and 1 s apart, each failing at once: well within 30 s
            eventually(lambda: health_status(server.target, "liveness") == NOT_SERVING, timeout=30)
            assert health_status(server.target, "") == NOT_SERVING
            assert server.process.poll() is None  # the orchestrator restarts it, not itself
            eventually(lambda: seen[-1].startswith("down: not restarted in 3 attempts"), timeout=10)
            assert any(text.startswith("restarting (attempt ") for text in seen), seen
            # still trying (at the longest backoff): the folder back, it serves again, alive
            moved.rename(data)
            eventually(lambda: health_status(server.target, "liveness") == SERVING, timeout=30)
            eventually(lambda: serves(server.target), timeout=30)
        finally:
            stop.set()
            watcher.join(10)
        print("\n".join(["postgres component:", *seen]))
        assert any("liveness NOT_SERVING" in line for line in server.lines), server.lines[-20:]
    eventually(lambda: not (data / "postmaster.pid").exists(), timeout=30)
    assert not any("Traceback" in line for line in server.lines), "".join(server.lines)
