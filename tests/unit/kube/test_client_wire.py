"""KubeClient on the wire (in-memory transport): requests sent, Statuses translated."""

from __future__ import annotations

import json
from contextlib import aclosing
from pathlib import Path
from typing import Any

import httpx2
import pytest

from atlasd.kube.client import KubeClient
from atlasd.kube.config import KubeConfig
from atlasd.kube.errors import Gone, NotFound, ServerError, TooManyRequests, TransportError
from atlasd.kube.resources import CONFIGMAPS, SECRETS, SERVICES

Handler = Any


def _client(handler: Handler, **cfg: Any) -> KubeClient:
    config = KubeConfig(server="https://api.test:6443", namespace="monitoring", **cfg)
    return KubeClient(config, transport=httpx2.MockTransport(handler))


def _status(code: int, reason: str, message: str = "") -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "code": code,
        "reason": reason,
        "message": message,
        "status": "Failure",
    }


async def _drain(kube: KubeClient, **kw: Any) -> list[dict[str, Any]]:
    out = []
    async with aclosing(kube.watch(SERVICES, resource_version="5", timeout_seconds=60, **kw)) as w:
        async for event in w:
            out.append(event)
    return out


async def test_apply_is_a_server_side_apply_patch() -> None:
    seen: list[httpx2.Request] = []

    def handler(request: httpx2.Request) -> httpx2.Response:
        seen.append(request)
        body = json.loads(request.content)
        return httpx2.Response(200, json={**body, "metadata": {**body["metadata"], "uid": "u"}})

    async with _client(handler, token="tok") as kube:
        out = await kube.apply(
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": "x", "managedFields": [{"manager": "kubectl"}]},
                "data": {"a": "b"},
            }
        )
    req = seen[0]
    assert req.method == "PATCH"
    assert req.url.path == "/api/v1/namespaces/monitoring/configmaps/x"
    assert req.url.params["fieldManager"] == "atlasd" and req.url.params["force"] == "true"
    assert req.headers["content-type"] == "application/apply-patch+yaml"
    assert req.headers["authorization"] == "Bearer tok"
    sent = json.loads(req.content)
    assert "managedFields" not in sent["metadata"]
    assert sent["metadata"]["namespace"] == "monitoring"
    assert out["metadata"]["uid"] == "u"


async def test_apply_with_metadata_only_asks_for_partial_object_metadata() -> None:
    accepts: list[str] = []

    def handler(request: httpx2.Request) -> httpx2.Response:
        accepts.append(request.headers["accept"])
        meta = {"name": "x", "namespace": "monitoring", "resourceVersion": "7"}
        return httpx2.Response(200, json={"kind": "PartialObjectMetadata", "metadata": meta})

    cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}, "data": {}}
    async with _client(handler, token="tok") as kube:
        out = await kube.apply(cm, metadata_only=True)
        await kube.apply(cm)
    assert accepts == [
        "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1",
        "application/json",
    ]
    assert out["metadata"]["resourceVersion"] == "7"


# A set-based selector and a continue token as the API server makes them (base64, with
# "+", "/" and "="): the query carries them percent-encoded and the server reads them back.
SELECTOR = "app in (a,b),!gone,tier!=x"
TOKEN = "eyJ2IjoibWV0YS5rOHMuaW8vdjEiLCJydiI6MTAsInN0YXJ0IjoiYS9iKyJ9+/="


async def test_list_follows_continue_tokens_and_keeps_first_rv() -> None:
    def handler(request: httpx2.Request) -> httpx2.Response:
        cont = request.url.params.get("continue")
        assert request.url.params["labelSelector"] == SELECTOR
        assert b" " not in request.url.raw_path and b"+" not in request.url.raw_path
        if not cont:
            return httpx2.Response(
                200,
                json={
                    "metadata": {"resourceVersion": "10", "continue": TOKEN},
                    "items": [{"metadata": {"name": "one"}}],
                },
            )
        assert cont == TOKEN
        return httpx2.Response(
            200,
            json={"metadata": {"resourceVersion": "10"}, "items": [{"metadata": {"name": "two"}}]},
        )

    async with _client(handler) as kube:
        items, rv = await kube.list(CONFIGMAPS, label_selector=SELECTOR)
    assert rv == "10"
    assert [(i["metadata"]["name"], i["kind"], i["apiVersion"]) for i in items] == [
        ("one", "ConfigMap", "v1"),
        ("two", "ConfigMap", "v1"),
    ]


