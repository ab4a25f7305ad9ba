"""An owner's concurrent Initializes stored together: one statement counts the owner's use
and inserts every create of the batch that stays within its caps.

On a replica, each owner has one batch in the database at a time; its creates
that arrive meanwhile wait for the next, so the batch grows with the load (group
commit) and a lone create waits for nothing. A batch holds at most MAX_BATCH
creates and MAX_BATCH_BYTES of scripts. Owners never share a batch: each owner's
goes on a pooled connection of its own, so one owner's burst of large scripts
never holds up another's create, and each statement names one owner, which the
planner sees (a statement over several owners was planned for the average owner,
and scanned every active session where a few owners held most of them).

The statement admits the batch's creates in their order of arrival, each while
one more session and its bytes stay within both caps, exactly as if they had come
one after the other: a create too large for the bytes left is refused, and a
smaller one after it may still fit. A request_id stored already is not counted
again (the caller finds the stored session); a request_id twice in the queue
waits for the next batch (with the owner's creates after it), where it is the
retry of a stored one. The statement does not look request_ids up before it
counts: each create counts as new, and the insert skips one stored already (ON
CONFLICT). Where such a retry was counted before a create the caps refused, the
batch is rolled back and counted again with that request_id known to be stored
(a retry at the owner's cap: rare). A lookup in the statement cost an index
probe a create, or, in a generic plan made while the table was small, a scan
of every session a batch, until autovacuum's next ANALYZE (a fresh database
under load).

A create with dependencies is stored in a batch of its own: under the owner's lock, the
bytes of the distinct layers the owner's sessions use and of its own layer (counted
once) are checked against MAX_LAYER_BYTES_PER_OWNER before it is inserted
(QUOTA_EXCEEDED, nothing stored), so that concurrent Initializes adding new layers
cannot pass that quota together either.

Across replicas, each batch holds a transaction-level advisory lock on its owner
(two int4 keys, a space apart from the one-bigint keys of migrations and the
cleanup), taken in a statement of its own before the insert: in READ COMMITTED
each statement sees what committed before it began, so the count includes every
batch that held the lock before this one, and the caps stay exact on any number
of replicas. The transaction costs four round trips a batch, not a create.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import asyncpg

from lambda_server.domain import JSON, Deadline, NewSession, SessionDependencies, SessionOptions
from lambda_server.errors import DeadlineExceeded, InternalError, own_instance
from lambda_server.store.database import Database
from lambda_server.store.layers import refuse_past_layer_quota
from lambda_server.tasks import cancel_and_wait

MAX_BATCH = 256
MAX_BATCH_BYTES = 4 * 1024 * 1024  # of scripts; a larger create goes alone
OWNER_LOCK_CLASS = 0x6F776E72  # "ownr"
_LOCK_OWNER = "SELECT pg_advisory_xact_lock($1, hashtext($2))"

# `used`: the owner's unexpired active sessions and their bytes, read from meta.owner_usage
# (migration 0009: the active sessions per owner and minute of expiry, kept by triggers in
# the transactions that change meta.sessions) for the minutes from the next one on, plus
# the sessions that expire before that minute (`soon`), counted over
# sessions_owner_active_idx: exact by the database clock, in at most one row a minute of
# SESSION_EXPIRY_SECONDS and one minute of the owner's sessions, where a count of every
# session cost up to max_sessions index entries (and their heap pages) a batch. Whichever
# index a plan takes for `soon`, its range is one minute of expiries. The oldest is the
# first entry of sessions_owner_active_idx from (owner, now()): bounded by row comparisons
# and ordered by (owner, expires_at), which that index alone gives. As min(expires_at) with
# `owner = $13`, a generic plan made while the table was small, or while one owner held
# most sessions, walked sessions_active_expires_at_idx from now() and filtered out every
# other owner's sessions before this owner's first (tens of thousands a create).
# `asked`: the batch in order; `stored`: its request_ids in $16, those found stored
# already by an earlier try of the batch. `admitted`: n = 0 is the use before the
# batch; each create is admitted while it is not known stored and one more session and
# its bytes stay within both caps, and carries the use after it (unchanged by a create
# not admitted: the use its refusal reports). One row a create, in order, with the
# stored session when it was inserted (none: refused, or its request_id was stored
# already), whether it was counted, and when the owner's oldest session, this batch's
# included, expires: the earliest a refused create may fit.
# `used` (the owner is $13), shared by both create statements: the comment above says how.
_USED = """    SELECT later.sessions + soon.sessions AS sessions, later.bytes + soon.bytes AS bytes,
           (SELECT s.expires_at FROM meta.sessions s
            WHERE s.status = 'active' AND (s.owner, s.expires_at) > ($13, now())
              AND (s.owner, s.expires_at) < ($13, timestamptz 'infinity')
            ORDER BY s.owner, s.expires_at LIMIT 1) AS oldest_expires_at
    FROM (SELECT coalesce(sum(sessions), 0)::bigint AS sessions,
                 coalesce(sum(bytes), 0)::bigint AS bytes
          FROM meta.owner_usage
          WHERE owner = $13 AND minute >= meta.usage_minute(now()) + interval '1 minute') AS later,
         (SELECT count(*) AS sessions, coalesce(sum(stored_bytes), 0)::bigint AS bytes
          FROM meta.sessions
          WHERE owner = $13 AND status = 'active' AND expires_at > now()
            AND expires_at < meta.usage_minute(now()) + interval '1 minute') AS soon
