"""Issue 14 item 9 at the speed of issue 17: concurrent Initializes are stored in one statement
a batch, and the batch keeps each owner's caps exactly, in order of arrival."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any

import pytest

from lambda_server.config import DatabaseSettings
from lambda_server.domain import Deadline, NewSession, SessionRecord
from lambda_server.errors import InternalError, LambdaError, QuotaExceeded, SessionConflict
from lambda_server.store import migrations
from lambda_server.store.database import Database
from lambda_server.store.sessions import OwnerQuota, SessionStore
from tests.support import run_sync

SCRIPT = "result = 1\n"
HASH = "a" * 64


def new_session(owner: str, script: str = SCRIPT, request_id: str | None = None, **fields: Any) -> NewSession:
    return NewSession(
        request_id or str(uuid.uuid4()),
        fields.pop("language_title", "python-quota2"),
        None,
        {},
        script,
        fields.pop("script_hash", HASH),
        600,
        owner=owner,
    )


@asynccontextmanager
async def quota_store(url: str, quota: OwnerQuota, batches: list[int]) -> AsyncIterator[SessionStore]:
    db = Database(DatabaseSettings(command_timeout=30.0, statement_timeout_ms=30_000), url)
    await db.open()
    try:
        await migrations.apply(db, migrations.load(migrations.default_directory()))
        store = SessionStore(db, quota=quota, observe_create_batch=batches.append)
        try:
            yield store
        finally:
            await store.close()
    finally:
        await db.close()


def in_store(
    url: str, quota: OwnerQuota, test: Callable[[SessionStore, list[int]], Coroutine[Any, Any, None]]
) -> None:
    async def body() -> None:
        batches: list[int] = []
        async with quota_store(url, quota, batches) as store:
            await test(store, batches)

    run_sync(body())


async def create_all(store: SessionStore, creates: list[NewSession]) -> list[SessionRecord | LambdaError]:
    """Every create at once: queued in this order before the first batch leaves."""
    answers = await asyncio.gather(
        *(store.create(new, Deadline.after(20)) for new in creates), return_exceptions=True
    )
    for answer in answers:
        if not isinstance(answer, SessionRecord | LambdaError):
            raise answer
    return answers  # type: ignore[return-value]


def refused(answer: object, setting: str) -> QuotaExceeded:
    assert isinstance(answer, QuotaExceeded), answer
    assert answer.metadata["setting"] == setting, answer
    return answer


def test_one_batch_admits_in_order_skips_a_retry_and_refuses_past_each_cap(fresh_database: str) -> None:
    """Within one statement: a retried request_id is answered and not counted, a create too
    large for the bytes left is refused while a smaller one after it fits, the session cap
    refuses the rest, and another owner in the same batch is counted on its own."""
    big = "#" + "x" * 5000 + "\n" + SCRIPT
    stored = len(SCRIPT) + len("{}")  # a session stores its script and context

    async def test(store: SessionStore, batches: list[int]) -> None:
        owner, other = f"user:a-{uuid.uuid4().hex[:6]}", f"user:b-{uuid.uuid4().hex[:6]}"
        first = await store.create(new_session(owner), Deadline.after(20))
        creates = [
            new_session(owner),  # 2nd session
            new_session(owner, request_id=first.request_id),  # a retry: its session, not counted
            new_session(owner, big, script_hash="b" * 64),  # past the bytes left: refused
            new_session(other),  # another owner's first
            new_session(owner),  # 3rd session: fits, after the refused large one
            new_session(owner, request_id=first.request_id, script_hash="c" * 64),  # next batch: conflict
            new_session(owner),  # past MAX_SESSIONS_PER_OWNER 3: refused
            new_session(other),  # the other owner's second
        ]
        answers = await create_all(store, creates)
        # each owner's first create finds it idle and goes alone; the owner's next ones
        # make a batch, up to the repeated request_id, which waits for the next batch
        assert sorted(batches) == [1, 1, 1, 1, 2, 3], batches
        kept = [a.request_id if isinstance(a, SessionRecord) else type(a).__name__ for a in answers]
        assert kept == [
            creates[0].request_id,
            first.request_id,
            "QuotaExceeded",
            creates[3].request_id,
            creates[4].request_id,
            "SessionConflict",
            "QuotaExceeded",
            creates[7].request_id,
        ]
        assert answers[1] == first  # the stored one, as it was
        bytes_refusal = refused(answers[2], "MAX_SCRIPT_BYTES_PER_OWNER")
        assert bytes_refusal.metadata["sessions"] == "2"
        assert bytes_refusal.metadata["bytes"] == str(2 * stored)
        count_refusal = refused(answers[6], "MAX_SESSIONS_PER_OWNER")
        assert count_refusal.metadata["sessions"] == "3"
        # when the owner's oldest session expires: the first one's 600 s, by the database clock
        assert 500 < count_refusal.retry_after <= 600
        assert isinstance(answers[5], SessionConflict)
        # the batch's own sessions count for the next create
        with pytest.raises(QuotaExceeded):
            await store.create(new_session(owner), Deadline.after(20))

    in_store(fresh_database, OwnerQuota(max_sessions=3, max_bytes=4 * (len(SCRIPT) + 2)), test)


def test_a_refused_first_create_gets_the_batchs_expiry_as_its_retry(fresh_database: str) -> None:
    """An owner with no session before the batch: a refusal names when the sessions this
    same batch stored expire, not a retry at once."""

    async def test(store: SessionStore, batches: list[int]) -> None:
        owner = f"user:c-{uuid.uuid4().hex[:6]}"
        answers = await create_all(store, [new_session(owner) for _ in range(4)])
        assert batches == [1, 3]  # the first found the owner idle
        assert sum(isinstance(a, SessionRecord) for a in answers) == 2
        for answer in answers[2:]:
            assert 500 < refused(answer, "MAX_SESSIONS_PER_OWNER").retry_after <= 600

    in_store(fresh_database, OwnerQuota(max_sessions=2, max_bytes=10**9), test)


def test_a_create_postgresql_refuses_fails_alone_and_its_batch_is_stored(fresh_database: str) -> None:
    async def test(store: SessionStore, batches: list[int]) -> None:
        owner = f"user:d-{uuid.uuid4().hex[:6]}"
        creates = [new_session(owner), new_session(owner, language_title="p" * 200), new_session(owner)]
        answers = await create_all(store, creates)
        assert batches == [1, 2, 1, 1]  # the batch of two failed, each was stored alone
        assert isinstance(answers[1], InternalError)
        assert [a.request_id for a in answers if isinstance(a, SessionRecord)] == [
            creates[0].request_id,
            creates[2].request_id,
        ]

    in_store(fresh_database, OwnerQuota(max_sessions=10, max_bytes=10**9), test)


def test_two_replicas_batching_one_owner_at_once_store_exactly_the_cap(fresh_database: str) -> None:
    """Two stores on pools of their own (two replicas), each with a batch of each of the same
    two owners: the advisory locks order the batches, so each owner ends at its cap."""
    quota = OwnerQuota(max_sessions=5, max_bytes=10**9)

    async def body() -> None:
        batches: list[int] = []
        async with (
            quota_store(fresh_database, quota, batches) as one,
            quota_store(fresh_database, quota, batches) as two,
        ):
            for store in (one, two):  # connected, so that the two batches meet in PostgreSQL
                await store.create(new_session("user:warm-up"), Deadline.after(20))
            for _ in range(3):  # two batches at once may pass each other by chance
                owners = [f"user:e-{uuid.uuid4().hex[:6]}", f"user:f-{uuid.uuid4().hex[:6]}"]
                ones, twos = ([new_session(owners[i % 2]) for i in range(20)] for _ in range(2))
                answers = await asyncio.gather(create_all(one, ones), create_all(two, twos))
                stored = [a for answer in answers for a in answer if isinstance(a, SessionRecord)]
                assert len(stored) == 2 * quota.max_sessions
                for a in answers[0] + answers[1]:
                    if not isinstance(a, SessionRecord):
                        refused(a, "MAX_SESSIONS_PER_OWNER")
        assert sorted(batches) == [1] * 14 + [9] * 12  # per owner, the first alone

    run_sync(body())
