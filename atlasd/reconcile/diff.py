"""What a pass reads and what it must write: observed state, comparison, the write plan.

Pure (no I/O). ``plan_writes(desired, observed, protected=...)`` diffs the desired objects
against the observed ones:

- ``atlas-ca``: created when absent, else replaced whole (PUT with the observed
  resourceVersion) when anything differs, annotations compared exactly — that is how a
  ``goatlas.io/ca-rotate`` set by another field manager is removed;
- every other desired object whose observed copy ``differs``: server-side applied;
- owned objects (``goatlas.io/owner-cluster``) of a cluster that is neither desired nor
  *protected* (present but invalid: its objects stay until it is fixed or deleted): deleted;
- a desired sidecar Service whose name a cluster Service already has: not written, a
  *clash* (any other same-named object atlasd does not own yet is taken over, which is how
  an installation of the original is adopted).

``differs`` compares only what atlasd sets: labels and annotations as subsets (others may
add theirs), Secret ``data`` decoded and exactly (with the same keys), Service ``selector``
exactly, lists element-wise, other maps as subsets (the API server adds defaults). A
Secret's type is immutable, so an existing Secret keeps its type. A steady-state pass
therefore plans no write.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from atlasd import labels
from atlasd.kube.apply import needs_apply
from atlasd.kube.resources import SECRETS, SERVICES, Resource
from atlasd.model import Settings
from atlasd.reconcile.desired import DesiredState
from atlasd.reconcile.objects import secret_data
from atlasd.reconcile.validate import is_cluster_service, selector_matches

FIXED_SECRETS = (
    labels.CA_SECRET,
    labels.SERVER_SECRET,
    labels.CLIENT_SECRET,
    labels.TLS_SECRET,
    labels.OBS_VALUES_SECRET,
)
"""Secrets atlasd reads by name even before it owns them (adoption of the original)."""
MANAGED_SELECTOR = f"{labels.MANAGED_BY_LABEL}={labels.MANAGED_BY_VALUE}"
CLUSTER_SELECTOR = f"{labels.CLUSTER_LABEL}=true"
# Maps compared exactly (atlasd owns every key); other maps are compared as subsets.
_EXACT_PATHS = frozenset({("spec", "selector")})


@dataclass(frozen=True)
class Observed:
    """What one pass read from the API server."""

    cluster_services: Sequence[Mapping[str, Any]]
    alertmanager_services: Sequence[Mapping[str, Any]]
    owned_services: Mapping[str, Mapping[str, Any]]
    # Owned Secrets plus whichever fixed-name Secrets exist.
    secrets: Mapping[str, Mapping[str, Any]]


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
    """Whether applying ``desired`` would change ``observed`` (None: absent).

    Also asks ``atlasd.kube.apply.needs_apply``, which reads ``managedFields`` to catch a
    label, annotation or data key atlasd applied before and no longer sends."""
    if observed is None:
        return True
    if desired.get("kind") == "Secret":
        if secret_data(desired) != secret_data(observed):
            return True
        if set(desired.get("data") or {}) != set(observed.get("data") or {}):
            return True
        rest = {k: v for k, v in desired.items() if k != "data"}
        if not _covers(rest, observed, ()):
            return True
    elif not _covers(desired, observed, ()):
        return True
    return needs_apply(desired, observed)


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


def owner_of(obj: Mapping[str, Any]) -> str | None:
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
            owner = owner_of(obj)
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
