"""``atlasd run`` as a process, and the original Atlas's container commands: a user's
mistake at start is one line; ``controller`` and ``envoy-ads`` run from exactly the
environment and arguments the original chart gives its Deployments."""

from __future__ import annotations

import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest
import yaml

from tests.harness.kube import ApiServer
from tests.harness.net import free_port
from tests.harness.procs import Proc
from tests.harness.wait import wait_until
from tests.integration.daemon_helpers import cli
from tests.integration.test_daemon_lifecycle import CLUSTER

pytestmark = pytest.mark.integration


def _one_line(out: Any) -> str:
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    return str(lines[0])


def test_run_mistakes_are_one_line(apiserver: ApiServer, tmp_path: Path) -> None:
    kube = f"--kubeconfig={apiserver.admin_kubeconfig}"
    zone = f"--zone-file={tmp_path / 'atlas.zone'}"
    missing = cli("run", "--kubeconfig=/missing", zone, check=False)
    assert missing.returncode == 1
    assert _one_line(missing) == "error: kubeconfig /missing does not exist"
    context = cli("run", kube, "--context=nope", zone, check=False)
    assert context.returncode == 1 and "context 'nope' not found" in _one_line(context)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = cli("run", kube, zone, f"--ads-listen=127.0.0.1:{port}", check=False)
    assert busy.returncode == 1
    assert f"--ads-listen 127.0.0.1:{port}: cannot listen (address already in use)" in (
        _one_line(busy)
    )


class Original:
    """One atlasd process started the way the original chart starts its container."""

    def __init__(self, workdir: Path, args: list[str], env: dict[str, str]) -> None:
        self.http_port = int(env["METRICS_PORT"])
        self.proc = Proc(
            f"{args[0]}-{self.http_port}",
            [sys.executable, "-m", "atlasd", *args],
            log_dir=workdir,
            # The original chart's commands write the zone (and the endpoint files beside
            # it) to the temporary directory: this test's own.
            env={**env, "TMPDIR": str(workdir)},
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self) -> Original:
        self.proc.start()

        def ready() -> bool:
            self.proc.check_running()
            return httpx2.get(f"{self.url}/readyz", timeout=2).status_code == 200

        wait_until(ready, timeout=60, what=f"{self.proc.name} /readyz")
        return self

    def status(self) -> dict[str, Any]:
        doc: dict[str, Any] = httpx2.get(f"{self.url}/status", timeout=5).json()
        return doc


@pytest.fixture
def originals() -> Iterator[list[Original]]:
    started: list[Original] = []
    try:
        yield started
    finally:
        for o in started:
            o.proc.stop()


def _chart_env(apiserver: ApiServer, namespace: str) -> dict[str, str]:
    """What charts/atlas (the original's chart) sets, and what its commands read."""
    return {
        # deployment-controller.yaml / deployment-envoy-ads.yaml
        "ATLAS_DNS_CM_NAME": "atlas-atlas-coredns",
        "ATLAS_ENVOY_ADS_ADDRESS": "envoyads.atlas.local",
        "ATLAS_ENVOY_ADDRESS": "envoy.atlas.local",
        "ATLAS_ALERTMANAGER_SELECTOR": "app=kube-prometheus-stack-alertmanager",
        # the original commands' own variables (its pods get the namespace and a
        # kubeconfig from the environment too)
        "NAMESPACE": namespace,
        "KUBECONFIG": str(apiserver.admin_kubeconfig),
        "LOGLEVEL": "warn",
        "METRICS_PORT": str(free_port()),
    }


def _secret(apiserver: ApiServer, namespace: str, name: str) -> dict[str, Any] | None:
    with apiserver.admin() as c:
        r = c.get(f"/api/v1/namespaces/{namespace}/secrets/{name}")
        return r.json() if r.status_code == 200 else None


