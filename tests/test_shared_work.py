"""Issue 15, item 6: work that callers share (a Rust compile, the crates' build, a batch of
session claims) is owned by the component that shares it: each caller waits under its own
deadline, no caller's cancellation or deadline ends another's call or the work, every
session's compile ends `success` or `error` (never `pending`), and each caller of failed
shared work gets an exception instance of its own.

The servers here have a Rust cache of their own whose crates' build the test holds back
(`Gate`), so a compile is known to be under way, not finished, when a caller leaves.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import os
import shutil
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from lambda_microservice import LambdaClient, LambdaError, to_python
from lambda_microservice.v1 import lambda_service_pb2 as pb
from lambda_microservice.v1 import lambda_service_pb2_grpc as pb_grpc
from lambda_server.config import DatabaseSettings
from lambda_server.domain import CompileStatus, Deadline, NewSession, OptimizationLevel
from lambda_server.errors import DatabaseUnavailable, ScriptLimitExceeded
from lambda_server.runtimes.rust import RustToolchain
from lambda_server.store import migrations
from lambda_server.store.artifacts import ArtifactStore
from lambda_server.store.claims import ClaimBatcher
from lambda_server.store.creates import CreateBatcher
from lambda_server.store.database import Database
from lambda_server.store.sessions import OwnerQuota, SessionStore
from lambda_server.usecases.builds import RustBuilds
from tests.support import ServerThread, eventually, health_check, run_sync, server_settings

SUM = """use serde_json::Value;

pub fn handler(event: Value) -> Result<Value, String> {
    let a = event["params"]["a"].as_i64().ok_or("a must be an integer")?;
    let b = event["params"]["b"].as_i64().ok_or("b must be an integer")?;
    Ok(Value::from(a + b))
}
"""


@pytest.fixture(scope="module")
def built(database_url: str) -> Path:
    """The suite's build of the crates (made by a server, once), to copy into private caches."""
    server = ServerThread(server_settings(), database_url)
    try:
        with LambdaClient(server.target, timeout=30) as client:
            eventually(
                # DEGRADED until the crates are built
                lambda: "crates: ready" in health_check(client, "runtime.rust").detail,
                timeout=600,
                interval=0.5,
                message=lambda: health_check(client, "runtime.rust").detail,
            )
    finally:
        server.stop()
    return server_settings().runtime.rust_cache_dir


