"""Applies the numbered SQL files of migrations/ once each, in order, under an advisory lock."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from lambda_server.domain import Deadline
from lambda_server.errors import InternalError
from lambda_server.store.database import Database

log = logging.getLogger(__name__)

# One constant lock id: two replicas starting together apply migrations one at a time.
_LOCK_ID = 0x6C616D6264  # "lambd"
_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")


@dataclass(frozen=True)
class Migration:
    version: str
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def default_directory() -> Path:
    """migrations/ inside an installed wheel, else at the top of the source tree."""
    here = Path(__file__).resolve().parent.parent
    for candidate in (here / "migrations", here.parent.parent / "migrations"):
        if candidate.is_dir():
            return candidate
    raise InternalError(f"no migrations directory beside {here}")


def load(directory: Path) -> list[Migration]:
    migrations = []
    for path in sorted(directory.glob("*.sql")):
        match = _NAME.match(path.name)
        if match is None:
            raise InternalError(f"migration file {path.name} is not named NNNN_name.sql")
        migrations.append(Migration(match.group(1), path.name, path.read_text()))
    versions = [m.version for m in migrations]
    if len(set(versions)) != len(versions):
        raise InternalError(f"two migrations share a number in {directory}")
    return migrations


async def apply(db: Database, migrations: list[Migration], timeout: float = 60.0) -> list[str]:
    """Apply what is not applied yet, in one transaction; return the names applied."""
    applied: list[str] = []
    async with db.connection(Deadline.after(timeout), budget=timeout) as conn, conn.transaction():
        await conn.execute(f"SET LOCAL statement_timeout = {int(timeout * 1000)}")
        await conn.execute(f"SET LOCAL lock_timeout = {int(timeout * 1000)}")
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _LOCK_ID)
        await conn.execute(
            """
            CREATE SCHEMA IF NOT EXISTS meta;
            CREATE TABLE IF NOT EXISTS meta.schema_migrations (
                version    text PRIMARY KEY,
                name       text NOT NULL,
                checksum   text NOT NULL,
                applied_at timestamptz NOT NULL DEFAULT now()
            );
            """
        )
        done = {
            row["version"]: row["checksum"]
            for row in await conn.fetch("SELECT version, checksum FROM meta.schema_migrations")
        }
        for migration in migrations:
            if migration.version in done:
                if done[migration.version] != migration.checksum:
                    log.warning("migration %s changed after it was applied", migration.name)
                continue
            await conn.execute(migration.sql)
            await conn.execute(
                "INSERT INTO meta.schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                migration.version,
                migration.name,
                migration.checksum,
            )
            applied.append(migration.name)
    for name in applied:
        log.info("applied migration %s", name)
    return applied


class Migrator:
    """The migrations step, done once per process: by start-up after PostgreSQL's first
    answer and before serving, or (start-up went on without PostgreSQL,
    DATABASE_STARTUP_TIMEOUT_SECONDS=0) by the database monitor once it answers, before
    health turns SERVING. `lambda-server migrate` runs it alone."""

    def __init__(self, db: Database, migrations: list[Migration], timeout: float = 60.0) -> None:
        self._db = db
        self._migrations = migrations
        self._timeout = timeout
        self._done = False
        self._lock = asyncio.Lock()  # a monitor's check and start-up's never apply twice

    async def run_once(self) -> list[str]:
        """Apply what is not applied yet, unless this process did already; the names applied."""
        if self._done:
            return []
        async with self._lock:
            if self._done:
                return []
            applied = await apply(self._db, self._migrations, self._timeout)
            self._done = True
            return applied
