"""Rust scripts: compiled at Initialize inside the sandbox, kept by hash in PostgreSQL, run warm."""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import time
import urllib.request
from dataclasses import replace

import asyncpg
import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from lambda_microservice import InvalidArgumentError, LambdaClient, LambdaError, to_python
from lambda_microservice.v1 import lambda_service_pb2 as pb
from tests.support import ServerThread, eventually, serde_json_registry, server_settings

RUNTIME_ERROR = pb.EXECUTION_ERROR_CODE_RUNTIME_ERROR
TIMEOUT = pb.EXECUTION_ERROR_CODE_TIMEOUT
MEMORY_LIMIT = pb.EXECUTION_ERROR_CODE_MEMORY_LIMIT

SUM = """use serde_json::Value;

pub fn handler(event: Value) -> Result<Value, String> {
    let a = event["params"]["a"].as_i64().ok_or("a must be an integer")?;
    let b = event["params"]["b"].as_i64().ok_or("b must be an integer")?;
    println!("adding {} and {}", a, b);
    Ok(Value::from(a + b))
}
"""

BROKEN_ID = "00000000-0000-4000-8000-00000000e001"

MAP = """use serde_json::{Map, Value};

pub fn handler(context: Map<String, Value>) -> Result<Value, String> {
    let name = context["params"]["name"].as_str().unwrap_or("nobody");
    Ok(Value::from(format!("hello, {}", name)))
}
"""


def run(client: LambdaClient, script: str, params: dict[str, object], **kw: object) -> pb.ExecuteResponse:
    session = client.initialize("rust-test", script, timeout=120.0, **kw)  # type: ignore[arg-type]
    return client.execute(session.request_id, params, timeout=60.0)


@pytest.fixture(scope="module", autouse=True)
def rust_available(client: LambdaClient) -> None:
    health = client.health()
    status = dict(health.components)["runtime.rust"]
    if not status.startswith("ok"):
        pytest.fail(f"the Rust runtime is not available here: {status}")


def test_a_handler_adding_two_numbers_returns_the_sum_and_its_output(client: LambdaClient) -> None:
    response = run(client, SUM, {"a": 2, "b": 40})
    assert not response.HasField("error"), response.error
    assert to_python(response.result) == 42
    assert "adding 2 and 40" in response.logs
    session = client.initialize("rust-test", SUM, timeout=120.0)
    again = [client.execute(session.request_id, {"a": i, "b": 1}).result for i in range(3)]
    assert [to_python(r) for r in again] == [1, 2, 3]


def test_the_original_map_signature_works(client: LambdaClient) -> None:
    response = run(client, MAP, {"name": "ferris"})
    assert not response.HasField("error"), response.error
    assert to_python(response.result) == "hello, ferris"


def test_an_error_result_is_a_runtime_error(client: LambdaClient) -> None:
    response = run(client, SUM, {"a": "two", "b": 1})
    assert response.error.code == RUNTIME_ERROR
    assert "a must be an integer" in response.error.message


def test_a_panic_is_a_runtime_error_with_its_message_and_line(client: LambdaClient) -> None:
    script = (
        "use serde_json::Value;\n\npub fn handler(_event: Value) -> Result<Value, String> {\n"
        '    panic!("the sky fell");\n}\n'
    )
    session = client.initialize("rust-test", script, timeout=120.0)
    response = client.execute(session.request_id, {})
    assert response.error.code == RUNTIME_ERROR
    assert "the sky fell" in response.error.message
    assert response.error.line == 4
    after = client.execute(session.request_id, {})  # the environment survives a panic
    assert "the sky fell" in after.error.message


