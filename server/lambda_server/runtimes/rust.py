"""The Rust toolchain: found on this machine, it compiles scripts into programs, sandboxed.

A script is compiled with rustc alone (no cargo, so no build scripts and no
procedural macros of the script's) into rust_worker.rs, which serves its
`handler` over the workers' pipe protocol. The one crate a script may use,
serde_json, comes from Debian's packaged sources (librust-serde-json-dev) and is
built once per toolchain by cargo, offline, into a shared folder that every
later compile links against. Both builds run inside the sandbox, with time and
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
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from lambda_server.domain import Deadline, Limits
from lambda_server.errors import DeadlineExceeded, ScriptSyntaxError, Unavailable
from lambda_server.runtimes.process import WorkerTimeout, run_command
from lambda_server.runtimes.registry import RuntimeSpec
from lambda_server.sandbox import Sandbox, SandboxUnavailable

log = logging.getLogger(__name__)

_HERE = Path(__file__).resolve().parent
WORKER = _HERE / "rust_worker.rs"
DEBIAN_REGISTRY = Path("/usr/share/cargo/registry")
OPTIMIZATION_LEVELS = {"debug": "0", "release": "3"}
DEPENDENCIES_TIMEOUT = 600.0
# rustc runs a few threads, and the linker (cc, collect2, ld) beside them
COMPILE_LIMITS = Limits(memory_mb=1536, max_processes=64)
PROGRAM_MAX_MB = 256


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
        """A short stable name of this toolchain, for artifact keys and cache folders."""
        return hashlib.sha256(self.version.encode()).hexdigest()[:16]


class RustCompiler:
    """Compiles scripts into programs; builds the shared dependencies once.

    The dependencies' build is the compiler's own task, started with the server
    (`start`): a compile that comes before it is done waits for it under its own
    deadline, and no caller's deadline or cancellation ends it. Its bound is
    RUST_DEPENDENCIES_TIMEOUT_SECONDS; a failed build is tried again by the next
    compile.
    """

    def __init__(
        self,
        toolchain: RustToolchain,
        sandbox: Sandbox,
        cache_dir: Path,
        timeout: float,
        dependencies_timeout: float = DEPENDENCIES_TIMEOUT,
        jobs: int = 2,
    ) -> None:
        self._toolchain = toolchain
        self._sandbox = sandbox
        self._cache = cache_dir
        self._timeout = timeout
        self._dependencies_timeout = dependencies_timeout
        self._slots = asyncio.Semaphore(jobs)
        self._dependencies_task: asyncio.Task[tuple[Path, Path]] | None = None
        self._built: tuple[Path, Path] | None = None  # the dependencies' folder, serde_json's rlib

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
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    @property
    def dependencies_state(self) -> str:
        """`ready`, `building`, `not started`, or `failed: <why>` (tried again by the next
        compile)."""
        task = self._dependencies_task
        if self._built is not None:
            return "ready"
        if task is None:
            return "not started"
        if task.done() and not task.cancelled() and task.exception() is not None:
            return f"failed: {_describe(task.exception())}"
        return "building"

    async def compile(self, script: str, optimization: str, deadline: Deadline) -> bytes:
        """The program of a script; ScriptSyntaxError with rustc's message, line and column."""
        dependencies, serde_json = self._built or await self._dependencies(deadline)
        async with self._slots:
            work = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix="compile-", dir=self._cache))
            try:
                await asyncio.to_thread(_stage, work, script)
                argv = [
                    self._toolchain.rustc,
                    "--edition=2021",
                    "--crate-type=bin",
                    "--crate-name=handler",
                    "--error-format=json",
                    "--cap-lints=allow",
                    f"-Copt-level={OPTIMIZATION_LEVELS[optimization]}",
                    "-Cstrip=debuginfo",
                    f"-Ldependency={dependencies}",
                    f"--extern=serde_json={serde_json}",
                    "-o",
                    str(work / "handler"),
                    str(work / "src" / "main.rs"),  # the jail starts in /tmp
                ]
                timeout = deadline.cap(self._timeout)
                try:
                    code, err, out_of_memory = await self._run(argv, work, [str(dependencies)], timeout)
                except WorkerTimeout:
                    raise ScriptSyntaxError(
                        f"compilation ran past its limit of {timeout:g} s", 0, 0
                    ) from None
                if out_of_memory:
                    raise ScriptSyntaxError(f"compilation went past {COMPILE_LIMITS.memory_mb} MiB", 0, 0)
                if code != 0:
                    raise _compile_error(err)
                return await asyncio.to_thread((work / "handler").read_bytes)
            finally:
                await asyncio.to_thread(shutil.rmtree, work, True)

    async def _dependencies(self, deadline: Deadline) -> tuple[Path, Path]:
        """The folder of serde_json's built crates for this toolchain and serde_json's
        library in it, waited for within the caller's deadline."""
        self.start()
        task = self._dependencies_task
        assert task is not None
        try:
            async with asyncio.timeout(deadline.remaining()):
                return await asyncio.shield(task)  # the build is the compiler's, not this caller's
        except TimeoutError:
            raise DeadlineExceeded(
                "the call's deadline passed while serde_json was being built "
                "(once per toolchain, when the server starts; try again shortly)"
            ) from None

    async def _prepare_dependencies(self) -> tuple[Path, Path]:
        await self._build_dependencies()
        self._built = await asyncio.to_thread(_built, self._dependencies_folder)
        return self._built

    def _dependencies_done(self, task: asyncio.Task[tuple[Path, Path]]) -> None:
        if task.cancelled():
            return
        error = task.exception()  # retrieved here, so a build no caller waited for is still seen
        if error is not None:
            log.warning("Rust dependencies: %s", _describe(error))

    @property
    def _dependencies_folder(self) -> Path:
        return self._cache / f"deps-{self._toolchain.identity}"

    async def _build_dependencies(self) -> None:
        """Build them unless they are built; one build at a time per cache folder, across
        servers and processes (a file lock), the others waiting for its end."""
        folder = self._dependencies_folder
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
                            f"serde_json was being built elsewhere for over {limit:g} s "
                            f"(RUST_DEPENDENCIES_TIMEOUT_SECONDS; {lock_path})"
                        ) from None
                    await asyncio.sleep(0.5)
                    continue
                try:
                    if not await asyncio.to_thread((folder / "ready").exists):
                        await self._build_into(folder)
                finally:
                    fcntl.flock(lock, fcntl.LOCK_UN)
        finally:
            os.close(lock)

    async def _build_into(self, folder: Path) -> None:
        log.info(
            "building serde_json for %s in the background (once per toolchain; about 5 s on 2 idle cores)",
            self._toolchain.version,
        )
        started = time.monotonic()
        work = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix="deps-", dir=self._cache))
        try:
            await asyncio.to_thread(_write_dependencies_project, work, self._toolchain.registry)
            manifest = str(work / "Cargo.toml")
            argv = [
                self._toolchain.cargo,
                "build",
                "--release",
                "--offline",
                "--quiet",
                "--manifest-path",
                manifest,
            ]
            binds = [self._toolchain.registry]
            limit = self._dependencies_timeout
            try:
                code, err, _ = await self._run(argv, work, binds, limit)
            except WorkerTimeout:  # not the script's fault: the service cannot compile yet
                raise Unavailable(
                    f"serde_json did not build within {limit:g} s (RUST_DEPENDENCIES_TIMEOUT_SECONDS)"
                ) from None
            if code != 0:
                raise Unavailable(f"serde_json did not build: {err.decode(errors='replace')[-2000:]}")
            built = work / "target" / "release" / "deps"
            staged = self._cache / f".{folder.name}-{os.getpid()}"
            await asyncio.to_thread(shutil.rmtree, staged, True)
            await asyncio.to_thread(shutil.copytree, built, staged)
            (staged / "ready").write_text(self._toolchain.version)
            await asyncio.to_thread(shutil.rmtree, folder, True)  # a build cut short, if any
            staged.rename(folder)
            log.info("built serde_json in %.1f s", time.monotonic() - started)
        finally:
            await asyncio.to_thread(shutil.rmtree, work, True)

    async def _run(
        self, argv: list[str], work: Path, binds: list[str], timeout: float
    ) -> tuple[int, bytes, bool]:
        """Run a build command in the sandbox: its exit status, its stderr, and whether it
        went past its memory limit; WorkerTimeout past `timeout`."""
        try:
            confinement = self._sandbox.confine_command(
                argv, [self._toolchain.sysroot, *binds], str(work), COMPILE_LIMITS, PROGRAM_MAX_MB
            )
        except SandboxUnavailable as exc:
            raise Unavailable(f"the Rust compiler could not be confined: {exc.message}") from None
        try:
            env = {**_env(str(work)), "RUSTC": self._toolchain.rustc}
            code, _, err = await run_command(confinement.argv, env, str(work), timeout)
            return code, err, confinement.memory_exhausted()
        finally:
            await confinement.release()