"""

_INSERT_MANY = f"""
WITH RECURSIVE used AS (
{_USED}), asked AS MATERIALIZED (
    SELECT a.*, octet_length(a.script_content)::bigint + octet_length(a.context::text) AS bytes,
           a.request_id = ANY($16::uuid[]) AS stored
    FROM unnest($1::uuid[], $2::text[], $3::text[], $4::float8[], $5::jsonb[], $6::text[],
                $7::text[], $8::jsonb[], $9::text[], $10::jsonb[], $11::jsonb[], $12::jsonb[])
         WITH ORDINALITY AS a(request_id, language_title, user_id, expiry, context, script_content,
                              script_hash, metadata, compile_status, compile_options, options,
                              dependencies, n)
), admitted(n, sessions, bytes, admit) AS (
    SELECT 0::bigint, used.sessions, used.bytes, false FROM used
    UNION ALL
    SELECT a.n, p.sessions + f.fits::int, p.bytes + CASE WHEN f.fits THEN a.bytes ELSE 0 END, f.fits
    FROM admitted p
    JOIN asked a ON a.n = p.n + 1
    CROSS JOIN LATERAL (
        VALUES (NOT a.stored AND p.sessions < $14 AND p.bytes + a.bytes <= $15)
    ) AS f(fits)
), inserted AS (
    INSERT INTO meta.sessions
        (request_id, language_title, user_id, expires_at, context, script_content,
         script_hash, compile_status, metadata, compile_options, options, owner, stored_bytes,
         dependencies)
    SELECT a.request_id, a.language_title, a.user_id, now() + make_interval(secs => a.expiry),
           a.context, a.script_content, a.script_hash, a.compile_status, a.metadata,
           a.compile_options, a.options, $13, a.bytes, a.dependencies
    FROM asked a JOIN admitted USING (n)
    WHERE admitted.admit
    ORDER BY a.n
    ON CONFLICT (request_id) DO NOTHING
    RETURNING request_id, language_title, user_id, created_at, expires_at, last_executed_at,
              execution_count, script_hash, context, options, compile_status, compile_error,
              compile_options, dependencies, true AS live
)
SELECT inserted.*, admitted.sessions AS used_sessions, admitted.bytes AS used_bytes,
       a.bytes AS new_bytes, admitted.admit AS counted,
       extract(epoch FROM least(used.oldest_expires_at, (SELECT min(expires_at) FROM inserted))
                          - now())::float8 AS oldest_expires_in
FROM asked a
JOIN admitted USING (n)
CROSS JOIN used
LEFT JOIN inserted ON inserted.request_id = a.request_id
ORDER BY a.n
"""

# A batch of one: _INSERT_MANY's answer for a single create, at a fraction of its
# planning. A retry counted as new refuses nothing after it: it is never counted again.
_INSERT_COUNTED = f"""
WITH used AS (
{_USED}), new AS (
    SELECT octet_length($6::text)::bigint + octet_length($5::jsonb::text) AS bytes
), inserted AS (
    INSERT INTO meta.sessions
        (request_id, language_title, user_id, expires_at, context, script_content,
         script_hash, compile_status, metadata, compile_options, options, owner, stored_bytes,
         dependencies)
    SELECT $1, $2, $3, now() + make_interval(secs => $4), $5, $6, $7, $9, $8, $10, $11, $13, new.bytes, $12
    FROM used, new
    WHERE used.sessions < $14 AND used.bytes + new.bytes <= $15
    ON CONFLICT (request_id) DO NOTHING
    RETURNING request_id, language_title, user_id, created_at, expires_at, last_executed_at,
              execution_count, script_hash, context, options, compile_status, compile_error,
              compile_options, dependencies, true AS live
)
SELECT inserted.*, used.sessions AS used_sessions, used.bytes AS used_bytes, new.bytes AS new_bytes,
       (used.sessions < $14 AND used.bytes + new.bytes <= $15) AS counted,
       extract(epoch FROM used.oldest_expires_at - now())::float8 AS oldest_expires_in
