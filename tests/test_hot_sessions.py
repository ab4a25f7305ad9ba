"""Sessions kept in memory after a claim (SESSION_CACHE_SECONDS), counted write-behind
(SESSION_COUNT_FLUSH_MS): exact counts once flushed, never run past their expiry."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import jwt
import pytest

from lambda_microservice import LambdaClient, LambdaError, NotFoundError, SessionExpiredError, to_python
from lambda_server.config import AuthSettings
from tests.proxy import DatabaseProxy
from tests.support import (
    ServerThread,
    alternated_executes,
    eventually,
    move_expiry,
    once_client,
    server_settings,
    sql,
)

SCRIPT = "def handler(event):\n    return event['params']['n'] + 1"
NEVER_MS = 600_000  # a flush interval no test waits for: only a GetSession or a stop flushes


def hot_settings(cache_seconds: float, flush_ms: int) -> Any:
    settings = server_settings()
    database = replace(
        settings.database, session_cache_seconds=cache_seconds, session_count_flush_ms=flush_ms
    )
    return replace(settings, database=database)


def stored_count(url: str, request_id: str) -> int:
    """meta.sessions.execution_count, read by the test itself (no server flushes for it)."""
    query = "SELECT execution_count FROM meta.sessions WHERE request_id = $1::uuid"
    return int(sql(url, query, request_id))


@pytest.fixture
def hot(database_url: str) -> Iterator[ServerThread]:
    """A server that keeps claimed sessions for 30 s and flushes only when asked or at stop."""
    running = ServerThread(hot_settings(30.0, NEVER_MS), database_url)
    yield running
    running.stop()


def test_get_session_right_after_executes_shows_the_exact_count(hot: ServerThread, database_url: str) -> None:
    with LambdaClient(hot.target, timeout=20) as client:
        session = client.initialize("python-hot-get", SCRIPT)
        for n in range(20):
            assert to_python(client.execute(session.request_id, {"n": n}).result) == n + 1
        # the first Execute claimed in PostgreSQL; the other 19 ran from memory, not yet written
        assert stored_count(database_url, session.request_id) == 1
        assert client.get_session(session.request_id).execution_count == 20
        assert stored_count(database_url, session.request_id) == 20
        client.execute(session.request_id, {"n": 0})
        assert client.get_session(session.request_id).execution_count == 21


def test_a_batch_from_memory_counts_each_item(hot: ServerThread, database_url: str) -> None:
    with LambdaClient(hot.target, timeout=20) as client:
        session = client.initialize("python-hot-batch", SCRIPT)
        client.execute(session.request_id, {"n": 0})  # claimed: kept from now on
        results = client.execute_batch(session.request_id, [{"n": n} for n in range(7)])
        assert [to_python(item.result) for item in results] == [n + 1 for n in range(7)]
        assert stored_count(database_url, session.request_id) == 1
        assert client.get_session(session.request_id).execution_count == 8


def test_counts_survive_a_graceful_stop(database_url: str) -> None:
    running = ServerThread(hot_settings(30.0, NEVER_MS), database_url)
    try:
        with LambdaClient(running.target, timeout=20) as client:
            session = client.initialize("python-hot-stop", SCRIPT)
            for n in range(10):
                client.execute(session.request_id, {"n": n})
        assert stored_count(database_url, session.request_id) == 1
    finally:
        running.stop()
    assert stored_count(database_url, session.request_id) == 10


def test_counts_are_exact_across_two_replicas_once_flushed(database_url: str) -> None:
    first = ServerThread(hot_settings(30.0, 20), database_url)
    second = ServerThread(hot_settings(30.0, 20), database_url)
    try:
        with LambdaClient(first.target, timeout=20) as one, LambdaClient(second.target, timeout=20) as two:
            session = one.initialize("python-hot-shared", SCRIPT)
            calls = 300
            results = alternated_executes(one, two, session.request_id, calls)
            assert results == [n + 1 for n in range(calls)]
            # each replica's background flush, every 20 ms, writes the rest
            eventually(lambda: stored_count(database_url, session.request_id) == calls, timeout=10)
            assert one.get_session(session.request_id).execution_count == calls
            assert two.get_session(session.request_id).execution_count == calls
    finally:
        first.stop()
        second.stop()
    assert stored_count(database_url, session.request_id) == calls


def test_a_flush_whose_answer_was_lost_is_sent_again_and_counted_once(database_url: str) -> None:
    """A flush that PostgreSQL committed but whose answer never came back (the proxy cuts
    the replies to it) fails after DATABASE_COMMAND_TIMEOUT_SECONDS; sent again, with its
    number, it adds nothing: the count is exact, not doubled."""
    proxy = DatabaseProxy(database_url)
    settings = hot_settings(30.0, NEVER_MS)
    settings = replace(settings, database=replace(settings.database, command_timeout=2.0))
    running = ServerThread(settings, proxy.url)
    try:
        with LambdaClient(running.target, timeout=20) as client:
            session = client.initialize("python-hot-lost", SCRIPT)
            for n in range(10):  # the first claimed in PostgreSQL, nine counted in memory
                client.execute(session.request_id, {"n": n})
            proxy.lose_answers_to(b"meta.count_flushes")
            with once_client(running.target, 20) as once, pytest.raises(LambdaError):
                once.get_session(session.request_id)  # the flush ran, its answer never came
            assert stored_count(database_url, session.request_id) == 10  # it did commit
            proxy.lose_answers_to(None)
            # sent again first, as it was: nothing added
            assert client.get_session(session.request_id).execution_count == 10
            client.execute(session.request_id, {"n": 0})  # and the next flush counts as ever
            assert client.get_session(session.request_id).execution_count == 11
    finally:
        running.stop()
        proxy.close()
    assert stored_count(database_url, session.request_id) == 11


def test_an_expired_session_is_refused_within_the_cache_bound(database_url: str) -> None:
    cache_seconds = 1.0
    running = ServerThread(hot_settings(cache_seconds, 5), database_url)
    try:
        with LambdaClient(running.target, timeout=20) as client:
            session = client.initialize("python-hot-expiry", SCRIPT)
            client.execute(session.request_id, {"n": 0})  # claimed and kept
            move_expiry(database_url, session.request_id, "-1 second")
            moved = time.monotonic()

            def refused() -> bool:
                try:
                    client.execute(session.request_id, {"n": 1})
                except SessionExpiredError:
                    return True
                return False  # ran from memory: within the bound

            eventually(refused, timeout=cache_seconds + 10)
            # whatever ran from memory until then: no Execute begun past the bound runs
            time.sleep(max(0.0, moved + cache_seconds - time.monotonic()))
            for n in range(3):
                with pytest.raises(SessionExpiredError):
                    client.execute(session.request_id, {"n": n})
    finally:
        running.stop()


def test_a_kept_session_never_runs_past_its_expires_at_by_the_database_clock(
    hot: ServerThread, database_url: str
) -> None:
    with LambdaClient(hot.target, timeout=20) as client:
        # another session of the script binds its environment first: the two executes that
        # must come before the expiry are warm ones, not a process's bind on a busy machine
        binding = client.initialize("python-hot-deadline", SCRIPT)
        client.execute(binding.request_id, {"n": 0})
        session = client.initialize("python-hot-deadline", SCRIPT)
        move_expiry(database_url, session.request_id, "2 seconds")
        client.execute(session.request_id, {"n": 0})  # claimed with 2 s left, kept 30 s at most
        client.execute(session.request_id, {"n": 0})
        passed = "SELECT now() > expires_at FROM meta.sessions WHERE request_id = $1::uuid"
        eventually(lambda: sql(database_url, passed, session.request_id), timeout=10)
        with pytest.raises(SessionExpiredError):
            client.execute(session.request_id, {"n": 1})
        assert client.get_session(session.request_id).execution_count == 2


def test_with_the_cache_off_every_execute_claims_in_postgresql(database_url: str) -> None:
    running = ServerThread(hot_settings(0.0, NEVER_MS), database_url)
    try:
        with LambdaClient(running.target, timeout=20) as client:
            session = client.initialize("python-hot-off", SCRIPT)
            for n in range(5):
                client.execute(session.request_id, {"n": n})
                assert stored_count(database_url, session.request_id) == n + 1
            move_expiry(database_url, session.request_id, "-1 second")
            with pytest.raises(SessionExpiredError):
                client.execute(session.request_id, {"n": 0})
    finally:
        running.stop()


def test_a_kept_session_is_not_found_for_another_user(database_url: str) -> None:
    secret = "a-test-secret-of-at-least-32-bytes!!"
    auth = AuthSettings(mode="jwt", jwt_secret=secret, rate_limit_per_minute=0)
    running = ServerThread(replace(hot_settings(30.0, NEVER_MS), auth=auth), database_url)

    def client_of(sub: str) -> LambdaClient:
        payload = {"sub": sub, "scope": "execute:all read:functions", "exp": int(time.time()) + 300}
        bearer = jwt.encode(payload, secret, algorithm="HS256")
        return LambdaClient(running.target, timeout=20, metadata=(("authorization", f"Bearer {bearer}"),))

    try:
        with client_of("alice") as alice, client_of("mallory") as mallory:
            session = alice.initialize("python-hot-owner", SCRIPT)
            alice.execute(session.request_id, {"n": 0})  # claimed and kept
            alice.execute(session.request_id, {"n": 0})  # from memory
            for _ in range(3):
                with pytest.raises(NotFoundError) as refused:
                    mallory.execute(session.request_id, {"n": 0})
                assert not isinstance(refused.value, SessionExpiredError)
            assert to_python(alice.execute(session.request_id, {"n": 4}).result) == 5
            assert alice.get_session(session.request_id).execution_count == 3
    finally:
        running.stop()
