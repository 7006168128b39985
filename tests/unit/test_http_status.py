"""The HTTP endpoint: readiness tells the truth, metrics and the live status stream."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx2
import trio
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from trio_websocket import open_websocket_url

from atlasd.http import StatusApp, run_http
from atlasd.hub import UNHEALTHY_FAILURES, StatusHub
from atlasd.metrics import KeyedGauge


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
        async with httpx2.AsyncClient(base_url=f"http://127.0.0.1:{port}") as c:
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


async def test_large_answers_are_kept_not_made_per_request() -> None:
    """/status and /metrics answer from text kept as keys change: a read encodes only
    what changed since the last one (at 5,000 clusters encoding every cluster per request
    held the event loop, or the GIL, for ~0.1-0.5 s), and serves what ``snapshot()`` holds."""
    encoded: list[str] = []

    class Doc:
        """A status value whose encoding is counted (json ``default=str``)."""

        def __init__(self, name: str) -> None:
            self.name = name

        def __str__(self) -> str:
            encoded.append(self.name)
            return self.name

    registry = CollectorRegistry()
    registry.register(Probe())
    gauge = KeyedGauge("atlasd_probe_timestamp_seconds", "A keyed probe.", "name")
    gauge.set_key("east", {"east/server": 100.0, "east/client": 101.0})
    hub = StatusHub()
    for name in ("east", "north", "west"):
        hub.publish_keyed("clusters", name, [{"name": name, "probe": Doc(name)}])
    hub.publish(leader=True)
    app = StatusApp(hub, registry=registry, keyed=[gauge])

    def expected() -> str:
        """The whole document encoded at once (not counted)."""
        n = len(encoded)
        text = json.dumps(hub.snapshot(), sort_keys=True, default=str)
        del encoded[n:]
        return text

    async with trio.open_nursery() as nursery:
        port = await _serve(nursery, app)
        async with httpx2.AsyncClient(base_url=f"http://127.0.0.1:{port}") as c:
            first = await c.get("/status")
            assert first.text == expected()
            assert [d["probe"] for d in first.json()["clusters"]] == ["east", "north", "west"]
            assert (await c.get("/status")).text == first.text
            assert sorted(encoded) == ["east", "north", "west"], "each key once, not per read"
            hub.expect_ready("informers")  # readiness is in the document too
            assert (await c.get("/status")).json()["not_ready"] == ["informers"]
            hub.set_ready("informers", True)
            assert (await c.get("/status")).json()["ready"] is True
            assert sorted(encoded) == ["east", "north", "west"]
            hub.publish_keyed("clusters", "north", [{"name": "north", "probe": Doc("north2")}])
            hub.publish_keyed("clusters", "west", None)
            second = await c.get("/status")
            assert encoded[3:] == ["north2"], "a change costs the key that changed"
            assert second.text == expected()
            assert [d["probe"] for d in second.json()["clusters"]] == ["east", "north2"]

            def samples(text: str) -> dict[str, float]:
                return {
                    f"{s.name}{sorted(s.labels.items())}": s.value
                    for family in text_string_to_metric_families(text)
                    for s in family.samples
                }

            text = (await c.get("/metrics")).text
            assert samples(text) == {
                "probe[]": 1.0,
                "atlasd_probe_timestamp_seconds[('name', 'east/server')]": 100.0,
                "atlasd_probe_timestamp_seconds[('name', 'east/client')]": 101.0,
            }
            gauge.set_key("east", {"east/server": 200.0})
            text = (await c.get("/metrics")).text
            assert samples(text)["atlasd_probe_timestamp_seconds[('name', 'east/server')]"] == 200
            assert "east/client" not in text
        async with open_websocket_url(f"ws://127.0.0.1:{port}/status/stream") as ws:
            assert await ws.get_message() == second.text
        nursery.cancel_scope.cancel()
    assert encoded[3:] == ["north2"]


class Probe(Collector):
    def collect(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily("probe", "A registry's family.", value=1.0)


async def test_a_cold_status_is_encoded_in_steps_and_matches_what_changed_meanwhile() -> None:
    """The first read of thousands of keys lets other tasks run between steps (it held the
    event loop 0.2 s at 5,000 clusters); what they change meanwhile is in the answer."""
    hub = StatusHub()
    for i in range(3000):
        hub.publish_keyed("clusters", f"c{i:04d}", [{"name": f"c{i:04d}", "n": i}])
    turns, encoding = 0, False

    async def other_task() -> None:
        nonlocal turns
        while True:
            await trio.lowlevel.checkpoint()
            if not encoding:
                continue
            turns += 1
            if turns == 1:  # changed after its piece was encoded, and one removed
                hub.publish_keyed("clusters", "c0000", [{"name": "c0000", "n": -1}])
                hub.publish_keyed("clusters", "c2999", None)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(other_task)
        await trio.lowlevel.checkpoint()
        encoding = True
        text = await hub.encoded_in_steps()
        encoding = False
        during = turns
        nursery.cancel_scope.cancel()
    assert during >= 3  # ~6 steps of 500 items (the exact count is up to the scheduler)
    assert text == json.dumps(hub.snapshot(), sort_keys=True, default=str)
    doc = json.loads(text)
    assert doc["clusters"][0] == {"name": "c0000", "n": -1}
    assert len(doc["clusters"]) == 2999