def _describe(error: BaseException | None) -> str:
    return error.message if isinstance(error, Unavailable) else repr(error)


def _built(folder: Path) -> tuple[Path, Path]:
    """The dependencies' folder at its real path (a symlink's target would not be in the
    jail), and serde_json's library in it."""
    real = Path(os.path.realpath(folder))
    return real, next(real.glob("libserde_json-*.rlib"))


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


def _write_dependencies_project(work: Path, registry: str) -> None:
    (work / "src").mkdir()
    (work / "src" / "lib.rs").write_text("")
    (work / "Cargo.toml").write_text(
        '[package]\nname = "lambda-rust-dependencies"\nversion = "0.0.0"\nedition = "2021"\n\n'
        '[dependencies]\nserde_json = "1"\n'
    )
    home = work / "cargo-home"
    home.mkdir()
    (home / "config.toml").write_text(
        '[source.crates-io]\nreplace-with = "packaged"\n\n'
        f'[source.packaged]\ndirectory = "{registry}"\n\n[net]\noffline = true\n'
    )


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
    line = column = 0
    spans = first.get("spans")
    for span in spans if isinstance(spans, list) else []:
        if isinstance(span, dict) and str(span.get("file_name", "")).endswith("script.rs"):
            line, column = int(span.get("line_start", 0)), int(span.get("column_start", 0))
            break
    return ScriptSyntaxError(text.strip()[:4000], line, column)
