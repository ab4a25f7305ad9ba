"""The Rust toolchain: found on this machine, it compiles scripts into programs, sandboxed.

A script is compiled with rustc alone (no cargo, so no build scripts and no
procedural macros of the script's own) into rust_worker.rs, which serves its
`handler`, or the original service's `handle` (`--cfg lambda_handle`, see
`entry_point`), over the workers' pipe protocol. The crates a script may use
(rust_crates.CURATED: serde with derive, serde_json, regex, chrono, ...) come from
Debian's packaged sources and are built once per toolchain and registry by
cargo, offline, into a shared folder that every later compile links against,
each named with --extern. Both builds run inside the sandbox, with time and
memory limits, writing only to a work folder of their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from lambda_server.config import MIB, RuntimeSettings
from lambda_server.domain import Limits, OptimizationLevel
from lambda_server.errors import (
    LambdaError,
    QuotaExceeded,
    ScriptLimitExceeded,
    ScriptSyntaxError,
    Unavailable,
    copy_of,
)
from lambda_server.runtimes import rust_crates
from lambda_server.runtimes.process import WorkerTimeout, run_command
from lambda_server.runtimes.registry import RuntimeSpec
from lambda_server.runtimes.rust_crates import CrateSet
from lambda_server.runtimes.slots import FairSlots, SlotWaitTimeout
from lambda_server.sandbox import Command, Sandbox, SandboxUnavailable
from lambda_server.tasks import cancel_and_wait

log = logging.getLogger(__name__)

_HERE = Path(__file__).resolve().parent
WORKER = _HERE / "rust_worker.rs"
# read once, at import: part of every program's artifact key (RustToolchain.program_identity)
WORKER_DIGEST = hashlib.sha256(WORKER.read_bytes()).hexdigest()
DEBIAN_REGISTRY = Path("/usr/share/cargo/registry")
OPT_LEVELS = {OptimizationLevel.DEBUG: "0", OptimizationLevel.RELEASE: "3"}  # rustc -Copt-level
# rustc runs a few threads, and the linker (cc, collect2, ld) beside them
COMPILE_LIMITS = Limits(memory_mb=1536, max_processes=64)
# The dependencies' build writes its libraries (a few MiB each)
DEPENDENCIES_MAX_FILE_MB = 256
# rustc's deny-by-default lint that ends a runaway const evaluation: it stays on
# (`-A warnings` silences warnings only, and it is forbidden to allow it), and a
# script that names it is refused before it is compiled: an `#[allow]` of it
# under `-F` is an error, but rustc goes on evaluating the constant regardless.
CONST_EVAL_LINT = "long_running_const_eval"
SIGXFSZ_EXIT = 128 + signal.SIGXFSZ  # unshare's report of a write past RLIMIT_FSIZE
# strsignal(SIGXFSZ), or strerror(EFBIG) where SIGXFSZ is ignored (the jail is Python,
# which ignores it, and exec keeps that): how rustc reports its linker's cut write
FSIZE_TEXTS = (b"File size limit exceeded", b"File too large")
# the original service's entry point, `pub fn handle(event: &str) -> Result<String, String>`,
# used when the script defines it and no `handler` (comments aside)
_ENTRY = re.compile(r"\bfn\s+(handler|handle)\s*[<(]")
# where a comment or a literal may start: a raw string (r"…", r#"…"#, br"…", cr"…", not
# inside an identifier such as `for"`) before a plain string or a char literal's quote
_TOKEN = re.compile(r"""//|/\*|(?<![A-Za-z0-9_])[bc]?r#*"|["']""")
ENTRY_POINTS = (
    "a Rust script defines `pub fn handler(event: serde_json::Value) -> Result<serde_json::Value, "
    "String>`, or `pub fn handle(event: &str) -> Result<String, String>`"
)


