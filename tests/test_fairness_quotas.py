"""Issue 14, finding 10 and build item 9: Initialize has a per-owner rate, and each owner's
active sessions and the bytes they store are capped; a second owner is served throughout."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import asyncpg
import grpc
import jwt
import pytest

from lambda_microservice import AsyncLambdaClient, LambdaClient, LambdaError, to_python
from lambda_microservice.v1 import lambda_service_pb2 as pb
from lambda_server.config import AuthSettings, DatabaseSettings, Settings
from lambda_server.domain import Deadline, NewSession
from lambda_server.errors import QuotaExceeded
from lambda_server.store import migrations
from lambda_server.store.creates import _INSERT_COUNTED, _INSERT_MANY
from lambda_server.store.database import Database
from lambda_server.store.sessions import OwnerQuota, SessionStore
from tests.support import ServerThread, eventually, run_sync, server_settings

SECRET = "a-test-secret-of-at-least-32-bytes!!"
SCRIPT = "result = 1\n"


def bearer(sub: str) -> tuple[tuple[str, str], ...]:
    claims = {"sub": sub, "scope": "execute:all", "exp": int(time.time()) + 300}
    return (("authorization", f"Bearer {jwt.encode(claims, SECRET, algorithm='HS256')}"),)


def subjects() -> tuple[str, str]:
    """An attacker and a victim of this test's own, so tests sharing the database never
    count each other's sessions."""
    tag = uuid.uuid4().hex[:8]
    return f"attacker-{tag}", f"victim-{tag}"


@contextmanager
def quota_server(database_url: str, expiry: int = 600, **auth: Any) -> Iterator[ServerThread]:
    """A jwt server with the quotas given; the Initialize rate limit is off unless given."""
    settings = AuthSettings(mode="jwt", jwt_secret=SECRET, **{"initialize_rate_limit_per_minute": 0, **auth})
    running = ServerThread(
        replace(server_settings(), auth=settings, session_expiry_seconds=expiry), database_url
    )
    try:
        yield running
    finally:
        running.stop()


async def initialize_all(
    target: str, calls: list[tuple[str, str, str | None]]
) -> list[pb.InitializeResponse | LambdaError]:
    """Every (subject, script, request_id) Initialize at once; each one's answer or error."""
    clients = {sub: AsyncLambdaClient(target, timeout=60, metadata=bearer(sub)) for sub, _, _ in calls}
    try:
        return await asyncio.gather(
            *(clients[sub].initialize("python-quota", script, request_id=rid) for sub, script, rid in calls),
            return_exceptions=True,
        )
    finally:
        for client in clients.values():
            await client.close()


def owner_use(database_url: str, sub: str) -> tuple[int, int]:
    """The rows an owner has in meta.sessions, and the bytes of their scripts."""

    async def query() -> tuple[int, int]:
        conn = await asyncpg.connect(database_url, timeout=5)
        try:
            row = await conn.fetchrow(
                "SELECT count(*) AS n, coalesce(sum(octet_length(script_content)), 0) AS b "
                "FROM meta.sessions WHERE owner = $1",
                f"user:{sub}",
            )
            assert row is not None
            return int(row["n"]), int(row["b"])
        finally:
            await conn.close()

    return run_sync(query())


def refused_by_quota(error: object, setting: str) -> LambdaError:
    assert isinstance(error, LambdaError), error
    assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED and error.reason == "QUOTA_EXCEEDED", error
    assert setting in error.message and error.metadata["setting"] == setting, error
    assert error.retry_after is not None and error.retry_after >= 1.0, error
    return error


def incompressible_script(i: int, random_bytes: int) -> str:
    """A valid script of about 4/3 random_bytes that no compression shrinks."""
    return f"# {base64.b64encode(os.urandom(random_bytes)).decode()}\nresult = {100 + i}\n"


# --- finding 10: the bytes an owner stores ----------------------------------------------