async def test_a_metadata_list_keeps_what_its_readers_use() -> None:
    """``metadata_only``: asked as PartialObjectMetadataList; each item's name, namespace,
    labels and resourceVersion come back (the rest of its metadata is skipped when decoded),
    pages followed; a page that is not a list of that shape is a TransportError."""
    item = {
        "kind": "PartialObjectMetadata",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": {
            "name": "east-envoy-values",
            "namespace": "monitoring",
            "uid": "u-1",
            "resourceVersion": "41",
            "labels": {"goatlas.io/owner": "east"},
            "ownerReferences": [{"kind": "Service", "name": "east", "uid": "u-0"}],
            "managedFields": [{"manager": "atlasd", "fieldsV1": {"f:data": {}}}],
        },
    }
    pages = {
        "": {"metadata": {"resourceVersion": "50", "continue": "p2"}, "items": [item]},
        "p2": {"metadata": {"resourceVersion": "50"}, "items": [{"metadata": {"name": "bare"}}]},
    }

    def handler(request: httpx2.Request) -> httpx2.Response:
        assert "as=PartialObjectMetadataList" in request.headers["accept"]
        return httpx2.Response(200, json=pages[request.url.params.get("continue", "")])

    async with _client(handler) as kube:
        items, rv = await kube.list(SECRETS, metadata_only=True)
    assert rv == "50"
    assert [i["metadata"] for i in items] == [
        {
            "name": "east-envoy-values",
            "namespace": "monitoring",
            "resourceVersion": "41",
            "labels": {"goatlas.io/owner": "east"},
        },
        {"name": "bare", "namespace": "", "resourceVersion": "", "labels": {}},
    ]
    assert [(i["kind"], i["apiVersion"]) for i in items] == [("Secret", "v1")] * 2

    def empty(request: httpx2.Request) -> httpx2.Response:
        # As the API server answers a metadata LIST that matches nothing.
        return httpx2.Response(200, json={"metadata": {"resourceVersion": "51"}, "items": None})

    async with _client(empty) as kube:
        assert await kube.list(SECRETS, metadata_only=True) == ([], "51")

    def bad(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(200, json={"metadata": {}, "items": [{"metadata": {"labels": 3}}]})

    async with _client(bad) as kube:
        with pytest.raises(
            TransportError, match=r"list secrets: .* at `\$.items\[0\].metadata.labels`"
        ):
            await kube.list(SECRETS, metadata_only=True)


async def test_list_relists_whole_when_continue_token_expires() -> None:
    def handler(request: httpx2.Request) -> httpx2.Response:
        params = request.url.params
        if params.get("continue"):
            return httpx2.Response(410, json=_status(410, "Expired"))
        if "limit" in params:
            return httpx2.Response(
                200, json={"metadata": {"resourceVersion": "10", "continue": "p2"}, "items": []}
            )
        return httpx2.Response(
            200,
            json={"metadata": {"resourceVersion": "12"}, "items": [{"metadata": {"name": "all"}}]},
        )

    async with _client(handler) as kube:
        items, rv = await kube.list(CONFIGMAPS)
    assert rv == "12" and [i["metadata"]["name"] for i in items] == ["all"]


async def test_watch_sends_bookmarks_and_timeout_and_decodes_lines() -> None:
    def handler(request: httpx2.Request) -> httpx2.Response:
        p = request.url.params
        assert (
            p["watch"],
            p["resourceVersion"],
            p["allowWatchBookmarks"],
            p["timeoutSeconds"],
        ) == ("1", "5", "true", "60")
        lines = [
            {"type": "ADDED", "object": {"metadata": {"name": "a", "resourceVersion": "6"}}},
            {
                "type": "BOOKMARK",
                "object": {
                    "kind": "Service",
                    "apiVersion": "v1",
                    "metadata": {"resourceVersion": "7"},
                },
            },
        ]
        return httpx2.Response(
            200, content=b"\n".join(json.dumps(x).encode() for x in lines) + b"\n\n"
        )

    async with _client(handler) as kube:
        events = await _drain(kube)
    assert [e["type"] for e in events] == ["ADDED", "BOOKMARK"]
    assert events[0]["object"]["kind"] == "Service"


@pytest.mark.parametrize("form", ["http", "event"])
async def test_both_forms_of_410_raise_gone(form: str) -> None:
    def handler(request: httpx2.Request) -> httpx2.Response:
        if form == "http":
            return httpx2.Response(410, json=_status(410, "Gone", "too old resource version"))
        err = {"type": "ERROR", "object": _status(410, "Expired", "too old resource version: 5")}
        return httpx2.Response(200, content=json.dumps(err).encode() + b"\n")

    async with _client(handler) as kube:
        with pytest.raises(Gone) as exc_info:
            await _drain(kube)
    assert str(exc_info.value).startswith("watch services in namespace monitoring: ")


async def test_watch_errors() -> None:
    def handler(request: httpx2.Request) -> httpx2.Response:
        if request.url.params.get("labelSelector") == "busy":
            return httpx2.Response(
                429, headers={"Retry-After": "7"}, json=_status(429, "TooManyRequests")
            )
        if request.url.params.get("labelSelector") == "broken":
            return httpx2.Response(200, content=b"{not json\n")
        return httpx2.Response(503, text="upstream unavailable")

    async with _client(handler) as kube:
        with pytest.raises(TooManyRequests) as busy:
            await _drain(kube, label_selector="busy")
        assert busy.value.retry_after == 7.0
        with pytest.raises(TransportError, match="not JSON"):
            await _drain(kube, label_selector="broken")
        with pytest.raises(ServerError, match="ServiceUnavailable"):
            await _drain(kube)


async def test_transport_failure_is_translated() -> None:
    def handler(request: httpx2.Request) -> httpx2.Response:
        raise httpx2.ConnectError("connection refused", request=request)

    async with _client(handler) as kube:
        with pytest.raises(TransportError, match=r"get services x: ConnectError"):
            await kube.get(SERVICES, "x")
        with pytest.raises(TransportError):
            await _drain(kube)


async def test_401_retry(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("old")
    calls: list[str] = []

    def handler(request: httpx2.Request) -> httpx2.Response:
        auth = request.headers["authorization"]
        calls.append(auth)
        if auth == "Bearer old":
            token.write_text("new")  # rotated behind the client's back
            return httpx2.Response(401, json=_status(401, "Unauthorized"))
        return httpx2.Response(200, json={"metadata": {"name": "s"}})

    async with _client(handler, token_file=str(token)) as kube:
        got = await kube.get(SECRETS, "s")
        assert got["kind"] == "Secret"
        assert calls == ["Bearer old", "Bearer new"]
        calls.clear()
        token.write_text("old")
        # Still cached as "new": no extra calls.
        await kube.get(SECRETS, "s")
        assert calls == ["Bearer new"]


async def test_delete_of_missing_object_raises_not_found() -> None:
    def handler(request: httpx2.Request) -> httpx2.Response:
        assert request.method == "DELETE"
        return httpx2.Response(404, json=_status(404, "NotFound", 'services "x" not found'))

    async with _client(handler) as kube:
        with pytest.raises(NotFound, match=r"^delete services monitoring/x: NotFound \(404\)"):
            await kube.delete(SERVICES, "x")


async def test_server_url_with_a_path_prefix_is_kept() -> None:
    paths: list[str] = []

    def handler(request: httpx2.Request) -> httpx2.Response:
        paths.append(request.url.path)
        return httpx2.Response(200, json={"metadata": {"name": "x"}})

    config = KubeConfig(server="https://rancher.test/k8s/clusters/c-1", namespace="m")
    async with KubeClient(config, transport=httpx2.MockTransport(handler)) as kube:
        await kube.get(SERVICES, "x")
    assert paths == ["/k8s/clusters/c-1/api/v1/namespaces/m/services/x"]
