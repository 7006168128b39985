"""The atlasd chart installed for real (helm install into the harness apiserver), then
its ServiceAccount's token used with atlasd's own Kubernetes client.

Proof that the chart's Role suffices for every call atlasd makes in its namespace
(watch/list/get/apply/update/patch/delete of Services, Secrets and ConfigMaps, Events
created and patched, the leader Lease created, read and renewed) and that it grants
nothing beyond that namespace and those resources. The end-to-end proof — `atlasd run`
itself onboarding a cluster with this token — needs the daemon and is added when it exists.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from atlasd.kube import resources as r
from atlasd.kube.client import KubeClient
from atlasd.kube.config import load_config
from atlasd.kube.errors import Forbidden
from atlasd.kube.events import post_event
from atlasd.model import ObjectRef
from tests.harness.kube import ApiServer

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
ATLASD_CHART = ROOT / "charts" / "atlasd"
RELEASE = "atlasd"

Helm = Callable[..., str]


def _sa_kubeconfig(apiserver: ApiServer, namespace: str, sa: str, path: Path) -> Path:
    token = apiserver.token_for(sa, namespace)
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [
                    {
                        "name": "c",
                        "cluster": {
                            "server": apiserver.url,
                            "certificate-authority-data": base64.b64encode(
                                apiserver.serving_ca.cert_pem
                            ).decode(),
                        },
                    }
                ],
                "users": [{"name": "u", "user": {"token": token}}],
                "contexts": [
                    {"name": "c", "context": {"cluster": "c", "user": "u", "namespace": namespace}}
                ],
                "current-context": "c",
            }
        )
    )
    path.chmod(0o600)
    return path


def _install(helm: Helm, namespace: str) -> str:
    return helm("install", RELEASE, str(ATLASD_CHART), "--namespace", namespace)


def _obj(kind: str, name: str, namespace: str, **body: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": kind,
        "metadata": {"name": name, "namespace": namespace, "labels": {"t": "1"}},
        **body,
    }


async def _crud(kube: KubeClient, res: r.Resource, obj: dict[str, Any], namespace: str) -> None:
    """Every verb atlasd uses on Services, Secrets and ConfigMaps."""
    name = obj["metadata"]["name"]
    items, rv = await kube.list(res, namespace=namespace, label_selector="t=1")
    assert items == []
    applied = await kube.apply(obj)  # server-side apply (create through patch)
    got = await kube.get(res, name, namespace=namespace)
    assert got["metadata"]["uid"] == applied["metadata"]["uid"]
    seen = [
        ev
        async for ev in kube.watch(res, namespace=namespace, resource_version=rv, timeout_seconds=1)
    ]
    assert any(ev["type"] == "ADDED" for ev in seen)
    got["metadata"].setdefault("annotations", {})["x"] = "update"
    await kube.replace(got)  # update
    await kube.patch_merge(
        res, name, {"metadata": {"annotations": {"x": "patch"}}}, namespace=namespace
    )  # patch
    await kube.apply(obj)  # apply again: a patch of an existing object
    await kube.delete(res, name, namespace=namespace)
    items, _ = await kube.list(res, namespace=namespace, label_selector="t=1")
    assert items == []


async def test_chart_role_covers_every_call_atlasd_makes_and_nothing_else(
    helm: Helm, apiserver: ApiServer, namespace: str, tmp_path: Path
) -> None:
    notes = _install(helm, namespace)
    # NOTES.txt tells the next steps.
    assert "atlasd cluster add" in notes
    assert "goatlas.io/cluster" in notes
    assert "atlasd cluster values east --format raw" in notes
    assert "dnssrvnoa+_thanos._tcp.sidecars.thanos.atlas." in notes

    kubeconfig = _sa_kubeconfig(apiserver, namespace, RELEASE, tmp_path / "sa.kubeconfig")
    other = f"{namespace}-other"
    apiserver.create_namespace(other)

    async with KubeClient(load_config(str(kubeconfig))) as kube:
        await _crud(
            kube,
            r.SERVICES,
            _obj("Service", "east", namespace, spec={"ports": [{"name": "thanos", "port": 10901}]}),
            namespace,
        )
        await _crud(
            kube,
            r.SECRETS,
            _obj("Secret", "east-envoy-values", namespace, stringData={"values.yaml": "a: 1\n"}),
            namespace,
        )
        await _crud(
            kube,
            r.CONFIGMAPS,
            _obj("ConfigMap", "atlas-coredns", namespace, data={"atlas.zone": "x"}),
            namespace,
        )

        # Events: created, then patched (count) when the same problem repeats.
        ref = ObjectRef(kind="Service", name="east", namespace=namespace)
        for _ in range(2):
            await post_event(kube, ref=ref, reason="InvalidCluster", message="no externalIPs")
        events = json.loads(apiserver.kubectl("get", "events", "-n", namespace, "-o", "json"))
        ours = [e for e in events["items"] if e["involvedObject"]["name"] == "east"]
        assert [e.get("count") for e in ours] == [2], "create then patch both allowed"

        # The leader Lease: created, read, listed, watched, renewed.
        lease = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": "atlasd-leader", "namespace": namespace},
            "spec": {"holderIdentity": "pod-a", "leaseDurationSeconds": 15},
        }
        await kube.create(lease)
        leases, rv = await kube.list(r.LEASES, namespace=namespace)
        assert [x["metadata"]["name"] for x in leases] == ["atlasd-leader"]
        got = await kube.get(r.LEASES, "atlasd-leader", namespace=namespace)
        got["spec"]["holderIdentity"] = "pod-b"
        await kube.replace(got)
        seen = [
            ev
            async for ev in kube.watch(
                r.LEASES, namespace=namespace, resource_version=rv, timeout_seconds=1
            )
        ]
        assert any(ev["type"] == "MODIFIED" for ev in seen)

        # Nothing beyond: other resources, other namespaces, cluster scope, unused verbs.
        forbidden: list[Callable[[], Awaitable[object]]] = [
            lambda: kube.list(r.PODS, namespace=namespace),
            lambda: kube.list(r.ENDPOINTS, namespace=namespace),
            lambda: kube.list(r.SECRETS, namespace=other),
            lambda: kube.list(r.SERVICES, namespace=other),
            lambda: kube.list(r.NAMESPACES),
            lambda: kube.list(r.ROLES, namespace=namespace),
            lambda: kube.list(r.EVENTS, namespace=namespace),
            lambda: kube.list(r.DEPLOYMENTS, namespace=namespace),
            lambda: kube.delete(r.LEASES, "atlasd-leader", namespace=namespace),
            lambda: kube.create(
                {
                    "apiVersion": "rbac.authorization.k8s.io/v1",
                    "kind": "Role",
                    "metadata": {"name": "escalate", "namespace": namespace},
                    "rules": [{"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]}],
                }
            ),
            lambda: kube.create(_obj("Secret", "x", other)),
        ]
        for call in forbidden:
            with pytest.raises(Forbidden):
                await call()
