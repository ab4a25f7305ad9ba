"""Session claims of concurrent Executes sent to PostgreSQL together, one statement for many.

Each Execute still makes one round trip; what it shares is the statement. While
one batch is in the database, the claims that arrive wait for the next, so the
batch grows with the load (group commit) and a lone call waits for nothing.
A batch costs PostgreSQL and the server a fraction of one statement a claim
(measured: about 4 us of client CPU a claim in a batch of 16, against 80 us for
a statement of its own through the pool).

A claim that the batch could not make comes back as None and is made again
alone by the caller (SessionStore.claim): a session that is missing, expired or
another user's (the lone statement tells which), or one whose row another
transaction holds. The batch skips locked rows rather than waiting for them, so
one held row never delays the claims of other sessions.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import asyncpg

from lambda_server.domain import Deadline
from lambda_server.errors import (
    DatabaseUnavailable,
    DeadlineExceeded,
    LambdaError,
    own_instance,
)
from lambda_server.store.database import Database, DedicatedConnection
from lambda_server.tasks import cancel_and_wait

log = logging.getLogger(__name__)

MAX_BATCH = 256

# Each statement sets synchronous_commit for its own transaction ($3): off unless
# DATABASE_CLAIM_SYNCHRONOUS_COMMIT is on (see DatabaseSettings).
_RETURNING = """
RETURNING s.request_id::text AS request_id, s.language_title, s.user_id, s.script_hash,
          s.context, s.metadata, s.compile_options, s.options,
          s.compile_status, s.dependencies->>'layer_id' AS layer_id,
          extract(epoch FROM s.expires_at - now())::float8 AS expires_in
"""

_CLAIM_ONE = (
    """
UPDATE meta.sessions s
SET execution_count = s.execution_count + $4, last_executed_at = now()
WHERE s.request_id = (
    SELECT request_id FROM meta.sessions
    WHERE request_id = $1 AND user_id IS NOT DISTINCT FROM $2 AND status = 'active' AND expires_at > now()
    FOR UPDATE SKIP LOCKED
) AND set_config('synchronous_commit', $3, true) IS NOT NULL
"""
    + _RETURNING
)

# Counted by each claim's count: a session claimed k times in the batch, for n1 ... nk
# executions (an ExecuteBatch claims once for its items), gains n1 + ... + nk.
_CLAIM_MANY = (
    """
WITH asked AS (
    SELECT id, owner, sum(n)::int AS times
    FROM unnest($1::uuid[], $2::text[], $4::int[]) AS asked(id, owner, n)
    GROUP BY id, owner
), claimable AS (
    SELECT s.request_id, asked.times
    FROM meta.sessions s
    JOIN asked ON s.request_id = asked.id AND s.user_id IS NOT DISTINCT FROM asked.owner
    WHERE s.status = 'active' AND s.expires_at > now()
    FOR UPDATE OF s SKIP LOCKED
)
UPDATE meta.sessions s
SET execution_count = s.execution_count + claimable.times, last_executed_at = now()
FROM claimable
WHERE s.request_id = claimable.request_id AND set_config('synchronous_commit', $3, true) IS NOT NULL
"""
    + _RETURNING
)

_Claim = tuple[str, str | None, int, "asyncio.Future[asyncpg.Record | None]"]


class ClaimBatcher:
    """Claims sessions in batches on a connection of its own; one batch in the database at a time."""

    def __init__(self, db: Database, observe: Callable[[int], None] | None = None) -> None:
        self._connection = DedicatedConnection(db)
        self._command_timeout = db.settings.command_timeout
        self._commit_mode = "on" if db.settings.claim_synchronous_commit else "off"
        self._observe = observe  # told each batch's size
        self._pending: list[_Claim] = []
        self._sender: asyncio.Task[None] | None = None

    async def claim(
        self, request_id: str, user_id: str | None, deadline: Deadline, count: int = 1
    ) -> asyncpg.Record | None:
        """The claimed session's row, counted `count` executions, or None when this batch could
        not claim it (see above)."""
        seconds = deadline.cap(self._command_timeout)
        if seconds <= 0:
            raise DeadlineExceeded("the call's deadline passed before reaching the database")
        claimed: asyncio.Future[asyncpg.Record | None] = asyncio.get_running_loop().create_future()
        self._pending.append((request_id, user_id, count, claimed))
        if self._sender is None:
            self._sender = asyncio.create_task(self._send())
        try:
            async with asyncio.timeout(seconds):
                return await claimed
        except TimeoutError:
            raise DatabaseUnavailable(
                f"database unavailable: the session claim had no answer within {seconds:g} s"
            ) from None

    async def _send(self) -> None:
        """Send batches until no claim is waiting."""
        try:
            while self._pending:
                batch, self._pending = self._pending[:MAX_BATCH], self._pending[MAX_BATCH:]
                batch = [claim for claim in batch if not claim[3].done()]  # its caller gave up
                if batch:
                    await self._send_batch(batch)
        finally:
            self._sender = None

    async def _send_batch(self, batch: list[_Claim]) -> None:
        if self._observe is not None:
            self._observe(len(batch))
        try:
            if len(batch) == 1:  # the plain statement costs PostgreSQL a quarter less
                request_id, user_id, count, _ = batch[0]
                rows = await self._connection.fetch(
                    self._command_timeout, _CLAIM_ONE, request_id, user_id, self._commit_mode, count
                )
            else:
                ids, owners = [claim[0] for claim in batch], [claim[1] for claim in batch]
                counts = [claim[2] for claim in batch]
                rows = await self._connection.fetch(
                    self._command_timeout, _CLAIM_MANY, ids, owners, self._commit_mode, counts
                )
        except Exception as exc:  # our error (UNAVAILABLE, INTERNAL) for every claim of the batch
            if not isinstance(exc, LambdaError):
                log.exception("a batch of session claims failed")
            for *_, claimed in batch:
                if not claimed.done():  # an instance each: one raised in many tasks tangles their tracebacks
                    claimed.set_exception(own_instance(exc))
            return
        except BaseException:  # cancelled at shutdown: the callers are cancelled too
            for *_, claimed in batch:
                claimed.cancel()
            raise
        found = {row["request_id"]: row for row in rows}
        for request_id, user_id, _, claimed in batch:
            row = found.get(request_id)
            if not claimed.done():
                claimed.set_result(row if row is not None and row["user_id"] == user_id else None)

    async def close(self) -> None:
        """Stop sending (claims waiting are cancelled) and give the connection back."""
        if self._sender is not None:
            await cancel_and_wait(self._sender)
        for *_, claimed in self._pending:
            claimed.cancel()
        self._pending.clear()
        await self._connection.release()