def test_finding_10_a_flood_of_incompressible_scripts_stops_at_the_owners_byte_cap(
    database_url: str,
) -> None:
    attacker, victim = subjects()
    scripts = [incompressible_script(i, 600_000) for i in range(40)]  # 800 KB each, < MAX_SCRIPT_SIZE
    stored = len(scripts[0].encode()) + len(b"{}")  # a session stores its script and context
    cap = 4_000_000
    with quota_server(database_url, max_script_bytes_per_owner=cap, max_sessions_per_owner=1000) as running:
        calls: list[tuple[str, str, str | None]] = [(attacker, s, None) for s in scripts]
        calls.insert(20, (victim, SCRIPT, None))  # in the middle of the flood
        answers = run_sync(initialize_all(running.target, calls))
    victims = answers.pop(20)
    assert isinstance(victims, pb.InitializeResponse), victims
    created = [a for a in answers if isinstance(a, pb.InitializeResponse)]
    assert len(created) == cap // stored == 4, [str(a) for a in answers][:3]
    for refusal in (a for a in answers if not isinstance(a, pb.InitializeResponse)):
        refused_by_quota(refusal, "MAX_SCRIPT_BYTES_PER_OWNER")
    rows, script_bytes = owner_use(database_url, attacker)
    assert rows == len(created) and script_bytes <= cap
    assert owner_use(database_url, victim)[0] == 1


# --- the session count, at once ---------------------------------------------------------


def test_twenty_initializes_at_once_create_exactly_the_cap_and_a_retry_still_answers(
    database_url: str,
) -> None:
    attacker, victim = subjects()
    cap = 5
    with quota_server(database_url, max_sessions_per_owner=cap) as running:
        warm = LambdaClient(running.target, timeout=30, metadata=bearer(f"warm-{attacker}"))
        with warm:  # the script is checked once; the 20 meet in the insert, not in the checker
            warm.initialize("python-quota", SCRIPT)
        calls: list[tuple[str, str, str | None]] = [(attacker, SCRIPT, str(uuid.uuid4())) for _ in range(20)]
        calls.append((victim, SCRIPT, None))
        answers = run_sync(initialize_all(running.target, calls))
        assert isinstance(answers.pop(), pb.InitializeResponse)
        created = [a for a in answers if isinstance(a, pb.InitializeResponse)]
        assert len(created) == cap, answers
        for refusal in (a for a in answers if not isinstance(a, pb.InitializeResponse)):
            error = refused_by_quota(refusal, "MAX_SESSIONS_PER_OWNER")
            assert f"{cap} active sessions" in error.message
            # when the oldest session expires, by the database clock: the expiry given
            assert error.retry_after is not None and 500 < error.retry_after <= 600
        assert owner_use(database_url, attacker)[0] == cap
        # at the cap, a retry of a stored request_id is answered with its session, not counted
        first = created[0]
        with LambdaClient(running.target, timeout=30, metadata=bearer(attacker)) as client:
            again = client.initialize("python-quota", SCRIPT, request_id=first.request_id)
            assert (again.request_id, again.expires_at) == (first.request_id, first.expires_at)
            with pytest.raises(LambdaError) as refused:
                client.initialize("python-quota", SCRIPT)
            refused_by_quota(refused.value, "MAX_SESSIONS_PER_OWNER")
        assert owner_use(database_url, attacker)[0] == cap


def test_expired_sessions_stop_counting_after_the_retry_delay(database_url: str) -> None:
    attacker, _ = subjects()
    expiry = 2  # SESSION_EXPIRY_SECONDS: the retry delay comes from it
    with (
        quota_server(database_url, expiry=expiry, max_sessions_per_owner=2) as running,
        LambdaClient(running.target, timeout=30, metadata=bearer(attacker)) as client,
    ):
        client.initialize("python-quota", SCRIPT)
        client.initialize("python-quota", SCRIPT)
        with pytest.raises(LambdaError) as refused:
            client.initialize("python-quota", SCRIPT)
        error = refused_by_quota(refused.value, "MAX_SESSIONS_PER_OWNER")
        assert error.retry_after is not None and error.retry_after <= expiry
        time.sleep(error.retry_after)
        # no cleanup pass has run: `expires_at > now()` alone stops counting them
        eventually(lambda: client.initialize("python-quota", SCRIPT), timeout=expiry + 5)


# --- the Initialize rate ----------------------------------------------------------------


