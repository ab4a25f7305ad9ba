"""Typed session options (InitializeRequest.options): honoured, bounded, resolved once at
Initialize and shown by GetSession; the original service's context keys still honoured."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Iterator
from typing import Any

import asyncpg
import grpc
import pytest
from google.protobuf import struct_pb2
from google.protobuf.duration_pb2 import Duration

from lambda_microservice import to_python
from lambda_microservice.v1 import lambda_service_pb2 as pb
from lambda_microservice.v1 import lambda_service_pb2_grpc as pb_grpc
from lambda_server.config import RuntimeSettings, SandboxSettings
from lambda_server.domain import RequestedOptions
from lambda_server.errors import InvalidRequest
from lambda_server.usecases.options import SessionOptionsPolicy
from tests.support import ServerThread, error_info

MIB = 1024 * 1024
DEFAULTS = (RuntimeSettings(), SandboxSettings())  # the bounds: the test server keeps them
AS_MARGIN_MB = 256  # RLIMIT_AS over the memory limit (sandbox.ADDRESS_SPACE_MARGIN_MB)
LIMITS = (
    "import resource\n"
    "result = [resource.getrlimit(resource.RLIMIT_AS)[0], resource.getrlimit(resource.RLIMIT_NPROC)[0]]"
)


@pytest.fixture(scope="module")
def stub(server: ServerThread) -> Iterator[pb_grpc.LambdaServiceStub]:
    """The generated stub: the client library's initialize has no `options` (yet)."""
    with grpc.insecure_channel(server.target) as channel:
        yield pb_grpc.LambdaServiceStub(channel)


def seconds(value: float) -> Duration:
    duration = Duration()
    duration.FromNanoseconds(round(value * 1e9))
    return duration


def initialize(
    stub: pb_grpc.LambdaServiceStub,
    script: str,
    context: dict[str, Any] | None = None,
    title: str = "python-options",
    **options: Any,
) -> str:
    struct = struct_pb2.Struct()
    struct.update(context or {})
    request = pb.InitializeRequest(
        language_title=title,
        script_content=script,
        context=struct,
        request_id=str(uuid.uuid4()),
        options=pb.ExecutionOptions(**options),
    )
    return str(stub.Initialize(request, timeout=30).request_id)


def execute(stub: pb_grpc.LambdaServiceStub, request_id: str) -> pb.ExecuteResponse:
    response: pb.ExecuteResponse = stub.Execute(pb.ExecuteRequest(request_id=request_id), timeout=30)
    return response


def session(stub: pb_grpc.LambdaServiceStub, request_id: str) -> pb.Session:
    return stub.GetSession(pb.GetSessionRequest(request_id=request_id), timeout=10).session


def limits_of(stub: pb_grpc.LambdaServiceStub, request_id: str) -> tuple[int, int]:
    """RLIMIT_AS and RLIMIT_NPROC as the session's script sees them."""
    response = execute(stub, request_id)
    assert not response.HasField("error"), response.error
    address_space, processes = to_python(response.result)
    return int(address_space), int(processes)


def test_typed_options_are_honoured_and_shown_resolved(stub: pb_grpc.LambdaServiceStub) -> None:
    request_id = initialize(stub, LIMITS, memory_mb=96, max_processes=12, timeout=seconds(7.5))
    address_space, processes = limits_of(stub, request_id)
    assert address_space == (96 + AS_MARGIN_MB) * MIB
    if os.geteuid() == 0:  # RLIMIT_NPROC is set inside the namespaces only
        assert processes == 12
    options = session(stub, request_id).options
    assert options.timeout.ToTimedelta().total_seconds() == 7.5
    assert (options.memory_mb, options.max_processes) == (96, 12)
    assert options.cache_ttl.ToNanoseconds() == 0


