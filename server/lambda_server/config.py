"""Settings read once from the environment at start and passed down."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

KIB = 1024
MIB = 1024 * KIB


class ConfigError(ValueError):
    """A setting has an invalid value; the message names the variable."""


@dataclass(frozen=True)
class DatabaseSettings:
    """How to reach PostgreSQL and how long any call to it may take."""

    url: str | None = None
    pool_size: int = 10
    connect_timeout: float = 5.0
    command_timeout: float = 5.0
    statement_timeout_ms: int = 5000
    lock_timeout_ms: int = 2000
    # Off for pgbouncer in transaction mode, which cannot keep prepared statements.
    statement_cache: bool = True
    # Whether an Execute's count waits for its WAL flush. Off: a crash of PostgreSQL
    # (not a clean stop) may forget the counts of its last few hundred milliseconds,
    # never a session; the flush is half of what a claim costs PostgreSQL.
    claim_synchronous_commit: bool = False
    embedded_dir: Path = Path(".data/postgres")
    # The embedded PostgreSQL, when its postmaster dies: restarts tried (0.5 s apart,
    # doubling to 10 s) before liveness turns NOT_SERVING, and the bound of each start.
    embedded_restart_attempts: int = 6
    embedded_start_timeout: float = 30.0
    # How long start-up waits for PostgreSQL's first answer (and the migrations) before
    # it gives up and exits; 0: serve at once, NOT_SERVING until the database answers.
    startup_timeout: float = 30.0


@dataclass(frozen=True)
class RuntimeSettings:
    """How scripts run: timeouts, output limits and environment caps."""

    timeout_seconds: float = 30.0
    max_timeout_seconds: float = 300.0
    max_script_size: int = 1 * MIB
    max_log_bytes: int = 64 * KIB
    max_result_bytes: int = 1 * MIB
    max_environments_per_key: int = 4
    # Bound environments (idle or busy) at most; the least recently used idle one
    # makes room for a new one. Pre-started processes come on top of these.
    max_environments: int = 16
    prewarm_per_runtime: int = 2
    idle_ttl_seconds: float = 300.0
    queue_timeout_seconds: float = 10.0
    max_queued: int = 10000
    # A runtime process's start, to its `ready` message: on a loaded machine a Node.js
    # start took over 10 s
    spawn_timeout_seconds: float = 30.0
    mappings_file: Path | None = None
    node_binary: str | None = None
    # Rust: the rustc to use (else the one on PATH), where programs and the built
    # serde_json are kept, and how long one compile may take
    rustc: str | None = None
    rust_cache_dir: Path = Path.home() / ".cache" / "lambda-microservice" / "rust"
    compile_timeout_seconds: float = 60.0
    # The one-time build of the crates scripts link against (serde_json), which starts
    # with the server; 4-8 s on 2 idle cores (bench/README)
    dependencies_timeout_seconds: float = 600.0
    # Fairness (docs: "Tenants and fairness"). An owner is the authenticated user, or the
    # caller's address with AUTH_MODE=none. Environments an owner may hold at once (bound
    # or binding); an owner at its share waits for its own, never evicts another's.
    max_environments_per_owner: int = 8
    # Executions one owner may have waiting for an environment (MAX_QUEUED_EXECUTIONS
    # bounds all owners'); past it, QUOTA_EXCEEDED.
    max_queued_per_owner: int = 5000
    # Script checkers per runtime (syntax checks at Initialize), checks one owner may run
    # at once, and how long one check may take (past it: the script's fault).
    checkers: int = 2
    checks_per_owner: int = 1
    check_timeout_seconds: float = 10.0
    # How long a check may wait for a checker (within the call's deadline); past it
    # RESOURCE_EXHAUSTED (QUOTA_EXCEEDED, with a RetryInfo).
    check_queue_timeout_seconds: float = 30.0
    # Rust compiles at once (all owners), per owner, and how long one may wait for a slot.
    compile_slots: int = 2
    compiles_per_owner: int = 1
    compile_queue_timeout_seconds: float = 30.0
    # A compiled program's size at most, and how long an artifact no live session uses is kept.
    max_program_bytes: int = 32 * MIB
    artifact_retention_seconds: float = 86400.0
    # Params and results: JSON nodes (values) and nesting depth at most. Past them,
    # params are INVALID_ARGUMENT and a result is INVALID_RESULT. 32 levels is about what
    # a protobuf client decodes (its limit of 100 message levels is 33 of JSON objects);
    # at most MAX_JSON_DEPTH_CEILING, which the conversions' recursion stays well within.
    max_json_nodes: int = 100_000
    max_json_depth: int = 32


@dataclass(frozen=True)
class SandboxSettings:
    """The sandbox's mode and the limits of each environment."""

    mode: str = "auto"  # strict | auto | off
    memory_mb: int = 256
    max_memory_mb: int = 2048
    max_processes: int = 32
    max_max_processes: int = 512
    scratch_mb: int = 64
    shm_mb: int = 16
    open_files: int = 256
    # A backstop over an environment's whole life: each execution is bounded by its timeout.
    cpu_seconds: int = 3600
    uid_base: int = 100000
    # CPU per environment (and compiler command), in cores: a cpu cgroup's CFS quota over a
    # 100 ms period; its weight is the same for all. 0: no cpu cgroup (CPU unlimited).
    cpu_cores: float = 1.0
    # CPU of all one owner's environments together, in cores (a cpu cgroup per owner that
    # its environments join when they are bound, with the same weight for every owner).
    # 0: one core less than the server may use, and at least one; so no owner's scripts
    # take every core from the server and the other owners.
    cpu_cores_per_owner: float = 0.0
    # What keeps a script from running between its executions: `freeze` (the idle
    # environment's freezer cgroup; `recycle` where there is no freezer), `recycle` (an
    # environment whose thread count grew past its start's is ended after the execution),
    # or `off`.
    idle: str = "freeze"
    # The syscall filter of every environment and compiler; off only to measure what it
    # costs (bench/layers.py): SANDBOX_MODE=strict refuses to start without it.
    seccomp: bool = True
    # Memory all environments' limits may add up to; 0: the host's (or container's)
    # memory less memory_reserve_mb, kept for the server itself.
    total_memory_mb: int = 0
    memory_reserve_mb: int = 1024
    # Where servers on one host claim their uid ranges (a lock file per range), and how
    # many uids a range holds.
    uid_dir: Path = Path("/run/lambda-microservice/uids")
    uid_range_size: int = 1000


