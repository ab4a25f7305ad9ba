"""Session claims batched into shared statements: counted exactly, told apart by owner, never
held up by a row another transaction holds. Against a real PostgreSQL, through the store."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import asyncpg
import pytest

from lambda_server.config import DatabaseSettings
from lambda_server.domain import Deadline, NewSession
from lambda_server.errors import DatabaseUnavailable, SessionExpired, SessionNotFound
from lambda_server.store import migrations
from lambda_server.store.database import Database
from lambda_server.store.sessions import SessionStore
from tests.support import run_sync

LOCK_TIMEOUT_MS = 1500
COMMAND_TIMEOUT = 10.0  # a claim waiting for room in the pool fails after this


def new_session(user_id: str | None, expiry_seconds: int = 600) -> NewSession:
    return NewSession(
        request_id=str(uuid.uuid4()),
        language_title="python-claims",
        user_id=user_id,
        context={"k": 1},
        script_content="result = 1",
        script_hash="h" * 64,
        expiry_seconds=expiry_seconds,
    )


class Store:
    def __init__(self, db: Database, sessions: SessionStore, batches: list[int]) -> None:
        self.db, self.sessions, self.batches = db, sessions, batches

    async def count(self, request_id: str) -> int:
        async with self.db.connection(Deadline.after(5)) as conn:
            value: int = await conn.fetchval(
                "SELECT execution_count FROM meta.sessions WHERE request_id = $1", request_id
            )
            return value


async def _store(url: str, **settings_overrides: Any) -> AsyncIterator[Store]:
    options: dict[str, Any] = {
        "command_timeout": 5.0,
        "lock_timeout_ms": LOCK_TIMEOUT_MS,
        **settings_overrides,
    }
    settings = DatabaseSettings(**options)
    db = Database(settings, url)
    await db.open()
    await migrations.apply(db, migrations.load(migrations.default_directory()))
    batches: list[int] = []
    sessions = SessionStore(db, observe_claim_batch=batches.append)
    try:
        yield Store(db, sessions, batches)
    finally:
        await sessions.close()
        await db.close()


def in_store(url: str, test: Callable[[Store], Coroutine[Any, Any, None]], **settings: Any) -> None:
    async def body() -> None:
        async for store in _store(url, **settings):
            await test(store)

    run_sync(body())


def test_concurrent_claims_share_statements_and_are_counted_exactly(fresh_database: str) -> None:
    async def test(store: Store) -> None:
        hot = await store.sessions.create(new_session("alice"), Deadline.after(5))
        other = await store.sessions.create(new_session(None), Deadline.after(5))
        claims = [store.sessions.claim(hot.request_id, "alice", Deadline.after(5)) for _ in range(150)]
        claims += [store.sessions.claim(other.request_id, None, Deadline.after(5)) for _ in range(50)]
        claimed = await asyncio.gather(*claims)
        assert {c.request_id for c in claimed} == {hot.request_id, other.request_id}
        assert all(c.context == {"k": 1} and c.script_hash == "h" * 64 for c in claimed)
        assert await store.count(hot.request_id) == 150
        assert await store.count(other.request_id) == 50
        assert sum(store.batches) == 200
        assert len(store.batches) < 200 and max(store.batches) > 1, store.batches

    in_store(fresh_database, test)


def test_a_batch_tells_owners_missing_and_expired_sessions_apart(fresh_database: str) -> None:
    async def test(store: Store) -> None:
        mine = await store.sessions.create(new_session("alice"), Deadline.after(5))
        expired = await store.sessions.create(new_session("alice", expiry_seconds=0), Deadline.after(5))
        missing = str(uuid.uuid4())
        calls = [
            *(store.sessions.claim(mine.request_id, "alice", Deadline.after(5)) for _ in range(4)),
            *(store.sessions.claim(mine.request_id, "mallory", Deadline.after(5)) for _ in range(3)),
            store.sessions.claim(mine.request_id, None, Deadline.after(5)),
            store.sessions.claim(missing, "alice", Deadline.after(5)),
            store.sessions.claim(expired.request_id, "alice", Deadline.after(5)),
        ]
        outcomes = await asyncio.gather(*calls, return_exceptions=True)
        assert [o.request_id for o in outcomes[:4]] == [mine.request_id] * 4  # type: ignore[union-attr]
        # another user's session is not found, as if it did not exist; an expired one says so
        assert all(type(o) is SessionNotFound for o in outcomes[4:9]), outcomes
        assert isinstance(outcomes[9], SessionExpired), outcomes[9]
        assert await store.count(mine.request_id) == 4
        assert await store.count(expired.request_id) == 0

    in_store(fresh_database, test)


# the lock_timeout of the test of a held row: what a claim stuck behind it would take, at least;
# the other sessions' 100 claims take far less even on a busy machine (1.5 s could be reached)
HELD_LOCK_TIMEOUT_MS = 5000


async def blocked_by(url: str, holder: asyncpg.Connection, timeout: float = 10.0) -> None:
    """Wait until some statement waits for a lock that `holder`'s transaction holds (asked on
    a connection of its own: pg_stat_activity is read once per transaction)."""
    query = "SELECT count(*) FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))"
    deadline = time.monotonic() + timeout
    watcher = await asyncpg.connect(url, timeout=5)
    try:
        while not await watcher.fetchval(query, holder.get_server_pid()):
            assert time.monotonic() < deadline, f"nothing waited for the held row within {timeout} s"
            await asyncio.sleep(0.02)
    finally:
        await watcher.close()


def test_a_locked_row_holds_up_only_its_own_session(fresh_database: str) -> None:
    """A row held by another transaction: its claim waits (up to lock_timeout), alone; the
    claims of other sessions go through at once."""

    async def test(store: Store) -> None:
        held = await store.sessions.create(new_session(None), Deadline.after(5))
        free = await store.sessions.create(new_session(None), Deadline.after(5))
        locker = await asyncpg.connect(fresh_database, timeout=5)
        try:
            async with locker.transaction():
                await locker.execute(
                    "SELECT 1 FROM meta.sessions WHERE request_id = $1 FOR UPDATE", held.request_id
                )
                waiting = asyncio.create_task(store.sessions.claim(held.request_id, None, Deadline.after(30)))
                # the held claim goes first, and waits for the row in PostgreSQL: its batch skipped
                # the row, its claim alone waits (a batch that waited instead would hold up all
                # the claims below for lock_timeout)
                await blocked_by(fresh_database, locker)
                started = time.monotonic()
                for _ in range(20):
                    await asyncio.gather(
                        *(store.sessions.claim(free.request_id, None, Deadline.after(5)) for _ in range(5))
                    )
                took = time.monotonic() - started
                assert not waiting.done()
            # the lock is gone: the held claim goes through
            claimed = await waiting
            assert claimed.request_id == held.request_id
        finally:
            await locker.close()
        # a batch stuck behind the lock would take lock_timeout at least: 20 batches took less
        assert took < HELD_LOCK_TIMEOUT_MS / 1000, took
        assert await store.count(free.request_id) == 100
        assert await store.count(held.request_id) == 1

    in_store(fresh_database, test, lock_timeout_ms=HELD_LOCK_TIMEOUT_MS, command_timeout=COMMAND_TIMEOUT)


@pytest.mark.parametrize("kill_after", [0, 1])
def test_a_lost_connection_fails_its_batch_and_the_next_one_reconnects(
    fresh_database: str, kill_after: int
) -> None:
    async def test(store: Store) -> None:
        session = await store.sessions.create(new_session(None), Deadline.after(5))
        for _ in range(kill_after):
            await store.sessions.claim(session.request_id, None, Deadline.after(5))
        admin = await asyncpg.connect(fresh_database, timeout=5)
        try:
            await admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        finally:
            await admin.close()
        outcomes = await asyncio.gather(
            *(store.sessions.claim(session.request_id, None, Deadline.after(5)) for _ in range(3)),
            return_exceptions=True,
        )
        for outcome in outcomes:  # ours, never asyncpg's: UNAVAILABLE when the connection was lost
            assert not isinstance(outcome, BaseException) or type(outcome).__name__ == "DatabaseUnavailable"
        claimed = await store.sessions.claim(session.request_id, None, Deadline.after(5))
        assert claimed.request_id == session.request_id

    in_store(fresh_database, test)


@pytest.mark.parametrize("synchronous", [False, True])
def test_claims_wait_for_the_wal_flush_only_when_set_to(fresh_database: str, synchronous: bool) -> None:
    """DATABASE_CLAIM_SYNCHRONOUS_COMMIT: off, a claim's commit leaves the flush to the WAL writer.
    A backend reports its WAL statistics when it ends, so each store is closed before reading."""

    async def wal_syncs() -> int:
        admin = await asyncpg.connect(fresh_database, timeout=5)
        try:
            syncs: int = await admin.fetchval("SELECT wal_sync FROM pg_stat_wal")
            return syncs
        finally:
            await admin.close()

    async def body() -> None:
        async for store in _store(fresh_database, claim_synchronous_commit=synchronous):
            session = await store.sessions.create(new_session(None), Deadline.after(5))
        await asyncio.sleep(0.2)  # the backends are gone
        before = await wal_syncs()
        async for store in _store(fresh_database, claim_synchronous_commit=synchronous):
            for _ in range(100):
                await store.sessions.claim(session.request_id, None, Deadline.after(5))
            assert await store.count(session.request_id) == 100
        await asyncio.sleep(0.2)
        syncs = await wal_syncs() - before
        if synchronous:
            assert syncs >= 100, syncs
        else:
            assert syncs < 50, syncs

    run_sync(body())


def test_a_dropped_connection_goes_back_to_the_pool(fresh_database: str) -> None:
    """Each lost claim connection is handed back (and replaced), so losing more of them than
    the pool holds never leaves the pool without room."""

    async def test(store: Store) -> None:
        session = await store.sessions.create(new_session(None), Deadline.after(30))
        admin = await asyncpg.connect(fresh_database, timeout=5)
        started = time.monotonic()
        try:
            for _ in range(4):
                await store.sessions.claim(session.request_id, None, Deadline.after(30))
                await admin.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
                with contextlib.suppress(DatabaseUnavailable):  # the batch on the lost connection
                    await store.sessions.claim(session.request_id, None, Deadline.after(30))
        finally:
            await admin.close()
        claimed = await store.sessions.claim(session.request_id, None, Deadline.after(30))
        assert claimed.request_id == session.request_id
        # no claim waited for room in the pool: that wait ends at the command timeout, and
        # fails the claim (the whole loop takes well under a second on an idle machine)
        assert time.monotonic() - started < COMMAND_TIMEOUT
        in_use, _ = store.db.connections()
        assert in_use <= 1, in_use
        closing = time.monotonic()  # the pool's close waits 5 s for a connection handed out
        await store.sessions.close()
        await store.db.close()
        assert time.monotonic() - closing < 4.0

    in_store(fresh_database, test, pool_size=2, command_timeout=COMMAND_TIMEOUT)