def test_unset_options_take_the_servers_defaults(stub: pb_grpc.LambdaServiceStub) -> None:
    options = session(stub, initialize(stub, "result = 1")).options
    # tests.support.server_settings: RUNTIME_TIMEOUT_SECONDS=5, the sandbox's defaults
    assert options.timeout.ToTimedelta().total_seconds() == 5.0
    assert options.memory_mb == DEFAULTS[1].memory_mb
    assert options.max_processes == DEFAULTS[1].max_processes
    assert options.cache_ttl.ToNanoseconds() == 0


def test_a_typed_timeout_ends_the_script(stub: pb_grpc.LambdaServiceStub) -> None:
    request_id = initialize(stub, "import time\ntime.sleep(30)\nresult = 1", timeout=seconds(0.5))
    response = execute(stub, request_id)
    assert response.error.code == pb.EXECUTION_ERROR_CODE_TIMEOUT
    assert "0.5 s" in response.error.message


def test_a_typed_cache_ttl_answers_again_from_the_cache(stub: pb_grpc.LambdaServiceStub) -> None:
    request_id = initialize(stub, "import random\nresult = random.random()", cache_ttl=seconds(60))
    first, second = execute(stub, request_id), execute(stub, request_id)
    assert (first.cached, second.cached) == (False, True)
    assert to_python(second.result) == to_python(first.result)


