"""What both front doors (gRPC, HTTP/JSON) do before a use case: who calls, and may it call now.

The gRPC servicer and the HTTP API call the same Gate, so a caller is authenticated,
counted and refused the same way on either; each front door only says it in its own
wire format (trailing metadata or HTTP headers, a status or an HTTP status).
"""

from __future__ import annotations

from lambda_server.auth import Authenticator
from lambda_server.domain import Caller
from lambda_server.limits import LimitedCall, RateLimiter
from lambda_server.logs import note_user

# The caller's executions a minute and what is left of them: Execute's (and ExecuteStream's
# and ExecuteBatch's) trailing metadata, and the HTTP Execute's headers.
RATE_LIMIT_HEADER = "x-ratelimit-limit"
RATE_REMAINING_HEADER = "x-ratelimit-remaining"
# What a call refused by the rate limit says of its quota.
REFUSED_QUOTA: tuple[tuple[str, str], ...] = ((RATE_REMAINING_HEADER, "0"),)


class Gate:
    """Authenticates a call's `authorization` and takes its tokens from the caller's bucket."""

    def __init__(self, authenticator: Authenticator, limiter: RateLimiter) -> None:
        self._auth = authenticator
        self._limiter = limiter

    def caller(self, authorization: str | None, address: str) -> Caller:
        """Who calls; Unauthenticated when the header does not hold. Noted for the call's request log."""
        caller = self._auth.authenticate(authorization or None, address)
        note_user(caller.user_id)
        return caller

    def admit(
        self, caller: Caller, call: LimitedCall = LimitedCall.EXECUTE, count: int = 1
    ) -> tuple[tuple[str, str], ...]:
        """Take `count` of the caller's tokens for `call`; the quota headers to send with the
        answer (none when the caller has no limit). RateLimited when the tokens are not
        there: the front door sends REFUSED_QUOTA with its refusal."""
        quota = self._limiter.admit(caller, call, count)
        if quota is None:
            return ()
        return ((RATE_LIMIT_HEADER, str(quota.limit)), (RATE_REMAINING_HEADER, str(quota.remaining)))
