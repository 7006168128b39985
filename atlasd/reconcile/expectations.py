"""Expectations: after writing a key's objects, wait for the watch to show them.

client-go's ``ControllerExpectations`` (``pkg/controller/controller_utils.go``), keyed by
object instead of counted: when the leader writes, it records per key what the watch cache
must come to hold — each written object at the resourceVersion the API server returned, each
deleted object gone. Until then (or until a deadline passes, or an informer relists — a
LIST is at least as new as any write that completed before it) the key is not acted on
again: a cache that lags the leader's own writes must not make it issue certificates twice.

resourceVersions are compared for equality only (they are opaque). A watch delivers a
key's events in order, so an older version of an object arriving after the write simply
does not satisfy the expectation; the written one follows. Pure; the clock is passed in.

A full pass's LIST may be older than a write that completes while it is in flight: it can
show an object the leader has deleted since, at a version the cache will never come to
show. So while a LIST is in flight (``begin_list`` .. ``end_list``), the objects the leader
writes or deletes are remembered, and the pass expects nothing of them (the write's own
expectation stands). Without this, a cluster scaled down during a full pass waited for its
removed sidecar Services' old versions until the 30 s deadline.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from atlasd.fleet.keys import ObjectId

# What is expected of an object (kind, name): a resourceVersion, or None: gone.


@dataclass(frozen=True)
class _Expected:
    objects: Mapping[ObjectId, str | None]
    deadline: float


class Expectations:
    """Per key: what the cache must show before the key is acted on again."""

    def __init__(self, *, timeout: float = 30.0) -> None:
        self.timeout = timeout
        self._by_key: dict[str, _Expected] = {}
        self._since_list: set[ObjectId] | None = None

    def __len__(self) -> int:
        return len(self._by_key)

    def expect(self, key: str, objects: Mapping[ObjectId, str | None], *, now: float) -> None:
        """Record the writes just made for ``key`` (merged with any still pending)."""
        if self._since_list is not None:
            self._since_list.update(objects)
        if not objects:
            return
        merged = dict(self._by_key[key].objects) if key in self._by_key else {}
        merged.update(objects)
        self._by_key[key] = _Expected(merged, now + self.timeout)

    def begin_list(self) -> None:
        """A full pass's LIST is about to be sent: remember what is written from now on."""
        self._since_list = set()

    def end_list(self) -> frozenset[ObjectId]:
        """The objects written or deleted since ``begin_list`` (the LIST may show them as
        they were before): what the pass must not expect anything of."""
        written = frozenset(self._since_list or ())
        self._since_list = None
        return written

    def pending(
        self, key: str, observed: Callable[[ObjectId], str | None], *, now: float
    ) -> float | None:
        """None when ``key`` may be acted on (forgetting its expectations); otherwise the
        deadline at which it may be anyway. ``observed(id)`` is the cached
        resourceVersion of an object (None: not in the cache)."""
        exp = self._by_key.get(key)
        if exp is None:
            return None
        if now >= exp.deadline or all(observed(oid) == rv for oid, rv in exp.objects.items()):
            del self._by_key[key]
            return None
        return exp.deadline

    def clear(self, kind: str | None = None) -> None:
        """Forget what is expected of objects of ``kind`` (all when None): its informer
        relisted, so its cache is as new as every write made before."""
        if kind is None:
            self._by_key.clear()
            return
        for key, exp in list(self._by_key.items()):
            rest = {oid: rv for oid, rv in exp.objects.items() if oid[0] != kind}
            if rest:
                self._by_key[key] = _Expected(rest, exp.deadline)
            else:
                del self._by_key[key]

    def forget(self, key: str) -> None:
        self._by_key.pop(key, None)
