"""Structured logs: LOG_FORMAT=json gives a JSON object a line; a line about a call names its request_id."""

from __future__ import annotations

import io
import json
import logging
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator

import grpc
import pytest

from lambda_microservice import LambdaClient, NotFoundError
from lambda_microservice.v1 import lambda_service_pb2 as pb
from lambda_microservice.v1 import lambda_service_pb2_grpc as pb_grpc
from lambda_server import logs
from tests.support import (
    ROOT,
    ServerProcess,
    create_database,
    drop_database,
    env_without_database,
    run_sync,
    server_process,
    with_database,
)


@pytest.fixture
def json_server(admin_url: str) -> Iterator[ServerProcess]:
    name = run_sync(create_database(admin_url))
    try:
        with server_process(with_database(admin_url, name), LOG_FORMAT="json", LOG_LEVEL="DEBUG") as server:
            yield server
    finally:
        run_sync(drop_database(admin_url, name))


def test_json_lines_and_the_request_id_on_lines_about_a_call(json_server: ServerProcess) -> None:
    unknown = str(uuid.uuid4())
    trace = f"trace-{uuid.uuid4().hex[:8]}"
    with LambdaClient(json_server.target, timeout=20) as client:
        session = client.initialize("python-logged", "print('from the script ' * 3)\nresult = 1")
        assert client.execute(session.request_id).logs.startswith("from the script")
        with pytest.raises(NotFoundError):
            client.execute(unknown)
    # no session, and no request_id (the client library always sends one): the caller's
    # x-request-id names the call
    with grpc.insecure_channel(json_server.target) as channel:
        request = pb.InitializeRequest(language_title="python-logged", script_content="def broken(:")
        with pytest.raises(grpc.RpcError) as refused_call:
            pb_grpc.LambdaServiceStub(channel).Initialize(
                request, timeout=20, metadata=(("x-request-id", trace),)
            )
        assert refused_call.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert json_server.stop() == 0

    records = []
    for line in json_server.lines:
        record = json.loads(line)  # every line, whatever logged it, is one JSON object
        assert isinstance(record, dict), line
        assert record["level"] in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"), line
        assert isinstance(record["message"], str) and "time" in record, line
        records.append(record)
    assert any(r["message"].startswith("serving ") and r["level"] == "INFO" for r in records)
    refused = [r for r in records if unknown in r["message"]]
    assert refused, json_server.lines
    assert all(r["request_id"] == unknown and r["method"] == "Execute" for r in refused)
    traced = [r for r in records if r.get("request_id") == trace]
    assert traced and all(r["method"] == "Initialize" for r in traced)
    assert any("syntax" in r["message"].lower() or "line" in r["message"] for r in traced)
    # lines outside any call carry no request_id
    assert all("request_id" not in r for r in records if r["message"].startswith("serving "))
    # the script's own output goes back to the caller, never to the server's log
    assert not any("from the script" in line for line in json_server.lines)


def test_the_text_format_adds_the_call_to_lines_about_one() -> None:
    stream = io.StringIO()
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        logs.configure("INFO", "text", stream)
        logging.getLogger("lambda_server.test").info("outside")
        token = logs.begin_call(logs.CallInfo("GetSession", "0f7c"))
        try:
            logging.getLogger("lambda_server.test").warning("inside")
        finally:
            logs.end_call(token)
    finally:
        root.handlers[:], root.level = saved[0], saved[1]
        logging.captureWarnings(False)
    first, second = stream.getvalue().splitlines()
    assert first.endswith("INFO lambda_server.test: outside")
    assert second.endswith("WARNING lambda_server.test: inside [GetSession 0f7c]")


def test_a_fatal_error_at_start_is_a_json_line_too(admin_url: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        env = {
            **env_without_database(),
            "DATABASE_URL": with_database(admin_url, "never_reached"),
            "LISTEN_ADDR": "127.0.0.1:0",
            "METRICS_ADDR": f"127.0.0.1:{taken.getsockname()[1]}",
            "LOG_FORMAT": "json",
        }
        result = subprocess.run(
            [sys.executable, "-m", "lambda_server"],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 2, result.stderr
    records = [json.loads(line) for line in result.stderr.splitlines()]
    assert records[-1]["level"] == "CRITICAL"
    assert records[-1]["message"].startswith("configuration error: METRICS_ADDR=")
