"""Dependencies (issue 18): Python packages resolved by uv into a lock, installed once per host
into a layer, shared by sessions, installed by any replica from the stored lock.

Most tests run offline, against a local folder of wheels built here (PYTHON_PACKAGE_INDEX
naming a folder: uv's find-links, no index at all); one reaches the real index with a small
pure package that has a dependency of its own.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import itertools
import json
import socket
import tarfile
import uuid
import zipfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from lambda_microservice import (
    AlreadyExistsError,
    DependencyLimitExceededError,
    DependencyNotAllowedError,
    DependencyUnresolvableError,
    InvalidArgumentError,
    LambdaClient,
    LambdaError,
    NotStartedError,
    PackageIndexUnavailableError,
    QuotaExceededError,
    SessionExpiredError,
    result,
)
from lambda_server.config import DependencySettings
from lambda_server.store.creates import OWNER_LOCK_CLASS
from tests.support import RegistryClient, ServerThread, eventually, once_client, run_sync, server_settings
from tests.test_http_api import http

# Generous: an install on a busy 2-core box (the setting bounds the server's side)
INSTALL_TIMEOUT = DependencySettings().install_timeout_seconds
FIXED_TIME = (2026, 1, 1, 0, 0, 0)  # wheels built alike hash alike


def build_wheel(
    folder: Path, name: str, version: str, files: dict[str, str], requires: tuple[str, ...] = ()
) -> Path:
    """A pure-Python wheel: METADATA, WHEEL, RECORD and the given files."""
    dist = name.replace("-", "_")
    info = f"{dist}-{version}.dist-info"
    contents = dict(files)
    contents[f"{info}/METADATA"] = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n" + "".join(
        f"Requires-Dist: {r}\n" for r in requires
    )
    contents[f"{info}/WHEEL"] = (
        "Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    )
    record = []
    for path, text in contents.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(text.encode())}")
    record.append(f"{info}/RECORD,,")
    contents[f"{info}/RECORD"] = "\n".join(record) + "\n"
    wheel = folder / f"{dist}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, text in contents.items():
            archive.writestr(zipfile.ZipInfo(path, FIXED_TIME), text)
    return wheel


def build_sdist(folder: Path, name: str, version: str, setup: str) -> Path:
    """A source distribution only (no wheel): installing it would run its setup.py."""
    sdist = folder / f"{name.replace('-', '_')}-{version}.tar.gz"
    with tarfile.open(sdist, "w:gz") as archive:
        for path, text in {
            "setup.py": setup,
            "PKG-INFO": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        }.items():
            data = text.encode()
            member = tarfile.TarInfo(f"{name.replace('-', '_')}-{version}/{path}")
            member.size = len(data)
            archive.addfile(member, io.BytesIO(data))
    return sdist


@pytest.fixture(scope="module")
def marker_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where hostile packages would write, were any of their code run on the host."""
    return tmp_path_factory.mktemp("markers")


@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory, marker_dir: Path) -> Path:
    folder = tmp_path_factory.mktemp("wheels")
    build_wheel(
        folder,
        "lambda-tiny",
        "1.0",
        {"lambda_tiny.py": "def hello():\n    return 'tiny'\n"},
        ("lambda-tinier",),
    )
    build_wheel(folder, "lambda-tinier", "2.0", {"lambda_tinier.py": "X = 2\n"})
    build_wheel(folder, "lambda-other", "1.0", {"lambda_other.py": "Y = 3\n"})
    # 300 KB installed: past the servers' MAX_LAYER_BYTES below
    build_wheel(folder, "lambda-large", "1.0", {"lambda_large.py": "DATA = '" + "x" * 300_000 + "'\n"})
    # two of 25 KB each, for the owner's quota of layer bytes
    for name in ("lambda-quota-a", "lambda-quota-b"):
        module = name.replace("-", "_")
        build_wheel(folder, name, "1.0", {f"{module}.py": "PAD = '" + "q" * 25_000 + "'\n"})
    build_wheel(folder, "lambda-together", "1.0", {"lambda_together.py": "T = 't'\n"})
    # top-level modules named as the standard library's: never in front of it
    shadows = {"colorsys.py": "SHADOWED = True\n", "json.py": "SHADOWED = True\n"}
    build_wheel(folder, "lambda-shadow", "1.0", {**shadows, "lambda_shadow.py": "S = 's'\n"})
    build_wheel(folder, "lambda-vanishing", "1.0", {"lambda_vanishing.py": "V = 'v'\n"})
    for version in ("1.0", "2.0"):  # one script, two versions: two answers
        build_wheel(folder, "lambda-ver", version, {"lambda_ver.py": f"V = {version!r}\n"})
    marker = marker_dir / "imported"
    hostile = f"open({str(marker)!r}, 'w').write('ran')\n"
    build_wheel(
        folder,
        "lambda-hostile",
        "1.0",
        {
            "lambda_hostile.py": hostile + "VALUE = 'hostile'\n",
            # processed by site.addsitedir at interpreter start: never, here
            "lambda_hostile_hook.pth": f"import os; open({str(marker_dir / 'pth')!r}, 'w').write('ran')\n",
        },
    )
    build_sdist(
        folder,
        "lambda-sdist-only",
        "1.0",
        f"open({str(marker_dir / 'setup')!r}, 'w').write('ran')\nfrom setuptools import setup\nsetup()\n",
    )
    return folder


