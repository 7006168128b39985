"""The HTTP endpoint: readiness tells the truth, metrics and the live status stream."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import trio
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from trio_websocket import open_websocket_url

from atlasd.http import StatusApp, run_http
from atlasd.hub import UNHEALTHY_FAILURES, StatusHub


async def _serve(nursery: trio.Nursery, app: StatusApp) -> int:
    async def start(task_status: trio.TaskStatus[int]) -> None:
        await run_http(app, host="127.0.0.1", port=0, task_status=task_status)

    port: int = await nursery.start(start)
    return port


async def test_readyz_follows_every_part_and_healthz_reports_failure() -> None:
    hub = StatusHub()
    hub.expect_ready("informers", "ads")
    app = StatusApp(hub)
    async with trio.open_nursery() as nursery:
        port = await _serve(nursery, app)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as c:
            r = await c.get("/readyz")
            assert r.status_code == 503 and "ads" in r.text and "informers" in r.text
            hub.set_ready("informers", True)
            r = await c.get("/readyz")
            assert r.status_code == 503 and "informers" not in r.text
            hub.set_ready("ads", True)
            assert (await c.get("/readyz")).status_code == 200
            assert (await c.get("/healthz")).status_code == 200
            for _ in range(UNHEALTHY_FAILURES - 1):
                hub.subsystem_failed("sources", "TransportError: refused")
            assert (await c.get("/healthz")).status_code == 200, "a few restarts are hiccups"
            hub.subsystem_failed("sources", "TransportError: refused")
            r = await c.get("/healthz")
            assert r.status_code == 503 and "sources failed 5 times in a row" in r.text
            assert hub.snapshot()["unhealthy"] == ["sources failed 5 times in a row"]
            hub.subsystem_stable("sources")
            assert (await c.get("/healthz")).status_code == 200
            metrics = await c.get("/metrics")
            assert metrics.status_code == 200 and "# TYPE" in metrics.text
            status = (await c.get("/status")).json()
            assert status["ready"] is True and status["not_ready"] == []
            assert (await c.get("/nope")).status_code == 404
        nursery.cancel_scope.cancel()


async def test_status_stream_pushes_each_change() -> None:
    hub = StatusHub()
    app = StatusApp(hub)
    async with trio.open_nursery() as nursery:
        port = await _serve(nursery, app)
        async with open_websocket_url(f"ws://127.0.0.1:{port}/status/stream") as ws:
            first = json.loads(await ws.get_message())
            assert first["leader"] is False
            hub.publish(leader=True, clusters=[{"name": "east"}])
            second = json.loads(await ws.get_message())
            assert second["leader"] is True
            assert second["clusters"] == [{"name": "east"}]
            assert second["generation"] > first["generation"]
        nursery.cancel_scope.cancel()


async def test_large_answers_are_encoded_off_the_event_loop() -> None:
    """/metrics is formatted and /status encoded in a worker thread: at 5,000 clusters
    either takes ~0.1-0.2 s of CPU, which on the loop would hold back every change."""
    on_loop: list[bool] = []

    def loop_thread() -> bool:
        try:
            trio.lowlevel.current_task()
        except RuntimeError:
            return False
        return True

    class Probe(Collector):
        def collect(self) -> Iterator[GaugeMetricFamily]:
            on_loop.append(loop_thread())
            yield GaugeMetricFamily("probe", "where the scrape ran", value=1.0)

    class Doc:
        """A status value whose encoding records where it ran (json ``default=str``)."""

        def __str__(self) -> str:
            on_loop.append(loop_thread())
            return "doc"

    registry = CollectorRegistry()
    registry.register(Probe())
    hub = StatusHub()
    hub.publish(clusters=[{"name": "east", "probe": Doc()}])
    app = StatusApp(hub, registry=registry)
    async with trio.open_nursery() as nursery:
        port = await _serve(nursery, app)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as c:
            assert "probe 1.0" in (await c.get("/metrics")).text
            assert (await c.get("/status")).json()["clusters"] == [{"name": "east", "probe": "doc"}]
        async with open_websocket_url(f"ws://127.0.0.1:{port}/status/stream") as ws:
            assert json.loads(await ws.get_message())["clusters"][0]["probe"] == "doc"
        nursery.cancel_scope.cancel()
    assert on_loop == [False, False, False]
