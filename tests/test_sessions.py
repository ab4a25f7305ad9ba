"""Sessions: saved sessions are found, counted exactly, survive restarts, expire by the database clock."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import replace

import pytest

from lambda_microservice import (
    AlreadyExistsError,
    AsyncLambdaClient,
    LambdaClient,
    NotFoundError,
    SessionConflictError,
    to_python,
)
from lambda_microservice.v1 import lambda_service_pb2 as pb
from tests.support import ServerThread, move_expiry, server_settings

ADD_JS = "return event.params.a + event.params.b;"
WORDS_PY = 'result = len(params["text"].split())'


def test_nodejs_calculator_adds(client: LambdaClient) -> None:
    session = client.initialize("nodejs-calculator", ADD_JS)
    uuid.UUID(session.request_id)
    assert session.status == pb.SESSION_STATUS_ACTIVE
    response = client.execute(session.request_id, {"a": 5, "b": 3})
    assert not response.HasField("error"), response.error
    assert to_python(response.result) == 8
    assert response.language_title == "nodejs-calculator"
    assert response.request_id == session.request_id
    assert response.execution_time.ToNanoseconds() > 0


def test_python_textprocessor_counts_words(client: LambdaClient) -> None:
    session = client.initialize("python-textprocessor", WORDS_PY)
    response = client.execute(session.request_id, {"text": "Hello World"})
    assert not response.HasField("error"), response.error
    assert to_python(response.result) == 2


def test_expires_at_comes_from_the_configured_expiry(client: LambdaClient) -> None:
    before = time.time()
    session = client.initialize("python-x", "result = 1")
    expires = session.expires_at.ToDatetime().timestamp()
    # SESSION_EXPIRY_SECONDS defaults to 3600; the clocks of the database and of
    # this machine agree to within a few seconds here.
    assert 3600 - 5 < expires - before < 3600 + 5


def test_200_concurrent_sessions_are_all_found(server: ServerThread) -> None:
    async def one(client: AsyncLambdaClient, n: int) -> float:
        session = await client.initialize("python-double", "result = params['n'] * 2")
        response = await client.execute(session.request_id, {"n": n})
        assert not response.HasField("error"), response.error
        return float(to_python(response.result))

    async def main() -> list[float]:
        async with AsyncLambdaClient(server.target, timeout=60) as client:
            return await asyncio.gather(*(one(client, n) for n in range(200)))

    assert asyncio.run(main()) == [2.0 * n for n in range(200)]


def test_100_concurrent_executions_are_counted_exactly(client: LambdaClient, server: ServerThread) -> None:
    session = client.initialize("nodejs-count", "return 1;")

    async def main() -> None:
        async with AsyncLambdaClient(server.target, timeout=60) as aclient:
            responses = await asyncio.gather(*(aclient.execute(session.request_id) for _ in range(100)))
        assert all(not r.HasField("error") for r in responses)

    asyncio.run(main())
    stored = client.get_session(session.request_id)
    assert stored.execution_count == 100
    assert stored.HasField("last_executed_at")
    assert stored.last_executed_at.ToDatetime() >= stored.created_at.ToDatetime()


def test_get_session_shows_what_is_stored(client: LambdaClient) -> None:
    session = client.initialize("python-ctx", "result = context['k']", context={"k": "v"})
    stored = client.get_session(session.request_id)
    assert stored.request_id == session.request_id
    assert stored.language_title == "python-ctx"
    assert stored.status == pb.SESSION_STATUS_ACTIVE
    assert stored.execution_count == 0
    assert not stored.HasField("last_executed_at")
    assert stored.expires_at == session.expires_at
    assert to_python(stored.context) == {"k": "v"}
    assert len(stored.script_hash) == 64
    assert to_python(client.execute(session.request_id).result) == "v"
    assert client.get_session(session.request_id).execution_count == 1


def test_initialize_with_the_same_request_id_is_idempotent(client: LambdaClient) -> None:
    request_id = str(uuid.uuid4())
    first = client.initialize("nodejs-retry", ADD_JS, request_id=request_id)
    again = client.initialize("nodejs-retry", ADD_JS, request_id=request_id)
    assert first.request_id == again.request_id == request_id
    assert first.expires_at == again.expires_at
    with pytest.raises(SessionConflictError) as caught:
        client.initialize("nodejs-retry", "return 2;", request_id=request_id)
    assert isinstance(caught.value, AlreadyExistsError)
    assert caught.value.reason == "SESSION_CONFLICT"
    assert request_id in caught.value.message


def test_language_title_is_taken_from_metadata_when_empty(client: LambdaClient) -> None:
    session = client.initialize("", "return 7;", metadata=[("language-title", "nodejs-header")])
    response = client.execute(session.request_id)
    assert response.language_title == "nodejs-header"
    assert to_python(response.result) == 7


def test_a_session_survives_a_server_restart(database_url: str) -> None:
    first = ServerThread(server_settings(), database_url)
    try:
        with LambdaClient(first.target) as client:
            session = client.initialize("python-restart", "result = params['x'] + 1")
            assert to_python(client.execute(session.request_id, {"x": 1}).result) == 2
    finally:
        first.stop()
    second = ServerThread(server_settings(), database_url)
    try:
        with LambdaClient(second.target) as client:
            assert to_python(client.execute(session.request_id, {"x": 41}).result) == 42
            assert client.get_session(session.request_id).execution_count == 2
    finally:
        second.stop()


def test_an_expired_session_is_not_found_with_reason_session_expired(database_url: str) -> None:
    # every Execute claims in PostgreSQL (a session claimed is otherwise run from memory for
    # SESSION_CACHE_SECONDS: tests/test_hot_sessions.py), and the session is expired there
    # rather than waited for: an expiry of 1 s also bounded its Initialize and first Execute
    settings = server_settings()
    no_cache = replace(settings, database=replace(settings.database, session_cache_seconds=0.0))
    running = ServerThread(no_cache, database_url)
    try:
        with LambdaClient(running.target) as client:
            session = client.initialize("nodejs-short", "return 1;")
            assert to_python(client.execute(session.request_id).result) == 1
            move_expiry(database_url, session.request_id, "-1 second")
            with pytest.raises(NotFoundError) as caught:
                client.execute(session.request_id)
            assert caught.value.reason == "SESSION_EXPIRED"
            assert client.get_session(session.request_id).status == pb.SESSION_STATUS_EXPIRED
            # an expired session is not counted
            assert client.get_session(session.request_id).execution_count == 1
    finally:
        running.stop()


def test_a_request_id_in_any_uuid_spelling_finds_its_session(client: LambdaClient) -> None:
    """The canonical spelling takes a fast path; upper case, braces and no hyphens are
    still the same session, answered under its canonical request_id."""
    session = client.initialize("python-spellings", "result = params['n'] + 1")
    for spelling in (
        session.request_id,
        session.request_id.upper(),
        "{" + session.request_id + "}",
        session.request_id.replace("-", ""),
    ):
        response = client.execute(spelling, {"n": 1})
        assert not response.HasField("error"), response.error
        assert response.request_id == session.request_id
    with pytest.raises(Exception) as refused:
        client.execute(session.request_id[:-1] + "g", {"n": 1})
    assert "is not a UUID" in str(refused.value)


def test_a_title_resolved_once_resolves_the_same_and_an_unknown_one_is_refused_every_time(
    client: LambdaClient,
) -> None:
    """resolve() remembers titles it resolved; it never remembers a refusal."""
    for _ in range(2):
        first = client.initialize("python-remembered", "result = 1")
        assert to_python(client.execute(first.request_id, {}).result) == 1
        with pytest.raises(Exception) as refused:
            client.initialize("cobol-remembered", "result = 1")
        assert "unknown language" in str(refused.value)
