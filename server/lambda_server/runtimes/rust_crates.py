"""The crates every Rust script may use: a curated set from Debian's packaged registry.

They are built once per toolchain and registry by cargo, offline, into a folder
of their own (RustCompiler), and every compile gets each of them with --extern,
so a script names them as it would in a cargo project (`use regex::Regex;`,
`#[derive(Deserialize)]` through serde's `derive` feature). A crate whose sources
are not on the machine, or do not resolve there, is left out, and the others are
built all the same; Health says which were left out and why. serde_json is the
one the worker itself needs: without it there is no Rust runtime.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

# what RustCompiler writes beside the built crates: the set, read back by a later server
MANIFEST = "crates.json"
REQUIRED = "serde_json"  # the worker's own


@dataclass(frozen=True)
class Crate:
    """One crate of the set: how the dependencies project asks for it, and its Debian package."""

    name: str  # the crate's name, as a script writes it (`use name::...`)
    requirement: str  # its value in the project's [dependencies]
    debian: str  # the package with its sources in /usr/share/cargo/registry


# The set. Features that need the network or a time zone database at build time are
# off (chrono's defaults pull the old `time` 0.1, which Debian does not package).
CURATED = (
    Crate("serde", '{ version = "1", features = ["derive"] }', "librust-serde-dev"),
    Crate("serde_derive", '"1"', "librust-serde-derive-dev"),
    Crate("serde_json", '"1"', "librust-serde-json-dev"),
    Crate("regex", '"1"', "librust-regex-dev"),
    Crate(
        "chrono",
        '{ version = "0.4", default-features = false, features = ["std", "clock", "serde"] }',
        "librust-chrono-dev",
    ),
    Crate("rand", '{ version = "0.8", features = ["std", "std_rng", "small_rng"] }', "librust-rand-dev"),
    Crate("itertools", '"0.10"', "librust-itertools-dev"),
    Crate("once_cell", '"1"', "librust-once-cell-dev"),
    Crate("lazy_static", '"1"', "librust-lazy-static-dev"),
    Crate("base64", '"0.13"', "librust-base64-dev"),
    Crate("hex", '"0.4"', "librust-hex-dev"),
    Crate("sha2", '"0.10"', "librust-sha2-dev"),
    Crate("uuid", '{ version = "1", features = ["v4", "serde"] }', "librust-uuid-dev"),
)
BY_NAME = {crate.name: crate for crate in CURATED}


@dataclass(frozen=True)
class BuiltCrate:
    name: str
    version: str
    file: str  # its library's file name in the built folder (an rlib; a .so for a proc-macro)


@dataclass(frozen=True)
class CrateSet:
    """The built crates of one toolchain: their folder (given to rustc with -Ldependency,
    which also holds their own dependencies), each crate's library, and those left out."""

    folder: Path
    crates: tuple[BuiltCrate, ...]
    left_out: tuple[tuple[str, str], ...] = ()  # (name, why)

    @property
    def packages(self) -> tuple[str, ...]:
        """`name version` of each crate a script may use, in the set's order."""
        return tuple(f"{crate.name} {crate.version}" for crate in self.crates)

    def extern_arguments(self) -> list[str]:
        return [f"--extern={crate.name}={self.folder / crate.file}" for crate in self.crates]

    def describe_left_out(self) -> str:
        return "; ".join(f"{name} left out: {why}" for name, why in self.left_out)


def registry_listing(registry: Path) -> list[str]:
    """The registry's crate folders (`name-version`), sorted."""
    try:
        return sorted(entry.name for entry in os.scandir(registry) if entry.is_dir())
    except OSError:
        return []


def set_identity(toolchain_version: str, registry: Path) -> str:
    """A short stable name of what the build makes: the toolchain, the set, and the registry's
    crates (another Debian package installed or upgraded is another build)."""
    text = "\n".join([toolchain_version, manifest(CURATED), *registry_listing(registry)])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def present(registry: Path) -> tuple[list[Crate], list[tuple[str, str]]]:
    """The crates whose sources are in the registry, and those left out with why."""
    names = {_crate_of(folder) for folder in registry_listing(registry)}
    found = [crate for crate in CURATED if crate.name in names]
    missing = [
        (crate.name, f"no sources in {registry} (Debian: {crate.debian})")
        for crate in CURATED
        if crate.name not in names
    ]
    return found, missing