def test_a_loop_ends_in_timeout_and_the_next_execution_works(client: LambdaClient) -> None:
    script = (
        "use serde_json::Value;\n\npub fn handler(event: Value) -> Result<Value, String> {\n"
        '    if event["params"]["spin"] == Value::Bool(true) { loop { std::hint::spin_loop(); } }\n'
        "    Ok(Value::from(1))\n}\n"
    )
    session = client.initialize("rust-test", script, context={"timeout_ms": 500}, timeout=120.0)
    started = time.monotonic()
    response = client.execute(session.request_id, {"spin": True})
    assert response.error.code == TIMEOUT
    assert time.monotonic() - started < 5
    assert to_python(client.execute(session.request_id, {"spin": False}).result) == 1


def test_a_fork_bomb_is_contained(client: LambdaClient) -> None:
    script = (
        "use serde_json::Value;\n\npub fn handler(_event: Value) -> Result<Value, String> {\n"
        "    let mut children = Vec::new();\n"
        "    for _ in 0..5000 {\n"
        '        match std::process::Command::new("/bin/sh").args(["-c", "sleep 60"]).spawn() {\n'
        "            Ok(child) => children.push(child),\n"
        "            Err(_) => break,\n"
        "        }\n    }\n"
        "    Ok(Value::from(children.len()))\n}\n"
    )
    response = run(client, script, {}, context={"timeout_ms": 5000})
    if not response.HasField("error"):
        assert to_python(response.result) < 100  # stopped by the process limit
    assert to_python(run(client, SUM, {"a": 1, "b": 1}).result) == 2  # the service goes on


def test_a_memory_bomb_is_a_memory_limit(client: LambdaClient) -> None:
    script = (
        "use serde_json::Value;\n\npub fn handler(_event: Value) -> Result<Value, String> {\n"
        "    let mut blocks: Vec<Vec<u8>> = Vec::new();\n"
        "    loop { blocks.push(vec![1u8; 16 << 20]); }\n}\n"
    )
    response = run(client, script, {}, context={"timeout_ms": 10000})
    assert response.error.code == MEMORY_LIMIT, response.error


def test_a_compile_error_is_invalid_argument_with_its_line(client: LambdaClient, database_url: str) -> None:
    script = (
        "use serde_json::Value;\n\npub fn handler(event: Value) -> Result<Value, String> {\n"
        "    Ok(undefined_name)\n}\n"
    )
    with pytest.raises(InvalidArgumentError) as caught:
        client.initialize("rust-test", script, request_id=BROKEN_ID, timeout=120.0)
    assert "undefined_name" in caught.value.message
    assert caught.value.metadata.get("line") == "4"
    assert "--> src/script.rs:4:" in caught.value.message, "the script's path as the caller knows it"
    assert "compile-" not in caught.value.message, "the server's compile folder"

    async def status() -> tuple[str, str]:
        conn = await asyncpg.connect(database_url)
        try:
            row = await conn.fetchrow(
                "SELECT compile_status, compile_error FROM meta.sessions WHERE request_id = $1",
                BROKEN_ID,
            )
            return row["compile_status"], row["compile_error"]
        finally:
            await conn.close()

    compile_status, compile_error = asyncio.run(status())
    assert compile_status == "error"
    assert "undefined_name" in compile_error
    session = client.get_session(BROKEN_ID)  # GetSession says so too
    assert session.compile_status == pb.COMPILE_STATUS_ERROR
    assert "undefined_name" in session.compile_error


def test_get_session_says_a_script_compiled(client: LambdaClient) -> None:
    session = client.initialize("rust-test", SUM, timeout=120.0)  # compiled by an earlier test
    stored = client.get_session(session.request_id)
    assert stored.compile_status == pb.COMPILE_STATUS_SUCCESS
    assert stored.compile_error == ""


def test_a_script_may_not_use_crates_beyond_the_set(client: LambdaClient) -> None:
    script = (  # itoa is built beside serde_json, as its dependency: not one of the set
        "extern crate itoa;\nuse serde_json::Value;\n"
        "pub fn handler(e: Value) -> Result<Value, String> { Ok(e) }\n"
    )
    with pytest.raises(InvalidArgumentError):
        client.initialize("rust-test", script, timeout=120.0)


