"""Expired sessions are marked and deleted while two servers run, by one of them at a time."""

from __future__ import annotations

import time

import asyncpg
import pytest

from lambda_microservice import LambdaClient, LambdaError
from lambda_server.store.cleanup import LOCK_ID
from tests.support import (
    ServerThread,
    eventually,
    run_sync,
    server_settings,
)

SESSIONS = 30


async def _count(url: str, where: str) -> int:
    conn = await asyncpg.connect(url, timeout=10)
    try:
        return int(await conn.fetchval(f"SELECT count(*) FROM meta.sessions WHERE {where}"))
    finally:
        await conn.close()


def count(url: str, where: str = "true") -> int:
    return run_sync(_count(url, where))


class HeldLock:
    """The cleaners' advisory lock, held by this test on a connection of its own."""

    def __init__(self, url: str, loop_server: ServerThread) -> None:
        self._url = url
        self._server = loop_server
        self._conn: asyncpg.Connection | None = None

    async def _take(self) -> None:
        self._conn = await asyncpg.connect(self._url, timeout=10)
        await self._conn.execute("SELECT pg_advisory_lock($1)", LOCK_ID)

    async def _release(self) -> None:
        assert self._conn is not None
        await self._conn.close()

    def take(self) -> None:
        self._server.call(self._take())

    def release(self) -> None:
        self._server.call(self._release())


def test_expired_sessions_are_cleaned_by_exactly_one_of_two_servers_at_a_time(fresh_database: str) -> None:
    settings = server_settings(
        session_expiry_seconds=1, cleanup_interval_seconds=0.1, session_retention_seconds=0
    )
    first = ServerThread(settings, fresh_database)
    second = ServerThread(settings, fresh_database)
    try:
        lock = HeldLock(fresh_database, first)
        lock.take()  # while a cleaner holds the lock, the other waits for nothing and skips
        with LambdaClient(first.target, timeout=20) as one, LambdaClient(second.target, timeout=20) as two:
            ids = [
                (one if i % 2 else two).initialize("python-clean", f"result = {i}").request_id
                for i in range(SESSIONS)
            ]
            time.sleep(1.5)  # every session is past its expiry now, and many passes have run
            assert count(fresh_database, "status = 'active'") == SESSIONS  # nothing cleaned under the lock
            with pytest.raises(LambdaError) as expired:
                two.execute(ids[0])
            assert expired.value.reason == "SESSION_EXPIRED"  # expiry never waits for the cleanup
            lock.release()
            eventually(lambda: count(fresh_database) == 0, timeout=10)
            with pytest.raises(LambdaError) as gone:
                one.execute(ids[1])
            assert gone.value.reason == "NOT_FOUND"
        cleaners = [running.server.cleanup.done for running in (first, second)]
        # each session was marked once and deleted once, in all, whichever server did it
        assert sum(done["expired"] for done in cleaners) == SESSIONS
        assert sum(done["deleted"] for done in cleaners) == SESSIONS
    finally:
        first.stop()
        second.stop()


def test_a_session_within_its_retention_is_marked_expired_and_kept(fresh_database: str) -> None:
    settings = server_settings(session_expiry_seconds=1, cleanup_interval_seconds=0.1)  # retention: a week
    running = ServerThread(settings, fresh_database)
    try:
        with LambdaClient(running.target, timeout=20) as client:
            session = client.initialize("python-kept", "result = 1")
            eventually(lambda: count(fresh_database, "status = 'expired'") == 1, timeout=10)
            assert client.get_session(session.request_id).execution_count == 0  # still readable
            assert running.server.cleanup.done == {"expired": 1, "deleted": 0}
    finally:
        running.stop()
