"""Fuzzing: thousands of generated requests per RPC on a real channel; never UNKNOWN or INTERNAL.

Every RPC gets at least MIN_REQUESTS requests built by hypothesis from its proto
(unicode and NUL in every string, huge and negative numbers, NaN and infinity,
wide and deep Structs, wrong JSON types in the context keys the service reads,
random request_ids, titles, cache directives and page tokens, random metadata),
then raw bodies no generated client would send (random bytes, mutated requests,
invalid UTF-8 and lone surrogates, nesting past protobuf's limit). Each call must
end within its deadline with a status other than UNKNOWN and INTERNAL, and the
server must be healthy afterwards. The runs are derandomized: CI sees the same
requests every time, and no example database is written (.hypothesis/ holds only
hypothesis's caches, and is ignored by git).

Found so far, and fixed: NUL in a context, a script or a title reached PostgreSQL,
whose refusal was INTERNAL (now INVALID_ARGUMENT; see tests/test_errors.py).
"""

from __future__ import annotations

import base64
import json
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from random import Random
from struct import unpack
from typing import Any, TypeVar

import grpc
import pytest
from google.protobuf import struct_pb2
from google.protobuf.message import Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lambda_microservice import LambdaClient, to_python
from lambda_microservice.v1 import lambda_service_pb2 as pb
from tests.support import ServerThread, varint, wire_field

# a falsifying example may well be megabytes: hypothesis warns before showing it
pytestmark = pytest.mark.filterwarnings("ignore:Generating overly large repr")

T = TypeVar("T")
MIN_REQUESTS = 2000
RAW_REQUESTS = 400
DEADLINE = 10.0  # seconds; every call here should take milliseconds
SERVICE = "/lambda_microservice.v1.LambdaService/"
FORBIDDEN = (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.DEADLINE_EXCEEDED)

FUZZ = settings(
    max_examples=MIN_REQUESTS,
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=False,
    suppress_health_check=list(HealthCheck),
)
RAW = settings(FUZZ, max_examples=RAW_REQUESTS)

SENT: Counter[str] = Counter()  # requests sent, by method or by what they were sent for
CODES: Counter[tuple[str, str]] = Counter()  # (method, status code) of every call


# --- the channel -------------------------------------------------------------------------


class Wire:
    """One channel, each method called with bytes, so that any body reaches the server."""

    def __init__(self, target: str) -> None:
        self.channel = grpc.insecure_channel(target)
        self._methods = {
            name: self.channel.unary_unary(
                SERVICE + name, request_serializer=_same, response_deserializer=_same
            )
            for name in pb.DESCRIPTOR.services_by_name["LambdaService"].methods_by_name
        }

    def send(
        self,
        method: str,
        body: bytes | Message,
        metadata: Sequence[tuple[str, str]] = (),
        count_as: str | None = None,
    ) -> tuple[grpc.StatusCode, bytes]:
        """Call `method`, counted as `count_as` (the method by default); assert that it ended
        within its deadline, with neither UNKNOWN nor INTERNAL."""
        data = body if isinstance(body, bytes) else body.SerializeToString()
        started = time.monotonic()
        answer, details = b"", ""
        try:
            answer = self._methods[method](data, timeout=DEADLINE, metadata=tuple(metadata) or None)
            code = grpc.StatusCode.OK
        except grpc.RpcError as error:
            code, details = error.code(), error.details() or ""
        elapsed = time.monotonic() - started
        SENT[count_as or method] += 1
        CODES[(method, code.name)] += 1
        shown = body if isinstance(body, bytes) else str(body)
        assert code not in FORBIDDEN, f"{method} -> {code.name}: {details!r}\nrequest: {shown!r:.2000}"
        assert elapsed < DEADLINE, f"{method} took {elapsed:.1f} s"
        return code, answer

    def close(self) -> None:
        self.channel.close()


def _same(data: bytes) -> bytes:
    return data


@dataclass(frozen=True)
class Sessions:
    """Sessions that Execute and GetSession are fuzzed against."""

    ids: tuple[str, ...]
    echo: str  # a Python session returning its params