@pytest.mark.parametrize(
    ("options", "field", "bound"),
    [
        ({"timeout": seconds(0)}, "options.timeout", "more than 0 s"),
        ({"timeout": seconds(-1)}, "options.timeout", "more than 0 s"),
        (
            {"timeout": seconds(DEFAULTS[0].max_timeout_seconds + 1)},
            "options.timeout",
            f"at most {DEFAULTS[0].max_timeout_seconds:g} s (RUNTIME_MAX_TIMEOUT_SECONDS)",
        ),
        ({"memory_mb": 15}, "options.memory_mb", "at least 16"),
        (
            {"memory_mb": DEFAULTS[1].max_memory_mb + 1},
            "options.memory_mb",
            f"at most {DEFAULTS[1].max_memory_mb} (SANDBOX_MAX_MEMORY_MB)",
        ),
        ({"max_processes": 0}, "options.max_processes", "at least 1"),
        (
            {"max_processes": DEFAULTS[1].max_max_processes + 1},
            "options.max_processes",
            f"at most {DEFAULTS[1].max_max_processes} (SANDBOX_PROCESS_CEILING)",
        ),
        ({"cache_ttl": seconds(-1)}, "options.cache_ttl", "at least 0 s"),
        ({"cache_ttl": seconds(86_401)}, "options.cache_ttl", "at most 86400 s"),
    ],
)
def test_an_option_out_of_bounds_is_invalid_argument_naming_field_and_bound(
    stub: pb_grpc.LambdaServiceStub, options: dict[str, Any], field: str, bound: str
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        initialize(stub, "result = 1", **options)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in caught.value.details() and bound in caught.value.details(), caught.value.details()
    assert error_info(caught.value).metadata["field"] == field


def test_context_keys_are_still_honoured(stub: pb_grpc.LambdaServiceStub) -> None:
    context = {"timeout_ms": 1500, "memory_mb": 64, "max_processes": 8, "cache_ttl_seconds": 30}
    request_id = initialize(stub, LIMITS, context)
    stored = session(stub, request_id)
    assert stored.options.timeout.ToTimedelta().total_seconds() == 1.5
    assert (stored.options.memory_mb, stored.options.max_processes) == (64, 8)
    assert stored.options.cache_ttl.ToTimedelta().total_seconds() == 30
    assert to_python(stored.context) == context  # still the script's event.context, unchanged
    assert limits_of(stub, request_id)[0] == (64 + AS_MARGIN_MB) * MIB
    assert execute(stub, request_id).cached  # the context's cache TTL applies


def test_options_beat_context_keys(stub: pb_grpc.LambdaServiceStub) -> None:
    # a context key the option replaces is the script's data only: not even checked
    context = {"memory_mb": 64, "timeout_ms": "soon"}
    request_id = initialize(stub, LIMITS, context, memory_mb=128, timeout=seconds(2))
    options = session(stub, request_id).options
    assert (options.memory_mb, options.timeout.ToTimedelta().total_seconds()) == (128, 2.0)
    assert limits_of(stub, request_id)[0] == (128 + AS_MARGIN_MB) * MIB


def test_a_session_stored_without_options_reads_its_context(
    stub: pb_grpc.LambdaServiceStub, database_url: str
) -> None:
    """A session of a server before meta.sessions.options: its context's keys, at each claim."""
    request_id = initialize(stub, LIMITS, {"memory_mb": 80}, memory_mb=200)

    async def forget_options() -> None:
        conn = await asyncpg.connect(database_url)
        try:
            await conn.execute("UPDATE meta.sessions SET options = NULL WHERE request_id = $1", request_id)
        finally:
            await conn.close()

    asyncio.run(forget_options())
    assert limits_of(stub, request_id)[0] == (80 + AS_MARGIN_MB) * MIB
    assert session(stub, request_id).options.memory_mb == 80


def test_an_unknown_optimization_level_is_invalid_argument(stub: pb_grpc.LambdaServiceStub) -> None:
    request = pb.InitializeRequest(
        language_title="python-options",
        script_content="result = 1",
        compile_options=pb.CompileOptions(optimization_level=7),  # type: ignore[arg-type]  # a newer client's
    )
    with pytest.raises(grpc.RpcError) as caught:
        stub.Initialize(request, timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(caught.value).metadata["field"] == "compile_options.optimization_level"


def test_a_checked_scripts_session_has_no_compile_status(stub: pb_grpc.LambdaServiceStub) -> None:
    stored = session(stub, initialize(stub, "result = 1"))
    assert stored.compile_status == pb.COMPILE_STATUS_UNSPECIFIED
    assert stored.compile_error == ""


def test_the_client_and_the_cli_send_typed_options(server: ServerThread) -> None:
    """LambdaClient.initialize(options={...}) in seconds and integers, lambda-cli's --options."""
    from lambda_microservice import LambdaClient
    from tests.test_first_contact import lambda_cli

    with LambdaClient(server.target) as client:
        request_id = client.initialize(
            "python-options", "result = 1", options={"timeout": 2.5, "memory_mb": 64, "cache_ttl": 30}
        ).request_id
        options = client.get_session(request_id).options
        with pytest.raises(ValueError, match="unknown execution options"):
            client.initialize("python-options", "result = 1", options={"timeout_ms": 5})
    assert options.timeout.ToNanoseconds() == 2_500_000_000
    assert (options.memory_mb, options.cache_ttl.seconds) == (64, 30)
    created = lambda_cli(
        "init",
        "--language-title",
        "python-options",
        "--script",
        "-",
        "--options",
        '{"max_processes": 3, "timeout": 1}',
        target=server.target,
        input="result = 2",
    )
    assert created.returncode == 0, created.stderr
    assert '"request_id"' in created.stdout or '"requestId"' in created.stdout, created.stdout
    refused = lambda_cli(
        "init",
        "--language-title",
        "python-options",
        "--options",
        '{"memory_mb": "a lot"}',
        target=server.target,
    )
    assert refused.returncode == 2 and "--options" in refused.stderr, refused.stderr


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_a_non_finite_option_is_refused_whichever_front_door_sends_it(value: float) -> None:
    """NaN passes every comparison: the policy refuses it itself, not only the HTTP reader."""
    policy = SessionOptionsPolicy(*DEFAULTS)
    for name, requested in (
        ("options.timeout", RequestedOptions(timeout_seconds=value)),
        ("options.cache_ttl", RequestedOptions(cache_ttl_seconds=value)),
    ):
        with pytest.raises(InvalidRequest) as caught:
            policy.resolve(requested, {})
        assert caught.value.metadata["field"] == name
