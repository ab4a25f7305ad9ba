"""The function catalog: the three defaults listed, paged and filtered; Initialize from the catalog;
params checked against the function's JSON schema."""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import asyncpg
import pytest

from lambda_microservice import (
    AsyncLambdaClient,
    InvalidArgumentError,
    LambdaClient,
    NotFoundError,
    to_python,
)
from lambda_microservice.v1 import lambda_service_pb2 as pb
from tests.support import ServerThread, buf_curl, run_sync

DEFAULTS = ["nodejs-calculator", "python-text_processor", "rust-data_validator"]
MARK = "test_catalog"  # created_by of the rows these tests add, and remove again


async def _execute(url: str, query: str, *args: Any) -> None:
    conn = await asyncpg.connect(url, timeout=10)
    try:
        await conn.execute(query, *args)
    finally:
        await conn.close()


@pytest.fixture
def catalog_sql(server: ServerThread, database_url: str) -> Iterator[Any]:
    """Run SQL on the server's database (migrated by now); the rows marked MARK go at the end."""

    def run(query: str, *args: Any) -> None:
        run_sync(_execute(database_url, query, *args))

    yield run
    run("DELETE FROM meta.functions WHERE created_by = $1", MARK)


def add_function(
    sql: Any,
    language_title: str,
    script: str,
    schema: dict[str, Any] | None = None,
    active: bool = True,
    function_type: str = "dynamic",
) -> None:
    language, _, title = language_title.partition("-")
    sql(
        """
        WITH f AS (
            INSERT INTO meta.functions
                (language, title, language_title, description, schema_definition,
                 created_by, is_active, function_type, tags)
            VALUES ($1, $2, $3, 'added by a test', $4::jsonb, $5, $6, $7, '{test}')
            RETURNING id
        )
        INSERT INTO meta.scripts (function_id, content) SELECT id, $8 FROM f
        """,
        language,
        title,
        language_title,
        None if schema is None else json.dumps(schema),
        MARK,
        active,
        function_type,
        script,
    )


def all_titles(client: LambdaClient, **filters: Any) -> list[str]:
    """Every title of the catalog, one page of one function at a time."""
    titles: list[str] = []
    token = ""
    for _ in range(1000):
        page = client.list_functions(page_size=1, page_token=token, **filters)
        assert len(page.functions) <= 1
        titles += [f.language_title for f in page.functions]
        token = page.next_page_token
        if not token:
            return titles
    raise AssertionError("the pages never ended")


# ListFunctions


def test_the_three_defaults_are_listed_with_their_languages_and_availability(client: LambdaClient) -> None:
    page = client.list_functions()
    found = {f.language_title: f for f in page.functions}
    assert set(DEFAULTS) <= set(found)
    assert page.next_page_token == ""
    calculator = found["nodejs-calculator"]
    assert (calculator.language, calculator.title) == ("nodejs", "calculator")
    assert calculator.function_type == pb.FUNCTION_TYPE_PREDEFINED
    assert calculator.version == "1.0.0"
    assert "math" in calculator.tags
    assert calculator.description
    assert calculator.HasField("params_schema") and calculator.HasField("created_at")
    assert calculator.script == ""  # never in a listing
    assert found["nodejs-calculator"].is_available
    assert found["python-text_processor"].is_available
    assert found["rust-data_validator"].is_available


def test_page_size_one_walks_every_function_in_order(client: LambdaClient) -> None:
    unpaged = [f.language_title for f in client.list_functions(page_size=100).functions]
    walked = all_titles(client)
    assert walked == unpaged == sorted(unpaged)
    assert [t for t in walked if t in DEFAULTS] == DEFAULTS