def test_the_catalog_data_validator_works(client: LambdaClient) -> None:
    session = client.initialize("rust-data_validator", "", timeout=120.0)
    response = client.execute(session.request_id, {"data": {"age": 25}, "rules": ["required", "numeric"]})
    assert not response.HasField("error"), response.error
    assert to_python(response.result) == {"valid": True, "errors": []}
    wrong = client.execute(session.request_id, {"data": {"age": "old"}, "rules": ["numeric"]})
    assert to_python(wrong.result) == {"valid": False, "errors": ["age is not a number"]}


def test_release_is_honoured_and_stored(client: LambdaClient, database_url: str) -> None:
    script = SUM.replace("adding", "summing")
    response = run(client, script, {"a": 1, "b": 2}, optimization_level="release")
    assert to_python(response.result) == 3

    async def stored() -> tuple[list[str], list[tuple[str, object]]]:
        conn = await asyncpg.connect(database_url)
        try:
            digest = hashlib.sha256(script.encode()).hexdigest()
            artifacts = await conn.fetch(
                "SELECT optimization FROM meta.artifacts WHERE script_hash = $1", digest
            )
            sessions = await conn.fetch(
                "SELECT compile_status, compile_options FROM meta.sessions WHERE script_hash = $1", digest
            )
            return [r["optimization"] for r in artifacts], [tuple(r) for r in sessions]
        finally:
            await conn.close()

    artifacts, sessions = asyncio.run(stored())
    assert artifacts == ["release"]
    assert sessions == [("success", '{"optimization_level": "release"}')]  # pending, then success


