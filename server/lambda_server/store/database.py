"""The asyncpg pool, with every call bounded in time and failures mapped to our errors."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg

from lambda_server import json_text
from lambda_server.config import DatabaseSettings
from lambda_server.domain import Deadline
from lambda_server.errors import DatabaseUnavailable, DeadlineExceeded, InternalError

log = logging.getLogger(__name__)

_JSONB_VERSION = b"\x01"

# Errors after which PostgreSQL or the connection to it cannot serve now: the
# caller gets UNAVAILABLE and may retry. Every other PostgresError is a bug.
_UNAVAILABLE = (
    OSError,
    TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,  # shutdown, query_canceled
    asyncpg.exceptions.InsufficientResourcesError,  # too many connections
    asyncpg.exceptions.LockNotAvailableError,  # lock_timeout
    asyncpg.exceptions.UndefinedTableError,  # migrations not applied yet
    asyncpg.exceptions.InvalidCatalogNameError,  # database does not exist (yet)
    # A connection PostgreSQL closed (a fast shutdown) whose close asyncpg has not
    # noticed yet: it is still consuming the error when the next query comes.
    asyncpg.exceptions.InternalClientError,
)


class Database:
    """A lazily connecting pool; any call fails DatabaseUnavailable within its bound."""

    def __init__(self, settings: DatabaseSettings, dsn: str) -> None:
        self._settings = settings
        self._dsn = dsn
        self._pool: asyncpg.Pool | None = None

    @property
    def settings(self) -> DatabaseSettings:
        return self._settings

    async def open(self) -> None:
        """Create the pool; it connects on first use, so this never waits for PostgreSQL."""
        s = self._settings
        self._pool = await asyncpg.create_pool(
            self._dsn,
            min_size=0,
            max_size=s.pool_size,
            timeout=s.connect_timeout,
            command_timeout=s.command_timeout,
            statement_cache_size=100 if s.statement_cache else 0,
            max_inactive_connection_lifetime=60.0,
            init=_init_connection,
            reset=_keep_session,
            server_settings={
                "application_name": "lambda-microservice",
                "statement_timeout": str(s.statement_timeout_ms),
                "lock_timeout": str(s.lock_timeout_ms),
                "idle_in_transaction_session_timeout": str(s.statement_timeout_ms * 2),
            },
        )

    async def close(self, timeout: float = 5.0) -> None:
        if self._pool is None:
            return
        pool, self._pool = self._pool, None
        try:
            await asyncio.wait_for(pool.close(), timeout)
        except (TimeoutError, Exception):
            pool.terminate()

    @asynccontextmanager
    async def connection(
        self, deadline: Deadline, budget: float | None = None
    ) -> AsyncIterator[asyncpg.Connection]:
        """A pooled connection for at most `budget` seconds (the command timeout by default).

        Acquiring and every statement run inside share the budget, capped by the
        deadline. On a timeout or a broken connection the connection is dropped,
        never returned to the pool half-used, so the pool heals by itself.
        """
        if self._pool is None:
            raise DatabaseUnavailable("the database pool is closed")
        seconds = deadline.cap(self._settings.command_timeout if budget is None else budget)
        if seconds <= 0:
            raise DeadlineExceeded("the call's deadline passed before reaching the database")
        conn: asyncpg.Connection | None = None
        try:
            async with asyncio.timeout(seconds):
                conn = await self._pool.acquire()
                yield conn
        except (*_UNAVAILABLE, asyncpg.PostgresError) as exc:
            if isinstance(exc, _UNAVAILABLE):
                _terminate(conn)
            raise _failure(exc, seconds) from exc
        except BaseException:
            _terminate(conn)
            raise
        finally:
            if conn is not None:
                await self._release(conn)

    async def _acquire(self) -> asyncpg.Connection:
        if self._pool is None:
            raise DatabaseUnavailable("the database pool is closed")
        return await self._pool.acquire()

    async def _release(self, conn: asyncpg.Connection) -> None:
        assert self._pool is not None
        try:
            await self._pool.release(conn, timeout=1.0)
        except Exception:  # a broken connection: drop it, the pool replaces it
            _terminate(conn)

    async def fetchrow(self, deadline: Deadline, query: str, *args: Any) -> asyncpg.Record | None:
        async with self.connection(deadline) as conn:
            return await conn.fetchrow(query, *args)

    async def fetch(self, deadline: Deadline, query: str, *args: Any) -> list[asyncpg.Record]:
        """Every row of a query, bounded like fetchrow: keep the query's own LIMIT small."""
        async with self.connection(deadline) as conn:
            rows: list[asyncpg.Record] = await conn.fetch(query, *args)
            return rows

    def connections(self) -> tuple[int, int]:
        """The pool's open connections: (in use, idle)."""
        if self._pool is None:
            return 0, 0
        size, idle = self._pool.get_size(), self._pool.get_idle_size()
        return size - idle, idle

    async def ping(self, timeout: float) -> None:
        """Raise DatabaseUnavailable unless PostgreSQL answers within `timeout`."""
        async with self.connection(Deadline.after(timeout)) as conn:
            await conn.fetchval("SELECT 1")


