"""Past one DNS message, atlasd says so where an operator looks, while Thanos Query's
endpoint configuration keeps listing every sidecar: a Warning Event on the CA Secret, the
metric, /status and the endpoints ConfigMap, against a real API server."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx2

from tests.harness.kube import ApiServer
from tests.harness.objects import cluster_service
from tests.harness.wait import wait_until
from tests.integration.daemon_helpers import Atlasd

ALL = "_thanos._tcp.sidecars.thanos.atlas."
# Ten clusters of 64 sidecars with 40-character names: 640 SRV records of ~100 bytes,
# more than one DNS message; the same ten with 16 sidecars each fit.
NAMES = [f"c{i}-" + "x" * 37 for i in range(10)]


def _cluster(name: str, i: int, replicas: int) -> dict[str, Any]:
    return cluster_service(name, f"192.0.2.{i + 1}", labels={"goatlas.io/replicas": str(replicas)})


def _answer_bytes(daemon: Atlasd) -> float | None:
    for line in httpx2.get(f"{daemon.url}/metrics", timeout=5).text.splitlines():
        if line.startswith(f'atlasd_dns_srv_answer_bytes{{name="{ALL}"}}'):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_an_srv_answer_past_one_message_is_an_event_and_the_endpoints_list_all(
    apiserver: ApiServer, namespace: str, tmp_path: Path
) -> None:
    daemon = Atlasd(
        tmp_path,
        f"--kubeconfig={apiserver.admin_kubeconfig}",
        f"--namespace={namespace}",
        "--no-leader-election",
    ).start()
    try:
        with apiserver.admin() as c:
            for i, name in enumerate(NAMES):
                svc = _cluster(name, i, 64)
                r = c.post(f"/api/v1/namespaces/{namespace}/services", json=svc)
                assert r.status_code == 201, r.text

        def too_large() -> list[dict[str, Any]] | None:
            doc: list[dict[str, Any]] = daemon.status().get("zone", {}).get("too_large") or []
            return doc or None

        [flagged] = wait_until(too_large, timeout=60, what="zone.too_large in /status")
        assert (flagged["name"], flagged["records"]) == (ALL, 640)
        assert flagged["bytes"] > 65535
        assert _answer_bytes(daemon) == flagged["bytes"]

        def event() -> dict[str, Any] | None:
            with apiserver.admin() as c:
                items = c.get(f"/api/v1/namespaces/{namespace}/events").json()["items"]
            found = [e for e in items if e["reason"] == "SrvAnswerTooLarge"]
            return found[0] if found else None

        ev = wait_until(event, timeout=30, what="a SrvAnswerTooLarge Event")
        assert ev["type"] == "Warning"
        assert ev["involvedObject"]["kind"] == "Secret"
        assert ev["involvedObject"]["name"] == "atlas-ca"
        assert ALL in ev["message"] and "--endpoint.sd-config-file" in ev["message"]
        assert "more than one DNS message" in daemon.log_text()

        # The endpoint configuration has no such ceiling: every sidecar is listed.
        def listed() -> int:
            with apiserver.admin() as c:
                cm = c.get(f"/api/v1/namespaces/{namespace}/configmaps/atlas-thanos-endpoints")
            text = cm.json()["data"]["all.yaml"] if cm.status_code == 200 else ""
            return str(text).count("- address: ")

        wait_until(lambda: listed() == 640, timeout=30, what="640 endpoints in the ConfigMap")

        # Fewer sidecars: it fits again, and /status says so.
        with apiserver.admin() as c:
            for name in NAMES:
                patch = {"metadata": {"labels": {"goatlas.io/replicas": "16"}}}
                r = c.patch(
                    f"/api/v1/namespaces/{namespace}/services/{name}",
                    json=patch,
                    headers={"Content-Type": "application/merge-patch+json"},
                )
                assert r.status_code == 200, r.text
        wait_until(lambda: too_large() is None, timeout=60, what="zone.too_large cleared")
        wait_until(lambda: listed() == 160, timeout=30, what="160 endpoints in the ConfigMap")
    finally:
        daemon.proc.stop()
