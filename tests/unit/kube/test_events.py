"""core/v1 Event bodies, and posting that never raises."""

from __future__ import annotations

import datetime as dt
import functools
import json
import logging

import httpx2
import pytest
import trio

from atlasd.kube.client import KubeClient
from atlasd.kube.config import KubeConfig
from atlasd.kube.events import MAX_MESSAGE, build_event, event_name, post_event, posted_before
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
    def handler(request: httpx2.Request) -> httpx2.Response:
        raise httpx2.ConnectError("refused", request=request)

    kube = KubeClient(
        KubeConfig(server="https://api.test"), transport=httpx2.MockTransport(handler)
    )
    async with kube:
        with caplog.at_level(logging.WARNING, logger="atlasd.kube.events"):
            await post_event(kube, ref=REF, reason="InvalidCluster", message="m")
            await post_event(kube, ref=REF, reason="Bad", message="m", type="Bogus")
    assert "could not post Warning event InvalidCluster on Service monitoring/east" in caplog.text
    assert "event Bad" in caplog.text


async def test_repeats_bump_count() -> None:
    seen: list[tuple[str, str, dict[str, object]]] = []

    def handler(request: httpx2.Request) -> httpx2.Response:
        if request.method == "GET":  # the earlier Events: none
            return httpx2.Response(200, json={"items": [], "metadata": {"resourceVersion": "1"}})
        body = json.loads(request.content)
        seen.append((request.method, request.url.path, body))
        return httpx2.Response(201 if request.method == "POST" else 200, json=body)

    kube = KubeClient(
        KubeConfig(server="https://api.test"), transport=httpx2.MockTransport(handler)
    )
    async with kube:
        for _ in range(3):
            await post_event(kube, ref=REF, reason="InvalidCluster", message="m")
        await post_event(kube, ref=REF, reason="InvalidCluster", message="other")
    assert [m for m, _, _ in seen] == ["POST", "PATCH", "PATCH", "POST"]
    name = seen[0][2]["metadata"]["name"]  # type: ignore[index]
    assert seen[1][1] == f"/api/v1/namespaces/monitoring/events/{name}"
    assert [b.get("count") for _, _, b in seen[1:3]] == [2, 3]
    assert all(str(b.get("lastTimestamp", "")).endswith("Z") for _, _, b in seen[1:3])


def _listed(name: str, *, count: int, last: str, message: str = "m") -> dict[str, object]:
    body = build_event(
        ref=REF, reason="InvalidCluster", message=message, type="Warning", name=name, now=NOW
    )
    return {**body, "count": count, "lastTimestamp": last}


async def test_repeats_across_restarts_count_on_the_earlier_event() -> None:
    """A new process (a new client, so a new recorder) that posts what an earlier one
    posted bumps that Event (the newest of its kind) instead of creating one."""
    requests: list[tuple[str, str, str]] = []
    earlier = [
        _listed("east.1", count=4, last="2026-01-02T03:00:00Z"),
        _listed("east.2", count=7, last="2026-01-02T03:04:00Z"),
        _listed("east.3", count=1, last="2026-01-02T03:05:00Z", message="another"),
    ]

    def handler(request: httpx2.Request) -> httpx2.Response:
        requests.append((request.method, request.url.path, request.url.query.decode()))
        if request.method == "GET":
            return httpx2.Response(
                200, json={"items": earlier, "metadata": {"resourceVersion": "9"}}
            )
        body = json.loads(request.content)
        return httpx2.Response(201 if request.method == "POST" else 200, json=body)

    kube = KubeClient(
        KubeConfig(server="https://api.test"), transport=httpx2.MockTransport(handler)
    )
    async with kube, trio.open_nursery() as nursery:
        for _ in range(3):  # concurrent first posts read the earlier Events once
            nursery.start_soon(
                functools.partial(post_event, kube, ref=REF, reason="InvalidCluster", message="m")
            )
    gets = [r for r in requests if r[0] == "GET"]
    assert len(gets) == 1 and "source%3Datlasd" in gets[0][2]
    writes = [(m, p) for m, p, _ in requests if m != "GET"]
    assert writes == [("PATCH", "/api/v1/namespaces/monitoring/events/east.2")] * 3


async def test_repeats_across_restarts_count_up_from_the_listed_count() -> None:
    patches: list[dict[str, object]] = []
    earlier = [_listed("east.2", count=7, last="2026-01-02T03:04:00Z")]

    def handler(request: httpx2.Request) -> httpx2.Response:
        if request.method == "GET":
            return httpx2.Response(
                200, json={"items": earlier, "metadata": {"resourceVersion": "9"}}
            )
        body = json.loads(request.content)
        patches.append(body)
        return httpx2.Response(200, json=body)

    kube = KubeClient(
        KubeConfig(server="https://api.test"), transport=httpx2.MockTransport(handler)
    )
    async with kube:
        await post_event(kube, ref=REF, reason="InvalidCluster", message="m")
        await post_event(kube, ref=REF, reason="InvalidCluster", message="m")
    assert [p["count"] for p in patches] == [8, 9]


async def test_without_list_permission_events_are_still_posted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    methods: list[str] = []

    def handler(request: httpx2.Request) -> httpx2.Response:
        methods.append(request.method)
        if request.method == "GET":
            return httpx2.Response(
                403, json={"kind": "Status", "reason": "Forbidden", "message": "no list"}
            )
        return httpx2.Response(201, json=json.loads(request.content))

    kube = KubeClient(
        KubeConfig(server="https://api.test"), transport=httpx2.MockTransport(handler)
    )
    async with kube:
        with caplog.at_level(logging.INFO, logger="atlasd.kube.events"):
            await post_event(kube, ref=REF, reason="InvalidCluster", message="m")
            await post_event(kube, ref=REF, reason="InvalidCluster", message="m")
    assert methods == ["GET", "POST", "PATCH"]
    assert caplog.text.count("cannot read earlier Events") == 1


def test_posted_before_skips_what_is_not_ours() -> None:
    assert posted_before({"metadata": {"name": "x"}}) is None
    listed = _listed("east.2", count=7, last="2026-01-02T03:04:00Z")
    found = posted_before(listed)
    assert found is not None
    key, (name, _, count), _ = found
    assert key == (REF, "InvalidCluster", "m", "Warning") and (name, count) == ("east.2", 7)
    assert posted_before({**listed, "count": "7"}) is None
