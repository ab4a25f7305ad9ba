"""Issue 14, findings 2, 3 and 11: script checks and Rust compiles are shared fairly by owners,
each bounded, and what a script makes costs its owner, not the next tenant.

Two owners (AUTH_MODE=jwt, two subjects): an attacker, and a victim measured during the attack.
"""

from __future__ import annotations

import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import jwt
import pytest

from lambda_microservice import LambdaClient, LambdaError, to_python
from lambda_server.config import AuthSettings, Settings
from tests.support import (
    IdleCpu,
    ServerThread,
    assert_p99_within,
    descendants,
    eventually,
    p99,
    run_sync,
    server_settings,
)

SECRET = "a-test-secret-of-at-least-32-bytes!!"
# CPython 3.11 compiles f-string fields in quadratic time: 100,000 take several seconds
# on an idle core, far past the SCRIPT_CHECK_TIMEOUT_SECONDS these tests set.
F_STRING_BOMB = "x = f'" + "{a}" * 100_000 + "'"
# 1 MB of nested lists takes about 370 MB to compile: past the checker's 256 MiB
MEMORY_BOMB = "x = [" + "[1]," * 250_000 + "]"
RUST_TRIVIAL = (
    "use serde_json::Value;\npub fn handler(_e: Value) -> Result<Value, String> {{ Ok(Value::from({})) }}\n"
)
# a constant whose evaluation never ends: rustc's long_running_const_eval lint ends it
CONST_LOOP = (
    "use serde_json::Value;\n"
    "pub const X: u64 = {{ let mut i = {}u64; loop {{ i += 1; }} }};\n"
    "pub fn handler(_e: Value) -> Result<Value, String> {{ Ok(Value::from(X)) }}\n"
)
# forty constants just under the lint's step bound: a compile of a minute or more
SLOW = "".join(
    f"pub const C{i}: u64 = {{ let mut s = {i}u64; let mut i = 0u64; "
    f"while i < 400000 {{ s = s.wrapping_mul(31).wrapping_add(i); i += 1; }} s }};\n"
    for i in range(40)
) + RUST_TRIVIAL.format(0)


def bearer(sub: str) -> str:
    payload = {"sub": sub, "scope": "execute:all read:functions", "exp": int(time.time()) + 3600}
    return jwt.encode(payload, SECRET, algorithm="HS256")


def client_of(server: ServerThread, sub: str, timeout: float = 60.0) -> LambdaClient:
    return LambdaClient(
        server.target, timeout=timeout, metadata=(("authorization", f"Bearer {bearer(sub)}"),)
    )


def fair_settings(cache: Path | None = None, **runtime: Any) -> Settings:
    """Two owners by JWT subject, no rate limits, no pre-started environments."""
    base = server_settings()
    auth = AuthSettings(
        mode="jwt", jwt_secret=SECRET, rate_limit_per_minute=0, initialize_rate_limit_per_minute=0
    )
    if cache is not None:
        runtime["rust_cache_dir"] = cache
    return replace(base, auth=auth, runtime=replace(base.runtime, prewarm_per_runtime=0, **runtime))


def timed(call: Callable[[], object]) -> float:
    started = time.monotonic()
    call()
    return time.monotonic() - started


class Attempt(threading.Thread):
    """A call in a thread of its own; `error` or `result`, and when it ended."""

    def __init__(self, call: Callable[[], Any]) -> None:
        super().__init__(daemon=True)
        self._call = call
        self.result: Any = None
        self.error: LambdaError | None = None
        self.ended = 0.0

    def run(self) -> None:
        try:
            self.result = self._call()
        except LambdaError as exc:
            self.error = exc
        self.ended = time.monotonic()


def started(call: Callable[[], Any]) -> Attempt:
    attempt = Attempt(call)
    attempt.start()
    return attempt


def limit_exceeded(attempt: Attempt, limit: str) -> bool:
    error = attempt.error
    return (
        error is not None
        and error.code == grpc.StatusCode.INVALID_ARGUMENT
        and error.reason == "SCRIPT_LIMIT_EXCEEDED"
        and error.metadata.get("limit") == limit
    )


