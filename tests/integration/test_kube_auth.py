"""Authenticating to a real kube-apiserver every way a kubeconfig allows."""

from __future__ import annotations

import base64
import dataclasses
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from atlasd.kube.client import KubeClient
from atlasd.kube.config import load_config, load_in_cluster
from atlasd.kube.errors import Forbidden, TransportError, Unauthorized
from atlasd.kube.resources import CONFIGMAPS, SERVICEACCOUNTS, SERVICES
from tests.harness.kube import ApiServer
from tests.harness.wait import wait_until_async

pytestmark = pytest.mark.integration

CM_RULES = [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list", "create"]}]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _kubeconfig(path: Path, apiserver: ApiServer, user: dict[str, Any], **cluster: Any) -> str:
    cl: dict[str, Any] = {"server": apiserver.url}
    if "certificate-authority" not in cluster and not cluster.get("insecure-skip-tls-verify"):
        cl["certificate-authority-data"] = _b64(apiserver.serving_ca.cert_pem)
    cl.update(cluster)
    doc = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "c", "cluster": cl}],
        "users": [{"name": "u", "user": user}],
        "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
        "current-context": "x",
    }
    path.write_text(yaml.safe_dump(doc))
    return str(path)


async def _whoami(kube: KubeClient) -> str:
    review = await kube.create(
        {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview", "metadata": {}}
    )
    return str(review["status"]["userInfo"]["username"])


def _sa_user(namespace: str, name: str) -> str:
    return f"system:serviceaccount:{namespace}:{name}"


async def test_client_certificate_from_relative_files(apiserver: ApiServer, tmp_path: Path) -> None:
    pair = apiserver.client_ca.issue("cert-user", orgs=("system:masters",), client=True)
    (tmp_path / "certs").mkdir()
    pair.write(tmp_path / "certs", "me")
    (tmp_path / "ca.crt").write_bytes(apiserver.serving_ca.cert_pem)
    path = _kubeconfig(
        tmp_path / "config",
        apiserver,
        {"client-certificate": "certs/me.crt", "client-key": "certs/me.key"},
        **{"certificate-authority": "ca.crt"},
    )
    async with KubeClient(load_config(path)) as kube:
        assert await _whoami(kube) == "cert-user"


async def test_tls_server_name_and_insecure_skip_verify(
    apiserver: ApiServer, tmp_path: Path
) -> None:
    pair = apiserver.client_ca.issue("tls-user", orgs=("system:masters",), client=True)
    user = {"client-certificate-data": _b64(pair.cert_pem), "client-key-data": _b64(pair.key_pem)}
    good = _kubeconfig(tmp_path / "good", apiserver, user, **{"tls-server-name": "kubernetes"})
    async with KubeClient(load_config(good)) as kube:
        assert await _whoami(kube) == "tls-user"
    bad = _kubeconfig(tmp_path / "bad", apiserver, user, **{"tls-server-name": "elsewhere.test"})
    async with KubeClient(load_config(bad)) as kube:
        with pytest.raises(TransportError, match="create selfsubjectreviews"):
            await _whoami(kube)
    insecure = _kubeconfig(
        tmp_path / "insecure", apiserver, user, **{"insecure-skip-tls-verify": True}
    )
    async with KubeClient(load_config(insecure)) as kube:
        assert await _whoami(kube) == "tls-user"


async def test_token_and_limited_service_account_gets_forbidden(
    apiserver: ApiServer, namespace: str
) -> None:
    path = apiserver.service_account_kubeconfig("limited", namespace, CM_RULES)
    async with KubeClient(load_config(str(path))) as kube:
        assert kube.namespace == namespace
        assert await _whoami(kube) == _sa_user(namespace, "limited")
        items, _ = await kube.list(CONFIGMAPS)
        assert isinstance(items, list)
        with pytest.raises(Forbidden) as exc_info:
            await kube.list(SERVICES, namespace=namespace)
        text = str(exc_info.value)
        assert text.startswith(f"list services in namespace {namespace}: Forbidden (403)")
        assert 'cannot list resource "services"' in text
        with pytest.raises(Forbidden, match=r"^delete configmaps .*/x: Forbidden \(403\)"):
            await kube.delete(CONFIGMAPS, "x")


async def test_token_file_rotation(apiserver: ApiServer, namespace: str, tmp_path: Path) -> None:
    apiserver.service_account_kubeconfig("rot1", namespace, CM_RULES)
    apiserver.service_account_kubeconfig("rot2", namespace, CM_RULES)
    apiserver.service_account_kubeconfig("rot3", namespace, CM_RULES)
    token_file = tmp_path / "token"
    token_file.write_text(apiserver.token_for("rot1", namespace))
    path = _kubeconfig(tmp_path / "config", apiserver, {"tokenFile": "token"})
    config = load_config(path)
    async with KubeClient(config) as kube:
        assert await _whoami(kube) == _sa_user(namespace, "rot1")
        # rot1's token dies (its ServiceAccount is gone) and the file is rotated: the 401
        # makes the client re-read the file at once and retry.
        rot1 = token_file.read_text()
        async with KubeClient(load_config(str(apiserver.admin_kubeconfig))) as admin:
            await admin.delete(SERVICEACCOUNTS, "rot1", namespace=namespace)
        # The API server caches token reviews for a few seconds: wait until it says 401.
        static = _kubeconfig(tmp_path / "static", apiserver, {"token": rot1})
        async with KubeClient(load_config(static)) as probe:

            async def rejected() -> bool:
                try:
                    await _whoami(probe)
                except Unauthorized:
                    return True
                return False

            await wait_until_async(rejected, timeout=60, what="rot1's token to be rejected")
        token_file.write_text(apiserver.token_for("rot2", namespace))
        assert await _whoami(kube) == _sa_user(namespace, "rot2")

    # Without any 401, a rotated file is picked up once the re-read period has passed.
    fast = dataclasses.replace(config, token_reread_seconds=0.0)
    async with KubeClient(fast) as kube:
        assert await _whoami(kube) == _sa_user(namespace, "rot2")
        token_file.write_text(apiserver.token_for("rot3", namespace))
        assert await _whoami(kube) == _sa_user(namespace, "rot3")


async def test_bad_static_token_is_unauthorized(apiserver: ApiServer, tmp_path: Path) -> None:
    path = _kubeconfig(tmp_path / "config", apiserver, {"token": "not-a-real-token"})
    async with KubeClient(load_config(path)) as kube:
        with pytest.raises(Unauthorized) as exc_info:
            await kube.list(CONFIGMAPS, namespace="default")
    assert "not-a-real-token" not in str(exc_info.value)
    assert "list configmaps in namespace default: Unauthorized (401)" in str(exc_info.value)


def _plugin(tmp_path: Path, outputs: list[dict[str, Any]]) -> Path:
    """An exec plugin that prints outputs[n] on its n-th run (the last one repeats)."""
    data = tmp_path / "outputs.yaml"
    data.write_text(yaml.safe_dump(outputs))
    script = tmp_path / "plugin.py"
    script.write_text(
        f"""
import json, os, pathlib, sys
import yaml
outs = yaml.safe_load(pathlib.Path({str(data)!r}).read_text())
counter = pathlib.Path({str(tmp_path / "runs")!r})
n = int(counter.read_text()) if counter.exists() else 0
counter.write_text(str(n + 1))
info = json.loads(os.environ["KUBERNETES_EXEC_INFO"])
status = outs[min(n, len(outs) - 1)]
print(json.dumps({{"apiVersion": info["apiVersion"], "kind": "ExecCredential", "status": status}}))
"""
    )
    return script


@pytest.mark.parametrize(
    "api_version", ["client.authentication.k8s.io/v1", "client.authentication.k8s.io/v1beta1"]
)
async def test_exec_plugin_token_rerun_on_401(
    apiserver: ApiServer, namespace: str, tmp_path: Path, api_version: str
) -> None:
    apiserver.service_account_kubeconfig("execsa", namespace, CM_RULES)
    token = apiserver.token_for("execsa", namespace)
    script = _plugin(
        tmp_path,
        [
            {"token": "stale-token", "expirationTimestamp": "2099-01-01T00:00:00Z"},
            {"token": token, "expirationTimestamp": "2099-01-01T00:00:00Z"},
        ],
    )
    exec_ = {"apiVersion": api_version, "command": sys.executable, "args": [str(script)]}
    if api_version.endswith("/v1"):
        exec_["interactiveMode"] = "Never"
    path = _kubeconfig(tmp_path / "config", apiserver, {"exec": exec_})
    async with KubeClient(load_config(path)) as kube:
        assert await _whoami(kube) == _sa_user(namespace, "execsa")
        assert kube.credentials.exec_runs == 2  # stale token -> 401 -> re-run
        await _whoami(kube)
        assert kube.credentials.exec_runs == 2  # cached until expiry


async def test_exec_plugin_client_certificate(apiserver: ApiServer, tmp_path: Path) -> None:
    first = apiserver.client_ca.issue("exec-cert-1", orgs=("system:masters",), client=True)
    second = apiserver.client_ca.issue("exec-cert-2", orgs=("system:masters",), client=True)
    script = _plugin(
        tmp_path,
        [
            {
                "clientCertificateData": first.cert_pem.decode(),
                "clientKeyData": first.key_pem.decode(),
                "expirationTimestamp": "2000-01-01T00:00:00Z",  # already expired
            },
            {
                "clientCertificateData": second.cert_pem.decode(),
                "clientKeyData": second.key_pem.decode(),
            },
        ],
    )
    exec_ = {
        "apiVersion": "client.authentication.k8s.io/v1",
        "command": sys.executable,
        "args": [str(script)],
        "interactiveMode": "Never",
    }
    path = _kubeconfig(tmp_path / "config", apiserver, {"exec": exec_})
    async with KubeClient(load_config(path)) as kube:
        assert await _whoami(kube) == "exec-cert-1"
        # Expired: the plugin runs again and the new certificate is presented.
        assert await _whoami(kube) == "exec-cert-2"
        assert await _whoami(kube) == "exec-cert-2"
        assert kube.credentials.exec_runs == 2


async def test_in_cluster_service_account(
    apiserver: ApiServer, namespace: str, tmp_path: Path
) -> None:
    apiserver.service_account_kubeconfig("incluster", namespace, CM_RULES)
    sa_dir = tmp_path / "serviceaccount"
    sa_dir.mkdir()
    (sa_dir / "token").write_text(apiserver.token_for("incluster", namespace))
    (sa_dir / "ca.crt").write_bytes(apiserver.serving_ca.cert_pem)
    (sa_dir / "namespace").write_text(namespace)
    config = load_in_cluster(
        sa_dir=sa_dir,
        environ={
            "KUBERNETES_SERVICE_HOST": "127.0.0.1",
            "KUBERNETES_SERVICE_PORT": str(apiserver.port),
        },
    )
    async with KubeClient(dataclasses.replace(config, token_reread_seconds=0.0)) as kube:
        assert kube.namespace == namespace
        assert await _whoami(kube) == _sa_user(namespace, "incluster")
        items, _ = await kube.list(CONFIGMAPS)
        assert isinstance(items, list)
        # The kubelet rotates the projected token: the new one is read.
        apiserver.service_account_kubeconfig("incluster2", namespace, CM_RULES)
        (sa_dir / "token").write_text(apiserver.token_for("incluster2", namespace))
        assert await _whoami(kube) == _sa_user(namespace, "incluster2")