def offline_settings(wheels: Path, layer_dir: Path, **dependency_overrides: Any) -> Any:
    dependencies = DependencySettings(
        python_package_index=str(wheels),
        layer_dir=layer_dir,
        max_layer_bytes=200_000,
        **dependency_overrides,
    )
    return replace(server_settings(), dependencies=dependencies)


@pytest.fixture(scope="module")
def offline(
    wheels: Path, database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ServerThread, Path]]:
    """A server whose index is the folder of wheels: no network."""
    layer_dir = tmp_path_factory.mktemp("layers")
    running = ServerThread(offline_settings(wheels, layer_dir), database_url)
    yield running, layer_dir
    running.stop()


@pytest.fixture(scope="module")
def offline_client(offline: tuple[ServerThread, Path]) -> Iterator[LambdaClient]:
    with LambdaClient(offline[0].target, timeout=INSTALL_TIMEOUT) as client:
        yield client


TINY = "import lambda_tiny, lambda_tinier\nresult = lambda_tiny.hello() + str(lambda_tinier.X) + params['s']"


def installed(running: ServerThread) -> float:
    """lambda_layer_installs_total of a server, for Python."""
    value = running.server.metrics.registry.get_sample_value(
        "lambda_layer_installs_total", {"runtime": "python"}
    )
    return value or 0.0


def lock_of(layer: Path) -> str:
    """The lock a layer was installed from (LAYER_DIR/info/<layer id>.json)."""
    info: dict[str, Any] = json.loads((layer.parent.parent / "info" / f"{layer.name}.json").read_text())
    return str(info["lock"])


def layers_of(layer_dir: Path) -> list[Path]:
    return sorted((layer_dir / "layers").iterdir())


def test_a_local_folder_of_wheels_installs_a_package_and_its_dependency(
    offline_client: LambdaClient, wheels: Path
) -> None:
    """The mechanism without a network: find-links, no index; the lock holds both packages
    with the sha256 of the very wheel files, and the script imports them."""
    session = offline_client.initialize("python-tiny", TINY, dependencies=["lambda-tiny==1.0"])
    answer = offline_client.execute(session.request_id, {"s": "!"})
    assert not answer.HasField("error"), answer.error
    assert result(answer) == "tiny2!"
    batch = offline_client.execute_batch(session.request_id, [{"s": str(n)} for n in range(3)])
    assert [result(item) for item in batch] == ["tiny20", "tiny21", "tiny22"]
    stored = offline_client.get_session(session.request_id)
    assert list(stored.dependencies) == ["lambda-tiny==1.0"]
    locked = {package.name: package for package in stored.locked}
    assert sorted(locked) == ["lambda-tinier", "lambda-tiny"]
    for name, version in (("lambda-tiny", "1.0"), ("lambda-tinier", "2.0")):
        wheel = wheels / f"{name.replace('-', '_')}-{version}-py3-none-any.whl"
        assert locked[name].version == version
        assert locked[name].hash == "sha256:" + hashlib.sha256(wheel.read_bytes()).hexdigest()


