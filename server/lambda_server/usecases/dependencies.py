"""A session's dependencies: the policy (DEPENDENCIES, DEPENDENCY_ALLOWLIST, the limits), the
lock and its layer at Initialize, and the layer's folder at Execute on any replica.

Initialize checks the requirements (their number, their syntax, the policy) before
anything costly, then resolves them into a lock, refuses a lock that holds a package
the allowlist does not name, installs its layer (or finds it installed), records the
layer's size, and checks the owner's layer bytes (MAX_LAYER_BYTES_PER_OWNER: the
distinct layers its unexpired sessions use, this one counted once). The session
stores the lock, so a replica that lacks the layer installs the same versions from
it at the session's first Execute there.

The owner's layer bytes are checked twice: here, before anything is downloaded (by the
lock's archive sizes) and once installed, so that a refusal costs nothing; and exactly
when the session is stored, under the owner's lock (store/creates.py), so that
concurrent Initializes of one owner with new layers, on any replicas, cannot pass the
quota together.
"""

from __future__ import annotations

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

from lambda_server.config import DependencySettings
from lambda_server.domain import (
    ClaimedSession,
    ComponentHealth,
    ComponentStatus,
    Deadline,
    SessionDependencies,
)
from lambda_server.errors import (
    DeadlineExceeded,
    DependencyLimitExceeded,
    DependencyNotAllowed,
    InvalidRequest,
    LambdaError,
    NotStarted,
)
from lambda_server.runtimes.layers import LayerStore, Lock
from lambda_server.runtimes.npm import parse_requirement
from lambda_server.runtimes.registry import RuntimeSpec
from lambda_server.store.layers import LayerRecords, check_layer_quota
from lambda_server.usecases.inputs import refuse_nul

MAX_REQUIREMENT = 512  # characters of one requirement


