"""Logging set-up: text or JSON lines on stderr, each line about a call carrying its request_id.

The api layer marks the call being served with `begin_call`; a filter on the
handler copies its method and request_id onto every record logged while it
runs, from any logger (ours, asyncpg's, gRPC's). Scripts' own output is never
logged here: it goes back to the caller in ExecuteResponse.logs.
"""

from __future__ import annotations

import logging
import sys
from contextvars import ContextVar, Token
from dataclasses import dataclass
from typing import Any, TextIO

from pythonjsonlogger.json import JsonFormatter

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# The JSON fields, after `time` (ISO 8601, UTC); request_id and method follow on lines about a call.
JSON_FIELDS = ("levelname", "name", "message")
JSON_RENAMED = {"levelname": "level", "name": "logger"}


@dataclass(frozen=True)
class Payload:
    """A call's params or result as converted by the call, for its request log to reuse:
    the JSON value and about how many bytes of JSON it is, or why it could not be converted."""

    value: Any
    size: int
    unloggable: str = ""


@dataclass
class CallInfo:
    """The call being served: what its log lines and its request log carry.

    Mutable: request_id is filled in when the call learns it (Initialize's new
    session), user_id once the caller is authenticated, params and result once
    converted.
    """

    method: str
    request_id: str = ""
    user_id: str | None = None
    params: Payload | None = None
    result: Payload | None = None
    items: int | None = None  # an ExecuteBatch's number of items
    address: str = ""  # the caller's, read once as the call began (see api/request_logs.GrpcWire)


_current: ContextVar[CallInfo | None] = ContextVar("lambda_server_call", default=None)


def begin_call(call: CallInfo) -> Token[CallInfo | None]:
    return _current.set(call)


def end_call(token: Token[CallInfo | None]) -> None:
    _current.reset(token)


def current_call() -> CallInfo | None:
    """The call being served, if any."""
    return _current.get()


def note_user(user_id: str | None) -> None:
    """Record who makes the current call (for its request log), when there is one."""
    call = _current.get()
    if call is not None:
        call.user_id = user_id


class CallFilter(logging.Filter):
    """Adds `request_id` and `method` to a record logged while a call is served."""

    def filter(self, record: logging.LogRecord) -> bool:
        call = _current.get()
        if call is not None:
            if not hasattr(record, "request_id"):
                record.request_id = call.request_id
            if not hasattr(record, "method"):
                record.method = call.method
        return True


class TextFormatter(logging.Formatter):
    """The plain format, with `[method request_id]` after a line about a call."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        method = getattr(record, "method", "")
        if not method:
            return line
        request_id = getattr(record, "request_id", "")
        suffix = f" [{method} {request_id}]" if request_id else f" [{method}]"
        first, newline, rest = line.partition("\n")  # after the message, before a traceback
        return f"{first}{suffix}{newline}{rest}"


def configure(level: str, log_format: str, stream: TextIO | None = None) -> None:
    """Log at `level` to stderr, as `text` lines or `json` objects one a line."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(CallFilter())
    if log_format == "json":
        handler.setFormatter(JsonFormatter(list(JSON_FIELDS), rename_fields=JSON_RENAMED, timestamp="time"))
    else:
        handler.setFormatter(TextFormatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # warnings.warn(...) becomes a log record too, so that stderr stays one format
    logging.captureWarnings(True)
