"""Environments and memory are shared fairly: one owner's flood never takes another's share.

Issue 14, findings 1 and 7. Two tenants (two JWT subjects, so two owners) on a
server with a small pool; an attacker floods it while a victim is measured.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import jwt
import pytest

from lambda_microservice import LambdaClient, ResourceExhaustedError, to_python
from lambda_microservice.v1 import lambda_service_pb2 as pb
from lambda_server.config import AuthSettings, RuntimeSettings, SandboxSettings
from lambda_server.runtimes.shares import Held, Shares, Usage
from lambda_server.sandbox.memory import available_memory_mb
from tests.support import (
    IdleCpu,
    ServerThread,
    assert_p99_within,
    eventually,
    health_check,
    p99,
    pool_counts,
    server_settings,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the sandbox's namespaces and cgroups need root")

SECRET = "fairness-pool-secret-" + uuid.uuid4().hex
SLEEPER = "import time\nstarted = time.time()\ntime.sleep(params['s'])\nresult = started"
E = pb.ExecutionErrorCode


def token(sub: str) -> str:
    payload = {"sub": sub, "scope": "execute:all read:functions", "exp": int(time.time()) + 600}
    return jwt.encode(payload, SECRET, algorithm="HS256")


def tenant(server: ServerThread, sub: str) -> LambdaClient:
    return LambdaClient(server.target, timeout=30, metadata=(("authorization", f"Bearer {token(sub)}"),))


@pytest.fixture
def pool_server(database_url: str, request: pytest.FixtureRequest) -> Iterator[ServerThread]:
    runtime, sandbox = request.param
    auth = AuthSettings(mode="jwt", jwt_secret=SECRET, rate_limit_per_minute=0)
    settings = server_settings(
        runtime=replace(RuntimeSettings(timeout_seconds=10.0, prewarm_per_runtime=1), **runtime),
        sandbox=replace(SandboxSettings(), **sandbox),
        auth=auth,
    )
    running = ServerThread(settings, database_url)
    yield running
    running.stop()


def environments(client: LambdaClient) -> dict[str, int]:
    """bound, owners, waiting, memory_mb and memory_total_mb from Health's checks."""
    return dict(health_check(client, "environments").counts)


def in_threads(calls: list[Callable[[], Any]]) -> list[Callable[[], Any]]:
    """Start every call in a thread of its own; each returned callable waits for its result
    (or raises its error)."""
    results: list[Any] = [None] * len(calls)

    def run(i: int) -> None:
        try:
            results[i] = calls[i]()
        except Exception as exc:
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(calls))]
    for thread in threads:
        thread.start()

    def waiter(i: int) -> Callable[[], Any]:
        def wait() -> Any:
            threads[i].join(60)
            return results[i]

        return wait

    return [waiter(i) for i in range(len(calls))]


def measure(client: LambdaClient, request_id: str, n: int, until: float = float("inf")) -> list[float]:
    """Up to n warm executions (fewer once time.monotonic() passes `until`); each must be
    served, in the environment it already had."""
    latencies: list[float] = []
    while len(latencies) < n and time.monotonic() < until:
        started = time.perf_counter()
        response = client.execute(request_id, {"n": len(latencies)})
        latencies.append(time.perf_counter() - started)
        assert to_python(response.result) == len(latencies) - 1
        assert response.environment_state == pb.ENVIRONMENT_STATE_WARM
    return latencies


# the attacker's waiting calls give up after this; the victim is measured in the first half,
# what is left of it once the flood's processes have started (seconds on a busy machine)
QUEUE_TIMEOUT = 8.0
SMALL_POOL = {
    "max_environments": 4,
    "max_environments_per_owner": 2,
    "queue_timeout_seconds": QUEUE_TIMEOUT,
}


