"""Sessions validated recently, kept in memory; their executions counted write-behind.

A claim (store/claims.py) finds a session active, unexpired and the caller's, and
counts it. A replica may keep what the claim returned for SESSION_CACHE_SECONDS
and, for a call of the same owner in that time, skip PostgreSQL: the execution is
added to a counter of the session, which a task of its own flushes every
SESSION_COUNT_FLUSH_MS in one statement for every session counted since the last.

Expiry is by the database's clock: the claim returns how many seconds the session
had left by PostgreSQL's now(), and the entry lasts, on this replica's monotonic
clock from before the claim was sent, at most that minus a margin. So an entry
never outlives `expires_at`, whatever the clocks of the hosts say. What the cache
cannot see, for at most SESSION_CACHE_SECONDS: a session whose `expires_at` or
status another writer changed (cleanup only touches sessions past `expires_at`,
which no entry outlives).

Counts: a counted execution is in PostgreSQL after the next flush. A crash of the
server (not a graceful stop, which flushes) loses what it counted in its last
SESSION_COUNT_FLUSH_MS, plus a flush that failed and waits for the next. A flush sets
last_executed_at to its own time.

A flush is numbered (per replica: a random id at each start), and its statement adds
its counts only when its number is past the replica's last one in meta.count_flushes
(migration 0011), which it records in the same transaction. A flush that failed is sent
again as it was, with its number, before any newer count: one whose answer was lost
after PostgreSQL committed it (a reply cut by the network, a command timeout, a caller
cancelled) adds nothing the second time, one that never arrived adds its counts then.
So a count is never added twice, whatever failed.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass

from lambda_server.domain import ClaimedSession, Deadline
from lambda_server.errors import LambdaError
from lambda_server.store.database import Database
from lambda_server.tasks import cancel_and_wait

log = logging.getLogger(__name__)

MAX_ENTRIES = 4096  # sessions kept; the least recently used goes first
# An entry ends this long before the session's expires_at (by the database clock).
EXPIRY_MARGIN_SECONDS = 0.25
RETRY_SECONDS = 1.0  # after a flush that failed

# One statement for every session counted since the last flush, sent in request_id order
# (two replicas' flushes of the same sessions mostly lock them in the same order; a
# deadlock fails one, whose counts are sent again). A session deleted since is skipped,
# its count with it.
# The flush's number ($5) is recorded for the replica ($4) only when past its last one:
# the counts are added only then (a data-modifying WITH runs whether or not it is read).
_FLUSH = """
WITH numbered AS (
    INSERT INTO meta.count_flushes AS f (replica, flush) VALUES ($4, $5)
    ON CONFLICT (replica) DO UPDATE SET flush = excluded.flush, written_at = now()
    WHERE f.flush < excluded.flush
    RETURNING 1
)
UPDATE meta.sessions s
SET execution_count = s.execution_count + counted.n, last_executed_at = now()
FROM unnest($1::uuid[], $2::int[]) AS counted(id, n)
WHERE s.request_id = counted.id AND EXISTS (SELECT 1 FROM numbered)
  AND set_config('synchronous_commit', $3, true) IS NOT NULL
"""


@dataclass(frozen=True)
class _Entry:
    session: ClaimedSession
    until: float  # monotonic


class SessionCache:
    """Claimed sessions by request_id, each until a monotonic time; bounded in number."""

    def __init__(self, seconds: float, max_entries: int = MAX_ENTRIES) -> None:
        self._seconds = seconds
        self._max_entries = max_entries
        self._entries: OrderedDict[str, _Entry] = OrderedDict()

    def get(self, request_id: str, user_id: str | None) -> ClaimedSession | None:
        """The session when kept, still valid, and `user_id`'s; None: ask the database."""
        entry = self._entries.get(request_id)
        if entry is None:
            return None
        if time.monotonic() >= entry.until:
            del self._entries[request_id]
            return None
        if entry.session.user_id != user_id:  # another user's: the database refuses it
            return None
        self._entries.move_to_end(request_id)
        return entry.session

    def put(self, session: ClaimedSession, sent_at: float, expires_in: float | None) -> None:
        """Keep a session claimed by a statement sent at `sent_at` (monotonic), which then had
        `expires_in` seconds left by the database clock."""
        if expires_in is None:
            return
        lasts = min(self._seconds, expires_in - EXPIRY_MARGIN_SECONDS)
        if lasts <= 0:
            return
        self._entries[session.request_id] = _Entry(session, sent_at + lasts)
        self._entries.move_to_end(session.request_id)
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