def test_the_original_charts_controller_and_envoy_ads_run_atlasd(
    apiserver: ApiServer, namespace: str, tmp_path: Path, originals: list[Original]
) -> None:
    with apiserver.admin() as c:
        assert c.post(f"/api/v1/namespaces/{namespace}/services", json=CLUSTER).status_code == 201
    # `controller`: the whole daemon. GRPC_PORT keeps its ADS port off the default 6305.
    ctl_env = {**_chart_env(apiserver, namespace), "GRPC_PORT": str(free_port())}
    ctl = Original(tmp_path / "ctl", ["controller"], ctl_env).start()
    originals.append(ctl)
    wait_until(lambda: ctl.status()["leader"], timeout=30, what="controller leads")
    values = wait_until(
        lambda: _secret(apiserver, namespace, "east-envoy-values"), timeout=30, what="values"
    )
    assert values is not None

    # The zone's ConfigMap mirror (named by ATLAS_DNS_CM_NAME) is applied at most once a
    # second, on its own schedule: wait for it rather than read it once after the values.
    def mirrored() -> bool:
        with apiserver.admin() as c:
            cm = c.get(f"/api/v1/namespaces/{namespace}/configmaps/atlas-atlas-coredns")
        return cm.status_code == 200 and "atlas.zone" in cm.json()["data"]

    wait_until(mirrored, timeout=30, interval=0.2, what="the zone's ConfigMap mirror")

    # Thanos Query's endpoint configuration: its ConfigMap (the leader's) and its file
    # (beside the zone file: the original chart's pods write to the temporary directory).
    want = f"- address: east-thanos-sidecar0.{namespace}.svc.cluster.local:10901\n"

    def endpoints() -> str | None:
        with apiserver.admin() as c:
            cm = c.get(f"/api/v1/namespaces/{namespace}/configmaps/atlas-thanos-endpoints")
        listed = cm.json()["data"].get("all.yaml") if cm.status_code == 200 else None
        return listed if listed is not None and want in listed else None

    listed = wait_until(endpoints, timeout=30, interval=0.2, what="east in the endpoints")
    assert (tmp_path / "ctl" / "thanos-endpoints" / "all.yaml").read_text() == listed
    obs = cli("cluster-values", "--name", "atlas", f"--namespace={namespace}",
              f"--kubeconfig={apiserver.admin_kubeconfig}").stdout  # fmt: skip
    boot = yaml.safe_load(yaml.safe_load(obs)["files"]["envoy.yaml"])
    xds = boot["static_resources"]["clusters"][0]["load_assignment"]["endpoints"][0]
    address = xds["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
    # The observability Envoy is pointed at the original chart's ADS Service.
    assert address == {
        "address": f"atlas-atlas-envoy-ads.{namespace}.svc.cluster.local",
        "port_value": 6305,
    }

    # `envoy-ads --grpc-port=N` as deployment-envoy-ads.yaml starts it: serves, never leads.
    ads_port = free_port()
    ads_env = _chart_env(apiserver, namespace)
    ads = Original(tmp_path / "ads", ["envoy-ads", f"--grpc-port={ads_port}"], ads_env).start()
    originals.append(ads)
    wait_until(
        lambda: [c["name"] for c in ads.status().get("clusters") or []] == ["east"],
        timeout=30,
        what="envoy-ads serves east from its watch cache",
    )
    doc = ads.status()
    assert doc["leader"] is False and doc["leadership"]["blocked_by"] == "serve-only"
    with socket.create_connection(("127.0.0.1", ads_port), timeout=5):
        pass  # --grpc-port is where its ADS server listens
    # LOGLEVEL=warn: no info lines.
    for o in (ctl, ads):
        assert " INFO " not in o.proc.log_text(), o.proc.log_text()


# The original chart's RBAC (charts/atlas/templates/rbac-roles.yaml of goatlas-io/atlas),
# as Roles in the namespace (its ClusterRoles grant the same verbs cluster-wide).
ORIGINAL_CONTROLLER_RULES: list[dict[str, Any]] = [
    {
        "apiGroups": [""],
        "resources": [
            "pods",
            "events",
            "configmaps",
            "secrets",
            "services",
            "serviceaccounts",
            "endpoints",
            "persistentvolumeclaims",
        ],
        "verbs": ["*"],
    },
    {
        "apiGroups": ["coordination.k8s.io"],
        "resources": ["leases"],
        "verbs": ["list", "get", "watch", "update"],
    },
]
ORIGINAL_ENVOY_ADS_RULES: list[dict[str, Any]] = [
    {"apiGroups": [""], "resources": ["services", "secrets"], "verbs": ["get", "list", "watch"]},
    {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list", "watch", "create"]},
    {
        "apiGroups": [""],
        "resources": ["configmaps"],
        "verbs": ["update", "delete", "patch"],
        "resourceNames": ["atlas-envoy-ads"],
    },
]


def test_the_originals_rbac_and_one_more_verb_are_enough_for_an_image_swap(
    apiserver: ApiServer, namespace: str, tmp_path: Path, originals: list[Original]
) -> None:
    """docs/migration.md, "Before you start": with the original chart's ServiceAccounts
    and rules, `atlasd envoy-ads` serves as it is; `atlasd controller` serves, says it
    may not create its Lease, and leads once given that one verb."""
    with apiserver.admin() as c:
        assert c.post(f"/api/v1/namespaces/{namespace}/services", json=CLUSTER).status_code == 201
    ctl_sa = "atlas-atlas-controller"
    ctl_kubeconfig = apiserver.service_account_kubeconfig(
        ctl_sa, namespace, ORIGINAL_CONTROLLER_RULES
    )
    ads_kubeconfig = apiserver.service_account_kubeconfig(
        "atlas-atlas-envoy-ads", namespace, ORIGINAL_ENVOY_ADS_RULES
    )

    env = {**_chart_env(apiserver, namespace), "LOGLEVEL": "info"}
    ctl = Original(
        tmp_path / "ctl",
        ["controller"],
        {**env, "KUBECONFIG": str(ctl_kubeconfig), "GRPC_PORT": str(free_port())},
    ).start()
    originals.append(ctl)
    wait_until(
        lambda: (
            f"acquiring lease {namespace}/atlasd" in ctl.proc.log_text()
            and "Forbidden" in ctl.proc.log_text()
        ),
        timeout=30,
        what="the controller says it may not create its Lease",
    )
    assert ctl.status()["leader"] is False
    assert _secret(apiserver, namespace, "east-envoy-values") is None

    # What the guide tells you to run: kubectl create role/rolebinding atlasd-lease.
    apiserver.kubectl(
        "-n", namespace, "create", "role", "atlasd-lease", "--verb=create",
        "--resource=leases.coordination.k8s.io",
    )  # fmt: skip
    apiserver.kubectl(
        "-n", namespace, "create", "rolebinding", "atlasd-lease", "--role=atlasd-lease",
        f"--serviceaccount={namespace}:{ctl_sa}",
    )  # fmt: skip
    wait_until(lambda: ctl.status()["leader"], timeout=60, what="the controller leads")
    wait_until(
        lambda: _secret(apiserver, namespace, "east-envoy-values"),
        timeout=60,
        what="east's values written with the original's rights",
    )
    problems = [p for p in ctl.status()["problems"] if "Forbidden" in p["message"]]
    assert problems == []

    ads = Original(
        tmp_path / "ads",
        ["envoy-ads", f"--grpc-port={free_port()}"],
        {**env, "KUBECONFIG": str(ads_kubeconfig), "METRICS_PORT": str(free_port())},
    ).start()
    originals.append(ads)
    wait_until(
        lambda: [c["name"] for c in ads.status().get("clusters") or []] == ["east"],
        timeout=30,
        what="envoy-ads serves east with the original's envoy-ads rights",
    )
    assert "Forbidden" not in ads.proc.log_text(), ads.proc.log_text()