def test_filters_by_language_and_type(client: LambdaClient, catalog_sql: Any) -> None:
    add_function(catalog_sql, "python-zz_dynamic_filter", "result = 1")
    assert all_titles(client, language="rust") == ["rust-data_validator"]
    python = all_titles(client, language="python")
    assert python == ["python-text_processor", "python-zz_dynamic_filter"]
    predefined = all_titles(client, function_type=pb.FUNCTION_TYPE_PREDEFINED)
    assert predefined == DEFAULTS
    dynamic = all_titles(client, function_type=pb.FUNCTION_TYPE_DYNAMIC)
    assert dynamic == ["python-zz_dynamic_filter"]
    both = client.list_functions(language="nodejs", function_type=pb.FUNCTION_TYPE_DYNAMIC)
    assert list(both.functions) == []
    assert client.list_functions(language="cobol").functions == []


def test_a_page_size_over_100_is_lowered_to_100(client: LambdaClient, catalog_sql: Any) -> None:
    catalog_sql(
        """
        INSERT INTO meta.functions (language, title, language_title, created_by, function_type)
        SELECT 'python', 'zz_bulk_' || lpad(n::text, 3, '0'), 'python-zz_bulk_' || lpad(n::text, 3, '0'),
               $1, 'dynamic'
        FROM generate_series(1, 101) AS n
        """,
        MARK,
    )
    first = client.list_functions(page_size=1000)
    assert len(first.functions) == 100
    assert first.next_page_token
    rest = client.list_functions(page_size=1000, page_token=first.next_page_token)
    assert rest.next_page_token == ""
    titles = [f.language_title for f in (*first.functions, *rest.functions)]
    assert len(titles) == len(set(titles)) == 104
    default_page = client.list_functions()
    assert len(default_page.functions) == 20 and default_page.next_page_token