class Dependencies:
    """The policy on dependencies, and the layers of sessions."""

    def __init__(
        self, settings: DependencySettings, layers: LayerStore | None, records: LayerRecords
    ) -> None:
        """`layers`: None when this server installs none."""
        self._settings = settings
        # DEPENDENCY_ALLOWLIST in each runtime's normal form of a name
        self._allowlist = {
            "python": frozenset(canonicalize_name(name) for name in settings.allowlist),
            "nodejs": frozenset(name.lower() for name in settings.allowlist),
        }
        self._layers = layers
        self._records = records

    def health(self, tools: dict[str, str]) -> ComponentHealth:
        """The `dependencies` component: the policy and the runtimes that install them (with
        `tools`, each resolver's tool and version); DEGRADED when the policy allows dependencies
        and no runtime can install them."""
        mode = self._settings.mode
        runtimes = self._layers.runtimes if self._layers is not None else ()
        if mode == "off":
            return ComponentHealth("dependencies", ComponentStatus.OK, "off (DEPENDENCIES=off)")
        policy = f"DEPENDENCIES={mode}"
        if mode == "allowlist":
            policy += f", {len(self._settings.allowlist)} packages allowed"
        if not runtimes:
            detail = f"degraded ({policy}): no runtime can install them (no uv, no npm): refused"
            return ComponentHealth("dependencies", ComponentStatus.DEGRADED, detail)
        installers = ", ".join(f"{name}: {tools.get(name, '?')}" for name in runtimes)
        counts = {"allowed": len(self._settings.allowlist)} if mode == "allowlist" else {}
        return ComponentHealth(
            "dependencies", ComponentStatus.OK, f"ok ({policy}; {installers})", counts=counts
        )

    def check(self, runtime: RuntimeSpec, requirements: tuple[str, ...]) -> tuple[str, ...]:
        """The requirements, trimmed, when the policy allows asking for them (before any work):
        InvalidRequest (a malformed one, or Rust), DependencyLimitExceeded (MAX_DEPENDENCIES),
        DependencyNotAllowed (DEPENDENCIES, DEPENDENCY_ALLOWLIST)."""
        if not requirements:
            return ()
        limit = self._settings.max_dependencies
        if len(requirements) > limit:
            raise DependencyLimitExceeded(
                f"{len(requirements)} dependencies asked for, over MAX_DEPENDENCIES ({limit})",
                setting="MAX_DEPENDENCIES",
                limit=str(limit),
            )
        if runtime.compiled:
            raise InvalidRequest(
                f"{runtime.name} scripts take no dependencies: they may use the crates Health lists for "
                f"runtime.{runtime.name}",
                field="dependencies",
            )
        trimmed = []
        for raw in requirements:
            refuse_nul(raw, "dependencies")
            requirement = raw.strip()
            if not requirement:
                raise InvalidRequest(
                    "a dependency is empty (or only spaces)", field="dependencies", requirement=raw[:256]
                )
            if len(requirement) > MAX_REQUIREMENT:
                raise InvalidRequest(
                    f"a dependency is {len(requirement)} characters, over {MAX_REQUIREMENT}",
                    field="dependencies",
                    requirement=requirement[:256],
                )
            trimmed.append(requirement)
        if self._settings.mode == "off":
            raise DependencyNotAllowed(
                "this server installs no dependencies (DEPENDENCIES=off)",
                setting="DEPENDENCIES",
                requirement=trimmed[0][:256],
            )
        for requirement in trimmed:
            name = package_name(runtime.name, requirement)
            self._allowed(runtime.name, name, requirement)
        return tuple(trimmed)

    def _allowed(self, runtime: str, name: str, requirement: str, needed_by: str = "") -> None:
        if self._settings.mode != "allowlist" or name in self._allowlist.get(runtime, frozenset()):
            return
        why = f", which {needed_by} needs," if needed_by else ""
        raise DependencyNotAllowed(
            f"the package {name}{why} is not in DEPENDENCY_ALLOWLIST",
            setting="DEPENDENCY_ALLOWLIST",
            requirement=requirement[:256],
        )

    async def resolve(
        self, runtime: RuntimeSpec, requirements: tuple[str, ...], owner: str | None, deadline: Deadline
    ) -> SessionDependencies | None:
        """Lock the (checked) requirements, install their layer, and check the owner's layer
        bytes; what the session stores. None when there are none. The layer is kept from the
        sweep until `stored` is told the session was stored (or refused)."""
        if not requirements:
            return None
        if self._layers is None:
            raise DependencyNotAllowed(
                "this server cannot install dependencies (uv is missing)",
                setting="DEPENDENCIES",
                requirement=requirements[0][:256],
            )
        lock = await self._layers.lock(runtime.name, requirements, deadline, owner or "")
        for package in lock.packages:  # the dependencies of dependencies too
            name = canonicalize_name(package.name) if runtime.name == "python" else package.name.lower()
            self._allowed(runtime.name, name, package.name, "a requested package")
        if owner is not None:  # before anything is downloaded: what is known, else the archives' sizes
            await self._refuse_past_quota(owner, lock, None, deadline)
        layer = await self._layers.ensure(lock, deadline, owner or "")
        self._layers.hold(lock.layer_id)  # until the session is stored (`stored`)
        try:
            await self._layers.used(lock.layer_id)  # and from other servers' sweeps: its folder's mtime
            await self._records.put(lock.layer_id, runtime.name, lock.text, layer.bytes, deadline)
            if owner is not None:
                await self._refuse_past_quota(owner, lock, layer.bytes, deadline)
        except BaseException:
            self._layers.release(lock.layer_id)
            raise
        return SessionDependencies(requirements, runtime.name, lock.layer_id, lock.text, lock.packages)

    def stored(self, dependencies: SessionDependencies | None) -> None:
        """The session of `resolve`'s answer is stored (or was refused): its layer is the
        sweep's to judge again."""
        if dependencies is not None and self._layers is not None:
            self._layers.release(dependencies.layer_id)

    async def _refuse_past_quota(self, owner: str, lock: Lock, size: int | None, deadline: Deadline) -> None:
        """QuotaExceeded when the owner's layers and this one of `size` bytes (counted once;
        None: its recorded size, else its archives') would pass MAX_LAYER_BYTES_PER_OWNER."""
        used, layers, recorded = await self._records.owner_bytes(owner, lock.layer_id, deadline)
        if size is None:
            size = recorded if recorded is not None else lock.archive_bytes
        check_layer_quota(owner, used, layers, size, self._settings.max_layer_bytes_per_owner)

    async def layer(
        self, session: ClaimedSession, runtime: RuntimeSpec, deadline: Deadline, owner: str = ""
    ) -> str | None:
        """The folder of the session's layer on this host, installed now from the session's
        stored lock when it is not here; NotStarted when it cannot be (nothing ran)."""
        layer_id = session.layer_id
        if not layer_id:
            return None
        if self._layers is not None:
            found = self._layers.installed(layer_id) or await self._layers.find(layer_id)
            if found is not None:
                await self._layers.used(layer_id)
                return str(found.path)
        try:
            if self._layers is None:
                raise NotStarted("this server cannot install the session's dependencies (uv is missing)")
            stored = await self._records.session_lock(session.request_id, layer_id, deadline)
            if stored is None:
                raise NotStarted(f"session {session.request_id} has no stored lock for layer {layer_id}")
            stored_runtime, text = stored
            lock = Lock(stored_runtime or runtime.name, (), (), text)
            if lock.layer_id != layer_id:  # a lock edited by hand: never install another's layer
                raise NotStarted(f"session {session.request_id}'s stored lock is not layer {layer_id}'s")
            layer = await self._layers.ensure(lock, deadline, owner)
            await self._layers.used(layer_id)
        except (NotStarted, DeadlineExceeded):
            raise
        except LambdaError as exc:
            why = f"the session's dependencies could not be installed on this server: {exc.message}"
            raise NotStarted(why, **exc.metadata) from exc
        return str(layer.path)


def package_name(runtime: str, requirement: str) -> str:
    """The package a requirement names (normalized), or InvalidRequest (field dependencies).
    Python: a PEP 508 requirement from the index (no direct URL). Node.js: `name@range`."""
    if runtime == "python":
        try:
            parsed = Requirement(requirement)
        except InvalidRequirement as exc:
            raise InvalidRequest(
                f"dependency {requirement[:256]!r} is not a PEP 508 requirement: {exc}",
                field="dependencies",
                requirement=requirement[:256],
            ) from None
        if parsed.url:
            raise InvalidRequest(
                f"dependency {requirement[:256]!r} names a URL: only packages of the index are installed",
                field="dependencies",
                requirement=requirement[:256],
            )
        return canonicalize_name(parsed.name)
    return parse_requirement(requirement)[0].lower()  # npm: `name@range` of the registry only
