"""A real kind cluster (tests/harness/kind.py): the development loop docs/operations.md
describes, "Develop against kind".

One cluster for the module, from the node image built here (kind's podman provider);
the atlasd and CoreDNS images `make image` builds are loaded into it with `kind load`.
In file order: `helm install` the chart, onboard a cluster by a labelled Service (its
Secrets, and its SRV record through the chart's DNS Service), `atlasd run --kubeconfig`
from the host against the same cluster in a second namespace, `helm uninstall`.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dns.message
import dns.rdatatype
import pytest
import yaml

from tests.harness import components, kind
from tests.harness.fixtures import helm_runner
from tests.harness.images import Image
from tests.harness.kube import run_kubectl
from tests.harness.machine import read_sysctls, write_sysctls
from tests.harness.node import take_node_lock
from tests.harness.wait import wait_until
from tests.integration.daemon_helpers import Atlasd

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "atlasd"
NS = "monitoring"
DEV_NS = "dev"  # where the host's `atlasd run` works, beside the chart's pod
RELEASE = "atlasd"
CHART_VALUES = yaml.safe_load((CHART / "values.yaml").read_text())
SRV_NAME = "_thanos._tcp.sidecars.thanos.atlas."

Doc = dict[str, Any]


@dataclass
class Cluster:
    name: str
    kubeconfig: Path
    helm: Callable[..., str]
    created_in: float

    def kubectl(self, *args: str, input: str | None = None, check: bool = True) -> str:
        binary = components.kube_release() / "kubectl"
        return run_kubectl(binary, self.kubeconfig, *args, input=input, check=check)

    def get(self, kind_: str, name: str, ns: str = NS) -> Doc | None:
        out = self.kubectl("get", kind_, name, "-n", ns, "-o", "json", check=False)
        return json.loads(out) if out.strip() else None

    def must(self, kind_: str, name: str, ns: str = NS) -> Doc:
        """The object, or LookupError (which ``wait_until`` counts as "not yet")."""
        doc = self.get(kind_, name, ns)
        if doc is None:
            raise LookupError(f"{kind_} {ns}/{name} not found")
        return doc

    def items(self, kind_: str, ns: str = NS, selector: str = "") -> list[Doc]:
        args = ["get", kind_, "-n", ns, "-o", "json"] + (["-l", selector] if selector else [])
        items: list[Doc] = json.loads(self.kubectl(*args))["items"]
        return items


@pytest.fixture(scope="module")
def cluster(
    tmp_path_factory: pytest.TempPathFactory, images: dict[str, Image]
) -> Iterator[Cluster]:
    """A kind cluster with the atlasd and CoreDNS images loaded; deleted at teardown.

    kubelet in the node writes kernel tunables of the machine (not per-namespace), as
    the harness's node does: the same lock keeps one node at a time, and the values are
    written back after the cluster is gone.
    """
    home = tmp_path_factory.mktemp("kind")
    name = f"atlasd-test-{int(time.time()) % 100000}"
    kubeconfig = home / "kubeconfig"
    lock = take_node_lock()
    saved = read_sysctls()
    started = time.monotonic()
    try:
        kind.create(name, kubeconfig)
        for image in ("atlasd", "coredns"):
            kind.load(name, images[image])
        yield Cluster(name, kubeconfig, helm_runner(kubeconfig, home), time.monotonic() - started)
    finally:
        kind.delete(name)
        left = write_sysctls(saved)
        lock.close()
    assert name not in kind.clusters()
    assert not left, f"kernel tunables not given back: {left}"


def _image_sets(images: dict[str, Image]) -> list[str]:
    atlasd_repo, atlasd_tag = images["atlasd"].ref.rsplit(":", 1)
    dns_repo, dns_tag = images["coredns"].ref.rsplit(":", 1)
    sets = {
        "image.repository": atlasd_repo,
        "image.tag": atlasd_tag,
        "coredns.image.repository": dns_repo,
        "coredns.image.tag": dns_tag,
        # The Envoy side is not part of this loop: any address for its bootstrap.
        "controller.envoy.host": "192.0.2.250",
    }
    return [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]


def _cluster_service(name: str, ns: str, ip: str) -> str:
    return yaml.safe_dump(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {
                "name": name,
                "namespace": ns,
                "labels": {"goatlas.io/cluster": "true", "goatlas.io/replicas": "1"},
                # Compatible mode (atlasd stores the keys), which this module reads; the
                # chart's default for a new cluster is enrollment (docs/security.md).
                "annotations": {"goatlas.io/enrollment": "false"},
            },
            "spec": {
                "externalIPs": [ip],
                "ports": [{"name": "prometheus", "port": 9090}, {"name": "thanos", "port": 10901}],
            },
        }
    )


def _ready_pods(c: Cluster) -> list[Doc]:
    pods = c.items("pods", selector="app.kubernetes.io/name=atlasd")
    return [
        p
        for p in pods
        if not p["metadata"].get("deletionTimestamp")
        and any(
            x["type"] == "Ready" and x["status"] == "True"
            for x in p.get("status", {}).get("conditions", [])
        )
    ]


def test_helm_install_runs_a_ready_pod(cluster: Cluster, images: dict[str, Image]) -> None:
    print(f"kind cluster {cluster.name} created and loaded in {cluster.created_in:.0f}s")
    nodes = json.loads(cluster.kubectl("get", "nodes", "-o", "json"))["items"]
    assert [n["status"]["nodeInfo"]["kubeletVersion"] for n in nodes] == [
        components.KUBERNETES_VERSION
    ]
    cluster.helm(
        "install", RELEASE, str(CHART), "-n", NS, "--create-namespace",
        *_image_sets(images), "--wait", "--timeout", "300s",
    )  # fmt: skip
    pods = wait_until(lambda: _ready_pods(cluster), timeout=120, what="a Ready atlasd pod")
    assert len(pods) == CHART_VALUES["replicaCount"]
    statuses = pods[0]["status"]["containerStatuses"]
    assert {s["name"] for s in statuses} == {"atlasd", "coredns"}
    assert all(s["ready"] for s in statuses), statuses
    # The images are the ones loaded, never pulled (nothing here reaches a registry).
    assert {s["image"] for s in statuses} == {images["atlasd"].ref, images["coredns"].ref}


def _srv_in_cluster(c: Cluster, server: str) -> list[str]:
    """The SRV answer from ``server`` (a ClusterIP), asked from inside the atlasd pod
    (UDP through kube-proxy, as a Thanos querier in the cluster asks); the pod's
    python sends the query built here and returns the raw answer."""
    query = dns.message.make_query(SRV_NAME, dns.rdatatype.SRV)
    script = (
        "import socket, sys; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
        f"s.settimeout(3); s.sendto(bytes.fromhex('{query.to_wire().hex()}'), ('{server}', 53)); "
        "print(s.recv(65535).hex())"
    )
    out = c.kubectl(
        "exec", "-n", NS, f"deploy/{RELEASE}", "-c", "atlasd", "--", "python3", "-c", script
    )
    answer = dns.message.from_wire(bytes.fromhex(out.strip()))
    return sorted(rd.to_text() for rrset in answer.answer for rd in rrset)


def test_a_labelled_service_is_onboarded_with_secrets_and_an_srv_record(
    cluster: Cluster,
) -> None:
    cluster.kubectl("apply", "-f", "-", input=_cluster_service("east", NS, "192.0.2.10"))
    values = wait_until(
        lambda: cluster.must("secret", "east-envoy-values"), timeout=90, what="east's values"
    )
    boot = yaml.safe_load(
        yaml.safe_load(base64.b64decode(values["data"]["values.yaml"]))["files"]["envoy.yaml"]
    )
    assert boot["node"]["id"] == "east"
    identity = wait_until(
        lambda: cluster.must("secret", "east-atlas-identity"), timeout=30, what="east's identity"
    )
    assert {"ca.crt", "client.crt", "client.key"} <= set(identity["data"])
    dns_ip = cluster.must("service", f"{RELEASE}-dns")["spec"]["clusterIP"]
    want = f"10 100 10901 east-thanos-sidecar0.{NS}.svc.cluster.local."
    wait_until(
        lambda: want in _srv_in_cluster(cluster, dns_ip),
        timeout=90,
        interval=1,
        what="east's SRV record through the chart's DNS Service",
    )


def test_atlasd_run_from_the_host_against_the_same_cluster(
    cluster: Cluster, tmp_path: Path
) -> None:
    """The local loop: `atlasd run --kubeconfig` on the host, in its own namespace,
    beside the chart's pod (which watches only its own)."""
    cluster.kubectl("create", "namespace", DEV_NS)
    cluster.kubectl("apply", "-f", "-", input=_cluster_service("west", DEV_NS, "192.0.2.20"))
    local = Atlasd(tmp_path, f"--kubeconfig={cluster.kubeconfig}", f"--namespace={DEV_NS}")
    local.start(timeout=90)
    try:
        wait_until(lambda: local.status()["leader"], timeout=60, what="the local atlasd leads")
        for secret in ("west-envoy-values", "west-atlas-identity", "atlas-ca"):
            wait_until(
                lambda secret=secret: cluster.must("secret", secret, DEV_NS),  # type: ignore[misc]
                timeout=60,
                what=f"{DEV_NS}/{secret} written by the local atlasd",
            )
        want = f"west-thanos-sidecar0.{DEV_NS}.svc.cluster.local."
        wait_until(
            lambda: local.zone_file.exists() and want in local.zone_file.read_text(),
            timeout=60,
            what="west's SRV record in the local zone file",
        )
        # Each atlasd keeps to its namespace: the pod has no west, the host no east.
        assert cluster.get("secret", "west-envoy-values", NS) is None
        assert cluster.get("secret", "east-envoy-values", DEV_NS) is None
    finally:
        local.proc.stop()


def test_helm_uninstall_removes_the_pod_and_keeps_what_atlasd_wrote(cluster: Cluster) -> None:
    cluster.helm("uninstall", RELEASE, "-n", NS, "--wait", "--timeout", "120s")
    wait_until(
        lambda: not cluster.items("pods", selector="app.kubernetes.io/name=atlasd"),
        timeout=120,
        what="the atlasd pod gone",
    )
    assert cluster.get("deployment", RELEASE) is None
    # docs/charts.md: the PKI and the values atlasd wrote stay after an uninstall.
    for secret in ("atlas-ca", "east-envoy-values", "east-atlas-identity"):
        assert cluster.get("secret", secret) is not None, secret