def test_the_pagers_and_lambda_cli_go_through_every_page(
    server: ServerThread, client: LambdaClient, catalog_sql: Any
) -> None:
    catalog_sql(
        """
        INSERT INTO meta.functions (language, title, language_title, created_by, function_type)
        SELECT 'python', 'zz_pager_' || lpad(n::text, 3, '0'), 'python-zz_pager_' || lpad(n::text, 3, '0'),
               $1, 'dynamic'
        FROM generate_series(1, 101) AS n
        """,
        MARK,
    )
    walked = all_titles(client)
    assert len(walked) == 104
    assert [f.language_title for f in client.iter_functions(page_size=7)] == walked
    python = [f.language_title for f in client.iter_functions(language="python", page_size=50)]
    assert python == [t for t in walked if t.startswith("python-")]

    async def paged() -> list[str]:
        async with AsyncLambdaClient(server.target) as aclient:
            return [f.language_title async for f in aclient.iter_functions(page_size=9)]

    assert asyncio.run(paged()) == walked
    # lambda-cli asks for pages of 100: the catalog's 104 are two
    cli = [sys.executable, "-m", "lambda_microservice.cli", "--target", server.target, "functions"]
    listed = subprocess.run(cli, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert listed.returncode == 0, listed.stderr
    assert [f["language_title"] for f in json.loads(listed.stdout)["functions"]] == walked


def test_a_negative_page_size_is_invalid_argument(client: LambdaClient) -> None:
    with pytest.raises(InvalidArgumentError) as caught:
        client.list_functions(page_size=-5)
    assert caught.value.reason == "INVALID_REQUEST"
    assert caught.value.metadata["field"] == "page_size"


@pytest.mark.parametrize(
    "token",
    [
        "not a token",
        "bm90IGpzb24",  # "not json"
        "e30",  # {}
        base64.urlsafe_b64encode(b'{"after": "a\\u0000b", "language": null, "type": null}').decode(),
        "x" * 5000,
        "\u00e9\u00e9",
    ],
)
def test_a_bad_page_token_is_invalid_argument(client: LambdaClient, token: str) -> None:
    with pytest.raises(InvalidArgumentError) as caught:
        client.list_functions(page_token=token)
    assert caught.value.reason == "INVALID_REQUEST"
    assert caught.value.metadata["field"] == "page_token"


def test_a_page_token_is_refused_with_other_filters(client: LambdaClient) -> None:
    token = client.list_functions(page_size=1).next_page_token
    assert token
    with pytest.raises(InvalidArgumentError) as caught:
        client.list_functions(page_size=1, page_token=token, language="python")
    assert "other filters" in caught.value.message


def test_an_unknown_function_type_is_invalid_argument(client: LambdaClient) -> None:
    with pytest.raises(InvalidArgumentError) as caught:
        client.list_functions(function_type=7)
    assert caught.value.metadata["field"] == "function_type"


# GetFunction


def test_get_function_returns_schemas_and_examples(client: LambdaClient) -> None:
    function = client.get_function("nodejs-calculator")
    schema = to_python(function.params_schema)
    assert schema["type"] == "object"
    assert sorted(schema["required"]) == ["a", "b", "operation"]
    assert schema["properties"]["operation"]["enum"] == ["add", "subtract", "multiply", "divide"]
    assert to_python(function.result_schema)["required"] == ["result"]
    examples = [to_python(example) for example in function.examples]
    assert {"params": {"operation": "add", "a": 5, "b": 3}, "result": {"result": 8}} in examples
    assert function.script == ""  # predefined: not shown
    assert function.is_available
    text = client.get_function("python-text_processor")
    assert to_python(text.params_schema)["required"] == ["action", "text"]
    rust = client.get_function("rust-data_validator")
    assert rust.is_available
    assert to_python(rust.params_schema)["properties"]["rules"]["type"] == "array"


@pytest.mark.parametrize("title", ["nodejs-nope", "python-", "x" * 300])
def test_an_unknown_function_is_not_found(client: LambdaClient, title: str) -> None:
    with pytest.raises(NotFoundError) as caught:
        client.get_function(title)
    assert caught.value.reason == "NOT_FOUND"


@pytest.mark.parametrize("title", ["", "python-\x00"])
def test_an_empty_or_nul_title_is_invalid_argument(client: LambdaClient, title: str) -> None:
    with pytest.raises(InvalidArgumentError) as caught:
        client.get_function(title)
    assert caught.value.metadata["field"] == "language_title"


def test_a_dynamic_function_shows_its_script_and_runs_from_the_catalog(
    client: LambdaClient, catalog_sql: Any
) -> None:
    script = "def handle(params):\n    return params['n'] * 2\n"
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    add_function(catalog_sql, "python-zz_double", script, schema)
    function = client.get_function("python-zz_double")
    assert function.function_type == pb.FUNCTION_TYPE_DYNAMIC
    assert function.script == script
    session = client.initialize("python-zz_double", "")
    assert to_python(client.execute(session.request_id, {"n": 21}).result) == 42
    with pytest.raises(InvalidArgumentError) as caught:
        client.execute(session.request_id, {"n": 1.5})
    assert caught.value.reason == "INVALID_PARAMS"
    assert caught.value.metadata["field"] == "params.n"


def test_a_session_keeps_the_schema_it_was_initialized_with(client: LambdaClient, catalog_sql: Any) -> None:
    schema = {"type": "object", "required": ["n"]}
    add_function(catalog_sql, "python-zz_snapshot", "def handle(params):\n    return 1\n", schema)
    before = client.initialize("python-zz_snapshot", "")
    catalog_sql(
        """UPDATE meta.functions SET schema_definition = '{"type": "object", "required": ["m"]}'
           WHERE language_title = 'python-zz_snapshot'"""
    )
    assert to_python(client.execute(before.request_id, {"n": 1}).result) == 1
    after = client.initialize("python-zz_snapshot", "")
    with pytest.raises(InvalidArgumentError) as caught:
        client.execute(after.request_id, {"n": 1})
    assert caught.value.metadata["field"] == "params.m"


def test_an_inactive_function_is_neither_listed_nor_found(client: LambdaClient, catalog_sql: Any) -> None:
    add_function(catalog_sql, "python-zz_retired", "result = 1", active=False)
    assert "python-zz_retired" not in all_titles(client, language="python")
    with pytest.raises(NotFoundError):
        client.get_function("python-zz_retired")
    with pytest.raises(InvalidArgumentError) as caught:
        client.initialize("python-zz_retired", "")
    assert "script_content is required" in caught.value.message


# Initialize from the catalog, Execute against the schema


def test_nodejs_calculator_from_the_catalog_adds(client: LambdaClient) -> None:
    session = client.initialize("nodejs-calculator", "")
    response = client.execute(session.request_id, {"operation": "add", "a": 5, "b": 3})
    assert not response.HasField("error"), response.error
    assert to_python(response.result) == {"result": 8}
    assert response.language_title == "nodejs-calculator"
    for operation, expected in (("subtract", 2), ("multiply", 15), ("divide", 5 / 3)):
        answer = client.execute(session.request_id, {"operation": operation, "a": 5, "b": 3})
        assert to_python(answer.result) == {"result": pytest.approx(expected)}


def test_division_by_zero_is_a_runtime_error(client: LambdaClient) -> None:
    session = client.initialize("nodejs-calculator", "")
    response = client.execute(session.request_id, {"operation": "divide", "a": 1, "b": 0})
    assert response.HasField("error")
    assert response.error.code == pb.EXECUTION_ERROR_CODE_RUNTIME_ERROR
    assert "Division by zero" in response.error.message
    # the session still works afterwards
    again = client.execute(session.request_id, {"operation": "add", "a": 1, "b": 1})
    assert to_python(again.result) == {"result": 2}


def test_python_text_processor_from_the_catalog(client: LambdaClient) -> None:
    session = client.initialize("python-text_processor", "")
    cases = [
        ("uppercase", "hello", "HELLO"),
        ("lowercase", "HeLLo", "hello"),
        ("count_words", "Hello big World", 3),
        ("count_chars", "hello", 5),
    ]
    for action, text, expected in cases:
        response = client.execute(session.request_id, {"action": action, "text": text})
        assert not response.HasField("error"), response.error
        assert to_python(response.result) == {"result": expected}


@pytest.mark.parametrize(
    ("params", "field", "words"),
    [
        ({"operation": "add", "a": "x", "b": 3}, "params.a", "'x' is not of type 'number'"),
        ({"operation": "add", "a": 5}, "params.b", "'b' is a required property"),
        ({"a": 5, "b": 3}, "params.operation", "required"),
        ({"operation": "modulo", "a": 5, "b": 3}, "params.operation", "'modulo' is not one of"),
        ({"operation": "add", "a": True, "b": 3}, "params.a", "is not of type 'number'"),
    ],
)
def test_params_that_do_not_match_the_schema_are_invalid_params_naming_the_field(
    client: LambdaClient, params: dict[str, Any], field: str, words: str
) -> None:
    session = client.initialize("nodejs-calculator", "")
    with pytest.raises(InvalidArgumentError) as caught:
        client.execute(session.request_id, params)
    assert caught.value.reason == "INVALID_PARAMS"
    assert caught.value.metadata["field"] == field
    assert caught.value.message.startswith(f"{field}: ")
    assert words in caught.value.message


def test_a_script_sent_with_a_registered_title_runs_without_the_catalog_schema(client: LambdaClient) -> None:
    session = client.initialize("nodejs-calculator", "return event.params.a + event.params.b;")
    response = client.execute(session.request_id, {"a": 5, "b": 3})
    assert to_python(response.result) == 8


def test_no_script_for_an_unregistered_title_is_still_required(client: LambdaClient) -> None:
    with pytest.raises(InvalidArgumentError) as caught:
        client.initialize("python-not_in_the_catalog", "  ")
    assert caught.value.reason == "INVALID_REQUEST"
    assert "script_content is required" in caught.value.message


def test_buf_curl_lists_the_catalog(server: ServerThread) -> None:
    """The README's ListFunctions call: schemas come out as plain JSON."""
    answer = buf_curl(server.target, "ListFunctions", {"language": "nodejs", "pageSize": 10})
    listed = answer["functions"]
    assert [f["languageTitle"] for f in listed] == ["nodejs-calculator"]
    assert listed[0]["functionType"] == "FUNCTION_TYPE_PREDEFINED"
    assert listed[0]["paramsSchema"]["required"] == ["operation", "a", "b"]