@pytest.fixture(scope="module")
def wire(server: ServerThread) -> Iterator[Wire]:
    opened = Wire(server.target)
    yield opened
    opened.close()


@pytest.fixture(scope="module")
def sessions(client: LambdaClient) -> Sessions:
    echo = client.initialize("python-fuzz_echo", "def handler(event):\n    return event['params']\n")
    ids = [
        echo.request_id,
        client.initialize("python-fuzz_one", "result = 1").request_id,
        client.initialize("nodejs-fuzz_echo", "return event.params;").request_id,
        client.initialize("nodejs-calculator", "").request_id,  # params checked against its schema
        client.initialize("python-text_processor", "").request_id,
        client.initialize(
            "python-fuzz_cached", "result = len(str(params))", context={"cache_ttl_seconds": 60}
        ).request_id,
    ]
    return Sessions(tuple(ids), echo.request_id)


def assert_healthy(wire: Wire, sessions: Sessions) -> None:
    """Health SERVING, and a known-good session still executes."""
    code, answer = wire.send("Health", pb.HealthRequest(), (), "health checks")
    assert code == grpc.StatusCode.OK
    assert pb.HealthResponse.FromString(answer).status == pb.HEALTH_STATUS_SERVING
    execute = pb.ExecuteRequest(request_id=sessions.echo, params=to_struct({"n": 7}))
    code, answer = wire.send("Execute", execute, (), "health checks")
    assert code == grpc.StatusCode.OK
    response = pb.ExecuteResponse.FromString(answer)
    assert not response.HasField("error"), response.error
    assert to_python(response.result) == {"n": 7}


def to_struct(data: dict[str, Any]) -> struct_pb2.Struct:
    message = struct_pb2.Struct()
    message.update(data)
    return message


# --- strategies --------------------------------------------------------------------------
#
# Bulky values (JSON, contexts, headers) are built by a PRNG seeded with one drawn
# integer: drawn leaf by leaf, hypothesis costs milliseconds an example at these
# sizes, and the whole file must run in about a minute. Derandomized, the seeds
# are the same on every run.

SPECIAL_TEXT = [
    "",
    " ",
    "\x00",
    "a\x00b",
    "\x00" * 64,
    "\ufeff",
    "\uffff",
    "\U0010ffff",
    "\u200b\u200e\u202e",
    "e\u0301" * 20,
    "😀" * 40,
    "中文字符",
    "' OR 1=1 --",
    "%s%n%x",
    "../../etc/passwd",
    "null",
    "NaN",
    "\r\n\t",
    "\\u0000",
    "\\ud800",
]
# code points by range, surrogates (which protobuf strings cannot hold) left out
CODE_POINTS = [(0x20, 0x7E), (0x00, 0x1F), (0x80, 0x2FF), (0x300, 0x36F), (0x370, 0xD7FF), (0xE000, 0x10FFFF)]
EDGE_NUMBERS = [
    0.0,
    -0.0,
    1.0,
    -1.0,
    0.5,
    2.0**31,
    -(2.0**31) - 1,
    2.0**53,
    2.0**53 + 2,
    -(2.0**53),
    2.0**63,
    2.0**64,
    1e300,
    -1e300,
    1.7976931348623157e308,
    5e-324,
    -5e-324,
    float("nan"),
    float("inf"),
    float("-inf"),
]
# the context keys the service reads, and the ranges it accepts (the default ceilings)
VALID_LIMITS = {
    "timeout_ms": (1, 60_000),
    "memory_mb": (16, 2048),
    "max_processes": (1, 512),
    "cache_ttl_seconds": (0, 86_400),
}
LIMIT_KEYS = tuple(VALID_LIMITS)
LIMIT_EDGES: list[Any] = [
    0,
    1,
    15,
    16,
    17,
    64,
    100,
    1000,
    -1,
    2**31,
    2**53,
    2**53 + 1,
    1.5,
    "100",
    "",
    True,
    None,
]
HEADERS = ["x-request-id", "language-title", "authorization", "x-fuzz", "user-agent-x"]
HEADER_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._~:/=+-"


