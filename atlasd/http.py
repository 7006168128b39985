"""atlasd's HTTP endpoint: ``/metrics``, ``/healthz``, ``/readyz``, ``/status`` and the
live status stream ``/status/stream`` (WebSocket; ``atlasd status --watch`` reads it
with trio-websocket).

A tiny ASGI app served by hypercorn's Trio worker inside atlasd's nursery.

The large answers are encoded in a worker thread, not on the event loop: at 5,000
clusters ``/metrics`` holds 20,000 certificate series (~170 ms of CPU to format) and
``/status`` 5,000 clusters' documents, and on the loop every scrape would hold back
whatever change arrived meanwhile. The thread still shares the interpreter, so it slows
the loop's work but does not stop it (CPython hands the GIL over every 5 ms). The metrics
are prometheus_client's own (locked) and ``atlasd.heap``'s (plain counters); a status
document is assembled on the loop and only encoded in the thread (the hub replaces what
it publishes, it never changes it in place).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest

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
        envoys: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        self.hub = hub
        self.registry = registry
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
            body = await trio.to_thread.run_sync(generate_latest, self.registry)
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
            body = await trio.to_thread.run_sync(_encode, self.hub.snapshot())
            await _respond(send, 200, body, "application/json")
        elif path == "/status/envoys" and self.envoys is not None:
            body = _encode(self.envoys())  # small: on the loop
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
                doc = self.hub.snapshot()
                seen = doc["generation"]
                text = await trio.to_thread.run_sync(_encode_text, doc)
                await send({"type": "websocket.send", "text": text})
                await self.hub.wait_changed(seen)
                # Coalesce bursts: at most two documents a second per watcher (a document
                # of thousands of clusters is large).
                await trio.sleep(0.5)


def _encode_text(doc: Any) -> str:
    return json.dumps(doc, sort_keys=True, default=str)


def _encode(doc: Any) -> bytes:
    return _encode_text(doc).encode()


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