def test_a_fresh_server_reuses_the_stored_program(
    database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    script = SUM.replace("adding", "reused")
    first = _server_with_cache(tmp_path_factory, database_url)
    try:
        with LambdaClient(first.target, timeout=120.0) as client:
            assert to_python(run(client, script, {"a": 1, "b": 1}).result) == 2
        assert _checks(first) == {"compiled": 1.0, "known": 0.0}
    finally:
        first.stop()
    second = _server_with_cache(tmp_path_factory, database_url)  # an empty local cache of its own
    try:
        with LambdaClient(second.target, timeout=120.0) as client:
            assert to_python(run(client, script, {"a": 2, "b": 2}).result) == 4
        assert _checks(second) == {"compiled": 0.0, "known": 1.0}
    finally:
        second.stop()


def test_without_a_toolchain_rust_titles_are_failed_precondition(database_url: str) -> None:
    settings = server_settings()
    settings = replace(settings, runtime=replace(settings.runtime, rustc="/nonexistent/rustc"))
    server = ServerThread(settings, database_url)
    try:
        with LambdaClient(server.target, timeout=20.0) as client:
            status = dict(client.health().components)["runtime.rust"]
            assert status.startswith("unavailable") and "rustc" in status
            with pytest.raises(LambdaError) as caught:
                client.initialize("rust-test", SUM)
            assert caught.value.code == grpc.StatusCode.FAILED_PRECONDITION
    finally:
        server.stop()


def test_the_dependency_build_starts_with_the_server_and_no_callers_deadline_ends_it(
    tmp_path_factory: pytest.TempPathFactory, database_url: str
) -> None:
    """The crates are built in the background from start-up: an Initialize whose deadline
    ends first fails DEADLINE_EXCEEDED, the build goes on, and a later Initialize compiles."""
    settings = server_settings()
    cold = tmp_path_factory.mktemp("rust-cold")  # nothing built: the build starts at start-up
    registry = serde_json_registry(tmp_path_factory.mktemp("registry"))  # seconds, not a minute
    runtime = replace(settings.runtime, rust_cache_dir=cold, rust_crate_registry=registry)
    server = ServerThread(replace(settings, runtime=runtime), database_url)
    try:
        with LambdaClient(server.target, timeout=120.0) as client:
            assert "crates: building" in client.health().components["runtime.rust"]
            with pytest.raises(LambdaError) as early:
                client.initialize("rust-test", SUM.replace("adding", "early"), timeout=0.5)
            assert early.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
            eventually(
                lambda: "crates: ready" in client.health().components["runtime.rust"],
                timeout=300,
                interval=0.5,
                message=lambda: client.health().components["runtime.rust"],
            )
            assert to_python(run(client, SUM.replace("adding", "later"), {"a": 1, "b": 1}).result) == 2
    finally:
        server.stop()


def _server_with_cache(factory: pytest.TempPathFactory, database_url: str) -> ServerThread:
    """A server with a local cache of its own (as another machine has), holding only a copy
    of the suite's build of the crates."""
    settings = server_settings()
    shared = settings.runtime.rust_cache_dir
    cache = factory.mktemp("rust-cache")
    for built in shared.glob("deps-*"):  # a copy under the test's /tmp: the jail must see it there
        shutil.copytree(built, cache / built.name)
    return ServerThread(
        replace(settings, runtime=replace(settings.runtime, rust_cache_dir=cache)), database_url
    )


def _checks(server: ServerThread) -> dict[str, float]:
    """lambda_script_checks_total of the Rust runtime, by how."""
    port = server.server.metrics.port
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    counts = {"compiled": 0.0, "known": 0.0}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "lambda_script_checks_total" and sample.labels.get("runtime") == "rust":
                counts[sample.labels["how"]] = sample.value
    return counts


def test_each_optimization_level_runs_in_environments_of_its_own(database_url: str) -> None:
    server = ServerThread(server_settings(), database_url)
    try:
        with LambdaClient(server.target, timeout=120.0) as client:
            script = SUM.replace("adding", "levels")
            for level in ("debug", "release"):
                session = client.initialize("rust-test", script, optimization_level=level)
                assert to_python(client.execute(session.request_id, {"a": 1, "b": 2}).result) == 3
            status = dict(client.health().components)["runtime.rust"]
            assert "idle=2" in status, status  # the release session did not reuse the debug program
    finally:
        server.stop()


def test_the_compiler_sees_only_the_jail(client: LambdaClient) -> None:
    # rustc reads include_str!'s file at compile time: in the jail, /etc holds nothing of the host's
    script = (
        "use serde_json::Value;\n"
        'const HOST: &str = include_str!("/etc/passwd");\n'
        "pub fn handler(_e: Value) -> Result<Value, String> { Ok(Value::from(HOST)) }\n"
    )
    with pytest.raises(InvalidArgumentError) as caught:
        client.initialize("rust-test", script, timeout=120.0)
    assert "/etc/passwd" in caught.value.message
    assert caught.value.metadata.get("line") == "2"


def test_a_compile_past_its_time_limit_is_cut(database_url: str) -> None:
    settings = server_settings()
    settings = replace(settings, runtime=replace(settings.runtime, compile_timeout_seconds=0.05))
    server = ServerThread(settings, database_url)
    try:
        with LambdaClient(server.target, timeout=60.0) as client:
            started = time.monotonic()
            with pytest.raises(InvalidArgumentError, match="ran past its limit"):
                client.initialize("rust-test", SUM.replace("adding", "slowly"))
            assert time.monotonic() - started < 10
    finally:
        server.stop()


def test_a_program_is_keyed_by_the_worker_it_is_compiled_into(monkeypatch: pytest.MonkeyPatch) -> None:
    """A program speaks its worker's protocol: after a change to rust_worker.rs (a new
    release, or an older replica sharing meta.artifacts and RUST_CACHE_DIR), the same
    script and toolchain make another artifact, never one of the other protocol."""
    from lambda_server.runtimes import rust

    toolchain = rust.RustToolchain(version="rustc 1.0.0 (test)")
    before = toolchain.program_identity
    assert toolchain.identity != before  # the crates' folder does not depend on the worker
    monkeypatch.setattr(rust, "WORKER_DIGEST", "0" * 64)
    assert toolchain.program_identity != before
    assert toolchain.identity == rust.RustToolchain(version="rustc 1.0.0 (test)").identity