@dataclass(frozen=True)
class RustToolchain:
    """rustc and cargo of one sysroot, and the crate sources scripts may use."""

    rustc: str = ""
    cargo: str = ""
    sysroot: str = ""
    version: str = ""  # `rustc --version`, part of every artifact's key
    registry: str = ""
    missing: str = ""

    @classmethod
    async def detect(cls, rustc: str | None, registry: Path = DEBIAN_REGISTRY) -> RustToolchain:
        """The toolchain of `rustc` (else the one on PATH), or why there is none."""
        rustc = shutil.which(rustc or "rustc")
        if rustc is None:
            return cls(missing="rustc is not installed (RUSTC, or on PATH)")
        try:
            # the server's own environment: a rustup proxy finds its toolchain through it
            env = dict(os.environ)
            (code, out, _), (code2, version, _) = await asyncio.gather(
                run_command([rustc, "--print", "sysroot"], env, "/", 10.0),
                run_command([rustc, "--version"], env, "/", 10.0),
            )
            sysroot = out.decode().strip()
        except (OSError, WorkerTimeout) as exc:
            return cls(missing=f"rustc did not answer: {exc}")
        if code or code2 or not sysroot:
            return cls(missing="rustc --print sysroot failed")
        real_rustc, cargo = Path(sysroot, "bin", "rustc"), Path(sysroot, "bin", "cargo")
        missing = await asyncio.to_thread(_missing_files, cargo, registry)
        if missing:
            return cls(missing=missing)
        return cls(str(real_rustc), str(cargo), sysroot, version.decode().strip(), str(registry))

    @property
    def spec(self) -> RuntimeSpec:
        if self.missing:
            return RuntimeSpec("rust", missing=self.missing)
        return RuntimeSpec("rust", self.rustc, WORKER, (), version=self.version)

    @property
    def identity(self) -> str:
        """A short stable name of this toolchain, part of the built crates' folder's name."""
        return hashlib.sha256(self.version.encode()).hexdigest()[:16]

    @property
    def program_identity(self) -> str:
        """A short stable name of what a program is made of besides its script: this
        toolchain and the worker it is compiled into. A program compiled with another
        worker speaks another protocol (an older server's replica, or a newer one's, may
        share meta.artifacts and RUST_CACHE_DIR), so it is another artifact."""
        return hashlib.sha256(f"{self.version}\n{WORKER_DIGEST}".encode()).hexdigest()[:16]