def test_the_initialize_rate_limit_refuses_the_owner_past_it_and_serves_another(
    database_url: str,
) -> None:
    attacker, victim = subjects()
    rate = 2  # a minute: a bucket of 2, one token back every 30 s
    with (
        quota_server(database_url, initialize_rate_limit_per_minute=rate) as running,
        LambdaClient(running.target, timeout=30, metadata=bearer(attacker)) as client,
        LambdaClient(running.target, timeout=30, metadata=bearer(victim)) as other,
    ):
        session = client.initialize("python-quota", SCRIPT)
        client.initialize("python-quota", SCRIPT)
        for _ in range(5):
            with pytest.raises(LambdaError) as refused:
                client.initialize("python-quota", SCRIPT)
            error = refused.value
            assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED and error.reason == "RATE_LIMITED"
            assert "RATE_LIMIT_INITIALIZE_PER_MINUTE" in error.message
            assert error.retry_after is not None and 0 < error.retry_after <= 60 / rate
        assert other.initialize("python-quota", SCRIPT).request_id
        assert other.initialize("python-quota", SCRIPT).request_id
        # executions are counted in buckets of their own
        assert to_python(client.execute(session.request_id).result) == 1
    assert owner_use(database_url, attacker)[0] == rate


def test_make_runs_defaults_never_throttle_an_anonymous_initialize(database_url: str) -> None:
    defaults = Settings.from_env({})
    assert defaults.auth.anonymous_initialize_rate_limit_per_minute == 0
    running = ServerThread(
        replace(defaults, listen_addr="127.0.0.1:0", metrics_addr=None, http_addr=None), database_url
    )
    try:
        with LambdaClient(running.target, timeout=30) as client:
            # more than a user's RATE_LIMIT_INITIALIZE_PER_MINUTE (60)
            assert len({client.initialize("python-quota", SCRIPT).request_id for _ in range(100)}) == 100
    finally:
        running.stop()


# --- the statement's cost ---------------------------------------------------------------


def test_the_quota_reads_the_owners_use_from_a_few_rows_never_its_sessions(fresh_database: str) -> None:
    """10,000 active and 10,000 expired sessions of one owner: the use comes from
    meta.owner_usage (one row a minute of expiry) and the owner's sessions expiring before
    the next minute (none here), over sessions_owner_active_idx; no scan reads the
    owner's sessions one by one, nor the table."""

    async def test() -> None:
        db = Database(DatabaseSettings(command_timeout=30.0, statement_timeout_ms=30_000), fresh_database)
        await db.open()
        try:
            await migrations.apply(db, migrations.load(migrations.default_directory()))
            async with db.connection(Deadline.after(60)) as conn:
                await conn.execute(
                    "INSERT INTO meta.sessions (request_id, language_title, expires_at, script_content,"
                    " owner, stored_bytes) SELECT gen_random_uuid(), 'python-q', now() + make_interval("
                    "secs => CASE WHEN n % 2 = 0 THEN 3600 ELSE -60 END), 'result = 1', 'user:many', 10"
                    " FROM generate_series(1, 20000) AS n"
                )
                await conn.execute("VACUUM ANALYZE meta.sessions")
                explained = conn.transaction()  # EXPLAIN ANALYZE inserts: rolled back
                await explained.start()
                plan = await conn.fetchval(
                    f"EXPLAIN (ANALYZE, FORMAT JSON) {_INSERT_MANY}", *_insert_args("user:many", 10_000)
                )
                await explained.rollback()
            plan = json.loads(plan) if isinstance(plan, str) else plan
            scans = [n for n in _nodes(plan[0]["Plan"]) if "Relation Name" in n or "Index Name" in n]
            assert {n.get("Relation Name") for n in scans} >= {"owner_usage", "sessions"}, scans
            assert not [n for n in scans if n["Node Type"] == "Seq Scan"], scans
            # the owner's minutes (one), its oldest session (one), the sessions expiring
            # before the next minute (none)
            assert max(n["Actual Rows"] for n in scans) <= 1, scans
            # and through the store: the owner is at its cap, so it is refused
            store = SessionStore(db, quota=OwnerQuota(max_sessions=10_000, max_bytes=10**9))
            new = NewSession(str(uuid.uuid4()), "python-q", None, {}, SCRIPT, "h" * 64, 60, owner="user:many")
            with pytest.raises(QuotaExceeded) as refused:
                await store.create(new, Deadline.after(10))
            assert refused.value.metadata["sessions"] == "10000"
            await store.close()
        finally:
            await db.close()

    run_sync(test())


