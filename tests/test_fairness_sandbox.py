"""Issue 14, findings 8 and 9: a uid range per server, and a seccomp filter on every
runtime and compiler process.

Every server here draws from uids 400000 on (not the default 100000, which other
test runs on this machine may use) with a lock folder of this module's own.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import jwt
import pytest
import yaml

from lambda_microservice import LambdaClient, to_python
from lambda_server.config import AuthSettings, SandboxSettings, Settings
from lambda_server.sandbox import Sandbox, SandboxUnavailable
from tests.support import ROOT, ServerThread, eventually, server_settings
from tests.test_sandbox import as_root

SECRET = "a-test-secret-of-at-least-32-bytes!!"
UID_BASE = 400000
# The sandboxes these tests start on folders of their own: uids apart from the servers'
# above, whose environments a sandbox claiming their range would take for orphans.
SOLO_UID_BASE = 500000
CAP = 8  # the sessions' max_processes: RLIMIT_NPROC, which the kernel counts per uid host-wide

# Each attempt with arguments the kernel itself would refuse with another errno
# (EFAULT, EBADF, EINVAL, ...) where it can: only the filter answers EPERM,
# ENOSYS or EAFNOSUPPORT to every one of them.
PYTHON_ATTACK = """
import ctypes, errno, os, socket, subprocess, threading
NR = {
    "x86_64": dict(unshare=272, clone=56, clone3=435, setns=308, io_uring_setup=425, keyctl=250,
                   bpf=321, perf_event_open=298, ptrace=101, mount=165, userfaultfd=323),
    "aarch64": dict(unshare=97, clone=220, clone3=435, setns=268, io_uring_setup=425, keyctl=219,
                    bpf=280, perf_event_open=241, ptrace=117, mount=40, userfaultfd=282),
}[os.uname().machine]
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long

def call(name, *args):
    got = libc.syscall(ctypes.c_long(NR[name]), *(ctypes.c_ulong(a & (2**64 - 1)) for a in args))
    if got == 0 and name == "clone":  # the child of a clone that worked
        os._exit(0)
    if got > 0 and name == "clone":
        os.waitpid(got, 0)
    return "ok" if got >= 0 else errno.errorcode[ctypes.get_errno()]

def family(number, pair=False):
    try:
        kind = socket.SOCK_RAW if number in (16, 17) and not pair else socket.SOCK_STREAM
        (socket.socketpair if pair else socket.socket)(number, kind)
        return "ok"
    except OSError as exc:
        return errno.errorcode[exc.errno]

seen = []
threading.Thread(target=seen.append, args=("thread",)).start()
result = {
    "status": [l for l in open("/proc/self/status") if l.startswith("Seccomp:")][0],
    "unshare(NEWUSER)": call("unshare", 0x10000000),
    "clone(NEWUSER|NEWNET)": call("clone", 0x10000000 | 0x40000000 | 17, 0, 0, 0, 0),
    "clone3": call("clone3", 0, 0),
    "setns": call("setns", -1, 0x40000000),
    "io_uring_setup": call("io_uring_setup", 1, 0),
    "keyctl": call("keyctl", 0, -3, 0),
    "bpf": call("bpf", 0x7FFF, 0, 0),
    "perf_event_open": call("perf_event_open", 0, 0, -1, -1, 0),
    "ptrace": call("ptrace", 0x7FFF, 0, 0, 0),
    "mount": call("mount", 0, 0, 0, 0, 0),
    "userfaultfd": call("userfaultfd", 0xFFFF),
    "AF_VSOCK": family(40),
    "AF_NETLINK": family(16),
    "AF_PACKET": family(17),
    "socketpair(AF_NETLINK)": family(16, pair=True),
    "AF_INET": family(socket.AF_INET),
    "AF_INET6": family(socket.AF_INET6),
    "AF_UNIX": family(socket.AF_UNIX),
    "socketpair(AF_UNIX)": family(socket.AF_UNIX, pair=True),
    "subprocess": subprocess.run(["/bin/true"], check=False).returncode,
    "thread": seen,
}
"""
PYTHON_EXPECTED = {
    "status": "Seccomp:\t2\n",
    "unshare(NEWUSER)": "EPERM",
    "clone(NEWUSER|NEWNET)": "EPERM",
    "clone3": "ENOSYS",
    "setns": "EPERM",
    "io_uring_setup": "EPERM",
    "keyctl": "EPERM",
    "bpf": "EPERM",
    "perf_event_open": "EPERM",
    "ptrace": "EPERM",
    "mount": "EPERM",
    "userfaultfd": "EPERM",
    "AF_VSOCK": "EAFNOSUPPORT",
    "AF_NETLINK": "EAFNOSUPPORT",
    "AF_PACKET": "EAFNOSUPPORT",
    "socketpair(AF_NETLINK)": "EAFNOSUPPORT",
    "AF_INET": "ok",
    "AF_INET6": "ok",
    "AF_UNIX": "ok",
    "socketpair(AF_UNIX)": "ok",
    "subprocess": 0,
    "thread": ["thread"],
}

NODE_ATTACK = """
const fs = require('fs');
const { execFileSync, spawnSync } = require('child_process');
const { Worker } = require('worker_threads');
const status = fs.readFileSync('/proc/self/status', 'utf8')
  .split('\\n').find((l) => l.startsWith('Seccomp:'));
