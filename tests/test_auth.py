"""AUTH_MODE=jwt: tokens, scopes, sessions owned by their creator, per-user rate limits."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lambda_microservice import LambdaClient, LambdaError, to_python
from lambda_microservice.v1 import lambda_service_pb2 as pb
from lambda_microservice.v1 import lambda_service_pb2_grpc as pb_grpc
from lambda_server.config import AuthSettings
from lambda_server.domain import Caller
from lambda_server.errors import RateLimited
from lambda_server.limits import MAX_BUCKETS, RateLimiter
from lambda_server.metrics import Metrics
from tests.support import ServerThread, server_settings

SECRET = "a-test-secret-of-at-least-32-bytes!!"
RATE = 120  # executions a minute: 2 a second, a bucket of 120


def token(
    sub: str = "alice", scope: str = "execute:all read:functions", key: Any = SECRET, **claims: Any
) -> str:
    payload = {"sub": sub, "scope": scope, "exp": int(time.time()) + 300, **claims}
    return jwt.encode(payload, key, algorithm="RS256" if not isinstance(key, str) else "HS256")


@pytest.fixture(scope="module")
def jwt_server(database_url: str) -> Iterator[ServerThread]:
    auth = AuthSettings(mode="jwt", jwt_secret=SECRET, rate_limit_per_minute=RATE)
    running = ServerThread(replace(server_settings(), auth=auth), database_url)
    yield running
    running.stop()


def client_for(server: ServerThread, bearer: str | None) -> LambdaClient:
    metadata = (("authorization", f"Bearer {bearer}"),) if bearer is not None else ()
    return LambdaClient(server.target, timeout=20, metadata=metadata)


def refusal(server: ServerThread, bearer: str | None) -> LambdaError:
    with client_for(server, bearer) as client, pytest.raises(LambdaError) as refused:
        client.initialize("python-auth", "result = 1")
    return refused.value


def test_a_call_without_a_token_is_unauthenticated(jwt_server: ServerThread) -> None:
    error = refusal(jwt_server, None)
    assert (error.code, error.reason) == (grpc.StatusCode.UNAUTHENTICATED, "UNAUTHORIZED")


@pytest.mark.parametrize(
    ("name", "bearer"),
    [
        ("bad signature", token(key="another-secret-of-at-least-32-bytes")),
        ("expired", token(exp=int(time.time()) - 60)),
        ("not a JWT", "not.a.token"),
        ("no subject", jwt.encode({"exp": int(time.time()) + 300, "scope": "execute:all"}, SECRET)),
    ],
)
def test_a_bad_token_is_unauthenticated(jwt_server: ServerThread, name: str, bearer: str) -> None:
    error = refusal(jwt_server, bearer)
    assert (error.code, error.reason) == (grpc.StatusCode.UNAUTHENTICATED, "UNAUTHORIZED"), name


def test_the_expired_token_says_so(jwt_server: ServerThread) -> None:
    assert "expired" in refusal(jwt_server, token(exp=int(time.time()) - 60)).message


def test_a_missing_scope_is_permission_denied(jwt_server: ServerThread) -> None:
    error = refusal(jwt_server, token(scope="read:functions"))
    assert (error.code, error.reason) == (grpc.StatusCode.PERMISSION_DENIED, "FORBIDDEN")
    assert error.metadata["scope"] == "execute:python"
    # a language scope allows that language only
    with client_for(jwt_server, token(scope="execute:python")) as python_only:
        assert python_only.initialize("python-scoped", "result = 2").request_id
        with pytest.raises(LambdaError) as refused:
            python_only.initialize("nodejs-scoped", "return 2;")
        assert refused.value.code == grpc.StatusCode.PERMISSION_DENIED


def test_another_users_session_is_not_found_and_the_owner_succeeds(jwt_server: ServerThread) -> None:
    with client_for(jwt_server, token("alice")) as alice, client_for(jwt_server, token("bob")) as bob:
        session = alice.initialize("python-owned", "def handler(event):\n    return event['params']['n'] * 2")
        for attempt in (
            lambda: bob.execute(session.request_id, {"n": 1}),
            lambda: bob.get_session(session.request_id),
        ):
            with pytest.raises(LambdaError) as refused:
                attempt()
            assert (refused.value.code, refused.value.reason) == (grpc.StatusCode.NOT_FOUND, "NOT_FOUND")
        assert to_python(alice.execute(session.request_id, {"n": 21}).result) == 42
        stored = alice.get_session(session.request_id)
        assert stored.execution_count == 1  # bob's attempt counted nothing
        # the same request_id from another user is a conflict, never bob's copy of alice's session
        with pytest.raises(LambdaError) as taken:
            bob.initialize("python-owned", "result = 0", request_id=session.request_id)
        assert taken.value.code == grpc.StatusCode.ALREADY_EXISTS


def test_cached_results_are_never_shared_between_users(jwt_server: ServerThread) -> None:
    script = "import random\nresult = random.random()"
    with client_for(jwt_server, token("carol")) as carol, client_for(jwt_server, token("dave")) as dave:
        first = carol.execute(
            carol.initialize("python-cache-owner", script).request_id, cache_control="max-age=60"
        )
        other = dave.execute(
            dave.initialize("python-cache-owner", script).request_id, cache_control="max-age=60"
        )
        assert not other.cached
        assert to_python(other.result) != to_python(first.result)


def test_health_and_the_standard_health_check_need_no_token(jwt_server: ServerThread) -> None:
    with client_for(jwt_server, None) as anonymous:
        assert anonymous.health().status == pb.HEALTH_STATUS_SERVING
    with grpc.insecure_channel(jwt_server.target) as channel:
        check = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert check.status == health_pb2.HealthCheckResponse.SERVING


def test_a_rs256_token_is_checked_with_the_configured_public_key(database_url: str) -> None:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    auth = AuthSettings(mode="jwt", jwt_public_key=public.decode())
    running = ServerThread(replace(server_settings(), auth=auth), database_url)
    try:
        with client_for(running, token("erin", key=private)) as erin:
            assert erin.initialize("python-rs256", "result = 3").request_id
        forged = token("erin", key=SECRET)  # HS256 signed with a guessable secret: refused
        assert refusal(running, forged).code == grpc.StatusCode.UNAUTHENTICATED
    finally:
        running.stop()


def test_the_rate_limit_trips_at_the_configured_rate_and_recovers_after_the_retry_delay(
    jwt_server: ServerThread,
) -> None:
    user = f"frank-{uuid.uuid4().hex[:6]}"
    bearer = (("authorization", f"Bearer {token(user)}"),)
    with grpc.insecure_channel(jwt_server.target) as channel, client_for(jwt_server, token(user)) as frank:
        session = frank.initialize("python-limited", "result = 1")
        stub = pb_grpc.LambdaServiceStub(channel)
        request = pb.ExecuteRequest(request_id=session.request_id)
        began = time.monotonic()  # before the bucket's first token is taken
        # an admitted call that fails still says what is left
        with pytest.raises(grpc.RpcError) as unknown:
            stub.Execute(pb.ExecuteRequest(request_id=str(uuid.uuid4())), metadata=bearer, timeout=10)
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
        assert dict(unknown.value.trailing_metadata())["x-ratelimit-remaining"] == str(RATE - 1)
        remaining = []
        for _ in range(RATE - 1):
            _, call = stub.Execute.with_call(request, metadata=bearer, timeout=10)
            trailing = dict(call.trailing_metadata() or ())
            assert trailing["x-ratelimit-limit"] == str(RATE)
            remaining.append(int(trailing["x-ratelimit-remaining"]))
        # the bucket refilled RATE/60 tokens a second while the calls ran (seconds on a busy
        # machine): what is left is that refill, at most; a limiter that does not count leaves ~RATE
        refilled = math.ceil((time.monotonic() - began) * RATE / 60)
        assert remaining[0] >= RATE - 2 and remaining[-1] <= refilled, (remaining[-1], refilled)
        with pytest.raises(grpc.RpcError) as refused:
            # each call takes a token and lasts far less than the 0.5 s a token takes to come back
            for _ in range(refilled + 10):
                stub.Execute(request, metadata=bearer, timeout=10)
        assert dict(refused.value.trailing_metadata())["x-ratelimit-remaining"] == "0"
        with pytest.raises(LambdaError) as limited:
            for _ in range(10):
                frank.execute(session.request_id)
        error = limited.value
        assert (error.code, error.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "RATE_LIMITED")
        assert error.retry_after is not None and 0 < error.retry_after <= 60 / RATE
        assert f"{RATE} executions a minute (RATE_LIMIT_PER_MINUTE)" in error.message
        time.sleep(error.retry_after + 0.05)
        assert to_python(frank.execute(session.request_id).result) == 1
        # another user has a bucket of their own
        with client_for(jwt_server, token(f"{user}-other")) as other:
            assert other.execute(other.initialize("python-limited", "result = 1").request_id).result


def test_anonymous_callers_are_limited_by_address(database_url: str) -> None:
    running = ServerThread(
        server_settings(auth=AuthSettings(anonymous_rate_limit_per_minute=5)), database_url
    )
    try:
        with LambdaClient(running.target, timeout=20) as client:
            session = client.initialize("python-anonymous-limit", "result = 1")
            for _ in range(5):
                client.execute(session.request_id)
            with pytest.raises(LambdaError) as limited:
                client.execute(session.request_id)
            assert limited.value.reason == "RATE_LIMITED"
            assert limited.value.retry_after is not None and limited.value.retry_after > 1
            assert "5 executions a minute (RATE_LIMIT_ANONYMOUS_PER_MINUTE)" in limited.value.message
    finally:
        running.stop()


def test_reading_the_catalog_needs_read_functions(jwt_server: ServerThread) -> None:
    with client_for(jwt_server, token(scope="read:functions")) as reader:
        assert reader.get_function("nodejs-calculator").language_title == "nodejs-calculator"
    with client_for(jwt_server, token(scope="execute:all")) as runner, pytest.raises(LambdaError) as refused:
        runner.list_functions()
    assert (refused.value.code, refused.value.reason) == (grpc.StatusCode.PERMISSION_DENIED, "FORBIDDEN")


def test_lambda_cli_sends_its_token_and_runs_a_catalog_function(jwt_server: ServerThread) -> None:
    cli = Path(sys.executable).parent / "lambda-cli"

    def run(*args: str, bearer: str | None = token("gina")) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "LAMBDA_TARGET": jwt_server.target}
        env.pop("LAMBDA_TOKEN", None)
        if bearer is not None:
            env["LAMBDA_TOKEN"] = bearer
        return subprocess.run([str(cli), *args], env=env, capture_output=True, text=True, timeout=60)

    listed = run("functions", "--language", "python")
    assert listed.returncode == 0, listed.stderr
    assert [f["language_title"] for f in json.loads(listed.stdout)["functions"]] == ["python-text_processor"]
    session = json.loads(run("init", "--language-title", "nodejs-calculator").stdout)
    executed = run("exec", session["request_id"], "--params", '{"operation": "multiply", "a": 4, "b": 2}')
    assert json.loads(executed.stdout)["result"] == {"result": 8}
    refused = run("functions", bearer=None)
    assert refused.returncode == 3 and json.loads(refused.stderr)["error"]["code"] == "UNAUTHENTICATED"


def test_the_rate_limiter_forgets_the_least_recently_used_past_its_bound() -> None:
    """Many addresses (spoofed, or IPv6) cannot grow the buckets without end."""
    limiter = RateLimiter(AuthSettings(anonymous_rate_limit_per_minute=1), Metrics())
    first = Caller(None, frozenset(), "10.0.0.1")
    limiter.admit(first)
    with pytest.raises(RateLimited):
        limiter.admit(first)
    for n in range(MAX_BUCKETS):
        limiter.admit(Caller(None, frozenset(), f"fd00::{n:x}"))
    assert limiter.admit(first) is not None  # forgotten: a bucket of its own again