def test_the_http_session_shows_the_dependencies_and_the_lock_as_get_session_does(
    offline_client: LambdaClient, offline: tuple[ServerThread, Path]
) -> None:
    session = offline_client.initialize("python-tiny", TINY, dependencies=["lambda-tiny==1.0"])
    answer = http(offline[0], "GET", f"/api/v1/sessions/{session.request_id}")
    assert answer.status == 200, answer.body
    body = answer.json()
    stored = offline_client.get_session(session.request_id)
    assert body["dependencies"] == list(stored.dependencies) == ["lambda-tiny==1.0"]
    assert body["locked"] == [{"name": p.name, "version": p.version, "hash": p.hash} for p in stored.locked]
    assert len(body["locked"]) == 2
    plain = offline_client.initialize("python-tiny", "result = 1")
    body = http(offline[0], "GET", f"/api/v1/sessions/{plain.request_id}").json()
    assert body["dependencies"] == [] and body["locked"] == []


def test_a_script_reaches_its_own_layer_and_cannot_list_the_others(
    offline_client: LambdaClient, offline: tuple[ServerThread, Path]
) -> None:
    """The layers folder is searchable, not readable, by the environments' uids (0711): a
    script imports from its own layer, and listing the folder (to find other owners'
    packages) is refused."""
    script = (
        "import os, lambda_tiny\n"
        "folder = os.path.dirname(os.path.dirname(os.path.dirname(lambda_tiny.__file__)))\n"
        "try:\n"
        "    listed = len(os.listdir(folder))\n"
        "except PermissionError:\n"
        "    listed = 'refused'\n"
        "result = [os.path.basename(folder), listed]"
    )
    session = offline_client.initialize("python-listing", script, dependencies=["lambda-tiny==1.0"])
    answer = offline_client.execute(session.request_id, {})
    assert not answer.HasField("error"), answer.error
    assert result(answer) == ["layers", "refused"]
    assert (offline[1] / "layers").stat().st_mode & 0o777 == 0o711


def test_sessions_with_the_same_lock_share_one_layer_installed_once(
    offline_client: LambdaClient, offline: tuple[ServerThread, Path]
) -> None:
    layer_dir = offline[1]
    first = offline_client.initialize(
        "python-share-1", "import lambda_other\nresult = lambda_other.Y", dependencies=["lambda-other"]
    )
    (layer,) = [p for p in layers_of(layer_dir) if "lambda-other" in lock_of(p)]
    before = layer.stat()
    assert [entry.name for entry in layer.iterdir()] == ["site-packages"], "environments see packages only"
    installs = installed(offline[0])
    second = offline_client.initialize(
        "python-share-2",
        "import lambda_other\nresult = lambda_other.Y * 2",
        dependencies=["lambda_other==1.0"],
    )
    for session, expected in ((first, 3), (second, 6)):
        answer = offline_client.execute(session.request_id, {})
        assert not answer.HasField("error"), answer.error
        assert result(answer) == expected
    after = layer.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns), "installed again"
    same = [p for p in layers_of(layer_dir) if "lambda-other" in lock_of(p)]
    assert same == [layer]
    assert installed(offline[0]) == installs


def test_a_retry_is_the_same_session_and_other_dependencies_conflict(offline_client: LambdaClient) -> None:
    request_id = str(uuid.uuid4())
    first = offline_client.initialize(
        "python-retry", "result = 1", request_id=request_id, dependencies=["lambda-ver==1.0"]
    )
    again = offline_client.initialize(
        "python-retry", "result = 1", request_id=request_id, dependencies=["lambda-ver==1.0"]
    )
    assert again.request_id == first.request_id == request_id
    with pytest.raises(AlreadyExistsError) as conflict:
        offline_client.initialize(
            "python-retry", "result = 1", request_id=request_id, dependencies=["lambda-ver==2.0"]
        )
    assert conflict.value.reason == "SESSION_CONFLICT"


def test_the_result_cache_tells_the_layers_of_one_script_apart(offline_client: LambdaClient) -> None:
    script = "import lambda_ver\nresult = lambda_ver.V"
    answers = []
    for version in ("1.0", "2.0"):
        session = offline_client.initialize("python-ver", script, dependencies=[f"lambda-ver=={version}"])
        answer = offline_client.execute(session.request_id, {}, cache_control="max-age=60")
        answers.append((result(answer), answer.cached))
    assert answers == [("1.0", False), ("2.0", False)]


