"""A ServiceAccount granted exactly REQUIRED_PERMISSIONS can do all atlasd's kube layer does."""

from __future__ import annotations

from collections import defaultdict

import pytest
import trio

from atlasd.kube.client import KubeClient
from atlasd.kube.config import load_config
from atlasd.kube.errors import Forbidden
from atlasd.kube.events import post_event
from atlasd.kube.lease import LeaderElector, LeaseTimings
from atlasd.kube.resources import (
    CONFIGMAPS,
    EVENTS,
    LEASES,
    REQUIRED_PERMISSIONS,
    SECRETS,
    SERVICES,
)
from atlasd.model import ObjectRef
from atlasd.watch.informer import Informer, run_informers
from tests.harness.kube import ApiServer

pytestmark = pytest.mark.integration


def _rules() -> list[dict[str, list[str]]]:
    verbs: dict[tuple[str, str], list[str]] = defaultdict(list)
    for group, resource, verb in sorted(REQUIRED_PERMISSIONS):
        verbs[(group, resource)].append(verb)
    return [{"apiGroups": [g], "resources": [r], "verbs": v} for (g, r), v in verbs.items()]


async def test_required_permissions_suffice(apiserver: ApiServer, namespace: str) -> None:
    path = apiserver.service_account_kubeconfig("atlasd", namespace, _rules())
    async with KubeClient(load_config(str(path))) as kube:
        informers = [
            Informer(kube, r, namespace=namespace) for r in (SERVICES, SECRETS, CONFIGMAPS)
        ]
        async with trio.open_nursery() as nursery:
            await nursery.start(run_informers, informers)
            nursery.cancel_scope.cancel()
        svc = await kube.apply(
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": "east", "namespace": namespace},
                "spec": {"clusterIP": "None", "ports": [{"name": "thanos", "port": 10901}]},
            }
        )
        secret = await kube.create(
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": "atlas-ca", "namespace": namespace},
                "data": {},
            }
        )
        await kube.replace({**secret, "data": {"ca.pem": "Q0E="}})
        await kube.delete(SECRETS, "atlas-ca", namespace=namespace)
        ref = ObjectRef(
            kind="Service", name="east", namespace=namespace, uid=svc["metadata"]["uid"]
        )
        await post_event(kube, ref=ref, reason="InvalidCluster", message="m")
        await post_event(kube, ref=ref, reason="InvalidCluster", message="m")
        elector = LeaderElector(
            kube, name="atlasd", namespace=namespace, identity="me", timings=LeaseTimings()
        )
        assert await elector.try_acquire_or_renew()  # create
        assert await elector.try_acquire_or_renew()  # get + update
        assert await elector.release()
        with pytest.raises(Forbidden):
            await kube.list(LEASES, namespace=namespace)  # not needed, not granted
    async with KubeClient(load_config(str(apiserver.admin_kubeconfig))) as admin:
        events, _ = await admin.list(EVENTS, namespace=namespace)
    assert [e["count"] for e in events] == [2]
