"""Migrations: numbered files applied once each, in order, under an advisory lock, recorded in a
table; an explicit step of start-up (before serving) and of `lambda-server migrate`."""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg
import pytest

from lambda_microservice import LambdaClient, to_python
from lambda_microservice.v1 import lambda_service_pb2 as pb
from lambda_server.app import build_server
from lambda_server.config import DatabaseSettings
from lambda_server.errors import InternalError
from lambda_server.store import migrations
from lambda_server.store.database import Database
from tests.proxy import DatabaseProxy
from tests.support import ServerThread, eventually, run_sync, server_settings, serving_before_the_database


async def _apply_concurrently(url: str, found: list[migrations.Migration], times: int) -> list[list[str]]:
    databases = [Database(DatabaseSettings(), url) for _ in range(times)]
    for db in databases:
        await db.open()
    try:
        return await asyncio.gather(*(migrations.apply(db, found) for db in databases))
    finally:
        for db in databases:
            await db.close()


def test_concurrent_starts_apply_each_migration_exactly_once(fresh_database: str) -> None:
    found = migrations.load(migrations.default_directory())
    assert [m.version for m in found] == sorted(m.version for m in found)
    results = run_sync(_apply_concurrently(fresh_database, found, 4))
    applied = [name for result in results for name in result]
    assert sorted(applied) == sorted(m.name for m in found)  # once, by one of the four
    assert run_sync(_apply_concurrently(fresh_database, found, 1)) == [[]]

    async def recorded() -> list[str]:
        conn = await asyncpg.connect(fresh_database)
        try:
            rows = await conn.fetch("SELECT name FROM meta.schema_migrations ORDER BY version")
            return [row["name"] for row in rows]
        finally:
            await conn.close()

    assert run_sync(recorded()) == [m.name for m in found]


def test_a_badly_named_migration_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "0001_ok.sql").write_text("SELECT 1;")
    (tmp_path / "second.sql").write_text("SELECT 1;")
    with pytest.raises(InternalError, match=r"second\.sql"):
        migrations.load(tmp_path)


def test_a_failing_migration_applies_nothing(fresh_database: str, tmp_path: Path) -> None:
    (tmp_path / "0001_good.sql").write_text("CREATE TABLE public.good (id int);")
    (tmp_path / "0002_bad.sql").write_text("CREATE TABLE public.bad (id nosuchtype);")
    with pytest.raises(InternalError):
        run_sync(_apply_concurrently(fresh_database, migrations.load(tmp_path), 1))

    async def tables() -> set[str]:
        conn = await asyncpg.connect(fresh_database)
        try:
            rows = await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
            return {row["tablename"] for row in rows}
        finally:
            await conn.close()

    assert "good" not in run_sync(tables())


async def _recorded(url: str) -> list[str]:
    """The migrations recorded in `url`'s database ([] before the first)."""
    conn = await asyncpg.connect(url, timeout=10)
    try:
        if not await conn.fetchval("SELECT to_regclass('meta.schema_migrations') IS NOT NULL"):
            return []
        rows = await conn.fetch("SELECT name FROM meta.schema_migrations ORDER BY version")
        return [row["name"] for row in rows]
    finally:
        await conn.close()


def test_start_applies_the_migrations_before_it_serves(fresh_database: str) -> None:
    shipped = [m.name for m in migrations.load(migrations.default_directory())]

    async def scenario() -> tuple[list[str], list[str]]:
        server, _ = await build_server(server_settings(), fresh_database)
        try:
            wired = await _recorded(fresh_database)  # wiring touches no schema
            await server.start()
            return wired, await _recorded(fresh_database)
        finally:
            await server.stop(0)

    assert run_sync(scenario()) == ([], shipped)


def test_a_server_started_before_its_database_migrates_once_it_answers(fresh_database: str) -> None:
    """DATABASE_STARTUP_TIMEOUT_SECONDS=0: serving, NOT_SERVING, no schema; once PostgreSQL
    answers, the monitor applies the migrations (the same step start-up runs), then SERVING."""
    proxy = DatabaseProxy(fresh_database)
    proxy.set_mode("reset")
    try:
        running = ServerThread(serving_before_the_database(server_settings()), proxy.url)
        try:
            with LambdaClient(running.target, timeout=10) as client:
                assert client.health().status == pb.HEALTH_STATUS_NOT_SERVING
                assert run_sync(_recorded(fresh_database)) == []
                proxy.set_mode("up")
                eventually(lambda: client.health().status == pb.HEALTH_STATUS_SERVING, timeout=20)
                shipped = [m.name for m in migrations.load(migrations.default_directory())]
                assert run_sync(_recorded(fresh_database)) == shipped
                session = client.initialize("python-late", "result = 'migrated'")
                assert to_python(client.execute(session.request_id).result) == "migrated"
        finally:
            running.stop()
    finally:
        proxy.close()
