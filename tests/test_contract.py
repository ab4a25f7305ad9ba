"""The contract: reflection, standard health, buf lint, generated code in step, a client method per RPC."""

from __future__ import annotations

import filecmp
import inspect
import re
import subprocess
from pathlib import Path

import grpc
import pytest
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from lambda_microservice import AsyncLambdaClient, LambdaClient
from lambda_microservice.v1 import lambda_service_pb2 as pb
from lambda_server.config import RuntimeSettings
from tests.support import BUF, ROOT, ServerThread, buf_curl

SERVICE = "lambda_microservice.v1.LambdaService"
RPCS = {
    "Initialize",
    "Execute",
    "ExecuteStream",
    "ExecuteBatch",
    "Health",
    "GetSession",
    "ListFunctions",
    "GetFunction",
}


def snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def test_reflection_lists_the_service_and_its_rpcs(server: ServerThread) -> None:
    with grpc.insecure_channel(server.target) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        assert SERVICE in database.get_services()
        assert "grpc.health.v1.Health" in database.get_services()
        service = DescriptorPool(database).FindServiceByName(SERVICE)
        assert {method.name for method in service.methods} == RPCS


@pytest.mark.parametrize("service", ["", SERVICE])
def test_the_standard_health_check_answers_serving(server: ServerThread, service: str) -> None:
    with grpc.insecure_channel(server.target) as channel:
        response = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=5
        )
    assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_health_rpc_reports_components(client: LambdaClient) -> None:
    health = client.health()
    assert health.status == pb.HEALTH_STATUS_SERVING
    assert health.version
    assert health.components["postgres"] == "ok"
    assert health.components["runtime.python"].startswith("ok")
    assert health.components["runtime.nodejs"].startswith("ok")
    assert health.components["runtime.rust"].startswith("ok (rustc ")  # the toolchain's version


def test_health_checks_are_structured(client: LambdaClient) -> None:
    """`checks` holds each component of `components` as values: programs parse no text."""
    health = client.health()
    checks = {check.name: check for check in health.checks}
    assert [check.name for check in health.checks] == sorted(checks)  # ordered by name
    assert set(checks) == set(health.components)
    for name, check in checks.items():
        assert check.detail == health.components[name]
    assert checks["postgres"].status == pb.COMPONENT_STATUS_OK and checks["postgres"].required
    # only PostgreSQL makes the service NOT_SERVING
    assert [name for name, check in checks.items() if check.required] == ["postgres"]
    for runtime in ("python", "nodejs"):
        check = checks[f"runtime.{runtime}"]
        assert check.status == pb.COMPONENT_STATUS_OK
        assert set(check.counts) == {"warm", "busy", "idle"}
    environments = checks["environments"].counts
    assert environments["max_environments"] == RuntimeSettings().max_environments
    assert {"bound", "owners", "waiting", "memory_mb"} <= set(environments)
    # the Rust runtime works while its crates build, degraded until they are ready
    rust = checks["runtime.rust"]
    ready = rust.detail.endswith("crates: ready")
    assert rust.status == (pb.COMPONENT_STATUS_OK if ready else pb.COMPONENT_STATUS_DEGRADED)
    sandbox = checks["sandbox"]
    complete = "missing:" not in sandbox.detail
    assert sandbox.status == (pb.COMPONENT_STATUS_OK if complete else pb.COMPONENT_STATUS_DEGRADED)
    assert sandbox.counts["layers"] >= 1  # rlimits at least


def test_every_rpc_has_a_client_method() -> None:
    rpcs = {method.name for method in pb.DESCRIPTOR.services_by_name["LambdaService"].methods}
    assert rpcs == RPCS
    for rpc in rpcs:
        assert callable(getattr(LambdaClient, snake(rpc), None)), rpc
        method = getattr(AsyncLambdaClient, snake(rpc), None)
        # a streaming RPC's twin is an async iterator
        assert method is not None and (
            inspect.iscoroutinefunction(method) or inspect.isasyncgenfunction(method)
        ), rpc


def test_buf_lint_is_clean() -> None:
    assert BUF.exists(), "buf is installed by `make lint` (which `make test` runs first)"
    result = subprocess.run(
        [str(BUF), "lint", "protos"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_contract_only_grows_from_its_baseline() -> None:
    """protos/baseline.binpb is the contract as of issue 16: a change that would break a
    generated client built from it (a field renamed, renumbered or retyped) fails here."""
    result = subprocess.run(
        [str(BUF), "breaking", "protos", "--against", "protos/baseline.binpb"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_regenerating_the_code_changes_nothing(tmp_path: Path) -> None:
    result = subprocess.run(
        ["make", "-s", "proto", f"PROTO_OUT={tmp_path}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*_pb2*"))
    assert generated, "make proto generated nothing"
    committed = sorted(p.relative_to(ROOT / "client") for p in (ROOT / "client").rglob("*_pb2*"))
    assert generated == committed
    for path in generated:
        assert filecmp.cmp(tmp_path / path, ROOT / "client" / path, shallow=False), (
            f"{path} is stale: run make proto"
        )


def test_buf_curl_initializes_and_executes_through_reflection(server: ServerThread) -> None:
    """The README's first call, as a newcomer would make it."""

    def curl(method: str, body: dict[str, object]) -> dict[str, object]:
        return buf_curl(server.target, method, body)

    session = curl(
        "Initialize",
        {"languageTitle": "nodejs-calculator", "scriptContent": "return event.params.a + event.params.b;"},
    )
    executed = curl("Execute", {"requestId": session["requestId"], "params": {"a": 5, "b": 3}})
    assert executed["result"] == 8
