"""Rust scripts' crates (serde with derive, regex, chrono, rand, itertools, ...) and the
original service's `handle(event: &str) -> Result<String, String>` convention.

Each script here uses many crates at once: a compile is seconds on a loaded 2-core box.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import pytest

from lambda_microservice import InvalidArgumentError, LambdaClient, to_python
from lambda_microservice.v1 import lambda_service_pb2 as pb
from lambda_server.runtimes import rust_crates
from lambda_server.runtimes.rust import entry_point
from tests.support import ServerThread, eventually, serde_json_registry, server_settings

RUNTIME_ERROR = pb.EXECUTION_ERROR_CODE_RUNTIME_ERROR
INVALID_RESULT = pb.EXECUTION_ERROR_CODE_INVALID_RESULT
# the crates' build, once per toolchain and registry (on 1 core in the sandbox: 50 s, 100 s
# when the box is loaded), within a test's own bound (pytest's timeout, 180 s)
BUILD_WAIT = 170.0

# The original service's convention, every crate of the set used: the event (params,
# context, request_id) comes in as JSON text, the result goes out as JSON text.
HANDLE = r"""use chrono::{DateTime, Datelike, Duration, NaiveDate, Utc};
use itertools::Itertools;
use once_cell::sync::Lazy;
use lazy_static::lazy_static;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use regex::Regex;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

static NUMBER: Lazy<Regex> = Lazy::new(|| Regex::new(r"(?P<n>\d+)").unwrap());
lazy_static! {
    static ref WORD: Regex = Regex::new(r"[A-Za-z]+").unwrap();
}

#[derive(Deserialize)]
struct Event {
    params: Params,
}

#[derive(Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum Params {
    Sum { a: i64, b: i64 },
    Text { text: String },
    Date { date: String, at: String },
    Dice { seed: u64, count: usize },
    Pairs { items: Vec<String> },
    Digest { text: String },
    Event,
    Fail { why: String },
    NotJson,
}

#[derive(Serialize)]
struct Sum { sum: i64 }

#[derive(Serialize)]
struct Found { numbers: Vec<u64>, words: Vec<String> }

#[derive(Serialize)]
struct Day { weekday: String, next: String, utc: String, leap: bool }

#[derive(Serialize)]
struct Pairs { pairs: Vec<(String, String)>, joined: String }

#[derive(Serialize)]
struct Digested { sha256: String, base64: String, uuid_length: usize }

pub fn handle(event: &str) -> Result<String, String> {
    let parsed: Event = serde_json::from_str(event).map_err(|e| format!("bad event: {}", e))?;
    let out = match parsed.params {
        Params::Sum { a, b } => serde_json::to_string(&Sum { sum: a + b }),
        Params::Text { text } => serde_json::to_string(&Found {
            numbers: NUMBER.captures_iter(&text).map(|c| c["n"].parse().unwrap()).collect(),
            words: WORD.find_iter(&text).map(|m| m.as_str().to_lowercase()).collect(),
        }),
        Params::Date { date, at } => {
            let day = NaiveDate::parse_from_str(&date, "%Y-%m-%d").map_err(|e| e.to_string())?;
            let moment = DateTime::parse_from_rfc3339(&at).map_err(|e| e.to_string())?;
            serde_json::to_string(&Day {
                weekday: day.format("%A").to_string(),
                next: (day + Duration::days(1)).to_string(),
                utc: moment.with_timezone(&Utc).to_rfc3339(),
                leap: NaiveDate::from_ymd_opt(day.year(), 2, 29).is_some(),
            })
        }
        Params::Dice { seed, count } => {
            let mut rng = StdRng::seed_from_u64(seed);
            let rolls: Vec<u8> = (0..count).map(|_| rng.gen_range(1..=6)).collect();
            serde_json::to_string(&rolls)
        }
        Params::Pairs { items } => serde_json::to_string(&Pairs {
            pairs: items.iter().cloned().tuple_combinations().collect(),
            joined: items.iter().sorted().dedup().join(","),
        }),
        Params::Digest { text } => serde_json::to_string(&Digested {
            sha256: hex::encode(Sha256::digest(text.as_bytes())),
            base64: base64::encode(text.as_bytes()),
            uuid_length: uuid::Uuid::new_v4().to_string().len(),
        }),
        Params::Event => return Ok(event.to_string()),
        Params::Fail { why } => return Err(format!("refused: {}", why)),
        Params::NotJson => return Ok(String::from("this is not JSON")),
    };
    out.map_err(|e| e.to_string())
}
"""

# The newer convention with the crates: derived structs through serde_json::Value.
HANDLER = r"""use regex::Regex;
use serde::{Deserialize, Serialize};
use serde_json::Value;

#[derive(Deserialize)]
struct Input { text: String }

#[derive(Serialize)]
struct Output { digits: usize }

