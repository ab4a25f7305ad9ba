"""Dependencies of Node.js scripts (issue 18): `name@range` resolved by npm into a
package-lock.json, installed with `npm ci --ignore-scripts` into a layer's node_modules,
found by the script's `require`.

The registry is reachable here and in CI: a few small real packages (dayjs, and is-odd with
its dependency is-number), each resolved once for the module. A hostile package comes from
a local tarball (`npm pack`), installed by the resolver's own install.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from lambda_microservice import (
    DependencyLimitExceededError,
    DependencyNotAllowedError,
    DependencyUnresolvableError,
    InvalidArgumentError,
    LambdaClient,
    PackageIndexUnavailableError,
    result,
)
from lambda_server.config import DependencySettings
from lambda_server.domain import Deadline
from lambda_server.errors import DependencyUnresolvable, InvalidRequest, PackageIndexUnavailable
from lambda_server.runtimes.layers import Lock
from lambda_server.runtimes.npm import (
    NpmResolver,
    find_npm,
    packages,
    parse_requirement,
    refuse_other_sources,
)
from lambda_server.runtimes.registry import discover
from tests.support import RegistryClient, ServerThread, descendants, free_port, once_client, server_settings

# Generous: a resolve or an install on a busy 2-core box (the setting bounds the server's side)
INSTALL_TIMEOUT = DependencySettings().install_timeout_seconds
NODE = discover(None)["nodejs"]
NPM = find_npm(NODE.interpreter or None)

pytestmark = [
    pytest.mark.skipif(not NODE.available or NPM is None, reason="no node or no npm here"),
    pytest.mark.timeout(4 * INSTALL_TIMEOUT),
]

DAYJS = "dayjs@1.11.13"
DAYS = "const dayjs = require('dayjs');\nreturn dayjs(params.day).add(1, 'day').format('YYYY-MM-DD');"
DAYS_MODULE = (
    "const dayjs = require('dayjs');\nmodule.exports = async (event) => dayjs(event.params.day).year();"
)


def node_settings(layer_dir: Path, **dependency_overrides: Any) -> Any:
    dependencies = DependencySettings(layer_dir=layer_dir, **dependency_overrides)
    return replace(server_settings(), dependencies=dependencies)


@pytest.fixture(scope="module")
def node(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerThread, Path]]:
    layer_dir = tmp_path_factory.mktemp("nodejs-layers")
    running = ServerThread(node_settings(layer_dir), database_url)
    yield running, layer_dir
    running.stop()


@pytest.fixture(scope="module")
def client(node: tuple[ServerThread, Path]) -> Iterator[LambdaClient]:
    with RegistryClient(node[0].target, timeout=INSTALL_TIMEOUT) as client:
        yield client


def installs(running: ServerThread) -> float:
    value = running.server.metrics.registry.get_sample_value(
        "lambda_layer_installs_total", {"runtime": "nodejs"}
    )
    return value or 0.0


def lock_of(layer: Path) -> str:
    info: dict[str, Any] = json.loads((layer.parent.parent / "info" / f"{layer.name}.json").read_text())
    return str(info["lock"])


def layers_with(layer_dir: Path, package: str) -> list[Path]:
    folder = layer_dir / "layers"
    return sorted(p for p in folder.iterdir() if f'"node_modules/{package}"' in lock_of(p))


def test_a_real_package_in_both_script_styles_two_sessions_one_layer(
    client: LambdaClient, node: tuple[ServerThread, Path]
) -> None:
    """dayjs from the registry, required by a `return` body and by a `module.exports` script:
    two sessions of one lock share one layer, installed once, holding node_modules only."""
    running, layer_dir = node
    first = client.initialize("nodejs-dayjs", DAYS, dependencies=[DAYJS])
    answer = client.execute(first.request_id, {"day": "2024-02-28"})
    assert not answer.HasField("error"), answer.error
    assert result(answer) == "2024-02-29"
    (layer,) = layers_with(layer_dir, "dayjs")
    assert sorted(entry.name for entry in layer.iterdir()) == ["node_modules"], "packages only"
    assert not (layer / "node_modules" / ".package-lock.json").exists(), "npm's lock names the registry"
    before = (installs(running), layer.stat().st_ino)
    second = client.initialize("nodejs-dayjs-module", DAYS_MODULE, dependencies=[DAYJS])
    answer = client.execute(second.request_id, {"day": "2031-06-01"})
    assert not answer.HasField("error"), answer.error
    assert result(answer) == 2031
    assert layers_with(layer_dir, "dayjs") == [layer]
    assert (installs(running), layer.stat().st_ino) == before, "installed again"
    stored = client.get_session(second.request_id)
    assert [(p.name, p.version) for p in stored.locked] == [("dayjs", "1.11.13")]
    # a script without the layer has no dayjs
    bare = client.initialize("nodejs-no-dayjs", "return require('dayjs')('2024-01-01').year();")
    answer = client.execute(bare.request_id, {})
    assert answer.HasField("error")
    assert "Cannot find module 'dayjs'" in answer.error.message


def test_a_package_with_a_dependency_of_its_own_is_locked_with_integrity(client: LambdaClient) -> None:
    session = client.initialize(
        "nodejs-is-odd", "return [3, 4].map((n) => require('is-odd')(n));", dependencies=["is-odd@3.0.1"]
    )
    answer = client.execute(session.request_id, {})
    assert not answer.HasField("error"), answer.error
    assert result(answer) == [True, False]
    stored = client.get_session(session.request_id)
    assert list(stored.dependencies) == ["is-odd@3.0.1"]
    assert [(p.name, p.version) for p in stored.locked] == [("is-number", "6.0.0"), ("is-odd", "3.0.1")]
    for package in stored.locked:
        assert package.hash.startswith("sha512-") and len(package.hash) > 80, package.hash


def test_an_unknown_package_is_unresolvable_naming_its_requirement(client: LambdaClient) -> None:
    with pytest.raises(DependencyUnresolvableError) as refused:
        client.initialize(
            "nodejs-nope", "return 1;", dependencies=[DAYJS, "lambda-microservice-no-such-package-xyz@1"]
        )
    assert refused.value.metadata["requirement"] == "lambda-microservice-no-such-package-xyz@1"
    assert "E404" in refused.value.message
    with pytest.raises(DependencyUnresolvableError) as no_version:
        client.initialize("nodejs-nope", "return 1;", dependencies=["dayjs@99.0.0"])
    assert no_version.value.metadata["requirement"] == "dayjs@99.0.0"
    assert "ETARGET" in no_version.value.message


def test_a_package_asked_for_twice_alike_is_one_and_differently_is_unresolvable(client: LambdaClient) -> None:
    """As Python's: the same requirement twice is installed once; two ranges of one package
    are DEPENDENCY_UNRESOLVABLE naming both, with the second as `requirement`."""
    session = client.initialize("nodejs-twice", DAYS, dependencies=[DAYJS, f" {DAYJS}"])
    assert result(client.execute(session.request_id, {"day": "2024-02-28"})) == "2024-02-29"
    assert [(p.name, p.version) for p in client.get_session(session.request_id).locked] == [
        ("dayjs", "1.11.13")
    ]
    with pytest.raises(DependencyUnresolvableError) as refused:
        client.initialize("nodejs-twice", "return 1;", dependencies=["dayjs@^1.11", DAYJS])
    assert refused.value.metadata["requirement"] == DAYJS
    assert "'dayjs@^1.11'" in refused.value.message and f"'{DAYJS}'" in refused.value.message


def test_only_registry_packages_are_asked_for(client: LambdaClient) -> None:
    """file:, git, URL, alias and path specs, and what is no npm name, before anything runs."""
    for bad in (
        "dayjs@file:../dayjs",
        "dayjs@git+https://github.com/iamkun/dayjs.git",
        "dayjs@https://registry.npmjs.org/dayjs/-/dayjs-1.11.13.tgz",
        "dayjs@npm:moment@2",
        "dayjs@iamkun/dayjs",
        "dayjs@github:iamkun/dayjs",
        "file:../dayjs",
        "./dayjs",
        "Not A Name@1",
        "dayjs@1.2.3.4!",
    ):
        with pytest.raises(InvalidArgumentError) as refused:
            client.initialize("nodejs-bad", "return 1;", dependencies=[bad])
        assert refused.value.reason == "INVALID_REQUEST", bad
        assert refused.value.metadata["field"] == "dependencies", bad
        assert refused.value.metadata["requirement"] == bad, bad


def test_a_hostile_package_runs_none_of_its_code_at_install(tmp_path: Path) -> None:
    """A package whose preinstall, install and postinstall scripts each write a marker,
    packed into a local tarball: the resolver's install (npm ci --ignore-scripts) runs none,
    while npm ci without that option runs them (the marker would show it)."""
    assert NPM is not None
    markers = tmp_path / "markers"
    markers.mkdir()
    source = tmp_path / "hostile"
    source.mkdir()
    hooks = {
        hook: f"node -e \"require('fs').writeFileSync('{markers / hook}', 'ran')\""
        for hook in ("preinstall", "install", "postinstall")
    }
    manifest = {"name": "lambda-hostile", "version": "1.0.0", "main": "index.js", "scripts": hooks}
    (source / "package.json").write_text(json.dumps(manifest))
    (source / "index.js").write_text("module.exports = 'hostile';\n")
    packed = subprocess.run(
        [NODE.interpreter, NPM, "pack", "--ignore-scripts", "--pack-destination", str(tmp_path)],
        cwd=source,
        capture_output=True,
        check=True,
        timeout=INSTALL_TIMEOUT,
    )
    tarball = tmp_path / packed.stdout.decode().strip().splitlines()[-1]
    assert tarball.is_file()

    resolver = NpmResolver(NPM, NODE.interpreter, None, tmp_path / "layers")
    work = tmp_path / "work"
    work.mkdir()
    (work / "package.json").write_text(
        json.dumps(
            {"name": "lambda-layer", "private": True, "dependencies": {"lambda-hostile": f"file:{tarball}"}}
        )
    )

    async def lock_and_install(target: Path) -> Lock:
        deadline = Deadline.after(INSTALL_TIMEOUT)
        text = await resolver.lock_folder(work, ("lambda-hostile",), deadline)
        lock = Lock("nodejs", ("lambda-hostile",), packages(text), text)
        with pytest.raises(DependencyUnresolvable) as refused:  # a file: package: not the registry's
            await resolver.install(lock, target, deadline)
        assert "lambda-hostile comes from file:" in refused.value.message
        assert not await asyncio.to_thread(os.listdir, target)
        # npm ci itself (what install runs once the lock's sources are checked): scripts ignored
        await resolver._install(lock, target, deadline, None)
        return lock

    target = tmp_path / "layer"
    target.mkdir()
    lock = asyncio.run(lock_and_install(target))
    assert [p.name for p in lock.packages] == ["lambda-hostile"]
    assert (target / "node_modules" / "lambda-hostile" / "index.js").is_file()
    assert not list(markers.iterdir()), "package code ran at install"

    # the same lock, installed by npm ci with scripts: the hooks do write (the test can see them)
    control = tmp_path / "control"
    control.mkdir()
    (control / "package.json").write_text((work / "package.json").read_text())
    (control / "package-lock.json").write_text(lock.text)
    environ = {"PATH": f"{Path(NODE.interpreter).parent}:{os.environ['PATH']}", "HOME": str(tmp_path)}
    subprocess.run(
        [NODE.interpreter, NPM, "ci", "--no-audit", "--no-fund", "--cache", str(tmp_path / "cache")],
        cwd=control,
        env=environ,
        capture_output=True,
        check=True,
        timeout=INSTALL_TIMEOUT,
    )
    assert sorted(marker.name for marker in markers.iterdir()) == ["install", "postinstall", "preinstall"]


def test_a_pathological_range_is_refused_at_once() -> None:
    """Ranges whose spaces a backtracking pattern could split many ways (5 s for 75 characters
    before): refused, each in far less than a second (the bound, 10 s, is for a busy box)."""
    hostile = [
        "x@" + ("1" + " " * 8) * 8 + "!",
        "x@" + ("1 " * 120) + "!",
        "x@" + (">= 1 " * 50) + "!",
        "x@" + ("1" + " " * 8) * 56 + "!",  # 512 characters: over the range's bound
    ]
    for requirement in hostile:
        started = time.monotonic()
        with pytest.raises(InvalidRequest):
            parse_requirement(requirement)
        # the old pattern took 5 s on the first, 75 characters, and doubles with each
        # character more: 10 s holds on a busy box and still fails it on the longer ones
        assert time.monotonic() - started < 10.0, requirement[:40]
    for fine in (
        "x@^4",
        "x@>=1 <2",
        "x@1.x || 2",
        "x@1.0.0 - 1.2.0",
        "x@~1.2",
        "x@>= 1.2",
        "x@" + "1 " * 100,
    ):
        assert parse_requirement(fine)[0] == "x"


def test_a_git_dependency_of_a_package_is_never_fetched(tmp_path: Path) -> None:
    """A package (a local tarball) that depends on a git repository whose `prepare` script
    writes a marker: npm, as the resolver runs it, refuses to fetch git at lock time, so
    nothing is cloned or prepared; a lock naming anything but the registry's tarballs is
    refused before `npm ci`."""
    assert NPM is not None
    markers = tmp_path / "markers"
    markers.mkdir()
    evil = tmp_path / "evil"
    evil.mkdir()
    prepare = f"node -e \"require('fs').writeFileSync('{markers / 'prepare'}', 'ran')\""
    (evil / "package.json").write_text(
        json.dumps({"name": "evil", "version": "1.0.0", "scripts": {"prepare": prepare}})
    )
    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
    for argv in (["git", "init", "-q"], ["git", "add", "."], [*git, "commit", "-qm", "evil"]):
        subprocess.run(argv, cwd=evil, check=True, capture_output=True, timeout=INSTALL_TIMEOUT)
    source = tmp_path / "gitdep"
    source.mkdir()
    dependencies = {"evil": f"git+file://{evil}", "evil-remote": "git+https://127.0.0.1:1/evil.git"}
    (source / "package.json").write_text(
        json.dumps({"name": "lambda-gitdep", "version": "1.0.0", "dependencies": dependencies})
    )
    packed = subprocess.run(
        [NODE.interpreter, NPM, "pack", "--ignore-scripts", "--pack-destination", str(tmp_path)],
        cwd=source,
        capture_output=True,
        check=True,
        timeout=INSTALL_TIMEOUT,
    )
    tarball = tmp_path / packed.stdout.decode().strip().splitlines()[-1]
    resolver = NpmResolver(NPM, NODE.interpreter, None, tmp_path / "layers")
    work = tmp_path / "work"
    work.mkdir()
    (work / "package.json").write_text(
        json.dumps(
            {"name": "lambda-layer", "private": True, "dependencies": {"lambda-gitdep": f"file:{tarball}"}}
        )
    )
    with pytest.raises(DependencyUnresolvable):
        asyncio.run(resolver.lock_folder(work, ("lambda-gitdep",), Deadline.after(INSTALL_TIMEOUT)))
    assert not list(markers.iterdir()), "a git dependency was prepared"
    assert not (work / "package-lock.json").exists()

    # a lock that names other sources (as a registry package's dependency could): refused
    def lock_with(resolved: str) -> str:
        entry = {"version": "1.0.0", "resolved": resolved, "integrity": "sha512-x"}
        return json.dumps({"lockfileVersion": 3, "packages": {"": {}, "node_modules/evil": entry}})

    refuse_other_sources(lock_with("https://registry.npmjs.org/evil/-/evil-1.0.0.tgz"), None, ("evil",))
    refuse_other_sources(
        lock_with("http://127.0.0.1:4873/evil/-/evil-1.0.0.tgz"), "http://127.0.0.1:4873", ()
    )
    for resolved in (
        "git+ssh://git@github.com/evil/x.git#abc",
        "git+file:///tmp/evil#abc",
        "file:../evil.tgz",
        "https://evil.example/evil-1.0.0.tgz",
        "https://registry.npmjs.org.evil.example/evil-1.0.0.tgz",
    ):
        with pytest.raises(DependencyUnresolvable):
            refuse_other_sources(lock_with(resolved), None, ("evil",))
    with pytest.raises(DependencyUnresolvable):  # neither the configured registry nor npm's own
        refuse_other_sources(
            lock_with("https://npm.example/evil/-/evil-1.0.0.tgz"), "http://127.0.0.1:4873/", ()
        )


def test_registry_credentials_never_reach_the_caller(tmp_path: Path) -> None:
    """NPM_REGISTRY with userinfo, unreachable: the error says so without the password."""
    registry = f"http://lambda-user:s3cret-token@127.0.0.1:{free_port()}/"
    resolver = NpmResolver(NPM or "", NODE.interpreter, registry, tmp_path / "layers")
    with pytest.raises(PackageIndexUnavailable) as refused:
        asyncio.run(resolver.lock(("dayjs@1.11.13",), Deadline.after(INSTALL_TIMEOUT)))
    assert "s3cret-token" not in refused.value.message
    assert "lambda-user" not in refused.value.message


def test_the_allowlist_names_npm_packages_and_their_dependencies(database_url: str, tmp_path: Path) -> None:
    allowed = frozenset({"dayjs", "is-odd", "lodash.merge"})
    settings = node_settings(tmp_path, mode="allowlist", allowlist=allowed)
    running = ServerThread(settings, database_url)
    try:
        with RegistryClient(running.target, timeout=INSTALL_TIMEOUT) as client:
            with pytest.raises(DependencyNotAllowedError) as named:  # before anything resolves
                client.initialize("nodejs-listed", "return 1;", dependencies=["left-pad@1.3.0"])
            assert named.value.metadata == {
                "setting": "DEPENDENCY_ALLOWLIST",
                "requirement": "left-pad@1.3.0",
            }
            with pytest.raises(DependencyNotAllowedError) as other:  # npm's names are not normalized
                client.initialize("nodejs-listed", "return 1;", dependencies=["lodash-merge@4"])
            assert other.value.metadata["requirement"] == "lodash-merge@4"
            with pytest.raises(DependencyNotAllowedError) as pulled:  # is-number comes with it
                client.initialize("nodejs-listed", "return 1;", dependencies=["is-odd@3.0.1"])
            assert pulled.value.metadata["requirement"] == "is-number"
            session = client.initialize("nodejs-listed", DAYS, dependencies=[DAYJS])
            assert result(client.execute(session.request_id, {"day": "2025-12-31"})) == "2026-01-01"
            health = {check.name: check for check in client.health().checks}["dependencies"]
            assert "nodejs: npm " in health.detail
    finally:
        running.stop()


def npm_processes() -> set[int]:
    """This process's descendants that are npm (the tests' servers run in this process)."""
    found = set()
    for pid in descendants():
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if any(os.path.basename(arg) in (b"npm", b"npm-cli.js") for arg in command.split(b"\0")):
            found.add(pid)
    return found


def test_an_unreachable_registry_is_unavailable(database_url: str, tmp_path: Path) -> None:
    """NPM_REGISTRY naming a port nobody listens on: UNAVAILABLE, nothing stored, no network."""
    settings = node_settings(tmp_path, npm_registry=f"http://127.0.0.1:{free_port()}/")
    running = ServerThread(settings, database_url)
    try:
        with once_client(running.target, INSTALL_TIMEOUT) as client:
            with pytest.raises(PackageIndexUnavailableError) as refused:
                client.initialize("nodejs-offline", "return 1;", dependencies=["left-pad@1.3.0"])
            assert refused.value.reason == "PACKAGE_INDEX_UNAVAILABLE"
            assert refused.value.metadata["setting"] == "NPM_REGISTRY"
            assert "ECONNREFUSED" in refused.value.message
    finally:
        running.stop()


def test_a_registry_that_takes_the_connection_and_never_answers_is_unavailable(
    database_url: str, tmp_path: Path
) -> None:
    """npm's own wait is 5 minutes; PACKAGE_INDEX_TIMEOUT_SECONDS ends it: UNAVAILABLE (a
    retry is safe) naming NPM_REGISTRY, well before the install's bound, npm gone."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)  # connections complete, and no answer ever comes
    port = silent.getsockname()[1]
    settings = node_settings(
        tmp_path,
        npm_registry=f"http://127.0.0.1:{port}/",
        package_index_timeout_seconds=1,
        install_timeout_seconds=40.0,
    )
    running = ServerThread(settings, database_url)
    try:
        with once_client(running.target, INSTALL_TIMEOUT) as client:
            with pytest.raises(PackageIndexUnavailableError) as refused:
                client.initialize("nodejs-silent", "return 1;", dependencies=["left-pad@1.3.0"])
            assert refused.value.metadata["setting"] == "NPM_REGISTRY"
            assert "PACKAGE_INDEX_TIMEOUT_SECONDS" in refused.value.message
            assert not npm_processes(), "npm is gone"
            session = client.initialize("nodejs-silent", "return 2;")  # the server goes on
            assert result(client.execute(session.request_id, {})) == 2
    finally:
        running.stop()
        silent.close()