class RustCompiler:
    """Compiles scripts into programs; builds the shared dependencies once.

    The dependencies' build is the compiler's own task, started with the server
    (`start`): a compile that comes before it is done waits for it, and no
    compile's end (nor a caller's, see usecases/builds.py) ends it. Its bound is
    RUST_DEPENDENCIES_TIMEOUT_SECONDS; a failed build is tried again by the next
    compile. A compile is bounded by the service's settings only (a slot within
    RUST_COMPILE_QUEUE_TIMEOUT_SECONDS, rustc within RUST_COMPILE_TIMEOUT_SECONDS),
    never by a caller's deadline: callers wait for it under their own (usecases/builds.py).
    """

    def __init__(self, toolchain: RustToolchain, sandbox: Sandbox, settings: RuntimeSettings) -> None:
        self._toolchain = toolchain
        self._sandbox = sandbox
        self._settings = settings
        self._cache = settings.rust_cache_dir
        self._timeout = settings.compile_timeout_seconds
        self._dependencies_timeout = settings.dependencies_timeout_seconds
        # RUST_COMPILE_SLOTS at once, RUST_COMPILES_PER_OWNER of them an owner's, waiting
        # compiles served round robin by owner
        self._slots = FairSlots(settings.compile_slots, settings.compiles_per_owner)
        self._dependencies_task: asyncio.Task[CrateSet] | None = None
        self._built: CrateSet | None = None

    @property
    def toolchain(self) -> RustToolchain:
        return self._toolchain

    def start(self) -> None:
        """Build the dependencies in the background (at once, when a past build left them)."""
        task = self._dependencies_task
        if task is None or (task.done() and self._built is None):  # never started, or failed
            self._dependencies_task = asyncio.create_task(self._prepare_dependencies())
            self._dependencies_task.add_done_callback(self._dependencies_done)

    async def close(self) -> None:
        """Stop a build still running (its sandboxed cargo is killed)."""
        task, self._dependencies_task = self._dependencies_task, None
        if task is not None and not task.done():
            await cancel_and_wait(task)

    @property
    def dependencies_state(self) -> str:
        """`ready` (with the crates left out, if any), `building`, `not started`, or
        `failed: <why>` (tried again by the next compile)."""
        task = self._dependencies_task
        if self._built is not None:
            left_out = self._built.describe_left_out()
            return f"ready ({left_out})" if left_out else "ready"
        if task is None:
            return "not started"
        if task.done() and not task.cancelled() and task.exception() is not None:
            return f"failed: {_describe(task.exception())}"
        return "building"

    @property
    def packages(self) -> tuple[str, ...]:
        """`name version` of each crate a script may use, once they are built."""
        return self._built.packages if self._built is not None else ()

    async def compile(self, script: str, level: OptimizationLevel, owner: str = "") -> bytes:
        """The program of a script; ScriptSyntaxError with rustc's message, line and column,
        ScriptLimitExceeded past a compile's time, memory or program size, QuotaExceeded when
        no compile slot came for `owner` within RUST_COMPILE_QUEUE_TIMEOUT_SECONDS,
        Unavailable when the crates could not be built."""
        _refuse_lint_change(script)
        crates = self._built or await self._dependencies()
        wait = self._settings.compile_queue_timeout_seconds
        try:
            async with self._slots.slot(owner, wait):
                return await self._compile(script, level, crates)
        except SlotWaitTimeout as exc:
            if exc.own_share:
                why = f"this caller's {self._slots.per_owner} compiles at once (RUST_COMPILES_PER_OWNER)"
            else:
                why = f"every compile slot (RUST_COMPILE_SLOTS: {self._slots.total})"
            raise QuotaExceeded(
                f"{why} stayed busy for {wait:g} s (RUST_COMPILE_QUEUE_TIMEOUT_SECONDS)",
                retry_after=min(self._timeout, self._settings.compile_queue_timeout_seconds),
                limit="RUST_COMPILES_PER_OWNER" if exc.own_share else "RUST_COMPILE_SLOTS",
            ) from None

    async def _compile(self, script: str, level: OptimizationLevel, crates: CrateSet) -> bytes:
        work = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix="compile-", dir=self._cache))
        try:
            await asyncio.to_thread(_stage, work, script)
            argv = [
                self._toolchain.rustc,
                "--edition=2021",
                "--crate-type=bin",
                "--crate-name=handler",
                "--error-format=json",
                "-Awarnings",  # warnings only: deny-by-default lints stay errors
                f"-F{CONST_EVAL_LINT}",
                f"-Copt-level={OPT_LEVELS[level]}",
                "-Cstrip=debuginfo",
                f"-Ldependency={crates.folder}",
                *crates.extern_arguments(),
                *(["--cfg=lambda_handle"] if entry_point(script) == "handle" else []),
                # messages (and panics) name `src/script.rs`, not the server's compile folder
                f"--remap-path-prefix={work}/=",
                "-o",
                str(work / "handler"),
                str(work / "src" / "main.rs"),  # the jail starts in /tmp
            ]
            timeout = self._timeout
            limit = self._settings.max_program_bytes
            # a little over the program limit: a program just past it is measured
            # below, one far past it is cut by the kernel (SIGXFSZ) as it is written
            fsize_mb = -(-limit // MIB) + 1
            try:
                code, _, err, out_of_memory = await self._run(
                    argv, work, [str(crates.folder)], timeout, fsize_mb
                )
            except WorkerTimeout:
                raise ScriptLimitExceeded(
                    f"compilation ran past its limit of {timeout:g} s (RUST_COMPILE_TIMEOUT_SECONDS)",
                    limit="RUST_COMPILE_TIMEOUT_SECONDS",
                ) from None
            if out_of_memory:
                raise ScriptLimitExceeded(
                    f"compilation went past its memory limit of {COMPILE_LIMITS.memory_mb} MiB",
                    limit="compile memory",
                )
            # a write past RLIMIT_FSIZE: rustc's (killed), or the linker's (rustc says so)
            cut = code in (SIGXFSZ_EXIT, -signal.SIGXFSZ) or any(text in err for text in FSIZE_TEXTS)
            if code != 0 and (cut or await asyncio.to_thread(_largest_file, work) >= fsize_mb * MIB):
                raise _too_large(limit)
            if code != 0:
                raise _compile_error(err)
            size = await asyncio.to_thread(lambda: (work / "handler").stat().st_size)
            if size > limit:
                raise _too_large(limit, size)
            return await asyncio.to_thread((work / "handler").read_bytes)
        finally:
            await asyncio.to_thread(shutil.rmtree, work, True)

    async def _dependencies(self) -> CrateSet:
        """The crates built for this toolchain, once the build (bounded by
        RUST_DEPENDENCIES_TIMEOUT_SECONDS) ends."""
        self.start()
        task = self._dependencies_task
        assert task is not None
        await asyncio.wait((task,))  # the build is the compiler's: a waiter's end does not end it
        if task.cancelled():
            raise Unavailable("the server stopped while the crates were being built")
        error = task.exception()
        if isinstance(error, LambdaError):
            raise copy_of(error)  # each compile raises its own instance
        if error is not None:
            raise Unavailable(f"the crates did not build: {error!r}")
        return task.result()

    async def _prepare_dependencies(self) -> CrateSet:
        registry = Path(self._toolchain.registry)
        identity = await asyncio.to_thread(rust_crates.set_identity, self._toolchain.version, registry)
        # the toolchain's, and the set's and registry's: another crate installed is another build
        folder = self._cache / f"deps-{self._toolchain.identity}-{identity}"
        await self._build_dependencies(folder)
        try:
            self._built = await asyncio.to_thread(rust_crates.load, folder)
        except ValueError as exc:
            raise Unavailable(f"the built crates are not usable: {exc}") from None
        return self._built

    def _dependencies_done(self, task: asyncio.Task[CrateSet]) -> None:
        if task.cancelled():
            return
        error = task.exception()  # retrieved here, so a build no caller waited for is still seen
        if error is not None:
            log.warning("Rust crates: %s", _describe(error))
        elif task.result().left_out:
            log.warning("Rust crates: %s", task.result().describe_left_out())

    async def _build_dependencies(self, folder: Path) -> None:
        """Build them unless they are built; one build at a time per cache folder, across
        servers and processes (a file lock), the others waiting for its end."""
        limit = self._dependencies_timeout
        until = time.monotonic() + limit
        lock_path = str(self._cache / f".{folder.name}.lock")
        lock = await asyncio.to_thread(os.open, lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            while not await asyncio.to_thread((folder / "ready").exists):
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:  # another server builds them: wait for its end
                    if time.monotonic() > until:
                        raise Unavailable(
                            f"the crates were being built elsewhere for over {limit:g} s "
                            f"(RUST_DEPENDENCIES_TIMEOUT_SECONDS; {lock_path})"
                        ) from None
                    await asyncio.sleep(0.5)
                    continue
                try:
                    if not await asyncio.to_thread((folder / "ready").exists):
                        await self._build_into(folder, until)
                finally:
                    fcntl.flock(lock, fcntl.LOCK_UN)
        finally:
            os.close(lock)

    async def _build_into(self, folder: Path, until: float) -> None:
        log.info(
            "building the crates scripts may use for %s in the background (once per toolchain; "
            "about a minute on 2 idle cores)",
            self._toolchain.version,
        )
        started = time.monotonic()
        registry = self._toolchain.registry
        work = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix="deps-", dir=self._cache))
        try:
            crates, left_out = await asyncio.to_thread(rust_crates.present, Path(registry))
            crates = await self._resolvable(work, crates, left_out, until)
            if rust_crates.REQUIRED not in {crate.name for crate in crates}:
                why = dict(left_out).get(rust_crates.REQUIRED, "it did not resolve")
                raise Unavailable(f"{rust_crates.REQUIRED} cannot be built: {why}")
            await asyncio.to_thread(rust_crates.write_project, work, registry, crates)
            code, out, err = await self._cargo(work, ["build", "--release", "--message-format=json"], until)
            if code != 0:
                raise Unavailable(f"the crates did not build: {err.decode(errors='replace')[-2000:]}")
            built = rust_crates.built_from_messages(out, crates)
            left_out += [(c.name, "cargo built no library of it") for c in crates if c.name not in built]
            staged = self._cache / f".{folder.name}-{os.getpid()}"
            await asyncio.to_thread(shutil.rmtree, staged, True)
            deps = work / "target" / "release" / "deps"
            await asyncio.to_thread(shutil.copytree, deps, staged, ignore=shutil.ignore_patterns("*.d"))
            await asyncio.to_thread(rust_crates.save, staged, built, left_out)
            (staged / "ready").write_text(self._toolchain.version)
            await asyncio.to_thread(shutil.rmtree, folder, True)  # a build cut short, if any
            staged.rename(folder)
            log.info("built %d crates in %.1f s", len(built), time.monotonic() - started)
        finally:
            await asyncio.to_thread(shutil.rmtree, work, True)

    async def _resolvable(
        self, work: Path, crates: list[rust_crates.Crate], left_out: list[tuple[str, str]], until: float
    ) -> list[rust_crates.Crate]:
        """The crates that cargo resolves offline against the registry (a dependency of one
        may be missing): all of them at once, else each alone, the others left out (`left_out`
        gets each with cargo's words)."""
        registry = self._toolchain.registry
        await asyncio.to_thread(rust_crates.write_project, work, registry, crates)
        code, _, err = await self._cargo(work, ["generate-lockfile"], until)
        if code == 0:
            return crates
        log.warning(
            "Rust crates: the set does not resolve (%s); trying each alone", rust_crates.first_error(err)
        )
        kept = []
        for crate in crates:
            await asyncio.to_thread(rust_crates.write_project, work, registry, [crate])
            code, _, err = await self._cargo(work, ["generate-lockfile"], until)
            if code == 0:
                kept.append(crate)
            else:
                left_out.append((crate.name, rust_crates.first_error(err)))
        return kept

    async def _cargo(self, work: Path, arguments: list[str], until: float) -> tuple[int, bytes, bytes]:
        """cargo, offline and quiet, on the dependencies project in `work`, in the sandbox,
        within what is left of RUST_DEPENDENCIES_TIMEOUT_SECONDS: status, stdout, stderr."""
        manifest = str(work / "Cargo.toml")
        argv = [self._toolchain.cargo, *arguments, "--offline", "--quiet", "--manifest-path", manifest]
        limit = self._dependencies_timeout
        left = until - time.monotonic()
        try:
            if left <= 0:
                raise WorkerTimeout()
            binds = [self._toolchain.registry]
            code, out, err, _ = await self._run(argv, work, binds, left, DEPENDENCIES_MAX_FILE_MB)
        except WorkerTimeout:  # not the script's fault: the service cannot compile yet
            raise Unavailable(
                f"the crates did not build within {limit:g} s (RUST_DEPENDENCIES_TIMEOUT_SECONDS)"
            ) from None
        return code, out, err

    async def _run(
        self, argv: list[str], work: Path, binds: list[str], timeout: float, fsize_mb: int
    ) -> tuple[int, bytes, bytes, bool]:
        """Run a build command in the sandbox, writing files of `fsize_mb` at most: its exit
        status, its stdout and stderr, and whether it went past its memory limit;
        WorkerTimeout past `timeout`."""
        try:
            # a one-shot command: the toolchain and `binds` read-only, its work folder writable
            command = Command(
                tuple(argv),
                COMPILE_LIMITS,
                binds=(self._toolchain.sysroot, *binds),
                writable=(str(work),),
                file_size_mb=fsize_mb,
            )
            confinement = await self._sandbox.confine(command)
        except SandboxUnavailable as exc:
            raise SandboxUnavailable(f"the Rust compiler could not be confined: {exc.message}") from None
        try:
            env = {**_env(str(work)), "RUSTC": self._toolchain.rustc}
            code, out, err = await run_command(confinement.argv, env, str(work), timeout)
            return code, out, err, confinement.memory_exhausted()
        finally:
            await confinement.release()


