"""Per-caller rate limits on executions: a token bucket for each user (or anonymous address).

Each replica keeps its own buckets, so N replicas allow up to N times the rate:
a shared count would cost a PostgreSQL round trip on every Execute. Callers are
spread over replicas by the load balancer, which makes the per-replica limit a
fair approximation; set the rate per replica accordingly.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from lambda_server.config import AuthSettings
from lambda_server.domain import Caller
from lambda_server.errors import RateLimited
from lambda_server.metrics import Metrics

# Buckets kept at most; past it the least recently used goes. A bucket untouched for a
# minute is full again, so forgetting it loses nothing; one used more recently than
# that only while more callers than this are active at once.
MAX_BUCKETS = 100_000


@dataclass(frozen=True)
class Quota:
    """What a caller has left after an execution was admitted."""

    limit: int  # executions a minute
    remaining: int


class _Bucket:
    __slots__ = ("tokens", "updated")

    def __init__(self, tokens: float, updated: float) -> None:
        self.tokens = tokens
        self.updated = updated


class RateLimiter:
    """Admits an execution or raises RateLimited with the delay after which one token is back."""

    def __init__(
        self, settings: AuthSettings, metrics: Metrics, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._per_user = settings.rate_limit_per_minute
        self._per_anonymous = settings.anonymous_rate_limit_per_minute
        self._metrics = metrics
        self._clock = clock
        self._buckets: OrderedDict[tuple[bool, str], _Bucket] = OrderedDict()

    def admit(self, caller: Caller) -> Quota | None:
        """Take one token from the caller's bucket; None when the caller has no limit."""
        limit = self._per_anonymous if caller.anonymous else self._per_user
        if limit <= 0:
            return None
        now = self._clock()
        key = (caller.anonymous, caller.address if caller.anonymous else caller.user_id or "")
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
        if bucket.tokens < 1.0:
            self._metrics.rate_limited.labels("anonymous" if caller.anonymous else "user").inc()
            wait = (1.0 - bucket.tokens) / rate
            if caller.anonymous:
                who, setting = f"address {caller.address}", "RATE_LIMIT_ANONYMOUS_PER_MINUTE"
            else:
                who, setting = f"user {caller.user_id}", "RATE_LIMIT_PER_MINUTE"
            raise RateLimited(
                f"{who} may make {limit} executions a minute ({setting}); retry in {wait:.2f} s",
                retry_after=wait,
                limit=str(limit),
            )
        bucket.tokens -= 1.0
        return Quota(limit, math.floor(bucket.tokens))
