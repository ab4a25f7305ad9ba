"""The server under benchmark: `python -m lambda_server` on a throwaway database, as deployed."""

from __future__ import annotations

import os
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.support import (
    create_database,
    drop_database,
    port_answers,
    run_sync,
    server_process,
    with_database,
)

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


@dataclass(frozen=True)
class BenchServer:
    target: str  # host:port of the gRPC server
    metrics_url: str
    pid: int
    database_url: str

    def rss_bytes(self) -> int:
        """The server process's resident memory, without its runtime processes."""
        return _rss(self.pid)

    def environments_rss(self) -> tuple[int, int]:
        """(count, total resident bytes) of the runtime processes below the server: the
        interpreters, each with the `unshare` that holds its namespaces (counted in its bytes)."""
        children = _descendants(self.pid)
        runtimes = [pid for pid in children if _name(pid) != "unshare"]
        return len(runtimes), sum(_rss(pid) for pid in children)

    def cpu_seconds(self) -> dict[str, dict[int, float]]:
        """CPU time used so far by the server, its runtime processes and the local PostgreSQL's
        processes (every process named postgres on this machine), by pid."""
        postgres = [pid for pid in _pids() if _name(pid) == "postgres"]
        return {
            "server": _cpu_by_pid([self.pid]),
            "runtimes": _cpu_by_pid(_descendants(self.pid)),
            "postgres": _cpu_by_pid(postgres),
        }

    def samples(self, name: str) -> dict[tuple[tuple[str, str], ...], float]:
        """The current values of one metric, by its labels."""
        with urllib.request.urlopen(self.metrics_url, timeout=10) as response:
            text = response.read().decode()
        values: dict[tuple[tuple[str, str], ...], float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name:
                    values[tuple(sorted(sample.labels.items()))] = sample.value
        return values


def admin_url() -> str:
    if os.environ.get("DATABASE_URL"):
        return os.environ["DATABASE_URL"]
    if port_answers("127.0.0.1", 5432):
        return "postgresql://postgres@127.0.0.1:5432/postgres"
    from lambda_server.store.embedded import start_embedded

    return start_embedded(ROOT / ".data" / "bench-postgres")


@contextmanager
def running_server(**env_overrides: str) -> Iterator[BenchServer]:
    """The server on a database of its own, anonymous callers unlimited; stopped with SIGTERM.

    The benchmark is one owner (its address) making tens of thousands of sessions an
    hour, past MAX_SESSIONS_PER_OWNER's default: it measures Initialize, not the quota.
    """
    admin = admin_url()
    name = run_sync(create_database(admin))
    url = with_database(admin, name)
    env = {"MAX_SESSIONS_PER_OWNER": "10000000", **env_overrides}
    try:
        with server_process(url, **env) as process:
            yield BenchServer(process.target, process.metrics_url, process.pid, url)
    finally:
        run_sync(drop_database(admin, name))


def cpu_per_call(
    before: dict[str, dict[int, float]], after: dict[str, dict[int, float]], calls: float
) -> dict[str, float]:
    """Microseconds of CPU a call, by part, over the processes alive at both readings."""
    return {
        part: sum(after[part][pid] - used for pid, used in before[part].items() if pid in after[part])
        / max(1.0, calls)
        * 1e6
        for part in before
    }


def _cpu_by_pid(pids: list[int]) -> dict[int, float]:
    ticks = os.sysconf("SC_CLK_TCK")
    used = {}
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            used[pid] = (int(fields[11]) + int(fields[12])) / ticks  # utime + stime
        except (OSError, IndexError, ValueError):
            continue
    return used


def _pids() -> list[int]:
    return [int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit()]


def _rss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _descendants(root: int) -> list[int]:
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
    found: set[int] = set()
    frontier = {root}
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return sorted(found)
