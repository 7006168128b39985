"""The cluster commands against the real API server, tried as a new user would: every
mistake is one line naming the problem, the fleet-wide rules hold before anything is
written, and the Service ``cluster add`` makes draws no API warning."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from atlasd.clusterctl import SERVICE_PROXY_LABEL, cluster_service
from atlasd.fleet.validate import validate_all
from atlasd.model import Settings
from tests.harness.kube import ApiServer
from tests.integration.daemon_helpers import cli

pytestmark = pytest.mark.integration


def _kube(apiserver: ApiServer, namespace: str) -> list[str]:
    return [f"--kubeconfig={apiserver.admin_kubeconfig}", f"--namespace={namespace}"]


def _one_line(out: Any) -> str:
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    assert lines[0].startswith("error: ")
    return str(lines[0])


def _services(apiserver: ApiServer, namespace: str) -> dict[str, dict[str, Any]]:
    with apiserver.admin() as c:
        items = c.get(f"/api/v1/namespaces/{namespace}/services").json()["items"]
    return {i["metadata"]["name"]: i for i in items}


def _original_headless(name: str, ip: str, namespace: str) -> dict[str, Any]:
    """A cluster Service exactly as the original's `cluster-add` created it."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {"goatlas.io/cluster": "true", "goatlas.io/replicas": "1"},
        },
        "spec": {
            "clusterIP": "None",
            "externalIPs": [ip],
            "ports": [
                {"name": "prometheus", "port": 9090, "targetPort": 9090, "protocol": "TCP"},
                {"name": "thanos", "port": 10901, "targetPort": 10901, "protocol": "TCP"},
                {"name": "alertmanager", "port": 9093, "targetPort": 9093, "protocol": "TCP"},
            ],
        },
    }


def test_add_refuses_an_external_ip_another_cluster_holds(
    apiserver: ApiServer, namespace: str
) -> None:
    kube = _kube(apiserver, namespace)
    cli("cluster", "add", "east", "--external-ip", "192.0.2.10", *kube)
    out = cli("cluster", "add", "west", "--external-ip", "192.0.2.10", *kube, check=False)
    assert out.returncode == 1
    line = _one_line(out)
    assert "spec.externalIPs[0]" in line and "already used by cluster 'east'" in line
    assert set(_services(apiserver, namespace)) == {"east"}
    # Its own address again, on --overwrite, is fine: it does not compete with itself.
    cli("cluster", "add", "east", "--external-ip", "192.0.2.10", "--overwrite", *kube)


def test_add_takes_several_external_ips_and_the_first_is_served(
    apiserver: ApiServer, namespace: str
) -> None:
    kube = _kube(apiserver, namespace)
    cli("cluster", "add", "east", "--external-ip", "192.0.2.10,192.0.2.11", *kube)
    cli("cluster-add", "--name", "west", "--external-ip", "192.0.2.20",
        "--external-ip", "192.0.2.21", *kube)  # fmt: skip
    svcs = _services(apiserver, namespace)
    assert svcs["east"]["spec"]["externalIPs"] == ["192.0.2.10", "192.0.2.11"]
    assert svcs["west"]["spec"]["externalIPs"] == ["192.0.2.20", "192.0.2.21"]
    rows = json.loads(cli("cluster", "list", "-o", "json", *kube).stdout)
    assert [(r["name"], r["external_ip"], r["problem"]) for r in rows] == [
        ("east", "192.0.2.10", ""),
        ("west", "192.0.2.20", ""),
    ]
    bad = cli("cluster", "add", "x", "--external-ip", "192.0.2.30,nope", *kube, check=False)
    assert bad.returncode == 1 and "spec.externalIPs[1]" in _one_line(bad)


