"""The watched object sets, as one subsystem: an informer per role, feeding one sink.

``run_sources(api, roles, sink=...)`` lists and watches each ``WatchedSet`` (a resource and the
label selector the API server filters by; ``atlasd.fleet.keys.roles``) and hands every
cache change to ``sink.changed(role, name, obj)`` (``obj`` None: gone), and every relist to
``sink.relisted(role)``. It reports started once every informer has listed. The API may be a
real API server (``KubeClient``) or a directory (``atlasd.standalone.FileStore``, whose
watch polls): the same code either way.

Cached objects are compacted (``Compactor``): of ``metadata.managedFields`` they keep only
atlasd's own ``Apply`` entries and, of those, only what ``atlasd.kube.apply.needs_apply``
reads to notice fields atlasd stopped sending (``atlasd.kube.apply.read_fields``: the keys
under labels, annotations, data and stringData); the other managers' entries and the rest
are about half of an object's size and nothing reads them. What is left of those entries
is the same for every cluster and is stored once, and so is every map key and short string
(JSON decoding makes new strings for each object). A cluster's four cached objects (its
Service, sidecar Service and two Secrets) take 24 KB instead of 43 KB; at 5,000 clusters
that is 95 MB. A role's ``digest_suffixes`` Secrets (the Envoy values) keep their data
values only as digests (``atlasd.kube.secrets.DataDigest``), another ~7 KB per cluster.
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import msgspec
import trio

from atlasd.kube.api import JSON, KubeApi
from atlasd.kube.apply import read_fields
from atlasd.kube.secrets import digest_data
from atlasd.labels import FIELD_MANAGER
from atlasd.memo import Memo
from atlasd.watch.informer import Change, Informer, run_informers
from atlasd.watch.watched import WatchedSet

log = logging.getLogger(__name__)


class Sink(Protocol):
    def changed(self, role: WatchedSet, name: str, obj: JSON | None) -> None: ...

    def relisted(self, role: WatchedSet) -> None: ...


# Distinct managedFields entries kept; beyond it the table starts over (sharing is only a
# saving: atlasd applies a handful of shapes).
_SHARED_MAX = 4096
# Short strings (names, label values, ports' names, "TCP", the CA serial) recur from object
# to object: stored once. Longer ones (certificates, values) are left as they are.
_INTERN_MAX = 64


def _interned(value: Any) -> Any:
    """``value`` with every map key and short string interned (lists and maps rebuilt)."""
    if isinstance(value, dict):
        return {sys.intern(k) if type(k) is str else k: _interned(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_interned(v) for v in value]
    if type(value) is str and len(value) <= _INTERN_MAX:
        return sys.intern(value)
    return value


class Compactor:
    """The transform the informers apply before caching (see the module docstring). The
    objects it returns share parts with each other: nothing may change them in place (no
    one does; writers build new bodies)."""

    def __init__(self) -> None:
        self._shared: Memo[bytes, dict[str, Any]] = Memo(_SHARED_MAX)

    def __call__(self, obj: JSON, digest_suffixes: tuple[str, ...] = ()) -> JSON:
        # The boundary: this rewrites the wire shape before anything reads it, so it reads
        # it raw (through ``atlasd.kube.bodies`` it costs 5% more per watched object).
        meta = obj.get("metadata")
        if digest_suffixes and isinstance(meta, dict):
            name = meta.get("name")
            if isinstance(name, str) and name.endswith(digest_suffixes):
                obj = digest_data(obj)
        fields: list[Any] = []
        if isinstance(meta, dict) and "managedFields" in meta:
            fields = meta["managedFields"] or []
            obj = {**obj, "metadata": {k: v for k, v in meta.items() if k != "managedFields"}}
        out: JSON = _interned(obj)
        entries = [
            self._entry(e)
            for e in fields
            if isinstance(e, dict)
            and e.get("manager") == FIELD_MANAGER
            and e.get("operation") == "Apply"
        ]
        if entries:
            out["metadata"]["managedFields"] = entries
        return out

    def _entry(self, entry: dict[str, Any]) -> dict[str, Any]:
        pruned = {
            "manager": FIELD_MANAGER,
            "operation": "Apply",
            "fieldsV1": read_fields(entry.get("fieldsV1")),
        }
        text = msgspec.json.encode(pruned["fieldsV1"], order="sorted")
        return self._shared.get(text, lambda: _interned(pruned))


def _handler(role: WatchedSet, sink: Sink) -> Callable[[Change], None]:
    def on_change(change: Change) -> None:
        sink.changed(role, change.key, None if change.type == "DELETED" else change.obj)

    return on_change


async def run_sources(
    api: KubeApi,
    roles: Sequence[WatchedSet],
    *,
    namespace: str,
    sink: Sink,
    on_error: Callable[[WatchedSet, Exception | None], None] | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run an informer per role until cancelled; started once all have listed."""
    informers: list[tuple[WatchedSet, Informer]] = []
    compact = Compactor()
    for role in roles:
        inf = Informer(
            api,
            role.resource,
            namespace=namespace,
            label_selector=role.selector,
            transform=(
                functools.partial(compact, digest_suffixes=role.digest_suffixes)
                if role.digest_suffixes
                else compact
            ),
        )
        inf.subscribe(_handler(role, sink))
        inf.subscribe_relists(functools.partial(sink.relisted, role))
        if on_error is not None:
            inf.on_error = functools.partial(on_error, role)
        informers.append((role, inf))
    async with trio.open_nursery() as nursery:
        await nursery.start(run_informers, [inf for _, inf in informers])
        log.info("watching %s", ", ".join(f"{r.name} ({r.selector})" for r, _ in informers))
        task_status.started()
