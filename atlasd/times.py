"""Kubernetes' time format (metav1.Time: RFC 3339, UTC, whole seconds), written and read in
one place: Event timestamps, revocation records and join-token records use it."""

from __future__ import annotations

import datetime as dt

_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


def rfc3339(t: dt.datetime) -> str:
    """``t`` as Kubernetes writes a time: ``2026-12-05T20:55:00Z``."""
    return t.astimezone(dt.UTC).strftime(_FORMAT)


def parse_rfc3339(value: object) -> dt.datetime:
    """A time as ``rfc3339`` writes it (timezone-aware, UTC); ``ValueError`` otherwise."""
    if not isinstance(value, str):
        raise ValueError("not a time string")
    return dt.datetime.strptime(value, _FORMAT).replace(tzinfo=dt.UTC)