FROM used CROSS JOIN new LEFT JOIN inserted ON true
"""

# A session no quota counts (a tool's or test's): stored as it comes.
_INSERT_ONE = """
INSERT INTO meta.sessions
    (request_id, language_title, user_id, expires_at, context, script_content,
     script_hash, compile_status, metadata, compile_options, options, owner, stored_bytes,
         dependencies)
VALUES ($1, $2, $3, now() + make_interval(secs => $4), $5, $6, $7, $9, $8, $10, $11, $13,
        octet_length($6::text)::bigint + octet_length($5::jsonb::text), $12)
ON CONFLICT (request_id) DO NOTHING
RETURNING request_id, language_title, user_id, created_at, expires_at, last_executed_at,
          execution_count, script_hash, context, options, compile_status, compile_error,
          compile_options, dependencies, true AS live
"""


@dataclass(frozen=True)
class OwnerQuota:
    """What one owner's active (unexpired) sessions may hold: MAX_SESSIONS_PER_OWNER
    sessions, MAX_SCRIPT_BYTES_PER_OWNER bytes of scripts and contexts, and
    MAX_LAYER_BYTES_PER_OWNER bytes of the distinct layers they use (None: not counted)."""

    max_sessions: int
    max_bytes: int
    max_layer_bytes: int | None = None


_Create = tuple[NewSession, "asyncio.Future[asyncpg.Record]"]


class CreateBatcher:
    """Stores creates in per-owner batches, each on a pooled connection while it runs."""

    def __init__(
        self, db: Database, quota: OwnerQuota | None, observe: Callable[[int], None] | None = None
    ) -> None:
        """`quota`: each owner's caps; None caps nobody (and nothing is batched)."""
        self._db = db
        self._quota = quota
        self._observe = observe  # told each batch's size
        self._pending: dict[str, deque[_Create]] = {}
        self._senders: dict[str, asyncio.Task[None] | None] = {}  # None: a create stored alone

    async def create(self, new: NewSession, deadline: Deadline) -> asyncpg.Record | None:
        """The statement's row for `new`: the stored session and its owner's use (see above);
        None when no quota counts it and its request_id was stored already."""
        owner = new.owner
        if self._quota is None or owner is None:
            return await self._db.fetchrow(deadline, _INSERT_ONE, *_columns(new), owner)
        if owner not in self._senders:  # alone: stored by this call, without a task
            return await self._alone(owner, new, deadline)
        stored: asyncio.Future[asyncpg.Record] = asyncio.get_running_loop().create_future()
        self._pending.setdefault(owner, deque()).append((new, stored))
        if owner not in self._senders:
            self._senders[owner] = asyncio.create_task(self._send(owner))
        try:
            async with asyncio.timeout(deadline.remaining()):
                return await stored
        except TimeoutError:
            raise DeadlineExceeded(
                f"the call's deadline passed while {owner}'s other Initializes were stored"
            ) from None

    async def _alone(self, owner: str, new: NewSession, deadline: Deadline) -> asyncpg.Record:
        """A create that found its owner idle; those that come meanwhile wait for a sender,
        started when this one is stored (or failed, or cancelled)."""
        self._senders[owner] = None
        if self._observe is not None:
            self._observe(1)
        try:
            return (await self._store(owner, [new], deadline))[0]
        finally:
            del self._senders[owner]
            if self._pending.get(owner):
                self._senders[owner] = asyncio.create_task(self._send(owner))

    async def _send(self, owner: str) -> None:
        """Send the owner's batches until none of its creates is waiting."""
        try:
            while queue := self._pending.get(owner):
                batch = self._take(queue)
                if not queue:  # those that come during the batch start a new queue
                    del self._pending[owner]
                if batch:
                    await self._send_batch(owner, batch)
        finally:
            del self._senders[owner]

    @staticmethod
    def _take(queue: deque[_Create]) -> list[_Create]:
        """The owner's creates in order, within MAX_BATCH and MAX_BATCH_BYTES, up to a
        request_id already in the batch."""
        batch: list[_Create] = []
        names: set[str] = set()
        size = 0
        while queue:
            new, stored = queue[0]
            if stored.done():  # its caller gave up
                queue.popleft()
                continue
            script = len(new.script_content)
            full = len(batch) == MAX_BATCH or (batch and size + script > MAX_BATCH_BYTES)
            if full or new.request_id in names or (batch and new.dependencies is not None):
                break
            batch.append(queue.popleft())
            names.add(new.request_id)
            size += script
            if new.dependencies is not None:  # alone: its layer is counted before it is stored
                break
        return batch

    async def _send_batch(self, owner: str, batch: list[_Create]) -> None:
        if self._observe is not None:
            self._observe(len(batch))
        try:
            rows = await self._store(owner, [new for new, _ in batch], Deadline.after(None))
        except InternalError as exc:
            if len(batch) == 1:
                _fail(batch, exc)
                return
            # A create PostgreSQL refused (a value past its column): nothing of the batch
            # was stored, so each is stored alone and only that one fails.
            for create in batch:
                await self._send_batch(owner, [create])
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

    async def _store(
        self, owner: str, creates: Sequence[NewSession], deadline: Deadline
    ) -> list[asyncpg.Record]:
        """Within the command timeout and `deadline` (none for a batch: each caller waits
        for it within its own)."""
        assert self._quota is not None
        caps = (owner, self._quota.max_sessions, self._quota.max_bytes)
        stored: list[str] = []  # request_ids an earlier try found stored already
        async with self._db.connection(deadline) as conn:
            while True:  # each try knows one more stored request_id: at most len(creates)
                try:
                    async with conn.transaction():
                        await conn.execute(_LOCK_OWNER, OWNER_LOCK_CLASS, owner)
                        rows: list[asyncpg.Record]
                        if len(creates) == 1:
                            layers = self._quota.max_layer_bytes
                            dependencies = creates[0].dependencies
                            if dependencies is not None and layers is not None:
                                await refuse_past_layer_quota(conn, owner, dependencies.layer_id, layers)
                            rows = await conn.fetch(_INSERT_COUNTED, *_columns(creates[0]), *caps)
                            return rows
                        columns = list(zip(*(_columns(new) for new in creates), strict=True))
                        rows = await conn.fetch(_INSERT_MANY, *columns, *caps, stored)
                        recount = _counted_retries(creates, rows)
                        if recount:
                            raise _Recount(recount)  # rolls the batch back
                        return rows
                except _Recount as again:
                    stored.extend(again.request_ids)

    async def close(self) -> None:
        """Stop sending (creates waiting are cancelled)."""
        for sender in list(self._senders.values()):
            if sender is None:  # its caller is cancelled with the server
                continue
            await cancel_and_wait(sender)
        for queue in self._pending.values():
            for _, stored in queue:
                stored.cancel()
        self._pending.clear()