const fromWorker = await new Promise((resolve, reject) => {
  const worker = new Worker("require('worker_threads').parentPort.postMessage(6 * 7)", { eval: true });
  worker.on('message', resolve);
  worker.on('error', reject);
});
const unshare = spawnSync('/usr/bin/unshare', ['--user', '--net', '/bin/true']);
return {
  status,
  fromWorker,
  child: execFileSync('/bin/echo', ['child']).toString().trim(),
  unshareExit: unshare.status,
  unshareSays: unshare.stderr.toString().includes('Operation not permitted'),
};
"""

RUST_ATTACK = """use serde_json::Value;

extern "C" {
    fn unshare(flags: i32) -> i32;
}

// rustc's own status, read by rustc as it compiles this (the compiler is filtered too)
const RUSTC_STATUS: &str = include_str!("/proc/self/status");

pub fn handler(_event: Value) -> Result<Value, String> {
    let status = std::fs::read_to_string("/proc/self/status").map_err(|e| e.to_string())?;
    let seccomp = status.lines().find(|l| l.starts_with("Seccomp:")).unwrap_or("").to_string();
    let refused = unsafe { unshare(0x1000_0000) } != 0;  // CLONE_NEWUSER
    let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
    let thread = std::thread::spawn(|| 6 * 7).join().map_err(|_| "no thread")?;
    let child = std::process::Command::new("/bin/true").status().map_err(|e| e.to_string())?.success();
    Ok(serde_json::json!({
        "status": seccomp, "refused": refused, "errno": errno, "thread": thread, "child": child,
        "rustc": RUSTC_STATUS.lines().find(|l| l.starts_with("Seccomp:")).unwrap_or(""),
    }))
}
"""

SPAWN = """
import os, subprocess, time
procs = []
try:
    while len(procs) < params["n"]:
        procs.append(subprocess.Popen(["/bin/sleep", "30"]))
except OSError as exc:
    pass
time.sleep(params["hold"])
for p in procs:
    p.kill()
    p.wait()
