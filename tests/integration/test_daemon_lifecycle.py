"""atlasd run as a process: SIGTERM within the bound, SIGKILL + restart re-issues
nothing and a real Envoy reconnects to the same content; standalone mode; the demo."""

from __future__ import annotations

import base64
import random
import signal
import stat
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.harness import components
from tests.harness.envoy import Envoy
from tests.harness.kube import ApiServer
from tests.harness.net import free_port
from tests.harness.wait import wait_until
from tests.integration.daemon_helpers import ATLASD, Atlasd

pytestmark = pytest.mark.integration

CLUSTER = {
    "apiVersion": "v1",
    "kind": "Service",
    "metadata": {"name": "east", "labels": {"goatlas.io/cluster": "true"}},
    "spec": {
        "clusterIP": "None",
        "externalIPs": ["192.0.2.10"],
        "ports": [{"name": "thanos", "port": 10901}, {"name": "prometheus", "port": 9090}],
    },
}


def _secrets(apiserver: ApiServer, namespace: str) -> dict[str, dict[str, Any]]:
    with apiserver.admin() as c:
        items = c.get(f"/api/v1/namespaces/{namespace}/secrets").json()["items"]
    return {i["metadata"]["name"]: i for i in items}


def _atlas_acked(atlasd: Atlasd) -> dict[str, str] | None:
    for e in atlasd.status().get("envoys") or []:
        if e["node"] == "atlas" and {"cds", "lds"} <= set(e["acked"]):
            return dict(e["acked"])
    return None


def test_sigkill_restart_reissues_nothing_and_envoy_reacks_same_content(
    apiserver: ApiServer,
    namespace: str,
    tmp_path: Path,
    envoy_factory: Callable[[dict[str, Any], str], Envoy],
) -> None:
    kube = (
        f"--kubeconfig={apiserver.admin_kubeconfig}",
        f"--namespace={namespace}",
        "--no-leader-election",
    )
    first = Atlasd(tmp_path / "a", *kube).start()
    with apiserver.admin() as c:
        assert c.post(f"/api/v1/namespaces/{namespace}/services", json=CLUSTER).status_code == 201
    everything = {
        "atlas-ca",
        "atlas-server",
        "atlas-client",
        "atlas-tls",
        "atlas-envoy-values",
        "east-envoy-values",
        "east-atlas-identity",
    }
    wait_until(lambda: everything <= set(_secrets(apiserver, namespace)), timeout=30, what="values")
    wait_until(
        lambda: [c["name"] for c in first.status()["clusters"]] == ["east"],
        timeout=30,
        what="east served",
    )
    before = {
        n: s["metadata"]["resourceVersion"] for n, s in _secrets(apiserver, namespace).items()
    }

    values = yaml.safe_load(
        base64.b64decode(
            _secrets(apiserver, namespace)["atlas-envoy-values"]["data"]["values.yaml"]
        )
    )
    bootstrap = yaml.safe_load(values["files"]["envoy.yaml"])
    envoy = envoy_factory(bootstrap, "atlas")
    acked = wait_until(lambda: _atlas_acked(first), timeout=30, what="the observability Envoy ACKs")

    first.proc.kill()  # SIGKILL: no cleanup at all
    second = Atlasd(tmp_path / "b", *kube, ads_port=first.ads_port).start()
    after = {n: s["metadata"]["resourceVersion"] for n, s in _secrets(apiserver, namespace).items()}
    wait_until(lambda: second.status().get("last_reconcile"), timeout=30, what="a reconcile pass")
    assert second.status()["last_reconcile"]["issued"] == []
    assert second.status()["last_reconcile"]["writes"] == 0
    assert after == before, "a restart rewrote Secrets"
    # The Envoy reconnects by itself and ACKs exactly the same versions.
    again = wait_until(
        lambda: _atlas_acked(second), timeout=60, what="the Envoy reconnects and ACKs"
    )
    assert again == acked
    assert envoy.proc.running()
    second.proc.stop()


def test_sigterm_stops_within_the_bound(
    apiserver: ApiServer, namespace: str, tmp_path: Path
) -> None:
    atlasd = Atlasd(
        tmp_path,
        f"--kubeconfig={apiserver.admin_kubeconfig}",
        f"--namespace={namespace}",
        "--shutdown-grace=10",
    ).start()
    t0 = time.monotonic()
    atlasd.proc.signal(signal.SIGTERM)
    assert atlasd.proc.popen is not None
    code = atlasd.proc.popen.wait(timeout=15)
    elapsed = time.monotonic() - t0
    assert code == 0, atlasd.log_text()[-2000:]
    assert elapsed < 10, f"stopped after {elapsed:.1f}s"


