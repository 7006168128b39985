"""core/v1 Event bodies, and posting that never raises."""

from __future__ import annotations

import datetime as dt
import json
import logging

import httpx
import pytest

from atlasd.kube.client import KubeClient
from atlasd.kube.config import KubeConfig
from atlasd.kube.events import MAX_MESSAGE, build_event, event_name, post_event
from atlasd.model import ObjectRef

REF = ObjectRef(kind="Service", name="east", namespace="monitoring", uid="u-1")
NOW = dt.datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=dt.UTC)


def test_event_name_is_object_dot_hex_unixnano() -> None:
    assert event_name("east", now_ns=0x17A2B3C4D5E6F) == "east.17a2b3c4d5e6f"


def test_event_body() -> None:
    body = build_event(
        ref=REF,
        reason="InvalidCluster",
        message="no external IP",
        type="Warning",
        name="east.1",
        now=NOW,
    )
    assert body == {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": "east.1", "namespace": "monitoring"},
        "involvedObject": {
            "apiVersion": "v1",
            "kind": "Service",
            "name": "east",
            "namespace": "monitoring",
            "uid": "u-1",
        },
        "reason": "InvalidCluster",
        "message": "no external IP",
        "type": "Warning",
        "source": {"component": "atlasd"},
        "reportingComponent": "atlasd",
        "firstTimestamp": "2026-01-02T03:04:05Z",
        "lastTimestamp": "2026-01-02T03:04:05Z",
        "count": 1,
    }


def test_long_messages_are_truncated_to_1024() -> None:
    body = build_event(ref=REF, reason="R", message="x" * 5000, type="Normal", name="n", now=NOW)
    assert len(body["message"]) == MAX_MESSAGE and body["message"].endswith("...")


def test_type_must_be_normal_or_warning() -> None:
    with pytest.raises(ValueError, match="Normal or Warning"):
        build_event(ref=REF, reason="R", message="m", type="Error", name="n", now=NOW)


async def test_post_event_never_raises(caplog: pytest.LogCaptureFixture) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    kube = KubeClient(KubeConfig(server="https://api.test"), transport=httpx.MockTransport(handler))
    async with kube:
        with caplog.at_level(logging.WARNING, logger="atlasd.kube.events"):
            await post_event(kube, ref=REF, reason="InvalidCluster", message="m")
            await post_event(kube, ref=REF, reason="Bad", message="m", type="Bogus")
    assert "could not post Warning event InvalidCluster on Service monitoring/east" in caplog.text
    assert "event Bad" in caplog.text


async def test_repeats_bump_count() -> None:
    seen: list[tuple[str, str, dict[str, object]]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        seen.append((request.method, request.url.path, body))
        return httpx.Response(201 if request.method == "POST" else 200, json=body)

    kube = KubeClient(KubeConfig(server="https://api.test"), transport=httpx.MockTransport(handler))
    async with kube:
        for _ in range(3):
            await post_event(kube, ref=REF, reason="InvalidCluster", message="m")
        await post_event(kube, ref=REF, reason="InvalidCluster", message="other")
    assert [m for m, _, _ in seen] == ["POST", "PATCH", "PATCH", "POST"]
    name = seen[0][2]["metadata"]["name"]  # type: ignore[index]
    assert seen[1][1] == f"/api/v1/namespaces/monitoring/events/{name}"
    assert [b.get("count") for _, _, b in seen[1:3]] == [2, 3]
    assert all(str(b.get("lastTimestamp", "")).endswith("Z") for _, _, b in seen[1:3])
