"""The reconcile pass: observe, decide (pure), write only what differs, prune, report.

``Reconciler.reconcile_once(kube, now=...)`` (or the module-level ``reconcile_once``):

1. observe — LIST the cluster Services (``goatlas.io/cluster=true``), the local
   Alertmanager Services (settings.alertmanager_selector), and the Services and Secrets
   atlasd owns (``app.kubernetes.io/managed-by=atlasd``); GET the fixed-name Secrets
   (``atlas-ca``, ``atlas-server``, ...) only when the owned list lacks them (first pass, or
   an installation adopted from the original);
2. decide — ``validate_all`` -> ``plan_pki`` -> ``desired_state`` -> ``plan_writes``, all pure;
3. write — ``atlas-ca`` first and alone: created when absent, else replaced (PUT with the
   observed resourceVersion) so that removing ``goatlas.io/ca-rotate`` (set by another field
   manager) works and two writers cannot both rotate: a ``Conflict`` propagates and the
   caller retries the pass. Then every other differing object by server-side apply (bounded
   concurrency), then pruning: owned objects of a cluster whose Service is gone.
4. report — a Warning Event for each Problem not already reported by this Reconciler
   (a problem that disappears and comes back is reported again).

The client and the Event poster are handed in (``KubeApi``, ``EventPoster``: the daemon
passes ``atlasd.kube.client.KubeClient`` and ``atlasd.kube.events.post_event``): the
import contract keeps httpx — and so the client module — out of this layer.

What is written, pruned, protected or left alone is decided by ``atlasd.reconcile.diff``
(a cluster Service that exists but is invalid is *protected*: a typo in an annotation must
not revoke a working cluster's identity; it is left out of the Fleet until fixed). A
steady-state pass writes nothing.

Errors::

    Conflict / AlreadyExists   atlas-ca changed under us: retry the pass
    KubeError (others)         propagate (transport, auth): the caller backs off and retries
    Invalid / BadRequest on one object   become a Problem on its cluster; others continue
    a sidecar Service named like a cluster Service   not written: Problem ``NameClash``
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import trio

from atlasd import labels
from atlasd.kube.errors import BadRequest, Invalid, NotFound
from atlasd.kube.resources import SECRETS, SERVICES, Resource
from atlasd.model import Fleet, ObjectRef, Problem, Settings
from atlasd.reconcile.desired import desired_state
from atlasd.reconcile.diff import (
    CLUSTER_SELECTOR,
    FIXED_SECRETS,
    MANAGED_SELECTOR,
    Observed,
    WritePlan,
    differs,
    observed_from_caches,
    owner_of,
    plan_writes,
)
from atlasd.reconcile.pki import KeySource, PKIError, RandomKeys, plan_pki
from atlasd.reconcile.validate import (
    is_cluster_service,
    select_alertmanagers,
    validate_all,
)

# ``diff`` names re-exported: the applier is the reconcile layer's entry point.
__all__ = [
    "MANAGED_SELECTOR",
    "EventPoster",
    "KubeApi",
    "Observed",
    "ReconcileResult",
    "Reconciler",
    "WritePlan",
    "differs",
    "log_event",
    "observe",
    "observed_from_caches",
    "plan_writes",
    "reconcile_once",
]

log = logging.getLogger(__name__)

JSON = dict[str, Any]
DEFAULT_CONCURRENCY = 32


# --- the ports this layer is handed (import-linter: reconcile may not import the client,
# which imports httpx; the daemon passes ``KubeClient`` and ``atlasd.kube.events.post_event``)


class KubeApi(Protocol):
    """The subset of ``atlasd.kube.client.KubeClient`` a pass uses."""

    async def get(self, res: Resource, name: str, *, namespace: str | None = None) -> JSON: ...

    async def list(
        self, res: Resource, *, namespace: str | None = None, label_selector: str | None = None
    ) -> tuple[list[JSON], str]: ...

    async def apply(self, obj: Mapping[str, Any], *, force: bool = True) -> JSON: ...

    async def create(self, obj: Mapping[str, Any]) -> JSON: ...

    async def replace(self, obj: Mapping[str, Any]) -> JSON: ...

    async def delete(self, res: Resource, name: str, *, namespace: str | None = None) -> None: ...


class EventPoster(Protocol):
    """``atlasd.kube.events.post_event``: posts a Warning Event, never raises."""

    async def __call__(
        self, kube: Any, *, ref: ObjectRef, reason: str, message: str, type: str = "Warning"
    ) -> None: ...


async def log_event(
    kube: Any, *, ref: ObjectRef, reason: str, message: str, type: str = "Warning"
) -> None:
    """The fallback ``EventPoster`` (no Events, just a log line)."""
    log.warning("%s %s %s/%s: %s", reason, ref.kind, ref.namespace, ref.name, message)


# --- observed state ---


def _by_name(items: Sequence[Mapping[str, Any]]) -> dict[str, Mapping[str, Any]]:
    return {str(i["metadata"]["name"]): i for i in items}


async def observe(kube: KubeApi, settings: Settings) -> Observed:
    ns = settings.namespace
    am_selector = ",".join(f"{k}={v}" for k, v in settings.alertmanager_selector)
    clusters, _ = await kube.list(SERVICES, namespace=ns, label_selector=CLUSTER_SELECTOR)
    ams: list[dict[str, Any]] = []
    if am_selector:
        ams, _ = await kube.list(SERVICES, namespace=ns, label_selector=am_selector)
    owned_svcs, _ = await kube.list(SERVICES, namespace=ns, label_selector=MANAGED_SELECTOR)
    owned_secrets, _ = await kube.list(SECRETS, namespace=ns, label_selector=MANAGED_SELECTOR)
    secrets = _by_name(owned_secrets)
    for name in FIXED_SECRETS:
        if name not in secrets:
            with contextlib.suppress(NotFound):
                secrets[name] = await kube.get(SECRETS, name, namespace=ns)
    return Observed(
        cluster_services=clusters,
        alertmanager_services=ams,
        owned_services=_by_name(owned_svcs),
        secrets=secrets,
    )


# --- the pass ---


@dataclass(frozen=True)
class ReconcileResult:
    """What one pass decided and did."""

    fleet: Fleet | None
    problems: tuple[Problem, ...]
    created: int = 0
    replaced: int = 0
    applied: int = 0
    deleted: int = 0
    events: int = 0
    issued: tuple[str, ...] = ()
    ca_action: str = ""
    write_errors: tuple[str, ...] = field(default=())
    # Run a pass again by then at the latest (certificate renewal; see PKIPlan).
    next_renewal: dt.datetime | None = None

    @property
    def writes(self) -> int:
        """Object writes (Events not counted)."""
        return self.created + self.replaced + self.applied + self.deleted


class Reconciler:
    """Runs passes; remembers which Problems it already reported as Events."""

    def __init__(
        self,
        *,
        settings: Settings,
        keys: KeySource | None = None,
        allow_loopback: bool = False,
        concurrency: int = DEFAULT_CONCURRENCY,
        post_event: EventPoster = log_event,
    ) -> None:
        self.settings = settings
        self.keys: KeySource = keys or RandomKeys()
        self.allow_loopback = allow_loopback
        self.concurrency = concurrency
        self.post_event = post_event
        # (namespace, name, uid, field, message) of the Problems already posted as Events;
        # replaced by the current set each pass, so a recurring problem is posted again.
        self._reported: set[tuple[str, str, str, str, str]] = set()

    async def reconcile_once(self, kube: KubeApi, *, now: dt.datetime) -> ReconcileResult:
        """LIST what a pass needs, then ``reconcile_observed``."""
        return await self.reconcile_observed(kube, await observe(kube, self.settings), now=now)

    async def reconcile_observed(
        self, kube: KubeApi, observed: Observed, *, now: dt.datetime
    ) -> ReconcileResult:
        """A pass over already observed state (e.g. ``observed_from_caches`` of informer
        caches). A stale cache costs at most a redundant apply, or a ``Conflict`` on
        ``atlas-ca`` that the caller answers by retrying."""
        settings = self.settings
        clusters, problems_t = validate_all(
            observed.cluster_services, settings, allow_loopback=self.allow_loopback
        )
        problems = list(problems_t)
        valid = {c.name for c in clusters}
        present = {
            str(s["metadata"]["name"]) for s in observed.cluster_services if is_cluster_service(s)
        }
        protected = frozenset(present - valid)
        alertmanagers = select_alertmanagers(
            observed.alertmanager_services, settings.alertmanager_selector
        )
        try:
            plan = plan_pki(
                secrets=observed.secrets,
                clusters=clusters,
                settings=settings,
                now=now,
                keys=self.keys,
            )
        except PKIError as e:
            ref = ObjectRef(kind="Secret", name=labels.CA_SECRET, namespace=settings.namespace)
            problems.append(Problem(source=ref, field="data", message=str(e), reason="InvalidCA"))
            events = await self._report(kube, problems)
            return ReconcileResult(fleet=None, problems=tuple(problems), events=events)

        desired = desired_state(
            clusters=clusters, alertmanagers=alertmanagers, plan=plan, settings=settings
        )
        writes = plan_writes(desired, observed, protected=protected)
        created = replaced = 0
        if writes.ca_create is not None:
            await kube.create(writes.ca_create)
            created = 1
        elif writes.ca_replace is not None:
            await kube.replace(writes.ca_replace)
            replaced = 1

        applied = 0
        errors: list[str] = []
        limiter = trio.CapacityLimiter(self.concurrency)
        by_cluster = {c.name: c for c in clusters}

        async def apply_one(obj: Mapping[str, Any]) -> None:
            nonlocal applied
            async with limiter:
                try:
                    await kube.apply(obj)
                except (Invalid, BadRequest) as e:
                    owner = owner_of(obj)
                    cluster = by_cluster.get(owner) if owner else None
                    name = str(obj["metadata"]["name"])
                    errors.append(f"{obj.get('kind')} {name}: {e.reason}")
                    if cluster is not None and cluster.source is not None:
                        problems.append(
                            Problem(
                                source=cluster.source,
                                field=f"{obj.get('kind')} {name}",
                                message=f"the API server rejected it: {e.reason}",
                                reason="ApplyFailed",
                            )
                        )
                    else:
                        log.error("apply of %s %s rejected: %s", obj.get("kind"), name, e.reason)
                    return
                applied += 1

        for obj in writes.clashes:
            cluster = by_cluster.get(owner_of(obj) or "")
            if cluster is not None and cluster.source is not None:
                problems.append(
                    Problem(
                        source=cluster.source,
                        field=f"Service {obj['metadata']['name']}",
                        message="a cluster Service already has this name; not overwritten",
                        reason="NameClash",
                    )
                )

        async with trio.open_nursery() as nursery:
            for obj in writes.apply:
                nursery.start_soon(apply_one, obj)

        deleted = 0

        async def delete_one(res: Resource, name: str) -> None:
            nonlocal deleted
            async with limiter:
                try:
                    await kube.delete(res, name, namespace=settings.namespace)
                except NotFound:
                    return
                deleted += 1

        async with trio.open_nursery() as nursery:
            for res, name in writes.delete:
                nursery.start_soon(delete_one, res, name)

        events = await self._report(kube, problems)
        return ReconcileResult(
            fleet=desired.fleet,
            problems=tuple(problems),
            created=created,
            replaced=replaced,
            applied=applied,
            deleted=deleted,
            events=events,
            issued=plan.issued,
            ca_action=plan.ca_action,
            write_errors=tuple(errors),
            next_renewal=plan.next_renewal,
        )

    async def _report(self, kube: KubeApi, problems: Sequence[Problem]) -> int:
        current: set[tuple[str, str, str, str, str]] = set()
        posted = 0
        for p in problems:
            key = (p.source.namespace, p.source.name, p.source.uid, p.field, p.message)
            current.add(key)
            if key in self._reported:
                continue
            await self.post_event(
                kube, ref=p.source, reason=p.reason, message=f"{p.field}: {p.message}"
            )
            posted += 1
        self._reported = current
        return posted


async def reconcile_once(
    kube: KubeApi,
    *,
    settings: Settings,
    now: dt.datetime,
    reconciler: Reconciler | None = None,
    post_event: EventPoster = log_event,
) -> ReconcileResult:
    """One pass. Pass the same ``reconciler`` each time to report each Problem once."""
    rec = reconciler or Reconciler(settings=settings, post_event=post_event)
    return await rec.reconcile_once(kube, now=now)
