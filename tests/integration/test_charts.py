"""The Helm charts (charts/atlasd, charts/envoy) rendered by the real helm v3 and
checked against the real kube-apiserver of the harness.

What a user would see: `helm lint` passes; `helm template` with default and with
non-default values yields the objects the docs promise (one atlasd pod with CoreDNS
beside it sharing the zone, the Services, least-privilege RBAC, hardened containers);
the API server accepts every rendered manifest (server-side dry-run); the Role grants
exactly what atlasd calls; and the Envoy chart, fed the values atlasd writes into
`<cluster>-envoy-values`, mounts exactly the bootstrap and certificates given — a
bootstrap the real Envoy binary accepts.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import shlex
import shutil
import subprocess
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import click
import httpx2
import pytest
import yaml

from atlasd import labels
from atlasd.cli import cli
from atlasd.cli.run import run
from atlasd.kube.resources import REQUIRED_PERMISSIONS
from atlasd.kube.secrets import secret_data
from atlasd.model import (
    ADS_SERVER_NAME,
    DownstreamCluster,
    LocalAlertmanager,
    ServicePort,
    Settings,
)
from atlasd.reconcile import values_formats
from atlasd.reconcile.desired import VALUES_KEY, desired_state
from atlasd.reconcile.pki import RandomKeys, plan_pki
from tests.harness import certs
from tests.harness.envoy import envoy_binary
from tests.harness.kube import ApiServer
from tests.harness.net import free_port
from tests.harness.procs import Proc
from tests.harness.wait import wait_until

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
ATLASD_CHART = ROOT / "charts" / "atlasd"
ENVOY_CHART = ROOT / "charts" / "envoy"

Helm = Callable[..., str]
Doc = dict[str, Any]

# What atlasd calls in its namespace, as (apiGroup, resource, verb): declared by the
# daemon's kube layer (and proven sufficient there); the chart's Role must equal it.
ATLASD_PERMISSIONS = REQUIRED_PERMISSIONS

ATLASD_ENV = (
    "NAMESPACE",
    "ATLAS_ENVOY_ADS_ADDRESS",
    "ATLAS_ENVOY_ADS_PORT",
    "ATLAS_ENVOY_ADDRESS",
    "ATLAS_DNS_CM_NAME",
    "ATLAS_ALERTMANAGER_SELECTOR",
)


# ---------------------------------------------------------------- helpers


def render(
    helm: Helm,
    chart: Path,
    *,
    release: str = "atlas",
    namespace: str = "monitoring",
    values: Iterable[Path] = (),
    sets: Iterable[str] = (),
) -> list[Doc]:
    args = ["template", release, str(chart), "--namespace", namespace]
    for v in values:
        args += ["-f", str(v)]
    for s in sets:
        args += ["--set", s]
    return [d for d in yaml.safe_load_all(helm(*args)) if d]


def only(docs: list[Doc], kind: str, name: str | None = None) -> Doc:
    found = of_kind(docs, kind, name)
    assert len(found) == 1, f"expected one {kind} {name or ''}, got {len(found)}"
    return found[0]


def of_kind(docs: list[Doc], kind: str, name: str | None = None) -> list[Doc]:
    return [
        d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]


def container(deploy: Doc, name: str) -> Doc:
    for c in deploy["spec"]["template"]["spec"]["containers"]:
        if c["name"] == name:
            return dict(c)
    raise AssertionError(f"no container {name}")


def env_of(c: Doc) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c.get("env", [])}


def write_values(tmp_path: Path, name: str, values: Doc) -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    return path


def secret_files(secret: Doc) -> dict[str, str]:
    out = {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}
    out.update(secret.get("stringData") or {})
    return out


def role_permissions(role: Doc) -> set[tuple[str, str, str]]:
    perms: set[tuple[str, str, str]] = set()
    for rule in role["rules"]:
        assert not rule.get("resourceNames"), rule
        assert not rule.get("nonResourceURLs"), rule
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                for verb in rule["verbs"]:
                    perms.add((group, resource, verb))
    return perms


def server_dry_run(apiserver: ApiServer, namespace: str, docs: list[Doc]) -> str:
    manifest = "---\n".join(yaml.safe_dump(d) for d in docs)
    return apiserver.kubectl(
        "apply",
        "--server-side",
        "--dry-run=server",
        "--field-manager=helm-chart-test",
        "-n",
        namespace,
        "-f",
        "-",
        input=manifest,
    )


# Non-default values exercising every knob a user is likely to turn.
ATLASD_CUSTOM: Doc = {
    "replicaCount": 3,
    "fullnameOverride": "obs-atlasd",
    "image": {
        "repository": "registry.example/atlasd",
        "tag": "9.9.9",
        "pullPolicy": "Always",
        "pullSecret": "regcred",
    },
    "serviceAccount": {"name": "atlasd-sa", "annotations": {"example.com/owner": "sre"}},
    "metrics": {"enabled": True, "port": 7309, "service": {"annotations": {"a": "b"}}},
    "atlas": {
        "alertmanagerSelector": "app.kubernetes.io/name=alertmanager",
        "dnsConfigMapName": "my-zone",
        "thanosEndpointsConfigMapName": "my-endpoints",
        "thanosQueryUrl": "http://thanos-query.monitoring:10902",
        "clusterDomain": "corp.local",
        "logFormat": "text",
        "extraEnv": [{"name": "ATLAS_EXTRA", "value": "1"}],
    },
    "enrollment": {"enabled": False, "address": "enroll.obs.example:443"},
    "controller": {
        "ports": {"grpc": 7305},
        "envoy": {"host": "envoy.obs.example", "adsAddress": "xds.obs.example", "adsPort": 443},
    },
    "leaderElection": {"leaseName": "obs-leader", "legacyLocks": ""},
    "zone": {"mountPath": "/var/run/zone", "fileName": "atlas.db"},
    "coredns": {
        "port": 1053,
        "corefile": "atlas.:{$DNS_PORT} {\n    file {$ZONE_FILE} atlas.\n}\n",
        "service": {"clusterIP": "10.0.0.53", "port": 53},
    },
    "podAnnotations": {"example.com/scrape": "true"},
    "podDisruptionBudget": {"minAvailable": 1},
    "tolerations": [{"key": "dedicated", "operator": "Exists", "effect": "NoSchedule"}],
    "nodeSelector": {"kubernetes.io/os": "linux"},
    "resources": {"requests": {"cpu": "50m", "memory": "64Mi"}},
}


# ---------------------------------------------------------------- lint


@pytest.mark.parametrize("chart", [ATLASD_CHART, ENVOY_CHART], ids=["atlasd", "envoy"])
def test_helm_lint_default_and_custom_values(helm: Helm, chart: Path, tmp_path: Path) -> None:
    helm("lint", "--strict", str(chart))
    custom = ATLASD_CUSTOM if chart == ATLASD_CHART else _envoy_custom_values()
    values = write_values(tmp_path, "custom.yaml", custom)
    out = helm("lint", "--strict", str(chart), "-f", str(values))
    assert "0 chart(s) failed" in out


@pytest.mark.parametrize(
    ("chart", "bad", "where"),
    [
        (ENVOY_CHART, "atlas.alertmanagerCount=two", "/atlas/alertmanagerCount"),
        (ENVOY_CHART, "files.envoy\\.yaml.node=x", "/files/envoy.yaml"),
        (ENVOY_CHART, "ports.thanos.containerPort=70000", "/ports/thanos/containerPort"),
        (ENVOY_CHART, "probes.port=0", "/probes/port"),
        (ENVOY_CHART, "probes.readiness.periodSeconds=often", "/probes/readiness/periodSeconds"),
        (ENVOY_CHART, "networkPolicy.from=anyone", "/networkPolicy/from"),
        (ENVOY_CHART, "podSecurityContext.runAsUser=-1", "/podSecurityContext/runAsUser"),
        (ATLASD_CHART, "coredns.port=53", "/coredns/port"),
        (ATLASD_CHART, "atlas.logLevel=verbose", "/atlas/logLevel"),
        (ATLASD_CHART, "atlas.logFormat=yaml", "/atlas/logFormat"),
        (ATLASD_CHART, "controller.envoy.adsPort=0", "/controller/envoy/adsPort"),
        (ATLASD_CHART, "enrollment.address=enroll.example", "/enrollment/address"),
        (ATLASD_CHART, "enrollment.certDir=certs", "/enrollment/certDir"),
        (ATLASD_CHART, "enrollment.clusterDefault=yes", "/enrollment/clusterDefault"),
    ],
)
def test_values_schema_rejects_wrong_values(helm: Helm, chart: Path, bad: str, where: str) -> None:
    with pytest.raises(RuntimeError, match="schema") as err:
        render(helm, chart, sets=[bad])
    assert where in str(err.value)


# ---------------------------------------------------------------- atlasd chart


def test_atlasd_default_render(helm: Helm) -> None:
    docs = render(helm, ATLASD_CHART, release="atlas", namespace="monitoring")
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == [
        "ConfigMap",  # the Corefile
        "ConfigMap",  # the Grafana dashboard (test_charts_operator.py)
        "Deployment",
        "NetworkPolicy",
        "Role",
        "RoleBinding",
        "Secret",  # the forwarder token the chart generates
        "Service",
        "Service",
        "Service",
        "Service",  # enrollment (docs/security.md, "Enrollment")
        "Service",  # ADS, headless (docs/operations.md, "Several replicas")
        "ServiceAccount",
    ]
    assert not of_kind(docs, "ClusterRole") and not of_kind(docs, "ClusterRoleBinding")
    enroll = only(docs, "Service", "atlas-atlasd-enroll")["spec"]
    assert enroll["ports"] == [
        {"name": "enroll", "port": 6307, "targetPort": "enroll", "protocol": "TCP"}
    ]

    # Only the observability Envoy pods may reach the ADS port (defence in depth).
    policy = only(docs, "NetworkPolicy")["spec"]
    ads_rule = next(r for r in policy["ingress"] if "from" in r)
    assert ads_rule["ports"] == [{"port": 6305, "protocol": "TCP"}]
    assert ads_rule["from"] == [
        {"podSelector": {"matchLabels": {"app": "envoy", "release": "atlas"}}}
    ]
    assert all(p["port"] != 6305 for r in policy["ingress"] if "from" not in r for p in r["ports"])

    deploy = only(docs, "Deployment")
    pod = deploy["spec"]["template"]["spec"]
    assert deploy["spec"]["replicas"] == 1
    assert [c["name"] for c in pod["containers"]] == ["atlasd", "coredns"]
    sa = only(docs, "ServiceAccount")
    assert pod["serviceAccountName"] == sa["metadata"]["name"]

    atlasd = container(deploy, "atlasd")
    assert atlasd["command"] == ["atlasd"] and atlasd["args"] == ["run"]
    env = env_of(atlasd)
    for name in ATLASD_ENV:
        assert name in env, name
    assert env["NAMESPACE"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    assert env["ATLAS_ENVOY_ADS_PORT"] == "10900"
    assert env["ATLAS_ENVOY_ADS_ADDRESS"] == env["ATLAS_ENVOY_ADDRESS"] == "envoy.atlas.local"
    assert env["ATLAS_DNS_CM_NAME"] == "atlas-coredns"
    assert env["ATLAS_ALERTMANAGER_SELECTOR"] == "app=kube-prometheus-stack-alertmanager"
    assert env["ATLAS_ZONE_FILE"] == "/zone/atlas.zone"
    ports = {p["name"]: p["containerPort"] for p in atlasd["ports"]}
    assert ports == {"ads": 6305, "metrics": 6309, "enroll": 6307}
    assert env["ATLAS_ENROLL_LISTEN"] == "0.0.0.0:6307"
    assert env["ATLAS_ENROLL_CERT_SECONDS"] == "86400"
    # New installations enroll unannotated clusters (those with stored keys stay).
    assert env["ATLAS_ENROLLMENT_DEFAULT"] == "true"
    assert env["ATLAS_ENROLL_ADDRESS"] == ""
    assert env["ATLAS_ENROLL_CERT_DIR"] == "/etc/atlas/certs"
    # The enrollment port is open to any source (agents come from other clusters).
    open_ports = {p["port"] for r in policy["ingress"] if "from" not in r for p in r["ports"]}
    assert 6307 in open_ports
    assert atlasd["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert atlasd["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}

    # The zone: an emptyDir atlasd writes and CoreDNS reads (read-only) as /zone/atlas.zone.
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes["zone"]
    mounts = {m["name"]: m for m in atlasd["volumeMounts"]}
    assert mounts["zone"]["mountPath"] == "/zone" and not mounts["zone"].get("readOnly")
    coredns = container(deploy, "coredns")
    cmounts = {m["name"]: m for m in coredns["volumeMounts"]}
    assert cmounts["zone"] == {"name": "zone", "mountPath": "/zone", "readOnly": True}
    assert env_of(coredns)["ZONE_FILE"] == "/zone/atlas.zone"
    corefile_cm = only(docs, "ConfigMap", "atlas-atlasd-corefile")
    assert volumes["corefile"]["configMap"]["name"] == corefile_cm["metadata"]["name"]
    assert coredns["args"][:2] == ["-conf", f"{cmounts['corefile']['mountPath']}/Corefile"]
    assert "Corefile" in corefile_cm["data"] and corefile_cm["data"]["Corefile"].strip()

    _assert_hardened(pod)
    _assert_sized(pod)

    services = {s["metadata"]["name"]: s for s in of_kind(docs, "Service")}
    ads, dns = services["atlas-atlasd"], services["atlas-atlasd-dns"]
    metrics = services["atlas-atlasd-metrics"]
    assert [(p["port"], p["protocol"], p["targetPort"]) for p in ads["spec"]["ports"]] == [
        (6305, "TCP", "ads")
    ]
    assert sorted((p["port"], p["protocol"]) for p in dns["spec"]["ports"]) == [
        (53, "TCP"),
        (53, "UDP"),
    ]
    assert "clusterIP" not in dns["spec"]
    assert [(p["port"], p["targetPort"]) for p in metrics["spec"]["ports"]] == [(6309, "metrics")]
    # Every Service port targets a port the pod really declares.
    pod_ports = {p["name"]: p for c in pod["containers"] for p in c["ports"]}
    pod_labels = deploy["spec"]["template"]["metadata"]["labels"]
    for svc in services.values():
        assert svc["spec"]["selector"].items() <= pod_labels.items()
        for p in svc["spec"]["ports"]:
            assert pod_ports[p["targetPort"]]["protocol"] == p["protocol"]
    # The observability Envoy's xDS upstream is the headless ADS Service's DNS name: one
    # address per Ready replica, so forwarded streams spread and fail over between them.
    assert env["ATLAS_ADS_SERVICE"] == "atlas-atlasd-ads.monitoring.svc.cluster.local"
    headless = services["atlas-atlasd-ads"]["spec"]
    assert headless["clusterIP"] == "None" and "type" not in headless
    assert headless["selector"] == ads["spec"]["selector"]
    assert headless["ports"] == ads["spec"]["ports"]

    # Secure by default: a forwarder token, generated by the chart, reaches atlasd.
    token = only(docs, "Secret", "atlas-atlasd-forwarder-token")
    size = len(base64.b64decode(token["data"]["token"]))  # a local: never print the token
    assert size == 48
    assert volumes["forwarder-token"]["secret"]["secretName"] == "atlas-atlasd-forwarder-token"
    mount = mounts["forwarder-token"]
    assert mount["readOnly"] is True
    assert env["ATLAS_FORWARDER_TOKEN_FILE"] == f"{mount['mountPath']}/token"


def test_atlasd_forwarder_token_of_ones_own(helm: Helm) -> None:
    docs = render(helm, ATLASD_CHART, sets=["atlas.forwarderTokenSecret=my-token"])
    assert not of_kind(docs, "Secret"), "no generated token when one is named"
    pod = only(docs, "Deployment")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["forwarder-token"]["secret"]["secretName"] == "my-token"


def _assert_hardened(pod: Doc) -> None:
    psc = pod["securityContext"]
    assert psc["runAsNonRoot"] is True
    assert psc["seccompProfile"] == {"type": "RuntimeDefault"}
    for c in pod["containers"]:
        sc = c["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True, c["name"]
        assert sc["allowPrivilegeEscalation"] is False, c["name"]
        assert sc["capabilities"] == {"drop": ["ALL"]}, c["name"]
        assert sc["seccompProfile"] == {"type": "RuntimeDefault"}, c["name"]
        for p in c.get("ports", []):
            # Without capabilities a non-root process cannot bind below 1024.
            assert p["containerPort"] >= 1024, (c["name"], p)


def _assert_sized(pod: Doc) -> None:
    """Every container requests CPU and memory and has a memory limit (policy suites check
    all three); none has a CPU limit (throttling would stretch latencies; docs/charts.md,
    "Resources")."""
    for c in pod["containers"]:
        res = c["resources"]
        assert set(res["requests"]) == {"cpu", "memory"}, c["name"]
        assert set(res["limits"]) == {"memory"}, c["name"]
        assert _mib(res["limits"]["memory"]) > _mib(res["requests"]["memory"]), c["name"]


def _mib(quantity: str) -> float:
    units = {"Mi": 1.0, "Gi": 1024.0}
    return float(quantity[:-2]) * units[quantity[-2:]]


def test_atlasd_custom_values_render(helm: Helm, tmp_path: Path) -> None:
    values = write_values(tmp_path, "custom.yaml", ATLASD_CUSTOM)
    docs = render(helm, ATLASD_CHART, release="obs", namespace="observability", values=[values])
    deploy = only(docs, "Deployment", "obs-atlasd")
    pod = deploy["spec"]["template"]["spec"]
    assert deploy["spec"]["replicas"] == 3
    assert pod["serviceAccountName"] == "atlasd-sa"
    assert only(docs, "ServiceAccount", "atlasd-sa")["metadata"]["annotations"] == {
        "example.com/owner": "sre"
    }
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert pod["tolerations"] == ATLASD_CUSTOM["tolerations"]
    assert pod["nodeSelector"] == {"kubernetes.io/os": "linux"}
    assert deploy["spec"]["template"]["metadata"]["annotations"]["example.com/scrape"] == "true"
    atlasd = container(deploy, "atlasd")
    assert atlasd["image"] == "registry.example/atlasd:9.9.9"
    assert atlasd["imagePullPolicy"] == "Always"
    # Helm merges the user's requests into the chart's defaults: the limit stays.
    assert atlasd["resources"] == {
        "requests": {"cpu": "50m", "memory": "64Mi"},
        "limits": {"memory": "1Gi"},
    }
    env = env_of(atlasd)
    assert env["ATLAS_ENVOY_ADS_ADDRESS"] == "xds.obs.example"
    assert env["ATLAS_ENVOY_ADS_PORT"] == "443"
    assert env["ATLAS_ENVOY_ADDRESS"] == "envoy.obs.example"
    assert env["ATLAS_DNS_CM_NAME"] == "my-zone"
    assert env["ATLAS_ENDPOINTS_CM_NAME"] == "my-endpoints"
    assert env["ATLAS_THANOS_QUERY_URL"] == "http://thanos-query.monitoring:10902"
    assert env["ATLAS_ALERTMANAGER_SELECTOR"] == "app.kubernetes.io/name=alertmanager"
    assert env["ATLAS_ZONE_FILE"] == "/var/run/zone/atlas.db"
    assert env["ATLAS_ADS_SERVICE"] == "obs-atlasd-ads.observability.svc.corp.local"
    assert env["ATLAS_LEASE_NAME"] == "obs-leader"
    assert env["ATLAS_EXTRA"] == "1"
    assert "ATLAS_ENROLL_LISTEN" not in env  # enrollment.enabled=false: no endpoint
    assert env["ATLAS_ENROLLMENT_DEFAULT"] == "false"  # ... so no cluster enrolls by default
    assert env["ATLAS_ENROLL_ADDRESS"] == "enroll.obs.example:443"
    assert {p["name"]: p["containerPort"] for p in atlasd["ports"]} == {
        "ads": 7305,
        "metrics": 7309,
    }
    coredns = container(deploy, "coredns")
    assert env_of(coredns)["DNS_PORT"] == "1053"
    assert {p["protocol"]: p["containerPort"] for p in coredns["ports"]} == {
        "UDP": 1053,
        "TCP": 1053,
    }
    corefile = only(docs, "ConfigMap", "obs-atlasd-corefile")["data"]["Corefile"]
    assert corefile == ATLASD_CUSTOM["coredns"]["corefile"]
    dns = only(docs, "Service", "obs-atlasd-dns")
    assert dns["spec"]["clusterIP"] == "10.0.0.53"
    assert only(docs, "Service", "obs-atlasd")["spec"]["ports"][0]["port"] == 7305
    assert only(docs, "Service", "obs-atlasd-metrics")["metadata"]["annotations"] == {"a": "b"}
    pdb = only(docs, "PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"] == deploy["spec"]["selector"]["matchLabels"]
    binding = only(docs, "RoleBinding")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "atlasd-sa", "namespace": "observability"}
    ]
    assert binding["roleRef"]["name"] == only(docs, "Role")["metadata"]["name"]
    _assert_hardened(pod)


def test_atlasd_chart_uses_files_corefile_when_present(helm: Helm, tmp_path: Path) -> None:
    """files/Corefile (the DNS module's) is what CoreDNS gets; coredns.corefile overrides it."""
    chart = tmp_path / "atlasd"
    shutil.copytree(ATLASD_CHART, chart)
    corefile = "atlas.:{$DNS_PORT} {\n    file {$ZONE_FILE} atlas. {\n        reload 1s\n    }\n}\n"
    (chart / "files").mkdir(exist_ok=True)
    (chart / "files" / "Corefile").write_text(corefile)
    docs = render(helm, chart)
    assert only(docs, "ConfigMap", "atlas-atlasd-corefile")["data"]["Corefile"] == corefile
    annotations = only(docs, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    docs = render(helm, chart, sets=["coredns.corefile=. {}"])
    assert only(docs, "ConfigMap", "atlas-atlasd-corefile")["data"]["Corefile"] == ". {}\n"
    again = only(docs, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert again["checksum/corefile"] != annotations["checksum/corefile"], "a new Corefile rolls"
    # Without either, the chart refuses to render rather than run CoreDNS unconfigured.
    (chart / "files" / "Corefile").unlink()
    with pytest.raises(RuntimeError, match="files/Corefile is missing"):
        render(helm, chart)


def test_atlasd_optional_parts_can_be_turned_off(helm: Helm) -> None:
    docs = render(
        helm,
        ATLASD_CHART,
        sets=[
            "rbac.create=false",
            "serviceAccount.create=false",
            "serviceAccount.name=existing",
            "metrics.enabled=false",
            "coredns.enabled=false",
            "networkPolicy.enabled=false",
            "grafanaDashboard.enabled=false",
            "enrollment.enabled=false",
            "ads.headless=false",
        ],
    )
    assert sorted(d["kind"] for d in docs) == ["Deployment", "Secret", "Service"]
    deploy = only(docs, "Deployment")
    # Without the headless Service, the observability Envoy dials the ClusterIP one.
    env = env_of(deploy["spec"]["template"]["spec"]["containers"][0])
    assert env["ATLAS_ADS_SERVICE"] == "atlas-atlasd.monitoring.svc.cluster.local"
    assert [c["name"] for c in deploy["spec"]["template"]["spec"]["containers"]] == ["atlasd"]
    assert deploy["spec"]["template"]["spec"]["serviceAccountName"] == "existing"


def test_atlasd_role_grants_exactly_what_atlasd_calls(helm: Helm) -> None:
    for sets in ([], ["fullnameOverride=x", "replicaCount=2"]):
        docs = render(helm, ATLASD_CHART, sets=sets)
        role = only(docs, "Role")
        text = yaml.safe_dump(role)
        assert "*" not in text, "no wildcard in the Role"
        perms = role_permissions(role)
        assert perms - ATLASD_PERMISSIONS == set(), "granted but never used"
        assert ATLASD_PERMISSIONS - perms == set(), "used but not granted"


@pytest.mark.parametrize("custom", [False, True], ids=["default", "custom"])
def test_atlasd_manifests_pass_server_side_dry_run(
    helm: Helm, apiserver: ApiServer, namespace: str, custom: bool, tmp_path: Path
) -> None:
    values = [write_values(tmp_path, "custom.yaml", ATLASD_CUSTOM)] if custom else []
    docs = render(helm, ATLASD_CHART, namespace=namespace, values=values)
    out = server_dry_run(apiserver, namespace, docs)
    assert out.count("serverside-applied (server dry run)") == len(docs), out
    # A dry run persists nothing.
    assert (
        apiserver.kubectl("get", "deployments,roles,services", "-n", namespace, "-o", "name") == ""
    )


# ---------------------------------------------------------------- envoy chart


def _envoy_custom_values() -> Doc:
    return {
        "replicaCount": 2,
        "image": {"tag": "v1.40.1"},
        "extraArgs": ["--disable-hot-restart"],
        "service": {
            "type": "LoadBalancer",
            "externalIPs": ["192.0.2.10"],
            "annotations": {"example.com/lb": "internal"},
            "externalTrafficPolicy": "Local",
        },
        "ports": {"thanos": {"containerPort": 11901, "hostPort": 11901, "protocol": "TCP"}},
        "atlas": {"alertmanagerCount": 3},
        "podDisruptionBudget": {"maxUnavailable": 1},
        "readinessProbe": {"tcpSocket": {"port": "thanos"}},
        "tolerations": [{"key": "edge", "operator": "Exists"}],
    }


SETTINGS = Settings(
    namespace="monitoring",
    envoy_ads_address="198.51.100.7",
    envoy_ads_port=10900,
    atlasd_ads_host="atlasd.monitoring.svc.cluster.local",
)
EAST = DownstreamCluster(
    name="east",
    external_ip="203.0.113.1",
    ports=(ServicePort("thanos", 10901), ServicePort("prometheus", 9090)),
)
AMS = (
    LocalAlertmanager("am-0", "monitoring", 9093),
    LocalAlertmanager("am-1", "monitoring", 9093),
)


def _atlasd_values_secrets(*, alertmanagers: int = 2) -> dict[str, str]:
    """values.yaml of every values Secret atlasd's own pure functions (PKI plan +
    desired state) produce for one cluster "east": Secret name -> values text."""
    plan = plan_pki(
        secrets={},
        clusters=(EAST,),
        settings=SETTINGS,
        now=dt.datetime.now(dt.UTC),
        keys=RandomKeys(),
    )
    desired = desired_state(
        clusters=(EAST,), alertmanagers=AMS[:alertmanagers], plan=plan, settings=SETTINGS
    )
    out: dict[str, str] = {}
    for name in (labels.values_secret_name("east"), labels.OBS_VALUES_SECRET):
        out[name] = secret_data(desired.secrets[name])[VALUES_KEY].decode()
    return out


def _cluster_values_file(tmp_path: Path, *, alertmanagers: int = 2) -> tuple[Path, Doc]:
    """The values file a user gets from `atlasd cluster values east --format raw`."""
    text = _atlasd_values_secrets(alertmanagers=alertmanagers)[labels.values_secret_name("east")]
    path = tmp_path / "east-values.yaml"
    path.write_text(values_formats.raw(text))
    return path, yaml.safe_load(text)


def test_envoy_chart_lints_with_atlasd_values(helm: Helm, tmp_path: Path) -> None:
    values_file, _ = _cluster_values_file(tmp_path)
    obs = tmp_path / "atlas-values.yaml"
    obs.write_text(_atlasd_values_secrets()[labels.OBS_VALUES_SECRET])
    for path in (values_file, obs):
        assert "0 chart(s) failed" in helm("lint", "--strict", str(ENVOY_CHART), "-f", str(path))


def test_envoy_default_render(helm: Helm) -> None:
    docs = render(helm, ENVOY_CHART, release="atlas")
    assert sorted(d["kind"] for d in docs) == ["Deployment", "NetworkPolicy", "Secret", "Service"]
    deploy = only(docs, "Deployment")
    labels = deploy["spec"]["template"]["metadata"]["labels"]
    # atlasd's default envoy selector (goatlas.io/envoy-selectors) is app=envoy,release=atlas.
    assert labels["app"] == "envoy" and labels["release"] == "atlas"
    envoy = container(deploy, "envoy")
    assert envoy["image"] == "envoyproxy/envoy:v1.40.0"
    assert envoy["args"][:4] == ["-l", "info", "-c", "/config/envoy.yaml"]
    files = secret_files(only(docs, "Secret"))
    assert set(files) == {"envoy.yaml"}
    assert yaml.safe_load(files["envoy.yaml"])["admin"]
    _assert_envoy_pod_mounts(deploy, only(docs, "Secret"))
    pod = deploy["spec"]["template"]["spec"]
    _assert_hardened(pod)
    _assert_sized(pod)
    # A high uid/gid, not the image's "envoy" (101), which may be a real user on the node.
    assert pod["securityContext"]["runAsUser"] == pod["securityContext"]["runAsGroup"] == 65532
    assert pod["securityContext"]["fsGroup"] == 65532
    assert pod["automountServiceAccountToken"] is False

    # Probes on Envoy's readiness, through the probe listener merged over the bootstrap.
    overlay = _probe_overlay(envoy)
    [listener] = overlay["static_resources"]["listeners"]
    assert listener["address"]["socket_address"] == {"address": "0.0.0.0", "port_value": 9002}
    [admin_cluster] = overlay["static_resources"]["clusters"]
    endpoint = admin_cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    admin = yaml.safe_load(files["envoy.yaml"])["admin"]["address"]["socket_address"]
    assert endpoint["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 9000}
    assert admin == {"address": "127.0.0.1", "port_value": 9000}, "admin stays on the loopback"
    ports = {p["name"]: p["containerPort"] for p in envoy["ports"]}
    assert ports["probe"] == 9002
    for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert envoy[kind]["httpGet"] == {"path": "/ready", "port": "probe"}, kind
    assert envoy["startupProbe"]["failureThreshold"] * envoy["startupProbe"]["periodSeconds"] >= (
        60
    ), "the startup probe outlasts Envoy's initial fetch timeouts (15 s + 15 s)"

    # Ingress to the listeners only, from anywhere (the observability Envoy calls from
    # outside the cluster): not to admin, not to anything else.
    policy = only(docs, "NetworkPolicy")["spec"]
    assert policy["podSelector"]["matchLabels"] == {"app": "envoy", "release": "atlas"}
    assert policy["policyTypes"] == ["Ingress"]
    assert _policy_ports(policy) == {
        (11901, "TCP"): None,
        (11903, "TCP"): None,
        (11904, "TCP"): None,
    }


def _probe_overlay(envoy: Doc) -> Doc:
    """The bootstrap the chart merges over files.envoy.yaml (Envoy's --config-yaml)."""
    args = envoy["args"]
    overlay: Doc = yaml.safe_load(args[args.index("--config-yaml") + 1])
    return overlay


def _policy_ports(policy: Doc) -> dict[tuple[int, str], Any]:
    """(port, protocol) -> the peers allowed to reach it (None: any source)."""
    out: dict[tuple[int, str], Any] = {}
    for rule in policy["ingress"]:
        for p in rule["ports"]:
            key = (p["port"], p["protocol"])
            assert key not in out, f"{key} in two rules"
            out[key] = rule.get("from")
    return out


def _assert_envoy_pod_mounts(deploy: Doc, secret: Doc) -> None:
    pod = deploy["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    envoy = container(deploy, "envoy")
    mounts = {m["name"]: m for m in envoy["volumeMounts"]}
    assert volumes["config"]["secret"]["secretName"] == secret["metadata"]["name"]
    assert mounts["config"]["readOnly"] is True
    config_path = envoy["args"][envoy["args"].index("-c") + 1]
    mount = mounts["config"]["mountPath"].rstrip("/")
    assert config_path.startswith(mount + "/")
    assert config_path[len(mount) + 1 :] in secret_files(secret)


def test_envoy_renders_exactly_the_bootstrap_atlasd_wrote(helm: Helm, tmp_path: Path) -> None:
    values_file, values = _cluster_values_file(tmp_path, alertmanagers=2)
    docs = render(
        helm, ENVOY_CHART, release="atlas-envoy", namespace="monitoring", values=[values_file]
    )

    secret = only(docs, "Secret", "atlas-envoy")
    files = secret_files(secret)
    assert files == values["files"], "the mounted files are byte-for-byte the values' files"
    assert set(files) == {
        "envoy.yaml",
        "ca.pem",
        "server.pem",
        "server-key.pem",
        "client.pem",
        "client-key.pem",
    }
    bootstrap = yaml.safe_load(files["envoy.yaml"])
    assert bootstrap["node"]["id"] == "east"
    [xds] = bootstrap["static_resources"]["clusters"]
    endpoint = xds["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    assert endpoint["address"]["socket_address"] == {"address": "198.51.100.7", "port_value": 10900}
    deploy = only(docs, "Deployment")
    _assert_envoy_pod_mounts(deploy, secret)
    envoy = container(deploy, "envoy")
    # atlasd's arguments, then the probe listener merged over its bootstrap.
    assert envoy["args"][: len(values["args"])] == values["args"]
    assert envoy["args"][len(values["args"])] == "--config-yaml"
    # No host ports (Pod Security baseline refuses them): the Service exposes 11901/11904.
    container_ports = {p["name"]: (p["containerPort"], p.get("hostPort")) for p in envoy["ports"]}
    assert container_ports == {
        "probe": (9002, None),
        "admin": (9000, None),
        "thanos": (11901, None),
        "alertmanager": (11903, None),
        "prometheus": (11904, None),
    }
    svc = only(docs, "Service", "atlas-envoy")
    assert svc["spec"]["type"] == "LoadBalancer"
    # The plaintext alert relay is not behind the load balancer (alertmanager<i> reach it).
    assert sorted((p["name"], p["port"], p["targetPort"]) for p in svc["spec"]["ports"]) == [
        ("prometheus", 11904, "prometheus"),
        ("thanos", 11901, "thanos"),
    ]
    # A changed certificate or bootstrap rolls the pods.
    checksum = deploy["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
    values["files"]["ca.pem"] = certs.CA("other").cert_pem.decode()
    values_file.write_text(yaml.safe_dump(values))
    again = only(
        render(helm, ENVOY_CHART, release="atlas-envoy", values=[values_file]), "Deployment"
    )
    assert again["spec"]["template"]["metadata"]["annotations"]["checksum/config"] != checksum

    # atlas.alertmanagerCount: alertmanager<i> relay Services selecting this Envoy, and
    # the Prometheus additional-alertmanager config listing them.
    pod_labels = deploy["spec"]["template"]["metadata"]["labels"]
    relays = sorted(
        s["metadata"]["name"]
        for s in of_kind(docs, "Service")
        if s["metadata"]["name"].startswith("alertmanager")
    )
    assert relays == ["alertmanager0", "alertmanager1"]
    for name in relays:
        s = only(docs, "Service", name)
        assert s["spec"]["clusterIP"] == "None"
        assert s["spec"]["selector"].items() <= pod_labels.items()
        assert [(p["port"], p["targetPort"]) for p in s["spec"]["ports"]] == [(11903, 11903)]
    am = secret_files(only(docs, "Secret", "atlas-alertmanager-configs"))
    assert yaml.safe_load(am["config.yaml"]) == [
        {
            "static_configs": [
                {
                    "targets": [
                        "alertmanager0.monitoring.svc.cluster.local:11903",
                        "alertmanager1.monitoring.svc.cluster.local:11903",
                    ]
                }
            ]
        }
    ]


def test_envoy_observability_values_render(helm: Helm, tmp_path: Path) -> None:
    """atlas-envoy-values installed as release "atlas": node "atlas", xDS over mTLS to
    atlasd's ADS Service (atlasd's server pinned), pods matching atlasd's default envoy
    selector."""
    text = _atlasd_values_secrets()[labels.OBS_VALUES_SECRET]
    path = tmp_path / "atlas-values.yaml"
    path.write_text(text)
    docs = render(helm, ENVOY_CHART, release="atlas", namespace="monitoring", values=[path])
    files = secret_files(only(docs, "Secret", "atlas-envoy"))
    assert files == yaml.safe_load(text)["files"]
    bootstrap = yaml.safe_load(files["envoy.yaml"])
    assert bootstrap["node"]["id"] == "atlas"
    [xds] = bootstrap["static_resources"]["clusters"]
    tls = xds["transport_socket"]["typed_config"]
    assert tls["sni"] == ADS_SERVER_NAME
    assert tls["common_tls_context"]["validation_context"]["match_typed_subject_alt_names"] == [
        {"san_type": "DNS", "matcher": {"exact": ADS_SERVER_NAME}}
    ]
    endpoint = xds["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    assert endpoint["address"]["socket_address"] == {
        "address": "atlasd.monitoring.svc.cluster.local",
        "port_value": 6305,
    }
    pod_labels = only(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert dict(SETTINGS.default_envoy_selectors).items() <= pod_labels.items()
    svc = only(docs, "Service", "atlas-envoy")
    assert sorted(p["port"] for p in svc["spec"]["ports"]) == [10900, 10901, 10903, 10904]
    assert not [s for s in of_kind(docs, "Service") if s["metadata"]["name"].startswith("alertm")]
    # Its listeners, every one (xDS and alerts from the downstream Envoys outside the
    # cluster, Thanos and Prometheus from inside) and nothing else; admin stays closed.
    policy = only(docs, "NetworkPolicy")["spec"]
    assert _policy_ports(policy) == {(p, "TCP"): None for p in (10900, 10901, 10903, 10904)}


def test_envoy_binary_accepts_the_rendered_bootstrap(helm: Helm, tmp_path: Path) -> None:
    values_file, _ = _cluster_values_file(tmp_path, alertmanagers=0)
    obs = tmp_path / "atlas-values.yaml"
    obs.write_text(_atlasd_values_secrets()[labels.OBS_VALUES_SECRET])
    for extra in ([], [values_file], [obs]):
        docs = render(helm, ENVOY_CHART, values=extra)
        config = tmp_path / "envoy.yaml"
        config.write_text(secret_files(only(docs, "Secret"))["envoy.yaml"])
        # The container's own arguments: the bootstrap file and the probe listener merged
        # over it (--config-yaml).
        args = [str(config) if a == "/config/envoy.yaml" else a for a in _envoy_args(docs)]
        assert "--config-yaml" in args
        proc = subprocess.run(
            [envoy_binary(), "--mode", "validate", *args],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]


def _envoy_args(docs: list[Doc]) -> list[str]:
    args: list[str] = container(only(docs, "Deployment"), "envoy")["args"]
    return args


def test_envoy_probe_listener_answers_envoys_own_readiness_and_nothing_else(
    helm: Helm, tmp_path: Path
) -> None:
    """A real Envoy run with the chart's arguments: the kubelet's GET /ready on the probe
    port gets admin's answer (so it follows Envoy's state: 503 once admin says DRAINING);
    every other path or method of admin is out of reach through it."""
    admin, probe = free_port(), free_port()
    bootstrap = {
        "node": {"id": "probe-test", "cluster": "probe-test"},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
    }
    values = write_values(
        tmp_path,
        "probe.yaml",
        {
            "files": {"envoy.yaml": yaml.safe_dump(bootstrap)},
            "probes": {"port": probe, "address": "127.0.0.1"},
        },
    )
    docs = render(helm, ENVOY_CHART, values=[values])
    config = tmp_path / "envoy.yaml"
    config.write_text(secret_files(only(docs, "Secret"))["envoy.yaml"])
    args = [str(config) if a == "/config/envoy.yaml" else a for a in _envoy_args(docs)]
    envoy = Proc(
        "envoy-probe",
        [envoy_binary(), *args, "--use-dynamic-base-id"],
        log_dir=tmp_path,
    ).start()
    try:
        url = f"http://127.0.0.1:{probe}"

        def ready() -> httpx2.Response | None:
            envoy.check_running()
            r = httpx2.get(f"{url}/ready", timeout=2)
            return r if r.status_code == 200 else None

        r = wait_until(ready, timeout=60, what="the probe listener's /ready")
        assert r.text.strip() == "LIVE"
        # Admin itself is what answers: fail its health check and the probe follows.
        assert httpx2.post(f"http://127.0.0.1:{admin}/healthcheck/fail", timeout=5).is_success
        r = httpx2.get(f"{url}/ready", timeout=5)
        assert (r.status_code, r.text.strip()) == (503, "DRAINING")
        httpx2.post(f"http://127.0.0.1:{admin}/healthcheck/ok", timeout=5)
        assert httpx2.get(f"{url}/ready", timeout=5).status_code == 200
        # Nothing else of admin (which can stop or reconfigure Envoy) is reachable.
        for method, path in (
            ("POST", "/quitquitquit"),
            ("POST", "/healthcheck/fail"),
            ("POST", "/ready"),
            ("GET", "/config_dump"),
            ("GET", "/stats"),
            ("GET", "/"),
        ):
            r = httpx2.request(method, f"{url}{path}", timeout=5)
            assert r.status_code == 404, (method, path, r.status_code)
        envoy.check_running()
        assert httpx2.get(f"http://127.0.0.1:{admin}/ready", timeout=5).text.strip() == "LIVE"
    finally:
        envoy.stop()


def test_envoy_probes_can_be_replaced_or_turned_off(helm: Helm, tmp_path: Path) -> None:
    docs = render(helm, ENVOY_CHART, sets=["probes.enabled=false"])
    envoy = container(only(docs, "Deployment"), "envoy")
    assert "--config-yaml" not in envoy["args"]
    assert "probe" not in {p["name"] for p in envoy["ports"]}
    assert not {"startupProbe", "livenessProbe", "readinessProbe"} & set(envoy)
    # probes.adminPort names admin's port when the bootstrap is not atlasd's.
    docs = render(helm, ENVOY_CHART, sets=["probes.adminPort=9100", "probes.port=9200"])
    overlay = _probe_overlay(container(only(docs, "Deployment"), "envoy"))
    [admin_cluster] = overlay["static_resources"]["clusters"]
    endpoint = admin_cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    assert endpoint["address"]["socket_address"]["port_value"] == 9100
    assert (
        overlay["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"]
        == 9200
    )
    # A bootstrap without admin on a socket: the chart says what to set, not a dead probe.
    no_admin = write_values(tmp_path, "no-admin.yaml", {"files": {"envoy.yaml": "node: {id: x}\n"}})
    with pytest.raises(RuntimeError, match=r"probes\.adminPort"):
        render(helm, ENVOY_CHART, values=[no_admin])


def test_envoy_network_policy_values(helm: Helm, tmp_path: Path) -> None:
    obs_egress = [{"ipBlock": {"cidr": "203.0.113.0/24"}}]
    prometheus = [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}}]
    extra = [{"ports": [{"port": 9002, "protocol": "TCP"}], "from": obs_egress}]
    values = write_values(
        tmp_path,
        "np.yaml",
        {
            "networkPolicy": {
                "from": obs_egress,
                "fromByPort": {"alertmanager": prometheus},
                "extraIngress": extra,
            }
        },
    )
    policy = only(render(helm, ENVOY_CHART, values=[values]), "NetworkPolicy")["spec"]
    assert _policy_ports(policy) == {
        (11901, "TCP"): obs_egress,
        (11903, "TCP"): prometheus,
        (11904, "TCP"): obs_egress,
        (9002, "TCP"): obs_egress,
    }
    docs = render(helm, ENVOY_CHART, sets=["networkPolicy.enabled=false"])
    assert not of_kind(docs, "NetworkPolicy")


def test_envoy_custom_values_render(helm: Helm, tmp_path: Path) -> None:
    values = write_values(tmp_path, "custom.yaml", _envoy_custom_values())
    docs = render(helm, ENVOY_CHART, release="east", namespace="edge", values=[values])
    deploy = only(docs, "Deployment")
    assert deploy["spec"]["replicas"] == 2
    envoy = container(deploy, "envoy")
    assert envoy["image"] == "envoyproxy/envoy:v1.40.1"
    assert envoy["args"][-3:-1] == ["--disable-hot-restart", "--config-yaml"]
    # A probe of one's own replaces the chart's whole (Helm would otherwise merge the
    # two handlers into one invalid probe); the others stay the chart's.
    assert envoy["readinessProbe"] == {"tcpSocket": {"port": "thanos"}}
    assert envoy["livenessProbe"]["httpGet"] == {"path": "/ready", "port": "probe"}
    svc = only(docs, "Service", "east-envoy")
    assert svc["spec"]["type"] == "LoadBalancer"
    assert svc["spec"]["externalIPs"] == ["192.0.2.10"]
    assert svc["spec"]["externalTrafficPolicy"] == "Local"
    assert svc["metadata"]["annotations"] == {"example.com/lb": "internal"}
    assert (
        len(
            [
                s
                for s in of_kind(docs, "Service")
                if s["metadata"]["name"].startswith("alertmanager")
            ]
        )
        == 3
    )
    assert only(docs, "PodDisruptionBudget")["spec"]["maxUnavailable"] == 1
    assert deploy["spec"]["template"]["spec"]["tolerations"] == [
        {"key": "edge", "operator": "Exists"}
    ]


# ---------------------------------------------------------------- envoy chart: the agent

TOKEN = "abc123.0123456789abcdefghijklmnopqrstuv.pin"


def _enrolled_values_file(tmp_path: Path) -> tuple[Path, Doc]:
    """The values atlasd writes for east in enrollment mode (its own pure functions), as
    `atlasd cluster values east --format raw` gives them."""
    east = dataclasses.replace(EAST, enrolled=True)
    settings = dataclasses.replace(SETTINGS, enroll_address="198.51.100.7:6307")
    plan = plan_pki(
        secrets={}, clusters=(east,), settings=settings, now=dt.datetime.now(dt.UTC),
        keys=RandomKeys(),
    )  # fmt: skip
    desired = desired_state(clusters=(east,), alertmanagers=(), plan=plan, settings=settings)
    text = secret_data(desired.secrets[labels.values_secret_name("east")])[VALUES_KEY].decode()
    path = tmp_path / "east-enrolled.yaml"
    path.write_text(values_formats.raw(text))
    return path, yaml.safe_load(text)


def _init_container(deploy: Doc, name: str) -> Doc:
    for c in deploy["spec"]["template"]["spec"].get("initContainers", []):
        if c["name"] == name:
            return dict(c)
    raise AssertionError(f"no init container {name}")


def _agent_params(c: Doc, *, namespace: str, token: str | None) -> dict[str, Any]:
    """`atlasd agent`'s parameters as the container's environment gives them (click
    parses and validates it as in the pod)."""
    from atlasd.cli.agent import agent as agent_command

    env: dict[str, str] = {}
    for e in c["env"]:
        if "value" in e:
            env[e["name"]] = e["value"]
        elif "fieldRef" in e["valueFrom"]:
            assert e["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
            env[e["name"]] = namespace
        else:
            ref = e["valueFrom"]["secretKeyRef"]
            assert ref["optional"] is True  # a pod that restores needs no token
            if token is not None:
                env[e["name"]] = token
    known = {p.envvar for p in agent_command.params if isinstance(p, click.Option)}
    # The token is read from the environment by the command itself (never an option, so
    # it is never on a command line): `--token-file ...; or ATLAS_JOIN_TOKEN`.
    token_file = next(p for p in agent_command.params if p.name == "token_file")
    assert "ATLAS_JOIN_TOKEN" in str(getattr(token_file, "help", ""))
    known.add("ATLAS_JOIN_TOKEN")
    assert set(env) <= known, f"set but not read by atlasd agent: {set(env) - known}"
    mp = pytest.MonkeyPatch()
    try:
        for k in known:
            if isinstance(k, str):
                mp.delenv(k, raising=False)
        for k, v in env.items():
            mp.setenv(k, v)
        assert c["command"] == ["atlasd"] and c["args"][0] == "agent"
        return dict(agent_command.make_context("agent", list(c["args"][1:])).params)
    finally:
        mp.undo()


def test_envoy_agent_absent_unless_enabled(helm: Helm, tmp_path: Path) -> None:
    for docs in (
        render(helm, ENVOY_CHART),
        render(helm, ENVOY_CHART, values=[_cluster_values_file(tmp_path)[0]]),
    ):
        deploy = only(docs, "Deployment")
        pod = deploy["spec"]["template"]["spec"]
        assert "initContainers" not in pod
        assert [c["name"] for c in pod["containers"]] == ["envoy"]
        assert not {"ServiceAccount", "Role", "RoleBinding"} & {d["kind"] for d in docs}
        assert "serviceAccountName" not in pod
        assert not [s for s in of_kind(docs, "Secret") if "agent" in s["metadata"]["name"]]


def test_envoy_runs_the_agent_from_the_enrolled_values(helm: Helm, tmp_path: Path) -> None:
    values_file, values = _enrolled_values_file(tmp_path)
    assert values["agent"]["enabled"] is True and set(values["files"]) == {"envoy.yaml"}
    docs = render(helm, ENVOY_CHART, release="atlas-envoy", namespace="edge",
                  values=[values_file], sets=[f"agent.token={TOKEN}"])  # fmt: skip
    deploy = only(docs, "Deployment")
    pod = deploy["spec"]["template"]["spec"]
    init, sidecar, envoy = (
        _init_container(deploy, "agent-init"),
        container(deploy, "agent"),
        container(deploy, "envoy"),
    )
    assert [c["name"] for c in pod["initContainers"]] == ["agent-init"]
    assert [c["name"] for c in pod["containers"]] == ["envoy", "agent"]
    cert_dir = values["agent"]["certDir"]

    # The agent: what atlasd wrote, the token from the chart's Secret only.
    token_secret = only(docs, "Secret", "atlas-envoy-agent-token")
    assert secret_files(token_secret) == {"token": TOKEN}
    for c, once in ((init, True), (sidecar, False)):
        p = _agent_params(c, namespace="edge", token=TOKEN)
        assert p["once"] is once
        assert p["cluster"] == "east" and p["namespace"] == "monitoring"
        assert p["server"] == values["agent"]["server"] == "198.51.100.7:6307"
        assert p["server_name"] == ADS_SERVER_NAME
        assert p["directory"] == Path(cert_dir)
        assert p["state_secret"] == "atlas-envoy-agent-state"
        assert p["state_namespace"] == "edge"
        refs = [e["valueFrom"]["secretKeyRef"] for e in c["env"] if "secretKeyRef" in
                e.get("valueFrom", {})]  # fmt: skip
        assert refs == [{"name": "atlas-envoy-agent-token", "key": "token", "optional": True}]
        assert TOKEN not in yaml.safe_dump(c), "the token only by reference"
        # Hardened like Envoy; sized; no probe (the agent serves nothing to probe).
        sc = c["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"]["drop"] == ["ALL"] and sc["runAsNonRoot"] is True
        assert c["resources"]["requests"]["memory"] and c["resources"]["limits"]["memory"]
        assert not {"livenessProbe", "readinessProbe", "startupProbe"} & set(c)
        mounts = {m["name"]: m for m in c["volumeMounts"]}
        assert mounts["agent-certs"]["mountPath"] == cert_dir
        assert not mounts["agent-certs"].get("readOnly")
        api = mounts["agent-kube-api"]
        assert api["mountPath"] == "/var/run/secrets/kubernetes.io/serviceaccount"
        assert api["readOnly"] is True
    assert TOKEN not in yaml.safe_dump(deploy)
    # A new token (revoke --rekey) rolls the pods: its public id in the template.
    annotations = deploy["spec"]["template"]["metadata"]["annotations"]
    assert annotations["goatlas.io/agent-token-id"] == TOKEN.split(".")[0]
    # Not a token's shape: nothing of it outside its Secret.
    odd = render(helm, ENVOY_CHART, values=[values_file], sets=["agent.token=not-a-token"])
    assert "not-a-token" not in yaml.safe_dump(only(odd, "Deployment"))

    # Envoy reads the agent's directory, read-only, and has no API token.
    mounts = {m["name"]: m for m in envoy["volumeMounts"]}
    assert mounts["agent-certs"] == {"name": "agent-certs", "mountPath": cert_dir,
                                     "readOnly": True}  # fmt: skip
    assert "agent-kube-api" not in mounts
    assert pod["automountServiceAccountToken"] is False
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["agent-certs"]["emptyDir"]["medium"] == "Memory"
    sources = volumes["agent-kube-api"]["projected"]["sources"]
    assert sources[0]["serviceAccountToken"]["path"] == "token"
    # The bootstrap atlasd wrote reads the agent's files from that directory.
    boot = secret_files(only(docs, "Secret", "atlas-envoy"))["envoy.yaml"]
    assert f"{cert_dir}/sds-client.yaml" in boot and "PRIVATE KEY" not in boot

    # The agent's account may read and update its one Secret, and create; nothing else.
    assert pod["serviceAccountName"] == "atlas-envoy-agent"
    role = only(docs, "Role", "atlas-envoy-agent")
    assert role["rules"] == [
        {"apiGroups": [""], "resources": ["secrets"],
         "resourceNames": ["atlas-envoy-agent-state"], "verbs": ["get", "update"]},
        {"apiGroups": [""], "resources": ["secrets"], "verbs": ["create"]},
    ]  # fmt: skip
    binding = only(docs, "RoleBinding", "atlas-envoy-agent")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "atlas-envoy-agent", "namespace": "edge"}
    ]
    assert only(docs, "ServiceAccount")["automountServiceAccountToken"] is False


def test_envoy_agent_token_secret_and_state_values(helm: Helm, tmp_path: Path) -> None:
    values_file, _ = _enrolled_values_file(tmp_path)
    # A Secret of one's own for the token: referenced, none rendered.
    docs = render(helm, ENVOY_CHART, values=[values_file],
                  sets=["agent.tokenSecret=east-join", "agent.stateSecret.name=east-state"])  # fmt: skip
    deploy = only(docs, "Deployment")
    sidecar = container(deploy, "agent")
    assert _agent_params(sidecar, namespace="x", token=None)["state_secret"] == "east-state"
    assert "goatlas.io/agent-token-id" not in deploy["spec"]["template"]["metadata"]["annotations"]
    refs = [e["valueFrom"]["secretKeyRef"]["name"] for e in sidecar["env"]
            if "secretKeyRef" in e.get("valueFrom", {})]  # fmt: skip
    assert refs == ["east-join"]
    assert [s["metadata"]["name"] for s in of_kind(docs, "Secret")] == ["atlas-envoy"]
    assert only(docs, "Role")["rules"][0]["resourceNames"] == ["east-state"]
    # No state Secret: no account, no API token anywhere, the directory only.
    docs = render(helm, ENVOY_CHART, values=[values_file], sets=["agent.stateSecret.enabled=false"])
    pod = only(docs, "Deployment")["spec"]["template"]["spec"]
    assert not {"ServiceAccount", "Role", "RoleBinding"} & {d["kind"] for d in docs}
    assert "serviceAccountName" not in pod
    assert "agent-kube-api" not in {v["name"] for v in pod["volumes"]}
    params = _agent_params(pod["initContainers"][0], namespace="x", token=TOKEN)
    assert params["state_secret"] is None
    # Missing what atlasd writes: the chart says what to set.
    with pytest.raises(RuntimeError, match=r"set agent\.server"):
        render(helm, ENVOY_CHART, sets=["agent.enabled=true", "agent.cluster=east"])


@pytest.mark.parametrize("which", ["default", "custom", "cluster-values", "enrolled-values"])
def test_envoy_manifests_pass_server_side_dry_run(
    helm: Helm, apiserver: ApiServer, namespace: str, which: str, tmp_path: Path
) -> None:
    values: list[Path] = []
    sets: list[str] = []
    if which == "enrolled-values":
        values, sets = [_enrolled_values_file(tmp_path)[0]], [f"agent.token={TOKEN}"]
    elif which == "custom":
        values = [write_values(tmp_path, "custom.yaml", _envoy_custom_values())]
    elif which == "cluster-values":
        values = [_cluster_values_file(tmp_path, alertmanagers=2)[0]]
    docs = render(helm, ENVOY_CHART, namespace=namespace, values=values, sets=sets)
    out = server_dry_run(apiserver, namespace, docs)
    assert out.count("serverside-applied (server dry run)") == len(docs), out


# ---------------------------------------------------------------- Pod Security


RESTRICTED = "pod-security.kubernetes.io/enforce=restricted"


def _pod_dry_run(apiserver: ApiServer, namespace: str, deploy: Doc) -> str:
    """Create the Deployment's pod (its template as a Pod) with a server-side dry run:
    admission, Pod Security included, judges it as it would the ReplicaSet's pods."""
    template = deploy["spec"]["template"]
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": deploy["metadata"]["name"], "labels": template["metadata"]["labels"]},
        "spec": template["spec"],
    }
    return apiserver.kubectl(
        "-n", namespace, "create", "--dry-run=server", "-f", "-", input=yaml.safe_dump(pod)
    )


@pytest.mark.parametrize(
    "which",
    ["atlasd-default", "atlasd-custom", "envoy-default", "envoy-custom", "envoy-atlas",
     "envoy-agent"],
)  # fmt: skip
def test_pods_are_admitted_under_pod_security_restricted(
    helm: Helm, apiserver: ApiServer, namespace: str, which: str, tmp_path: Path
) -> None:
    """Both charts' pods pass the `restricted` Pod Security Standard, enforced by the real
    API server's admission, with their default and custom values and, for the Envoy, the
    observability values atlasd writes (test_node_helm.py installs both into a namespace
    enforcing it)."""
    apiserver.kubectl("label", "namespace", namespace, RESTRICTED)
    chart, values = ATLASD_CHART, []
    if which == "atlasd-custom":
        values = [write_values(tmp_path, "custom.yaml", ATLASD_CUSTOM)]
    elif which.startswith("envoy"):
        chart = ENVOY_CHART
        custom = _envoy_custom_values()
        del custom["ports"]  # its hostPort: see the last test of this group
        if which == "envoy-custom":
            values = [write_values(tmp_path, "custom.yaml", custom)]
        elif which == "envoy-atlas":
            obs = tmp_path / "atlas-values.yaml"
            obs.write_text(_atlasd_values_secrets()[labels.OBS_VALUES_SECRET])
            values = [obs]
        elif which == "envoy-agent":  # enrollment mode: the agent's init container and sidecar
            values = [_enrolled_values_file(tmp_path)[0]]
    deploy = only(render(helm, chart, namespace=namespace, values=values), "Deployment")
    if which == "envoy-agent":
        assert deploy["spec"]["template"]["spec"]["initContainers"]
    assert "created (server dry run)" in _pod_dry_run(apiserver, namespace, deploy)


def test_downstream_values_are_admitted_under_pod_security_restricted(
    helm: Helm, apiserver: ApiServer, namespace: str, tmp_path: Path
) -> None:
    """The downstream values atlasd writes install into a namespace enforcing
    `restricted` as they are (11901/11904 behind the chart's LoadBalancer Service, no host
    ports; docs/charts.md, "Exposing a downstream Envoy"). The control: enforcement is
    real, a hostPort of the user's own is refused."""
    apiserver.kubectl("label", "namespace", namespace, RESTRICTED)
    values_file, _ = _cluster_values_file(tmp_path, alertmanagers=0)
    deploy = only(
        render(helm, ENVOY_CHART, namespace=namespace, values=[values_file]), "Deployment"
    )
    assert "created (server dry run)" in _pod_dry_run(apiserver, namespace, deploy)
    [envoy] = [c for c in deploy["spec"]["template"]["spec"]["containers"] if c["name"] == "envoy"]
    for port in envoy["ports"]:
        if port["name"] == "thanos":
            port["hostPort"] = port["containerPort"]
    with pytest.raises(RuntimeError, match=r'violates PodSecurity "restricted:latest": hostPort'):
        _pod_dry_run(apiserver, namespace, deploy)


# ---------------------------------------------------------------- chart <-> `atlasd run`


def _cli_envvars() -> set[str]:
    names: set[str] = set()
    for ctx_cmd in (cli, run):
        for param in ctx_cmd.params:
            env = getattr(param, "envvar", None)
            if isinstance(env, str):
                names.add(env)
            elif env:
                names.update(env)
    return names


@pytest.mark.parametrize("custom", [False, True], ids=["default", "custom"])
def test_every_env_var_the_chart_sets_is_read_by_atlasd_run(
    helm: Helm, custom: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    values = [write_values(tmp_path, "custom.yaml", ATLASD_CUSTOM)] if custom else []
    docs = render(helm, ATLASD_CHART, release="obs", namespace="observability", values=values)
    deploy = only(docs, "Deployment")
    atlasd = container(deploy, "atlasd")
    known = _cli_envvars()
    fieldrefs = {"metadata.namespace": "observability", "metadata.name": "obs-atlasd-0"}
    for e in atlasd["env"]:
        if e["name"] == "ATLAS_EXTRA":  # the user's own extraEnv
            continue
        assert e["name"] in known, f"{e['name']} is set by the chart but atlasd run ignores it"
        value = e["value"] if "value" in e else fieldrefs[e["valueFrom"]["fieldRef"]["fieldPath"]]
        if e["name"] == "ATLAS_FORWARDER_TOKEN_FILE":
            # The file the pod mounts from the chart's generated Secret, here on disk.
            mounts = {m["name"]: m["mountPath"] for m in atlasd["volumeMounts"]}
            assert value == f"{mounts['forwarder-token']}/token"
            token = only(docs, "Secret", "obs-atlasd-forwarder-token")["data"]["token"]
            value = str(tmp_path / "token")
            Path(value).write_bytes(base64.b64decode(token))
        monkeypatch.setenv(e["name"], value)
    # click parses (and validates) the environment exactly as in the pod.
    ctx = run.make_context("run", list(atlasd["args"][1:]))
    p = ctx.params
    assert p["namespace"] == "observability"
    assert p["identity"] == "obs-atlasd-0"
    ports = {x["name"]: x["containerPort"] for x in atlasd["ports"]}
    assert p["ads_listen"] == ("0.0.0.0", ports["ads"])
    assert p["http_listen"] == ("0.0.0.0", ports["metrics"])
    ads = only(docs, "Service", f"{deploy['metadata']['name']}-ads")  # headless
    assert p["atlasd_ads_host"] == (
        f"{ads['metadata']['name']}.observability.svc.{'corp.local' if custom else 'cluster.local'}"
    )
    assert p["atlasd_ads_port"] == ads["spec"]["ports"][0]["port"]
    zone_mount = {m["name"]: m["mountPath"] for m in atlasd["volumeMounts"]}["zone"]
    assert p["zone_file"].parent == Path(zone_mount)
    coredns = container(deploy, "coredns")
    assert str(p["zone_file"]) == env_of(coredns)["ZONE_FILE"]
    assert p["leader_election"] is True
    # Logs a shipper can parse by default (docs/operations.md, "Logs").
    assert p["log_format"] == ("text" if custom else "json")
    assert p["thanos_query_url"] == ("http://thanos-query.monitoring:10902" if custom else None)
    if custom:
        assert p["envoy_ads_address"] == "xds.obs.example"
        assert p["envoy_ads_port"] == 443
        assert p["envoy_address"] == "envoy.obs.example"
        assert p["dns_configmap"] == "my-zone"
        assert p["endpoints_configmap"] == "my-endpoints"
        assert p["alertmanager_selector"] == (("app.kubernetes.io/name", "alertmanager"),)
        assert p["lease_name"] == "obs-leader"
        assert p["legacy_locks"] == ()  # "" is "none", not the default
    else:
        assert p["legacy_locks"] == ("atlas",)
        assert p["alertmanager_selector"] == (("app", "kube-prometheus-stack-alertmanager"),)
        assert p["dns_configmap"] == "atlas-coredns"


def _parse_cli(argv: list[str]) -> click.Context:
    """Parse (and validate) one `atlasd ...` command line without running it."""
    cmd: click.Command = cli
    name = "atlasd"
    while argv and isinstance(cmd, click.Group) and argv[0] in cmd.commands:
        name = argv.pop(0)
        cmd = cmd.commands[name]
    assert not isinstance(cmd, click.Group), f"incomplete command: {name}"
    return cmd.make_context(name, argv)


def test_notes_commands_are_real_atlasd_commands(helm: Helm, namespace: str) -> None:
    notes = helm(
        "install", "obs", str(ATLASD_CHART), "--namespace", namespace, "--dry-run=client"
    ).split("NOTES:", 1)[1]
    commands = []
    for line in notes.splitlines():
        # Commands are the indented lines (the first line names atlasd too).
        if not (line[:1].isspace() and line.strip().startswith("atlasd ")):
            continue
        words = shlex.split(line.strip(), comments=True)
        if words[:1] == ["atlasd"]:
            cut = [i for i, w in enumerate(words) if w in (">", "|", "&")]
            commands.append(words[1 : cut[0] if cut else None])
    verbs = {tuple(c[:2]) for c in commands}
    assert {("cluster", "add"), ("cluster", "values")} <= verbs, notes
    for argv in commands:
        _parse_cli(list(argv))
    assert "atlasd cluster values east --format raw" in notes
    # New clusters enroll by default: a token for the agent; no address set yet, said.
    assert ("cluster", "token") in verbs and "--set agent.token=" in notes
    assert "enrollment.address is not set" in notes
    assert "dnssrvnoa+_thanos._tcp.sidecars.thanos.atlas." in notes
    assert "--endpoint.sd-config-file=/etc/atlas-endpoints/all.yaml" in notes
    assert "atlas-thanos-endpoints" in notes
    assert "goatlas.io/cluster" in notes


def test_envoy_notes_in_enrollment_mode_name_the_agent_and_a_real_token_command(
    helm: Helm, namespace: str, tmp_path: Path
) -> None:
    values_file, _ = _enrolled_values_file(tmp_path)

    def notes(*sets: str) -> str:
        args = ["install", "north", str(ENVOY_CHART), "--namespace", namespace, "--dry-run=client",
                "-f", str(values_file)]  # fmt: skip
        for s in sets:
            args += ["--set", s]
        return helm(*args).split("NOTES:", 1)[1]

    without_token = notes()
    assert "Enrollment mode" in without_token and "north-envoy-agent-state" in without_token
    assert "-c agent-init" in without_token
    [mint] = [
        line.split("$(", 1)[1].split(")", 1)[0]
        for line in without_token.splitlines()
        if "agent.token=$(" in line
    ]
    assert mint == "atlasd cluster token east"  # the cluster of the values
    _parse_cli(shlex.split(mint)[1:])
    with_token = notes(f"agent.token={TOKEN}")
    assert "agent.token=$(" not in with_token and TOKEN not in with_token
    # Compatible values: no word of the agent.
    compatible = helm("install", "east", str(ENVOY_CHART), "--namespace", namespace,
                      "--dry-run=client", "-f", str(_cluster_values_file(tmp_path)[0]))  # fmt: skip
    assert "agent" not in compatible.split("NOTES:", 1)[1]
