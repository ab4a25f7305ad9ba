"""Python's resolver: uv resolves requirements into a PEP 751 lock (pylock.toml) and installs it.

`uv pip compile --format pylock.toml --only-binary :all: --python <the worker's
interpreter>` picks, for each package, exactly one wheel for the interpreter and
platform the scripts run on, with its URL and sha256: that text is the lock stored
with the session. `uv pip install --target <layer>/site-packages --no-deps
--require-hashes --only-binary :all:` installs exactly those wheels. Wheels only: no
setup.py, no build backend, nothing of a package runs at install (a wheel is unpacked;
its `.pth` files are not processed either, see python_worker.py).

uv runs with a clean environment: no user or project configuration (UV_NO_CONFIG), its
cache under LAYER_DIR, the platform's certificates, and the proxy and certificate
variables of the server's own environment, nothing else of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import sys
import tempfile
import tomllib
import urllib.parse
from collections.abc import Mapping
from pathlib import Path

from lambda_server.domain import Deadline, LockedPackage
from lambda_server.errors import (
    DependencyUnresolvable,
    InternalError,
    PackageIndexUnavailable,
)
from lambda_server.runtimes.installer_process import named, passed_on, redacted, run_tool
from lambda_server.runtimes.layers import Lock

LOCK_FILE = "pylock.toml"  # uv wants this name (PEP 751)
MAX_MESSAGE = 2000  # characters of uv's own words in an error
# what the server's environment passes on to uv: how to reach the index, nothing more
PASSED_ON = (
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
    "NO_PROXY",
    "http_proxy",
    "https_proxy",
    "all_proxy",
    "no_proxy",
)
# uv's words for an index it could not reach (as opposed to one that answered "no")
_UNREACHABLE = re.compile(
    r"Failed to fetch|error sending request|dns error|Connection refused|timed out|tcp connect error|"
    r"client error \(Connect\)|Could not connect|Network is unreachable",
    re.IGNORECASE,
)
_TIMED_OUT = re.compile(r"timed out|timeout", re.IGNORECASE)


def find_uv() -> str | None:
    """uv's binary: the one the `uv` package installed beside this Python, else on PATH."""
    beside = Path(sys.executable).parent / "uv"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    with contextlib.suppress(ImportError, FileNotFoundError):
        import uv

        found: str = uv.find_uv_bin()
        return found
    return shutil.which("uv")


class UvResolver:
    """Resolver (runtimes/layers.py) for Python, with uv."""

    runtime = "python"

    def __init__(
        self,
        uv: str,
        python: str,
        index: str | None,
        layer_dir: Path,
        environ: Mapping[str, str] | None = None,
        index_timeout: int = 15,
    ) -> None:
        """`python`: the interpreter the workers run (wheels are picked for it); `index`:
        PYTHON_PACKAGE_INDEX, an index URL or a local folder of wheels (None: uv's default);
        `index_timeout`: PACKAGE_INDEX_TIMEOUT_SECONDS, how long uv waits to connect, and
        between two reads of an answer."""
        self._uv = uv
        self._python = python
        self._work = layer_dir / "staging"
        cache = layer_dir / "uv-cache"
        cache.mkdir(parents=True, exist_ok=True)
        self._work.mkdir(parents=True, exist_ok=True)
        self._env = passed_on(PASSED_ON, environ)
        self._env.update(
            PATH="/usr/local/bin:/usr/bin:/bin",
            HOME=str(cache),
            LANG="C.UTF-8",
            UV_NO_CONFIG="1",
            UV_CACHE_DIR=str(cache),
            UV_SYSTEM_CERTS="1",
            UV_HTTP_RETRIES="1",
            # an index that takes the connection and says nothing: UNAVAILABLE in about twice
            # this (one retry), not DEPENDENCY_INSTALL_TIMEOUT_SECONDS; a slow download that
            # keeps reading is not cut by it (a read timeout)
            UV_HTTP_TIMEOUT=str(index_timeout),
            UV_HTTP_CONNECT_TIMEOUT=str(index_timeout),
            UV_PYTHON_DOWNLOADS="never",
            UV_NO_PROGRESS="1",
        )
        self._index = _index_options(index)
        self._index_url = index  # its userinfo never shown to a caller

    async def lock(self, requirements: tuple[str, ...], deadline: Deadline) -> Lock:
        work = Path(await asyncio.to_thread(tempfile.mkdtemp, dir=self._work, prefix="lock-"))
        try:
            await asyncio.to_thread((work / "requirements.in").write_text, "\n".join(requirements) + "\n")
            argv = [
                *("pip", "compile", "requirements.in", "--output-file", LOCK_FILE),
                *("--format", "pylock.toml", "--preview-features", "pylock"),
                *("--only-binary", ":all:", "--python", self._python, "--no-header", "--quiet"),
                *self._index,
            ]
            code, errors = await self._run(argv, work, deadline)
            if code != 0:
                raise _failure(errors or f"uv exited {code}", requirements)
            text = await asyncio.to_thread((work / LOCK_FILE).read_text)
        finally:
            await asyncio.to_thread(shutil.rmtree, work, True)
        size = await asyncio.to_thread(archive_bytes, text)
        return Lock(self.runtime, requirements, packages(text), text, size)

    async def install(
        self, lock: Lock, target: Path, deadline: Deadline, max_bytes: int | None = None
    ) -> None:
        work = Path(await asyncio.to_thread(tempfile.mkdtemp, dir=self._work, prefix="install-"))
        try:
            await asyncio.to_thread((work / LOCK_FILE).write_text, lock.text)
            argv = [
                *("pip", "install", "--target", str(target / "site-packages"), "-r", LOCK_FILE),
                *("--no-deps", "--require-hashes", "--only-binary", ":all:"),
                *("--preview-features", "pylock", "--python", self._python, "--quiet"),
                *self._index,
            ]
            code, errors = await self._run(argv, work, deadline, target, max_bytes)
        finally:
            await asyncio.to_thread(shutil.rmtree, work, True)
        if code != 0:
            raise _failure(errors or f"uv exited {code}", lock.requirements)

    async def _run(
        self,
        argv: list[str],
        cwd: Path,
        deadline: Deadline,
        target: Path | None = None,
        max_bytes: int | None = None,
    ) -> tuple[int, str]:
        """uv's exit code and stderr (credentials redacted); DependencyLimitExceeded (uv killed)
        past the deadline, or when `target` grows past `max_bytes` (installer_process.run_tool)."""
        code, errors = await run_tool([self._uv, *argv], cwd, self._env, deadline, target, max_bytes)
        return code, redacted(errors, (self._index_url,))