# The two create statements, prepared by hand, and their parameters for one small create.
_ONE = "uuid, text, text, float8, jsonb, text, text, jsonb, text, jsonb, jsonb, jsonb, text, bigint, bigint"
_ONE_ARGS = (
    "gen_random_uuid(), 'python-q', NULL, 3600, '{}', 'result = 1', 'h', NULL, 'success', NULL, NULL, NULL"
)
_MANY = (
    "uuid[], text[], text[], float8[], jsonb[], text[], text[], jsonb[], text[], jsonb[], jsonb[],"
    " jsonb[], text, bigint, bigint, uuid[]"
)
_MANY_ARGS = (
    "ARRAY[gen_random_uuid()], ARRAY['python-q'], ARRAY[NULL], ARRAY[3600], ARRAY['{}'::jsonb],"
    " ARRAY['result = 1'], ARRAY['h'], ARRAY[NULL::jsonb], ARRAY['success'], ARRAY[NULL::jsonb],"
    " ARRAY[NULL::jsonb], ARRAY[NULL::jsonb]"
)


@pytest.mark.parametrize(
    ("statement", "types", "args", "more"),
    [(_INSERT_COUNTED, _ONE, _ONE_ARGS, ""), (_INSERT_MANY, _MANY, _MANY_ARGS, ", '{}'")],
    ids=["alone", "batch"],
)
def test_generic_plans_read_a_few_rows_whatever_the_statistics_said(
    fresh_database: str, statement: str, types: str, args: str, more: str
) -> None:
    """PostgreSQL keeps a prepared statement's generic plan until the table is analyzed
    again. One made on a small table (a fresh database under load, within autovacuum's
    minute), and one made while one owner held every session, must not read sessions one
    by one when another owner creates (a look-up of the batch's request_ids in the
    statement scanned the whole table a batch)."""
    # another owner's sessions, expiring before user:small's and in its minute
    insert = (
        "INSERT INTO meta.sessions (request_id, language_title, expires_at, script_content, owner,"
        " stored_bytes) SELECT gen_random_uuid(), 'python-q', now() + CASE WHEN n % 2 = 0"
        " THEN interval '30 minutes' ELSE interval '3599.9 seconds' END, 'result = 1', 'user:big', 10"
        " FROM generate_series(1, $1::int) AS n"
    )
    execute = f"EXECUTE create_one ({args}, 'user:small', 10000, 1000000000{more})"

    async def most_rows_read(conn: asyncpg.Connection) -> tuple[int, list[Any]]:
        explained = conn.transaction()  # EXPLAIN ANALYZE inserts: rolled back
        await explained.start()
        plan = await conn.fetchval(f"EXPLAIN (ANALYZE, FORMAT JSON) {execute}")
        await explained.rollback()
        plan = json.loads(plan) if isinstance(plan, str) else plan
        scans = [n for n in _nodes(plan[0]["Plan"]) if "Relation Name" in n or "Index Name" in n]
        return max(n["Actual Rows"] for n in scans), scans

    async def test() -> None:
        db = Database(DatabaseSettings(command_timeout=30.0, statement_timeout_ms=30_000), fresh_database)
        await db.open()
        try:
            await migrations.apply(db, migrations.load(migrations.default_directory()))
            async with db.connection(Deadline.after(60)) as conn:
                await conn.execute(f"PREPARE create_one ({types}) AS {statement}")
                await conn.execute("SET plan_cache_mode = force_generic_plan")
                await conn.execute(insert, 100)
                await conn.fetch(execute)  # the plan, made on a small table
                await conn.execute(insert, 20_000)
                rows, scans = await most_rows_read(conn)
                assert rows <= 1, scans
                await conn.execute("ANALYZE meta.sessions")  # a new plan: one owner holds all
                rows, scans = await most_rows_read(conn)
                assert rows <= 1, scans
        finally:
            await db.close()

    run_sync(test())


def _insert_args(owner: str, max_sessions: int) -> tuple[Any, ...]:
    """_INSERT_MANY's parameters for a batch of one small session of `owner`."""
    session = (uuid.uuid4(), "python-q", None, 60.0, {}, SCRIPT, "h" * 64, None, "success", None, None, None)
    return (*([value] for value in session), owner, max_sessions, 10**9, [])


def _nodes(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield node
    for child in node.get("Plans", ()):
        yield from _nodes(child)
