"""Typed reads of the fields atlasd reads from Kubernetes objects: each field's spelling and
its default live here, and nowhere else.

In the spirit of kopf's ``structs/bodies.py`` (``Body``/``Meta`` views over the raw dict),
but as plain functions: objects stay the dicts the API (or a file) gave
(``atlasd.kube.api.Obj``), and a read allocates nothing, copies nothing and validates
nothing, because these sit on the watch path and the fleet's per-object path. Use them
module-qualified: ``bodies.name(obj)``, ``bodies.labels(obj)``.

Defaults: a field that is absent, or not of its type (a hand-written file in a standalone
store can hold anything), reads as ``""`` (strings) or an empty mapping (maps); a string
field holding another value reads as its ``str``. Raw reads are left where the raw value is
the point: code that must tell "absent" from "malformed" to report it
(``atlasd.fleet.validate``, the standalone store's file checks, a Lease lock's record) and
the informers' ``Compactor``, which rewrites the wire shape before anything reads it.

Writers build new bodies (``atlasd.reconcile.objects``); nothing here writes.
"""

# No ``from __future__ import annotations``: it would bind the name ``annotations`` too.
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from atlasd.kube.api import Obj

EMPTY: Mapping[str, Any] = MappingProxyType({})


def _map(value: Any) -> Mapping[str, Any]:
    # ``type(...) is dict`` first: decoded JSON is dicts, and isinstance against the
    # Mapping ABC costs several times more.
    return value if type(value) is dict or isinstance(value, Mapping) else EMPTY


def _str(value: Any) -> str:
    return value if type(value) is str else ("" if value is None else str(value))


def _meta_str(obj: Obj | None, key: str) -> str:
    # ``meta`` inlined: ``name`` and ``resource_version`` are read for every object the
    # watch delivers (the fleet's key_of, the reconcile's version maps).
    m = None if obj is None else obj.get("metadata")
    if type(m) is not dict and not isinstance(m, Mapping):
        return ""
    return _str(m.get(key))


# -- metadata ---------------------------------------------------------------------------------


def meta(obj: Obj | None) -> Mapping[str, Any]:
    """``metadata``."""
    m = None if obj is None else obj.get("metadata")
    return m if type(m) is dict or isinstance(m, Mapping) else EMPTY


def name(obj: Obj | None) -> str:
    """``metadata.name``."""
    return _meta_str(obj, "name")


def namespace(obj: Obj | None) -> str:
    """``metadata.namespace``."""
    return _meta_str(obj, "namespace")


def uid(obj: Obj | None) -> str:
    """``metadata.uid``."""
    return _meta_str(obj, "uid")


def resource_version(obj: Obj | None) -> str:
    """``metadata.resourceVersion`` (opaque: compare for equality only); of a list, the
    version it was read at."""
    return _meta_str(obj, "resourceVersion")


def list_continue(obj: Obj | None) -> str:
    """A list page's ``metadata.continue`` ("" on the last page)."""
    return _meta_str(obj, "continue")


def creation_timestamp(obj: Obj | None) -> str:
    """``metadata.creationTimestamp`` as the API wrote it (RFC 3339, UTC: sorts as text)."""
    return _meta_str(obj, "creationTimestamp")


def labels(obj: Obj | None) -> Mapping[str, Any]:
    """``metadata.labels`` (values as stored: a standalone store's may not be strings)."""
    return _map(meta(obj).get("labels"))


def annotations(obj: Obj | None) -> Mapping[str, Any]:
    """``metadata.annotations`` (values as stored)."""
    return _map(meta(obj).get("annotations"))


def label(obj: Obj | None, key: str) -> str | None:
    """The value of label ``key``, as text; None when the object has no such label."""
    value = labels(obj).get(key)
    return None if value is None else _str(value)


def applied_fields(obj: Obj | None, manager: str) -> list[Mapping[str, Any]]:
    """The ``metadata.managedFields`` entries of ``manager``'s server-side applies (their
    ``fieldsV1`` say which fields it sent)."""
    entries = meta(obj).get("managedFields")
    if type(entries) is not list:
        return []
    return [
        e
        for e in entries
        if (type(e) is dict or isinstance(e, Mapping))
        and e.get("manager") == manager
        and e.get("operation") == "Apply"
    ]


# -- the rest of the body ------------------------------------------------------------------------


def spec(obj: Obj | None) -> Mapping[str, Any]:
    """``spec``."""
    return EMPTY if obj is None else _map(obj.get("spec"))


def data(obj: Obj | None) -> Mapping[str, Any]:
    """``data`` as stored (a Secret's values base64: decode with ``atlasd.kube.secrets``)."""
    return EMPTY if obj is None else _map(obj.get("data"))


def string_data(obj: Obj | None) -> Mapping[str, Any]:
    """A Secret's ``stringData`` (write-only on the API server: set in desired bodies)."""
    return EMPTY if obj is None else _map(obj.get("stringData"))
