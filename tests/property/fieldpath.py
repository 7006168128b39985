"""``Problem.field`` paths (``spec.ports[1].name``, ``metadata.annotations["k"]``) resolved
against the raw Service they describe."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

_SEGMENT = re.compile(r'\.?([A-Za-z]+)|\[(\d+)\]|\[("(?:[^"\\]|\\.)*")\]')

# Fields validation may name although they are absent: they are required.
REQUIRED = {
    "metadata.name",
    "spec.externalIPs",
    "spec.ports",
    "spec.ports[*].name",
    "spec.ports[*].port",
}


def segments(path: str) -> list[str | int]:
    """``spec.ports[1].name`` -> ["spec", "ports", 1, "name"]; ValueError if malformed."""
    out: list[str | int] = []
    pos = 0
    while pos < len(path):
        m = _SEGMENT.match(path, pos)
        if m is None or (pos == 0 and path.startswith(".")):
            raise ValueError(f"{path!r} is not a field path (at {pos})")
        word, index, key = m.groups()
        out.append(
            word if word is not None else int(index) if index is not None else json.loads(key)
        )
        pos = m.end()
    if not out:
        raise ValueError("empty field path")
    return out


def pattern(path: str) -> str:
    return re.sub(r"\[\d+\]", "[*]", path)


def names_something(service: Mapping[str, Any], path: str) -> bool:
    """True when ``path`` names a value present in ``service`` (null included), or a
    required field that is absent there."""
    node: Any = service
    for seg in segments(path):
        if isinstance(seg, int):
            if not isinstance(node, list) or seg >= len(node):
                return False
            node = node[seg]
        else:
            if not isinstance(node, Mapping):
                return False
            if seg not in node:
                return pattern(path) in REQUIRED
            node = node[seg]
    return True
