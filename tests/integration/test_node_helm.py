"""`helm install` for real: the charts' pods running on a real node (tests/harness/node.py).

What a user does first: `helm install atlasd charts/atlasd` and watch one pod come up;
then onboard a cluster with one Service, install the observability Envoy from the values
atlasd wrote, upgrade and uninstall. Every image is the one `make image` builds; every
probe, Service, Role and NetworkPolicy is the chart's own.

The tests share one node and one release (module fixtures) and run in file order:
install, onboard, Envoy, upgrade and uninstall.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dns.message
import dns.query
import dns.rdatatype
import grpc
import httpx2
import pytest
import yaml

from tests.harness.certs import Pair
from tests.harness.envoy import Envoy
from tests.harness.images import Image
from tests.harness.node import NODE_IP, Node
from tests.harness.prom import WebProc, prometheus
from tests.harness.wait import wait_until
from tests.integration.daemon_helpers import cli
from tests.unit.xds import ads_client

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
ATLASD_CHART = ROOT / "charts" / "atlasd"
ENVOY_CHART = ROOT / "charts" / "envoy"
NS = "monitoring"  # the chart's documented namespace
RELEASE = "atlasd"  # the observability Envoy is release "atlas" (atlasd's default selector)
# Outside the pods' subnet (node.POD_SUBNET): the observability Envoy's external
# address, where downstream Envoys reach its xDS listener (controller.envoy.host).
OBS_ENVOY_IP = "10.244.0.250"
# The downstream Envoy runs on the node itself; its cluster Service's externalIPs[0].
DOWNSTREAM_IP = NODE_IP
CHART_VALUES = yaml.safe_load((ATLASD_CHART / "values.yaml").read_text())
ENVOY_VALUES = yaml.safe_load((ENVOY_CHART / "values.yaml").read_text())
PSS_ENFORCE = "pod-security.kubernetes.io/enforce"
ENROLLMENT = "goatlas.io/enrollment"
# The enrollment endpoint as the downstream pods reach it (the chart's `<release>-enroll`
# Service), written into an enrolled cluster's values (agent.server).
ENROLL_ADDRESS = f"{RELEASE}-enroll.{NS}.svc.cluster.local:6307"
# A downstream cluster in enrollment mode: its Envoy installed by the envoy chart (with
# the agent) in a namespace of its own, its Service's external address (outside the pod
# range, like OBS_ENVOY_IP).
NORTH, NORTH_NS, NORTH_IP = "north", "north", "10.244.0.252"

Helm = Callable[..., str]
Doc = dict[str, Any]


def _image_sets(images: dict[str, Image]) -> list[str]:
    atlasd_repo, atlasd_tag = images["atlasd"].ref.rsplit(":", 1)
    dns_repo, dns_tag = images["coredns"].ref.rsplit(":", 1)
    return [
        f"image.repository={atlasd_repo}",
        f"image.tag={atlasd_tag}",
        f"coredns.image.repository={dns_repo}",
        f"coredns.image.tag={dns_tag}",
    ]


def _sets(values: list[str]) -> list[str]:
    return [a for v in values for a in ("--set", v)]


def _get(node: Node, kind: str, name: str | None = None, **selectors: str) -> Any:
    args = ["get", kind, "-n", NS, "-o", "json"]
    if name:
        args.insert(2, name)
    if selectors:
        args += ["-l", ",".join(f"{k}={v}" for k, v in selectors.items())]
    out = node.kubectl(*args, check=name is None)
    return json.loads(out) if out else None


def _maybe(node: Node, kind: str, name: str) -> Doc | None:
    out = node.kubectl("get", kind, name, "-n", NS, "-o", "json", check=False)
    return json.loads(out) if out.strip() else None


def _atlasd_pods(node: Node) -> list[Doc]:
    pods: list[Doc] = _get(node, "pods", **{"app.kubernetes.io/name": "atlasd"})["items"]
    return [p for p in pods if not p["metadata"].get("deletionTimestamp")]


def _ready(pod: Doc) -> bool:
    conds = pod.get("status", {}).get("conditions", [])
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conds)


def _values_of(node: Node, secret: str) -> Doc:
    obj = _get(node, "secret", secret)
    doc: Doc = yaml.safe_load(base64.b64decode(obj["data"]["values.yaml"]))
    return doc


def _digest(secret: Doc) -> str:
    return hashlib.sha256(json.dumps(secret["data"], sort_keys=True).encode()).hexdigest()


def _cluster_ip(node: Node, service: str) -> str:
    return str(_get(node, "service", service)["spec"]["clusterIP"])


def _srv(server: str, name: str) -> list[str]:
    q = dns.message.make_query(name, dns.rdatatype.SRV)
    resp = dns.query.udp(q, server, port=53, timeout=2)
    return sorted(rd.to_text() for rrset in resp.answer for rd in rrset)


def _cluster_service(
    name: str, *, ip: str | None, annotations: dict[str, str], enrolled: bool = False
) -> str:
    """A cluster Service; its mode said explicitly (the chart's default for an unannotated
    one is enrollment): compatible, with the keys in its values, unless ``enrolled``."""
    annotations = {ENROLLMENT: "true" if enrolled else "false", **annotations}
    spec: Doc = {
        "ports": [
            {"name": "prometheus", "port": 9090},
            {"name": "thanos", "port": 10901},
        ]
    }
    if ip:
        spec["externalIPs"] = [ip]
    return yaml.safe_dump(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {
                "name": name,
                "namespace": NS,
                "labels": {"goatlas.io/cluster": "true", "goatlas.io/replicas": "1"},
                "annotations": annotations,
            },
            "spec": spec,
        }
    )


@pytest.fixture(scope="module")
def release(node: Node, node_helm: Helm, images: dict[str, Image]) -> Iterator[list[str]]:
    """`helm install atlasd charts/atlasd`: the chart's defaults plus the local images
    and the observability Envoy's address; yields the --set values used."""
    values = [
        *_image_sets(images),
        f"controller.envoy.host={OBS_ENVOY_IP}",
        f"enrollment.address={ENROLL_ADDRESS}",
    ]
    # Both charts' pods must pass the strictest Pod Security Standard: the namespace
    # enforces it, so a pod that does not is refused, not run.
    node.kubectl("create", "namespace", NS)
    node.kubectl("label", "namespace", NS, f"{PSS_ENFORCE}=restricted")
    node_helm(
        "install", RELEASE, str(ATLASD_CHART), "-n", NS,
        *_sets(values), "--wait", "--timeout", "180s",
    )  # fmt: skip
    yield values


