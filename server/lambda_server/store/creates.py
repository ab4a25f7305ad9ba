"""Concurrent Initializes stored together: one statement counts each owner's use and
inserts every create of the batch that stays within its owner's caps.

One batch is in the database at a time; the creates that arrive meanwhile wait
for the next, so the batch grows with the load (group commit) and a lone create
waits for nothing. A batch takes one create of each waiting owner in turn, up to
MAX_BATCH creates and MAX_BATCH_BYTES of scripts, so one owner's burst of large
scripts delays another owner's create by at most one batch.

The statement admits each owner's creates in their order of arrival, each while
one more session and its bytes stay within both caps, exactly as if they had come
one after the other: a create too large for the bytes left is refused, and a
smaller one after it may still fit. A request_id stored already is not counted
again (the caller finds the stored session); a request_id twice in the queue
waits for the next batch, where it is the retry of a stored one.

Across replicas, each batch holds a transaction-level advisory lock on each of its
owners (two int4 keys, a space apart from the one-bigint keys of migrations and
the cleanup; taken in key order, so two replicas never wait on each other in a
cycle), in a statement of its own before the insert: in READ COMMITTED each
statement sees what committed before it began, so the count includes every batch
that held the owner's lock before this one, and the caps stay exact on any number
of replicas. The transaction costs four round trips a batch, not a create.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import asyncpg

from lambda_server.domain import Deadline, NewSession
from lambda_server.errors import DeadlineExceeded, InternalError
from lambda_server.store.database import Database

MAX_BATCH = 256
MAX_BATCH_BYTES = 4 * 1024 * 1024  # of scripts; a larger create goes alone
OWNER_LOCK_CLASS = 0x6F776E72  # "ownr"
_LOCK_OWNERS = """
SELECT count(pg_advisory_xact_lock($1, key))
FROM (SELECT DISTINCT hashtext(owner) AS key FROM unnest($2::text[]) AS owner ORDER BY key) AS keys
"""

# `asked`: the batch, k numbering each owner's creates in order. `counted`: each owner's
# unexpired active sessions, counted over sessions_owner_active_idx (at most
# max_sessions entries; the expired ones are outside the scanned range), by the owners
# as values the planner sees (a join on them would be planned for the average owner,
# a scan of the table where few owners hold many sessions). `admitted`:
# each owner's creates in order, k = 0 being its use before the batch; a create is
# admitted while it is new and one more session and its bytes stay within both caps,
# and carries the use after it (unchanged by a create not admitted: the use its
# refusal reports). One row a create, in order, with the stored session when it was
# inserted (none: refused, or its request_id was stored already) and when the owner's
# oldest session, this batch's included, expires: the earliest a refused one may fit.
_INSERT_MANY = """
WITH RECURSIVE asked AS MATERIALIZED (
    SELECT a.*, row_number() OVER (PARTITION BY a.owner ORDER BY a.n) AS k,
           octet_length(a.script_content)::bigint + octet_length(a.context::text) AS bytes,
           EXISTS (SELECT FROM meta.sessions s WHERE s.request_id = a.request_id) AS stored
    FROM unnest($1::uuid[], $2::text[], $3::text[], $4::float8[], $5::jsonb[], $6::text[],
                $7::text[], $8::jsonb[], $9::text[], $10::jsonb[], $11::text[])
         WITH ORDINALITY AS a(request_id, language_title, user_id, expiry, context, script_content,
                              script_hash, metadata, compile_status, compile_options, owner, n)
), counted AS (
    SELECT owner, count(*) AS sessions, sum(stored_bytes)::bigint AS bytes,
           min(expires_at) AS oldest_expires_at
    FROM meta.sessions
    WHERE owner = ANY($11::text[]) AND status = 'active' AND expires_at > now()
    GROUP BY owner
), used AS (
    SELECT o.owner, coalesce(c.sessions, 0) AS sessions, coalesce(c.bytes, 0) AS bytes,
           c.oldest_expires_at
    FROM (SELECT DISTINCT owner FROM asked) AS o LEFT JOIN counted c USING (owner)
), admitted(owner, k, sessions, bytes, admit) AS (
    SELECT owner, 0::bigint, sessions, bytes, false FROM used
    UNION ALL
    SELECT p.owner, a.k, p.sessions + f.fits::int, p.bytes + CASE WHEN f.fits THEN a.bytes ELSE 0 END,
           f.fits
    FROM admitted p
    JOIN asked a ON a.owner = p.owner AND a.k = p.k + 1
    CROSS JOIN LATERAL (
        VALUES (NOT a.stored AND p.sessions < $12 AND p.bytes + a.bytes <= $13)
    ) AS f(fits)
), inserted AS (
    INSERT INTO meta.sessions
        (request_id, language_title, user_id, expires_at, context, script_content,
         script_hash, compile_status, metadata, compile_options, owner, stored_bytes)
    SELECT a.request_id, a.language_title, a.user_id, now() + make_interval(secs => a.expiry),
           a.context, a.script_content, a.script_hash, a.compile_status, a.metadata,
           a.compile_options, a.owner, a.bytes
    FROM asked a JOIN admitted USING (owner, k)
    WHERE admitted.admit
    ORDER BY a.n
    ON CONFLICT (request_id) DO NOTHING
    RETURNING request_id, language_title, user_id, created_at, expires_at, last_executed_at,
              execution_count, script_hash, context, true AS live, owner
)
SELECT inserted.*, admitted.sessions AS used_sessions, admitted.bytes AS used_bytes,
       a.bytes AS new_bytes,
       extract(epoch FROM least(
           used.oldest_expires_at,
           (SELECT min(i.expires_at) FROM inserted i WHERE i.owner = a.owner)
       ) - now())::float8 AS oldest_expires_in
