"""A session's options: InitializeRequest.options, else the original service's context keys,
else the server's defaults; resolved once, at Initialize, within the server's bounds.

A typed option out of bounds is refused naming the option and the bound. The context
keys keep the original's rules: `timeout_ms` above the maximum is cut to it, the
others are refused outside their bounds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lambda_server.config import RuntimeSettings, SandboxSettings
from lambda_server.domain import JSON, RequestedOptions, SessionOptions
from lambda_server.errors import InvalidRequest
from lambda_server.result_cache import MAX_TTL_SECONDS

MIN_MEMORY_MB = 16
MAX_TIMEOUT_MS = 2**53  # what a JSON number holds exactly


@dataclass(frozen=True)
class _Bounds:
    """What a typed option may be: from `low` (above it, when `positive`) to `high`."""

    low: float
    high: float
    setting: str = ""  # the setting that gives `high`, named in the refusal
    positive: bool = False
    unit: str = ""

    def check(self, field: str, value: float) -> float:
        """`value`, or InvalidRequest naming the field and the bound it passes."""
        if not math.isfinite(value):  # NaN passes every comparison, infinity may pass `high`
            raise InvalidRequest(f"{field} must be a finite number, not {value!r}", field=field)
        if (value <= self.low if self.positive else value < self.low) or value > self.high:
            low = (
                f"more than {self.low:g}{self.unit}" if self.positive else f"at least {self.low:g}{self.unit}"
            )
            high = f"at most {self.high:g}{self.unit}" + (f" ({self.setting})" if self.setting else "")
            raise InvalidRequest(
                f"{field} must be {low} and {high}, not {value:g}{self.unit}",
                field=field,
                limit=f"{self.high:g}",
            )
        return value


class SessionOptionsPolicy:
    """Resolves and bounds session options with the server's settings."""

    def __init__(self, runtime: RuntimeSettings, sandbox: SandboxSettings) -> None:
        self._runtime = runtime
        self._sandbox = sandbox
        self._timeout = _Bounds(
            0, runtime.max_timeout_seconds, "RUNTIME_MAX_TIMEOUT_SECONDS", positive=True, unit=" s"
        )
        self._memory = _Bounds(MIN_MEMORY_MB, sandbox.max_memory_mb, "SANDBOX_MAX_MEMORY_MB")
        self._processes = _Bounds(1, sandbox.max_max_processes, "SANDBOX_PROCESS_CEILING")
        self._cache_ttl = _Bounds(0, MAX_TTL_SECONDS, unit=" s")

    def resolve(self, requested: RequestedOptions, context: dict[str, JSON]) -> SessionOptions:
        """The options a session runs with: each typed option, else its context key, else
        the default; InvalidRequest naming the field and its bound."""
        sandbox, asked = self._sandbox, requested
        return SessionOptions(
            timeout_seconds=(
                self._context_timeout(context)
                if asked.timeout_seconds is None
                else self._timeout.check("options.timeout", asked.timeout_seconds)
            ),
            memory_mb=(
                _context_int(context, "memory_mb", sandbox.memory_mb, MIN_MEMORY_MB, sandbox.max_memory_mb)
                if asked.memory_mb is None
                else int(self._memory.check("options.memory_mb", asked.memory_mb))
            ),
            max_processes=(
                _context_int(context, "max_processes", sandbox.max_processes, 1, sandbox.max_max_processes)
                if asked.max_processes is None
                else int(self._processes.check("options.max_processes", asked.max_processes))
            ),
            cache_ttl_seconds=(
                _context_cache_ttl(context, self._runtime.default_cache_ttl_seconds)
                if asked.cache_ttl_seconds is None
                else self._cache_ttl.check("options.cache_ttl", asked.cache_ttl_seconds)
            ),
        )

    def from_context(self, context: dict[str, JSON]) -> SessionOptions:
        """The options of a session stored without them (before meta.sessions.options)."""
        return self.resolve(RequestedOptions(), context)

    def _context_timeout(self, context: dict[str, JSON]) -> float:
        """context.timeout_ms, else the default; either capped by the maximum."""
        runtime = self._runtime
        raw = context.get("timeout_ms")
        if raw is None:
            return min(runtime.timeout_seconds, runtime.max_timeout_seconds)
        if isinstance(raw, bool) or not isinstance(raw, int | float) or not 0 < raw < MAX_TIMEOUT_MS:
            raise InvalidRequest(
                f"context.timeout_ms must be a positive number of milliseconds, not {raw!r}",
                field="timeout_ms",
            )
        return min(raw / 1000.0, runtime.max_timeout_seconds)


def _context_int(context: dict[str, JSON], name: str, default: int, low: int, high: int) -> int:
    raw = context.get(name)
    if raw is None:
        return default
    if isinstance(raw, bool) or not isinstance(raw, int) or not low <= raw <= high:
        raise InvalidRequest(
            f"context.{name} must be an integer from {low} to {high}, not {raw!r}", field=name
        )
    return raw


def _context_cache_ttl(context: dict[str, JSON], default: float) -> float:
    """context.cache_ttl_seconds: a number of seconds from 0 to a day (absent: `default`,
    DEFAULT_CACHE_TTL_SECONDS; 0 is off)."""
    raw = context.get("cache_ttl_seconds")
    if raw is None:
        return default
    if isinstance(raw, bool) or not isinstance(raw, int | float) or not 0 <= raw <= MAX_TTL_SECONDS:
        raise InvalidRequest(
            f"context.cache_ttl_seconds must be a number of seconds from 0 to {MAX_TTL_SECONDS}, not {raw!r}",
            field="cache_ttl_seconds",
        )
    return float(raw)
