"""The opt-in result cache: successful results by (owner, script, context, params), in memory.

A caller opts in per call with `cache_control` (the original's X-Cache-Control):
`max-age=N` accepts a result at most N seconds old and keeps a fresh one for N
seconds; `no-cache` runs the script and keeps its result for the session's
default (none unless it has one); `no-store` neither reads nor keeps. With no `cache_control`, the
session's cache TTL (ExecutionOptions.cache_ttl, or the original's
`context.cache_ttl_seconds`; unset or 0: off) applies as max-age.

Only successful results are kept, as their JSON text (result_json): a hit
answers with the text the execution answered with, and the value read from it
again (orjson: a small part of building the response's Value). The owner is
part of the key so one tenant never receives a result another tenant's execution produced. The event a script
sees also holds the session's request_id; a script whose result depends on it
should not opt in. Each replica has its own cache, bounded by RESULT_CACHE_BYTES,
the least recently used entry going first.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from lambda_server import json_text
from lambda_server.domain import JSON
from lambda_server.errors import InvalidRequest
from lambda_server.metrics import Metrics

MAX_TTL_SECONDS = 24 * 3600
_SECONDS = re.compile(r"[0-9]{1,9}")


@dataclass(frozen=True)
class CachePolicy:
    """What one Execute may do with the cache."""

    read_max_age: float  # accept an entry at most this old; 0: do not read
    keep_for: float  # keep a fresh result this long; 0: do not keep

    @property
    def active(self) -> bool:
        return self.read_max_age > 0 or self.keep_for > 0


@dataclass(frozen=True)
class CacheControl:
    """A call's cache_control, parsed; None leaves that part to the session's default TTL."""

    read_max_age: float | None
    keep_for: float | None

    def policy(self, session_ttl: float) -> CachePolicy:
        """The policy once the session's default TTL is known."""
        return CachePolicy(
            session_ttl if self.read_max_age is None else self.read_max_age,
            session_ttl if self.keep_for is None else self.keep_for,
        )


_SESSION_DEFAULT = CacheControl(None, None)
_NO_STORE = CacheControl(0.0, 0.0)


def parse_cache_control(cache_control: str) -> CacheControl:
    """A call's cache_control; InvalidRequest when it is not understood."""
    directives = [part.strip().lower() for part in cache_control.split(",") if part.strip()]
    if not directives:
        return _SESSION_DEFAULT
    read: float | None = None
    keep: float | None = None
    for directive in directives:
        name, _, value = directive.partition("=")
        if name == "no-store" and not value:
            return _NO_STORE
        if name == "no-cache" and not value:
            read = 0.0
        elif name == "max-age" and _SECONDS.fullmatch(value):
            age = float(min(int(value), MAX_TTL_SECONDS))
            read = age if read is None else min(read, age)
            keep = age
        else:
            raise InvalidRequest(
                f"cache_control {cache_control[:100]!r} is not understood: "
                "use no-cache, no-store or max-age=SECONDS",
                field="cache_control",
            )
    return CacheControl(read, keep)


def cache_key(
    owner: str, runtime: str, script_hash: str, context: dict[str, JSON], params: dict[str, JSON]
) -> bytes:
    """A digest of everything the result may depend on, with object keys in canonical order
    (params read from params_json may hold integers past 64 bits, and 1 is not 1.0)."""
    body = json_text.dumps([owner, runtime, script_hash, context, params], sort_keys=True)
    return hashlib.blake2b(body, digest_size=20).digest()


@dataclass(frozen=True)
class CachedResult:
    """A kept result: the value and its JSON text, as the execution answered them."""

    result: JSON
    result_json: str


@dataclass(frozen=True)
class _Entry:
    result_json: str
    stored_at: float
    expires_at: float
    size: int


class ResultCache:
    """Results by key, within a total size; the least recently used go first."""

    def __init__(self, max_bytes: int, metrics: Metrics, clock: Callable[[], float] = time.monotonic) -> None:
        self._max_bytes = max_bytes
        self._metrics = metrics
        self._clock = clock
        self._bytes = 0
        self._entries: OrderedDict[bytes, _Entry] = OrderedDict()

    def get(self, key: bytes, max_age: float) -> CachedResult | None:
        """The entry when it is no older than max_age and unexpired, else None."""
        entry = self._entries.get(key)
        now = self._clock()
        if entry is None or now >= entry.expires_at or now - entry.stored_at > max_age:
            self._metrics.cache_requests.labels("miss").inc()
            return None
        self._entries.move_to_end(key)
        self._metrics.cache_requests.labels("hit").inc()
        return CachedResult(json_text.loads(entry.result_json.encode()), entry.result_json)

    def put(self, key: bytes, result_json: str, keep_for: float) -> None:
        """Keep a result, by its JSON text (as json_text read it once: it reads again)."""
        size = len(result_json) + 100  # the entry's own overhead, roughly
        if size > self._max_bytes or keep_for <= 0:
            return
        old = self._entries.pop(key, None)
        if old is not None:
            self._bytes -= old.size
        now = self._clock()
        self._entries[key] = _Entry(result_json, now, now + keep_for, size)
        self._bytes += size
        while self._bytes > self._max_bytes:
            _, dropped = self._entries.popitem(last=False)
            self._bytes -= dropped.size
        self._metrics.cache_bytes.set(self._bytes)