# finding 2: the Python checker


@pytest.fixture(scope="module")
def checks_server(database_url: str) -> Iterator[ServerThread]:
    settings = fair_settings(check_timeout_seconds=2.0, checkers=2, checks_per_owner=1)
    running = ServerThread(settings, database_url)
    yield running
    running.stop()


def test_a_check_past_its_time_is_the_scripts_fault_and_another_owner_is_served_meanwhile(
    checks_server: ServerThread,
) -> None:
    with client_of(checks_server, "attacker") as attacker, client_of(checks_server, "victim") as victim:
        n = iter(range(10**6))  # distinct scripts: each is checked, none passes as known
        with IdleCpu() as idle:
            alone = [
                timed(lambda: victim.initialize("python-victim", f"result = {next(n)}")) for _ in range(200)
            ]
        bombs = [
            started(lambda s=s: attacker.initialize("python-bomb", f"{F_STRING_BOMB}\n# {s}")) for s in "ab"
        ]
        during = []
        while any(bomb.is_alive() for bomb in bombs):
            during.append(timed(lambda: victim.initialize("python-victim", f"result = {next(n)}")))
        for bomb in bombs:
            bomb.join()
            assert limit_exceeded(bomb, "SCRIPT_CHECK_TIMEOUT_SECONDS"), bomb.error
        assert len(during) >= 10, during  # the victim was served all along
        after = [timed(lambda: victim.initialize("python-victim", f"result = {next(n)}")) for _ in range(200)]
        assert_p99_within([p99(alone), p99(after)], [p99(during)], idle.fraction)


def test_a_check_past_the_checkers_memory_is_the_scripts_fault(checks_server: ServerThread) -> None:
    with client_of(checks_server, "attacker") as attacker, client_of(checks_server, "victim") as victim:
        bomb = Attempt(lambda: attacker.initialize("python-bomb", MEMORY_BOMB))
        bomb.run()
        assert limit_exceeded(bomb, "SANDBOX_MEMORY_MB"), bomb.error
        assert victim.initialize("python-victim", "result = 'after the memory bomb'").request_id


# findings 3 and 11: Rust compiles and programs