FROM asked a
JOIN admitted USING (owner, k)
JOIN used USING (owner)
LEFT JOIN inserted ON inserted.request_id = a.request_id
ORDER BY a.n
"""

# A session no quota counts (a tool's or test's): stored as it comes.
_INSERT_ONE = """
INSERT INTO meta.sessions
    (request_id, language_title, user_id, expires_at, context, script_content,
     script_hash, compile_status, metadata, compile_options, owner, stored_bytes)
VALUES ($1, $2, $3, now() + make_interval(secs => $4), $5, $6, $7, $9, $8, $10, $11,
        octet_length($6::text)::bigint + octet_length($5::jsonb::text))
ON CONFLICT (request_id) DO NOTHING
RETURNING request_id, language_title, user_id, created_at, expires_at, last_executed_at,
          execution_count, script_hash, context, true AS live
"""


@dataclass(frozen=True)
class OwnerQuota:
    """What one owner's active (unexpired) sessions may hold: MAX_SESSIONS_PER_OWNER
    sessions, and MAX_SCRIPT_BYTES_PER_OWNER bytes of scripts and contexts."""

    max_sessions: int
    max_bytes: int


_Create = tuple[NewSession, "asyncio.Future[asyncpg.Record]"]


class CreateBatcher:
    """Stores creates in batches on a pooled connection, one batch in the database at a time."""

    def __init__(
        self, db: Database, quota: OwnerQuota | None, observe: Callable[[int], None] | None = None
    ) -> None:
        """`quota`: each owner's caps; None caps nobody (and nothing is batched)."""
        self._db = db
        self._quota = quota
        self._observe = observe  # told each batch's size
        self._pending: dict[str, deque[_Create]] = {}  # by owner, the next owner to serve first
        self._sender: asyncio.Task[None] | None = None

    async def create(self, new: NewSession, deadline: Deadline) -> asyncpg.Record | None:
        """The statement's row for `new`: the stored session and its owner's use (see above);
        None when no quota counts it and its request_id was stored already."""
        owner = new.owner
        if self._quota is None or owner is None:
            return await self._db.fetchrow(deadline, _INSERT_ONE, *_columns(new), owner)
        stored: asyncio.Future[asyncpg.Record] = asyncio.get_running_loop().create_future()
        self._pending.setdefault(owner, deque()).append((new, stored))
        if self._sender is None:
            self._sender = asyncio.create_task(self._send())
        try:
            async with asyncio.timeout(deadline.remaining()):
                return await stored
        except TimeoutError:
            raise DeadlineExceeded(
                f"the call's deadline passed while {owner}'s Initialize waited to be stored"
            ) from None

    async def _send(self) -> None:
        """Send batches until no create is waiting."""
        try:
            while self._pending:
                batch = self._take()
                if batch:
                    await self._send_batch(batch)
        finally:
            self._sender = None

    def _take(self) -> list[_Create]:
        """One create of each waiting owner in turn, within MAX_BATCH and MAX_BATCH_BYTES;
        an owner served goes behind the others for the next batch."""
        batch: list[_Create] = []
        names: set[str] = set()
        size = 0
        while self._pending:
            served = 0
            for owner in list(self._pending):
                queue = self._pending[owner]
                while queue and queue[0][1].done():  # its caller gave up
                    queue.popleft()
                if queue and queue[0][0].request_id in names:  # its retry waits for the next batch
                    continue
                if queue:
                    script = len(queue[0][0].script_content)
                    if len(batch) == MAX_BATCH or (batch and size + script > MAX_BATCH_BYTES):
                        return batch
                    batch.append(queue.popleft())
                    names.add(batch[-1][0].request_id)
                    size += script
                    served += 1
                del self._pending[owner]
                if queue:
                    self._pending[owner] = queue
            if not served:
                break
        return batch

    async def _send_batch(self, batch: list[_Create]) -> None:
        if self._observe is not None:
            self._observe(len(batch))
        try:
            rows = await self._store([new for new, _ in batch])
        except InternalError as exc:
            if len(batch) == 1:
                _fail(batch, exc)
                return
            # A create PostgreSQL refused (a value past its column): nothing of the batch
            # was stored, so each is stored alone and only that one fails.
            for create in batch:
                await self._send_batch([create])
            return
        except Exception as exc:  # our error (UNAVAILABLE, DEADLINE) for every create of the batch
            _fail(batch, exc)
            return
        except BaseException:  # cancelled at shutdown: the callers are cancelled too
            for _, stored in batch:
                stored.cancel()
            raise
        for (_, stored), row in zip(batch, rows, strict=True):
            if not stored.done():
                stored.set_result(row)

    async def _store(self, creates: Sequence[NewSession]) -> list[asyncpg.Record]:
        assert self._quota is not None
        columns = list(zip(*(_columns(new) for new in creates), strict=True))
        owners = [new.owner for new in creates]
        # The command timeout bounds a batch; each caller waits within its own deadline.
        async with self._db.connection(Deadline.after(None)) as conn, conn.transaction():
            await conn.execute(_LOCK_OWNERS, OWNER_LOCK_CLASS, owners)
            rows: list[asyncpg.Record] = await conn.fetch(
                _INSERT_MANY, *columns, owners, self._quota.max_sessions, self._quota.max_bytes
            )
            return rows

    async def close(self) -> None:
        """Stop sending (creates waiting are cancelled)."""
        if self._sender is not None:
            self._sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sender
        for queue in self._pending.values():
            for _, stored in queue:
                stored.cancel()
        self._pending.clear()


def _fail(batch: list[_Create], exc: Exception) -> None:
    for _, stored in batch:
        if not stored.done():
            stored.set_exception(exc)


def _columns(new: NewSession) -> tuple[object, ...]:
    """A create's values, in the order of the statements' first ten parameters."""
    return (
        new.request_id,
        new.language_title,
        new.user_id,
        float(new.expiry_seconds),
        new.context,
        new.script_content,
        new.script_hash,
        new.metadata,
        new.compile_status.value,
        new.compile_options,
    )
