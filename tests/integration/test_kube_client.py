"""KubeClient against a real kube-apiserver: verbs, errors, server-side apply no-ops."""

from __future__ import annotations

import contextlib
import dataclasses

import pytest
import trio

from atlasd import labels
from atlasd.kube.apply import needs_apply
from atlasd.kube.client import KubeClient
from atlasd.kube.config import load_config
from atlasd.kube.errors import AlreadyExists, Conflict, Invalid, NotFound
from atlasd.kube.resources import CONFIGMAPS, SECRETS, SERVICES
from atlasd.reconcile.objects import managed_labels
from tests.harness.kube import ApiServer

pytestmark = pytest.mark.integration


def _cm(namespace: str, name: str, data: dict[str, str]) -> dict[str, object]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name, "namespace": namespace, "labels": {"a": "b"}},
        "data": data,
    }


async def test_verbs_and_error_tree(apiserver: ApiServer, namespace: str) -> None:
    async with KubeClient(load_config(str(apiserver.admin_kubeconfig))) as kube:
        created = await kube.create(_cm(namespace, "one", {"k": "v"}))
        assert created["metadata"]["resourceVersion"]
        with pytest.raises(AlreadyExists) as exc_info:
            await kube.create(_cm(namespace, "one", {"k": "v"}))
        assert "create configmaps" in str(exc_info.value)
        assert "AlreadyExists" in str(exc_info.value)

        got = await kube.get(CONFIGMAPS, "one", namespace=namespace)
        assert got["kind"] == "ConfigMap" and got["data"] == {"k": "v"}

        stale = dict(got, data={"k": "w"})
        await kube.replace(stale)
        with pytest.raises(Conflict) as conflict:
            await kube.replace(stale)  # carries the old resourceVersion
        assert conflict.value.reason == "Conflict"
        assert not isinstance(conflict.value, AlreadyExists)

        items, rv = await kube.list(CONFIGMAPS, namespace=namespace, label_selector="a=b")
        assert rv
        assert [i["metadata"]["name"] for i in items] == ["one"]
        assert all(i["kind"] == "ConfigMap" and i["apiVersion"] == "v1" for i in items)

        await kube.delete(CONFIGMAPS, "one", namespace=namespace)
        with pytest.raises(NotFound) as nf:
            await kube.get(CONFIGMAPS, "one", namespace=namespace)
        assert f"get configmaps {namespace}/one: NotFound (404)" in str(nf.value)
        with pytest.raises(NotFound):
            await kube.delete(CONFIGMAPS, "one", namespace=namespace)


async def test_list_pages_through_many_items(apiserver: ApiServer, namespace: str) -> None:
    async with KubeClient(load_config(str(apiserver.admin_kubeconfig))) as kube:
        sem = trio.Semaphore(32)

        async def create(i: int) -> None:
            async with sem:
                await kube.create(_cm(namespace, f"cm-{i}", {"i": str(i)}))

        async with trio.open_nursery() as nursery:
            for i in range(620):
                nursery.start_soon(create, i)
        items, _ = await kube.list(CONFIGMAPS, namespace=namespace, label_selector="a=b")
        assert len(items) == 620
        assert len({i["metadata"]["name"] for i in items}) == 620


async def test_second_identical_apply_changes_nothing(apiserver: ApiServer, namespace: str) -> None:
    svc = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "web", "namespace": namespace, "labels": {"x": "y"}},
        "spec": {"clusterIP": "None", "ports": [{"name": "http", "port": 80}]},
    }
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "s", "namespace": namespace},
        "type": "Opaque",
        "data": {"k": "dmFsdWU="},
    }
    async with KubeClient(load_config(str(apiserver.admin_kubeconfig))) as kube:
        for obj, res, name in ((svc, SERVICES, "web"), (secret, SECRETS, "s")):
            first = await kube.apply(obj)
            second = await kube.apply(obj)
            assert second["metadata"]["resourceVersion"] == first["metadata"]["resourceVersion"]
            now = await kube.get(res, name, namespace=namespace)
            assert now["metadata"]["resourceVersion"] == first["metadata"]["resourceVersion"]
        # A field no longer sent is removed by the next apply (SSA ownership).
        svc2 = {**svc, "metadata": {"name": "web", "namespace": namespace}}
        third = await kube.apply(svc2)
        assert "x" not in (third["metadata"].get("labels") or {})


async def test_apply_answered_with_metadata_only(apiserver: ApiServer, namespace: str) -> None:
    # What the reconcile applier asks for: the stored object's metadata (its resourceVersion),
    # not the Secret's data back.
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "meta-only", "namespace": namespace, "labels": {"a": "b"}},
        "type": "Opaque",
        "data": {"k": "dmFsdWVz" * 500},
    }
    async with KubeClient(load_config(str(apiserver.admin_kubeconfig))) as kube:
        first = await kube.apply(secret, metadata_only=True)
        assert first["kind"] == "PartialObjectMetadata"
        assert "data" not in first
        assert first["metadata"]["labels"] == {"a": "b"}
        now = await kube.get(SECRETS, "meta-only", namespace=namespace)
        assert now["data"] == secret["data"]
        assert now["metadata"]["resourceVersion"] == first["metadata"]["resourceVersion"]
        changed = await kube.apply({**secret, "data": {"k": "b3RoZXI="}}, metadata_only=True)
        assert changed["metadata"]["resourceVersion"] != first["metadata"]["resourceVersion"]


