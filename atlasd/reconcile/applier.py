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

A sidecar Service is never written over a cluster Service of the same name (reason
``NameClash`` on the cluster that wanted it); any other same-named object atlasd does not own
yet is taken over, which is how an installation of the original is adopted.

A cluster Service that exists but is invalid is *protected*: its existing objects are
neither rewritten nor pruned (a typo in an annotation must not revoke a working cluster's
identity), and it is left out of the Fleet until fixed.

"Differs" (``differs``) compares only what atlasd sets: labels and annotations as subsets
(others may add theirs), Secret ``data`` decoded and exactly, Service ``selector`` exactly,
lists element-wise, other maps as subsets (the API server adds defaults). A steady-state pass
therefore writes nothing.

Errors::

    Conflict / AlreadyExists   atlas-ca changed under us: retry the pass
    KubeError (others)         propagate (transport, auth): the caller backs off and retries
    Invalid / BadRequest on one object   become a Problem on its cluster; others continue
"""

from __future__ import annotations

import contextlib
import copy
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
from atlasd.reconcile.desired import DesiredState, desired_state
from atlasd.reconcile.objects import secret_data
from atlasd.reconcile.pki import KeySource, PKIError, RandomKeys, plan_pki
from atlasd.reconcile.validate import (
    is_cluster_service,
    select_alertmanagers,
    selector_matches,
    validate_all,
)

log = logging.getLogger(__name__)

FIXED_SECRETS = (
    labels.CA_SECRET,
    labels.SERVER_SECRET,
    labels.CLIENT_SECRET,
    labels.TLS_SECRET,
    labels.OBS_VALUES_SECRET,
)
MANAGED_SELECTOR = f"{labels.MANAGED_BY_LABEL}={labels.MANAGED_BY_VALUE}"
JSON = dict[str, Any]
CLUSTER_SELECTOR = f"{labels.CLUSTER_LABEL}=true"
DEFAULT_CONCURRENCY = 32
# Maps compared exactly (atlasd owns every key); other maps are compared as subsets.
_EXACT_PATHS = frozenset({("spec", "selector")})


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


@dataclass(frozen=True)
class Observed:
    """What one pass read from the API server."""

    cluster_services: Sequence[Mapping[str, Any]]
    alertmanager_services: Sequence[Mapping[str, Any]]
    owned_services: Mapping[str, Mapping[str, Any]]
    # Owned Secrets plus whichever fixed-name Secrets exist.
    secrets: Mapping[str, Mapping[str, Any]]


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


def observed_from_caches(
    *,
    services: Mapping[str, Mapping[str, Any]],
    secrets: Mapping[str, Mapping[str, Any]],
    settings: Settings,
) -> Observed:
    """``Observed`` from informer caches (name -> object) of the namespace's Services and
    Secrets — all of them, or at least the cluster, Alertmanager and owned ones and the
    fixed-name Secrets."""

    def owned(obj: Mapping[str, Any]) -> bool:
        lbls = (obj.get("metadata") or {}).get("labels") or {}
        return bool(lbls.get(labels.MANAGED_BY_LABEL) == labels.MANAGED_BY_VALUE)

    selector = settings.alertmanager_selector
    return Observed(
        cluster_services=[s for _, s in sorted(services.items()) if is_cluster_service(s)],
        alertmanager_services=[
            s
            for _, s in sorted(services.items())
            if selector
            and selector_matches((s.get("metadata") or {}).get("labels") or {}, selector)
        ],
        owned_services={n: s for n, s in services.items() if owned(s)},
        secrets={n: s for n, s in secrets.items() if owned(s) or n in FIXED_SECRETS},
    )


# --- comparison ---


def _covers(desired: Any, observed: Any, path: tuple[str, ...]) -> bool:
    """Whether ``observed`` already says everything ``desired`` says (see module docstring)."""
    if isinstance(desired, Mapping):
        if not isinstance(observed, Mapping):
            return False
        if path in _EXACT_PATHS and set(desired) != set(observed):
            return False
        return all(
            k in observed and _covers(v, observed[k], (*path, k)) for k, v in desired.items()
        )
    if isinstance(desired, list):
        if not isinstance(observed, list) or len(desired) != len(observed):
            return False
        return all(_covers(d, o, path) for d, o in zip(desired, observed, strict=True))
    return bool(desired == observed)


def differs(desired: Mapping[str, Any], observed: Mapping[str, Any] | None) -> bool:
    """Whether applying ``desired`` would change ``observed`` (None: absent)."""
    if observed is None:
        return True
    if desired.get("kind") == "Secret":
        if secret_data(desired) != secret_data(observed):
            return True
        if set(desired.get("data") or {}) != set(observed.get("data") or {}):
            return True
        rest = {k: v for k, v in desired.items() if k != "data"}
        return not _covers(rest, observed, ())
    return not _covers(desired, observed, ())


# --- the write plan (pure) ---


@dataclass(frozen=True)
class WritePlan:
    """What one pass writes."""

    ca_create: Mapping[str, Any] | None
    ca_replace: Mapping[str, Any] | None
    apply: tuple[Mapping[str, Any], ...]
    delete: tuple[tuple[Resource, str], ...]
    # Desired Services not written because a cluster Service already has the name.
    clashes: tuple[Mapping[str, Any], ...] = ()


def _owner(obj: Mapping[str, Any]) -> str | None:
    lbls = (obj.get("metadata") or {}).get("labels") or {}
    value = lbls.get(labels.OWNER_CLUSTER_LABEL)
    return str(value) if value is not None else None


def _ca_body(desired: Mapping[str, Any], observed: Mapping[str, Any]) -> dict[str, Any]:
    body = copy.deepcopy(dict(observed))
    meta = body.setdefault("metadata", {})
    meta.pop("managedFields", None)
    meta["labels"] = dict(desired["metadata"].get("labels") or {})
    anns = dict(desired["metadata"].get("annotations") or {})
    if anns:
        meta["annotations"] = anns
    else:
        meta.pop("annotations", None)
    body["data"] = dict(desired["data"])
    body.pop("stringData", None)
    return body


def _with_observed_type(
    desired: Mapping[str, Any], observed: Mapping[str, Any] | None
) -> Mapping[str, Any]:
    # A Secret's type is immutable: keep whatever an existing Secret has.
    if observed is not None and observed.get("type") and observed["type"] != desired.get("type"):
        return {**desired, "type": observed["type"]}
    return desired


def plan_writes(
    desired: DesiredState, observed: Observed, *, protected: frozenset[str]
) -> WritePlan:
    """Diff desired against observed: what to create, replace, apply and delete."""
    ca_obs = observed.secrets.get(labels.CA_SECRET)
    ca_create = ca_replace = None
    if ca_obs is None:
        ca_create = desired.ca_secret
    elif _ca_differs(desired.ca_secret, ca_obs):
        ca_replace = _ca_body(desired.ca_secret, ca_obs)

    apply: list[Mapping[str, Any]] = []
    for name, secret in sorted(desired.secrets.items()):
        obs = observed.secrets.get(name)
        want = _with_observed_type(secret, obs)
        if differs(want, obs):
            apply.append(want)
    # Never overwrite an operator's cluster Service (e.g. one named like another
    # cluster's sidecar Service). Other same-named objects atlasd does not own yet are
    # taken over: that is how an installation of the original is adopted.
    cluster_names = {str(s["metadata"]["name"]) for s in observed.cluster_services}
    clashes: list[Mapping[str, Any]] = []
    for name, svc in sorted(desired.services.items()):
        if name in cluster_names:
            clashes.append(svc)
        elif differs(svc, observed.owned_services.get(name)):
            apply.append(svc)

    delete: list[tuple[Resource, str]] = []
    for res, owned, wanted in (
        (SERVICES, observed.owned_services, desired.services),
        (SECRETS, observed.secrets, desired.secrets),
    ):
        for name, obj in sorted(owned.items()):
            owner = _owner(obj)
            if owner is None or owner in protected or name in wanted:
                continue
            delete.append((res, name))
    return WritePlan(ca_create, ca_replace, tuple(apply), tuple(delete), tuple(clashes))


def _ca_differs(desired: Mapping[str, Any], observed: Mapping[str, Any]) -> bool:
    """The CA Secret is written whole (PUT): its annotations must match exactly, so a
    ``goatlas.io/ca-rotate`` set by someone else is removed."""
    if differs(desired, observed):
        return True
    want = desired["metadata"].get("annotations") or {}
    have = (observed.get("metadata") or {}).get("annotations") or {}
    return dict(want) != dict(have)


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
                    owner = _owner(obj)
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
            cluster = by_cluster.get(_owner(obj) or "")
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