def random_text(rng: Random, long: bool = True) -> str:
    """A string of any code points; sometimes a special one, and (when `long`) a long one."""
    pick = rng.random()
    if pick < 0.2:
        return rng.choice(SPECIAL_TEXT)
    if long and pick < 0.23:
        return rng.choice("a\x00é中😀") * rng.randint(1_000, 100_000)
    low, high = rng.choice(CODE_POINTS)
    return "".join(chr(rng.randint(low, high)) for _ in range(rng.choice((0, 1, 2, 5, 12, 40))))


def random_number(rng: Random) -> float | int:
    pick = rng.randrange(5)
    if pick == 0:
        return rng.choice(EDGE_NUMBERS)
    if pick == 1:
        return rng.randint(-1000, 1000)
    if pick == 2:
        return rng.randint(-(2**80), 2**80)
    if pick == 3:
        return rng.uniform(-1.0, 1.0) * 10.0 ** rng.randint(-320, 308)
    number: float = unpack("<d", rng.randbytes(8))[0]  # any double, NaN payloads included
    return number


def random_scalar(rng: Random, long: bool = True) -> Any:
    pick = rng.randrange(6)
    if pick == 0:
        return None
    if pick == 1:
        return rng.random() < 0.5
    if pick < 4:
        return random_number(rng)
    return random_text(rng, long)


def random_json(rng: Random, depth: int = 0) -> Any:
    pick = rng.random()
    if depth < 5 and pick < 0.2:
        return [random_json(rng, depth + 1) for _ in range(rng.randint(0, 6))]
    if depth < 5 and pick < 0.4:
        return random_object(rng, depth + 1)
    return random_scalar(rng, depth <= 1)  # long strings near the top only: a request stays < 1 GB


def random_object(rng: Random, depth: int = 0) -> dict[str, Any]:
    """Mostly a small object; sometimes a wide one, or one nested past protobuf's limit."""
    pick = rng.random()
    if depth == 0 and pick < 0.05:
        return {f"k{i}": random_scalar(rng, False) for i in range(rng.randint(100, 3000))}
    if depth == 0 and pick < 0.1:
        return {"wide": [random_scalar(rng, False)] * rng.randint(100, 3000)}
    if depth == 0 and pick < 0.15:
        # about 33 objects deep is protobuf's 100 levels: past it the call must still get a clear status
        value, lists = random_scalar(rng, False), rng.random() < 0.3
        for _ in range(rng.randint(1, 120)):
            value = [value] if lists else {random_text(rng, False): value}
        return {"deep": value}
    return {random_text(rng, depth == 0): random_json(rng, depth) for _ in range(rng.randint(0, 6))}


def random_limit(rng: Random, key: str) -> Any:
    pick = rng.randrange(6)
    if pick < 2:
        return rng.randint(*VALID_LIMITS[key])
    if pick == 2:
        return rng.choice(LIMIT_EDGES)
    if pick == 3:
        return rng.randint(-(10**6), 10**6)
    if pick == 4:
        return random_number(rng)
    return random_json(rng)


def random_context(rng: Random) -> dict[str, Any]:
    """Free-form keys and, often, the keys the service reads, with any JSON type."""
    context = random_object(rng) if rng.random() < 0.5 else {}
    for key in LIMIT_KEYS:
        if rng.random() < 0.3:
            context[key] = random_limit(rng, key)
    return context


def random_headers(rng: Random) -> list[tuple[str, str]]:
    headers = []
    for _ in range(rng.randint(1, 3)):
        value = "".join(rng.choice(HEADER_CHARS) for _ in range(rng.randint(0, 60)))
        headers.append((rng.choice(HEADERS), ("Bearer " + value) if rng.random() < 0.3 else value))
    return headers


def weighted(*branches: tuple[int, st.SearchStrategy[T]]) -> st.SearchStrategy[T]:
    """one_of with weights (one_of itself drops a repeated branch, and favours the ones it
    has seen least)."""
    table = []
    total = 0
    for weight, strategy in branches:
        total += weight
        table.append((total, strategy))

    @st.composite
    def pick(draw: st.DrawFn) -> T:
        chosen = draw(st.integers(0, total - 1))
        return draw(next(strategy for bound, strategy in table if chosen < bound))

    return pick()