@pytest.mark.parametrize("pool_server", [(SMALL_POOL, {})], indirect=True)
def test_a_flood_of_sessions_never_takes_another_owners_environment(pool_server: ServerThread) -> None:
    """Finding 1: an owner at its share waits for its own environments; the victim's warm
    one is never evicted, and its p99 stays within 2x of its p99 alone."""
    with tenant(pool_server, "victim") as victim, tenant(pool_server, "attacker") as attacker:
        own = victim.initialize("python-victim", "result = params['n']").request_id
        victim.execute(own, {"n": 0})
        with IdleCpu() as idle:
            alone = measure(victim, own, 200)
        # 6 sessions sleeping past the queue's bound (within their own timeout)
        floods = [attacker.initialize("python-flood", SLEEPER + f"  # {i}").request_id for i in range(6)]
        attacked = time.monotonic()  # before any of the attacker's calls waits: its queue time is after
        calls = in_threads(
            [lambda rid=rid: attacker.execute(rid, {"s": QUEUE_TIMEOUT + 2}) for rid in floods]
        )
        eventually(lambda: environments(victim)["waiting"] == 4)
        counts = environments(victim)
        assert counts["bound"] == 3  # the victim's one and the attacker's share
        # the attacker's processes have started (and the pre-started one was replaced):
        # what is measured is the flood, not the machine's process starts
        eventually(lambda: pool_counts(victim, "python") == {"warm": 1, "busy": 2, "idle": 1})
        # while the attacker's 4 wait (they give up after QUEUE_TIMEOUT)
        during = measure(victim, own, 300, until=attacked + QUEUE_TIMEOUT * 0.5)
        assert len(during) >= 50 and environments(victim)["waiting"] == 4
        results = [call() for call in calls]
        served = [r for r in results if isinstance(r, pb.ExecuteResponse)]
        refused = [r for r in results if isinstance(r, ResourceExhaustedError)]
        assert (len(served), len(refused)) == (2, 4), results
        assert "RUNTIME_QUEUE_TIMEOUT_SECONDS" in str(refused[0])
        assert victim.execute(own, {"n": 7}).environment_state == pb.ENVIRONMENT_STATE_WARM
        after = measure(victim, own, 200)
        assert_p99_within([p99(alone), p99(after)], [p99(during)], idle.fraction)


@pytest.mark.parametrize(
    "pool_server",
    [({"max_environments": 2, "max_environments_per_owner": 2, "queue_timeout_seconds": 30.0}, {})],
    indirect=True,
)
def test_waiting_executions_are_served_round_robin_across_owners(pool_server: ServerThread) -> None:
    """A's three waiting executions came first, B's one later: B's is served after A's
    first, before A's others (one global FIFO would serve it last).

    Which owner each freed environment went to is read from Health (`owners` holding
    environments, `waiting`), not from the scripts' start times: two grants a few ms apart
    each start a process, whose jitter on a busy machine can reorder their start times."""
    with tenant(pool_server, "owner-a") as a, tenant(pool_server, "owner-b") as b:
        sessions = [a.initialize("python-rr", SLEEPER + f"  # a{i}").request_id for i in range(5)]
        other = b.initialize("python-rr", SLEEPER + "  # b").request_id
        # A's two running calls end 2 s apart: the two grants that matter come apart in time
        running = in_threads(
            [
                lambda rid=rid, s=s: a.execute(rid, {"s": s})
                for rid, s in zip(sessions[:2], (1, 3), strict=True)
            ]
        )
        eventually(lambda: environments(a)["bound"] == 2)
        queued = []
        for rid in sessions[2:]:  # one at a time, so that their order is known
            queued += in_threads([lambda rid=rid: a.execute(rid, {"s": 1.5})])
            count = len(queued)
            eventually(lambda count=count: environments(a)["waiting"] == count)
        b_call = in_threads([lambda: b.execute(other, {"s": 1.5})])[0]
        eventually(lambda: environments(a)["waiting"] == 4)
        assert environments(a)["owners"] == 1

        def once_waiting_below(n: int) -> dict[str, int]:
            counts = environments(a)
            return counts if counts["waiting"] < n else {}

        # the first grant (A's 1 s call ends): A's first waiting one, as A's turn came first.
        # The next grant comes 1.5 s later at the earliest (A's 3 s call, or this one, ends).
        first = eventually(lambda: once_waiting_below(4))
        assert (first["waiting"], first["owners"]) == (3, 1), first
        # the second grant, whichever environment frees: B's, before A's second. Until B's
        # ends (1.5 s on), B holds one; a FIFO serves B last, so A alone holds any until then
        second = eventually(lambda: once_waiting_below(3))
        assert second["waiting"] >= 1 and second["owners"] == 2, second
        for call in running:
            assert isinstance(call(), pb.ExecuteResponse)
        a_starts = [to_python(call().result) for call in queued]
        assert isinstance(b_call(), pb.ExecuteResponse)
        assert a_starts == sorted(a_starts)  # first come, first served within an owner (grants 1 s apart)