def test_concurrent_initializes_of_a_new_lock_install_it_once(
    offline_client: LambdaClient, offline: tuple[ServerThread, Path]
) -> None:
    installs = installed(offline[0])
    script = "import lambda_together\nresult = lambda_together.T + str({})"
    with ThreadPoolExecutor(4) as pool:
        sessions = list(
            pool.map(
                lambda n: offline_client.initialize(
                    "python-together", script.format(n), dependencies=["lambda-together==1.0"]
                ),
                range(4),
            )
        )
    assert installed(offline[0]) == installs + 1
    assert [result(offline_client.execute(s.request_id, {})) for s in sessions] == ["t0", "t1", "t2", "t3"]


def test_an_unknown_package_is_unresolvable_with_its_requirement(offline_client: LambdaClient) -> None:
    with pytest.raises(DependencyUnresolvableError) as refused:
        offline_client.initialize(
            "python-nope", "result = 1", dependencies=["lambda-tiny", "no-such-package-xyz>=1"]
        )
    assert refused.value.reason == "DEPENDENCY_UNRESOLVABLE"
    assert refused.value.metadata["requirement"] == "no-such-package-xyz>=1"
    assert "no-such-package-xyz" in refused.value.message


def test_an_index_that_takes_the_connection_and_never_answers_is_unavailable(
    database_url: str, tmp_path: Path
) -> None:
    """A firewall that drops, a proxy that hangs: the index is away, so UNAVAILABLE (a retry is
    safe) naming PYTHON_PACKAGE_INDEX after PACKAGE_INDEX_TIMEOUT_SECONDS, not
    DEPENDENCY_LIMIT_EXCEEDED after the install's bound; the owner's slot is free again."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)  # connections complete, and no answer ever comes
    port = silent.getsockname()[1]
    dependencies = DependencySettings(
        python_package_index=f"http://127.0.0.1:{port}/simple",
        layer_dir=tmp_path,
        package_index_timeout_seconds=1,
        install_timeout_seconds=40.0,  # past uv's own 30 s a read: what answered before
    )
    running = ServerThread(replace(server_settings(), dependencies=dependencies), database_url)
    try:
        with once_client(running.target, INSTALL_TIMEOUT) as client:
            for _ in range(2):  # the first freed the owner's one slot
                with pytest.raises(PackageIndexUnavailableError) as refused:
                    client.initialize("python-silent", "result = 1", dependencies=["attrs==23.2.0"])
                assert refused.value.metadata["setting"] == "PYTHON_PACKAGE_INDEX"
                assert "PACKAGE_INDEX_TIMEOUT_SECONDS" in refused.value.message
            session = client.initialize("python-silent", "result = 2")  # the server goes on
            assert result(client.execute(session.request_id, {})) == 2
    finally:
        running.stop()
        silent.close()


def test_a_layer_past_max_layer_bytes_is_refused_and_removed(
    offline_client: LambdaClient, offline: tuple[ServerThread, Path]
) -> None:
    with pytest.raises(DependencyLimitExceededError) as refused:
        offline_client.initialize("python-large", "result = 1", dependencies=["lambda-large"])
    assert refused.value.metadata["setting"] == "MAX_LAYER_BYTES"
    assert "MAX_LAYER_BYTES" in refused.value.message  # by its wheel's size: never installed
    layer_dir = offline[1]
    assert not any("lambda-large" in lock_of(p) for p in layers_of(layer_dir))
    assert not list((layer_dir / "staging").glob("*-*")), "the partial install is removed"
    # the server goes on installing others
    session = offline_client.initialize("python-after-large", TINY, dependencies=["lambda-tiny"])
    assert result(offline_client.execute(session.request_id, {"s": ""})) == "tiny2"


def test_a_hostile_package_runs_none_of_its_code_at_install(
    offline_client: LambdaClient, marker_dir: Path
) -> None:
    """An sdist-only package is refused (no wheel: its setup.py never runs); a wheel's module
    and `.pth` file run nothing when installed, nor when a script that does not import it runs."""
    with pytest.raises(DependencyUnresolvableError) as refused:
        offline_client.initialize("python-sdist", "result = 1", dependencies=["lambda-sdist-only"])
    assert "lambda-sdist-only" in refused.value.message
    session = offline_client.initialize("python-hostile", "result = 'fine'", dependencies=["lambda-hostile"])
    assert result(offline_client.execute(session.request_id, {})) == "fine"
    assert not list(marker_dir.iterdir()), "package code ran on the host"


def test_a_package_shadows_no_module_of_the_standard_library(offline_client: LambdaClient) -> None:
    script = (
        "import colorsys, json, lambda_shadow\n"
        "result = [hasattr(colorsys, 'SHADOWED'), hasattr(colorsys, 'rgb_to_hsv'), "
        "hasattr(json, 'SHADOWED'), json.dumps(lambda_shadow.S)]"
    )
    session = offline_client.initialize("python-shadow", script, dependencies=["lambda-shadow"])
    answer = offline_client.execute(session.request_id, {})
    assert not answer.HasField("error"), answer.error
    assert result(answer) == [False, True, False, '"s"']


def test_a_layer_removed_behind_the_servers_back_is_installed_again(
    offline_client: LambdaClient, offline: tuple[ServerThread, Path]
) -> None:
    """The server knows the layer installed; its folder goes (another server's sweep, by
    hand): the next Execute installs it again from the session's stored lock."""
    running, layer_dir = offline
    script = "import lambda_vanishing\nresult = lambda_vanishing.V + params['s']"
    session = offline_client.initialize("python-vanishing", script, dependencies=["lambda-vanishing"])
    (layer,) = [p for p in layers_of(layer_dir) if "lambda-vanishing" in lock_of(p)]
    before = installed(running)
    layer.rename(layer_dir / "staging" / f".gone-by-hand-{layer.name}")
    answer = offline_client.execute(session.request_id, {"s": "!"})
    assert not answer.HasField("error"), answer.error
    assert result(answer) == "v!"
    assert layer.is_dir()
    assert installed(running) == before + 1