class _Recount(Exception):
    """A batch to count again, knowing these request_ids stored already."""

    def __init__(self, request_ids: list[str]) -> None:
        super().__init__(request_ids)
        self.request_ids = request_ids


def _counted_retries(creates: Sequence[NewSession], rows: list[asyncpg.Record]) -> list[str]:
    """The request_ids counted as new but stored already (the insert skipped them), when a
    create after the first of them was refused: its refusal may be owed to their count.
    [] when the batch's answer is exact."""
    retried = [i for i, row in enumerate(rows) if row["counted"] and row["request_id"] is None]
    if not retried or all(row["counted"] for row in rows[retried[0] + 1 :]):
        return []
    return [creates[i].request_id for i in retried]


def _fail(batch: list[_Create], exc: Exception) -> None:
    """Each waiting create gets its own instance of the batch's failure."""
    for _, stored in batch:
        if not stored.done():
            stored.set_exception(own_instance(exc))


def _columns(new: NewSession) -> tuple[object, ...]:
    """A create's values, in the order of the statements' first twelve parameters."""
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
        None if new.optimization is None else {"optimization_level": new.optimization.value},
        None if new.options is None else options_column(new.options),
        None if new.dependencies is None else dependencies_column(new.dependencies),
    )


def dependencies_column(dependencies: SessionDependencies) -> dict[str, JSON]:
    """meta.sessions.dependencies (store/sessions.py reads it back; migration 0010)."""
    return {
        "requirements": list(dependencies.requirements),
        "runtime": dependencies.runtime,
        "layer_id": dependencies.layer_id,
        "lock": dependencies.lock,
        "packages": [[p.name, p.version, p.hash] for p in dependencies.packages],
    }


def options_column(options: SessionOptions) -> dict[str, JSON]:
    """meta.sessions.options (store/sessions.py reads it back)."""
    return {
        "timeout_seconds": options.timeout_seconds,
        "memory_mb": options.memory_mb,
        "max_processes": options.max_processes,
        "cache_ttl_seconds": options.cache_ttl_seconds,
    }