def seeded(build: Callable[[Random], T]) -> st.SearchStrategy[T]:
    return st.integers(0, 2**64 - 1).map(lambda seed: build(Random(seed)))


texts = st.one_of(st.text(max_size=40), st.sampled_from(SPECIAL_TEXT), seeded(random_text))
strings = weighted(
    (4, texts),
    (1, st.builds(lambda char, n: char * n, st.sampled_from("a\x00é中😀"), st.integers(1_000, 300_000))),
)
numbers = st.one_of(
    st.floats(), st.integers(-(2**80), 2**80), st.sampled_from(EDGE_NUMBERS), seeded(random_number)
)
json_values = seeded(random_json)
objects = seeded(random_object)
contexts = seeded(random_context)
metadata = weighted((3, st.just(())), (1, seeded(random_headers)))


# the forms of a UUID the service accepts, and a few near misses
UUID_FORMS: list[Callable[[str], str]] = [
    str,
    str.upper,
    lambda value: "{" + value + "}",
    lambda value: "urn:uuid:" + value,
    lambda value: value.replace("-", ""),
    lambda value: value[:-1],
    lambda value: value + "\x00",
    lambda value: " " + value,
]


def uuid_forms(ids: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return st.builds(lambda value, form: form(value), ids, st.sampled_from(UUID_FORMS))


request_ids = st.one_of(st.uuids().map(str), uuid_forms(st.uuids().map(str)), strings, st.just(""))
PREFIXES = ["python-", "nodejs-", "js-", "rust-", "PYTHON-", "python", "", "-", "node-"]
language_titles = st.one_of(
    st.builds(lambda prefix, title: prefix + title, st.sampled_from(PREFIXES), strings),
    st.sampled_from(["nodejs-calculator", "python-text_processor", "rust-data_validator", "python-x"]),
    strings,
)
PYTHON_SCRIPTS = [
    "result = 1",
    "def handler(event):\n    return event['params']\n",
    "def handle(p):\n  return p",
]
NODE_SCRIPTS = ["return 1;", "module.exports = async (event) => event.params;"]
scripts = st.one_of(
    st.sampled_from(PYTHON_SCRIPTS + NODE_SCRIPTS),
    st.builds(lambda text, body: f"# {text}\n{body}", texts, st.sampled_from(PYTHON_SCRIPTS)),
    st.builds(lambda text, body: f"// {text}\n{body}", texts, st.sampled_from(NODE_SCRIPTS)),
    st.builds(lambda text: f"return {json.dumps(text, ensure_ascii=False)};", texts),
    st.builds(lambda text: f"result = {text!r}", texts),
    strings,
    st.just(""),
)
DIRECTIVES = ["no-cache", "no-store", "max-age=0", "max-age=60", "max-age=86400", "max-age=999999999"]
cache_controls = weighted(
    (6, st.just("")),
    (2, st.sampled_from(DIRECTIVES)),
    (1, st.lists(st.sampled_from([*DIRECTIVES, "", " ", "MAX-AGE=5", "max-age", "private"])).map(",".join)),
    (1, st.integers(-(2**70), 2**70).map(lambda n: f"max-age={n}")),
    (1, strings),
)


# --- the fuzzers of each RPC -------------------------------------------------------------


def fuzz(test: Callable[..., None], *strategies: st.SearchStrategy[Any], raw: bool = False) -> None:
    """Run `test` under the FUZZ (or RAW) settings."""
    settings(RAW if raw else FUZZ)(given(*strategies)(test))()


def counted(method: str, minimum: int = MIN_REQUESTS) -> None:
    assert SENT[method] >= minimum, f"only {SENT[method]} {method} requests: {dict(SENT)}"


def _initialize_request(pair: tuple[str, str], context: dict[str, Any], request_id: str) -> Message:
    title, script = pair
    request = pb.InitializeRequest(language_title=title, script_content=script, request_id=request_id)
    request.context.update(context)  # in place: a copy would be parsed, and refused past the limit
    return request


# a title and a script that fit, most of the time, so that most requests get past the first check
SCRIPTS_OF = {"python-fuzz": PYTHON_SCRIPTS, "nodejs-fuzz": NODE_SCRIPTS, "js-fuzz": NODE_SCRIPTS}
fitting = st.sampled_from(
    [(title, script) for title, bodies in SCRIPTS_OF.items() for script in bodies]
    + [("python-text_processor", ""), ("nodejs-calculator", "")]
)
titles_and_scripts = weighted((3, fitting), (1, st.tuples(language_titles, scripts)))
# strategies are made once: one made for each example costs more than the call
initialize_requests = st.builds(
    _initialize_request, titles_and_scripts, contexts, weighted((2, st.just("")), (1, request_ids))
)


def test_initialize_fuzzed(wire: Wire, sessions: Sessions) -> None:
    def one(request: pb.InitializeRequest, headers: list[tuple[str, str]]) -> None:
        code, answer = wire.send("Initialize", request, headers)
        if code != grpc.StatusCode.OK:
            return
        # what was stored must be readable again, and run where that is cheap: a known script on
        # the default limits runs in a warm environment
        created = pb.InitializeResponse.FromString(answer).request_id
        wire.send(
            "GetSession", pb.GetSessionRequest(request_id=created), headers, "GetSession after Initialize"
        )
        limits = set(LIMIT_KEYS[:3]) & set(request.context.fields)
        if request.script_content in PYTHON_SCRIPTS + NODE_SCRIPTS and not limits:
            execute = pb.ExecuteRequest(request_id=created, params=request.context)
            wire.send("Execute", execute, headers, "Execute after Initialize")

    fuzz(one, initialize_requests, metadata)
    counted("Initialize")
    assert_healthy(wire, sessions)


def _execute_request(request_id: str, params: dict[str, Any], cache_control: str) -> Message:
    request = pb.ExecuteRequest(request_id=request_id, cache_control=cache_control)
    request.params.update(params)
    return request


params = weighted(
    (1, st.just({})),
    (4, objects),
    (
        1,
        st.fixed_dictionaries(  # for nodejs-calculator's schema
            {"operation": st.one_of(st.sampled_from(["add", "divide"]), texts), "a": numbers, "b": numbers}
        ),
    ),
    (
        1,
        st.fixed_dictionaries(  # for python-text_processor's schema
            {"action": st.sampled_from(["count_words", "uppercase", "nope"]), "text": strings}
        ),
    ),
)


def execute_requests(ids: tuple[str, ...]) -> st.SearchStrategy[Message]:
    known = st.sampled_from(ids)
    request_ids_of_known = weighted((6, known), (1, uuid_forms(known)), (1, request_ids))
    return st.builds(_execute_request, request_ids_of_known, params, cache_controls)


def test_execute_fuzzed(wire: Wire, sessions: Sessions) -> None:
    def one(request: pb.ExecuteRequest, headers: list[tuple[str, str]]) -> None:
        code, answer = wire.send("Execute", request, headers)
        if code == grpc.StatusCode.OK:
            pb.ExecuteResponse.FromString(answer)

    fuzz(one, execute_requests(sessions.ids), metadata)
    counted("Execute")
    assert_healthy(wire, sessions)


def test_get_session_fuzzed(wire: Wire, sessions: Sessions) -> None:
    known = st.sampled_from(sessions.ids)
    ids = weighted((2, known), (1, uuid_forms(known)), (1, request_ids))

    def one(request_id: str, headers: list[tuple[str, str]]) -> None:
        wire.send("GetSession", pb.GetSessionRequest(request_id=request_id), headers)

    fuzz(one, ids, metadata)
    counted("GetSession")
    assert_healthy(wire, sessions)


def unknown_fields() -> st.SearchStrategy[bytes]:
    """Fields a newer client might send: any number, any wire type, all valid protobuf."""
    number = st.integers(1, 2**29 - 1)
    field = st.one_of(
        st.builds(lambda n, v: varint(n << 3) + varint(v), number, st.integers(0, 2**64 - 1)),
        st.builds(lambda n, v: varint(n << 3 | 1) + v, number, st.binary(min_size=8, max_size=8)),
        st.builds(lambda n, v: varint(n << 3 | 5) + v, number, st.binary(min_size=4, max_size=4)),
        st.builds(wire_field, number, st.binary(max_size=64)),
    )
    return st.lists(field, max_size=4).map(b"".join)


def test_health_fuzzed(wire: Wire, sessions: Sessions) -> None:
    def one(extra: bytes, headers: list[tuple[str, str]]) -> None:
        code, answer = wire.send("Health", extra, headers)
        assert code == grpc.StatusCode.OK
        assert pb.HealthResponse.FromString(answer).status == pb.HEALTH_STATUS_SERVING

    fuzz(one, unknown_fields(), metadata)
    counted("Health")
    assert_healthy(wire, sessions)


def _token(data: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")


def _list_request(
    language: str, function_type: int, page_size: int, token: str | None, after: str
) -> Message:
    if token is None:  # a token of ours, as far as the filters go
        type_name = {1: "predefined", 2: "dynamic"}.get(function_type)
        token = _token({"after": after, "language": language or None, "type": type_name})
    return pb.ListFunctionsRequest(
        language=language, page_size=page_size, page_token=token, function_type=function_type
    )


def list_requests(tokens: tuple[str, ...]) -> st.SearchStrategy[Message]:
    page_tokens = weighted(
        (4, st.just("")),
        (1, st.sampled_from(tokens)),
        (2, st.none()),
        (1, json_values.map(_token)),
        (1, st.binary(max_size=64).map(lambda raw: base64.urlsafe_b64encode(raw).decode())),
        (1, strings),
    )
    return st.builds(
        _list_request,
        weighted((2, st.just("")), (1, st.sampled_from(["python", "nodejs", "rust", "js"])), (1, strings)),
        weighted((3, st.integers(0, 2)), (1, st.integers(-(2**31), 2**31 - 1))),
        weighted((2, st.integers(0, 200)), (1, st.integers(-5, 200)), (1, st.integers(-(2**31), 2**31 - 1))),
        page_tokens,
        strings,
    )


def test_list_functions_fuzzed(wire: Wire, sessions: Sessions) -> None:
    code, answer = wire.send("ListFunctions", pb.ListFunctionsRequest(page_size=1), (), "first page")
    assert code == grpc.StatusCode.OK
    tokens = (pb.ListFunctionsResponse.FromString(answer).next_page_token,)
    assert tokens[0]

    def one(request: pb.ListFunctionsRequest, headers: list[tuple[str, str]]) -> None:
        wire.send("ListFunctions", request, headers)

    fuzz(one, list_requests(tokens), metadata)
    counted("ListFunctions")
    assert_healthy(wire, sessions)


def test_get_function_fuzzed(wire: Wire, sessions: Sessions) -> None:
    def one(title: str, headers: list[tuple[str, str]]) -> None:
        wire.send("GetFunction", pb.GetFunctionRequest(language_title=title), headers)

    catalog = st.sampled_from(["nodejs-calculator", "python-text_processor", "rust-data_validator"])
    near = st.builds(lambda title, form: form(title), catalog, st.sampled_from(UUID_FORMS))
    fuzz(one, st.one_of(catalog, near, language_titles), metadata)
    counted("GetFunction")
    assert_healthy(wire, sessions)


# --- raw bodies --------------------------------------------------------------------------

# the string fields of each request, and where a Struct sits, by field number (HealthRequest
# has none: its fields here are unknown ones, whose bytes protobuf does not check)
STRING_FIELDS = {
    "Initialize": (1, 2, 4),
    "Execute": (1, 3),
    "GetSession": (1,),
    "Health": (1, 7),
    "ListFunctions": (1, 3),
    "GetFunction": (1,),
}
STRUCT_FIELDS = {"Initialize": 3, "Execute": 2}

bad_utf8 = st.one_of(
    # lone surrogates, as a careless encoder writes them
    st.text(st.characters(categories=["Cs", "Ll"]), min_size=1, max_size=10).map(
        lambda text: text.encode("utf-8", "surrogatepass")
    ),
    st.sampled_from([b"\xed\xa0\x80", b"\xc0\x80", b"\xff", b"\xf4\x90\x80\x80", b"a\xe2\x82", b"\x80"]),
    st.binary(min_size=1, max_size=32),
)


def _mutate(body: bytes, position: int, kind: int, noise: bytes) -> bytes:
    at = position % (len(body) + 1)
    if kind == 0:
        return body[:at]  # truncated
    if kind == 1:
        return body[:at] + noise + body[at:]  # bytes inserted
    if kind == 2 and body:
        at = min(at, len(body) - 1)
        return body[:at] + bytes([body[at] ^ 0xFF]) + body[at + 1 :]  # a byte flipped
    return body + noise


def _nested_groups(field: int, depth: int) -> bytes:
    """An unknown field of groups nested `depth` deep: protobuf's depth limit applies to it too."""
    return varint(field << 3 | 3) * depth + varint(field << 3 | 4) * depth


def _nested_struct(field: int, depth: int) -> bytes:
    value = b""
    for _ in range(depth):
        value = wire_field(5, wire_field(1, wire_field(1, b"a") + wire_field(2, value)))
    return wire_field(field, wire_field(1, wire_field(1, b"x") + wire_field(2, value)))


def raw_bodies(method: str, valid: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    strings_at = st.sampled_from(STRING_FIELDS[method])
    in_struct = []
    if method in STRUCT_FIELDS:
        field = STRUCT_FIELDS[method]
        in_struct = [
            # a bad key, or a bad string value, inside the Struct
            st.builds(lambda bad: wire_field(field, wire_field(1, wire_field(1, bad))), bad_utf8),
            st.builds(
                lambda bad: wire_field(
                    field, wire_field(1, wire_field(1, b"k") + wire_field(2, wire_field(3, bad)))
                ),
                bad_utf8,
            ),
            st.builds(lambda depth: _nested_struct(field, depth), st.integers(1, 400)),
        ]
    return st.one_of(
        st.binary(max_size=256),
        st.builds(_mutate, valid, st.integers(0, 10_000), st.integers(0, 3), st.binary(max_size=16)),
        st.builds(lambda body, number, bad: body + wire_field(number, bad), valid, strings_at, bad_utf8),
        st.builds(lambda body, depth: body + _nested_groups(15, depth), valid, st.integers(1, 5000)),
        st.builds(lambda body, extra: body + extra, valid, unknown_fields()),
        *in_struct,
    )


def _serialized(strategy: st.SearchStrategy[Message]) -> st.SearchStrategy[bytes]:
    return strategy.map(lambda message: message.SerializeToString())


@pytest.mark.parametrize("method", list(STRING_FIELDS))
def test_raw_bodies_fuzzed(wire: Wire, sessions: Sessions, method: str) -> None:
    valid: dict[str, st.SearchStrategy[bytes]] = {
        "Initialize": _serialized(initialize_requests),
        "Execute": _serialized(execute_requests(sessions.ids)),
        "GetSession": request_ids.map(lambda rid: pb.GetSessionRequest(request_id=rid).SerializeToString()),
        "Health": unknown_fields(),
        "ListFunctions": _serialized(list_requests(("",))),
        "GetFunction": language_titles.map(
            lambda t: pb.GetFunctionRequest(language_title=t).SerializeToString()
        ),
    }

    def one(body: bytes) -> None:
        wire.send(method, body, (), f"raw {method}")

    fuzz(one, raw_bodies(method, valid[method]), raw=True)
    counted(f"raw {method}", RAW_REQUESTS)
    assert_healthy(wire, sessions)


@pytest.mark.parametrize("method", list(STRING_FIELDS))
def test_a_body_past_the_message_limit_is_resource_exhausted(wire: Wire, method: str) -> None:
    code, _ = wire.send(method, wire_field(1, b"a" * (5 * 1024 * 1024)), (), "past the limit")
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_every_rpc_got_its_requests(wire: Wire, sessions: Sessions) -> None:
    """The counts of the whole module (shown with -rA), and the server healthy at its end."""
    assert_healthy(wire, sessions)
    print("requests sent:", dict(sorted(SENT.items())))
    print("status codes:", dict(sorted(CODES.items())))
    for method in STRING_FIELDS:
        counted(method)