def test_the_service_cluster_add_makes_draws_no_api_warning(
    apiserver: ApiServer, namespace: str
) -> None:
    path = f"/api/v1/namespaces/{namespace}/services"
    new = cluster_service(name="east", external_ips=["192.0.2.10"], replicas=1, namespace=namespace)
    old = _original_headless("west", "192.0.2.11", namespace)
    with apiserver.admin() as c:
        created = c.post(path, json=new)
        assert created.status_code == 201, created.text
        assert "warning" not in created.headers, created.headers.get("warning")
        # What `kubectl edit` / `kubectl apply` send afterwards: a full update.
        body = created.json()
        body["metadata"]["annotations"] = {"edited": "yes"}
        updated = c.put(f"{path}/east", json=body)
        assert updated.status_code == 200, updated.text
        assert "warning" not in updated.headers, updated.headers.get("warning")
        # The original's shape is what drew the warning (so this test can fail).
        legacy = c.post(path, json=old)
        assert legacy.status_code == 201
        assert "externalIPs is ignored for headless services" in legacy.headers["warning"]
    svcs = _services(apiserver, namespace)
    assert svcs["east"]["spec"]["clusterIP"] not in ("", "None")
    assert svcs["east"]["metadata"]["labels"][SERVICE_PROXY_LABEL] == "atlasd"
    # The daemon's validator accepts both shapes.
    clusters, problems = validate_all(list(svcs.values()), Settings(namespace=namespace))
    assert [c.name for c in clusters] == ["east", "west"] and problems == ()
    # The CLI makes the same shape; --overwrite of the original's Service keeps it headless
    # (clusterIP is immutable) instead of failing.
    kube = _kube(apiserver, namespace)
    cli("cluster", "add", "north", "--external-ip", "192.0.2.12", *kube)
    cli("cluster", "add", "west", "--external-ip", "192.0.2.13", "--replicas", "2",
        "--overwrite", *kube)  # fmt: skip
    svcs = _services(apiserver, namespace)
    assert svcs["north"]["spec"]["clusterIP"] not in ("", "None")
    assert svcs["west"]["spec"]["clusterIP"] == "None"
    assert svcs["west"]["spec"]["externalIPs"] == ["192.0.2.13"]
    assert svcs["west"]["metadata"]["labels"]["goatlas.io/replicas"] == "2"


def test_values_of_a_rejected_cluster_shows_the_problem(
    apiserver: ApiServer, namespace: str
) -> None:
    kube = _kube(apiserver, namespace)
    rejected = _original_headless("east", "192.0.2.10", namespace)
    rejected["metadata"]["labels"]["goatlas.io/replicas"] = "many"
    with apiserver.admin() as c:
        assert c.post(f"/api/v1/namespaces/{namespace}/services", json=rejected).status_code == 201
    out = cli("cluster", "values", "east", *kube, check=False)
    assert out.returncode == 1
    line = _one_line(out)
    assert "cluster 'east' is rejected" in line
    assert 'metadata.labels["goatlas.io/replicas"]' in line and "'many'" in line
    assert "is atlasd running" not in line
    # Values kept from before it was rejected (atlasd keeps its objects until it is fixed
    # or deleted) are not printed as if it were served.
    stale = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "east-envoy-values"},
        "data": {"values.yaml": base64.b64encode(b"files: {}\n").decode()},
    }
    with apiserver.admin() as c:
        assert c.post(f"/api/v1/namespaces/{namespace}/secrets", json=stale).status_code == 201
    out = cli("cluster", "values", "east", *kube, check=False)
    assert out.returncode == 1 and out.stdout == ""
    assert "cluster 'east' is rejected" in _one_line(out)
    # A valid cluster whose values are not written yet (no atlasd here) says so.
    cli("cluster", "add", "west", "--external-ip", "192.0.2.11", *kube)
    later = cli("cluster-values", "--name", "west", *kube, check=False)
    assert later.returncode == 1 and "is valid, but its values are not written yet" in (
        _one_line(later)
    )


@pytest.mark.parametrize(
    "args",
    [
        ["cluster", "list"],
        ["cluster", "values", "east"],
        ["cluster", "remove", "east"],
        ["cluster", "add", "east", "--external-ip", "192.0.2.10"],
    ],
    ids=["list", "values", "remove", "add"],
)
def test_a_namespace_that_does_not_exist_is_named(apiserver: ApiServer, args: list[str]) -> None:
    out = cli(*args, f"--kubeconfig={apiserver.admin_kubeconfig}", "-n", "no-such-ns", check=False)
    assert out.returncode == 1
    assert _one_line(out) == "error: namespace 'no-such-ns' does not exist"


