"""Deciding whether a write is needed: the one comparison of desired with observed.

Owns the pure ``needs_apply(desired, observed)`` that keeps a pass with nothing to change
from writing anything. It imports no HTTP code, so ``atlasd.reconcile`` may use it under
the import contract.

``needs_apply`` answers "would server-side applying ``desired`` change ``observed``?":
- every field ``desired`` sends must already hold that value in ``observed`` (maps are
  compared key by key, lists element by element, so server defaults such as a port's
  ``protocol`` or ``targetPort`` do not count as differences; a bool is never equal to a
  number);
- Secrets are compared on *decoded* bytes (``atlasd.kube.secrets``): desired ``data``
  (base64) and ``stringData`` (text; write-only, never returned) against observed ``data``;
  a desired value that is not base64 is always a difference; an observed value the cache
  kept only as its digest (``DataDigest``) is compared by digest;
- a label, annotation or data key that atlasd applied before (per ``managedFields``,
  manager ``atlasd``) but no longer sends is a difference too: applying removes it;
- ``whole``: paths of maps atlasd owns whole (e.g. a Service's ``spec.selector``, a
  Secret's ``data``): there a key that ``desired`` does not send is a difference as well.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

from atlasd.kube import bodies
from atlasd.kube.api import Obj
from atlasd.kube.secrets import DataDigest, secret_data
from atlasd.labels import FIELD_MANAGER

Path = tuple[str, ...]


def _covers(desired: object, observed: object, path: Path, whole: Collection[Path]) -> bool:
    """True when every field of ``desired`` holds the same value in ``observed``."""
    if isinstance(desired, Mapping):
        if not isinstance(observed, Mapping):
            return False
        if path in whole and set(desired) != set(observed):
            return False
        return all(
            k in observed and _covers(v, observed[k], (*path, k), whole) for k, v in desired.items()
        )
    if isinstance(desired, list):
        if not isinstance(observed, list) or len(desired) != len(observed):
            return False
        return all(_covers(d, o, path, whole) for d, o in zip(desired, observed, strict=True))
    if isinstance(desired, bool) or isinstance(observed, bool):
        return desired is observed
    return bool(desired == observed)


# The maps whose applied keys ``needs_apply`` reads from managedFields (its calls of
# ``managed_keys``): all that a watch cache needs to keep of atlasd's entries.
READ_PATHS: tuple[Path, ...] = (
    ("metadata", "labels"),
    ("metadata", "annotations"),
    ("data",),
    ("stringData",),
)


def read_fields(fields: object) -> dict[str, Any]:
    """Of a fieldsV1 tree, only the maps under ``READ_PATHS`` (what ``managed_keys`` is
    asked for)."""
    out: dict[str, Any] = {}
    for path in READ_PATHS:
        node = fields
        for part in path:
            node = node.get(f"f:{part}") if isinstance(node, Mapping) else None
        if isinstance(node, Mapping):
            parent = out
            for part in path[:-1]:
                parent = parent.setdefault(f"f:{part}", {})
            parent[f"f:{path[-1]}"] = node
    return out


def managed_keys(observed: Obj, *path: str, manager: str = FIELD_MANAGER) -> set[str]:
    """The map keys under ``path`` (e.g. "metadata", "labels") that ``manager`` applied,
    read from ``metadata.managedFields`` (fieldsV1)."""
    keys: set[str] = set()
    for entry in bodies.applied_fields(observed, manager):
        node: object = entry.get("fieldsV1") or {}
        for part in path:
            node = node.get(f"f:{part}") if isinstance(node, Mapping) else None
        if isinstance(node, Mapping):
            keys.update(k[2:] for k in node if isinstance(k, str) and k.startswith("f:"))
    return keys


def _is_secret(obj: Obj) -> bool:
    return obj.get("apiVersion") == "v1" and obj.get("kind") == "Secret"


def needs_apply(desired: Obj, observed: Obj | None, *, whole: Collection[Path] = ()) -> bool:
    """Would server-side applying ``desired`` change ``observed``? (pure; see module doc)"""
    if observed is None:
        return True
    for field, sent_map in (
        ("labels", bodies.labels(desired)),
        ("annotations", bodies.annotations(desired)),
    ):
        if managed_keys(observed, "metadata", field) - set(sent_map):
            return True
    if _is_secret(desired):
        sent = set(bodies.data(desired)) | set(bodies.string_data(desired))
        want = secret_data(desired)
        if sent - set(want):
            return True  # a value that is not base64 is never in sync
        observed_data = bodies.data(observed)
        have = secret_data({"data": observed_data})
        digests = {k: v for k, v in observed_data.items() if isinstance(v, DataDigest)}
        for k, v in want.items():
            digest = digests.get(k)
            if (have.get(k) != v) if digest is None else (digest != DataDigest.of(v)):
                return True
        if ("data",) in whole and sent != set(observed_data):
            return True
        owned = managed_keys(observed, "data") | managed_keys(observed, "stringData")
        if (owned & (set(have) | set(digests))) - set(want):
            return True
        rest = {k: v for k, v in desired.items() if k not in ("data", "stringData")}
    else:
        rest = dict(desired)
        if "data" in desired and isinstance(desired["data"], Mapping):
            sent = set(desired["data"])
            if (managed_keys(observed, "data") & set(bodies.data(observed))) - sent:
                return True
    return not _covers(rest, observed, (), whole)