def entry_point(script: str) -> str:
    """The function the worker calls: `handler`, or `handle` (the original service's
    `pub fn handle(event: &str) -> Result<String, String>`) when the script defines it and
    no `handler`. Read from the text, comments aside: rustc says so when it is wrong."""
    names = {match.group(1) for match in _ENTRY.finditer(code_only(script))}
    return "handle" if names == {"handle"} else "handler"


def code_only(script: str) -> str:
    """`script` with its comments (nested block comments too), string literals (raw ones
    too) and character literals blanked: a `fn handler(` inside one is not code. A lexer
    of those tokens, not of Rust; a lifetime (`'a`) is kept. Linear: runs of plain code
    are copied whole."""
    out: list[str] = []
    at, end = 0, len(script)
    while (token := _TOKEN.search(script, at)) is not None:
        out.append(script[at : token.start()])
        at, text = token.start(), token.group()
        if text == "//":
            stop = script.find("\n", at)
            at = end if stop < 0 else stop
        elif text == "/*":
            at = _block_comment_end(script, at)
        elif text.endswith('"') and text != '"':  # a raw string: r"…", r#"…"#, br"…"
            hashes = text.count("#")
            stop = script.find('"' + "#" * hashes, token.end())
            at = end if stop < 0 else stop + 1 + hashes
        elif text == '"':
            at = _quoted_end(script, at + 1, '"')
        elif at + 2 < end and (script[at + 1] == "\\" or script[at + 2] == "'"):
            at = _quoted_end(script, at + 1, "'")  # a char literal: 'x', '\'', '\u{1F600}'
        else:  # a lifetime's quote
            out.append(text)
            at += 1
            continue
        out.append(" ")
    out.append(script[at:])
    return "".join(out)