def test_install_brings_up_a_ready_pod_with_the_charts_probes_and_role(
    node: Node, release: list[str], images: dict[str, Image]
) -> None:
    pods = wait_until(
        lambda: [p for p in _atlasd_pods(node) if _ready(p)],
        timeout=120,
        what="a Ready atlasd pod",
    )
    assert len(pods) == CHART_VALUES["replicaCount"] == 1
    pod = pods[0]
    spec = pod["spec"]
    containers = {c["name"]: c for c in spec["containers"]}
    assert set(containers) == {"atlasd", "coredns"}
    statuses = {c["name"]: c for c in pod["status"]["containerStatuses"]}
    assert all(s["ready"] and s["restartCount"] == 0 for s in statuses.values()), statuses

    # The probes are the chart's own (values.yaml), answered by the running daemon.
    atlasd = containers["atlasd"]
    for probe in ("livenessProbe", "readinessProbe"):
        want = CHART_VALUES[probe]
        got = atlasd[probe]
        assert got["httpGet"]["path"] == want["httpGet"]["path"]
        assert got["httpGet"]["port"] == want["httpGet"]["port"] == "metrics"
        assert got["periodSeconds"] == want["periodSeconds"]
    # Through the chart's metrics Service: kube-proxy routes to the pod once the
    # EndpointSlice shows it Ready, a moment after the pod's own condition (until then
    # its rule for the Service rejects the connection).
    metrics_url = (
        f"http://{_cluster_ip(node, f'{RELEASE}-metrics')}:{CHART_VALUES['metrics']['port']}"
    )
    for path in ("/readyz", "/healthz"):
        wait_until(
            lambda path=path: httpx2.get(f"{metrics_url}{path}", timeout=5).status_code == 200,
            timeout=30,
            what=f"{path} answering 200 through the metrics Service",
        )

    # Admitted under Pod Security "restricted", which the namespace really enforces: a
    # pod without the chart's hardening is refused there.
    labels = _get(node, "namespace", NS)["metadata"]["labels"]
    assert labels[PSS_ENFORCE] == "restricted"
    with pytest.raises(RuntimeError, match='violates PodSecurity "restricted:latest"'):
        node.kubectl("run", "unhardened", "-n", NS, f"--image={images['pause'].ref}",
                     "--restart=Never", "--dry-run=server")  # fmt: skip

    # Hardened as the chart says: uid 65532, read-only root filesystem.
    assert spec["securityContext"]["runAsUser"] == 65532
    assert atlasd["securityContext"]["readOnlyRootFilesystem"] is True

    # atlasd reached the API server through the in-cluster `kubernetes` Service with its
    # ServiceAccount token: the only address kubelet gave it, and the Secrets it wrote.
    env = node.kubectl(
        "exec", "-n", NS, pod["metadata"]["name"], "-c", "atlasd", "--",
        "python3", "-c",
        "import os; print(os.environ['KUBERNETES_SERVICE_HOST'], "
        "os.path.exists('/var/run/secrets/kubernetes.io/serviceaccount/token'))",
    ).split()  # fmt: skip
    assert env == [node.api.kubernetes_service_ip, "True"]
    assert spec["serviceAccountName"] == RELEASE
    ca = wait_until(lambda: _maybe(node, "secret", "atlas-ca"), timeout=60, what="atlas-ca")
    has_ca = "ca.pem" in ca["data"]  # a local: a failure must not print the CA's key
    assert has_ca

    # ...with only the chart's namespaced Role: nothing cluster-wide is bound to it.
    sa = f"system:serviceaccount:{NS}:{RELEASE}"
    bindings = json.loads(node.kubectl("get", "clusterrolebindings", "-o", "json"))["items"]
    assert not [b for b in bindings for s in b.get("subjects") or [] if s.get("name") == RELEASE]
    can = node.kubectl("auth", "can-i", "--as", sa, "list", "secrets", "-n", NS, check=False)
    assert can.strip() == "yes"
    cannot = node.kubectl(
        "auth", "can-i", "--as", sa, "list", "secrets", "-n", "default", check=False
    )
    assert cannot.strip() == "no"


