"""Layers in meta.layers (one row per lock: its size), and which of them sessions use."""

from __future__ import annotations

import asyncpg

from lambda_server.domain import Deadline
from lambda_server.errors import QuotaExceeded
from lambda_server.store.database import Database

_PUT = """
INSERT INTO meta.layers (layer_id, runtime, lock, bytes) VALUES ($1, $2, $3, $4)
ON CONFLICT (layer_id) DO UPDATE SET bytes = excluded.bytes WHERE meta.layers.bytes <> excluded.bytes
"""
# The session's own copy of its lock: there as long as the session is
_SESSION_LOCK = """
SELECT dependencies->>'runtime' AS runtime, dependencies->>'lock' AS lock
FROM meta.sessions WHERE request_id = $1 AND dependencies->>'layer_id' = $2
"""
# The bytes of the distinct layers the owner's unexpired sessions use, but `$2`'s
# (counted apart by the caller, once), by the database clock; and `$2`'s recorded bytes
_OWNER_BYTES = """
SELECT coalesce(sum(l.bytes), 0)::bigint AS bytes, count(*) AS layers,
       (SELECT bytes FROM meta.layers WHERE layer_id = $2) AS this
FROM meta.layers l
WHERE l.layer_id <> $2 AND l.layer_id IN (
    SELECT s.dependencies->>'layer_id' FROM meta.sessions s
    WHERE s.owner = $1 AND s.dependencies IS NOT NULL AND s.status = 'active' AND s.expires_at > now()
)
"""
# When an owner's layers (this one counted once) would pass MAX_LAYER_BYTES_PER_OWNER
QUOTA_RETRY_SECONDS = 60.0  # a layer quota frees as the owner's sessions expire
_IN_USE = """
SELECT DISTINCT dependencies->>'layer_id' AS layer_id FROM meta.sessions
WHERE dependencies->>'layer_id' = ANY($1::text[]) AND status = 'active' AND expires_at > now()
"""


class LayerRecords:
    """The only place that reads and writes meta.layers, and the sessions' use of layers."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def put(self, layer_id: str, runtime: str, lock: str, size: int, deadline: Deadline) -> None:
        """Record a layer and its installed size (another replica's record of it stays)."""
        await self._db.fetchrow(deadline, _PUT, layer_id, runtime, lock, size)

    async def session_lock(
        self, request_id: str, layer_id: str, deadline: Deadline
    ) -> tuple[str, str] | None:
        """(runtime, lock text) as the session stored them."""
        row = await self._db.fetchrow(deadline, _SESSION_LOCK, request_id, layer_id)
        if row is None or row["lock"] is None:
            return None
        return row["runtime"], row["lock"]

    async def owner_bytes(self, owner: str, besides: str, deadline: Deadline) -> tuple[int, int, int | None]:
        """(bytes, layers, recorded): the distinct layers the owner's unexpired sessions use,
        `besides` apart, and the bytes recorded for `besides` (None: not recorded)."""
        row = await self._db.fetchrow(deadline, _OWNER_BYTES, owner, besides)
        assert row is not None
        recorded = None if row["this"] is None else int(row["this"])
        return int(row["bytes"]), int(row["layers"]), recorded

    async def in_use(self, layer_ids: list[str], deadline: Deadline) -> set[str]:
        """Which of these layers an unexpired session uses."""
        rows = await self._db.fetch(deadline, _IN_USE, layer_ids)
        return {row["layer_id"] for row in rows}


async def refuse_past_layer_quota(conn: asyncpg.Connection, owner: str, layer_id: str, limit: int) -> None:
    """QuotaExceeded when the owner's layers and `layer_id` (its recorded bytes, counted once)
    pass `limit`: on the connection whose transaction holds the owner's lock and stores the
    session (store/creates.py), so that concurrent creates on any replica stay within it."""
    row = await conn.fetchrow(_OWNER_BYTES, owner, layer_id)
    assert row is not None
    check_layer_quota(owner, int(row["bytes"]), int(row["layers"]), int(row["this"] or 0), limit)


def check_layer_quota(owner: str, used: int, layers: int, size: int, limit: int) -> None:
    """QuotaExceeded when `used` bytes of `layers` other layers and this one's `size` pass `limit`."""
    if used + size > limit:
        others = f"{layers} other layer{'' if layers == 1 else 's'} of {used} bytes"
        if used > limit:  # over already (the limit lowered since): whatever this layer's size
            why = (
                f"{owner}'s unexpired sessions already use {others}, over MAX_LAYER_BYTES_PER_OWNER "
                f"({limit}): no session with a layer until some of them expire"
            )
        else:
            why = (
                f"{owner}'s unexpired sessions use {others}; with this layer's {size} bytes they "
                f"would pass MAX_LAYER_BYTES_PER_OWNER ({limit})"
            )
        raise QuotaExceeded(
            why,
            retry_after=QUOTA_RETRY_SECONDS,
            setting="MAX_LAYER_BYTES_PER_OWNER",
            limit=str(limit),
            bytes=str(used),
        )
