"""Label selectors as the API server reads them (equality and existence terms).

``matches(labels, selector)`` answers what ``?labelSelector=`` would: terms separated by
commas, each ``k=v`` / ``k==v``, ``k!=v``, ``k`` (exists) or ``!k`` (does not exist); an
empty selector matches everything. Set-based terms (``in``, ``notin``) are not used by
atlasd. The standalone store answers LISTs with it, and the fleet files objects by role
with it when it is handed plain lists.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def matches(labels: Mapping[str, Any], selector: str | None) -> bool:
    if not selector:
        return True
    for raw in selector.split(","):
        term = raw.strip()
        if not term:
            continue
        if "!=" in term:
            k, v = term.split("!=", 1)
            if labels.get(k.strip()) == v.strip():
                return False
        elif "=" in term:
            k, v = term.replace("==", "=").split("=", 1)
            if labels.get(k.strip()) != v.strip():
                return False
        elif term.startswith("!"):
            if term[1:] in labels:
                return False
        elif term not in labels:
            return False
    return True


def object_matches(obj: Mapping[str, Any], selector: str | None) -> bool:
    """``matches`` on an object's ``metadata.labels``."""
    meta = obj.get("metadata") or {}
    lbls = meta.get("labels") if isinstance(meta, Mapping) else None
    return matches(lbls if isinstance(lbls, Mapping) else {}, selector)