def test_a_cluster_service_is_onboarded_by_the_pod(node: Node, release: list[str]) -> None:
    node.kubectl(
        "apply", "-f", "-", input=_cluster_service("east", ip=DOWNSTREAM_IP, annotations={})
    )
    node.kubectl("apply", "-f", "-", input=_cluster_service("broken", ip=None, annotations={}))

    values = wait_until(
        lambda: _maybe(node, "secret", "east-envoy-values"),
        timeout=60,
        what="east-envoy-values written by the pod",
    )
    east = yaml.safe_load(base64.b64decode(values["data"]["values.yaml"]))
    boot = yaml.safe_load(east["files"]["envoy.yaml"])
    assert boot["node"]["id"] == "east"
    sidecar = wait_until(
        lambda: _maybe(node, "service", "east-thanos-sidecar0"), timeout=30, what="sidecar"
    )
    assert sidecar["spec"]["clusterIP"] == "None"
    assert sidecar["metadata"]["labels"]["goatlas.io/thanos-sidecar"] == "0"
    assert _maybe(node, "secret", "broken-envoy-values") is None

    def warning() -> list[Doc]:
        events = _get(node, "events")["items"]
        return [
            e for e in events if e["involvedObject"]["name"] == "broken" and e["type"] == "Warning"
        ]

    events = wait_until(warning, timeout=60, what="a Warning Event for the broken cluster")
    assert events[0]["reason"] == "InvalidCluster"
    assert events[0]["message"].startswith("spec.externalIPs"), events[0]["message"]

    # The CoreDNS container in the pod answers the SRV query on the chart's DNS Service.
    dns_ip = _cluster_ip(node, f"{RELEASE}-dns")
    want = f"10 100 10901 east-thanos-sidecar0.{NS}.svc.cluster.local."
    answer = wait_until(
        lambda: want in _srv(dns_ip, "_thanos._tcp.sidecars.thanos.atlas.") and want,
        timeout=60,
        what="the SRV record through the chart's DNS Service",
    )
    assert answer == want


