"""What Thanos Query sees, joined with what atlasd serves. Pure (no I/O).

Thanos Query (v0.39) lists its endpoints at ``GET /api/v1/stores``
(``pkg/api/query/v1.go`` ``stores``): ``{"status": "success", "data": {<component>:
[EndpointStatus...]}}`` with each ``EndpointStatus`` (``pkg/query/endpointset.go``)
``{"name": <address>, "lastCheck": <RFC 3339>, "lastError": <string or null>,
"labelSets": [{<label>: <value>, ...}, ...], "minTime": <ms>, "maxTime": <ms>}``.

A store is matched to a served cluster by its address first: every sidecar address
atlasd publishes (the zone's SRV targets, the endpoint configuration's lines:
``<c>-thanos-sidecar<i>.<ns>.svc.<domain>:<port>``) names its cluster, so a store that
never answered (no label sets yet) is still attributed. A store at another address is
matched by its ``cluster`` external label (``QUERY_CLUSTER_LABEL``). What is left is
**unknown**: a store Query sees that atlasd does not serve.

Per served cluster: **seen** (Query has a store for it without error), since when
(the first observation of the current state: a state change resets it), the store's
error otherwise, its label sets and time range. **Duplicates**: one external label set
announced by more than one store of different clusters (Thanos deduplicates or drops such
stores silently: thanos#689, #5705): reported on every store and cluster involved.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

QUERY_CLUSTER_LABEL = "cluster"


class QueryAnswerError(ValueError):
    """Thanos Query's answer is not the stores document (the URL is not Thanos Query's
    API, or a proxy answered)."""


@dataclass(frozen=True)
class Store:
    """One endpoint as Thanos Query reports it."""

    name: str
    error: str | None
    label_sets: tuple[tuple[tuple[str, str], ...], ...]
    min_time: int | None
    max_time: int | None

    def labels(self, name: str) -> set[str]:
        return {v for ls in self.label_sets for k, v in ls if k == name}


def parse_stores(body: bytes | str) -> list[Store]:
    """The stores of ``GET /api/v1/stores``; ``QueryAnswerError`` if it is not that."""
    try:
        doc = json.loads(body)
    except ValueError as exc:
        raise QueryAnswerError(f"not JSON ({exc})") from None
    if not isinstance(doc, dict) or doc.get("status") != "success":
        raise QueryAnswerError("not a successful Thanos Query API answer")
    data = doc.get("data")
    if not isinstance(data, dict):
        raise QueryAnswerError("no data object (is this Thanos Query's /api/v1/stores?)")
    out: list[Store] = []
    for group in data.values():
        if not isinstance(group, list):
            raise QueryAnswerError("data holds a non-list")
        for raw in group:
            if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
                raise QueryAnswerError("a store without a name")
            out.append(_store(raw))
    return out


def _store(raw: Mapping[str, Any]) -> Store:
    error = raw.get("lastError")
    sets: list[tuple[tuple[str, str], ...]] = []
    for ls in raw.get("labelSets") or ():
        if isinstance(ls, dict):
            sets.append(tuple(sorted((str(k), str(v)) for k, v in ls.items())))
    return Store(
        name=raw["name"],
        error=str(error) if error else None,
        label_sets=tuple(sets),
        min_time=_int(raw.get("minTime")),
        max_time=_int(raw.get("maxTime")),
    )


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


@dataclass(frozen=True)
class ClusterSight:
    """One served cluster as Thanos Query sees it."""

    seen: bool
    since: float
    stores: tuple[str, ...] = ()
    error: str | None = None
    labels: tuple[tuple[tuple[str, str], ...], ...] = ()
    min_time: int | None = None
    max_time: int | None = None
    duplicate_of: tuple[str, ...] = ()


@dataclass(frozen=True)
class QueryView:
    """The join at one observation."""

    clusters: Mapping[str, ClusterSight]
    # Stores Query sees that atlasd does not serve: address -> its cluster label(s).
    unknown: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    # Label sets announced by stores of more than one cluster: the stores.
    duplicates: Mapping[tuple[tuple[str, str], ...], tuple[str, ...]] = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        seen = sum(1 for c in self.clusters.values() if c.seen)
        return {
            "seen": seen,
            "unseen": len(self.clusters) - seen,
            "unknown": len(self.unknown),
            "duplicate": sum(1 for c in self.clusters.values() if c.duplicate_of),
        }


def join(
    stores: Iterable[Store],
    addresses: Mapping[str, str],
    served: Iterable[str],
    *,
    now: float,
    previous: QueryView | None = None,
) -> QueryView:
    """Join Query's ``stores`` with the ``served`` clusters; ``addresses`` maps each
    sidecar address atlasd publishes to its cluster. ``previous`` keeps each cluster's
    ``since`` while its state holds."""
    served_set = set(served)
    by_cluster: dict[str, list[Store]] = {c: [] for c in served_set}
    unknown: dict[str, tuple[str, ...]] = {}
    for store in stores:
        cluster = addresses.get(store.name)
        if cluster is None:
            named = store.labels(QUERY_CLUSTER_LABEL) & served_set
            cluster = next(iter(sorted(named)), None) if len(named) == 1 else None
        if cluster is None or cluster not in served_set:
            unknown[store.name] = tuple(sorted(store.labels(QUERY_CLUSTER_LABEL)))
            continue
        by_cluster[cluster].append(store)
    # One label set announced by the stores of different clusters.
    announced: dict[tuple[tuple[str, str], ...], set[str]] = {}
    holders: dict[tuple[tuple[str, str], ...], set[str]] = {}
    for cluster, own in by_cluster.items():
        for store in own:
            for ls in store.label_sets:
                announced.setdefault(ls, set()).add(cluster)
                holders.setdefault(ls, set()).add(store.name)
    duplicates = {
        ls: tuple(sorted(holders[ls])) for ls, clusters in announced.items() if len(clusters) > 1
    }
    sights: dict[str, ClusterSight] = {}
    for cluster, own in sorted(by_cluster.items()):
        healthy = [s for s in own if s.error is None]
        seen = bool(healthy)
        before = previous.clusters.get(cluster) if previous is not None else None
        since = before.since if before is not None and before.seen == seen else now
        errors = sorted({s.error for s in own if s.error is not None})
        sets = tuple(sorted({ls for s in own for ls in s.label_sets}))
        dup = tuple(
            sorted({name for ls in sets for name in duplicates.get(ls, ())} - {s.name for s in own})
        )
        times = [s for s in healthy if s.min_time is not None and s.max_time is not None]
        sights[cluster] = ClusterSight(
            seen=seen,
            since=since,
            stores=tuple(sorted(s.name for s in own)),
            error=None if seen else (errors[0] if errors else "no store in Thanos Query"),
            labels=sets,
            min_time=min((s.min_time for s in times if s.min_time is not None), default=None),
            max_time=max((s.max_time for s in times if s.max_time is not None), default=None),
            duplicate_of=dup,
        )
    return QueryView(sights, unknown, duplicates)