class DedicatedConnection:
    """One pooled connection kept between statements, for a hot path that runs one at a time.

    asyncpg's acquire and release cost more CPU than the statement itself (about
    45 us of 80 here). The connection is taken from the pool on first use and
    after a failure, and dropped (never reused half-used) on any error, timeout
    or cancellation, as Database.connection does. Its owner releases it before
    the database closes (the pool's close waits for every connection handed out).
    """

    def __init__(self, db: Database) -> None:
        self._db = db
        self._conn: asyncpg.Connection | None = None

    async def fetch(self, seconds: float, query: str, *args: Any) -> list[asyncpg.Record]:
        """Every row of `query`, within `seconds` (connecting included)."""
        try:
            async with asyncio.timeout(seconds):
                if self._conn is None or self._conn.is_closed():
                    self._conn = await self._db._acquire()
                rows: list[asyncpg.Record] = await self._conn.fetch(query, *args)
                return rows
        except (*_UNAVAILABLE, asyncpg.PostgresError) as exc:
            if isinstance(exc, _UNAVAILABLE):
                await self._drop()
            raise _failure(exc, seconds) from exc
        except BaseException:
            await self._drop()
            raise

    async def _drop(self) -> None:
        """Close the connection at once and hand it back: the pool opens a new one when needed
        (a connection never handed back would take a place in the pool for good)."""
        _terminate(self._conn)
        await self.release()

    async def release(self) -> None:
        """Give the connection back to the pool (at shutdown, or closed after a failure)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            await self._db._release(conn)


def _failure(exc: BaseException, seconds: float) -> DatabaseUnavailable | InternalError:
    """Our error for an asyncpg or socket failure within a bound of `seconds`: UNAVAILABLE
    when it may pass, else a bug (named by its type only; its text is logged)."""
    if isinstance(exc, _UNAVAILABLE):
        return DatabaseUnavailable(f"database unavailable: {_describe(exc, seconds)}")
    # a bug: its text (which may quote a request's values) goes to the log, not to the caller
    log.error("database error: %s", _describe(exc, seconds))
    return InternalError(f"database error: {type(exc).__name__}")


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Return a connection to the pool as it is.

    asyncpg's default reset costs a round trip per call (RESET ALL, UNLISTEN, ...).
    Nothing here changes session state outside a transaction (SET LOCAL,
    transaction-level advisory locks, no LISTEN), so there is nothing to reset;
    asyncpg still rolls back a transaction left open.
    """


async def _init_connection(conn: asyncpg.Connection) -> None:
    # binary, so that COPY (the request logs) can send jsonb: its binary form is a
    # version byte, 1, then the JSON text; an orjson.Fragment goes as it is. Exact both
    # ways (json_text): jsonb keeps an integer of any size (an HTTP caller's context may
    # hold one), and orjson alone would refuse to write it and read it back as a float.
    await conn.set_type_codec(
        "jsonb",
        schema="pg_catalog",
        encoder=lambda value: _JSONB_VERSION + json_text.dumps(value),
        decoder=lambda data: json_text.loads(data[1:]),
        format="binary",
    )


def _terminate(conn: asyncpg.Connection | None) -> None:
    """Close a connection at once, without a round trip; the pool opens a new one when needed."""
    if conn is not None:
        with contextlib.suppress(asyncpg.InterfaceError):  # already lost and handed back
            conn.terminate()


def _describe(exc: BaseException, seconds: float) -> str:
    if isinstance(exc, TimeoutError):  # connecting and the statements shared the bound
        return f"no answer within {seconds:g} s (DATABASE_COMMAND_TIMEOUT_SECONDS, or the call's deadline)"
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
