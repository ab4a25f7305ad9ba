"""The layers' arrows run one way: api -> usecases -> store and runtimes -> sandbox.

Read from the source (each module's own imports), so that an import added against
the arrows fails here even where nothing imports it yet at run time.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.support import ROOT

PACKAGE = ROOT / "server" / "lambda_server"
WIRE = (
    "grpc",
    "grpc_health",
    "grpc_reflection",
    "grpc_status",
    "google.rpc",
    "lambda_microservice",
    "aiohttp",
)
SQL = ("asyncpg",)
# what each layer must not import (a module, or anything under it)
FORBIDDEN: dict[str, tuple[str, ...]] = {
    "lambda_server.domain": ("lambda_server",),
    "lambda_server.sandbox": (
        "lambda_server.runtimes",
        "lambda_server.store",
        "lambda_server.usecases",
        "lambda_server.api",
        "lambda_server.app",
        "lambda_server.lifecycle",
        *WIRE,
        *SQL,
    ),
    "lambda_server.runtimes": (
        "lambda_server.store",
        "lambda_server.usecases",
        "lambda_server.api",
        "lambda_server.app",
        "lambda_server.lifecycle",
        *WIRE,
        *SQL,
    ),
    "lambda_server.store": (
        "lambda_server.runtimes",
        "lambda_server.sandbox",
        "lambda_server.usecases",
        "lambda_server.api",
        "lambda_server.app",
        "lambda_server.lifecycle",
        *WIRE,
    ),
    "lambda_server.usecases": (
        "lambda_server.api",
        "lambda_server.app",
        "lambda_server.lifecycle",
        *WIRE,
        *SQL,
    ),
    "lambda_server.api": ("lambda_server.store", "lambda_server.runtimes", "lambda_server.sandbox", *SQL),
}
# the modules beside the layers (config, errors, auth, limits, metrics, ...) are leaves
# every layer may use: they import none of the layers
LEAF_FORBIDDEN = (
    "lambda_server.api",
    "lambda_server.usecases",
    "lambda_server.store",
    "lambda_server.runtimes",
    "lambda_server.sandbox",
    "lambda_server.app",
    "lambda_server.lifecycle",
    *WIRE,
    *SQL,
)
NOT_LEAVES = {"lambda_server.app", "lambda_server.lifecycle", "lambda_server.__main__"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every module `path` imports, by absolute name (a relative import resolved)."""
    tree = ast.parse(path.read_text(), str(path))
    package = module_name(path).rsplit(".", 0 if path.name == "__init__.py" else 1)[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import module`
    return found


def under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def rules(module: str) -> tuple[str, ...]:
    for layer, forbidden in FORBIDDEN.items():
        if under(module, layer):
            return forbidden
    if module.count(".") == 1 and module not in NOT_LEAVES:
        return LEAF_FORBIDDEN
    return ()


@pytest.mark.parametrize("module", sorted(MODULES))
def test_a_module_imports_nothing_against_the_arrows(module: str) -> None:
    if module == "lambda_server.runtimes.python_worker":  # a worker script: the standard library
        return
    forbidden = rules(module)
    against = sorted(
        name
        for name in imports(MODULES[module])
        if any(under(name, prefix) for prefix in forbidden) and not under(name, module)
    )
    assert against == [], f"{module} imports {against} against the layers' arrows"


def test_the_use_cases_are_a_package_of_their_own() -> None:
    use_cases = {name.rsplit(".", 1)[-1] for name in MODULES if under(name, "lambda_server.usecases")}
    assert {"initialize", "execute", "catalog", "sessions", "health", "options"} <= use_cases
    assert "lambda_server.service" not in MODULES  # the one class of every use case is gone


def test_the_rules_see_imports() -> None:
    """The checks above would catch an import: they see the sandbox's own ones."""
    sandbox = imports(MODULES["lambda_server.sandbox"])
    assert "lambda_server.domain" in sandbox and "lambda_server.sandbox.cgroups" in sandbox
    assert "asyncpg" in imports(MODULES["lambda_server.store.database"])
