"""Events on a real API server: visible on the object, aggregated, never fatal."""

from __future__ import annotations

import logging

import pytest

from atlasd.kube.client import KubeClient
from atlasd.kube.config import load_config
from atlasd.kube.events import post_event
from atlasd.kube.resources import EVENTS
from atlasd.model import ObjectRef
from tests.harness.kube import ApiServer

pytestmark = pytest.mark.integration


async def test_event_on_a_service(apiserver: ApiServer, namespace: str) -> None:
    async with KubeClient(load_config(str(apiserver.admin_kubeconfig))) as kube:
        svc = await kube.apply(
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": "east", "namespace": namespace},
                "spec": {"ports": [{"name": "thanos", "port": 10901}]},
            }
        )
        ref = ObjectRef(
            kind="Service", name="east", namespace=namespace, uid=svc["metadata"]["uid"]
        )
        message = "spec.externalIPs: a cluster Service needs an external IP " + "x" * 2000
        await post_event(kube, ref=ref, reason="InvalidCluster", message=message)
        await post_event(kube, ref=ref, reason="InvalidCluster", message=message)
        items, _ = await kube.list(
            EVENTS, namespace=namespace, field_selector=f"involvedObject.uid={ref.uid}"
        )
    assert len(items) == 1
    event = items[0]
    assert event["metadata"]["name"].startswith("east.")
    assert event["involvedObject"]["uid"] == ref.uid
    assert event["reason"] == "InvalidCluster" and event["type"] == "Warning"
    assert event["source"]["component"] == "atlasd"
    assert event["count"] == 2
    assert len(event["message"]) == 1024
    describe = apiserver.kubectl("-n", namespace, "describe", "service", "east")
    assert "InvalidCluster" in describe


async def test_forbidden_event_is_logged_not_raised(
    apiserver: ApiServer, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    path = apiserver.service_account_kubeconfig("noevents", namespace, [])
    ref = ObjectRef(kind="Service", name="east", namespace=namespace)
    async with KubeClient(load_config(str(path))) as kube:
        with caplog.at_level(logging.WARNING, logger="atlasd.kube.events"):
            await post_event(kube, ref=ref, reason="InvalidCluster", message="m")
    assert "create events" in caplog.text and "Forbidden (403)" in caplog.text


async def test_repeats_after_a_restart_count_on_the_same_event(
    apiserver: ApiServer, namespace: str
) -> None:
    """Two clients stand for two processes (a restart): the second one's repeat of what the
    first posted bumps that Event's count instead of creating a second Event."""
    ref = ObjectRef(kind="Service", name="west", namespace=namespace, uid="uid-west")
    for _ in range(2):
        async with KubeClient(load_config(str(apiserver.admin_kubeconfig))) as kube:
            await post_event(kube, ref=ref, reason="InvalidCluster", message="no externalIPs")
            await post_event(kube, ref=ref, reason="InvalidCluster", message="another message")
    async with KubeClient(load_config(str(apiserver.admin_kubeconfig))) as kube:
        items, _ = await kube.list(
            EVENTS, namespace=namespace, field_selector="involvedObject.name=west"
        )
    counts = sorted((e["message"], e["count"]) for e in items)
    assert counts == [("another message", 2), ("no externalIPs", 2)]
