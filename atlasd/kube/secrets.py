"""The data of a Secret: the one place it is decoded and encoded.

Pure. ``data`` holds base64 text; ``stringData`` (write-only: the API server merges it into
``data`` and never returns it) holds text. Both readers of stored PKI material
(``atlasd.fleet``, ``atlasd.reconcile.pki``) and the comparison that decides whether a
write is needed (``atlasd.kube.apply``) read Secrets through ``secret_data``, so a value
that is not base64 means the same everywhere: it is absent (an API server never returns
one; a hand-edited standalone store might). ``needs_apply`` counts a desired value that does
not decode as a difference, so a write (and its error) happens rather than a silent skip.

``DataDigest``: a cache may keep a Secret's data values only as their SHA-256 when nothing
but that comparison reads them (``digest_data``; the informers do it for the Envoy values
Secrets, ~7 KB each, ~70 MiB of the cache at 10,000 clusters). ``secret_data`` leaves a
digest out like any value that is not base64; ``needs_apply`` compares digests.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Mapping
from typing import Any

from atlasd.kube import bodies


class DataDigest(str):
    """A Secret data value kept only as ``sha256:<hex>`` of its decoded bytes (a ``str``, so
    a cached object stays JSON; never base64, as ``:`` is not in its alphabet)."""

    __slots__ = ()

    @classmethod
    def of(cls, value: bytes) -> DataDigest:
        return cls("sha256:" + hashlib.sha256(value).hexdigest())


def digest_data(obj: dict[str, Any]) -> dict[str, Any]:
    """``obj`` with each base64 ``data`` value replaced by its ``DataDigest`` (others kept)."""
    data = obj.get("data")
    if not isinstance(data, dict) or not data:
        return obj
    out: dict[str, Any] = {}
    for key, value in data.items():
        decoded = None if isinstance(value, DataDigest) else _decode(value)
        out[key] = value if decoded is None else DataDigest.of(decoded)
    return {**obj, "data": out}


def _decode(value: object) -> bytes | None:
    if not isinstance(value, str) or isinstance(value, DataDigest):
        return None
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return None


def secret_data(obj: Mapping[str, Any] | None) -> dict[str, bytes]:
    """A Secret's content as bytes: ``data`` decoded, ``stringData`` encoded, the latter
    winning on a shared key (as the API server merges them). A ``data`` value that is not
    base64 text is left out."""
    out: dict[str, bytes] = {}
    if not obj:
        return out
    for key, value in bodies.data(obj).items():
        decoded = _decode(value)
        if decoded is not None:
            out[str(key)] = decoded
    for key, value in bodies.string_data(obj).items():
        out[str(key)] = str(value).encode()
    return out


def encode_secret_data(values: Mapping[str, bytes | str]) -> dict[str, str]:
    """``data`` for a Secret: every value base64-encoded, keys sorted."""
    return {
        k: base64.b64encode(v if isinstance(v, bytes) else v.encode()).decode("ascii")
        for k, v in sorted(values.items())
    }
