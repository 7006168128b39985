"""Smoke tests: each real component of the harness is really there and usable."""

from __future__ import annotations

import json
import ssl
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx2
import pytest
import yaml

from tests.harness.coredns import CoreDNS
from tests.harness.envoy import Envoy
from tests.harness.kube import ApiServer
from tests.harness.net import free_port
from tests.harness.prom import DEFAULT_ALERTMANAGER_CONFIG, WebProc
from tests.harness.wait import wait_until

pytestmark = pytest.mark.integration


def _service(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "labels": {"goatlas.io/cluster": "true"}},
        "spec": {"ports": [{"name": "thanos", "port": 10901}]},
    }


def test_apiserver_create_get_watch_service(apiserver: ApiServer, namespace: str) -> None:
    base = f"/api/v1/namespaces/{namespace}/services"
    with apiserver.admin() as c:
        listed = c.get(base)
        assert listed.status_code == 200
        rv = listed.json()["metadata"]["resourceVersion"]

        seen: list[dict[str, Any]] = []

        def watch() -> None:
            with (
                apiserver.admin() as w,
                w.stream(
                    "GET",
                    base,
                    params={"watch": "1", "resourceVersion": rv, "timeoutSeconds": "20"},
                ) as resp,
            ):
                for line in resp.iter_lines():
                    if line:
                        seen.append(json.loads(line))
                        return

        t = threading.Thread(target=watch)
        t.start()
        created = c.post(base, json=_service("east"))
        assert created.status_code == 201, created.text
        got = c.get(f"{base}/east")
        assert got.status_code == 200
        assert got.json()["metadata"]["labels"]["goatlas.io/cluster"] == "true"
        t.join(timeout=30)
        assert seen and seen[0]["type"] == "ADDED"
        assert seen[0]["object"]["metadata"]["name"] == "east"


def test_limited_service_account_is_forbidden_outside_its_role(
    apiserver: ApiServer, namespace: str
) -> None:
    kubeconfig = apiserver.service_account_kubeconfig(
        "reader",
        namespace,
        [{"apiGroups": [""], "resources": ["services"], "verbs": ["get", "list", "watch"]}],
    )
    token = yaml.safe_load(kubeconfig.read_text())["users"][0]["user"]["token"]
    with httpx2.Client(
        base_url=apiserver.url,
        verify=ssl.create_default_context(cafile=str(apiserver.serving_ca_path)),
        headers={"Authorization": f"Bearer {token}"},
    ) as c:
        assert c.get(f"/api/v1/namespaces/{namespace}/services").status_code == 200
        denied = c.get(f"/api/v1/namespaces/{namespace}/secrets")
        assert denied.status_code == 403
        assert denied.json()["reason"] == "Forbidden"
        assert (
            c.post(f"/api/v1/namespaces/{namespace}/services", json=_service("x")).status_code
            == 403
        )


def test_kubectl_and_helm_reach_the_apiserver(
    apiserver: ApiServer, namespace: str, helm: Callable[..., str]
) -> None:
    assert f"namespace/{namespace}" in apiserver.kubectl("get", "ns", "-o", "name")
    assert "v3." in helm("version", "--short")
    # helm talks to the cluster too: listing releases needs the API (a fresh namespace
    # has none; other tests install charts elsewhere in the shared apiserver).
    assert helm("list", "-n", namespace, "-o", "json").strip() == "[]"


def test_envoy_reaches_ready_and_serves(
    envoy_factory: Callable[[dict[str, Any], str], Envoy],
) -> None:
    port = free_port()
    bootstrap = {
        "node": {"id": "smoke", "cluster": "smoke"},
        "static_resources": {
            "listeners": [
                {
                    "name": "hello",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": {
                                        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                                        "stat_prefix": "hello",
                                        "route_config": {
                                            "virtual_hosts": [
                                                {
                                                    "name": "all",
                                                    "domains": ["*"],
                                                    "routes": [
                                                        {
                                                            "match": {"prefix": "/"},
                                                            "direct_response": {
                                                                "status": 200,
                                                                "body": {"inline_string": "hi"},
                                                            },
                                                        }
                                                    ],
                                                }
                                            ]
                                        },
                                        "http_filters": [
                                            {
                                                "name": "envoy.filters.http.router",
                                                "typed_config": {
                                                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                                                },
                                            }
                                        ],
                                    },
                                }
                            ]
                        }
                    ],
                }
            ]
        },
    }
    envoy = envoy_factory(bootstrap, "smoke")
    envoy.wait_ready()
    assert httpx2.get(f"http://127.0.0.1:{port}/", timeout=5).text == "hi"
    dump = envoy.config_dump()
    kinds = [c["@type"].rsplit(".", 1)[-1] for c in dump["configs"]]
    assert "ListenersConfigDump" in kinds


ZONE = """\
$ORIGIN atlas.
@ 60 IN SOA ns.atlas. hostmaster.atlas. {serial} 60 60 60 60
@ 60 IN NS ns.atlas.
ns 60 IN A 127.0.0.1
_thanos._tcp.sidecars.thanos 60 IN SRV 10 100 10901 {target}.monitoring.svc.cluster.local.
"""


def test_coredns_serves_srv_and_reloads(
    tmp_path: Path, coredns_factory: Callable[..., CoreDNS]
) -> None:
    zone = tmp_path / "atlas.zone"
    zone.write_text(ZONE.format(serial=1, target="east-thanos-sidecar0"))
    server = coredns_factory(zone)
    name = "_thanos._tcp.sidecars.thanos.atlas."
    assert server.query(name, "SRV") == [
        "10 100 10901 east-thanos-sidecar0.monitoring.svc.cluster.local."
    ]
    zone.write_text(ZONE.format(serial=2, target="west-thanos-sidecar0"))
    wait_until(
        lambda: (
            server.query(name, "SRV")
            == ["10 100 10901 west-thanos-sidecar0.monitoring.svc.cluster.local."]
        ),
        timeout=20,
        what="CoreDNS serving the changed zone",
    )


def test_prometheus_and_alertmanager_ready(
    prometheus_factory: Callable[[str], WebProc],
    alertmanager_factory: Callable[[str], WebProc],
) -> None:
    prom = prometheus_factory("global:\n  scrape_interval: 15s\n")
    am = alertmanager_factory(DEFAULT_ALERTMANAGER_CONFIG)
    info = httpx2.get(f"{prom.url}/api/v1/status/buildinfo", timeout=5).json()
    assert info["status"] == "success" and info["data"]["version"]
    status = httpx2.get(f"{am.url}/api/v2/status", timeout=5).json()
    assert status["versionInfo"]["version"]