def test_malformed_requirements_and_rust_are_invalid(offline_client: LambdaClient) -> None:
    for bad in ("not a requirement!!", "pkg @ https://example.invalid/pkg.whl", " ", "x" * 600):
        with pytest.raises(InvalidArgumentError) as refused:  # which one of the list, for a program
            offline_client.initialize("python-bad", "result = 1", dependencies=["lambda-tiny", bad])
        assert refused.value.reason == "INVALID_REQUEST"
        assert refused.value.metadata["field"] == "dependencies"
        assert refused.value.metadata["requirement"] == bad[:256], bad
    with pytest.raises(InvalidArgumentError) as blank:
        offline_client.initialize("python-bad", "result = 1", dependencies=["   "])
    assert "empty" in blank.value.message and "characters" not in blank.value.message
    rust = "pub fn handler(event: serde_json::Value) -> Result<serde_json::Value, String> { Ok(event) }"
    with pytest.raises(LambdaError) as crates:  # before anything is compiled
        offline_client.initialize("rust-deps", rust, dependencies=["serde"])
    if crates.value.reason != "RUNTIME_NOT_AVAILABLE":  # a machine without rustc
        assert crates.value.reason == "INVALID_REQUEST"
        assert crates.value.metadata["field"] == "dependencies"
        assert "crates Health lists" in crates.value.message
    with pytest.raises(DependencyLimitExceededError) as many:
        offline_client.initialize("python-many", "result = 1", dependencies=[f"p{i}" for i in range(33)])
    assert many.value.metadata["setting"] == "MAX_DEPENDENCIES"


def test_a_layer_installed_by_one_replica_is_installed_by_another_from_the_stored_lock(
    offline_client: LambdaClient, wheels: Path, database_url: str, tmp_path: Path
) -> None:
    session = offline_client.initialize("python-replica", TINY, dependencies=["lambda-tiny"])
    other = ServerThread(offline_settings(wheels, tmp_path), database_url)
    try:
        with LambdaClient(other.target, timeout=INSTALL_TIMEOUT) as client:
            assert not (tmp_path / "layers").exists() or not layers_of(tmp_path)
            answer = client.execute(session.request_id, {"s": "?"})
            assert not answer.HasField("error"), answer.error
            assert result(answer) == "tiny2?"
            (layer,) = layers_of(tmp_path)
            assert "lambda-tiny" in lock_of(layer)
    finally:
        other.stop()


