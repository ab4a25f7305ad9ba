"""Request and error logs: one row per Execute, refused ones too, in batches, flushed at a graceful stop."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import asyncpg
import grpc
import pytest

from lambda_microservice import InvalidArgumentError, LambdaClient, NotFoundError
from lambda_server.config import DatabaseSettings, RequestLogSettings
from lambda_server.domain import ErrorLogEntry, RequestLogEntry
from lambda_server.metrics import Metrics
from lambda_server.store import migrations
from lambda_server.store.database import Database
from lambda_server.store.request_log import RequestLogWriter
from tests.proxy import DatabaseProxy
from tests.support import ServerThread, run_sync, server_settings

ADDING = "def handler(event):\n    p = event['params']\n    return {'sum': p['a'] + p['b']}"
FAILING = "def handler(event):\n    raise ValueError('bad input: ' + str(event['params']['n']))"
LOOPING = "while True:\n    pass"
EXECUTE_PATH = "/lambda_microservice.v1.LambdaService/Execute"


async def fetch(url: str, query: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(url, timeout=10)
    try:
        await conn.set_type_codec("jsonb", schema="pg_catalog", encoder=json.dumps, decoder=json.loads)
        rows: list[asyncpg.Record] = await conn.fetch(query, *args)
        return rows
    finally:
        await conn.close()


def test_each_execute_has_one_row_failures_have_error_rows_and_the_views_count_them(
    database_url: str,
) -> None:
    title = f"python-logs_{uuid.uuid4().hex[:8]}"
    unknown = str(uuid.uuid4())
    malformed = f"bad-{uuid.uuid4().hex}"
    garbled = f"garbled-{uuid.uuid4().hex}"
    server = ServerThread(server_settings(), database_url)
    try:
        headers = (("authorization", "Bearer not-for-the-logs"), ("x-trace", "t-1"))
        with LambdaClient(server.target, timeout=20, metadata=headers) as client:
            adding = client.initialize(title, ADDING).request_id
            failing = client.initialize(title, FAILING).request_id
            looping = client.initialize(title, LOOPING, context={"timeout_ms": 300}).request_id
            for a in range(3):
                assert not client.execute(adding, {"a": a, "b": 1}).HasField("error")
            big = client.execute(adding, {"a": 1, "b": 2, "blob": "x" * 70_000})
            assert not big.HasField("error")
            for n in range(2):
                assert client.execute(failing, {"n": n}).error.code  # RUNTIME_ERROR
            assert client.execute(looping).error.message  # TIMEOUT
            with pytest.raises(NotFoundError):
                client.execute(unknown)
            with pytest.raises(InvalidArgumentError):
                client.execute(malformed)
        with grpc.insecure_channel(server.target) as channel:  # bytes that are no ExecuteRequest
            execute = channel.unary_unary(EXECUTE_PATH, lambda raw: raw, lambda raw: raw)
            with pytest.raises(grpc.RpcError) as undecodable:
                execute(b"\xff\xff\xff", timeout=10, metadata=(("x-request-id", garbled),))
            assert undecodable.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        server.stop()  # graceful: what is still queued is written now

    ids = [adding, failing, looping, unknown, malformed, garbled]
    rows = run_sync(
        fetch(
            database_url,
            "SELECT r.*, e.error_code, e.error_message, e.stack_trace, e.context"
            " FROM public.request_logs r LEFT JOIN public.error_logs e ON e.request_log_id = r.id"
            " WHERE r.request_id = ANY($1::text[]) ORDER BY r.timestamp",
            ids,
        )
    )
    by_session: dict[str, list[asyncpg.Record]] = {request_id: [] for request_id in ids}
    for row in rows:
        by_session[row["request_id"]].append(row)
    assert {key: len(value) for key, value in by_session.items()} == {
        adding: 4,
        failing: 2,
        looping: 1,
        unknown: 1,
        malformed: 1,
        garbled: 1,  # named by the caller's x-request-id
    }

    for a, row in enumerate(by_session[adding][:3]):
        assert (row["status_code"], row["grpc_code"], row["language_title"]) == (200, "OK", title)
        assert row["request_payload"] == {"a": a, "b": 1}
        assert row["response_payload"] == {"sum": a + 1}
        assert row["error_code"] is None and row["error_details"] is None
        assert row["client_ip"] == "127.0.0.1"
        assert row["cached"] is False and row["duration_ms"] >= 0
        assert row["runtime_metrics"]["environment_state"] in ("warm", "prewarmed", "cold")
        assert row["runtime_metrics"]["peak_memory_bytes"] >= 0
        assert row["request_headers"]["x-trace"] == "t-1"
        assert "authorization" not in row["request_headers"]
    # a payload past 64 KiB is not stored, and says so
    assert by_session[adding][3]["request_payload"] == {"truncated": True, "limit_bytes": 65536}
    assert by_session[adding][3]["response_payload"] == {"sum": 3}

    for n, row in enumerate(by_session[failing]):
        assert (row["status_code"], row["grpc_code"]) == (500, "OK")
        assert row["error_code"] == "RUNTIME_ERROR"
        assert f"bad input: {n}" in row["error_message"]
        assert f"ValueError: bad input: {n}" in row["stack_trace"]
        assert row["context"]["line"] == 2
        assert row["error_details"]["code"] == "RUNTIME_ERROR"
    assert by_session[looping][0]["error_code"] == "TIMEOUT"

    refused = by_session[unknown][0]
    assert (refused["status_code"], refused["grpc_code"], refused["language_title"]) == (404, "NOT_FOUND", "")
    assert refused["error_code"] == "NOT_FOUND"
    assert refused["context"]["request_id"] == unknown
    assert refused["request_payload"] == {}
    malformed_row = by_session[malformed][0]
    assert (malformed_row["status_code"], malformed_row["grpc_code"]) == (400, "INVALID_ARGUMENT")
    assert malformed_row["error_code"] == "INVALID_REQUEST"
    assert "not a UUID" in malformed_row["error_message"]

    garbled_row = by_session[garbled][0]
    assert (garbled_row["status_code"], garbled_row["error_code"]) == (400, "INVALID_REQUEST")
    assert garbled_row["request_payload"] is None

    daily = run_sync(
        fetch(database_url, "SELECT * FROM analytics.daily_usage_stats WHERE language_title = $1", title)
    )
    assert len(daily) == 1
    assert daily[0]["total_requests"] == 7  # the refused calls name no function
    assert (daily[0]["successful_requests"], daily[0]["error_requests"]) == (4, 3)
    assert daily[0]["cached_requests"] == 0 and daily[0]["unique_users"] == 0  # anonymous
    assert daily[0]["p99_duration_ms"] >= daily[0]["p95_duration_ms"] >= 0
    performance = run_sync(
        fetch(database_url, "SELECT * FROM analytics.function_performance WHERE language_title = $1", title)
    )
    assert len(performance) == 1
    assert (performance[0]["total_requests"], performance[0]["error_count"]) == (7, 3)
    assert (
        performance[0]["min_duration_ms"]
        <= performance[0]["p50_duration_ms"]
        <= performance[0]["max_duration_ms"]
    )
    assert performance[0]["cache_hit_ratio"] == 0.0


def entry(request_id: str, size: int = 0, failed: bool = False) -> RequestLogEntry:
    return RequestLogEntry(
        request_id=request_id,
        language_title="python-writer",
        timestamp=datetime.now(UTC),
        client_ip="127.0.0.1",
        user_id="someone",
        request_headers={},
        request_payload={"text": "nul \x00 inside"},
        response_payload=None,
        status_code=500 if failed else 200,
        grpc_code="OK",
        duration_ms=1,
        cached=False,
        error_details=None,
        runtime_metrics=None,
        error=ErrorLogEntry("RUNTIME_ERROR", "boom\x00", "at line 1") if failed else None,
        size=size,
    )


def counter(metrics: Metrics, name: str) -> float:
    return metrics.registry.get_sample_value(name) or 0.0


async def _full_queue(unreachable: str) -> tuple[float, Metrics, int]:
    metrics = Metrics()
    db = Database(DatabaseSettings(connect_timeout=0.5, command_timeout=0.5), unreachable)
    await db.open()
    writer = RequestLogWriter(db, RequestLogSettings(queue_size=2, batch_size=1), metrics)
    writer.start()
    started = time.perf_counter()
    for n in range(1000):
        writer.record(entry(f"full-{n}"))
    took = time.perf_counter() - started
    await asyncio.sleep(0.3)  # the writer tries, fails, keeps its batch
    depth = writer.depth
    await writer.close(timeout=0.3)
    await db.close()
    return took, metrics, depth


def test_a_full_queue_drops_and_counts_records_instead_of_blocking() -> None:
    took, metrics, depth = run_sync(_full_queue("postgresql://postgres@127.0.0.1:1/nowhere"))
    # 1000 records, none waited for the database (a few ms when quiet; this process shares its
    # GIL with servers of other tests, and a busy machine can pause it)
    assert took < 2.0
    assert depth == 2  # the batch being retried counts against the bound
    assert counter(metrics, "lambda_request_log_dropped_total") == 1000  # 998 at once, 2 at close
    assert counter(metrics, "lambda_request_log_written_total") == 0


def test_the_queue_is_bounded_in_bytes_too() -> None:
    async def fill() -> tuple[int, Metrics]:
        metrics = Metrics()
        db = Database(DatabaseSettings(), "postgresql://postgres@127.0.0.1:1/nowhere")
        writer = RequestLogWriter(db, RequestLogSettings(queue_size=100), metrics, max_queued_bytes=10_000)
        for n in range(10):
            writer.record(entry(f"bytes-{n}", size=4_000))
        return writer.depth, metrics

    depth, metrics = run_sync(fill())
    assert depth == 2
    assert counter(metrics, "lambda_request_log_dropped_total") == 8


async def _through_an_outage(proxy: DatabaseProxy, prefix: str) -> tuple[Metrics, int]:
    metrics = Metrics()
    db = Database(DatabaseSettings(connect_timeout=0.5, command_timeout=0.5), proxy.url)
    await db.open()
    await migrations.apply(db, migrations.load(migrations.default_directory()))
    writer = RequestLogWriter(db, RequestLogSettings(flush_interval_seconds=0.05), metrics)
    writer.start()
    proxy.set_mode("reset")
    for n in range(5):
        writer.record(entry(f"{prefix}-{n}", failed=n % 2 == 1))
    await asyncio.sleep(1.0)  # a few failed attempts
    failed_depth = writer.depth
    proxy.set_mode("up")
    await writer.close(timeout=10)  # retried with backoff until written
    await db.close()
    return metrics, failed_depth


def test_a_batch_that_fails_in_an_outage_is_kept_and_written_when_the_database_returns(
    database_url: str,
) -> None:
    proxy = DatabaseProxy(database_url)
    prefix = f"outage-{uuid.uuid4().hex[:8]}"
    try:
        metrics, failed_depth = run_sync(_through_an_outage(proxy, prefix))
    finally:
        proxy.close()
    assert failed_depth == 5
    assert counter(metrics, "lambda_request_log_written_total") == 5
    assert counter(metrics, "lambda_request_log_dropped_total") == 0
    rows = run_sync(
        fetch(
            database_url,
            "SELECT r.request_id, r.request_payload, e.error_code, e.error_message"
            " FROM public.request_logs r LEFT JOIN public.error_logs e ON e.request_log_id = r.id"
            " WHERE r.request_id LIKE $1 ORDER BY r.request_id",
            f"{prefix}-%",
        )
    )
    assert [row["request_id"] for row in rows] == [f"{prefix}-{n}" for n in range(5)]
    assert [row["error_code"] for row in rows] == [None, "RUNTIME_ERROR", None, "RUNTIME_ERROR", None]
    # NUL, which PostgreSQL cannot store, became U+FFFD rather than costing the batch
    assert rows[0]["request_payload"] == {"text": "nul \ufffd inside"}
    assert rows[1]["error_message"] == "boom\ufffd"


async def _with_a_bad_row(url: str, prefix: str) -> Metrics:
    metrics = Metrics()
    db = Database(DatabaseSettings(), url)
    await db.open()
    await migrations.apply(db, migrations.load(migrations.default_directory()))
    writer = RequestLogWriter(db, RequestLogSettings(), metrics)
    writer.start()
    writer.record(entry(f"{prefix}-0"))
    writer.record(replace(entry(f"{prefix}-1"), status_code=2**40))  # no integer column holds it
    writer.record(entry(f"{prefix}-2", failed=True))
    await writer.close(timeout=10)
    await db.close()
    return metrics


def test_a_row_postgresql_refuses_costs_only_itself(database_url: str) -> None:
    prefix = f"refused-{uuid.uuid4().hex[:8]}"
    metrics = run_sync(_with_a_bad_row(database_url, prefix))
    assert counter(metrics, "lambda_request_log_written_total") == 2
    assert counter(metrics, "lambda_request_log_dropped_total") == 1
    rows = run_sync(
        fetch(
            database_url,
            "SELECT r.request_id, e.error_code FROM public.request_logs r"
            " LEFT JOIN public.error_logs e ON e.request_log_id = r.id"
            " WHERE r.request_id LIKE $1 ORDER BY r.request_id",
            f"{prefix}-%",
        )
    )
    assert [(row["request_id"], row["error_code"]) for row in rows] == [
        (f"{prefix}-0", None),
        (f"{prefix}-2", "RUNTIME_ERROR"),
    ]