class Gate:
    """A Rust cache of a test's own whose crates' build waits until the test opens the gate.

    The test holds the file lock that a server building the crates into a cache holds
    (runtimes/rust.py), so the server waits for that build to end, and every compile
    waits for the server's; opening the gate copies the suite's build in, then lets go.
    """

    def __init__(self, built: Path, cache: Path) -> None:
        self._built = sorted(built.glob("deps-*"))
        assert self._built, f"no build of the crates in {built}"
        self.cache = cache
        self._locks: list[int] = []
        for dependencies in self._built:
            lock = os.open(cache / f".{dependencies.name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(lock, fcntl.LOCK_EX)
            self._locks.append(lock)

    def open(self) -> None:
        for dependencies in self._built:  # under the test's /tmp: the jail must see it there
            # whole or not at all, as a build puts it in place: a server that looks (without
            # the lock) while the copy is under way must not find `ready` before the libraries
            staged = self.cache / f".{dependencies.name}-copy"
            shutil.copytree(dependencies, staged)
            staged.rename(self.cache / dependencies.name)
        self.close()

    def close(self) -> None:
        locks, self._locks = self._locks, []
        for lock in locks:
            fcntl.flock(lock, fcntl.LOCK_UN)
            os.close(lock)

    def remove_dependencies(self) -> None:
        """The crates gone from the cache: from now, a compile fails (rustc does not find it)."""
        for dependencies in self._built:
            shutil.rmtree(self.cache / dependencies.name)


@pytest.fixture
def gate(built: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gate]:
    held = Gate(built, tmp_path_factory.mktemp("rust-gated"))
    yield held
    held.close()


def gated_server(gate: Gate, database_url: str, **runtime: Any) -> ServerThread:
    settings = server_settings()
    runtime_settings = replace(settings.runtime, rust_cache_dir=gate.cache, **runtime)
    return ServerThread(replace(settings, runtime=runtime_settings), database_url)


def compile_state(database_url: str, request_id: str) -> tuple[str | None, str | None] | None:
    """meta.sessions.compile_status and compile_error of a session, None when it is not stored."""

    async def read() -> tuple[str | None, str | None] | None:
        conn = await asyncpg.connect(database_url)
        try:
            row = await conn.fetchrow(
                "SELECT compile_status, compile_error FROM meta.sessions WHERE request_id = $1", request_id
            )
            return None if row is None else (row["compile_status"], row["compile_error"])
        finally:
            await conn.close()

    return run_sync(read())


def compile_status(database_url: str, request_id: str) -> str | None:
    state = compile_state(database_url, request_id)
    return None if state is None else state[0]


def script_checks(server: ServerThread) -> dict[str, float]:
    """lambda_script_checks_total of the Rust runtime, by how: an Initialize that started a
    compile counts `compiled`, one that found the program (or joined a compile) `known`."""
    port = server.server.metrics.port
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    counts = {"compiled": 0.0, "known": 0.0}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "lambda_script_checks_total" and sample.labels.get("runtime") == "rust":
                counts[sample.labels["how"]] = sample.value
    return counts


def test_a_cancelled_caller_ends_neither_the_compile_nor_another_callers_wait(
    gate: Gate, database_url: str
) -> None:
    server = gated_server(gate, database_url)
    script = SUM.replace("a + b", "b + a")
    first, second = str(uuid.uuid4()), str(uuid.uuid4())
    try:
        with grpc.insecure_channel(server.target) as channel, LambdaClient(server.target) as client:
            stub = pb_grpc.LambdaServiceStub(channel)

            def initialize(request_id: str) -> grpc.Future:
                request = pb.InitializeRequest(
                    language_title="rust-shared", script_content=script, request_id=request_id
                )
                return stub.Initialize.future(request, timeout=170)

            leaving = initialize(first)
            eventually(lambda: compile_status(database_url, first) == "pending", timeout=30)
            staying = initialize(second)  # joins the compile the first call started
            eventually(lambda: compile_status(database_url, second) == "pending", timeout=30)
            # the compile waits for the crates, which waits for the gate: it is under way
            rust = health_check(client, "runtime.rust")
            assert rust.status == pb.COMPONENT_STATUS_DEGRADED and "building" in rust.detail, rust
            assert leaving.cancel()
            with pytest.raises(grpc.FutureCancelledError):
                leaving.result()
            gate.open()
            response = staying.result()
            assert response.request_id == second
            assert to_python(client.execute(second, {"a": 2, "b": 40}).result) == 42
        # the build, not its first caller, recorded how it ended: the leaver's session too
        assert compile_status(database_url, first) == "success"
        assert compile_status(database_url, second) == "success"
        # the second call joined the first's compile (a compile of its own would count
        # `compiled`); the first call, cancelled, counted nothing
        assert script_checks(server) == {"compiled": 0.0, "known": 1.0}
    finally:
        server.stop()


def test_a_caller_past_its_deadline_gets_deadline_exceeded_and_the_program_is_kept(
    gate: Gate, database_url: str
) -> None:
    server = gated_server(gate, database_url)
    script = SUM.replace("a + b", "a + b + 0")
    request_id = str(uuid.uuid4())
    try:
        with LambdaClient(server.target, timeout=120.0) as client:
            with pytest.raises(LambdaError) as late:
                client.initialize("rust-late", script, request_id=request_id, timeout=2.0)
            assert late.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
            assert compile_status(database_url, request_id) == "pending"
            gate.open()
            eventually(lambda: compile_status(database_url, request_id) == "success", timeout=150)
            gate.remove_dependencies()  # a compile now would fail: what follows compiles nothing
            response = client.execute(request_id, {"a": 1, "b": 2})
            assert not response.HasField("error"), response.error
            assert to_python(response.result) == 3
            again = client.initialize("rust-late", script, timeout=30.0)  # finds the program too
            assert compile_status(database_url, again.request_id) == "success"
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("runtime", "gated", "code", "message"),
    [
        # rustc past RUST_COMPILE_TIMEOUT_SECONDS: the script's fault
        ({"compile_timeout_seconds": 0.05}, False, grpc.StatusCode.INVALID_ARGUMENT, "ran past its limit"),
        # the crates not built within RUST_DEPENDENCIES_TIMEOUT_SECONDS: the service's
        (
            {"dependencies_timeout_seconds": 1.0},
            True,
            grpc.StatusCode.UNAVAILABLE,
            "RUST_DEPENDENCIES_TIMEOUT_SECONDS",
        ),
    ],
    ids=["compile-timeout", "dependencies-unavailable"],
)
def test_a_compile_that_fails_ends_its_session_in_error_with_the_message(
    gate: Gate,
    database_url: str,
    runtime: dict[str, float],
    gated: bool,
    code: grpc.StatusCode,
    message: str,
) -> None:
    if not gated:
        gate.open()
    server = gated_server(gate, database_url, **runtime)
    request_id = str(uuid.uuid4())
    try:
        with LambdaClient(server.target, timeout=120.0) as client:
            with pytest.raises(LambdaError) as failed:
                client.initialize("rust-failing", SUM.replace("a + b", "a - b"), request_id=request_id)
            assert failed.value.code == code, failed.value
            assert message in failed.value.message
        state = compile_state(database_url, request_id)
        assert state is not None
        assert state[0] == "error"
        assert state[1] is not None and message in state[1]
    finally:
        server.stop()


