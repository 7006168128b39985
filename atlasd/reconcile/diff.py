"""What one key must write: comparison of desired with observed, and the write plan.

Pure (no I/O). ``plan_key_writes(desired, observed, clashes=...)`` diffs one key's desired
objects against what is observed for it (the watch cache, or a LIST):

- every desired object whose observed copy ``differs``: server-side applied;
- every observed object of the key that is not desired: deleted (the key's cluster is gone,
  or wants fewer replicas); a key whose cluster Service is present but invalid is
  *protected* by its caller, which then passes no desired objects and asks for no deletes;
- a desired Service whose name a cluster Service already has: not written, a *clash*
  (any other same-named object atlasd does not own yet is taken over, which is how an
  installation of the original is adopted).

``atlas-ca`` is written whole (``ca_write``): created when absent, else replaced (PUT with the
observed resourceVersion) when anything differs, annotations compared exactly — that is how a
``goatlas.io/ca-rotate`` set by another field manager is removed.

``differs`` compares only what atlasd sets: labels and annotations as subsets (others may
add theirs), Secret ``data`` decoded and exactly (with the same keys), Service ``selector``
exactly, lists element-wise, other maps as subsets (the API server adds defaults). A
Secret's type is immutable, so an existing Secret keeps its type. A steady-state key
therefore plans no write.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from atlasd.kube import bodies
from atlasd.kube.apply import needs_apply
from atlasd.kube.resources import SECRETS, SERVICES, ApiResource

# Maps compared exactly (atlasd owns every key); other maps are compared as subsets.
_WHOLE = frozenset({("spec", "selector"), ("data",)})


# --- comparison ---


def differs(desired: Mapping[str, Any], observed: Mapping[str, Any] | None) -> bool:
    """Whether applying ``desired`` would change ``observed`` (None: absent): the one
    comparison (``atlasd.kube.apply.needs_apply``, which also reads ``managedFields`` to
    catch a label, annotation or data key atlasd applied before and no longer sends), with
    the maps atlasd owns whole (``_WHOLE``)."""
    return needs_apply(desired, observed, whole=_WHOLE)


# --- the write plan (pure) ---


@dataclass(frozen=True)
class KeyWrites:
    """What one key writes."""

    apply: tuple[Mapping[str, Any], ...] = ()
    delete: tuple[tuple[ApiResource, str], ...] = ()
    # Desired Services not written because a cluster Service already has the name.
    clashes: tuple[Mapping[str, Any], ...] = ()

    def __bool__(self) -> bool:
        return bool(self.apply or self.delete)


def _ca_body(desired: Mapping[str, Any], observed: Mapping[str, Any]) -> dict[str, Any]:
    body = copy.deepcopy(dict(observed))
    meta = body.setdefault("metadata", {})
    meta.pop("managedFields", None)
    meta["labels"] = dict(bodies.labels(desired))
    anns = dict(bodies.annotations(desired))
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


def plan_key_writes(
    *,
    services: Mapping[str, Mapping[str, Any]],
    secrets: Mapping[str, Mapping[str, Any]],
    observed_services: Mapping[str, Mapping[str, Any]],
    observed_secrets: Mapping[str, Mapping[str, Any]],
    is_cluster_service: Callable[[str], bool] = lambda name: False,
    prune: bool = True,
) -> KeyWrites:
    """Diff one key's desired Services and Secrets against its observed ones (by name).

    ``is_cluster_service(name)``: whether a cluster Service of that name exists (it is never
    overwritten). ``prune``: delete observed objects of the key that are not desired.
    """
    apply: list[Mapping[str, Any]] = []
    for name, secret in sorted(secrets.items()):
        obs = observed_secrets.get(name)
        want = _with_observed_type(secret, obs)
        if differs(want, obs):
            apply.append(want)
    clashes: list[Mapping[str, Any]] = []
    for name, svc in sorted(services.items()):
        if is_cluster_service(name):
            clashes.append(svc)
        elif differs(svc, observed_services.get(name)):
            apply.append(svc)
    delete: list[tuple[ApiResource, str]] = []
    if prune:
        for res, owned, wanted in (
            (SERVICES, observed_services, services),
            (SECRETS, observed_secrets, secrets),
        ):
            delete.extend((res, n) for n in sorted(owned) if n not in wanted)
    return KeyWrites(tuple(apply), tuple(delete), tuple(clashes))


def ca_write(
    desired: Mapping[str, Any], observed: Mapping[str, Any] | None
) -> tuple[str, Mapping[str, Any]] | None:
    """How to write ``atlas-ca``: ("create", body), ("replace", body) or None (in sync)."""
    if observed is None:
        return "create", desired
    if _ca_differs(desired, observed):
        return "replace", _ca_body(desired, observed)
    return None


def _ca_differs(desired: Mapping[str, Any], observed: Mapping[str, Any]) -> bool:
    """The CA Secret is written whole (PUT): its annotations must match exactly, so a
    ``goatlas.io/ca-rotate`` set by someone else is removed."""
    if differs(desired, observed):
        return True
    return dict(bodies.annotations(desired)) != dict(bodies.annotations(observed))
