"""Per-owner rate limits on executions and on Initialize: a token bucket for each (call, owner).

Each replica keeps its own buckets, so N replicas allow up to N times the rate:
a shared count would cost a PostgreSQL round trip on every call. Callers are
spread over replicas by the load balancer, which makes the per-replica limit a
fair approximation; set the rate per replica accordingly.
"""

from __future__ import annotations

import enum
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from lambda_server.config import AuthSettings
from lambda_server.domain import Caller
from lambda_server.errors import InvalidRequest, RateLimited
from lambda_server.metrics import Metrics

# Buckets kept at most; past it the least recently used goes. A bucket untouched for a
# minute is full again, so forgetting it loses nothing; one used more recently than
# that only while more callers than this are active at once.
MAX_BUCKETS = 100_000


class LimitedCall(enum.Enum):
    """What a bucket counts; each has its own rate for users and for anonymous callers."""

    EXECUTE = "execute"
    INITIALIZE = "initialize"


# The settings that name each rate, for the refusal's message: (user, anonymous).
_SETTINGS = {
    LimitedCall.EXECUTE: ("RATE_LIMIT_PER_MINUTE", "RATE_LIMIT_ANONYMOUS_PER_MINUTE"),
    LimitedCall.INITIALIZE: (
        "RATE_LIMIT_INITIALIZE_PER_MINUTE",
        "RATE_LIMIT_ANONYMOUS_INITIALIZE_PER_MINUTE",
    ),
}
_NOUNS = {LimitedCall.EXECUTE: "executions", LimitedCall.INITIALIZE: "Initialize calls"}


@dataclass(frozen=True)
class Quota:
    """What a caller has left after a call was admitted."""

    limit: int  # calls a minute
    remaining: int


class _Bucket:
    __slots__ = ("tokens", "updated")

    def __init__(self, tokens: float, updated: float) -> None:
        self.tokens = tokens
        self.updated = updated


class RateLimiter:
    """Admits a call or raises RateLimited with the delay after which one token is back."""

    def __init__(
        self, settings: AuthSettings, metrics: Metrics, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._rates = {
            LimitedCall.EXECUTE: (settings.rate_limit_per_minute, settings.anonymous_rate_limit_per_minute),
            LimitedCall.INITIALIZE: (
                settings.initialize_rate_limit_per_minute,
                settings.anonymous_initialize_rate_limit_per_minute,
            ),
        }
        self._metrics = metrics
        self._clock = clock
        self._buckets: OrderedDict[tuple[LimitedCall, str], _Bucket] = OrderedDict()

    def admit(self, caller: Caller, call: LimitedCall = LimitedCall.EXECUTE, count: int = 1) -> Quota | None:
        """Take `count` tokens (an ExecuteBatch's items) from the caller's bucket for `call`;
        None when the caller has no limit. InvalidRequest for more than a whole minute's worth:
        no wait would ever admit it."""
        user_limit, anonymous_limit = self._rates[call]
        limit = anonymous_limit if caller.anonymous else user_limit
        if limit <= 0:
            return None
        setting = _SETTINGS[call][1 if caller.anonymous else 0]
        if count > limit:
            raise InvalidRequest(
                f"a batch of {count} items takes {count} {_NOUNS[call]}, more than the {limit} a minute "
                f"this caller may make ({setting}): send at most {limit} items a call",
                field="params",
                setting=setting,
                limit=str(limit),
            )
        now = self._clock()
        key = (call, caller.owner)
        rate = limit / 60.0  # tokens a second; a full bucket is a minute's worth
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= MAX_BUCKETS:
                self._buckets.popitem(last=False)
            bucket = self._buckets[key] = _Bucket(float(limit), now)
        else:
            self._buckets.move_to_end(key)
            bucket.tokens = min(float(limit), bucket.tokens + (now - bucket.updated) * rate)
            bucket.updated = now
        if bucket.tokens < count:
            kind = "anonymous" if caller.anonymous else "user"
            self._metrics.rate_limited.labels(kind, call.value).inc()
            wait = (count - bucket.tokens) / rate
            who = f"address {caller.address}" if caller.anonymous else f"user {caller.user_id}"
            these = f"; this call takes {count}" if count > 1 else ""
            raise RateLimited(
                f"{who} may make {limit} {_NOUNS[call]} a minute ({setting}){these}; retry in {wait:.2f} s",
                retry_after=wait,
                limit=str(limit),
                setting=setting,
            )
        bucket.tokens -= count
        return Quota(limit, math.floor(bucket.tokens))