def test_the_envoy_chart_gets_its_config_from_the_pod_and_routes_prometheus(
    node: Node,
    release: list[str],
    node_helm: Helm,
    images: dict[str, Image],
    envoy_factory: Callable[[dict[str, Any], str], Envoy],
    prometheus_factory: Callable[[str], WebProc],
    tmp_path: Path,
) -> None:
    prom = prometheus_factory("global:\n  scrape_interval: 15s\n")
    # The downstream Prometheus east's Envoy forwards /prom/east/ to.
    node.kubectl(
        "annotate", "--overwrite", "-n", NS, "service", "east",
        "goatlas.io/prometheus-service=127.0.0.1",
        f"goatlas.io/prometheus-service-port={prom.port}",
    )  # fmt: skip
    ads_host = f"{RELEASE}-ads.{NS}.svc.cluster.local"  # the headless ADS Service

    def obs_values() -> Doc | None:
        values = _values_of(node, "atlas-envoy-values")
        boot = yaml.safe_load(values["files"]["envoy.yaml"])
        cluster = boot["static_resources"]["clusters"][0]
        addr = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
        return values if addr["address"]["socket_address"]["address"] == ads_host else None

    values = wait_until(obs_values, timeout=60, what="atlas-envoy-values naming the ADS Service")
    values_file = tmp_path / "atlas-envoy-values.yaml"
    values_file.write_text(yaml.safe_dump(values))
    repo, tag = images["envoy"].ref.rsplit(":", 1)
    node_helm(
        "install", "atlas", str(ENVOY_CHART), "-n", NS, "-f", str(values_file),
        "--set", f"image.repository={repo}", "--set", f"image.tag={tag}",
        "--set", f"service.externalIPs={{{OBS_ENVOY_IP}}}",
        "--wait", "--timeout", "120s",
    )  # fmt: skip
    # The charts' NetworkPolicies are installed (no controller enforces them on this node).
    assert _maybe(node, "networkpolicy", RELEASE) is not None
    assert _maybe(node, "networkpolicy", "atlas-envoy") is not None

    # `--wait` returned once the pod was Ready: on the chart's readiness probe, Envoy's own
    # /ready through the probe listener (admin stays on the pod's loopback), in the
    # restricted namespace, as uid 65532, never restarted by the liveness probe.
    [pod] = [
        p
        for p in _get(node, "pods", app="envoy", release="atlas")["items"]
        if not p["metadata"].get("deletionTimestamp")
    ]
    assert _ready(pod)
    [envoy] = pod["spec"]["containers"]
    for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert envoy[kind]["httpGet"]["path"] == "/ready", kind
        assert envoy[kind]["httpGet"]["port"] == "probe", kind
    probe_port = {p["name"]: p["containerPort"] for p in envoy["ports"]}["probe"]
    assert probe_port == ENVOY_VALUES["probes"]["port"]
    assert pod["spec"]["securityContext"]["runAsUser"] == 65532
    assert envoy["resources"] == ENVOY_VALUES["resources"]
    [status] = pod["status"]["containerStatuses"]
    assert status["ready"] and status["restartCount"] == 0, status
    # From outside the pod (the node, as the kubelet): /ready answers, admin does not.
    pod_ip = pod["status"]["podIP"]
    assert httpx2.get(f"http://{pod_ip}:{probe_port}/ready", timeout=5).text.strip() == "LIVE"
    assert httpx2.get(f"http://{pod_ip}:{probe_port}/config_dump", timeout=5).status_code == 404
    with pytest.raises(httpx2.ConnectError):
        httpx2.get(f"http://{pod_ip}:9000/ready", timeout=5)

    # Its values dial atlasd over mTLS with the atlas client certificate.
    boot = yaml.safe_load(values["files"]["envoy.yaml"])
    assert "transport_socket" in boot["static_resources"]["clusters"][0]

    # The Envoy pod asked atlasd's pod for its configuration over ADS and got it: its
    # admin interface (loopback inside the pod) reports the control plane connected and
    # the listeners atlasd serves node "atlas".
    def admin(path: str) -> str:
        return node.kubectl(
            "exec", "-n", NS, "deploy/atlas-envoy", "-c", "envoy", "--", "python3", "-c",
            f"import urllib.request; print(urllib.request.urlopen("
            f"'http://127.0.0.1:9000{path}').read().decode())",
        )  # fmt: skip

    wait_until(
        lambda: "control_plane.connected_state: 1" in admin("/stats?filter=connected_state"),
        timeout=60,
        what="the Envoy pod connected to atlasd's ADS",
    )

    def served() -> str | None:
        got = admin("/listeners")
        return got if "prometheus" in got else None

    listeners = wait_until(
        served,
        timeout=60,
        what="the Envoy pod's listeners from ADS",
    )
    assert "0.0.0.0:10904" in listeners and "0.0.0.0:10900" in listeners, listeners

    # The downstream Envoy, started from east's values, reaches xDS at the observability
    # Envoy's external address (controller.envoy.host), through kube-proxy, over mTLS.
    east = _values_of(node, "east-envoy-values")
    envoy_factory(yaml.safe_load(east["files"]["envoy.yaml"]), "east")

    prom_url = f"http://{_cluster_ip(node, 'atlas-envoy')}:10904/prom/east/api/v1/status/buildinfo"

    def routed() -> httpx2.Response | None:
        r = httpx2.get(prom_url, timeout=5)
        return r if r.status_code == 200 else None

    r = wait_until(routed, timeout=90, what="/prom/east/ through both Envoys", interval=0.5)
    assert r.json()["status"] == "success"
    assert httpx2.get(prom_url.replace("/prom/east/", "/prom/nowhere/"), timeout=5).status_code == (
        404
    )