class CountWriter:
    """Executions counted in memory, flushed in one statement for many sessions."""

    def __init__(self, db: Database, flush_ms: int) -> None:
        self._db = db
        self._interval = flush_ms / 1000
        self._commit_mode = "on" if db.settings.claim_synchronous_commit else "off"
        self._pending: dict[str, int] = {}
        self._replica = str(uuid.uuid4())  # this process's flushes, numbered from 1
        self._flushes = 0
        # the flush being sent, or one that failed, sent again as it was (its number, its
        # counts) before any other: until its statement answered
        self._unsent: tuple[int, dict[str, int]] | None = None
        self._lock = asyncio.Lock()  # one flush at a time
        self._wake = asyncio.Event()
        self._flusher: asyncio.Task[None] | None = None
        self._closed = False

    def add(self, request_id: str, count: int) -> None:
        """Count `count` executions of a session, in PostgreSQL after the next flush."""
        self._pending[request_id] = self._pending.get(request_id, 0) + count
        self._wake.set()
        if self._flusher is None and not self._closed:
            self._flusher = asyncio.create_task(self._flush_every_interval())

    def pending(self, request_id: str) -> int:
        """Executions of a session counted and not known in PostgreSQL (being sent, or sent
        by a flush that failed, included)."""
        unsent = self._unsent[1].get(request_id, 0) if self._unsent is not None else 0
        return self._pending.get(request_id, 0) + unsent

    async def flush_session(self, request_id: str) -> None:
        """Make a session's counts visible in PostgreSQL (with every other pending one);
        nothing to do when it has none. DatabaseUnavailable when the flush fails."""
        if self.pending(request_id):
            await self.flush()

    async def flush(self) -> None:
        """Send every pending count, after the flush under way (a failed flush first, as it
        was); a flush that fails is kept, to be sent again by the next."""
        async with self._lock:
            if self._unsent is not None:  # a failed one first, as it was
                await self._send(*self._unsent)
                self._unsent = None
            if not self._pending:
                return
            self._flushes += 1
            self._unsent, self._pending = (self._flushes, self._pending), {}
            await self._send(*self._unsent)  # failed or cancelled: kept, for the next flush
            self._unsent = None

    def _waiting(self) -> tuple[int, int]:
        """(executions, sessions) counted and not known in PostgreSQL."""
        waiting = dict(self._pending)
        for request_id, count in (self._unsent[1] if self._unsent is not None else {}).items():
            waiting[request_id] = waiting.get(request_id, 0) + count
        return sum(waiting.values()), len(waiting)

    async def _send(self, number: int, counts: dict[str, int]) -> None:
        ids = sorted(counts)
        deadline = Deadline.after(self._db.settings.command_timeout)
        await self._db.fetch(
            deadline, _FLUSH, ids, [counts[i] for i in ids], self._commit_mode, self._replica, number
        )

    async def _flush_every_interval(self) -> None:
        while True:
            await self._wake.wait()
            await asyncio.sleep(self._interval)
            self._wake.clear()
            try:
                await self.flush()
            except Exception as exc:  # the counts wait for the next flush, a second from now
                if isinstance(exc, LambdaError):
                    log.warning("execution counts not flushed, %d sessions wait: %s", self._waiting()[1], exc)
                else:
                    log.exception("execution counts not flushed, %d sessions wait", self._waiting()[1])
                self._wake.set()
                await asyncio.sleep(max(self._interval, RETRY_SECONDS))

    async def close(self) -> None:
        """Stop the task (never in the middle of a flush), then flush what is left; before
        the database closes. What cannot be flushed is logged, and lost."""
        self._closed = True
        if self._flusher is not None:
            async with self._lock:
                await cancel_and_wait(self._flusher)
            self._flusher = None
        try:
            await self.flush()
        except Exception:
            log.exception("at stop, %d executions of %d sessions not counted", *self._waiting())
