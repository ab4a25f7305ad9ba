"""Expired sessions: marked `expired`, then deleted after the retention, by one replica at a time.

The same pass removes compiled programs (meta.artifacts) that no unexpired
session uses and that are older than RUST_ARTIFACT_RETENTION_SECONDS, a few at
a time (a program may be tens of MiB), and the records of layers (meta.layers)
that no unexpired session uses, older than LAYER_RETENTION_SECONDS (each server
removes the layers' folders itself: runtimes/layers.py).

Each pass works in small batches, each its own short transaction that first
takes a transaction-level advisory lock with pg_try_advisory_xact_lock: a replica
that finds it taken skips the batch, so two replicas never clean at once and no
replica ever waits on another. Rows are picked with FOR UPDATE SKIP LOCKED, so
a batch never waits on an Execute counting the same session either, and holds
its row locks only for the milliseconds of its batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from lambda_server.domain import Deadline
from lambda_server.errors import LambdaError
from lambda_server.metrics import Metrics
from lambda_server.store.database import Database

log = logging.getLogger(__name__)

LOCK_ID = 0x6C616D6265  # "lambe": one cleaner at a time across replicas
BATCH = 1000
BATCH_SECONDS = 5.0
ARTIFACT_BATCH = 20  # programs of up to RUST_MAX_PROGRAM_BYTES each

_MARK = """
WITH due AS (
    SELECT request_id FROM meta.sessions
    WHERE status = 'active' AND expires_at <= now()
    LIMIT $1 FOR UPDATE SKIP LOCKED
)
UPDATE meta.sessions s SET status = 'expired' FROM due WHERE s.request_id = due.request_id
"""

_DELETE = """
WITH due AS (
    SELECT request_id FROM meta.sessions
    WHERE expires_at <= now() - make_interval(secs => $2)
    LIMIT $1 FOR UPDATE SKIP LOCKED
)
DELETE FROM meta.sessions s USING due WHERE s.request_id = due.request_id
"""

# by script hash and optimization level (a session without compile options runs the
# debug program); sessions_script_hash_idx makes each look-up an index probe
_DELETE_ARTIFACTS = """
WITH due AS (
    SELECT a.artifact_key FROM meta.artifacts a
    WHERE a.created_at <= now() - make_interval(secs => $2)
      AND NOT EXISTS (
          SELECT 1 FROM meta.sessions s
          WHERE s.script_hash = a.script_hash
            AND coalesce(s.compile_options->>'optimization_level', 'debug') = a.optimization
            AND s.status = 'active' AND s.expires_at > now()
      )
    LIMIT $1 FOR UPDATE SKIP LOCKED
)
DELETE FROM meta.artifacts a USING due WHERE a.artifact_key = due.artifact_key
"""

# layers (meta.layers) no unexpired session uses, recorded before the retention
_DELETE_LAYERS = """
WITH due AS (
    SELECT l.layer_id FROM meta.layers l
    WHERE l.created_at <= now() - make_interval(secs => $2)
      AND NOT EXISTS (
          SELECT 1 FROM meta.sessions s
          WHERE s.dependencies->>'layer_id' = l.layer_id AND s.dependencies IS NOT NULL
            AND s.status = 'active' AND s.expires_at > now()
      )
    LIMIT $1 FOR UPDATE SKIP LOCKED
)
DELETE FROM meta.layers l USING due WHERE l.layer_id = due.layer_id
"""

# the flush numbers of replicas that wrote none for a day (store/hot_sessions.py): gone
_DELETE_COUNT_FLUSHES = "DELETE FROM meta.count_flushes WHERE written_at < now() - interval '1 day'"

_ACTIVE = "SELECT count(*) FROM meta.sessions WHERE status = 'active' AND expires_at > now()"


class SessionCleanup:
    """A periodic pass over expired sessions; `run_once` is one pass, for tests and tools."""

    def __init__(
        self,
        db: Database,
        interval: float,
        retention_seconds: int,
        metrics: Metrics,
        artifact_retention_seconds: float = 86400.0,
        layer_retention_seconds: float = 86400.0,
    ) -> None:
        self._db = db
        self._interval = interval
        self._retention = float(retention_seconds)
        self._artifact_retention = artifact_retention_seconds
        self._layer_retention = layer_retention_seconds
        self._metrics = metrics
        self._task: asyncio.Task[None] | None = None
        # what this replica has done, also in the lambda_sessions_cleaned metric
        self.done = {"expired": 0, "deleted": 0}
        self.artifacts_deleted = 0
        self.layers_deleted = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    async def run_once(self) -> tuple[int, int] | None:
        """Mark and delete what is due; (marked, deleted), or None when another replica holds the lock."""
        totals = []
        for action, statement, args in (
            ("expired", _MARK, (BATCH,)),
            ("deleted", _DELETE, (BATCH, self._retention)),
        ):
            total = 0
            while True:
                done = await self._batch(statement, *args)
                if done is None:
                    return None
                total += done
                self.done[action] += done
                self._metrics.sessions_cleaned.labels(action).inc(done)
                if done < BATCH:
                    break
            totals.append(total)
        while True:
            done = await self._batch(_DELETE_ARTIFACTS, ARTIFACT_BATCH, self._artifact_retention)
            if done is None:
                return None
            self.artifacts_deleted += done
            if done < ARTIFACT_BATCH:
                break
        while True:
            done = await self._batch(_DELETE_LAYERS, BATCH, self._layer_retention)
            if done is None:
                return None
            self.layers_deleted += done
            if done < BATCH:
                break
        if await self._batch(_DELETE_COUNT_FLUSHES) is None:
            return None
        marked, deleted = totals
        return marked, deleted

    async def count_active(self) -> None:
        """Set the active-sessions gauge (each replica exports it, cleaning or not)."""
        async with self._db.connection(Deadline.after(BATCH_SECONDS)) as conn:
            self._metrics.active_sessions.set(await conn.fetchval(_ACTIVE))

    async def _batch(self, statement: str, *args: object) -> int | None:
        async with self._db.connection(Deadline.after(BATCH_SECONDS)) as conn, conn.transaction():
            if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", LOCK_ID):
                return None
            status = await conn.execute(statement, *args)
        return int(status.rpartition(" ")[2])

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            artifacts = self.artifacts_deleted
            try:
                outcome = await self.run_once()
                await self.count_active()
            except LambdaError as exc:  # the database is away: the next pass tries again
                log.warning("session cleanup: %s", exc.message)
                continue
            except Exception:  # a bug: say so, and keep cleaning
                log.exception("session cleanup failed")
                continue
            if outcome is None:
                log.debug("session cleanup: another replica is cleaning")
            elif any(outcome):
                log.info("session cleanup: %d marked expired, %d deleted", *outcome)
            if self.artifacts_deleted > artifacts:
                log.info("cleanup: %d unused programs deleted", self.artifacts_deleted - artifacts)