def _block_comment_end(script: str, at: int) -> int:
    depth, at = 1, at + 2
    while depth and at < len(script):
        pair = script[at : at + 2]
        if pair == "/*":
            depth, at = depth + 1, at + 2
        elif pair == "*/":
            depth, at = depth - 1, at + 2
        else:
            at += 1
    return at


def _quoted_end(script: str, at: int, quote: str) -> int:
    """Past the closing `quote` of a literal whose text starts at `at` (escapes skipped)."""
    while at < len(script):
        if script[at] == "\\":
            at += 2
        elif script[at] == quote:
            return at + 1
        else:
            at += 1
    return at


def _refuse_lint_change(script: str) -> None:
    """A script may not name the lint that ends runaway const evaluation (to allow it)."""
    at = script.find(CONST_EVAL_LINT)
    if at >= 0:
        line = script.count("\n", 0, at) + 1
        column = at - (script.rfind("\n", 0, at) + 1) + 1
        raise ScriptSyntaxError(
            f"a script may not change the level of the lint {CONST_EVAL_LINT}: it ends a "
            "constant evaluation that does not end",
            line,
            column,
        )


def _too_large(limit: int, size: int | None = None) -> ScriptLimitExceeded:
    what = f"the program is {size} bytes" if size is not None else "the program grew"
    return ScriptLimitExceeded(
        f"{what}, over its limit of {limit} bytes (RUST_MAX_PROGRAM_BYTES)",
        limit="RUST_MAX_PROGRAM_BYTES",
    )