async def test_invalid_secret_message_does_not_echo_data(
    apiserver: ApiServer, namespace: str
) -> None:
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "bad", "namespace": namespace},
        "data": {"bad key!": "c2VjcmV0LXZhbHVl"},
    }
    async with KubeClient(load_config(str(apiserver.admin_kubeconfig))) as kube:
        with pytest.raises(Invalid) as exc_info:
            await kube.apply(secret)
    text = str(exc_info.value)
    assert "apply secrets" in text and "Invalid (422)" in text
    assert "c2VjcmV0LXZhbHVl" not in text and "secret-value" not in text


async def test_needs_apply_agrees_with_the_server(apiserver: ApiServer, namespace: str) -> None:
    svc = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": "east-thanos-sidecar0",
            "namespace": namespace,
            "labels": managed_labels("east", **{"goatlas.io/thanos-sidecar": "0"}),
        },
        "spec": {
            "clusterIP": "None",
            "selector": {"app": "envoy"},
            "ports": [{"name": "thanos", "port": 10901}, {"name": "prometheus", "port": 9090}],
        },
    }
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "east-envoy-values", "namespace": namespace},
        "stringData": {"values.yaml": "a: 1\n"},
    }
    async with KubeClient(load_config(str(apiserver.admin_kubeconfig))) as kube:
        for desired, res in ((svc, SERVICES), (secret, SECRETS)):
            name = desired["metadata"]["name"]
            assert needs_apply(desired, None)
            await kube.apply(desired)
            observed = await kube.get(res, name, namespace=namespace)
            assert not needs_apply(desired, observed)
        # Dropping a label atlasd applied is a change, and applying removes it.
        observed = await kube.get(SERVICES, "east-thanos-sidecar0", namespace=namespace)
        owner = await kube.get(SERVICES, "east-thanos-sidecar0", namespace=namespace)
        trimmed = {**svc, "metadata": {**svc["metadata"], "labels": managed_labels("east")}}
        assert needs_apply(trimmed, observed)
        stored = await kube.apply(trimmed)
        assert "goatlas.io/thanos-sidecar" not in stored["metadata"]["labels"]
        assert not needs_apply(trimmed, stored)
        # Ownership: an ownerReference to a real object is accepted.
        owner_ref = {
            "apiVersion": "v1",
            "kind": "Service",
            "name": owner["metadata"]["name"],
            "uid": owner["metadata"]["uid"],
            "controller": True,
            "blockOwnerDeletion": True,
        }
        child = {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {
                "name": "child",
                "namespace": namespace,
                "labels": {"a": "b", **managed_labels()},
                "ownerReferences": [owner_ref],
            },
            "data": {"k": "v"},
        }
        stored = await kube.apply(child)
        assert stored["metadata"]["ownerReferences"][0]["uid"] == owner["metadata"]["uid"]
        assert not needs_apply(child, stored)
        items, _ = await kube.list(
            CONFIGMAPS,
            namespace=namespace,
            label_selector=f"{labels.MANAGED_BY_LABEL}={labels.MANAGED_BY_VALUE}",
        )
        assert [i["metadata"]["name"] for i in items] == ["child"]


async def _connect_proxy(
    seen: list[str], *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
) -> None:
    """A minimal HTTP CONNECT proxy on loopback (records each CONNECT target)."""

    async def pump(src: trio.SocketStream, dst: trio.SocketStream) -> None:
        try:
            while data := await src.receive_some(65536):
                await dst.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await dst.send_eof()

    async def handle(client: trio.SocketStream) -> None:
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = await client.receive_some(4096)
            if not chunk:
                return
            head += chunk
        target = head.split(b" ")[1].decode()
        seen.append(target)
        host, port = target.rsplit(":", 1)
        async with await trio.open_tcp_stream(host, int(port)) as upstream, client:
            await client.send_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
            async with trio.open_nursery() as nursery:
                nursery.start_soon(pump, client, upstream)
                nursery.start_soon(pump, upstream, client)

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(handle, listeners)


async def test_proxy_url_from_the_kubeconfig(apiserver: ApiServer, namespace: str) -> None:
    seen: list[str] = []
    async with trio.open_nursery() as nursery:
        port = await nursery.start(_connect_proxy, seen)
        config = dataclasses.replace(
            load_config(str(apiserver.admin_kubeconfig)), proxy_url=f"http://127.0.0.1:{port}"
        )
        async with KubeClient(config) as kube:
            await kube.create(_cm(namespace, "via-proxy", {"k": "v"}))
            got = await kube.get(CONFIGMAPS, "via-proxy", namespace=namespace)
        assert got["data"] == {"k": "v"}
        assert seen and all(t == f"127.0.0.1:{apiserver.port}" for t in seen)
        nursery.cancel_scope.cancel()
