"""The Thanos Query observer: what Query sees, every ``interval`` seconds, in ``/status``
(``query``), ``atlasd status`` (the QUERY column) and the metrics.

Off unless ``--thanos-query-url`` is given. Each round reads ``GET <url>/api/v1/stores``
(one request, however large the fleet) and joins it with the latest fleet
(``atlasd.query.view``). A Query that cannot be read is reported (``query.error``,
``atlasd_query_up`` 0; logged once per stretch) and the last join is kept, marked stale:
the observer never ends the daemon.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import httpx
import trio

from atlasd import metrics
from atlasd.dns.endpoints import sidecar_addresses
from atlasd.hub import QueryClusterDoc, QueryDoc, StatusHub
from atlasd.model import Fleet
from atlasd.query.view import QueryAnswerError, QueryView, join, parse_stores

log = logging.getLogger(__name__)

STATES = ("seen", "unseen", "unknown", "duplicate")


def query_doc(url: str, view: QueryView | None, *, at: float, error: str | None) -> QueryDoc:
    clusters: dict[str, QueryClusterDoc] = {}
    if view is not None:
        for name, c in view.clusters.items():
            clusters[name] = {
                "seen": c.seen,
                "since": c.since,
                "error": c.error,
                "stores": list(c.stores),
                "labels": [dict(ls) for ls in c.labels],
                "min_time": c.min_time,
                "max_time": c.max_time,
                "duplicate_of": list(c.duplicate_of),
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


async def run_query_observer(
    *,
    url: str,
    interval: float,
    fleet: Callable[[], Fleet | None],
    hub: StatusHub,
    clock: Callable[[], float] = time.time,
    transport: httpx.AsyncBaseTransport | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Observe Thanos Query at ``url`` until cancelled."""
    stores_url = url.rstrip("/") + "/api/v1/stores"
    view: QueryView | None = None
    failing: str | None = None
    # The fleet the sidecar addresses were computed for, and them.
    addressed: tuple[Fleet | None, dict[str, str]] = (None, {})
    task_status.started()
    async with httpx.AsyncClient(timeout=10, transport=transport) as client:
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
                except (httpx.HTTPError, QueryAnswerError) as exc:
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
                hub.publish(query=query_doc(url, view, at=now, error=error))
            await trio.sleep(interval)