result = {"uid": os.getuid(), "spawned": len(procs)}
"""


def token(sub: str) -> str:
    return jwt.encode({"sub": sub, "scope": "execute:all", "exp": 2**31 - 1}, SECRET, algorithm="HS256")


def settings(uid_dir: Path) -> Settings:
    auth = AuthSettings(mode="jwt", jwt_secret=SECRET, rate_limit_per_minute=0)
    base = server_settings(auth=auth)
    runtime = replace(base.runtime, prewarm_per_runtime=0, timeout_seconds=30.0)
    box = SandboxSettings(mode="strict", uid_dir=uid_dir, uid_base=UID_BASE)
    return replace(base, runtime=runtime, sandbox=box)


@pytest.fixture(scope="module")
def uid_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("uids")


@pytest.fixture(scope="module")
def servers(database_url: str, uid_dir: Path) -> Iterator[tuple[ServerThread, ServerThread]]:
    first = ServerThread(settings(uid_dir), database_url)
    try:
        second = ServerThread(settings(uid_dir), database_url)
    except BaseException:
        first.stop()
        raise
    yield first, second
    second.stop()
    first.stop()


def tenant(server: ServerThread, name: str) -> LambdaClient:
    return LambdaClient(server.target, timeout=120.0, metadata=(("authorization", f"Bearer {token(name)}"),))


# finding 9: the seccomp filter


@as_root
def test_health_lists_the_seccomp_layer_and_the_servers_uid_range(
    servers: tuple[ServerThread, ServerThread],
) -> None:
    texts = []
    for server in servers:
        with tenant(server, "alice") as client:
            texts.append(client.health().components["sandbox"])
    for text in texts:
        assert "seccomp" in text.split("; missing")[0] and "missing" not in text
    assert f"uid-per-environment({UID_BASE}-{UID_BASE + 999})" in texts[0]
    assert f"uid-per-environment({UID_BASE + 1000}-{UID_BASE + 1999})" in texts[1]


@as_root
def test_python_syscall_attacks_fail_while_another_tenants_calls_are_served(
    servers: tuple[ServerThread, ServerThread],
) -> None:
    server = servers[0]
    with tenant(server, "attacker") as attacker, tenant(server, "victim") as victim:
        attack = attacker.initialize("python-attack", PYTHON_ATTACK).request_id
        answer = victim.initialize("python-victim", "result = params['n'] + 1").request_id
        victim.execute(answer, {"n": 0})  # its environment is warm
        results: list[object] = []
        attacking = threading.Thread(
            target=lambda: results.extend(to_python(attacker.execute(attack).result) for _ in range(3))
        )
        attacking.start()
        served = [to_python(victim.execute(answer, {"n": n}).result) for n in range(5)]
        attacking.join(120)
    assert served == [1, 2, 3, 4, 5]
    assert len(results) == 3
    for result in results:
        assert result == PYTHON_EXPECTED


@as_root
def test_node_and_its_worker_threads_run_under_the_filter(servers: tuple[ServerThread, ServerThread]) -> None:
    with tenant(servers[0], "attacker") as client:
        session = client.initialize("nodejs-attack", NODE_ATTACK)
        response = client.execute(session.request_id)
    assert not response.HasField("error"), response.error
    assert to_python(response.result) == {
        "status": "Seccomp:\t2",
        "fromWorker": 42,
        "child": "child",
        "unshareExit": 1,
        "unshareSays": True,
    }


@as_root
def test_rust_compiles_and_runs_under_the_filter(servers: tuple[ServerThread, ServerThread]) -> None:
    with tenant(servers[0], "attacker") as client:
        if not client.health().components["runtime.rust"].startswith("ok"):
            pytest.fail(
                f"the Rust runtime is not available here: {client.health().components['runtime.rust']}"
            )
        # a program of its own each run (a comment), so that it is compiled, not found built
        script = f"// {uuid.uuid4()}\n{RUST_ATTACK}"
        session = client.initialize("rust-attack", script, timeout=180.0)
        response = client.execute(session.request_id, timeout=60.0)
    assert not response.HasField("error"), response.error
    assert to_python(response.result) == {
        "status": "Seccomp:\t2",
        "refused": True,
        "errno": 1,  # EPERM
        "thread": 42,
        "child": True,
        "rustc": "Seccomp:\t2",
    }


# finding 8: a uid range per server


def uid_tasks(uid: int) -> int:
    """Processes and threads of `uid` on this host: what RLIMIT_NPROC counts."""
    count = 0
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            lines = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
        except OSError:
            continue  # ended meanwhile
        if int(lines["Uid"].split()[0]) == uid:
            count += int(lines["Threads"])
    return count


@as_root
def test_a_tenant_at_its_process_cap_on_one_server_leaves_the_other_servers_tenants_theirs(
    servers: tuple[ServerThread, ServerThread],
) -> None:
    first, second = servers
    context = {"max_processes": CAP}
    with tenant(first, "attacker") as attacker, tenant(second, "victim") as victim:
        hog = attacker.initialize("python-spawn", SPAWN, context=context).request_id
        spawn = victim.initialize("python-spawn", SPAWN, context=context).request_id
        hog_uid = to_python(attacker.execute(hog, {"n": 0, "hold": 0}).result)["uid"]  # type: ignore[index]
        victim_uid = to_python(victim.execute(spawn, {"n": 0, "hold": 0}).result)["uid"]  # type: ignore[index]
        assert UID_BASE <= hog_uid < UID_BASE + 1000 <= victim_uid < UID_BASE + 2000
        outcome: list[object] = []
        hogging = threading.Thread(
            target=lambda: outcome.append(to_python(attacker.execute(hog, {"n": 100, "hold": 4}).result))
        )
        hogging.start()
        try:
            eventually(lambda: uid_tasks(hog_uid) >= CAP, timeout=20)
            during = to_python(victim.execute(spawn, {"n": 2, "hold": 0}).result)
        finally:
            hogging.join(60)
    assert during == {"uid": victim_uid, "spawned": 2}
    assert outcome and 0 < outcome[0]["spawned"] < CAP  # type: ignore[index]


@as_root
def test_sandboxes_sharing_a_uid_folder_claim_disjoint_ranges_until_closed(tmp_path: Path) -> None:
    # two ranges of 30000 in the 60000 sandbox uids
    box = SandboxSettings(
        mode="strict", uid_dir=tmp_path / "uids", uid_base=SOLO_UID_BASE, uid_range_size=30000
    )

    async def scenario() -> None:
        first = await Sandbox.start(box)
        second = await Sandbox.start(box)
        try:
            assert f"({SOLO_UID_BASE}-{SOLO_UID_BASE + 29999})" in first.describe()
            assert f"({SOLO_UID_BASE + 30000}-{SOLO_UID_BASE + 59999})" in second.describe()
            with pytest.raises(SandboxUnavailable, match="held by other servers"):
                await Sandbox.start(replace(box, mode="auto"))
            first.close()
            third = await Sandbox.start(box)  # the first one's range is free again
            assert f"({SOLO_UID_BASE}-{SOLO_UID_BASE + 29999})" in third.describe()
            third.close()
        finally:
            first.close()
            second.close()

    asyncio.run(scenario())


@as_root
def test_without_pyseccomp_strict_refuses_to_start_and_auto_warns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "pyseccomp", None)  # as if it were not installed
    box = SandboxSettings(mode="strict", uid_dir=tmp_path, uid_base=SOLO_UID_BASE, uid_range_size=30000)
    with pytest.raises(SandboxUnavailable, match="seccomp: pyseccomp or libseccomp is missing"):
        asyncio.run(Sandbox.start(box))
    with caplog.at_level(logging.WARNING):
        sandbox = asyncio.run(Sandbox.start(replace(box, mode="auto")))
    try:
        assert "seccomp" in sandbox.missing and "seccomp" not in sandbox.layers
        assert any("sandbox layer seccomp is not active" in r.message for r in caplog.records)
        # the refused start released its uid range: auto took the first one again
        assert f"({SOLO_UID_BASE}-{SOLO_UID_BASE + 29999})" in sandbox.describe()
    finally:
        sandbox.close()


@as_root
def test_a_sandbox_ends_the_frozen_orphans_a_dead_server_left_in_its_uid_range(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A server that died (SIGKILL, a crashed test run) leaves its environments behind, frozen
    # when idle: they never read their pipes' EOF, and their uids' RLIMIT_NPROC stays taken.
    freezer = Path("/sys/fs/cgroup/freezer")
    if not (freezer / "freezer.state").exists() and not (freezer / "tasks").exists():
        pytest.skip("no v1 freezer here")
    group = freezer / f"lambda-orphan-test-{uuid.uuid4().hex[:8]}"
    group.mkdir()
    orphan = subprocess.Popen(
        ["/bin/sleep", "300"], user=SOLO_UID_BASE + 5, group=SOLO_UID_BASE + 5, start_new_session=True
    )
    bystander = subprocess.Popen(["/bin/sleep", "300"], user=SOLO_UID_BASE + 1005)  # another range's
    try:
        (group / "cgroup.procs").write_text(str(orphan.pid))
        (group / "freezer.state").write_text("FROZEN")
        eventually(lambda: (group / "freezer.state").read_text().strip() == "FROZEN")
        box = SandboxSettings(mode="strict", uid_dir=tmp_path, uid_base=SOLO_UID_BASE, uid_range_size=1000)
        sandbox = asyncio.run(Sandbox.start(box))
        try:
            # ended by a signal, which only the sandbox sends here: SIGKILL, though once in the
            # full suite the thawed and killed sleep was reported dead of SIGSEGV (cause not found)
            assert orphan.wait(timeout=30) < 0
            assert "ended 1 processes of uids" in caplog.text
            assert bystander.poll() is None
        finally:
            sandbox.close()
    finally:
        for process in (orphan, bystander):
            process.kill()
            process.wait()
        group.rmdir()


def test_replicas_on_one_host_claim_their_uid_ranges_in_one_folder() -> None:
    folder = str(SandboxSettings().uid_dir)
    compose = yaml.safe_load((ROOT / "deploy" / "docker-compose.yml").read_text())
    servers = [service for service in compose["services"].values() if service.get("privileged")]
    assert len(servers) >= 2
    for server in servers:  # one named volume, the same for every server
        assert f"uids:{folder}" in server["volumes"] and "uids" in compose["volumes"]
    deployment = yaml.safe_load((ROOT / "deploy" / "k8s" / "deployment.yaml").read_text())
    pod = deployment["spec"]["template"]["spec"]
    (mount,) = [m for m in pod["containers"][0]["volumeMounts"] if m["mountPath"] == folder]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert volume["hostPath"]["path"] == folder  # the node's folder: every replica on it sees it
