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
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx2
import pytest
import yaml

from atlasd.kube import resources as r
from atlasd.kube.client import KubeClient
from atlasd.kube.config import load_config
from atlasd.kube.errors import Forbidden
from atlasd.kube.events import post_event
from atlasd.model import ObjectRef
from tests.harness.kube import ApiServer
from tests.harness.net import free_port
from tests.harness.procs import Proc
from tests.harness.wait import wait_until

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
ATLASD_CHART = ROOT / "charts" / "atlasd"
ENVOY_CHART = ROOT / "charts" / "envoy"
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


async def _crud(kube: KubeClient, res: r.ApiResource, obj: dict[str, Any], namespace: str) -> None:
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
    assert "--endpoint.sd-config-file=/etc/atlas-endpoints/all.yaml" in notes
    assert "atlas-thanos-endpoints" in notes

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

        # Events: created, then patched (count) when the same problem repeats; listed (the
        # earlier Events of atlasd, read once per start to count repeats across restarts).
        ref = ObjectRef(kind="Service", name="east", namespace=namespace)
        for _ in range(2):
            await post_event(kube, ref=ref, reason="InvalidCluster", message="no externalIPs")
        events = json.loads(apiserver.kubectl("get", "events", "-n", namespace, "-o", "json"))
        ours = [e for e in events["items"] if e["involvedObject"]["name"] == "east"]
        assert [e.get("count") for e in ours] == [2], "create then patch both allowed"
        listed, _ = await kube.list(r.EVENTS, namespace=namespace, field_selector="source=atlasd")
        assert [e["involvedObject"]["name"] for e in listed] == ["east"]

        # The leader Lease: created, read, renewed (never listed or watched).
        lease = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": "atlasd", "namespace": namespace},
            "spec": {"holderIdentity": "pod-a", "leaseDurationSeconds": 15},
        }
        await kube.create(lease)
        got = await kube.get(r.LEASES, "atlasd", namespace=namespace)
        got["spec"]["holderIdentity"] = "pod-b"
        renewed = await kube.replace(got)
        assert renewed["spec"]["holderIdentity"] == "pod-b"

        # Nothing beyond: other resources, other namespaces, cluster scope, unused verbs.
        forbidden: list[Callable[[], Awaitable[object]]] = [
            lambda: kube.list(r.PODS, namespace=namespace),
            lambda: kube.list(r.ENDPOINTS, namespace=namespace),
            lambda: kube.list(r.SECRETS, namespace=other),
            lambda: kube.list(r.SERVICES, namespace=other),
            lambda: kube.list(r.NAMESPACES),
            lambda: kube.list(r.ROLES, namespace=namespace),
            lambda: kube.list(r.EVENTS, namespace=other),
            lambda: kube.list(r.DEPLOYMENTS, namespace=namespace),
            lambda: kube.delete(r.LEASES, "atlasd", namespace=namespace),
            lambda: kube.list(r.LEASES, namespace=namespace),
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


# ---------------------------------------------------------------- end to end: atlasd run


def _atlasd_env_from_release(helm: Helm, namespace: str) -> dict[str, str]:
    """The atlasd container's environment as installed (literal values only)."""
    manifest = helm("get", "manifest", RELEASE, "--namespace", namespace)
    [deploy] = [d for d in yaml.safe_load_all(manifest) if d and d["kind"] == "Deployment"]
    [atlasd] = [
        c for c in deploy["spec"]["template"]["spec"]["containers"] if c["name"] == "atlasd"
    ]
    return {e["name"]: e["value"] for e in atlasd["env"] if "value" in e}


def test_atlasd_run_onboards_a_cluster_with_only_the_chart_role(
    helm: Helm, apiserver: ApiServer, namespace: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    _install(helm, namespace)
    kubeconfig = _sa_kubeconfig(apiserver, namespace, RELEASE, tmp_path / "sa.kubeconfig")
    env = _atlasd_env_from_release(helm, namespace)
    # The pod's environment, except what only makes sense inside the pod: loopback
    # listeners on free ports, the zone in the test's directory, the SA token by file,
    # the forwarder token (the Secret the chart generated) by file.
    http_port, ads_port = free_port(), free_port()
    zone = tmp_path / "zone" / "atlas.zone"
    zone.parent.mkdir()
    token = json.loads(
        apiserver.kubectl(
            "get", "secret", f"{RELEASE}-forwarder-token", "-n", namespace, "-o", "json"
        )
    )["data"]["token"]
    token_file = tmp_path / "forwarder-token"
    token_file.write_bytes(base64.b64decode(token))
    env.update(
        {
            "NAMESPACE": namespace,
            "POD_NAME": "atlasd-test-0",
            "ATLAS_KUBECONFIG": str(kubeconfig),
            "ATLAS_ADS_LISTEN": f"127.0.0.1:{ads_port}",
            "ATLAS_HTTP_LISTEN": f"127.0.0.1:{http_port}",
            "ATLAS_ZONE_FILE": str(zone),
            "ATLAS_FORWARDER_TOKEN_FILE": str(token_file),
            "KUBECONFIG": "",
        }
    )
    proc = Proc(
        "atlasd-run", [sys.executable, "-m", "atlasd", "run"], log_dir=tmp_path, env=env, cwd=ROOT
    )
    proc.start()
    request.addfinalizer(proc.stop)

    def ready() -> bool:
        proc.check_running()
        try:
            return httpx2.get(f"http://127.0.0.1:{http_port}/readyz", timeout=2).status_code == 200
        except httpx2.HTTPError:
            return False

    wait_until(ready, timeout=60, what="atlasd /readyz")

    def admin_get(kind: str, name: str) -> dict[str, Any] | None:
        out = apiserver.kubectl(
            "get", kind, name, "-n", namespace, "-o", "json", "--ignore-not-found"
        )
        return json.loads(out) if out.strip() else None

    cluster = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": "east",
            "labels": {"goatlas.io/cluster": "true", "goatlas.io/replicas": "2"},
            # Compatible mode (keys stored, the envoy chart rendered from values with keys);
            # the chart's default for a new cluster is enrollment.
            "annotations": {"goatlas.io/enrollment": "false"},
        },
        "spec": {
            "externalIPs": ["203.0.113.10"],
            "ports": [
                {"name": "thanos", "port": 10901},
                {"name": "prometheus", "port": 9090},
            ],
        },
    }
    bad = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "broken", "labels": {"goatlas.io/cluster": "true"}},
        "spec": {"ports": [{"name": "thanos", "port": 10901}]},
    }
    for obj in (cluster, bad):
        apiserver.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(obj))

    # Leader: the Lease is held by this replica.
    def leading() -> bool:
        lease = admin_get("lease", env["ATLAS_LEASE_NAME"])
        return bool(lease) and lease["spec"].get("holderIdentity") == "atlasd-test-0"

    wait_until(leading, timeout=60, what="atlasd holding its Lease")

    # Onboarded (despite the malformed "broken" beside it): sidecar Services, the values
    # Secret, the PKI, the zone and its ConfigMap mirror.
    def onboarded() -> bool:
        proc.check_running()
        cm = admin_get("configmap", env["ATLAS_DNS_CM_NAME"])
        return (
            all(admin_get("service", f"east-thanos-sidecar{i}") for i in range(2))
            and admin_get("secret", "east-envoy-values") is not None
            and admin_get("secret", "atlas-ca") is not None
            and cm is not None
            and "east-thanos-sidecar1" in cm["data"].get("atlas.zone", "")
            and zone.exists()
            and "east-thanos-sidecar1" in zone.read_text()
        )

    wait_until(onboarded, timeout=90, what="cluster east onboarded by atlasd")

    # The values Secret atlasd wrote, fed to the Envoy chart, mounts exactly its files.
    secret = admin_get("secret", "east-envoy-values")
    assert secret is not None
    values_text = base64.b64decode(secret["data"]["values.yaml"]).decode()
    values_file = tmp_path / "east-values.yaml"
    values_file.write_text(values_text)
    rendered = helm(
        "template", "atlas-envoy", str(ENVOY_CHART), "-n", "monitoring", "-f", str(values_file)
    )
    [files_secret] = [
        d
        for d in yaml.safe_load_all(rendered)
        if d and d["kind"] == "Secret" and d["metadata"]["name"] == "atlas-envoy"
    ]
    files = {k: base64.b64decode(v).decode() for k, v in files_secret["data"].items()}
    assert files == yaml.safe_load(values_text)["files"]
    assert yaml.safe_load(files["envoy.yaml"])["node"]["id"] == "east"

    # The malformed cluster is reported as a Warning Event on its Service (events create).
    def reported() -> bool:
        events = json.loads(apiserver.kubectl("get", "events", "-n", namespace, "-o", "json"))
        return any(
            e["involvedObject"]["name"] == "broken" and e["type"] == "Warning"
            for e in events["items"]
        )

    wait_until(reported, timeout=60, what="a Warning Event on the malformed cluster Service")

    # Removing the cluster removes what atlasd made for it (delete allowed).
    apiserver.kubectl("delete", "service", "east", "-n", namespace)

    def removed() -> bool:
        proc.check_running()
        return admin_get("service", "east-thanos-sidecar0") is None and (
            admin_get("secret", "east-envoy-values") is None
        )

    wait_until(removed, timeout=90, what="cluster east's objects removed")
    log = proc.log_text()
    assert "Forbidden" not in log and " 403" not in log, log[-3000:]
