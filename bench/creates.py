"""SessionStore.create throughput, without gRPC: one owner's creates at 16 and 64 in flight,
and 16 owners' (one in flight each), on a throwaway database.

    python -m bench.creates [--seconds 4] [--rounds 3] [--mode store|plain]

`store` is SessionStore.create with a quota (the caps far away, so every create is
counted and stored); `plain` is the statement Initialize ran before the quotas
existed (one INSERT ... ON CONFLICT DO NOTHING through the pool), for comparison.
It measures whichever lambda_server is importable: put another checkout's `server/`
first on PYTHONPATH to measure that one with the same probe.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable

import asyncpg

from lambda_server.config import DatabaseSettings
from lambda_server.domain import Deadline, NewSession
from lambda_server.store import migrations
from lambda_server.store.database import Database
from lambda_server.store.sessions import OwnerQuota, SessionStore

SCRIPT = "def handler(event):\n    return event['params']['n'] + 1"
HASH = hashlib.sha256(SCRIPT.encode()).hexdigest()
ADMIN_URL = os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")

# The statement of commit 48e5668, the last before the quotas.
_PLAIN = """
INSERT INTO meta.sessions
    (request_id, language_title, user_id, expires_at, context,
     script_content, script_hash, compile_status, metadata, compile_options)
VALUES ($1, $2, $3, now() + make_interval(secs => $4), $5, $6, $7, $9, $8, $10)
ON CONFLICT (request_id) DO NOTHING
RETURNING request_id
"""

SHAPES = (("one owner", 16, 1), ("one owner", 64, 1), ("16 owners", 16, 16))


def new_session(owner: str) -> NewSession:
    return NewSession(str(uuid.uuid4()), "python-bench", None, {}, SCRIPT, HASH, 3600, owner=owner)


async def rate(
    create: Callable[[NewSession], Awaitable[object]], in_flight: int, owners: int, seconds: float
) -> float:
    """Creates answered a second by `in_flight` callers spread over `owners` owners."""
    tag = uuid.uuid4().hex[:8]
    done = 0

    async def caller(i: int, stop: float) -> None:
        nonlocal done
        owner = f"user:bench-{tag}-{i % owners}"
        while time.perf_counter() < stop:
            await create(new_session(owner))
            done += 1

    warm = time.perf_counter() + 0.5
    await asyncio.gather(*(caller(i, warm) for i in range(in_flight)))
    done = 0
    started = time.perf_counter()
    await asyncio.gather(*(caller(i, started + seconds) for i in range(in_flight)))
    return done / (time.perf_counter() - started)


async def main(
    seconds: float, rounds: int, mode: str, shapes: tuple[tuple[str, int, int], ...] = SHAPES
) -> None:
    name = f"lambda_bench_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(ADMIN_URL, timeout=10)
    await admin.execute(f'CREATE DATABASE "{name}"')
    url = ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    db = Database(DatabaseSettings(), url)
    await db.open()
    try:
        await migrations.apply(db, migrations.load(migrations.default_directory()))
        store = SessionStore(db, quota=OwnerQuota(max_sessions=10**9, max_bytes=10**15))

        async def plain(new: NewSession) -> object:
            return await db.fetchrow(
                Deadline.after(10), _PLAIN, new.request_id, new.language_title, None, 3600.0, {},
                new.script_content, new.script_hash, None, "success", None,
            )  # fmt: skip

        async def stored(new: NewSession) -> object:
            return await store.create(new, Deadline.after(10))

        create = plain if mode == "plain" else stored
        for label, in_flight, owners in shapes:
            rates = [await rate(create, in_flight, owners, seconds) for _ in range(rounds)]
            print(
                f"{mode:6} {label:10} {in_flight:3} in flight: median {statistics.median(rates):6.0f}/s"
                f"  ({', '.join(f'{r:.0f}' for r in rates)})",
                flush=True,
            )
        await store.close()
    finally:
        await db.close()
        await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        await admin.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--mode", choices=("store", "plain"), default="store")
    parser.add_argument(
        "--shape", type=int, choices=range(len(SHAPES)), help="only SHAPES[n], on a fresh table"
    )
    options = parser.parse_args()
    shapes = SHAPES if options.shape is None else (SHAPES[options.shape],)
    asyncio.run(main(options.seconds, options.rounds, options.mode, shapes))
