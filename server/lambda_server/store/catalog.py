"""The function catalog in meta.functions and meta.scripts: list a page, get one, its script."""

from __future__ import annotations

import base64
import binascii

import asyncpg
import orjson

from lambda_server.domain import Deadline, FunctionDefinition, FunctionPage, FunctionType
from lambda_server.errors import FunctionNotFound, InvalidRequest
from lambda_server.store.database import Database

DEFAULT_PAGE_SIZE = 20
MAX_PAGE_SIZE = 100
_MAX_TOKEN_LENGTH = 1024

_COLUMNS = """
f.id, f.language_title, f.language, f.title, f.description, f.function_type,
f.schema_definition, f.result_schema, f.examples, f.tags, f.version, f.created_at, f.updated_at
"""

# Keyset paging by language_title: a page costs the same wherever it starts, and
# functions added or removed between pages neither repeat nor shift the others.
_LIST = f"""
SELECT {_COLUMNS}
FROM meta.functions f
WHERE f.is_active
  AND ($1::text IS NULL OR f.language = $1)
  AND ($2::text IS NULL OR f.function_type = $2)
  AND ($3::text IS NULL OR f.language_title > $3)
ORDER BY f.language_title
LIMIT $4
"""

# A numbered page (the HTTP API's ?page=&per_page=) and the number of functions that
# match, in one statement: the count's row comes back even past the last page.
_NUMBERED = f"""
WITH matching AS (
  SELECT {_COLUMNS}
  FROM meta.functions f
  WHERE f.is_active
    AND ($1::text IS NULL OR f.language = $1)
)
SELECT total.n AS total, page.*
FROM (SELECT count(*) AS n FROM matching) total
LEFT JOIN LATERAL (
  SELECT * FROM matching ORDER BY language_title LIMIT $2 OFFSET $3
) page ON true
ORDER BY page.language_title
"""

# With the script: what GetFunction shows for a dynamic function and what
# Initialize runs when no script is sent. One statement either way.
_GET = f"""
SELECT {_COLUMNS}, s.content AS script
FROM meta.functions f LEFT JOIN meta.scripts s ON s.function_id = f.id
WHERE f.language_title = $1 AND f.is_active
"""


class FunctionCatalog:
    """The only place that reads the catalog. Functions are written by migrations (and by hand)."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def list(
        self,
        language: str | None,
        function_type: FunctionType | None,
        page_size: int,
        page_token: str,
        deadline: Deadline,
    ) -> FunctionPage:
        """One page of the active functions, ordered by language_title.

        `page_size` 0 means DEFAULT_PAGE_SIZE; past MAX_PAGE_SIZE it is lowered to
        it (as Google's AIP-158 asks), and a negative one is INVALID_ARGUMENT. The
        page token is opaque to callers: the last title shown and the filters it
        was issued for, so a token reused with other filters is INVALID_ARGUMENT.
        Scripts are never part of a listing.
        """
        if page_size < 0:
            raise InvalidRequest(f"page_size must not be negative, not {page_size}", field="page_size")
        size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        type_name = function_type.value if function_type is not None else None
        after = _decode_token(page_token, language, type_name) if page_token else None
        rows = await self._db.fetch(deadline, _LIST, language, type_name, after, size + 1)
        functions = [_definition(row) for row in rows[:size]]
        more = len(rows) > size
        token = _encode_token(functions[-1].language_title, language, type_name) if more else ""
        return FunctionPage(functions, token)

    async def numbered(
        self, language: str | None, page: int, per_page: int, deadline: Deadline
    ) -> tuple[tuple[FunctionDefinition, ...], int]:
        """Page `page` (from 1) of `per_page` active functions ordered by language_title, and
        how many match in all. Offset paging, as the original service's API has it: cheap
        for a catalog of hundreds, and the HTTP API's callers ask for it."""
        rows = await self._db.fetch(deadline, _NUMBERED, language, per_page, (page - 1) * per_page)
        total = int(rows[0]["total"]) if rows else 0
        return tuple(_definition(row) for row in rows if row["id"] is not None), total

    async def get(self, language_title: str, deadline: Deadline) -> FunctionDefinition:
        """An active function with its script; FunctionNotFound when absent or inactive."""
        found = await self.find(language_title, deadline)
        if found is None:
            raise FunctionNotFound(
                f"no function {language_title[:128]!r} in the catalog", language_title=language_title[:128]
            )
        return found

    async def find(self, language_title: str, deadline: Deadline) -> FunctionDefinition | None:
        """An active function with its script, or None."""
        row = await self._db.fetchrow(deadline, _GET, language_title)
        return None if row is None else _definition(row, row["script"])


def _definition(row: asyncpg.Record, script: str | None = None) -> FunctionDefinition:
    examples = row["examples"]
    return FunctionDefinition(
        id=str(row["id"]),
        language_title=row["language_title"],
        language=row["language"],
        title=row["title"],
        description=row["description"] or "",
        function_type=FunctionType(row["function_type"]),
        params_schema=row["schema_definition"],
        result_schema=row["result_schema"],
        examples=examples if isinstance(examples, list) else [],
        tags=tuple(row["tags"] or ()),
        version=row["version"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        script=script,
    )


def _encode_token(after: str, language: str | None, function_type: str | None) -> str:
    raw = orjson.dumps({"after": after, "language": language, "type": function_type})
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_token(token: str, language: str | None, function_type: str | None) -> str:
    """The title a page starts after; InvalidRequest for a token we did not issue for these filters."""
    bad = InvalidRequest("page_token is not a token from a previous ListFunctions", field="page_token")
    if len(token) > _MAX_TOKEN_LENGTH:
        raise bad
    try:
        data = orjson.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    except (binascii.Error, ValueError):
        raise bad from None
    if not isinstance(data, dict) or not isinstance(data.get("after"), str) or "\x00" in data["after"]:
        raise bad
    if data.get("language") != language or data.get("type") != function_type:
        raise InvalidRequest(
            "page_token was issued for other filters: send the same language and function_type",
            field="page_token",
        )
    after: str = data["after"]
    return after