def test_a_path_like_namespace_is_refused(apiserver: ApiServer, namespace: str) -> None:
    cli("cluster", "add", "east", "--external-ip", "192.0.2.10", *_kube(apiserver, namespace))
    # `-n ..` once listed every namespace's Services (the path collapsed to /api/v1/services).
    out = cli(
        "cluster", "list", "-o", "json", f"--kubeconfig={apiserver.admin_kubeconfig}", "-n", "..",
        check=False,
    )  # fmt: skip
    assert out.returncode == 2 and out.stdout == ""
    assert "--namespace" in out.stderr and "not a namespace name" in out.stderr


def test_remove_of_a_service_that_is_not_a_cluster_says_why(
    apiserver: ApiServer, namespace: str
) -> None:
    kube = _kube(apiserver, namespace)
    svc = _original_headless("east", "192.0.2.10", namespace)
    svc["metadata"]["labels"]["goatlas.io/cluster"] = "false"
    plain = _original_headless("web", "192.0.2.11", namespace)
    plain["metadata"]["labels"] = {}
    with apiserver.admin() as c:
        for s in (svc, plain):
            assert c.post(f"/api/v1/namespaces/{namespace}/services", json=s).status_code == 201
    out = cli("cluster", "remove", "east", *kube, check=False)
    assert out.returncode == 1
    assert "its goatlas.io/cluster label is 'false'" in _one_line(out)
    out = cli("cluster", "remove", "web", *kube, check=False)
    assert "it has no goatlas.io/cluster label" in _one_line(out)
    assert set(_services(apiserver, namespace)) == {"east", "web"}


def test_list_shows_a_cluster_label_that_is_not_exactly_true(
    apiserver: ApiServer, namespace: str
) -> None:
    kube = _kube(apiserver, namespace)
    cli("cluster", "add", "east", "--external-ip", "192.0.2.10", *kube)
    typo = _original_headless("west", "192.0.2.11", namespace)
    typo["metadata"]["labels"]["goatlas.io/cluster"] = "True"
    with apiserver.admin() as c:
        assert c.post(f"/api/v1/namespaces/{namespace}/services", json=typo).status_code == 201
    rows = json.loads(cli("cluster", "list", "-o", "json", *kube).stdout)
    assert [(r["name"], r["external_ip"]) for r in rows] == [
        ("east", "192.0.2.10"),
        ("west", "192.0.2.11"),
    ]
    assert rows[0]["problem"] == ""
    assert rows[1]["problem"].startswith("metadata.labels[\"goatlas.io/cluster\"]: is 'True'")
    table = cli("cluster", "list", *kube).stdout
    assert 'labelled exactly "true"' in table
    # add names what is there; --overwrite fixes the label.
    out = cli("cluster", "add", "west", "--external-ip", "192.0.2.11", *kube, check=False)
    assert out.returncode == 1
    assert "goatlas.io/cluster='True'" in _one_line(out) and "--overwrite" in _one_line(out)
    cli("cluster", "add", "west", "--external-ip", "192.0.2.11", "--overwrite", *kube)
    svc = _services(apiserver, namespace)["west"]
    assert svc["metadata"]["labels"]["goatlas.io/cluster"] == "true"
    assert svc["spec"]["clusterIP"] == "None"  # the original's shape is kept


def test_add_never_turns_someone_elses_service_into_a_cluster(
    apiserver: ApiServer, namespace: str
) -> None:
    kube = _kube(apiserver, namespace)
    web = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "web", "labels": {"app": "web"}},
        "spec": {"selector": {"app": "web"}, "ports": [{"name": "http", "port": 80}]},
    }
    with apiserver.admin() as c:
        assert c.post(f"/api/v1/namespaces/{namespace}/services", json=web).status_code == 201
    for extra in ([], ["--overwrite"]):
        out = cli("cluster", "add", "web", "--external-ip", "192.0.2.10", *extra, *kube,
                  check=False)  # fmt: skip
        assert out.returncode == 1
        line = _one_line(out)
        assert "a Service named 'web' already exists" in line and "is not a cluster" in line
    svc = _services(apiserver, namespace)["web"]
    assert svc["metadata"]["labels"] == {"app": "web"} and "externalIPs" not in svc["spec"]
