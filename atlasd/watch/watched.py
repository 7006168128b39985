"""A watched set of objects: the resource and the label selector the API server filters by.

Pure (no trio, no httpx2), so the fleet's decisions (``atlasd.fleet.keys.roles``) can name
the sets the informers of ``atlasd.watch.sources`` watch.
"""

from __future__ import annotations

from dataclasses import dataclass

from atlasd.kube.resources import ApiResource


@dataclass(frozen=True)
class WatchedSet:
    """One watched set of objects (a "role" of the fleet's objects, not the RBAC kind): its
    name, a resource and the label selector that picks them."""

    name: str
    resource: ApiResource
    selector: str
    digest_suffixes: tuple[str, ...] = ()
    """Secrets whose name ends with one of these are cached with their data values as
    digests (``atlasd.kube.secrets.digest_data``): nothing reads them but the comparison
    that decides whether a write is needed."""
