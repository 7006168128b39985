"""Read-modify-write of one object, done again when another writer got there first
(client-go's ``retry.RetryOnConflict`` around a Get and an Update).

``write_conditionally(api, res, name, namespace=..., body=..., tries=...)`` reads the object,
asks ``body(current)`` (``current`` None: it does not exist) what it should be, then creates
it or replaces it at the resourceVersion read. A write that lost a race (Conflict on the
replace, AlreadyExists on the create, NotFound when it was deleted meanwhile) starts over
from a fresh read, so nothing another writer wrote in between is lost. After ``tries``
rounds it raises ``Conflict``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from atlasd.kube import bodies
from atlasd.kube.api import KubeApi, Obj
from atlasd.kube.errors import AlreadyExists, Conflict, NotFound
from atlasd.kube.resources import ApiResource


async def write_conditionally(
    api: KubeApi,
    res: ApiResource,
    name: str,
    *,
    namespace: str,
    body: Callable[[Obj | None], Mapping[str, Any]],
    tries: int,
) -> None:
    """See the module docstring."""
    for _ in range(tries):
        try:
            current: Obj | None = await api.get(res, name, namespace=namespace)
        except NotFound:
            current = None
        wanted = dict(body(current))
        try:
            if current is None:
                await api.create(wanted)
            else:
                meta = {**wanted.get("metadata", {})}
                meta["resourceVersion"] = bodies.resource_version(current)
                await api.replace({**wanted, "metadata": meta})
        except (Conflict, AlreadyExists, NotFound):
            continue
        return
    raise Conflict(
        status=409,
        reason="Conflict",
        message=f"{name} still changing after {tries} tries",
        verb="update",
        resource=str(res),
        name=name,
        namespace=namespace,
    )
