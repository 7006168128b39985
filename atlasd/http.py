"""atlasd's HTTP endpoint: ``/metrics``, ``/healthz``, ``/readyz``, ``/status`` and the
live status stream ``/status/stream`` (WebSocket; ``atlasd status --watch`` reads it
with trio-websocket).

A tiny ASGI app served by hypercorn's Trio worker inside atlasd's nursery.

Every answer is made on the event loop, and none costs more than joining kept text: the
large ones are kept up to date key by key as the fleet changes, not assembled per request.
``/metrics`` is the registry's few families plus the per-cluster certificate series kept as
text (``atlasd.metrics.KeyedGauge``); ``/status`` is the status document's JSON kept piece by
piece (``StatusHub.encoded``). At 5,000 clusters formatting them per request took 0.2-0.5 s
and 50-80 ms of CPU; in a worker thread (as until 2026-12-05) that CPU still held the GIL
against the loop, and every change and every small request waited behind it
(``/status/envoys`` up to 150-220 ms in ``bench_e2e``'s ``scrape_stall_ms``; bench/README.md).
What is left per request is a join of kept text and the registry's few families (~1-10
ms at 5,000 clusters, ``bench/bench_scrape.py``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import msgspec
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry

from atlasd import metrics
from atlasd.hub import StatusHub

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class StatusApp:
    """The ASGI application. ``/healthz`` answers 503 while the hub says a subsystem keeps
    failing (``StatusHub.unhealthy``), naming it."""

    def __init__(
        self,
        hub: StatusHub,
        *,
        registry: CollectorRegistry = REGISTRY,
        keyed: Sequence[metrics.KeyedGauge] = metrics.KEYED,
        envoys: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        self.hub = hub
        self.registry = registry
        self.keyed = keyed
        # ``/status/envoys``: the ADS streams now (small, for polling).
        self.envoys = envoys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "websocket":
            await self._stream(scope, receive, send)
        elif scope["type"] == "http":
            await self._http(scope, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http(self, scope: Scope, send: Send) -> None:
        path = scope["path"]
        if path == "/metrics":
            body = metrics.exposition(self.registry, self.keyed)
            await _respond(send, 200, body, CONTENT_TYPE_LATEST)
        elif path == "/healthz":
            why = self.hub.unhealthy()
            text = "ok\n" if not why else "unhealthy: " + "; ".join(why) + "\n"
            await _respond(send, 503 if why else 200, text.encode())
        elif path == "/readyz":
            if self.hub.ready:
                await _respond(send, 200, b"ok\n")
            else:
                body = ("not ready: " + ", ".join(self.hub.not_ready()) + "\n").encode()
                await _respond(send, 503, body)
        elif path == "/status":
            body = (await self.hub.encoded_in_steps()).encode()
            await _respond(send, 200, body, "application/json")
        elif path == "/status/envoys" and self.envoys is not None:
            # Every stream's document: ~0.4 KB each (~0.8 MB at 2,000 streams on a replica):
            # msgspec encodes it ~10x faster than json (141 ms held the loop with json).
            body = msgspec.json.encode(self.envoys(), order="sorted")
            await _respond(send, 200, body, "application/json")
        else:
            await _respond(send, 404, b"not found\n")

    async def _stream(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["path"] != "/status/stream":
            await send({"type": "websocket.close", "code": 1008})
            return
        first = await receive()
        if first["type"] != "websocket.connect":
            return
        await send({"type": "websocket.accept"})
        async with trio.open_nursery() as nursery:

            async def drain() -> None:
                # The client sends nothing we need; a disconnect ends the stream.
                while (await receive())["type"] != "websocket.disconnect":
                    pass
                nursery.cancel_scope.cancel()

            nursery.start_soon(drain)
            seen = -1
            while True:
                seen = self.hub.generation
                await send({"type": "websocket.send", "text": await self.hub.encoded_in_steps()})
                await self.hub.wait_changed(seen)
                # Coalesce bursts: at most two documents a second per watcher (a document
                # of thousands of clusters is large).
                await trio.sleep(0.5)


async def _respond(
    send: Send, status: int, body: bytes, content_type: str = "text/plain; charset=utf-8"
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", content_type.encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def run_http(
    app: StatusApp,
    *,
    host: str,
    port: int,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` until cancelled; ``started()`` with the bound port once listening."""
    config = HypercornConfig()
    config.bind = [f"{host}:{port}"]
    config.accesslog = None
    config.errorlog = None
    config.graceful_timeout = 1.0
    async with trio.open_nursery() as nursery:
        bound: list[str] = await nursery.start(_serve, app, config)
        task_status.started(int(bound[0].rsplit(":", 1)[1]))


async def _serve(
    app: StatusApp, config: HypercornConfig, *, task_status: trio.TaskStatus[list[str]]
) -> None:
    await serve(app, config, task_status=task_status, mode="asgi")  # type: ignore[arg-type]