MEMORY_POOL = {"max_environments": 4, "max_environments_per_owner": 2, "queue_timeout_seconds": 2.0}


@pytest.mark.parametrize(
    "pool_server",
    [({**MEMORY_POOL, "prewarm_per_runtime": 0}, {"memory_mb": 128, "total_memory_mb": 1536})],
    indirect=True,
)
def test_an_owner_asking_for_large_memory_cannot_take_anothers(pool_server: ServerThread) -> None:
    """Finding 7: environments' limits fit in SANDBOX_TOTAL_MEMORY_MB; an owner holds at most
    its share of it (here 1536 x 2/4 = 768 MiB) and the victim's environments still fit."""
    with tenant(pool_server, "victim") as victim, tenant(pool_server, "attacker") as attacker:
        own = victim.initialize("python-victim", "result = params['n']").request_id
        victim.execute(own, {"n": 0})
        big = {"memory_mb": 512, "timeout_ms": 10000}
        floods = [
            attacker.initialize("python-hog", SLEEPER + f"  # {i}", context=big).request_id for i in range(4)
        ]
        calls = in_threads([lambda rid=rid: attacker.execute(rid, {"s": 4}) for rid in floods])
        eventually(lambda: environments(victim)["waiting"] == 3)
        counts = environments(victim)
        assert counts["memory_mb"] <= counts["memory_total_mb"] == 1536
        assert counts["bound"] == 2  # the victim's, and one of 512 MiB: two would pass 768
        # the victim keeps its environment, and a new one of its own fits beside
        measure(victim, own, 5)
        fresh = victim.initialize("python-victim", "result = params['n'] * 2").request_id
        assert to_python(victim.execute(fresh, {"n": 2}).result) == 4
        assert environments(victim)["memory_mb"] <= 1536
        results = [call() for call in calls]
        assert sum(isinstance(r, pb.ExecuteResponse) for r in results) == 1, results
        assert sum(isinstance(r, ResourceExhaustedError) for r in results) == 3, results
        # more than an owner's share can never fit: refused at once, naming the setting
        huge = attacker.initialize("python-hog", "result = 1", context={"memory_mb": 1024}).request_id
        with pytest.raises(ResourceExhaustedError, match="SANDBOX_TOTAL_MEMORY_MB"):
            attacker.execute(huge)


def _own_memory_groups() -> set[Path]:
    """The v1 memory groups that servers of this process made."""
    lines = Path("/proc/self/cgroup").read_text().splitlines()
    own = [line.split(":", 2)[2] for line in lines if "memory" in line.split(":", 2)[1].split(",")]
    if not own:
        return set()
    return set((Path("/sys/fs/cgroup/memory") / own[0].lstrip("/")).glob(f"lambda-{os.getpid()}-*"))


