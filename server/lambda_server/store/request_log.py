"""The request-log writer: public.request_logs and error_logs, in batches, off the hot path.

`record()` is synchronous and never waits: it appends to a bounded queue, and a
background task writes what is queued in batches, with COPY: one a batch, or
two in one transaction when the batch has error_logs rows.

When the queue is full the new record is DROPPED, counted in
`lambda_request_log_dropped` and logged as a warning at most once a minute.
The hot path must never wait on PostgreSQL: were record() to block or the
queue to grow without bound, a slow or absent database would turn into slow
executions or an exhausted memory. Under overload it is better to shed request
logs than executions. The queue is bounded in records (REQUEST_LOG_QUEUE_SIZE,
counting the batch being written) and in bytes (`max_queued_bytes`), since one
record may hold up to two 64 KiB payloads.

A batch that fails because the database is unavailable is kept and retried
with backoff (0.1 s doubling to 5 s), while new records queue behind it up to
the bound. A batch PostgreSQL refuses (a bug, not an outage) is written a row
at a time, so that one bad row costs only itself. `close()` flushes everything
queued on graceful shutdown, within a time bound; what is left then is counted
as dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
import uuid
from collections import deque
from collections.abc import Sequence
from typing import Any

import orjson

from lambda_server import json_text
from lambda_server.config import RequestLogSettings
from lambda_server.domain import JSON, Deadline, RequestLogEntry
from lambda_server.errors import DeadlineExceeded, InternalError, LambdaError, Unavailable
from lambda_server.metrics import Metrics
from lambda_server.store.database import Database
from lambda_server.tasks import cancel_and_wait

log = logging.getLogger(__name__)

MAX_QUEUED_BYTES = 64 * 1024 * 1024
MAX_BATCH_BYTES = 4 * 1024 * 1024
RETRY_FIRST = 0.1  # seconds
RETRY_MAX = 5.0
WARN_EVERY = 60.0  # seconds between two "dropped" warnings

# COPY (binary), not INSERT: PostgreSQL parses and plans nothing a row, and the rows
# travel in asyncpg's binary encoding. The ids are drawn here, so that the
# error_logs rows can name their request_logs row before either is written. A
# batch with error rows copies both tables in one transaction; one without is a
# single COPY, atomic on its own. JSON goes as text encoded here (an
# orjson.Fragment, passed through as it is by the connection's jsonb codec), so
# that a value PostgreSQL cannot hold is found before it can poison a batch.
_REQUEST_COLUMNS = (
    "id",
    "request_id",
    "language_title",
    "timestamp",
    "client_ip",
    "user_id",
    "request_headers",
    "request_payload",
    "response_payload",
    "status_code",
    "duration_ms",
    "cached",
    "error_details",
    "runtime_metrics",
    "grpc_code",
    "items",
)
_ERROR_COLUMNS = ("request_log_id", "timestamp", "error_code", "error_message", "stack_trace", "context")

# `\u0000` not itself escaped (preceded by an even number of backslashes):
# jsonb cannot hold U+0000, so it becomes U+FFFD, as NUL does in text columns.
_NUL_ESCAPE = re.compile(r"(?<!\\)((?:\\\\)*)\\u0000")
_INT_MAX = 2**31 - 1


class RequestLogWriter:
    """Queues request logs and writes them in batches; see the module docstring for the policy."""

    def __init__(
        self,
        db: Database,
        settings: RequestLogSettings,
        metrics: Metrics,
        max_queued_bytes: int = MAX_QUEUED_BYTES,
    ) -> None:
        self._db = db
        self._settings = settings
        self._metrics = metrics
        self._max_bytes = max_queued_bytes
        self._queue: deque[RequestLogEntry] = deque()
        self._batch: list[RequestLogEntry] = []  # taken from the queue, being written
        self._bytes = 0  # held by the queue and the batch
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._failing = False
        self._last_drop_warning = -WARN_EVERY

    @property
    def depth(self) -> int:
        """Records waiting to be written, the batch being written included."""
        return len(self._queue) + len(self._batch)

    def start(self) -> None:
        if self._settings.enabled and self._task is None:
            self._task = asyncio.create_task(self._run(), name="request-log-writer")

    def record(self, entry: RequestLogEntry) -> None:
        """Queue one record, or drop and count it when the queue is full. Never blocks."""
        if not self._settings.enabled:
            return
        if (
            self._closing
            or self.depth >= self._settings.queue_size
            or self._bytes + entry.size > self._max_bytes
        ):
            self._drop(1, "the queue is full" if not self._closing else "the writer is closed")
            return
        self._queue.append(entry)
        self._bytes += entry.size
        if len(self._queue) == 1 or len(self._queue) >= self._settings.batch_size:
            self._wakeup.set()

    async def close(self, timeout: float = 5.0) -> None:
        """Write everything queued, for at most `timeout` seconds; count the rest as dropped."""
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout)
            except TimeoutError:
                await cancel_and_wait(self._task)
        left = self.depth
        if left:
            self._queue.clear()
            self._batch = []
            self._bytes = 0
            self._drop(left, f"they were not written within {timeout:g} s of shutdown", warn=True)

    # the background task

    async def _run(self) -> None:
        while True:
            await self._wait_for_work()
            if not self._queue:
                return  # closing, and everything is written
            self._batch = [self._queue.popleft()]
            size = self._batch[0].size
            # bounded in bytes too, so a batch of large payloads fits in a statement's time
            while self._queue and len(self._batch) < self._settings.batch_size and size < MAX_BATCH_BYTES:
                size += self._queue[0].size
                self._batch.append(self._queue.popleft())
            await self._write_until_done()

    async def _wait_for_work(self) -> None:
        """Until a batch is full, the flush interval passed after a record came, or closing."""
        while not self._queue and not self._closing:
            self._wakeup.clear()
            await self._wakeup.wait()
        if self._closing or len(self._queue) >= self._settings.batch_size:
            return
        self._wakeup.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._settings.flush_interval_seconds):
                await self._wakeup.wait()

    async def _write_until_done(self) -> None:
        delay = RETRY_FIRST
        while self._batch:
            try:
                await self._write_batch()
            except (Unavailable, DeadlineExceeded) as exc:
                if not self._failing:
                    log.warning("request logs: %s; keeping %d records and retrying", exc.message, self.depth)
                    self._failing = True
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX)
            except Exception:  # a bug: lose this batch, not the writer
                log.exception("request logs: a batch could not be written")
                self._discard_batch("it could not be written")
        if self._failing:
            log.info("request logs: written again")
            self._failing = False

    async def _write_batch(self) -> None:
        try:
            await self._write(self._batch)
        except (Unavailable, DeadlineExceeded):
            raise
        except LambdaError as exc:
            log.error("request logs: a batch was refused (%s); writing it a row at a time", exc)
            await self._write_one_at_a_time()
        else:
            self._written(len(self._batch))

    async def _write_one_at_a_time(self) -> None:
        """Write the batch's rows alone; drop the ones PostgreSQL refuses. Unavailable propagates."""
        while self._batch:
            entry = self._batch[0]
            try:
                await self._write([entry])
            except (Unavailable, DeadlineExceeded):
                raise
            except LambdaError as exc:
                self._batch.pop(0)
                self._bytes -= entry.size
                self._drop(1, f"PostgreSQL refused it: {exc}", warn=True)
            else:
                self._written(1)

    async def _write(self, entries: Sequence[RequestLogEntry]) -> None:
        requests, errors = _rows(entries)
        try:
            async with self._db.connection(Deadline.after(None)) as conn:
                if errors:
                    async with conn.transaction():
                        await _copy(conn, "request_logs", _REQUEST_COLUMNS, requests)
                        await _copy(conn, "error_logs", _ERROR_COLUMNS, errors)
                else:
                    await _copy(conn, "request_logs", _REQUEST_COLUMNS, requests)
        except (TypeError, ValueError, OverflowError) as exc:
            # a value asyncpg cannot encode fails in COPY as it is, not as a DataError
            # (the connection is dropped, the COPY aborted): refused, like a bad row
            raise InternalError(f"a request log value could not be encoded: {exc}") from exc

    def _discard_batch(self, why: str) -> None:
        count, self._batch = len(self._batch), []
        self._bytes = sum(entry.size for entry in self._queue)
        self._drop(count, why, warn=True)

    def _written(self, count: int) -> None:
        written, self._batch = self._batch[:count], self._batch[count:]
        self._bytes -= sum(entry.size for entry in written)
        self._metrics.log_written.inc(count)

    def _drop(self, count: int, why: str, warn: bool = False) -> None:
        self._metrics.log_dropped.inc(count)
        now = time.monotonic()
        if warn or now - self._last_drop_warning >= WARN_EVERY:
            self._last_drop_warning = now
            log.warning("request logs: dropped %d record(s): %s", count, why)