@dataclass(frozen=True)
class AuthSettings:
    """Who may call: JWT bearer tokens, and how often (per user, token bucket)."""

    mode: str = "none"  # none | jwt
    jwt_secret: str | None = None  # HS256
    jwt_public_key: str | None = None  # RS256, PEM
    jwt_audience: str | None = None
    jwt_issuer: str | None = None
    # Executions a minute; 0 turns the limit off. Authenticated users (AUTH_MODE=jwt)
    # are limited unless a deployment says otherwise; anonymous callers (AUTH_MODE=none,
    # counted by their address) only when one does: whoever ran `make run` is not throttled.
    rate_limit_per_minute: int = 100
    anonymous_rate_limit_per_minute: int = 0
    # Initialize calls a minute, per user and per anonymous address; 0 turns it off.
    initialize_rate_limit_per_minute: int = 60
    anonymous_initialize_rate_limit_per_minute: int = 0
    # Active (unexpired) sessions and their script bytes an owner may hold.
    max_sessions_per_owner: int = 10_000
    max_script_bytes_per_owner: int = 256 * MIB


@dataclass(frozen=True)
class GrpcSettings:
    """The gRPC server's own limits and connection policy."""

    max_receive_message_bytes: int = 4 * MIB
    max_send_message_bytes: int = 4 * MIB
    # Calls handled at once; past it gRPC answers RESOURCE_EXHAUSTED. 0: no limit.
    max_concurrent_rpcs: int = 10000
    # Calls received but not yet taken by a handler; gRPC cancels those past it.
    max_pending_rpcs: int = 10000
    # Ping a connection idle this long, and drop it when no answer comes in the timeout:
    # half-open connections (a peer gone without a FIN) do not linger.
    keepalive_time_seconds: float = 60.0
    keepalive_timeout_seconds: float = 20.0
    # Clients may ping this often at most (more often: GOAWAY, too_many_pings).
    min_client_ping_interval_seconds: float = 10.0
    # Close connections idle this long, and any connection this old (after a grace for
    # its calls), so clients reconnect and spread over new replicas. 0: never.
    max_connection_idle_seconds: float = 0.0
    max_connection_age_seconds: float = 0.0
    max_connection_age_grace_seconds: float = 30.0
    # Request bytes held at once by calls received and not yet answered; past it new
    # calls get RESOURCE_EXHAUSTED.
    max_inflight_request_bytes: int = 128 * MIB
    # A peer address's share of those bytes (0: half of them), so that one flooding
    # peer leaves room for the others' calls.
    max_inflight_request_bytes_per_peer: int = 0
    # What a call whose message is still arriving counts for: gRPC holds the whole
    # message before we see its size, so each call is admitted (or refused, its stream
    # reset before it is read) at its start against this much.
    inflight_request_reservation_bytes: int = 1 * MIB


