"""What Thanos Query sees, joined with the fleet: seen, not seen, unknown, duplicates."""

from __future__ import annotations

import json
from typing import Any

import httpx2
import pytest
import trio
from prometheus_client import REGISTRY

from atlasd.cli.status import render_status
from atlasd.dns.endpoints import sidecar_addresses
from atlasd.hub import StatusHub
from atlasd.model import DownstreamCluster, Fleet, ServicePort, Settings
from atlasd.query.observer import run_query_observer
from atlasd.query.view import QueryAnswerError, join, parse_stores

SETTINGS = Settings(namespace="monitoring")


def fleet(*names: str) -> Fleet:
    return Fleet.of(
        SETTINGS,
        [
            DownstreamCluster(
                name=n, external_ip=f"192.0.2.{i + 1}", ports=(ServicePort("thanos", 10901),)
            )
            for i, n in enumerate(names)
        ],
    )


def addr(name: str) -> str:
    return f"{name}-thanos-sidecar0.monitoring.svc.cluster.local:10901"


def store(name: str, *, error: str | None = None, **labels: str) -> dict[str, Any]:
    # The shape of Thanos v0.39's EndpointStatus (pkg/query/endpointset.go).
    return {
        "name": name,
        "lastCheck": "2026-12-05T08:00:00Z",
        "lastError": error,
        "labelSets": [labels] if labels else [],
        "minTime": 1000,
        "maxTime": 9223372036854775807,
    }


def answer(*stores: dict[str, Any]) -> bytes:
    return json.dumps({"status": "success", "data": {"sidecar": list(stores)}}).encode()


def test_seen_unseen_unknown_and_duplicates() -> None:
    fl = fleet("east", "west", "north", "south")
    stores = parse_stores(
        answer(
            store(addr("east"), cluster="east"),
            # west's store answers with an error: not seen, and why.
            store(addr("west"), error="rpc error: code = Unavailable desc = connection refused"),
            # north is not in Query at all; south announces east's labels.
            store(addr("south"), cluster="east"),
            # A store atlasd does not serve.
            store("thanos-store.monitoring.svc:10901", cluster="archive"),
        )
    )
    view = join(stores, sidecar_addresses(fl), fl.clusters, now=100.0)
    c = view.clusters
    assert c["east"].seen and c["east"].since == 100.0 and c["east"].min_time == 1000
    assert not c["west"].seen and "connection refused" in str(c["west"].error)
    assert not c["north"].seen and c["north"].error == "no store in Thanos Query"
    assert c["east"].duplicate_of == (addr("south"),)
    assert c["south"].duplicate_of == (addr("east"),)
    assert dict(view.unknown) == {"thanos-store.monitoring.svc:10901": ("archive",)}
    assert view.counts() == {"seen": 2, "unseen": 2, "unknown": 1, "duplicate": 2}

    # "since" holds while the state holds, and restarts when it changes.
    again = parse_stores(answer(store(addr("east"), cluster="east")))
    later = join(again, sidecar_addresses(fl), fl.clusters, now=200.0, previous=view)
    assert later.clusters["east"].since == 100.0
    assert later.clusters["west"].since == 100.0  # still not seen
    gone = join([], sidecar_addresses(fl), fl.clusters, now=300.0, previous=later)
    assert gone.clusters["east"].since == 300.0 and not gone.clusters["east"].seen


def test_a_store_at_another_address_is_matched_by_its_cluster_label() -> None:
    fl = fleet("east")
    stores = parse_stores(answer(store("10.0.0.7:10901", cluster="east")))
    view = join(stores, sidecar_addresses(fl), fl.clusters, now=1.0)
    assert view.clusters["east"].seen and view.unknown == {}


@pytest.mark.parametrize(
    "body",
    [b"<html>", b'{"status": "error"}', b'{"status": "success", "data": 3}', b"[]"],
)
def test_what_is_not_the_stores_document_is_said(body: bytes) -> None:
    with pytest.raises(QueryAnswerError):
        parse_stores(body)


async def test_the_observer_publishes_and_survives_a_query_that_fails() -> None:
    replies: list[httpx2.Response] = [
        httpx2.Response(200, content=answer(store(addr("east"), cluster="east"))),
        httpx2.Response(503, text="down"),
    ]

    def handler(request: httpx2.Request) -> httpx2.Response:
        assert request.url.path == "/api/v1/stores"
        return replies.pop(0) if replies else httpx2.Response(200, content=answer())

    hub = StatusHub()
    fl = fleet("east", "west")
    async with trio.open_nursery() as nursery:
        await nursery.start(
            lambda task_status: run_query_observer(
                url="http://query:10902/",
                interval=0.01,
                fleet=lambda: fl,
                hub=hub,
                transport=httpx2.MockTransport(handler),
                task_status=task_status,
            )
        )
        with trio.fail_after(5):
            while "query" not in hub.snapshot():  # noqa: ASYNC110 - the hub has no event here
                await trio.sleep(0.005)
        doc = hub.snapshot()["query"]
        assert doc["up"] and doc["counts"]["seen"] == 1 and doc["counts"]["unseen"] == 1
        assert REGISTRY.get_sample_value("atlasd_query_clusters", {"state": "unseen"}) == 1
        text = render_status({"clusters": [
            {"name": "east", "external_ip": "192.0.2.1", "replicas": 1, "sidecars": []},
            {"name": "west", "external_ip": "192.0.2.2", "replicas": 1, "sidecars": []},
        ], "query": doc})  # fmt: skip
        assert "QUERY" in text and "NOT SEEN: no store in Thanos Query" in text
        with trio.fail_after(5):
            while hub.snapshot()["query"]["up"]:  # noqa: ASYNC110
                await trio.sleep(0.005)
        failed = hub.snapshot()["query"]
        assert "503" in str(failed["error"]) and failed["counts"]["seen"] == 1  # last view kept
        assert REGISTRY.get_sample_value("atlasd_query_up") == 0
        assert "NOT READ" in render_status({"query": failed})
        nursery.cancel_scope.cancel()