@pytest.mark.skipif(not Path("/sys/fs/cgroup/memory/cgroup.procs").exists(), reason="cgroup v1 memory")
def test_a_kill_by_a_limit_above_the_environment_is_not_the_scripts_memory_limit(
    database_url: str,
) -> None:
    """Finding 7: the kernel killed the largest process because memory ran out above the
    environment (here: a limit on the server's own group, as a container's would be). The
    environment never reached its own limit, so it is not MEMORY_LIMIT; a script past its
    own limit still is."""
    before = _own_memory_groups()
    runtime = RuntimeSettings(timeout_seconds=10.0, prewarm_per_runtime=0)
    running = ServerThread(server_settings(runtime=runtime), database_url)
    try:
        groups = _own_memory_groups() - before  # the server's, under this process's group
        assert len(groups) == 1, groups
        group = groups.pop()
        with LambdaClient(running.target, timeout=30) as client:
            hog = "data = 'x' * (params['mb'] * 1024 * 1024)\nresult = len(data)"
            roomy = client.initialize("python-host-oom", hog, context={"memory_mb": 1024}).request_id
            assert to_python(client.execute(roomy, {"mb": 8}).result) == 8 * 1024 * 1024
            ceiling = 300 * 1024 * 1024  # below what the script takes, above what the server's group holds
            (group / "memory.limit_in_bytes").write_text(str(ceiling))
            try:
                (group / "memory.memsw.limit_in_bytes").write_text(str(ceiling))
                killed = client.execute(roomy, {"mb": 600})
            finally:
                (group / "memory.memsw.limit_in_bytes").write_text("-1")
                (group / "memory.limit_in_bytes").write_text("-1")
            assert killed.error.code == E.Value("EXECUTION_ERROR_CODE_RUNTIME_ERROR"), killed.error
            assert "out-of-memory killer" in killed.error.message
            assert "its limit is 1024 MiB" in killed.error.message
            tight = client.initialize("python-own-oom", hog, context={"memory_mb": 64}).request_id
            over = client.execute(tight, {"mb": 200})
            assert over.error.code == E.Value("EXECUTION_ERROR_CODE_MEMORY_LIMIT"), over.error
    finally:
        running.stop()


def test_an_owner_at_its_share_only_ever_evicts_its_own() -> None:
    """The room-making rules alone: A at its share, the pool full of idle environments."""
    shares = Shares(max_environments=4, per_owner=2, total_memory_mb=None)
    idle = [Held("b1", "b", 256), Held("a1", "a", 256), Held("b2", "b", 256)]  # least recent first
    a_full = {"a": Usage(2, 512), "b": Usage(2, 512)}
    assert shares.room_for("a", 256, 256, 4, None, idle, [], a_full, []).victims == ["a1"]
    assert shares.room_for("a", 256, 256, 4, None, [idle[0], idle[2]], [], a_full, []).victims is None
    # under its share, an owner takes the least recently used idle one of an owner over
    # an equal part (b holds 3 of 4, c none): b's, not c's older one
    idle = [Held("c1", "c", 256), Held("b1", "b", 256)]
    usage = {"b": Usage(3, 768), "c": Usage(1, 256)}
    assert shares.room_for("a", 256, 256, 4, None, idle, [], usage, []).victims == ["b1"]


def test_the_memory_budget_is_the_least_of_the_host_and_the_containers_limits(tmp_path: Path) -> None:
    """SANDBOX_TOTAL_MEMORY_MB=0: a limit on an ancestor of the server's group counts (a pod's)."""
    proc, root = tmp_path / "proc", tmp_path / "cgroup"
    (proc / "self").mkdir(parents=True)
    (proc / "meminfo").write_text("MemTotal:       8388608 kB\n")  # 8 GiB
    (proc / "self" / "cgroup").write_text("4:memory:/pod/server\n0::/\n")
    (root / "memory" / "pod" / "server").mkdir(parents=True)
    (root / "memory" / "pod" / "server" / "memory.limit_in_bytes").write_text(str(2**63 - 4096))
    (root / "memory" / "pod" / "memory.limit_in_bytes").write_text(str(3 * 1024**3))
    assert available_memory_mb(root, proc) == 3072
    (root / "memory" / "pod" / "memory.limit_in_bytes").write_text(str(2**63 - 4096))
    assert available_memory_mb(root, proc) == 8192