def test_the_ads_service_refuses_forged_xfcc_with_the_charts_defaults(
    node: Node, release: list[str]
) -> None:
    """Reaching atlasd's ADS Service proves nothing: a forged XFCC header, on a plaintext
    connection or on TLS with a downstream cluster's own certificate, gets
    PERMISSION_DENIED and no resource. The chart's generated token, on plaintext, is what
    the fallback accepts (positive control)."""
    ads_ip = _cluster_ip(node, RELEASE)
    port = CHART_VALUES["controller"]["ports"]["grpc"]
    east = _get(node, "secret", "east-atlas-identity")["data"]
    trust = base64.b64decode(east["ca.crt"])
    east_cert = Pair(base64.b64decode(east["client.crt"]), base64.b64decode(east["client.key"]))
    forged = (("x-forwarded-client-cert", "Hash=0;DNS=east"),)
    for what, tls in (("plaintext", None), ("tls as east", (trust, east_cert))):
        c = ads_client.Client(port, forged, tls=tls, host=ads_ip)
        c.send(ads_client.request("east"))
        assert c.outcome(timeout=30) == grpc.StatusCode.PERMISSION_DENIED, what
        assert c.responses == [], what
    c = ads_client.Client(port, host=ads_ip)
    c.send(ads_client.request("atlas"))
    assert c.outcome(timeout=30) == grpc.StatusCode.PERMISSION_DENIED
    token_secret = _get(node, "secret", f"{RELEASE}-forwarder-token")["data"]["token"]
    token = base64.b64decode(token_secret).decode()
    c = ads_client.Client(port, (("x-atlasd-forwarder-token", token),), host=ads_ip)
    c.send(ads_client.request("atlas"))
    assert c.outcome(timeout=30) == 1


def _pods(node: Node, namespace: str, **selectors: str) -> list[Doc]:
    sel = ",".join(f"{k}={v}" for k, v in selectors.items())
    out = node.kubectl("get", "pods", "-n", namespace, "-l", sel, "-o", "json")
    return [p for p in json.loads(out)["items"] if not p["metadata"].get("deletionTimestamp")]