def packages(text: str) -> tuple[LockedPackage, ...]:
    """The packages of a pylock.toml, by name, each with its one wheel's sha256."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise InternalError(f"uv wrote a lock that does not parse: {exc}") from None
    found = []
    for package in data.get("packages", ()):
        wheels = package.get("wheels") or ()
        digest = wheels[0].get("hashes", {}).get("sha256", "") if wheels else ""
        found.append(LockedPackage(package["name"], str(package.get("version", "")), f"sha256:{digest}"))
    return tuple(sorted(found, key=lambda p: p.name))


def archive_bytes(text: str) -> int:
    """The wheels' sizes together: the lock's `size`, or a local file's (find-links)."""
    total = 0
    with contextlib.suppress(tomllib.TOMLDecodeError):
        for package in tomllib.loads(text).get("packages", ()):
            for wheel in package.get("wheels") or ():
                size = wheel.get("size")
                url = str(wheel.get("url") or wheel.get("path") or "")
                if not isinstance(size, int) and url.startswith("file://"):
                    with contextlib.suppress(OSError):
                        size = os.path.getsize(urllib.parse.unquote(url.removeprefix("file://")))
                total += size if isinstance(size, int) else 0
    return total


def _index_options(index: str | None) -> list[str]:
    """An index URL (`file://` included: a PEP 503 tree on disk), or a path: a folder of
    wheels, found by `--find-links` with no index at all (offline)."""
    if not index:
        return []
    if "://" in index:
        return ["--index-url", index]
    return ["--no-index", "--find-links", index]


def _failure(stderr: str, requirements: tuple[str, ...]) -> Exception:
    """uv's failure as the service's error: the index unreachable, or the requirements unresolvable."""
    words = "\n".join(line for line in stderr.strip().splitlines() if line.strip())[:MAX_MESSAGE]
    if _UNREACHABLE.search(words) and "No solution found" not in words:
        within = " within PACKAGE_INDEX_TIMEOUT_SECONDS" if _TIMED_OUT.search(words) else ""
        return PackageIndexUnavailable(
            f"the package index did not answer{within} (PYTHON_PACKAGE_INDEX): {words}",
            setting="PYTHON_PACKAGE_INDEX",
        )
    return DependencyUnresolvable(
        f"the dependencies cannot be resolved: {words or 'uv failed without a word'}",
        requirement=named(words, requirements, _names),
    )


def _names(requirement: str) -> tuple[str]:
    """The normalized name of a requirement, as uv writes it."""
    name = re.split(r"[\s<>=!~;\[@(]", requirement.strip(), maxsplit=1)[0]
    return (re.sub(r"[-_.]+", "-", name).lower(),)