def test_standalone_onboarding_through_files(tmp_path: Path) -> None:
    store = tmp_path / "store"
    (store / "clusters").mkdir(parents=True)
    atlasd = Atlasd(tmp_path, f"--store={store}").start()
    try:
        (store / "clusters" / "east.yaml").write_text(yaml.safe_dump(CLUSTER))
        values = store / "values" / "east.yaml"
        wait_until(values.exists, timeout=30, what="values written for east")
        assert stat.S_IMODE(values.stat().st_mode) == 0o600
        for key_file in (store / "objects" / "secrets").iterdir():
            assert stat.S_IMODE(key_file.stat().st_mode) == 0o600, key_file
        boot = yaml.safe_load(yaml.safe_load(values.read_text())["files"]["envoy.yaml"])
        assert boot["node"]["id"] == "east"
        wait_until(
            lambda: (
                "east-thanos-sidecar0.monitoring.svc.cluster.local." in atlasd.zone_file.read_text()
            ),
            timeout=30,
            what="the zone lists east",
        )
        # /status says what the last reconcile that wrote did, and how long it took.
        last = atlasd.status()["last_key_reconcile"]
        assert last["writes"] > 0 and last["seconds"] > 0, last
        # A broken manifest is one problem of that file and loses nothing: another cluster
        # added meanwhile (as `atlasd cluster add --store` does) is served.
        (store / "clusters" / "broken.yaml").write_text("kind: Service\nmetadata: [\n")
        wait_until(
            lambda: atlasd.status().get("store_problems"), timeout=30, what="the file reported"
        )
        [problem] = atlasd.status()["store_problems"]
        assert problem["file"] == "clusters/broken.yaml" and "line 3" in problem["message"]
        west = {**CLUSTER, "metadata": {**CLUSTER["metadata"], "name": "west"}}
        west["spec"] = {**CLUSTER["spec"], "externalIPs": ["192.0.2.77"]}
        (store / "clusters" / "west.yaml").write_text(yaml.safe_dump(west))
        wait_until(
            lambda: [c["name"] for c in atlasd.status()["clusters"]] == ["east", "west"],
            timeout=30,
            what="west served beside the broken file",
        )
        assert atlasd.status().get("store_error") is None
        (store / "clusters" / "broken.yaml").unlink()
        (store / "clusters" / "west.yaml").unlink()
        wait_until(
            lambda: not atlasd.status().get("store_problems"), timeout=30, what="problem cleared"
        )
        assert atlasd.log_text().count("broken.yaml: not valid YAML") == 1
        # Removing the manifest removes the cluster everywhere.
        (store / "clusters" / "east.yaml").unlink()
        wait_until(lambda: not values.exists(), timeout=30, what="values removed")
        wait_until(
            lambda: "east-thanos-sidecar0" not in atlasd.zone_file.read_text(),
            timeout=30,
            what="the zone drops east",
        )
    finally:
        atlasd.proc.stop()


def test_demo_serves_through_the_envoy_chain_and_stops_cleanly(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    # Its own loopback block and ports, so nothing else on the machine can be in the way.
    block = f"127.{random.randint(64, 250)}.{random.randint(0, 255)}"
    proc = subprocess.run(
        [
            *ATLASD,
            "demo",
            "--check",
            "--dir",
            str(workdir),
            "--loopback",
            block,
            f"--ads-port={free_port()}",
            f"--http-port={free_port()}",
            f"--thanos={components.thanos()}",
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # The outcome: Thanos Query returns both clusters' series through the chain, and atlasd
    # sees Query see them (the demo checks both before it says so).
    assert "demo check passed" in proc.stdout
    assert "Thanos Query sees every cluster" in proc.stdout
    assert f"http://{block}.1:10902/graph" in proc.stdout
    assert f"http://{block}.1:10904/prom/east/graph" in proc.stdout
    # No process of the demo is left behind.
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert str(workdir) not in ps


def test_two_replicas_one_leader_both_serve_and_handover(
    apiserver: ApiServer, namespace: str, tmp_path: Path
) -> None:
    kube = (f"--kubeconfig={apiserver.admin_kubeconfig}", f"--namespace={namespace}")
    a = Atlasd(tmp_path / "a", *kube, "--identity=replica-a").start()
    b = Atlasd(tmp_path / "b", *kube, "--identity=replica-b").start()
    try:
        with apiserver.admin() as c:
            assert (
                c.post(f"/api/v1/namespaces/{namespace}/services", json=CLUSTER).status_code == 201
            )

        def both_serve_east() -> bool:
            return all(
                [c["name"] for c in r.status().get("clusters") or []] == ["east"] for r in (a, b)
            )

        wait_until(both_serve_east, timeout=60, what="both replicas serve east from their caches")
        leaders = [r for r in (a, b) if r.status()["leader"]]
        assert len(leaders) == 1, "exactly one replica leads"
        leader = leaders[0]
        follower = b if leader is a else a
        leader.proc.kill()
        # client-go timings: a lease of 15 s; the follower takes over once it expires.
        wait_until(lambda: follower.status()["leader"], timeout=30, what="the follower takes over")
        # ... and, leading now, it reconciles a change.
        with apiserver.admin() as c:
            west = {**CLUSTER, "metadata": {**CLUSTER["metadata"], "name": "west"}}  # type: ignore[dict-item]
            west["spec"] = {**CLUSTER["spec"], "externalIPs": ["192.0.2.11"]}  # type: ignore[dict-item]
            assert c.post(f"/api/v1/namespaces/{namespace}/services", json=west).status_code == 201
        wait_until(
            lambda: "west-envoy-values" in _secrets(apiserver, namespace),
            timeout=30,
            what="the new leader writes west's values",
        )
    finally:
        a.proc.stop()
        b.proc.stop()