def test_an_enrolled_cluster_installs_with_the_agent_and_a_replaced_pod_needs_no_token(
    node: Node, release: list[str], node_helm: Helm, images: dict[str, Image], tmp_path: Path
) -> None:
    """Enrollment mode on a real node: atlasd writes `north`'s values without any key; the
    envoy chart installs them with the agent (the locally built atlasd image) and a join
    token into a namespace enforcing `restricted`; the agent enrolls, the Envoy pod turns
    Ready and `/prom/north/` answers through the observability Envoy over mTLS with the
    agent's certificate. The pod deleted, its replacement restores the credentials from
    the agent's Secret (the token is spent) and the chain answers again."""
    prom = prometheus("global:\n  scrape_interval: 15s\n", workdir=tmp_path, host=NODE_IP)
    prom.start()
    try:
        node.kubectl("apply", "-f", "-", input=_cluster_service(
            NORTH, ip=NORTH_IP, enrolled=True, annotations={
                "goatlas.io/prometheus-service": NODE_IP,
                "goatlas.io/prometheus-service-port": str(prom.port),
            },
        ))  # fmt: skip

        def enrolled_values() -> Doc | None:
            secret = _maybe(node, "secret", f"{NORTH}-envoy-values")
            if secret is None:
                return None
            values: Doc = yaml.safe_load(base64.b64decode(secret["data"]["values.yaml"]))
            return values if values.get("agent", {}).get("enabled") else None

        values = wait_until(enrolled_values, timeout=60, what=f"{NORTH}'s enrolled values")
        # No key, no certificate: the agent makes them in the pod (contract of issue 24).
        assert set(values["files"]) == {"envoy.yaml"}
        assert "PRIVATE KEY" not in yaml.safe_dump(values)
        assert values["agent"]["server"] == ENROLL_ADDRESS
        assert _maybe(node, "secret", f"{NORTH}-atlas-identity") is None
        values_file = tmp_path / "north-values.yaml"
        values_file.write_text(yaml.safe_dump(values))
        kube = ("--kubeconfig", str(node.admin_kubeconfig), "-n", NS)
        token = cli("cluster", "token", NORTH, *kube).stdout.strip()

        node.kubectl("create", "namespace", NORTH_NS)
        node.kubectl("label", "namespace", NORTH_NS, f"{PSS_ENFORCE}=restricted")
        envoy_repo, envoy_tag = images["envoy"].ref.rsplit(":", 1)
        atlasd_repo, atlasd_tag = images["atlasd"].ref.rsplit(":", 1)
        node_helm(
            "install", NORTH, str(ENVOY_CHART), "-n", NORTH_NS, "-f", str(values_file),
            "--set", f"image.repository={envoy_repo}", "--set", f"image.tag={envoy_tag}",
            "--set", f"agent.image.repository={atlasd_repo}",
            "--set", f"agent.image.tag={atlasd_tag}",
            "--set", f"agent.token={token}",
            # No load balancer controller here: the address routed by kube-proxy instead.
            "--set", "service.type=ClusterIP", "--set", f"service.externalIPs={{{NORTH_IP}}}",
            "--wait", "--timeout", "180s",
        )  # fmt: skip
        [pod] = [p for p in _pods(node, NORTH_NS, app="envoy", release=NORTH) if _ready(p)]
        [init] = pod["status"]["initContainerStatuses"]
        assert init["state"]["terminated"]["exitCode"] == 0
        statuses = {c["name"]: c for c in pod["status"]["containerStatuses"]}
        assert set(statuses) == {"envoy", "agent"}
        assert all(c["ready"] and c["restartCount"] == 0 for c in statuses.values()), statuses
        enrolled_log = node.kubectl("logs", "-n", NORTH_NS, pod["metadata"]["name"], "-c",
                                    "agent-init")  # fmt: skip
        assert "enrolled" in enrolled_log and token not in enrolled_log

        prom_url = (
            f"http://{_cluster_ip(node, 'atlas-envoy')}:10904/prom/{NORTH}/api/v1/status/buildinfo"
        )

        def routed() -> httpx2.Response | None:
            r = httpx2.get(prom_url, timeout=5)
            return r if r.status_code == 200 else None

        r = wait_until(routed, timeout=120, what=f"/prom/{NORTH}/ through both Envoys",
                       interval=0.5)  # fmt: skip
        assert r.json()["status"] == "success"

        # The key stays home: in the agent's Secret of north's namespace, nowhere in
        # atlasd's.
        state = json.loads(node.kubectl("get", "secret", f"{NORTH}-envoy-agent-state", "-n",
                                        NORTH_NS, "-o", "json"))["data"]  # fmt: skip
        key = base64.b64decode(state["client-key.pem"])
        key_body = b"".join(key.splitlines()[1:-1])
        stored = node.kubectl("get", "secrets,configmaps,events", "-n", NS, "-o", "json")
        assert key_body.decode() not in stored.replace("\\n", "")
        assert state["client-key.pem"] not in stored

        # The pod replaced (rescheduled, rolled): no new token, the spent one still in the
        # values; the replacement restores from the agent's Secret and renews.
        node.kubectl("delete", "pod", "-n", NORTH_NS, pod["metadata"]["name"], "--wait=false")

        def replaced() -> Doc | None:
            pods = [p for p in _pods(node, NORTH_NS, app="envoy", release=NORTH) if _ready(p)]
            new = [p for p in pods if p["metadata"]["uid"] != pod["metadata"]["uid"]]
            return new[0] if new else None

        new_pod = wait_until(replaced, timeout=180, what="the replacement pod Ready")
        restored_log = node.kubectl("logs", "-n", NORTH_NS, new_pod["metadata"]["name"], "-c",
                                    "agent-init")  # fmt: skip
        assert "restored" in restored_log, restored_log
        wait_until(routed, timeout=120, what=f"/prom/{NORTH}/ after the pod was replaced",
                   interval=0.5)  # fmt: skip

        # A second replica: the token long spent, it restores too (and renews to keys of
        # its own), and both pods serve.
        node_helm("upgrade", NORTH, str(ENVOY_CHART), "-n", NORTH_NS, "--reuse-values",
                  "--set", "replicaCount=2")  # fmt: skip
        pods = wait_until(
            lambda: (
                len(ready := [p for p in _pods(node, NORTH_NS, app="envoy", release=NORTH)
                              if _ready(p)]) == 2 and ready
            ),
            timeout=180,
            what="two Ready replicas",
        )  # fmt: skip
        for p in pods:
            log = node.kubectl("logs", "-n", NORTH_NS, p["metadata"]["name"], "-c",
                               "agent-init")  # fmt: skip
            assert "restored" in log, log

        # Revoked with a new token: the upgrade with it rolls the pods (the token's id in
        # the pod template), whose agents enroll with it rather than restore the revoked
        # credentials; the chain answers with the new ones.
        fresh = cli("cluster", "revoke", NORTH, "--rekey", *kube).stdout.strip()
        node_helm(
            "upgrade", NORTH, str(ENVOY_CHART), "-n", NORTH_NS, "--reuse-values",
            "--set", f"agent.token={fresh}", "--wait", "--timeout", "180s",
        )  # fmt: skip
        old_uids = {p["metadata"]["uid"] for p in pods}

        def rolled() -> list[Doc] | None:
            now = [p for p in _pods(node, NORTH_NS, app="envoy", release=NORTH)]
            ok = all(_ready(p) and p["metadata"]["uid"] not in old_uids for p in now)
            return now if ok and len(now) == 2 else None

        rolled_pods = wait_until(rolled, timeout=180, what="both replicas rolled by the new token")
        logs = [node.kubectl("logs", "-n", NORTH_NS, p["metadata"]["name"], "-c", "agent-init")
                for p in rolled_pods]  # fmt: skip
        assert any(f"cluster {NORTH} enrolled;" in log for log in logs), logs
        assert not any(fresh in log or token in log for log in logs)
        saved = json.loads(node.kubectl("get", "secret", f"{NORTH}-envoy-agent-state", "-n",
                                        NORTH_NS, "-o", "json"))["data"]  # fmt: skip
        assert base64.b64decode(saved["token-id"]).decode() == fresh.split(".")[0]
        wait_until(routed, timeout=120, what=f"/prom/{NORTH}/ after the new enrollment",
                   interval=0.5)  # fmt: skip
    finally:
        prom.stop()
    # Gone again, so the uninstall below leaves what it documents.
    node_helm("uninstall", NORTH, "-n", NORTH_NS, "--wait", "--timeout", "120s")
    node.kubectl("delete", "namespace", NORTH_NS, "--wait=false")  # with the agent's Secret
    node.kubectl("delete", "service", NORTH, "-n", NS)
    wait_until(lambda: _maybe(node, "secret", f"{NORTH}-envoy-values") is None, timeout=60,
               what=f"{NORTH}'s values removed")  # fmt: skip


