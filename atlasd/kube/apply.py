"""Deciding whether a write is needed, and marking what atlasd owns.

Owns the pure comparison ``needs_apply(desired, observed)`` that keeps a pass with
nothing to change from writing anything, and the ownership helpers (labels,
ownerReferences, prune selection) every applier uses. It imports no HTTP code, so
``atlasd.reconcile`` may use it under the import contract.

``needs_apply`` answers "would server-side applying ``desired`` change ``observed``?":
- every field ``desired`` sends must already hold that value in ``observed`` (maps are
  compared key by key, lists element by element, so server defaults such as a port's
  ``protocol`` or ``targetPort`` do not count as differences);
- Secrets are compared on *decoded* bytes: desired ``data`` (base64) and ``stringData``
  (text; write-only, never returned) against observed ``data``;
- a label, annotation or data key that atlasd applied before (per ``managedFields``,
  manager ``atlasd``) but no longer sends is a difference too: applying removes it.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable, Mapping
from typing import Any, Protocol

from atlasd.labels import FIELD_MANAGER, MANAGED_BY_LABEL, MANAGED_BY_VALUE, OWNER_CLUSTER_LABEL

Obj = Mapping[str, Any]

# Top-level fields that are identity or server-owned, never compared.
_SKIP_TOP = frozenset({"apiVersion", "kind", "metadata", "status"})
_META_COMPARED = ("labels", "annotations", "ownerReferences", "finalizers")


def _b64decode(value: object) -> bytes | None:
    if not isinstance(value, str):
        return None
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return None


def decoded_secret_data(secret: Obj) -> dict[str, bytes]:
    """A Secret's content as bytes: ``data`` decoded, ``stringData`` encoded, the latter
    winning on a shared key (as the API server merges them)."""
    out: dict[str, bytes] = {}
    for key, value in (secret.get("data") or {}).items():
        decoded = _b64decode(value)
        # An undecodable value never equals anything, so it forces a write.
        out[key] = decoded if decoded is not None else b"\x00<invalid base64>"
    for key, value in (secret.get("stringData") or {}).items():
        out[key] = str(value).encode()
    return out


def encode_secret_data(values: Mapping[str, bytes | str]) -> dict[str, str]:
    """``data`` for a Secret: every value base64-encoded."""
    return {
        k: base64.b64encode(v if isinstance(v, bytes) else v.encode()).decode()
        for k, v in values.items()
    }


def _subset(desired: object, observed: object) -> bool:
    """True when every field of ``desired`` holds the same value in ``observed``."""
    if desired is None:
        return observed is None
    if isinstance(desired, Mapping):
        if not isinstance(observed, Mapping):
            return False
        return all(_subset(v, observed.get(k)) for k, v in desired.items())
    if isinstance(desired, list):
        if not isinstance(observed, list) or len(desired) != len(observed):
            return False
        return all(_subset(d, o) for d, o in zip(desired, observed, strict=True))
    if isinstance(desired, bool) or isinstance(observed, bool):
        return desired is observed
    return desired == observed


def managed_keys(observed: Obj, *path: str, manager: str = FIELD_MANAGER) -> set[str]:
    """The map keys under ``path`` (e.g. "metadata", "labels") that ``manager`` applied,
    read from ``metadata.managedFields`` (fieldsV1)."""
    keys: set[str] = set()
    for entry in (observed.get("metadata") or {}).get("managedFields") or ():
        if not isinstance(entry, Mapping) or entry.get("manager") != manager:
            continue
        if entry.get("operation") != "Apply":
            continue
        node: object = entry.get("fieldsV1") or {}
        for part in path:
            node = node.get(f"f:{part}") if isinstance(node, Mapping) else None
        if isinstance(node, Mapping):
            keys.update(k[2:] for k in node if isinstance(k, str) and k.startswith("f:"))
    return keys


def _is_secret(obj: Obj) -> bool:
    return obj.get("apiVersion") == "v1" and obj.get("kind") == "Secret"


def needs_apply(desired: Obj, observed: Obj | None) -> bool:
    """Would server-side applying ``desired`` change ``observed``? (pure; see module doc)"""
    if observed is None:
        return True
    d_meta: Mapping[str, Any] = desired.get("metadata") or {}
    o_meta: Mapping[str, Any] = observed.get("metadata") or {}
    for field in _META_COMPARED:
        if field in d_meta and not _subset(d_meta[field], o_meta.get(field)):
            return True
    for field in ("labels", "annotations"):
        sent = set((d_meta.get(field) or {}).keys())
        if managed_keys(observed, "metadata", field) - sent:
            return True
    if _is_secret(desired):
        want = decoded_secret_data(desired)
        have = decoded_secret_data({"data": observed.get("data") or {}})
        if any(have.get(k) != v for k, v in want.items()):
            return True
        owned = managed_keys(observed, "data") | managed_keys(observed, "stringData")
        if (owned & set(have)) - set(want):
            return True
        rest = {k: v for k, v in desired.items() if k not in ("data", "stringData")}
    else:
        rest = dict(desired)
        if "data" in desired and isinstance(desired["data"], Mapping):
            sent = set(desired["data"])
            if (managed_keys(observed, "data") & set(observed.get("data") or {})) - sent:
                return True
    return any(
        not _subset(value, observed.get(key)) for key, value in rest.items() if key not in _SKIP_TOP
    )


# ---------------------------------------------------------------------------------------
# Ownership


def ownership_labels(cluster: str | None = None) -> dict[str, str]:
    """Labels on everything atlasd creates (and, per cluster, which cluster owns it)."""
    labels = {MANAGED_BY_LABEL: MANAGED_BY_VALUE}
    if cluster is not None:
        labels[OWNER_CLUSTER_LABEL] = cluster
    return labels


def managed_selector(cluster: str | None = None) -> str:
    """The label selector that lists what ``ownership_labels(cluster)`` marked."""
    return ",".join(f"{k}={v}" for k, v in sorted(ownership_labels(cluster).items()))


def owner_reference(owner: Obj) -> dict[str, Any]:
    """An ownerReference to ``owner`` (an observed object: it needs its uid)."""
    meta = owner.get("metadata") or {}
    uid = meta.get("uid")
    if not uid:
        raise ValueError(f"{owner.get('kind')} {meta.get('name')} has no uid yet")
    return {
        "apiVersion": owner["apiVersion"],
        "kind": owner["kind"],
        "name": meta["name"],
        "uid": uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def with_ownership(
    obj: Obj, *, cluster: str | None = None, owner: Obj | None = None
) -> dict[str, Any]:
    """A copy of ``obj`` carrying atlasd's ownership labels (and an ownerReference)."""
    meta = dict(obj.get("metadata") or {})
    meta["labels"] = {**(meta.get("labels") or {}), **ownership_labels(cluster)}
    if owner is not None:
        meta["ownerReferences"] = [owner_reference(owner)]
    return {**obj, "metadata": meta}


def prune(observed: Iterable[Obj], desired_names: Iterable[str]) -> list[str]:
    """Names of owned objects (``observed``, listed by ``managed_selector``) no longer desired."""
    keep = set(desired_names)
    out = []
    for obj in observed:
        meta = obj.get("metadata") or {}
        labels = meta.get("labels") or {}
        if labels.get(MANAGED_BY_LABEL) != MANAGED_BY_VALUE:
            continue
        if meta.get("name") not in keep:
            out.append(str(meta.get("name")))
    return sorted(out)


class Applier(Protocol):
    """The one verb of ``atlasd.kube.client.KubeClient`` used here (a Protocol, so this
    module does not import the client: layers that must not import httpx may use it)."""

    async def apply(self, obj: Mapping[str, Any]) -> dict[str, Any]: ...


async def apply_if_needed(
    kube: Applier, desired: Obj, observed: Obj | None
) -> dict[str, Any] | None:
    """Server-side apply ``desired`` unless ``observed`` already matches; returns the
    stored object, or None when nothing was written."""
    if not needs_apply(desired, observed):
        return None
    return await kube.apply(desired)
