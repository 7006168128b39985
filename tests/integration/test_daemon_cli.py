"""The CLI against the real API server, with ``atlasd run`` reconciling behind it."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.harness.kube import ApiServer
from tests.harness.wait import wait_until
from tests.integration.daemon_helpers import Atlasd, cli

pytestmark = pytest.mark.integration


@pytest.fixture
def daemon(apiserver: ApiServer, namespace: str, tmp_path: Path) -> Iterator[Atlasd]:
    atlasd = Atlasd(
        tmp_path,
        f"--kubeconfig={apiserver.admin_kubeconfig}",
        f"--namespace={namespace}",
        "--no-leader-election",
    ).start()
    try:
        yield atlasd
    finally:
        atlasd.proc.stop()


def _secret(apiserver: ApiServer, namespace: str, name: str) -> dict[str, object] | None:
    with apiserver.admin() as c:
        r = c.get(f"/api/v1/namespaces/{namespace}/secrets/{name}")
        return r.json() if r.status_code == 200 else None


def test_add_list_values_remove(apiserver: ApiServer, namespace: str, daemon: Atlasd) -> None:
    kube = [f"--kubeconfig={apiserver.admin_kubeconfig}", f"--namespace={namespace}"]
    out = cli("cluster", "add", "east", "--external-ip", "192.0.2.10", *kube)
    assert out.stdout.strip() == "cluster east created"

    again = cli("cluster", "add", "east", "--external-ip", "192.0.2.10", *kube, check=False)
    assert again.returncode == 1 and "--overwrite" in again.stderr

    out = cli(
        "cluster",
        "add",
        "east",
        "--external-ip",
        "192.0.2.10",
        "--replicas",
        "2",
        "--overwrite",
        *kube,
    )
    assert out.stdout.strip() == "cluster east updated"

    rows = json.loads(cli("cluster", "list", "-o", "json", *kube).stdout)
    assert rows == [{"name": "east", "external_ip": "192.0.2.10", "replicas": "2", "problem": ""}]
    table = cli("cluster", "list", *kube).stdout
    assert "east" in table and "192.0.2.10" in table

    secret = wait_until(
        lambda: _secret(apiserver, namespace, "east-envoy-values"),
        timeout=30,
        what="east-envoy-values written by the daemon",
    )
    stored = base64.b64decode(secret["data"]["values.yaml"]).decode()  # type: ignore[index]
    stored_values = yaml.safe_load(stored)

    raw = cli("cluster", "values", "east", "--format", "raw", *kube).stdout
    assert yaml.safe_load(raw) == stored_values

    chart = yaml.safe_load(cli("cluster", "values", "east", "--format", "helm-chart", *kube).stdout)
    assert chart["apiVersion"] == "helm.cattle.io/v1" and chart["kind"] == "HelmChart"
    assert yaml.safe_load(chart["spec"]["valuesContent"]) == stored_values

    docs = [
        d
        for d in yaml.safe_load_all(
            cli("cluster", "values", "east", "--format", "helm-release", *kube).stdout
        )
        if d
    ]
    kinds = {d["kind"]: d for d in docs}
    assert set(kinds) == {"HelmRepository", "HelmRelease"}
    assert kinds["HelmRelease"]["spec"]["values"] == stored_values

    # Both sidecar Services exist for replicas=2.
    def sidecars() -> set[str]:
        with apiserver.admin() as c:
            items = c.get(f"/api/v1/namespaces/{namespace}/services").json()["items"]
        return {
            i["metadata"]["name"]
            for i in items
            if i["metadata"]["name"].startswith("east-thanos-sidecar")
        }

    wait_until(
        lambda: sidecars() == {"east-thanos-sidecar0", "east-thanos-sidecar1"},
        timeout=30,
        what="two sidecar Services",
    )

    status = json.loads(cli("status", "--url", daemon.url, "-o", "json").stdout)
    assert [c["name"] for c in status["clusters"]] == ["east"]
    assert "east" in cli("status", "--url", daemon.url).stdout

    assert cli("cluster", "remove", "east", *kube).stdout.strip() == "cluster east removed"
    wait_until(
        lambda: _secret(apiserver, namespace, "east-envoy-values") is None and not sidecars(),
        timeout=30,
        what="everything made for east removed",
    )
    gone = cli("cluster", "remove", "east", *kube, check=False)
    assert gone.returncode == 1 and "no cluster named 'east'" in gone.stderr
    missing = cli("cluster", "values", "east", *kube, check=False)
    assert missing.returncode == 1 and "no cluster named 'east'" in missing.stderr


@pytest.mark.parametrize(
    ("args", "code", "needle"),
    [
        (["cluster", "add", "x", "--external-ip", "not-an-ip"], 1, "spec.externalIPs[0]"),
        (["cluster", "add", "x", "--external-ip", "127.0.0.1"], 1, "loopback"),
        (["cluster", "add", "atlas", "--external-ip", "192.0.2.1"], 1, "atlas"),
        (["cluster", "add", "x", "--external-ip", "192.0.2.1", "--replicas", "0"], 2, "--replicas"),
        (["cluster", "add", "x", "--external-ip", "192.0.2.1", "--port", "thanos"], 2, "NAME=PORT"),
        (["cluster", "add", "x"], 2, "--external-ip"),
        (["cluster", "values", "x", "--format", "xml"], 2, "--format"),
    ],
)
def test_bad_arguments_name_the_field(
    apiserver: ApiServer, namespace: str, args: list[str], code: int, needle: str
) -> None:
    out = cli(
        *args, f"--kubeconfig={apiserver.admin_kubeconfig}", f"--namespace={namespace}", check=False
    )
    assert out.returncode == code, out.stderr
    assert needle in out.stderr
    # Nothing was written.
    with apiserver.admin() as c:
        items = c.get(f"/api/v1/namespaces/{namespace}/services").json()["items"]
    assert items == []


def test_unreachable_api_server_is_a_clear_error(unreachable_kubeconfig: Path) -> None:
    kubeconfig = unreachable_kubeconfig
    out = cli("cluster", "list", f"--kubeconfig={kubeconfig}", check=False)
    assert out.returncode == 1
    assert out.stderr.startswith("error:") and "Traceback" not in out.stderr