class HeldCompiler:
    """A compiler whose compile waits for the test, then fails: a compile two callers share."""

    def __init__(self, toolchain: RustToolchain) -> None:
        self.toolchain = toolchain
        self.release = asyncio.Event()
        self.compiles = 0

    async def compile(self, script: str, optimization: OptimizationLevel, owner: str = "") -> bytes:
        self.compiles += 1
        await self.release.wait()
        raise ScriptLimitExceeded("compilation ran past its limit", limit="RUST_COMPILE_TIMEOUT_SECONDS")

    async def close(self) -> None:
        pass


def test_each_caller_of_a_failed_compile_gets_an_error_of_its_own(
    fresh_database: str, tmp_path: Path
) -> None:
    async def body() -> None:
        db = Database(DatabaseSettings(command_timeout=5.0), fresh_database)
        await db.open()
        await migrations.apply(db, migrations.load(migrations.default_directory()))
        sessions = SessionStore(db)
        compiler = HeldCompiler(RustToolchain(version="rustc 0.0.0 (test)"))
        builds = RustBuilds(compiler, ArtifactStore(db), sessions, tmp_path)  # type: ignore[arg-type]
        try:
            ids = [str(uuid.uuid4()) for _ in range(3)]
            callers = [
                asyncio.create_task(
                    builds.compile_session(_new(i, SUM), OptimizationLevel.DEBUG, Deadline.after(60))
                )
                for i in ids
            ]
            for _ in range(200):  # every caller's session stored, and the compile started
                await asyncio.sleep(0.05)
                if compiler.compiles and [await _status(db, i) for i in ids] == ["pending"] * len(ids):
                    break
            await asyncio.sleep(0.2)  # the last session joins the compile once stored
            compiler.release.set()
            errors = await asyncio.gather(*callers, return_exceptions=True)
            assert compiler.compiles == 1  # one compile, shared
            assert all(isinstance(error, ScriptLimitExceeded) for error in errors), errors
            assert len({id(error) for error in errors}) == len(errors)
            assert {(str(e), e.message, tuple(e.metadata.items())) for e in errors} == {  # type: ignore[union-attr]
                (
                    "compilation ran past its limit",
                    "compilation ran past its limit",
                    (("limit", "RUST_COMPILE_TIMEOUT_SECONDS"),),
                )
            }
            for request_id in ids:
                assert await _status(db, request_id) == CompileStatus.ERROR.value
        finally:
            await builds.close()
            await sessions.close()
            await db.close()

    run_sync(body())


def test_each_claim_of_a_failed_batch_gets_an_error_of_its_own() -> None:
    async def body() -> None:
        # nothing listens on port 1: the batch's statement fails at connect
        db = Database(
            DatabaseSettings(connect_timeout=2.0, command_timeout=2.0), "postgresql://x@127.0.0.1:1/x"
        )
        await db.open()
        batches: list[int] = []
        claims = ClaimBatcher(db, batches.append)
        try:
            waiting = [claims.claim(str(uuid.uuid4()), None, Deadline.after(10)) for _ in range(5)]
            errors = await asyncio.gather(*waiting, return_exceptions=True)
            assert batches == [5]  # one batch, one failure
            assert all(isinstance(error, DatabaseUnavailable) for error in errors), errors
            assert len({id(error) for error in errors}) == len(errors)
            assert len({error.message for error in errors}) == 1  # type: ignore[union-attr]
        finally:
            await claims.close()
            await db.close()

    run_sync(body())


def test_each_create_of_a_failed_batch_gets_an_error_of_its_own() -> None:
    async def body() -> None:
        db = Database(
            DatabaseSettings(connect_timeout=2.0, command_timeout=2.0), "postgresql://x@127.0.0.1:1/x"
        )
        await db.open()
        batches: list[int] = []
        creates = CreateBatcher(db, OwnerQuota(100, 2**30), batches.append)
        try:
            news = [replace(_new(str(uuid.uuid4()), f"fn a{i}() {{}}"), owner="user:o") for i in range(6)]
            waiting = [creates.create(new, Deadline.after(10)) for new in news]
            errors = await asyncio.gather(*waiting, return_exceptions=True)
            assert batches and max(batches) > 1  # the first alone, then the rest in a batch
            assert all(isinstance(error, DatabaseUnavailable) for error in errors), errors
            assert len({id(error) for error in errors}) == len(errors)
        finally:
            await creates.close()
            await db.close()

    run_sync(body())


def _new(request_id: str, script: str) -> NewSession:
    return NewSession(
        request_id=request_id,
        language_title="rust-held",
        user_id=None,
        context={},
        script_content=script,
        script_hash=hashlib.sha256(script.encode()).hexdigest(),
        expiry_seconds=600,
    )


async def _status(db: Database, request_id: str) -> str | None:
    row = await db.fetchrow(
        Deadline.after(5), "SELECT compile_status FROM meta.sessions WHERE request_id = $1", request_id
    )
    return None if row is None else str(row["compile_status"])
