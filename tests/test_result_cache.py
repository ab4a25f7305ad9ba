"""The opt-in result cache: cache_control per call, context.cache_ttl_seconds per session."""

from __future__ import annotations

import grpc
import pytest

from lambda_microservice import LambdaClient, LambdaError, to_python

RANDOM = (
    "import random\ndef handler(event):\n    return {'n': event['params'].get('n'), 'r': random.random()}"
)


def test_a_cached_execution_returns_the_same_result_and_no_cache_bypasses_it(client: LambdaClient) -> None:
    session = client.initialize("python-cached", RANDOM)
    first = client.execute(session.request_id, {"n": 1}, cache_control="max-age=60")
    again = client.execute(session.request_id, {"n": 1}, cache_control="max-age=60")
    assert (first.cached, again.cached) == (False, True)
    assert to_python(again.result) == to_python(first.result)
    assert not client.execute(session.request_id, {"n": 1}, cache_control="no-cache").cached
    fresh = client.execute(session.request_id, {"n": 1}, cache_control="no-cache, max-age=60")
    assert not fresh.cached and to_python(fresh.result) != to_python(first.result)
    # the refreshed result replaced the first for the next reader
    assert to_python(client.execute(session.request_id, {"n": 1}, cache_control="max-age=60").result) == (
        to_python(fresh.result)
    )
    # other params are another entry; without cache_control (and no session default) nothing is cached
    assert not client.execute(session.request_id, {"n": 2}, cache_control="max-age=60").cached
    assert not client.execute(session.request_id, {"n": 1}).cached
    # a hit is an Execute answered: it is counted like any other
    assert client.get_session(session.request_id).execution_count == 7


def test_the_key_is_canonical_params_and_no_store_neither_reads_nor_keeps(client: LambdaClient) -> None:
    session = client.initialize("python-cached-keys", RANDOM)
    first = client.execute(session.request_id, {"n": {"a": 1, "b": 2}}, cache_control="max-age=60")
    reordered = client.execute(session.request_id, {"n": {"b": 2, "a": 1}}, cache_control="max-age=60")
    assert reordered.cached and to_python(reordered.result) == to_python(first.result)
    stored = client.execute(session.request_id, {"n": 3}, cache_control="no-store")
    assert not stored.cached
    assert not client.execute(session.request_id, {"n": 3}, cache_control="max-age=60").cached


def test_the_session_default_comes_from_context_cache_ttl_seconds(client: LambdaClient) -> None:
    session = client.initialize("python-cached-default", RANDOM, context={"cache_ttl_seconds": 60})
    first = client.execute(session.request_id, {"n": 1})
    again = client.execute(session.request_id, {"n": 1})
    assert again.cached and to_python(again.result) == to_python(first.result)
    assert not client.execute(session.request_id, {"n": 1}, cache_control="max-age=0").cached


def test_failures_are_never_cached(client: LambdaClient) -> None:
    session = client.initialize(
        "python-cached-failure", "import random\nif random.random() < 2:\n    raise ValueError('no')"
    )
    for _ in range(2):
        response = client.execute(session.request_id, cache_control="max-age=60")
        assert response.HasField("error") and not response.cached


@pytest.mark.parametrize(
    "cache_control", ["max-age=soon", "private", "max-age=-1", "max-age=\u00b2", "max-age=" + "9" * 5000]
)
def test_a_cache_control_it_does_not_understand_is_invalid_argument(
    client: LambdaClient, cache_control: str
) -> None:
    session = client.initialize("python-cached-bad", "result = 1")
    with pytest.raises(LambdaError) as refused:
        client.execute(session.request_id, cache_control=cache_control)
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert refused.value.metadata["field"] == "cache_control"


def test_a_bad_cache_ttl_is_refused_at_initialize(client: LambdaClient) -> None:
    with pytest.raises(LambdaError) as refused:
        client.initialize("python-cached-bad-ttl", "result = 1", context={"cache_ttl_seconds": "long"})
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