def test_a_registry_that_never_answers_is_bounded_by_the_install_timeout(
    database_url: str, tmp_path: Path
) -> None:
    """An install timeout shorter than the index's: DEPENDENCY_INSTALL_TIMEOUT_SECONDS ends
    npm's wait (npm killed), and names itself."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)  # connections complete, and no answer ever comes
    port = silent.getsockname()[1]
    settings = node_settings(tmp_path, npm_registry=f"http://127.0.0.1:{port}/", install_timeout_seconds=3.0)
    running = ServerThread(settings, database_url)
    try:
        with LambdaClient(running.target, timeout=INSTALL_TIMEOUT) as client:
            with pytest.raises(DependencyLimitExceededError) as refused:
                client.initialize("nodejs-silent", "return 1;", dependencies=["left-pad@1.3.0"])
            assert refused.value.metadata["setting"] == "DEPENDENCY_INSTALL_TIMEOUT_SECONDS"
            assert not npm_processes(), "npm was killed"
            session = client.initialize("nodejs-silent", "return 2;")  # the server goes on
            assert result(client.execute(session.request_id, {})) == 2
    finally:
        running.stop()
        silent.close()


def test_a_replica_installs_a_node_layer_from_the_stored_lock(
    client: LambdaClient, database_url: str, tmp_path: Path
) -> None:
    session = client.initialize("nodejs-replica", DAYS, dependencies=[DAYJS])
    other = ServerThread(node_settings(tmp_path), database_url)
    try:
        with LambdaClient(other.target, timeout=INSTALL_TIMEOUT) as two:
            answer = two.execute(session.request_id, {"day": "2023-12-31"})
            assert not answer.HasField("error"), answer.error
            assert result(answer) == "2024-01-01"
            (layer,) = layers_with(tmp_path, "dayjs")
            assert (layer / "node_modules" / "dayjs" / "package.json").is_file()
    finally:
        other.stop()