def _crate_of(folder: str) -> str:
    """`serde_json-1.0.87` -> `serde_json`."""
    match = re.match(r"^(.+?)-\d", folder)
    return match.group(1) if match else folder


def manifest(crates: Iterable[Crate]) -> str:
    """The dependencies project's Cargo.toml."""
    lines = [f"{crate.name} = {crate.requirement}" for crate in crates]
    return (
        '[package]\nname = "lambda-rust-dependencies"\nversion = "0.0.0"\nedition = "2021"\n\n'
        "[dependencies]\n" + "\n".join(lines) + "\n"
    )


def write_project(work: Path, registry: str, crates: Iterable[Crate]) -> None:
    """The dependencies project in `work`, asking for `crates`, its cargo home pointing at the
    registry (offline); rewritten for each resolution tried."""
    (work / "src").mkdir(exist_ok=True)
    (work / "src" / "lib.rs").write_text("")
    (work / "Cargo.toml").write_text(manifest(crates))
    (work / "Cargo.lock").unlink(missing_ok=True)
    home = work / "cargo-home"
    home.mkdir(exist_ok=True)
    (home / "config.toml").write_text(
        '[source.crates-io]\nreplace-with = "packaged"\n\n'
        f'[source.packaged]\ndirectory = "{registry}"\n\n[net]\noffline = true\n'
    )


def first_error(stderr: bytes) -> str:
    """cargo's error, for Health: its first line, and the last of its causes (the root)."""
    lines = [line.strip() for line in stderr.decode(errors="replace").splitlines()]
    errors = [line.removeprefix("error:").strip() for line in lines if line.startswith("error")]
    causes = [line for before, line in zip(lines, lines[1:], strict=False) if before == "Caused by:"]
    text = errors[0] if errors else "cargo failed"
    if causes:
        text = f"{text}: {causes[-1]}"
    return text[:400]


def built_from_messages(stdout: bytes, crates: Iterable[Crate]) -> dict[str, tuple[str, str]]:
    """From cargo's JSON messages, each asked-for crate's (version, library file name).

    A crate built twice (for the build's own proc-macros and for the target, with other
    features) has two artifacts: the one with the most features is the target's superset.
    """
    wanted = {crate.name for crate in crates}
    found: dict[str, tuple[int, str, str]] = {}
    for line in stdout.decode(errors="replace").splitlines():
        try:
            message = json.loads(line)
        except ValueError:
            continue
        if not isinstance(message, dict) or message.get("reason") != "compiler-artifact":
            continue
        target = message.get("target") or {}
        name = target.get("name")
        kinds = target.get("kind") or []
        if name not in wanted or not ({"lib", "rlib", "proc-macro"} & set(kinds)):
            continue
        files = [Path(f).name for f in message.get("filenames") or [] if f.endswith((".rlib", ".so"))]
        if not files:
            continue
        # the registry's folder is `name-version`
        folder = Path(str(message.get("manifest_path", ""))).parent.name
        version = folder[len(name) + 1 :] if folder.startswith(f"{name}-") else "?"
        features = len(message.get("features") or [])
        if name not in found or features > found[name][0]:
            found[name] = (features, version, files[0])
    return {name: (version, file) for name, (_, version, file) in found.items()}


def save(folder: Path, built: dict[str, tuple[str, str]], left_out: list[tuple[str, str]]) -> None:
    order = [crate.name for crate in CURATED if crate.name in built]
    data = {
        "crates": [{"name": n, "version": built[n][0], "file": built[n][1]} for n in order],
        "left_out": [{"name": name, "why": why} for name, why in left_out],
    }
    (folder / MANIFEST).write_text(json.dumps(data, indent=1))


def load(folder: Path) -> CrateSet:
    """The set built into `folder`, at its real path (a symlink's target would not be in the
    jail); ValueError when its manifest is missing or names a library that is not there."""
    real = Path(os.path.realpath(folder))
    try:
        data = json.loads((real / MANIFEST).read_text())
        crates = tuple(BuiltCrate(c["name"], c["version"], c["file"]) for c in data["crates"])
        left_out = tuple((c["name"], c["why"]) for c in data["left_out"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{real / MANIFEST}: {exc}") from None
    for crate in crates:
        if not (real / crate.file).is_file():
            raise ValueError(f"{crate.name}'s library {crate.file} is not in {real}")
    if REQUIRED not in {crate.name for crate in crates}:
        raise ValueError(f"{REQUIRED} is not in {real}")
    return CrateSet(real, crates, left_out)