pub fn handler(event: Value) -> Result<Value, String> {
    let input: Input = serde_json::from_value(event["params"].clone()).map_err(|e| e.to_string())?;
    let digits = Regex::new(r"\d").unwrap().find_iter(&input.text).count();
    serde_json::to_value(Output { digits }).map_err(|e| e.to_string())
}
"""


def crates_ready(client: LambdaClient) -> bool:
    return "crates: ready" in client.health().components["runtime.rust"]


@pytest.fixture(scope="module")
def session(client: LambdaClient) -> str:
    """One compile of HANDLE, after the crates are built (the first time: a minute or more)."""
    eventually(
        lambda: crates_ready(client),
        timeout=BUILD_WAIT,
        interval=1.0,
        message=lambda: client.health().components["runtime.rust"],
    )
    return client.initialize("rust-crates", HANDLE, timeout=120.0).request_id


def execute(client: LambdaClient, session: str, params: dict[str, object]) -> pb.ExecuteResponse:
    return client.execute(session, params, timeout=60.0)


def result(client: LambdaClient, session: str, params: dict[str, object]) -> object:
    response = execute(client, session, params)
    assert not response.HasField("error"), response.error
    return to_python(response.result)


def test_handle_takes_and_gives_derived_structs(client: LambdaClient, session: str) -> None:
    assert result(client, session, {"op": "sum", "a": 2, "b": 40}) == {"sum": 42}


def test_handle_gets_the_whole_event_as_json_text(client: LambdaClient, session: str) -> None:
    event = result(client, session, {"op": "event"})
    assert isinstance(event, dict)
    assert event["params"] == {"op": "event"}
    assert event["request_id"] == session
    assert "context" in event


def test_regex_once_cell_and_lazy_static(client: LambdaClient, session: str) -> None:
    found = result(client, session, {"op": "text", "text": "Take 12 apples and 7 Pears"})
    assert found == {"numbers": [12, 7], "words": ["take", "apples", "and", "pears"]}


def test_chrono_parses_and_computes_dates(client: LambdaClient, session: str) -> None:
    day = result(client, session, {"op": "date", "date": "2024-02-29", "at": "2024-06-01T12:30:00+02:00"})
    assert day == {
        "weekday": "Thursday",
        "next": "2024-03-01",
        "utc": "2024-06-01T10:30:00+00:00",
        "leap": True,
    }


def test_rand_with_a_seed_repeats_itself(client: LambdaClient, session: str) -> None:
    first = result(client, session, {"op": "dice", "seed": 7, "count": 20})
    again = result(client, session, {"op": "dice", "seed": 7, "count": 20})
    other = result(client, session, {"op": "dice", "seed": 8, "count": 20})
    assert isinstance(first, list) and len(first) == 20
    assert all(1 <= roll <= 6 for roll in first)
    assert first == again
    assert first != other


def test_itertools(client: LambdaClient, session: str) -> None:
    pairs = result(client, session, {"op": "pairs", "items": ["b", "a", "b"]})
    assert pairs == {"pairs": [["b", "a"], ["b", "b"], ["a", "b"]], "joined": "a,b"}


def test_sha2_hex_base64_and_uuid(client: LambdaClient, session: str) -> None:
    digested = result(client, session, {"op": "digest", "text": "abc"})
    assert digested == {
        "sha256": "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
        "base64": "YWJj",
        "uuid_length": 36,
    }


def test_an_err_of_handle_is_a_runtime_error_with_its_message(client: LambdaClient, session: str) -> None:
    response = execute(client, session, {"op": "fail", "why": "no reason"})
    assert response.error.code == RUNTIME_ERROR
    assert response.error.message == "refused: no reason"
    bad = execute(client, session, {"op": "unknown"})  # the script's own parse error
    assert bad.error.code == RUNTIME_ERROR and "bad event" in bad.error.message
    assert result(client, session, {"op": "sum", "a": 1, "b": 1}) == {"sum": 2}  # the environment goes on


def test_an_ok_of_handle_that_is_not_json_is_an_invalid_result(client: LambdaClient, session: str) -> None:
    response = execute(client, session, {"op": "not_json"})
    assert response.error.code == INVALID_RESULT
    assert "handle returned text that is not JSON" in response.error.message
    assert result(client, session, {"op": "sum", "a": 1, "b": 2}) == {"sum": 3}


def test_a_batch_runs_handle_per_item(client: LambdaClient, session: str) -> None:
    batch = client.execute_batch(session, [{"op": "sum", "a": i, "b": 1} for i in range(3)], timeout=60.0)
    assert [to_python(item.result) for item in batch] == [{"sum": 1}, {"sum": 2}, {"sum": 3}]


def test_handler_scripts_use_the_crates_too(client: LambdaClient, session: str) -> None:
    other = client.initialize("rust-crates", HANDLER, timeout=120.0).request_id
    assert result(client, other, {"text": "a1b22"}) == {"digits": 3}


def test_health_lists_the_crates(client: LambdaClient, session: str) -> None:
    checks = {check.name: check for check in client.health().checks}
    rust = checks["runtime.rust"]
    found, missing = rust_crates.present(server_settings().runtime.rust_crate_registry)
    assert [package.split(" ")[0] for package in rust.packages] == [crate.name for crate in found]
    assert all(re.fullmatch(r"[a-z0-9_]+ \d+\.\d+\.\d+\S*", package) for package in rust.packages)
    for name, _ in missing:
        assert f"{name} left out" in rust.detail
    if not missing:
        assert rust.status == pb.COMPONENT_STATUS_OK
        assert rust.detail.endswith("crates: ready")


def test_the_entry_point_is_read_from_the_script() -> None:
    assert entry_point(HANDLE) == "handle"
    assert entry_point(HANDLER) == "handler"
    both = "pub fn handle(e: &str) -> Result<String, String> { Ok(e.into()) }\npub fn handler() {}\n"
    assert entry_point(both) == "handler"
    commented = (
        "// pub fn handler(e: Value)\n/* fn handler() */\npub fn handle(e: &str) -> Result<String, String>"
    )
    assert entry_point(commented) == "handle"
    assert entry_point("pub fn handle_it(e: &str) {}") == "handler"  # rustc says what is missing


@pytest.mark.parametrize(
    "script",
    [
        "// fn handler(e: Value)\npub fn handle(e: &str) -> Result<String, String> { Ok(e.into()) }",
        "/* outer /* nested */ fn handler() */\npub fn handle(e: &str) {}",
        'pub fn handle(e: &str) { let s = "fn handler("; }',
        'pub fn handle(e: &str) { let s = "a \\" fn handler("; }',
        'pub fn handle(e: &str) { let s = r#"fn handler(" "#; let q = \'"\'; }',
        'pub fn handle(e: &str) { let url = "http://x"; }\n/* fn handler() */',
        "fn pick<'a>(e: &'a str) -> &'a str { e }\npub fn handle(e: &str) {}",
    ],
)
def test_a_handler_in_a_comment_or_a_string_is_not_the_entry_point(script: str) -> None:
    assert entry_point(script) == "handle"
    assert entry_point(script + "\npub fn handler(e: Value) {}") == "handler"


def test_a_script_without_an_entry_point_is_told_which_it_may_define(
    client: LambdaClient, session: str
) -> None:
    script = "pub fn handle_it(event: &str) -> Result<String, String> { Ok(event.into()) }\n"
    with pytest.raises(InvalidArgumentError) as caught:
        client.initialize("rust-crates", script, timeout=120.0)
    assert "pub fn handle(event: &str) -> Result<String, String>" in caught.value.message
    assert "cannot find" in caught.value.message  # and rustc's own words


def test_the_set_is_the_makefiles_and_the_images() -> None:
    root = Path(__file__).resolve().parent.parent
    makefile = (root / "Makefile").read_text()
    dockerfile = (root / "Dockerfile").read_text()
    for crate in rust_crates.CURATED:
        assert f"{crate.debian}:$(CRATES)/{crate.name}-" in makefile, crate
        assert f" {crate.debian} " in dockerfile.replace("\\\n", " ").replace("\n", " "), crate


def test_a_crate_whose_sources_are_missing_is_left_out_and_the_others_work(
    database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """A registry with serde_json's sources and its dependencies', but not serde_derive's:
    serde (with derive) does not resolve and regex is not there; serde_json is built and
    scripts using it compile, and Health says which were left out and why."""
    registry = serde_json_registry(tmp_path_factory.mktemp("registry"))
    settings = server_settings()
    runtime = replace(
        settings.runtime, rust_crate_registry=registry, rust_cache_dir=tmp_path_factory.mktemp("rust-few")
    )
    server = ServerThread(replace(settings, runtime=runtime), database_url)
    try:
        with LambdaClient(server.target, timeout=120.0) as client:
            eventually(
                lambda: "crates: building" not in client.health().components["runtime.rust"],
                timeout=BUILD_WAIT,
                interval=0.5,
                message=lambda: client.health().components["runtime.rust"],
            )
            rust = {check.name: check for check in client.health().checks}["runtime.rust"]
            assert "crates: ready" in rust.detail, rust.detail
            assert [package.split(" ")[0] for package in rust.packages] == ["serde_json"]
            assert rust.status == pb.COMPONENT_STATUS_DEGRADED  # works, with less than it could
            assert "serde left out: no matching package named `serde_derive`" in rust.detail
            assert "regex left out: no sources in" in rust.detail and "librust-regex-dev" in rust.detail
            script = "use serde_json::Value;\npub fn handler(e: Value) -> Result<Value, String> { Ok(e) }\n"
            session = client.initialize("rust-few", script)
            response = client.execute(session.request_id, {"a": 1})
            assert to_python(response.result)["params"] == {"a": 1}
            with pytest.raises(InvalidArgumentError, match="regex"):
                client.initialize("rust-few", "use regex::Regex;\n" + script)
    finally:
        server.stop()