@dataclass(frozen=True)
class RequestLogSettings:
    """The batched writer of public.request_logs and public.error_logs."""

    enabled: bool = True
    queue_size: int = 10000
    batch_size: int = 500
    flush_interval_seconds: float = 0.2


@dataclass(frozen=True)
class Settings:
    """Everything the service is configured with."""

    listen_addr: str = "127.0.0.1:50051"
    session_expiry_seconds: int = 3600
    shutdown_grace_seconds: float = 10.0
    # On SIGTERM, health turns NOT_SERVING and calls are still taken for this long, so
    # load balancers see the change before the listener closes (Kubernetes: 5).
    shutdown_drain_seconds: float = 0.0
    health_interval_seconds: float = 1.0
    # The server's threads' nice value (-20..19; applied where the server may, as root):
    # below the scripts' 0, a call to answer preempts any tenant's script, while the
    # scripts' group keeps the default weight against the host's other processes.
    server_nice: int = -5
    log_level: str = "INFO"
    log_format: str = "text"  # text | json
    # host:port of the Prometheus /metrics endpoint; None turns it off.
    metrics_addr: str | None = "127.0.0.1:9090"
    result_cache_bytes: int = 64 * MIB
    # Expired sessions: marked and, after the retention, deleted by one replica at a time.
    cleanup_interval_seconds: float = 60.0
    session_retention_seconds: int = 7 * 24 * 3600
    database: DatabaseSettings = field(default_factory=DatabaseSettings)
    runtime: RuntimeSettings = field(default_factory=RuntimeSettings)
    sandbox: SandboxSettings = field(default_factory=SandboxSettings)
    auth: AuthSettings = field(default_factory=AuthSettings)
    request_log: RequestLogSettings = field(default_factory=RequestLogSettings)
    grpc: GrpcSettings = field(default_factory=GrpcSettings)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read the settings from `env` (the process environment by default)."""
        reader = _Reader(os.environ if env is None else env)
        database = DatabaseSettings(
            url=reader.get("DATABASE_URL", str, None) or None,
            pool_size=reader.get("DATABASE_POOL_SIZE", _positive_int, 10),
            connect_timeout=reader.get("DATABASE_CONNECT_TIMEOUT_SECONDS", _positive_float, 5.0),
            command_timeout=reader.get("DATABASE_COMMAND_TIMEOUT_SECONDS", _positive_float, 5.0),
            statement_timeout_ms=reader.get("DATABASE_STATEMENT_TIMEOUT_MS", _positive_int, 5000),
            lock_timeout_ms=reader.get("DATABASE_LOCK_TIMEOUT_MS", _positive_int, 2000),
            statement_cache=reader.get("DATABASE_STATEMENT_CACHE", _on_off, True),
            claim_synchronous_commit=reader.get("DATABASE_CLAIM_SYNCHRONOUS_COMMIT", _on_off, False),
            embedded_dir=reader.get("EMBEDDED_DATA_DIR", Path, Path(".data/postgres")),
            embedded_restart_attempts=reader.get("EMBEDDED_RESTART_ATTEMPTS", _positive_int, 6),
            embedded_start_timeout=reader.get("EMBEDDED_START_TIMEOUT_SECONDS", _positive_float, 30.0),
            startup_timeout=reader.get("DATABASE_STARTUP_TIMEOUT_SECONDS", _non_negative_float, 30.0),
        )
        runtime = RuntimeSettings(
            timeout_seconds=reader.get("RUNTIME_TIMEOUT_SECONDS", _positive_float, 30.0),
            max_timeout_seconds=reader.get("RUNTIME_MAX_TIMEOUT_SECONDS", _positive_float, 300.0),
            max_script_size=reader.get("MAX_SCRIPT_SIZE", _positive_int, 1 * MIB),
            max_log_bytes=reader.get("MAX_LOG_BYTES", _positive_int, 64 * KIB),
            max_result_bytes=reader.get("MAX_RESULT_BYTES", _positive_int, 1 * MIB),
            max_environments_per_key=reader.get("MAX_ENVIRONMENTS_PER_KEY", _positive_int, 4),
            max_environments=reader.get("MAX_ENVIRONMENTS", _positive_int, 16),
            prewarm_per_runtime=reader.get("PREWARM_ENVIRONMENTS", _non_negative_int, 2),
            idle_ttl_seconds=reader.get("ENVIRONMENT_IDLE_TTL_SECONDS", _positive_float, 300.0),
            queue_timeout_seconds=reader.get("RUNTIME_QUEUE_TIMEOUT_SECONDS", _positive_float, 10.0),
            max_queued=reader.get("MAX_QUEUED_EXECUTIONS", _positive_int, 10000),
            spawn_timeout_seconds=reader.get("RUNTIME_START_TIMEOUT_SECONDS", _positive_float, 30.0),
            mappings_file=reader.get("RUNTIME_MAPPINGS", Path, None),
            node_binary=reader.get("NODE_BINARY", str, None) or None,
            rustc=reader.get("RUSTC", str, None) or None,
            rust_cache_dir=reader.get(
                "RUST_CACHE_DIR", Path, Path.home() / ".cache" / "lambda-microservice" / "rust"
            ),
            compile_timeout_seconds=reader.get("RUST_COMPILE_TIMEOUT_SECONDS", _positive_float, 60.0),
            dependencies_timeout_seconds=reader.get(
                "RUST_DEPENDENCIES_TIMEOUT_SECONDS", _positive_float, 600.0
            ),
            max_environments_per_owner=reader.get(
                "MAX_ENVIRONMENTS_PER_OWNER",
                _positive_int,
                max(1, reader.get("MAX_ENVIRONMENTS", _positive_int, 16) // 2),
            ),
            max_queued_per_owner=reader.get(
                "MAX_QUEUED_EXECUTIONS_PER_OWNER",
                _positive_int,
                max(1, reader.get("MAX_QUEUED_EXECUTIONS", _positive_int, 10000) // 2),
            ),
            checkers=reader.get("SCRIPT_CHECKERS", _positive_int, 2),
            checks_per_owner=reader.get("SCRIPT_CHECKS_PER_OWNER", _positive_int, 1),
            check_timeout_seconds=reader.get("SCRIPT_CHECK_TIMEOUT_SECONDS", _positive_float, 10.0),
            check_queue_timeout_seconds=reader.get(
                "SCRIPT_CHECK_QUEUE_TIMEOUT_SECONDS", _positive_float, 30.0
            ),
            compile_slots=reader.get("RUST_COMPILE_SLOTS", _positive_int, 2),
            compiles_per_owner=reader.get("RUST_COMPILES_PER_OWNER", _positive_int, 1),
            compile_queue_timeout_seconds=reader.get(
                "RUST_COMPILE_QUEUE_TIMEOUT_SECONDS", _positive_float, 30.0
            ),
            max_program_bytes=reader.get("RUST_MAX_PROGRAM_BYTES", _positive_int, 32 * MIB),
            artifact_retention_seconds=reader.get(
                "RUST_ARTIFACT_RETENTION_SECONDS", _non_negative_float, 86400.0
            ),
            max_json_nodes=reader.get("MAX_JSON_NODES", _positive_int, 100_000),
            max_json_depth=reader.get("MAX_JSON_DEPTH", _json_depth, 32),
        )
        sandbox = SandboxSettings(
            mode=reader.get("SANDBOX_MODE", _sandbox_mode, "auto"),
            memory_mb=reader.get("SANDBOX_MEMORY_MB", _positive_int, 256),
            max_memory_mb=reader.get("SANDBOX_MAX_MEMORY_MB", _positive_int, 2048),
            max_processes=reader.get("SANDBOX_MAX_PROCESSES", _positive_int, 32),
            max_max_processes=reader.get("SANDBOX_PROCESS_CEILING", _positive_int, 512),
            scratch_mb=reader.get("SANDBOX_SCRATCH_MB", _positive_int, 64),
            open_files=reader.get("SANDBOX_OPEN_FILES", _positive_int, 256),
            cpu_seconds=reader.get("SANDBOX_CPU_SECONDS", _positive_int, 3600),
            cpu_cores=reader.get("SANDBOX_CPU_CORES", _non_negative_float, 1.0),
            cpu_cores_per_owner=reader.get("SANDBOX_CPU_CORES_PER_OWNER", _non_negative_float, 0.0),
            idle=reader.get("SANDBOX_IDLE", _choice("freeze", "recycle", "off"), "freeze"),
            seccomp=reader.get("SANDBOX_SECCOMP", _on_off, True),
            total_memory_mb=reader.get("SANDBOX_TOTAL_MEMORY_MB", _non_negative_int, 0),
            memory_reserve_mb=reader.get("SERVER_MEMORY_RESERVE_MB", _non_negative_int, 1024),
            uid_dir=reader.get("SANDBOX_UID_DIR", Path, Path("/run/lambda-microservice/uids")),
            uid_range_size=reader.get("SANDBOX_UID_RANGE_SIZE", _positive_int, 1000),
        )
        if sandbox.memory_mb > sandbox.max_memory_mb:
            raise ConfigError("SANDBOX_MEMORY_MB is over SANDBOX_MAX_MEMORY_MB")
        if sandbox.max_processes > sandbox.max_max_processes:
            raise ConfigError("SANDBOX_MAX_PROCESSES is over SANDBOX_PROCESS_CEILING")
        auth = AuthSettings(
            mode=reader.get("AUTH_MODE", _choice("none", "jwt"), "none"),
            jwt_secret=reader.get("JWT_SECRET", str, None),
            jwt_public_key=reader.get("JWT_PUBLIC_KEY", str, None)
            or reader.get("JWT_PUBLIC_KEY_FILE", _file_text, None),
            jwt_audience=reader.get("JWT_AUDIENCE", str, None),
            jwt_issuer=reader.get("JWT_ISSUER", str, None),
            rate_limit_per_minute=reader.get("RATE_LIMIT_PER_MINUTE", _non_negative_int, 100),
            anonymous_rate_limit_per_minute=reader.get(
                "RATE_LIMIT_ANONYMOUS_PER_MINUTE", _non_negative_int, 0
            ),
            initialize_rate_limit_per_minute=reader.get(
                "RATE_LIMIT_INITIALIZE_PER_MINUTE", _non_negative_int, 60
            ),
            anonymous_initialize_rate_limit_per_minute=reader.get(
                "RATE_LIMIT_ANONYMOUS_INITIALIZE_PER_MINUTE", _non_negative_int, 0
            ),
            max_sessions_per_owner=reader.get("MAX_SESSIONS_PER_OWNER", _positive_int, 10_000),
            max_script_bytes_per_owner=reader.get("MAX_SCRIPT_BYTES_PER_OWNER", _positive_int, 256 * MIB),
        )
        if auth.mode == "jwt" and not (auth.jwt_secret or auth.jwt_public_key):
            raise ConfigError("AUTH_MODE=jwt needs JWT_SECRET (HS256) or JWT_PUBLIC_KEY[_FILE] (RS256)")
        request_log = RequestLogSettings(
            enabled=reader.get("REQUEST_LOGS", _on_off, True),
            queue_size=reader.get("REQUEST_LOG_QUEUE_SIZE", _positive_int, 10000),
            batch_size=reader.get("REQUEST_LOG_BATCH_SIZE", _positive_int, 500),
            flush_interval_seconds=reader.get("REQUEST_LOG_FLUSH_INTERVAL_SECONDS", _positive_float, 0.2),
        )
        grpc = GrpcSettings(
            max_receive_message_bytes=reader.get("GRPC_MAX_RECEIVE_MESSAGE_BYTES", _positive_int, 4 * MIB),
            max_send_message_bytes=reader.get("GRPC_MAX_SEND_MESSAGE_BYTES", _positive_int, 4 * MIB),
            max_concurrent_rpcs=reader.get("GRPC_MAX_CONCURRENT_RPCS", _non_negative_int, 10000),
            max_pending_rpcs=reader.get("GRPC_MAX_PENDING_RPCS", _positive_int, 10000),
            keepalive_time_seconds=reader.get("GRPC_KEEPALIVE_TIME_SECONDS", _positive_float, 60.0),
            keepalive_timeout_seconds=reader.get("GRPC_KEEPALIVE_TIMEOUT_SECONDS", _positive_float, 20.0),
            min_client_ping_interval_seconds=reader.get(
                "GRPC_MIN_CLIENT_PING_INTERVAL_SECONDS", _non_negative_float, 10.0
            ),
            max_connection_idle_seconds=reader.get(
                "GRPC_MAX_CONNECTION_IDLE_SECONDS", _non_negative_float, 0.0
            ),
            max_connection_age_seconds=reader.get(
                "GRPC_MAX_CONNECTION_AGE_SECONDS", _non_negative_float, 0.0
            ),
            max_connection_age_grace_seconds=reader.get(
                "GRPC_MAX_CONNECTION_AGE_GRACE_SECONDS", _non_negative_float, 30.0
            ),
            max_inflight_request_bytes=reader.get("MAX_INFLIGHT_REQUEST_BYTES", _positive_int, 128 * MIB),
            max_inflight_request_bytes_per_peer=reader.get(
                "MAX_INFLIGHT_REQUEST_BYTES_PER_PEER", _non_negative_int, 0
            ),
            inflight_request_reservation_bytes=reader.get(
                "INFLIGHT_REQUEST_RESERVATION_BYTES", _positive_int, 1 * MIB
            ),
        )
        metrics = reader.get("METRICS_ADDR", str, "127.0.0.1:9090")
        return cls(
            listen_addr=reader.get("LISTEN_ADDR", _address, "127.0.0.1:50051"),
            log_format=reader.get("LOG_FORMAT", _choice("text", "json"), "text"),
            metrics_addr=None if metrics.lower() == "off" else _checked(_address, "METRICS_ADDR", metrics),
            result_cache_bytes=reader.get("RESULT_CACHE_BYTES", _non_negative_int, 64 * MIB),
            cleanup_interval_seconds=reader.get("CLEANUP_INTERVAL_SECONDS", _positive_float, 60.0),
            session_retention_seconds=reader.get(
                "SESSION_RETENTION_SECONDS", _non_negative_int, 7 * 24 * 3600
            ),
            auth=auth,
            request_log=request_log,
            grpc=grpc,
            session_expiry_seconds=reader.get("SESSION_EXPIRY_SECONDS", _positive_int, 3600),
            shutdown_grace_seconds=reader.get("SHUTDOWN_GRACE_SECONDS", _non_negative_float, 10.0),
            shutdown_drain_seconds=reader.get("SHUTDOWN_DRAIN_SECONDS", _non_negative_float, 0.0),
            health_interval_seconds=reader.get("HEALTH_INTERVAL_SECONDS", _positive_float, 1.0),
            server_nice=reader.get("SERVER_NICE", _nice, -5),
            log_level=reader.get("LOG_LEVEL", _log_level, "INFO"),
            database=database,
            runtime=runtime,
            sandbox=sandbox,
        )


class _Reader:
    def __init__(self, env: Mapping[str, str]) -> None:
        self._env = env

    def get(self, name: str, parse: Callable[[str], T], default: T) -> T:
        raw = self._env.get(name)
        if raw is None or raw.strip() == "":
            return default
        try:
            return parse(raw.strip())
        except ValueError as exc:
            raise ConfigError(f"{name}={raw!r} is invalid: {exc}") from None


def _positive_int(raw: str) -> int:
    value = int(raw)
    if value <= 0:
        raise ValueError("must be a positive integer")
    return value


MAX_JSON_DEPTH_CEILING = 200


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


def _checked(parse: Callable[[str], T], name: str, raw: str) -> T:
    try:
        return parse(raw)
    except ValueError as exc:
        raise ConfigError(f"{name}={raw!r} is invalid: {exc}") from None


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