async def _copy(conn: Any, table: str, columns: Sequence[str], rows: list[tuple[Any, ...]]) -> None:
    await conn.copy_records_to_table(table, schema_name="public", columns=list(columns), records=rows)


def _rows(entries: Sequence[RequestLogEntry]) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """The COPY's rows: request_logs' (16 columns), then error_logs' (6)."""
    requests: list[tuple[Any, ...]] = []
    errors: list[tuple[Any, ...]] = []
    for entry in entries:
        row_id = uuid.uuid4()
        requests.append(
            (
                row_id,
                _text(entry.request_id, 64),
                _text(entry.language_title, 128) or "",
                entry.timestamp,
                _text(entry.client_ip, 45),
                _text(entry.user_id, 128),
                _json(entry.request_headers),
                _json(entry.request_payload),
                _json(entry.response_payload),
                entry.status_code,
                max(0, min(entry.duration_ms, _INT_MAX)),
                entry.cached,
                _json(entry.error_details),
                _json(entry.runtime_metrics),
                _text(entry.grpc_code, 32),
                entry.items,
            )
        )
        if entry.error is not None:
            failure = entry.error
            errors.append(
                (
                    row_id,
                    entry.timestamp,
                    _text(failure.code, 64) or "",
                    _text(failure.message, None) or "",
                    _text(failure.stack_trace, None) or None,
                    _json(failure.context),
                )
            )
    return requests, errors


def _text(value: str | None, limit: int | None) -> str | None:
    """A value a text column can hold: no NUL, at most `limit` characters."""
    if value is None:
        return None
    if "\x00" in value:
        value = value.replace("\x00", "\ufffd")
    return value if limit is None else value[:limit]


def _json(value: JSON) -> orjson.Fragment | None:
    """JSON text jsonb can hold, as a fragment the jsonb codec sends as it is; None stays SQL NULL."""
    if value is None:
        return None
    try:
        text = json_text.dumps(value)  # params_json's integers past 64 bits too: jsonb holds them
    except (TypeError, ValueError) as exc:  # not JSON (cannot happen for what the API converted)
        return orjson.Fragment(orjson.dumps({"unloggable": str(exc)}))
    if b"\\u0000" in text:
        text = _NUL_ESCAPE.sub(lambda match: f"{match.group(1)}\\ufffd", text.decode()).encode()
    return orjson.Fragment(text)
