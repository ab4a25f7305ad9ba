"""Checks of request fields every use case shares: request ids, NUL (PostgreSQL), control characters."""

from __future__ import annotations

import re
import uuid

from lambda_server.domain import JSON
from lambda_server.errors import InvalidRequest

# A UUID in its canonical form already, as this server hands them out and callers send them back.
_CANONICAL = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")


def parse_request_id(raw: str) -> str:
    """The canonical form of a request_id; InvalidRequest unless it is a UUID."""
    if isinstance(raw, str) and _CANONICAL.fullmatch(raw):
        return raw
    try:
        return str(uuid.UUID(raw))
    except (ValueError, TypeError, AttributeError):
        raise InvalidRequest(f"request_id {raw[:64]!r} is not a UUID", field="request_id") from None


def refuse_nul(value: str, field: str) -> None:
    """PostgreSQL text cannot hold NUL: refuse it here rather than fail in the database."""
    if "\x00" in value:
        raise InvalidRequest(f"{field} must not contain NUL characters", field=field)


def refuse_control(value: str, field: str) -> None:
    """A name (a language_title) holds no control character (C0, DEL, C1): a CR or LF in one
    would be answered back in headers, logs and listings. NUL as refuse_nul words it."""
    refuse_nul(value, field)
    found = _CONTROL.search(value)
    if found is not None:
        raise InvalidRequest(
            f"{field} must not contain control characters (it holds {found.group()!r})", field=field
        )


def refuse_nul_in(value: JSON, field: str) -> None:
    """jsonb cannot hold NUL either, in a key or a string; the depth is bounded by protobuf's."""
    if isinstance(value, str):
        refuse_nul(value, field)
    elif isinstance(value, dict):
        for key, item in value.items():
            refuse_nul(key, field)
            refuse_nul_in(item, field)
    elif isinstance(value, list):
        for item in value:
            refuse_nul_in(item, field)
