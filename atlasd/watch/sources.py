"""The watched object sets, as one subsystem: an informer per role, feeding one sink.

``run_sources(api, roles, sink=...)`` lists and watches each ``Role`` (a resource and the
label selector the API server filters by; ``atlasd.fleet.keys.roles``) and hands every
cache change to ``sink.changed(role, name, obj)`` (``obj`` None: gone), and every relist to
``sink.relisted(role)``. It reports started once every informer has listed. The API may be a
real API server (``KubeClient``) or a directory (``atlasd.standalone.FileStore``, whose
watch polls): the same code either way.

Cached objects keep, of ``metadata.managedFields``, only atlasd's own entries: those are
what ``atlasd.kube.apply.needs_apply`` reads to notice fields atlasd stopped sending; the
other managers' entries are about half of an object's size and nothing reads them.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import trio

from atlasd.kube.api import KubeApi
from atlasd.labels import FIELD_MANAGER
from atlasd.watch.informer import Change, Informer
from atlasd.watch.role import Role

log = logging.getLogger(__name__)

Obj = dict[str, Any]


class Sink(Protocol):
    def changed(self, role: Role, name: str, obj: Obj | None) -> None: ...

    def relisted(self, role: Role) -> None: ...


def keep_own_managed_fields(obj: Obj) -> Obj:
    """Drop the ``managedFields`` entries of every manager but atlasd."""
    meta = obj.get("metadata")
    if isinstance(meta, dict) and "managedFields" in meta:
        own = [
            e
            for e in meta["managedFields"] or ()
            if isinstance(e, dict) and e.get("manager") == FIELD_MANAGER
        ]
        if own:
            meta["managedFields"] = own
        else:
            del meta["managedFields"]
    return obj


def _handler(role: Role, sink: Sink) -> Callable[[Change], None]:
    def on_change(change: Change) -> None:
        sink.changed(role, change.key, None if change.type == "DELETED" else change.obj)

    return on_change


async def run_sources(
    api: KubeApi,
    roles: Sequence[Role],
    *,
    namespace: str,
    sink: Sink,
    on_error: Callable[[Role, Exception | None], None] | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run an informer per role until cancelled; started once all have listed."""
    informers: list[tuple[Role, Informer]] = []
    for role in roles:
        inf = Informer(
            api,
            role.resource,
            namespace=namespace,
            label_selector=role.selector,
            transform=keep_own_managed_fields,
        )
        inf.subscribe(_handler(role, sink))
        inf.subscribe_relists(functools.partial(sink.relisted, role))
        if on_error is not None:
            inf.on_error = functools.partial(on_error, role)
        informers.append((role, inf))
    async with trio.open_nursery() as nursery:
        for _, inf in informers:
            nursery.start_soon(inf.run)
        for _, inf in informers:
            await inf.wait_synced()
        log.info("watching %s", ", ".join(f"{r.name} ({r.selector})" for r, _ in informers))
        task_status.started()
