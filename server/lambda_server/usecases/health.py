"""Health: the service's state and each component's, for people (text) and programs (values)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Protocol

from lambda_server import __version__
from lambda_server.domain import ComponentHealth, ComponentStatus, HealthReport

RUST = "runtime.rust"


class DatabaseState(Protocol):
    """What Health needs to know about PostgreSQL; kept up to date by the app."""

    @property
    def ready(self) -> bool: ...

    @property
    def description(self) -> str: ...


class EngineState(Protocol):
    """The runtimes' and environments' states (the environment pool)."""

    def status(self) -> Sequence[ComponentHealth]: ...


class DependencyState(Protocol):
    """The Rust builds' one-time build of the crates scripts may use: `ready`, `building`,
    `failed: ...`, and the crates once built (`name version`)."""

    @property
    def dependencies_state(self) -> str: ...

    @property
    def packages(self) -> tuple[str, ...]: ...


class Health:
    """Reports the service as serving while PostgreSQL answers, and every component's state."""

    def __init__(
        self,
        database: DatabaseState,
        engine: EngineState,
        sandbox: ComponentHealth,
        builds: DependencyState | None,
        others: Sequence[ComponentHealth] = (),
    ) -> None:
        """`others`: components decided at start (the dependencies' policy and installers)."""
        self._database = database
        self._engine = engine
        self._sandbox = sandbox  # decided at start
        self._builds = builds
        self._others = tuple(others)

    def __call__(self) -> HealthReport:
        database = self._database
        postgres = ComponentHealth(
            "postgres",
            ComponentStatus.OK if database.ready else ComponentStatus.UNAVAILABLE,
            database.description,
            required=True,
        )
        components = [postgres, self._sandbox, *self._others]
        for component in self._engine.status():
            if component.name == RUST and self._builds is not None:
                component = self._with_dependencies(component, self._builds)
            components.append(component)
        return HealthReport(database.ready, __version__, tuple(sorted(components, key=lambda c: c.name)))

    @staticmethod
    def _with_dependencies(rust: ComponentHealth, builds: DependencyState) -> ComponentHealth:
        """The Rust runtime works while its crates build, but each compile waits for them; a
        crate left out (its sources missing) is said, and the others work."""
        state = builds.dependencies_state
        status = rust.status
        if status is ComponentStatus.OK and state != "ready":
            status = ComponentStatus.DEGRADED
        detail = f"{rust.detail}; crates: {state}"
        return replace(rust, status=status, detail=detail, packages=builds.packages)
