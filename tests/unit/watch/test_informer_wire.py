"""Informer + KubeClient over an in-memory API: both forms of 410 end in a relist."""

from __future__ import annotations

import json
from typing import Any

import httpx2
import trio
import trio.testing

from atlasd.kube.client import KubeClient
from atlasd.kube.config import KubeConfig
from atlasd.kube.resources import SECRETS
from atlasd.watch.backoff import Backoff
from atlasd.watch.informer import Informer


def _secret(name: str, rv: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": "m", "resourceVersion": rv},
    }


def _status(code: int, reason: str) -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "code": code,
        "reason": reason,
        "status": "Failure",
        "message": "too old resource version",
    }


class Api:
    """Scripted API: LIST answers in order; WATCH answers in order, then blocks."""

    def __init__(self) -> None:
        self.lists = [
            {
                "metadata": {"resourceVersion": "10"},
                "items": [_secret("a", "1"), _secret("b", "2")],
            },
            {
                "metadata": {"resourceVersion": "20"},
                "items": [_secret("b", "2"), _secret("c", "15")],
            },
            {"metadata": {"resourceVersion": "30"}, "items": [_secret("c", "25")]},
        ]
        self.watches: list[httpx2.Response] = [
            httpx2.Response(410, json=_status(410, "Gone")),
            httpx2.Response(
                200,
                content=(
                    json.dumps({"type": "ERROR", "object": _status(410, "Expired")}) + "\n"
                ).encode(),
            ),
        ]
        self.requests: list[str] = []

    def handler(self, request: httpx2.Request) -> httpx2.Response:
        p = request.url.params
        if p.get("watch") == "1":
            self.requests.append(f"watch@{p['resourceVersion']}")
            if self.watches:
                return self.watches.pop(0)
            return httpx2.Response(200, content=b"")  # a clean, empty end
        self.requests.append("list")
        return (
            httpx2.Response(200, json=self.lists.pop(0))
            if self.lists
            else httpx2.Response(500, json=_status(500, "InternalError"))
        )


async def test_http_410_and_error_event_410_both_relist(
    autojump_clock: trio.testing.MockClock,
) -> None:
    api = Api()
    config = KubeConfig(server="https://api.test", namespace="m")
    async with KubeClient(config, transport=httpx2.MockTransport(api.handler)) as kube:
        inf = Informer(kube, SECRETS, namespace="m", backoff=Backoff(jitter=0.0))
        deleted: list[str] = []
        inf.subscribe(lambda ch: deleted.append(ch.key) if ch.type == "DELETED" else None)
        async with trio.open_nursery() as nursery:
            await nursery.start(inf.run)
            with trio.fail_after(60):
                while inf.lists < 3:  # noqa: ASYNC110 - polling under mock time
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    assert api.requests[:5] == ["list", "watch@10", "list", "watch@20", "list"]
    assert sorted(inf.items()) == ["c"]
    assert inf.items()["c"]["metadata"]["resourceVersion"] == "25"
    assert deleted == ["a", "b"]
