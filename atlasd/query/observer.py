"""The Thanos Query observer: what Query sees, every ``interval`` seconds, in ``/status``
(``query``), ``atlasd status`` (the QUERY column) and the metrics.

Off unless ``--thanos-query-url`` is given. Each round reads ``GET <url>/api/v1/stores``
(one request, however large the fleet) and joins it with the latest fleet
(``atlasd.query.view``). A Query that cannot be read is reported (``query.error``,
``atlasd_query_up`` 0; logged once per stretch) and the last join is kept, marked stale:
the observer never ends the daemon.

A cluster Query does not see is probed along Query's own path (``atlasd.query.probe``:
StoreAPI ``Info`` through the observability Envoy by the cluster's sidecar authority) and
the hop where it stops is shown with it. Probes cost nothing at rest (only unseen
clusters are probed) and are bounded when many are unseen: at most ``PROBES_PER_ROUND``
per round, ``PROBE_CONCURRENCY`` at a time, taking turns (the longest-unprobed first).
Where the observability Envoy refused a cluster's certificate, one TLS handshake of the
observer's own to the address that Envoy dials reads the certificate offered, and the
finding names it (``atlasd.query.peer``: issuer, subject, names, expiry, and whether
atlasd's CA signed it); that costs a connection per such cluster and round, none at rest.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import time
from collections.abc import Callable

import httpx2
import trio

from atlasd import metrics
from atlasd.dns.endpoints import sidecar_addresses
from atlasd.hub import QueryClusterDoc, QueryDoc, StatusHub
from atlasd.model import OBS_THANOS_PORT, OBSERVABILITY_NODE, Fleet, service_host
from atlasd.query.peer import DOWNSTREAM, describe, presented_certificate
from atlasd.query.probe import HOPS, Finding, probe
from atlasd.query.view import QueryAnswerError, QueryView, join, parse_stores

log = logging.getLogger(__name__)

STATES = ("seen", "unseen", "unknown", "duplicate")
PROBES_PER_ROUND = 32
PROBE_CONCURRENCY = 4
# Past the observability Envoy's 5 s connect timeout, so its reply (the hop) arrives first.
PROBE_WITHIN = 8.0


def query_doc(
    url: str,
    view: QueryView | None,
    *,
    at: float,
    error: str | None,
    probes: dict[str, tuple[Finding, float]] | None = None,
) -> QueryDoc:
    clusters: dict[str, QueryClusterDoc] = {}
    probes = probes or {}
    if view is not None:
        for name, c in view.clusters.items():
            found = probes.get(name)
            clusters[name] = {
                "seen": c.seen,
                "since": c.since,
                "error": c.error,
                "stores": list(c.stores),
                "labels": [dict(ls) for ls in c.labels],
                "min_time": c.min_time,
                "max_time": c.max_time,
                "duplicate_of": list(c.duplicate_of),
                "probe": None
                if found is None or c.seen
                else {
                    "hop": found[0].hop,
                    "detail": found[0].detail,
                    "fix": found[0].fix,
                    "at": found[1],
                },
            }
    return {
        "url": url,
        "up": error is None,
        "error": error,
        "at": at,
        "counts": view.counts() if view is not None else {},
        "clusters": clusters,
        "unknown": [
            {"store": store, "cluster": list(labels)}
            for store, labels in sorted((view.unknown if view is not None else {}).items())
        ],
    }


async def probe_unseen(
    fleet: Fleet,
    view: QueryView,
    probes: dict[str, tuple[Finding, float]],
    *,
    via: str | None,
    now: float,
    limit: int = PROBES_PER_ROUND,
    downstream_port: Callable[[str], int] | None = None,
) -> None:
    """Probe up to ``limit`` clusters ``view`` has not seen, the longest-unprobed first;
    record each finding (and forget clusters that are seen or gone) in ``probes``.
    ``downstream_port``: the port the observability Envoy dials a cluster's Thanos
    listener on (None: a refused certificate is not fetched to be named)."""
    unseen = {n for n, c in view.clusters.items() if not c.seen and n in fleet.clusters}
    for name in [n for n in probes if n not in unseen]:
        del probes[name]
    turn = sorted(unseen, key=lambda n: (probes[n][1] if n in probes else 0.0, n))[:limit]
    s = fleet.settings
    limiter = trio.CapacityLimiter(PROBE_CONCURRENCY)

    async def one(name: str) -> None:
        authority = service_host(
            fleet.clusters[name].sidecar_service(0), s.namespace, s.cluster_domain
        )
        async with limiter:
            found = await probe(
                name,
                address=via or f"{authority}:{OBS_THANOS_PORT}",
                authority=authority,
                within=PROBE_WITHIN,
            )
            if found.refused == DOWNSTREAM and downstream_port is not None:
                found = await _name_certificate(fleet, name, found, downstream_port(name))
        probes[name] = (found, now)

    # Each probe on a connection of its own (see probe._exchange: concurrent calls must
    # not share one over HTTP/2), at most PROBE_CONCURRENCY open at once.
    async with trio.open_nursery() as n:
        for name in turn:
            n.start_soon(one, name)
    hops = dict.fromkeys(HOPS, 0)
    for found, _ in probes.values():
        hops[found.hop] += 1
    for hop, count in hops.items():
        metrics.QUERY_PROBES.labels(hop).set(count)


async def _name_certificate(fleet: Fleet, name: str, found: Finding, port: int) -> Finding:
    """``found`` (the observability Envoy refused ``name``'s certificate), with what
    that certificate is, read as that Envoy would: its client certificate presented."""
    atlas = fleet.identities.get(OBSERVABILITY_NODE)
    cert = await presented_certificate(
        fleet.clusters[name].external_ip,
        port,
        within=PROBE_WITHIN,
        identity=atlas.client if atlas is not None else None,
    )
    if cert is None or fleet.pki is None:
        return found
    what = describe(cert, trust_bundle=fleet.pki.trust_bundle, now=dt.datetime.now(dt.UTC))
    return dataclasses.replace(found, detail=f"{found.detail}; it presents: {what}")


async def run_query_observer(
    *,
    url: str,
    interval: float,
    fleet: Callable[[], Fleet | None],
    hub: StatusHub,
    probe_via: str | None = None,
    downstream_port: Callable[[str], int] | None = None,
    clock: Callable[[], float] = time.time,
    transport: httpx2.AsyncBaseTransport | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Observe Thanos Query at ``url`` until cancelled. ``probe_via``: where unseen
    clusters are probed (host:port of the observability Envoy's Thanos listener; None:
    each cluster's sidecar Service, as Thanos Query dials it). ``downstream_port``: see
    ``probe_unseen``."""
    probes: dict[str, tuple[Finding, float]] = {}
    stores_url = url.rstrip("/") + "/api/v1/stores"
    view: QueryView | None = None
    failing: str | None = None
    # The fleet the sidecar addresses were computed for, and them.
    addressed: tuple[Fleet | None, dict[str, str]] = (None, {})
    task_status.started()
    async with httpx2.AsyncClient(timeout=10, transport=transport) as client:
        while True:
            current = fleet()
            if current is not None:
                if addressed[0] is not current:
                    addressed = (current, sidecar_addresses(current))
                now = clock()
                error: str | None = None
                try:
                    resp = await client.get(stores_url)
                    resp.raise_for_status()
                    stores = parse_stores(resp.content)
                except (httpx2.HTTPError, QueryAnswerError) as exc:
                    error = f"{stores_url}: {exc}"
                else:
                    view = join(stores, addressed[1], current.clusters, now=now, previous=view)
                if error is not None and error != failing:
                    log.warning("Thanos Query not read (keeping the last view): %s", error)
                elif error is None and failing is not None:
                    log.info("Thanos Query read again at %s", stores_url)
                failing = error
                metrics.QUERY_UP.set(0 if error else 1)
                counts = view.counts() if view is not None else {}
                for state in STATES:
                    metrics.QUERY_CLUSTERS.labels(state).set(counts.get(state, 0))
                if view is not None and error is None:
                    # Shown at once, then with where each unseen cluster's path stops.
                    hub.publish(query=query_doc(url, view, at=now, error=error, probes=probes))
                    await probe_unseen(
                        current, view, probes, via=probe_via, now=clock(),
                        downstream_port=downstream_port,
                    )  # fmt: skip
                hub.publish(query=query_doc(url, view, at=now, error=error, probes=probes))
            await trio.sleep(interval)
