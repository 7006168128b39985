"""Label selectors: the one parser of selector text, and matching labels against one.

Both grammars split the text the same way (``entries``: at commas, each entry stripped of
the whitespace around it, as ``str.strip`` does: spaces, tabs, newlines):

- the API server's ``?labelSelector=`` (``parse_terms``, ``matches``, ``object_matches``):
  terms ``k=v`` / ``k==v``, ``k!=v``, ``k`` (exists) or ``!k`` (does not exist), empty
  entries skipped; an empty selector matches everything. Set-based terms (``in``,
  ``notin``) are not used by atlasd. The standalone store answers LISTs with it, and the
  fleet files objects by role with it when it is handed plain lists.
- atlasd's own selectors (``parse_selector``: annotation ``goatlas.io/envoy-selectors``,
  ``Settings.alertmanager_selector`` and their command-line options): ``k=v[,k=v...]``
  and nothing else, checked strictly (each key a qualified label key, each value a
  non-empty label value, no key twice, not empty: an empty selector would match every
  pod); ``pairs_match`` matches labels against the pairs.

Pure.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping
from typing import Any, Literal

from atlasd.kube import bodies

# Kubernetes' limits on a label key's name part and a label value (63) and on a key's
# prefix (a DNS subdomain, 253).
LABEL_NAME_MAX = 63
LABEL_PREFIX_MAX = 253

_LABEL_NAME = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?")
_DNS1123_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")

Op = Literal["=", "!=", "exists", "!exists"]
Term = tuple[Op, str, str]
"""(operator, key, value) of one API-server selector term (value "" for existence)."""


def entries(text: str) -> list[str]:
    """The comma-separated entries of a selector, whitespace around each removed."""
    return [raw.strip() for raw in text.split(",")]


# --- the API server's grammar ---


@functools.lru_cache(maxsize=128)
def parse_terms(selector: str) -> tuple[Term, ...]:
    """The terms of an API-server label selector (lenient: malformed terms are read as
    best they can be, as the fake API servers have always done). Memoized: callers match
    many objects against a handful of selectors."""
    out: list[Term] = []
    for term in entries(selector):
        if not term:
            continue
        if "!=" in term:
            k, v = term.split("!=", 1)
            out.append(("!=", k.strip(), v.strip()))
        elif "=" in term:
            k, v = term.replace("==", "=").split("=", 1)
            out.append(("=", k.strip(), v.strip()))
        elif term.startswith("!"):
            out.append(("!exists", term[1:], ""))
        else:
            out.append(("exists", term, ""))
    return tuple(out)


def matches(labels: Mapping[str, Any], selector: str | None) -> bool:
    """What ``?labelSelector=selector`` answers for an object with ``labels``."""
    if not selector:
        return True
    # One loop, no call per term: this runs for every object a LIST or a role filing sees.
    for op, key, value in parse_terms(selector):
        if op == "=":
            if labels.get(key) != value:
                return False
        elif op == "!=":
            if labels.get(key) == value:
                return False
        elif op == "exists":
            if key not in labels:
                return False
        elif key in labels:  # "!exists"
            return False
    return True


def object_matches(obj: Mapping[str, Any], selector: str | None) -> bool:
    """``matches`` on an object's ``metadata.labels``."""
    return matches(bodies.labels(obj), selector)


# --- atlasd's strict k=v selectors ---


def check_label_key(key: str) -> str:
    """``key`` if it is a qualified label key (``[prefix/]name``); else ValueError."""
    prefix, slash, name = key.rpartition("/")
    if slash and (
        not prefix or len(prefix) > LABEL_PREFIX_MAX or _DNS1123_SUBDOMAIN.fullmatch(prefix) is None
    ):
        raise ValueError(f"{key!r} has an invalid prefix (must be a DNS subdomain)")
    if not name or len(name) > LABEL_NAME_MAX or _LABEL_NAME.fullmatch(name) is None:
        raise ValueError(f"{key!r} is not a valid label key")
    return key


def check_label_value(value: str) -> str:
    """``value`` if it is a non-empty label value; else ValueError."""
    if not value or len(value) > LABEL_NAME_MAX or _LABEL_NAME.fullmatch(value) is None:
        raise ValueError(f"{value!r} is not a valid, non-empty label value")
    return value


def parse_selector(text: str) -> tuple[tuple[str, str], ...]:
    """``k=v,k=v`` -> ((k, v), ...) in the given order; whitespace around an entry is
    tolerated (see ``entries``); raises ValueError with a user-facing message on any
    defect."""
    if not text.strip():
        raise ValueError("must not be empty (an empty selector would match every pod)")
    pairs: list[tuple[str, str]] = []
    seen: set[str] = set()
    for entry in entries(text):
        key, eq, value = entry.partition("=")
        if not eq:
            raise ValueError(f"entry {entry!r} is not of the form key=value")
        check_label_key(key)
        check_label_value(value)
        if key in seen:
            raise ValueError(f"key {key!r} appears twice")
        seen.add(key)
        pairs.append((key, value))
    return tuple(pairs)


def pairs_match(labels: Mapping[str, Any], pairs: Iterable[tuple[str, str]]) -> bool:
    """Whether ``labels`` carry every ``(key, value)`` of ``pairs`` (a ``parse_selector``
    result; no pairs match everything)."""
    return all(labels.get(k) == v for k, v in pairs)
