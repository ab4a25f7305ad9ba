"""Compiled programs in meta.artifacts, by artifact key (script hash, optimization, toolchain)."""

from __future__ import annotations

from lambda_server.domain import Deadline
from lambda_server.store.database import Database

_GET = "SELECT program FROM meta.artifacts WHERE artifact_key = $1"
_PUT = """
INSERT INTO meta.artifacts (artifact_key, script_hash, optimization, toolchain, program)
VALUES ($1, $2, $3, $4, $5)
ON CONFLICT (artifact_key) DO NOTHING
"""
# Which of these script hashes an unexpired session uses, at which optimization level
# (a session without compile options runs the debug program), by the database clock.
_IN_USE = """
SELECT DISTINCT script_hash, coalesce(compile_options->>'optimization_level', 'debug') AS optimization
FROM meta.sessions
WHERE script_hash = ANY($1::varchar[]) AND status = 'active' AND expires_at > now()
"""


class ArtifactStore:
    """The only place that reads and writes compiled programs."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def get(self, key: str, deadline: Deadline) -> bytes | None:
        row = await self._db.fetchrow(deadline, _GET, key)
        return None if row is None else bytes(row["program"])

    async def put(
        self,
        key: str,
        script_hash: str,
        optimization: str,
        toolchain: str,
        program: bytes,
        deadline: Deadline,
    ) -> None:
        """Keep a program; one stored already under the key (another replica's) stays."""
        await self._db.fetchrow(deadline, _PUT, key, script_hash, optimization, toolchain, program)

    async def in_use(self, script_hashes: list[str], deadline: Deadline) -> set[tuple[str, str]]:
        """(script hash, optimization level) of these hashes that an unexpired session uses."""
        rows = await self._db.fetch(deadline, _IN_USE, script_hashes)
        return {(row["script_hash"], row["optimization"]) for row in rows}