def _largest_file(folder: Path) -> int:
    """The size of the largest file under `folder`: one the kernel cut at RLIMIT_FSIZE is
    exactly at the limit."""
    sizes = [0]
    for root, _, files in os.walk(folder):
        for name in files:
            with contextlib.suppress(OSError):
                sizes.append(os.lstat(os.path.join(root, name)).st_size)
    return max(sizes)


def _describe(error: BaseException | None) -> str:
    return error.message if isinstance(error, Unavailable) else repr(error)


def _stage(work: Path, script: str) -> None:
    """The crate to compile: the worker as main.rs, the script as its module script.rs."""
    (work / "src").mkdir()
    (work / "src" / "main.rs").write_bytes(WORKER.read_bytes())
    (work / "src" / "script.rs").write_text(script)


def _missing_files(cargo: Path, registry: Path) -> str:
    if not cargo.is_file():
        return f"cargo is not in {cargo.parent}"
    if not any(registry.glob("serde_json-1.*")):
        return f"no serde_json sources in {registry} (Debian: librust-serde-json-dev)"
    return ""


def _env(work: str) -> dict[str, str]:
    """All a build gets: never the server's own environment."""
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "HOME": work,
        "CARGO_HOME": f"{work}/cargo-home",
        "TMPDIR": work,
    }


def _compile_error(stderr: bytes) -> ScriptSyntaxError:
    """The first error rustc reported, placed in the user's script when it is there."""
    first: dict[str, object] | None = None
    for entry in stderr.decode(errors="replace").splitlines():
        try:
            message = json.loads(entry)
        except ValueError:
            continue
        if isinstance(message, dict) and message.get("level") == "error":
            first = message
            break
    if first is None:
        tail = stderr.decode(errors="replace").strip()[-2000:]
        return ScriptSyntaxError(f"compilation failed: {tail or 'rustc exited without a message'}", 0, 0)
    text = str(first.get("rendered") or first.get("message") or "error")
    if "in module `script`" in str(first.get("message", "")):  # no entry point the worker calls
        text = f"{ENTRY_POINTS}\n{text}"
    line = column = 0
    spans = first.get("spans")
    for span in spans if isinstance(spans, list) else []:
        if isinstance(span, dict) and str(span.get("file_name", "")).endswith("script.rs"):
            line, column = int(span.get("line_start", 0)), int(span.get("column_start", 0))
            break
    return ScriptSyntaxError(text.strip()[:4000], line, column)