def test_a_replica_that_cannot_install_the_layer_answers_not_started(
    offline_client: LambdaClient, database_url: str, tmp_path: Path
) -> None:
    """The wheels the lock names are gone before another replica installs it: that Execute
    ran nothing (UNAVAILABLE, NOT_STARTED, a retry is safe), and the first replica still runs."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    wheel = build_wheel(wheels, "lambda-vanishing", "1.0", {"lambda_vanishing.py": "V = 'here'\n"})
    first_settings = offline_settings(wheels, tmp_path / "first")
    first = ServerThread(first_settings, database_url)
    second = ServerThread(offline_settings(wheels, tmp_path / "second"), database_url)
    try:
        with (
            LambdaClient(first.target, timeout=INSTALL_TIMEOUT) as one,
            LambdaClient(second.target, timeout=10) as two,
        ):
            session = one.initialize(
                "python-vanishing",
                "import lambda_vanishing\nresult = lambda_vanishing.V",
                dependencies=["lambda-vanishing"],
            )
            wheel.unlink()
            with pytest.raises(NotStartedError) as refused:
                two.execute(session.request_id, {})
            assert "could not be installed" in refused.value.message
            assert result(one.execute(session.request_id, {})) == "here"
    finally:
        second.stop()
        first.stop()


def test_the_allowlist_covers_every_package_of_the_lock(
    wheels: Path, database_url: str, tmp_path: Path
) -> None:
    settings = offline_settings(
        wheels, tmp_path, mode="allowlist", allowlist=frozenset({"lambda-tiny", "lambda-other"})
    )
    running = ServerThread(settings, database_url)
    try:
        with LambdaClient(running.target, timeout=INSTALL_TIMEOUT) as client:
            with pytest.raises(DependencyNotAllowedError) as named:
                client.initialize("python-listed", "result = 1", dependencies=["lambda-large"])
            assert named.value.metadata == {"setting": "DEPENDENCY_ALLOWLIST", "requirement": "lambda-large"}
            with pytest.raises(DependencyNotAllowedError) as pulled:  # lambda-tinier comes with it
                client.initialize("python-listed", "result = 1", dependencies=["lambda-tiny"])
            assert pulled.value.metadata["requirement"] == "lambda-tinier"
            session = client.initialize(
                "python-listed", "import lambda_other\nresult = lambda_other.Y", dependencies=["Lambda_Other"]
            )
            assert result(client.execute(session.request_id, {})) == 3
            health = {check.name: check for check in client.health().checks}["dependencies"]
            assert health.detail.startswith("ok (DEPENDENCIES=allowlist, 2 packages allowed; ")
            assert "python: uv " in health.detail
            assert health.counts["allowed"] == 2
    finally:
        running.stop()


def test_dependencies_off_refuses_new_sessions_and_lets_existing_ones_run_until_stopped(
    offline_client: LambdaClient, wheels: Path, database_url: str, tmp_path: Path
) -> None:
    """The policy is applied when a session is made (README "Policy"): a server with
    DEPENDENCIES=off refuses new Initializes with dependencies, and runs a session locked
    before (installing its layer from the stored lock) until the operator's statement the
    README gives expires it."""
    session = offline_client.initialize(
        "python-before-off", "import lambda_other\nresult = lambda_other.Y", dependencies=["lambda-other"]
    )
    off = ServerThread(offline_settings(wheels, tmp_path, mode="off"), database_url)
    try:
        with LambdaClient(off.target, timeout=INSTALL_TIMEOUT) as client:
            with pytest.raises(DependencyNotAllowedError) as refused:
                client.initialize("python-after-off", "result = 1", dependencies=["lambda-other"])
            assert refused.value.metadata["setting"] == "DEPENDENCIES"
            assert result(client.execute(session.request_id, {})) == 3
            run_sync(stop_sessions_with_dependencies(database_url, session.request_id))

            def stopped() -> bool:  # seen within SESSION_CACHE_SECONDS
                try:
                    client.execute(session.request_id, {})
                except SessionExpiredError:
                    return True
                return False

            eventually(stopped, timeout=30)
    finally:
        off.stop()


async def stop_sessions_with_dependencies(url: str, request_id: str) -> None:
    """README "Policy"'s statement, narrowed to this test's session (the suite's database is shared)."""
    conn = await asyncpg.connect(url, timeout=10)
    try:
        await conn.execute(
            "UPDATE meta.sessions SET status = 'expired' "
            "WHERE dependencies IS NOT NULL AND status = 'active' AND request_id = $1",
            uuid.UUID(request_id),
        )
    finally:
        await conn.close()


def test_an_owner_past_its_layer_bytes_is_refused(wheels: Path, fresh_database: str, tmp_path: Path) -> None:
    """MAX_LAYER_BYTES_PER_OWNER counts each distinct layer once: a second session on the same
    layer is free, another layer that would pass it is QUOTA_EXCEEDED naming the setting."""
    settings = offline_settings(wheels, tmp_path, max_layer_bytes_per_owner=40_000)
    running = ServerThread(settings, fresh_database)
    try:
        with LambdaClient(running.target, timeout=INSTALL_TIMEOUT) as client:
            client.initialize("python-qa", "result = 1", dependencies=["lambda-quota-a"])
            client.initialize("python-qa2", "result = 2", dependencies=["lambda-quota-a"])
            with pytest.raises(QuotaExceededError) as refused:
                client.initialize("python-qb", "result = 3", dependencies=["lambda-quota-b"])
            assert refused.value.metadata["setting"] == "MAX_LAYER_BYTES_PER_OWNER"
            # refused by the wheels' sizes in the lock, before anything was downloaded
            assert not any("lambda-quota-b" in lock_of(layer) for layer in layers_of(tmp_path))
            session = client.initialize(
                "python-qa3",
                "import lambda_quota_a\nresult = len(lambda_quota_a.PAD)",
                dependencies=["lambda-quota-a"],
            )
            assert result(client.execute(session.request_id, {})) == 25_000
            assert "with this layer's" in refused.value.message, refused.value.message
    finally:
        running.stop()
    # the limit lowered under what the owner's sessions use: any layer, even one of 0 bytes
    # more, is refused, and the message says the owner is over already
    lowered = ServerThread(
        offline_settings(wheels, tmp_path, max_layer_bytes_per_owner=10_000), fresh_database
    )
    try:
        with LambdaClient(lowered.target, timeout=INSTALL_TIMEOUT) as client:
            with pytest.raises(QuotaExceededError) as over:
                client.initialize("python-qo", "result = 4", dependencies=["lambda-other"])
            assert over.value.metadata["setting"] == "MAX_LAYER_BYTES_PER_OWNER"
            assert "already use 1 other layer of " in over.value.message, over.value.message
            assert " more would pass" not in over.value.message
    finally:
        lowered.stop()


def test_new_layers_on_two_replicas_at_once_cannot_pass_the_owners_layer_bytes_together(
    wheels: Path, fresh_database: str, tmp_path: Path
) -> None:
    """Two Initializes of one owner, each with a new layer that fits alone, on two replicas,
    both past Initialize's own checks and waiting on the owner's lock (held here): the
    store counts the layers under that lock, so exactly one is stored, the other is
    QUOTA_EXCEEDED naming the setting, and the owner's sessions stay within it."""
    settings = offline_settings(wheels, tmp_path, max_layer_bytes_per_owner=40_000)
    replicas = [ServerThread(settings, fresh_database) for _ in range(2)]
    owner = "address:127.0.0.1"  # AUTH_MODE=none: the caller's address

    def initialize(which: int) -> str:
        with LambdaClient(replicas[which].target, timeout=INSTALL_TIMEOUT) as client:
            package = ("lambda-quota-a", "lambda-quota-b")[which]
            try:
                client.initialize(f"python-q{which}", "result = 1", dependencies=[package])
            except QuotaExceededError as refused:
                assert refused.metadata["setting"] == "MAX_LAYER_BYTES_PER_OWNER"
                return "refused"
            return "stored"

    async def race() -> tuple[list[str], int]:
        """Both Initializes while the owner's lock is held here, then the lock let go."""
        conn = await asyncpg.connect(fresh_database)
        try:
            await conn.execute("SELECT pg_advisory_lock($1, hashtext($2))", OWNER_LOCK_CLASS, owner)
            loop = asyncio.get_running_loop()
            with ThreadPoolExecutor(2) as pool:
                calls = [loop.run_in_executor(pool, initialize, which) for which in range(2)]
                waiting = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
                async with asyncio.timeout(INSTALL_TIMEOUT):  # both past Initialize's own checks
                    for _ in itertools.count():
                        if await conn.fetchval(waiting) == 2:
                            break
                        await asyncio.sleep(0.05)
                await conn.execute("SELECT pg_advisory_unlock($1, hashtext($2))", OWNER_LOCK_CLASS, owner)
                outcomes = sorted(await asyncio.gather(*calls))
            layers = await conn.fetchval(
                "SELECT count(DISTINCT dependencies->>'layer_id') FROM meta.sessions"
                " WHERE owner = $1 AND dependencies IS NOT NULL",
                owner,
            )
            return outcomes, int(layers)
        finally:
            await conn.close()

    try:
        assert run_sync(race()) == (["refused", "stored"], 1)
    finally:
        for running in replicas:
            running.stop()


@pytest.mark.timeout(2 * INSTALL_TIMEOUT)
def test_a_real_package_from_the_index_with_a_dependency_of_its_own(
    database_url: str, tmp_path: Path
) -> None:
    """The one test that reaches the index (PyPI): a small pure package and its dependency."""
    settings = replace(server_settings(), dependencies=DependencySettings(layer_dir=tmp_path))
    running = ServerThread(settings, database_url)
    try:
        with RegistryClient(running.target, timeout=INSTALL_TIMEOUT) as client:
            script = "from slugify import slugify\nresult = slugify(params['text'])"
            session = client.initialize("python-slugify", script, dependencies=["python-slugify==8.0.4"])
            answer = client.execute(session.request_id, {"text": "Hello, Wörld!"})
            assert not answer.HasField("error"), answer.error
            assert result(answer) == "hello-world"
            stored = client.get_session(session.request_id)
            assert [(p.name, p.version) for p in stored.locked] == [
                ("python-slugify", "8.0.4"),
                ("text-unidecode", "1.3"),
            ]
            for package in stored.locked:
                assert package.hash.startswith("sha256:") and len(package.hash) == len("sha256:") + 64
    finally:
        running.stop()


def test_layers_no_unexpired_session_uses_are_collected(
    wheels: Path, fresh_database: str, tmp_path: Path
) -> None:
    """As Rust programs are: the folder (each server's sweep) and the meta.layers row (the
    cleanup), past LAYER_RETENTION_SECONDS (0 here); a layer a live session uses stays."""
    settings = replace(
        offline_settings(wheels, tmp_path, layer_retention_seconds=0.0), cleanup_interval_seconds=0.2
    )
    running = ServerThread(settings, fresh_database)
    try:
        with LambdaClient(running.target, timeout=INSTALL_TIMEOUT) as client:
            gone = client.initialize("python-gone", "result = 1", dependencies=["lambda-tiny"])
            kept = client.initialize(
                "python-kept", "import lambda_other\nresult = lambda_other.Y", dependencies=["lambda-other"]
            )
            layer_ids = {
                session.request_id: client.get_session(session.request_id) for session in (gone, kept)
            }
            assert all(stored.locked for stored in layer_ids.values())
            run_sync(expire(fresh_database, gone.request_id))

            def collected() -> bool:
                names = [lock_of(p) for p in layers_of(tmp_path)]
                return len(names) == 1 and "lambda-other" in names[0] and rows(fresh_database) == 1

            eventually(collected, timeout=30)
            assert result(client.execute(kept.request_id, {})) == 3
    finally:
        running.stop()


async def expire(url: str, request_id: str) -> None:
    conn = await asyncpg.connect(url, timeout=10)
    try:
        await conn.execute(
            "UPDATE meta.sessions SET expires_at = now() - interval '1 second' WHERE request_id = $1",
            uuid.UUID(request_id),
        )
    finally:
        await conn.close()


def rows(url: str) -> int:
    async def count() -> int:
        conn = await asyncpg.connect(url, timeout=10)
        try:
            return int(await conn.fetchval("SELECT count(*) FROM meta.layers"))
        finally:
            await conn.close()

    return run_sync(count())