def test_upgrade_rolls_the_pod_keeping_state_and_uninstall_leaves_the_documented_objects(
    node: Node, release: list[str], node_helm: Helm
) -> None:
    before_pod = wait_until(lambda: _atlasd_pods(node), timeout=30, what="the atlasd pod")[0]
    kept = (
        "atlas-ca",
        "atlas-server",
        "atlas-client",
        "atlas-tls",
        "atlasd-ads",
        # The chart's generated forwarder token survives the upgrade (Helm lookup), so
        # the observability Envoy's values (which carry it) stay as they are.
        f"{RELEASE}-forwarder-token",
        "atlas-envoy-values",
        "east-atlas-identity",
        "east-envoy-values",
    )
    before = {name: _get(node, "secret", name) for name in kept}

    node_helm(
        "upgrade", RELEASE, str(ATLASD_CHART), "-n", NS, *_sets(release),
        "--set", "atlas.logLevel=debug", "--wait", "--timeout", "180s",
    )  # fmt: skip

    def rolled() -> Doc | None:
        pods = [p for p in _atlasd_pods(node) if _ready(p)]
        new = [p for p in pods if p["metadata"]["uid"] != before_pod["metadata"]["uid"]]
        return new[0] if len(pods) == 1 and new else None

    new_pod = wait_until(rolled, timeout=120, what="the upgraded pod Ready, the old one gone")
    env = {e["name"]: e.get("value") for e in new_pod["spec"]["containers"][0]["env"]}
    assert env["ATLAS_LOG_LEVEL"] == "debug"
    # The new pod leads and has reconciled since (a cluster added after the roll is
    # onboarded), yet nothing was re-issued and no values were rewritten.
    wait_until(
        lambda: (
            _get(node, "lease", "atlasd")["spec"].get("holderIdentity")
            == new_pod["metadata"]["name"]
        ),
        timeout=60,
        what="the new pod holding the Lease",
    )
    node.kubectl(
        "apply", "-f", "-", input=_cluster_service("west", ip="10.244.0.251", annotations={})
    )
    wait_until(
        lambda: _maybe(node, "secret", "west-envoy-values"),
        timeout=60,
        what="west onboarded by the upgraded pod",
    )
    after = {name: _get(node, "secret", name) for name in kept}
    for name in kept:
        assert _digest(after[name]) == _digest(before[name]), f"{name} was re-issued"

    node_helm("uninstall", RELEASE, "-n", NS, "--wait", "--timeout", "120s")
    node_helm("uninstall", "atlas", "-n", NS, "--wait", "--timeout", "120s")
    # Left, and only that, as docs/charts.md says: what atlasd wrote (the PKI, the
    # values, the sidecar Services, the zone and endpoint ConfigMaps, the Lease), the cluster Services
    # the user made, and what the cluster itself puts in every namespace.
    clusters = ("east", "broken", "west")
    onboarded = ("east", "west")
    documented = {
        *(("Service", c) for c in clusters),
        *(("Service", f"{c}-thanos-sidecar0") for c in onboarded),
        *(("Secret", f"{c}-envoy-values") for c in onboarded),
        *(("Secret", f"{c}-atlas-identity") for c in onboarded),
        *(
            ("Secret", s)
            for s in ("atlas-ca", "atlas-server", "atlas-client", "atlas-tls", "atlasd-ads")
        ),
        ("Secret", "atlas-envoy-values"),
        ("ConfigMap", "atlas-coredns"),
        ("ConfigMap", "atlas-thanos-endpoints"),
        ("ConfigMap", "atlas-thanos-endpoints-groups"),
        ("Lease", "atlasd"),
        # The enrollment records of the cluster that enrolled (north, removed since):
        # its used token's (a hash, never the token) and the certificates it was signed.
        ("Secret", "atlas-join-<id>"),
        ("Secret", f"{NORTH}-atlas-enrolled"),
        # ...and the revocation records (north was revoked with --rekey).
        ("Secret", "atlas-revocations"),
        ("ConfigMap", "kube-root-ca.crt"),
        ("ServiceAccount", "default"),
    }
    kinds = "svc,secret,cm,sa,deploy,rs,pod,role,rolebinding,networkpolicy,pdb,lease"

    def left() -> set[tuple[str, str]]:
        items = json.loads(node.kubectl("get", kinds, "-n", NS, "-o", "json"))["items"]
        names = {(i["kind"], i["metadata"]["name"]) for i in items}
        return {(k, "atlas-join-<id>" if n.startswith("atlas-join-") else n) for k, n in names}

    try:
        wait_until(lambda: left() == documented, timeout=90, what="only what the docs say left")
    except AssertionError:
        got = left()
        raise AssertionError(
            f"left but not documented: {sorted(got - documented)}; "
            f"documented but gone: {sorted(documented - got)}"
        ) from None