@pytest.fixture(scope="module")
def built(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The suite's build of the crates (made by a server, once), to copy into private caches."""
    server = ServerThread(server_settings(), database_url)
    try:
        with LambdaClient(server.target, timeout=30) as client:
            eventually(
                lambda: "crates: ready" in client.health().components["runtime.rust"],
                timeout=600,
                interval=0.5,
                message=lambda: client.health().components["runtime.rust"],
            )
    finally:
        server.stop()
    return server_settings().runtime.rust_cache_dir


def private_cache(built: Path, factory: pytest.TempPathFactory) -> Path:
    """A cache of the test's own (its programs are swept here), under /tmp where the jail sees it."""
    cache = factory.mktemp("rust-fair")
    for dependencies in built.glob("deps-*"):
        shutil.copytree(dependencies, cache / dependencies.name)
    return cache


def rust_server(
    built: Path, factory: pytest.TempPathFactory, database_url: str, **runtime: Any
) -> ServerThread:
    return ServerThread(fair_settings(private_cache(built, factory), **runtime), database_url)


def rustc_runs() -> bool:
    """Whether a rustc runs below this process: a compile that holds its slot (rustc starts
    only once the slot is taken), the servers' crates being built already (crates_ready)."""
    for pid in descendants():
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() == "rustc":
                return True
        except OSError:  # ended meanwhile
            continue
    return False


def crates_ready(client: LambdaClient) -> bool:
    return "crates: ready" in client.health().components["runtime.rust"]


def compile_holds_its_slot(compile: Attempt) -> None:
    """Wait until `compile` (just started) holds its compile slot: its rustc runs. Auth, the
    session's insert and the lookup before the slot take seconds on a busy machine."""
    eventually(lambda: rustc_runs() or not compile.is_alive(), timeout=60)
    assert compile.is_alive(), compile.error  # still compiling, its slot held


def stored(url: str, script: str) -> bool:
    """Whether a session of `script` is stored (Initialize stores it pending, then compiles)."""

    async def read() -> bool:
        conn = await asyncpg.connect(url, timeout=10)
        try:
            query = "SELECT count(*) FROM meta.sessions WHERE script_content = $1"
            return bool(await conn.fetchval(query, script))
        finally:
            await conn.close()

    return run_sync(read())


def test_a_never_ending_constant_fails_fast_and_another_owner_compiles(
    built: Path, tmp_path_factory: pytest.TempPathFactory, database_url: str
) -> None:
    limit = 60.0
    server = rust_server(built, tmp_path_factory, database_url, compile_timeout_seconds=limit)
    try:
        with client_of(server, "attacker") as attacker, client_of(server, "victim", limit / 2) as victim:
            loops = [
                started(lambda s=s: attacker.initialize("rust-loop", CONST_LOOP.format(s))) for s in (1, 2)
            ]
            assert (
                to_python(
                    victim.execute(victim.initialize("rust-v", RUST_TRIVIAL.format(7)).request_id).result
                )
                == 7
            )
            for loop in loops:
                loop.join()
                assert loop.error is not None and loop.error.code == grpc.StatusCode.INVALID_ARGUMENT
                assert (
                    "constant evaluation is taking a long time" in loop.error.message
                )  # the lint, not the limit
            allowing = "#[allow(long_running_const_eval)]\n" + CONST_LOOP.format(3)
            with pytest.raises(LambdaError) as refused:
                attacker.initialize("rust-allow", allowing)
            assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
            assert refused.value.metadata.get("line") == "1"
    finally:
        server.stop()


def test_an_owners_compiles_beyond_its_share_wait_and_then_are_refused_with_a_retry_time(
    built: Path, tmp_path_factory: pytest.TempPathFactory, database_url: str
) -> None:
    """Two slots, one an owner's: the attacker's second compile waits for its own first, and is
    refused past RUST_COMPILE_QUEUE_TIMEOUT_SECONDS, while the victim compiles on the other slot."""
    settings = {"compile_slots": 2, "compiles_per_owner": 1, "compile_queue_timeout_seconds": 2.0}
    server = rust_server(built, tmp_path_factory, database_url, compile_timeout_seconds=60.0, **settings)
    slow = None
    try:
        with client_of(server, "attacker") as attacker, client_of(server, "victim") as victim:
            eventually(lambda: crates_ready(victim), timeout=60)  # no rustc but the compiles'
            slow = started(lambda: attacker.initialize("rust-slow", SLOW))
            compile_holds_its_slot(slow)  # the slow compile holds the attacker's one slot
            second = Attempt(lambda: attacker.initialize("rust-second", RUST_TRIVIAL.format(2)))
            second.run()
            assert second.error is not None and second.error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert second.error.reason == "QUOTA_EXCEEDED" and second.error.retry_after
            assert second.error.metadata.get("limit") == "RUST_COMPILES_PER_OWNER"
            assert victim.initialize("rust-v", RUST_TRIVIAL.format(3)).request_id
            assert slow.is_alive()  # served while the attacker's compile still held its slot
    finally:
        server.stop()  # the slow compile ends with its call
        if slow is not None:
            slow.join()


def test_a_freed_compile_slot_goes_to_the_owner_served_least_recently(
    built: Path, tmp_path_factory: pytest.TempPathFactory, database_url: str
) -> None:
    """One slot: the attacker's slow compile holds it, its second compile queues, then the
    victim's; when the slot frees, the victim's goes first (round robin by owner, not FIFO)."""
    settings = {"compile_slots": 1, "compiles_per_owner": 1, "compile_queue_timeout_seconds": 60.0}
    server = rust_server(built, tmp_path_factory, database_url, compile_timeout_seconds=4.0, **settings)
    try:
        with client_of(server, "attacker") as attacker, client_of(server, "victim") as victim:
            eventually(lambda: crates_ready(victim), timeout=60)  # no rustc but the compiles'
            slow = started(lambda: attacker.initialize("rust-slow", SLOW.replace("C0", "D0")))
            compile_holds_its_slot(slow)
            second_script = RUST_TRIVIAL.format(4) + f"// {uuid.uuid4()}\n"
            second = started(lambda: attacker.initialize("rust-second", second_script))
            # stored: past auth and the insert, one lookup before it queues for the slot. Were
            # it to queue after the victim's anyway, the victim's would still go first: this
            # only makes the run tell round robin from FIFO, it never fails a right one
            eventually(lambda: stored(database_url, second_script), timeout=30)
            served = started(lambda: victim.initialize("rust-v", RUST_TRIVIAL.format(5)))
            for attempt in (slow, second, served):
                attempt.join()
            assert limit_exceeded(slow, "RUST_COMPILE_TIMEOUT_SECONDS"), slow.error
            assert second.error is None and served.error is None, (second.error, served.error)
            assert served.ended < second.ended
    finally:
        server.stop()


@pytest.mark.parametrize("megabytes", [3.5, 16])
def test_a_program_past_its_size_limit_is_refused_and_another_owner_compiles(
    built: Path, tmp_path_factory: pytest.TempPathFactory, database_url: str, megabytes: float
) -> None:
    """RUST_MAX_PROGRAM_BYTES of 4 MiB (programs here are about 1 MB): a program just past it
    is measured, one far past it is cut as it is written (RLIMIT_FSIZE)."""
    server = rust_server(built, tmp_path_factory, database_url, max_program_bytes=4 << 20)
    size = int(megabytes * (1 << 20))
    big = f"static BIG: [u8; {size}] = [7u8; {size}];\n" + RUST_TRIVIAL.format("BIG[12345]")
    try:
        with client_of(server, "attacker") as attacker, client_of(server, "victim") as victim:
            attempt = Attempt(lambda: attacker.initialize("rust-big", big))
            attempt.run()
            assert limit_exceeded(attempt, "RUST_MAX_PROGRAM_BYTES"), attempt.error
            assert (
                to_python(
                    victim.execute(victim.initialize("rust-v", RUST_TRIVIAL.format(8)).request_id).result
                )
                == 8
            )
    finally:
        server.stop()


def test_unused_old_programs_are_removed_here_and_from_the_database(
    built: Path, tmp_path_factory: pytest.TempPathFactory, fresh_database: str
) -> None:
    cache = private_cache(built, tmp_path_factory)
    settings = fair_settings(cache, artifact_retention_seconds=0.0)
    server = ServerThread(replace(settings, cleanup_interval_seconds=0.5), fresh_database)
    programs = cache / "programs"
    try:
        with client_of(server, "owner") as client:
            kept = client.initialize("rust-kept", RUST_TRIVIAL.format(10))
            dropped = client.initialize("rust-dropped", RUST_TRIVIAL.format(11))
            hashes = {s.request_id: stored_hash(fresh_database, s.request_id) for s in (kept, dropped)}
            run_sync(expire(fresh_database, dropped.request_id))

            def programs_of(request_id: str) -> tuple[int, int]:
                local = len(list(programs.glob(f"{hashes[request_id]}-*")))
                return local, run_sync(artifact_rows(fresh_database, hashes[request_id]))

            eventually(lambda: programs_of(dropped.request_id) == (0, 0), timeout=30, message=lambda: "kept")
            assert programs_of(kept.request_id) == (1, 1)
            assert to_python(client.execute(kept.request_id).result) == 10
    finally:
        server.stop()


def stored_hash(url: str, request_id: str) -> str:
    async def read() -> str:
        conn = await asyncpg.connect(url)
        try:
            return str(
                await conn.fetchval(
                    "SELECT script_hash FROM meta.sessions WHERE request_id = $1::uuid", request_id
                )
            )
        finally:
            await conn.close()

    return run_sync(read())


async def expire(url: str, request_id: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(
            "UPDATE meta.sessions SET expires_at = now() - interval '1 second' WHERE request_id = $1::uuid",
            request_id,
        )
    finally:
        await conn.close()


async def artifact_rows(url: str, script_hash: str) -> int:
    conn = await asyncpg.connect(url)
    try:
        return int(
            await conn.fetchval("SELECT count(*) FROM meta.artifacts WHERE script_hash = $1", script_hash)
        )
    finally:
        await conn.close()
