"""A real etcd + kube-apiserver on loopback, started the way controller-runtime's
envtest starts them: RBAC on, service-account signing keys, a client CA, and an admin
kubeconfig holding a ``system:masters`` client certificate.

No controller-manager runs: no garbage collection, no namespace finalization, no
token controller. ServiceAccount tokens come from the TokenRequest API.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import ssl
import subprocess
from pathlib import Path
from typing import Any

import httpx2
import yaml

from tests.harness import components
from tests.harness.certs import CA, Pair, signing_key_pair
from tests.harness.net import free_port
from tests.harness.procs import Proc
from tests.harness.wait import wait_until


class Etcd:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.client_port = free_port()
        self.peer_port = free_port()
        self.url = f"http://127.0.0.1:{self.client_port}"
        peer = f"http://127.0.0.1:{self.peer_port}"
        self.proc = Proc(
            "etcd",
            [
                str(components.etcd()),
                "--name=default",
                f"--data-dir={workdir / 'etcd-data'}",
                f"--listen-client-urls={self.url}",
                f"--advertise-client-urls={self.url}",
                f"--listen-peer-urls={peer}",
                f"--initial-advertise-peer-urls={peer}",
                f"--initial-cluster=default={peer}",
                "--unsafe-no-fsync=true",
                "--log-level=warn",
            ],
            log_dir=workdir / "logs",
        )

    def start(self) -> None:
        self.proc.start()
        wait_until(self._healthy, timeout=30, what="etcd /health")

    def _healthy(self) -> bool:
        self.proc.check_running()
        r = httpx2.get(f"{self.url}/health", timeout=2)
        return r.status_code == 200 and r.json().get("health") == "true"

    def revision(self) -> int:
        r = httpx2.post(
            f"{self.url}/v3/kv/range",
            json={"key": base64.b64encode(b"/").decode(), "limit": 1},
            timeout=5,
        )
        r.raise_for_status()
        return int(r.json()["header"]["revision"])

    def compact(self) -> int:
        """Compact etcd's history up to the current revision (old watches get 410)."""
        rev = self.revision()
        r = httpx2.post(
            f"{self.url}/v3/kv/compaction",
            json={"revision": str(rev), "physical": True},
            timeout=30,
        )
        r.raise_for_status()
        return rev

    def stop(self) -> None:
        self.proc.stop()


def run_kubectl(
    binary: str | Path, kubeconfig: Path, *args: str, input: str | None = None, check: bool = True
) -> str:
    """``kubectl --kubeconfig=<kubeconfig> args``; its stdout, or RuntimeError with its
    stderr when it fails and ``check``."""
    proc = subprocess.run(
        [str(binary), f"--kubeconfig={kubeconfig}", *args],
        input=input,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if check and proc.returncode != 0:
        raise RuntimeError(f"kubectl {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc.stdout


class ApiServer:
    """etcd + kube-apiserver; ``admin_kubeconfig`` is a kubeconfig file for kubectl/helm."""

    def __init__(
        self,
        workdir: Path,
        *,
        address: str = "127.0.0.1",
        service_cidr: str = "10.0.0.0/24",
        disable_admission: tuple[str, ...] = ("ServiceAccount",),
        authorization: str = "RBAC",
        extra_args: tuple[str, ...] = (),
    ) -> None:
        """``address`` is where kube-apiserver binds and what it advertises (the
        endpoint of the in-cluster ``kubernetes`` Service); the defaults are envtest's.
        A node (tests/harness/node.py) passes an address pods can reach, the
        ServiceAccount admission plugin on and the Node authorizer."""
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.logs = workdir / "logs"
        self.etcd = Etcd(workdir)
        self.address = address
        self.port = free_port()
        self.url = f"https://{address}:{self.port}"
        self.service_cidr = service_cidr
        # The first address of the Service range is the `kubernetes` Service's.
        self.kubernetes_service_ip = str(next(ipaddress.ip_network(service_cidr).hosts()))
        pki = workdir / "pki"
        self.serving_ca = CA("atlasd-test-serving-ca")
        self.client_ca = CA("atlasd-test-client-ca")
        serving = self.serving_ca.issue(
            "kube-apiserver",
            dns=("localhost", "kubernetes", "kubernetes.default"),
            ips=tuple(dict.fromkeys(("127.0.0.1", address, self.kubernetes_service_ip))),
            server=True,
        )
        self.serving_cert, self.serving_key = serving.write(pki, "serving")
        admin = self.client_ca.issue("atlasd-test-admin", orgs=("system:masters",), client=True)
        self.admin_cert, self.admin_key = admin.write(pki, "admin")
        self.serving_ca_path = pki / "serving-ca.crt"
        self.serving_ca_path.write_bytes(self.serving_ca.cert_pem)
        client_ca_path = pki / "client-ca.crt"
        client_ca_path.write_bytes(self.client_ca.cert_pem)
        self.client_ca_path = client_ca_path
        sa_priv, sa_pub = signing_key_pair(pki)
        self.admin_kubeconfig = self._cert_kubeconfig(workdir / "admin.kubeconfig", admin)
        self.proc = Proc(
            "kube-apiserver",
            [
                str(components.kube_apiserver()),
                f"--etcd-servers={self.etcd.url}",
                f"--cert-dir={pki}",
                f"--tls-cert-file={self.serving_cert}",
                f"--tls-private-key-file={self.serving_key}",
                f"--secure-port={self.port}",
                f"--bind-address={address}",
                f"--advertise-address={address}",
                f"--service-cluster-ip-range={service_cidr}",
                f"--authorization-mode={authorization}",
                *(
                    [f"--disable-admission-plugins={','.join(disable_admission)}"]
                    if disable_admission
                    else []
                ),
                "--allow-privileged=true",
                f"--service-account-issuer={self.url}/",
                f"--service-account-key-file={sa_pub}",
                f"--service-account-signing-key-file={sa_priv}",
                f"--client-ca-file={client_ca_path}",
                "--enable-priority-and-fairness=false",
                "--v=1",
                *extra_args,
            ],
            log_dir=self.logs,
        )

    # -- lifecycle -------------------------------------------------------------
    def start(self) -> ApiServer:
        self.etcd.start()
        self.start_apiserver()
        return self

    def start_apiserver(self) -> None:
        self.proc.start()
        wait_until(self._ready, timeout=120, what="kube-apiserver /readyz")
        # RBAC bootstrap roles and the default namespace are created asynchronously.
        wait_until(
            lambda: self.admin().get("/api/v1/namespaces/default").status_code == 200,
            timeout=60,
            what="the default namespace",
        )

    def stop_apiserver(self) -> None:
        # kube-apiserver stops serving at once on SIGTERM but lingers draining watches;
        # it keeps no state of its own, so a KILL after a short grace loses nothing.
        self.proc.stop(timeout=3)

    def restart(self) -> None:
        """Stop and start kube-apiserver on the same port and etcd data."""
        self.stop_apiserver()
        self.start_apiserver()

    def compact_etcd(self) -> int:
        return self.etcd.compact()

    def stop(self) -> None:
        self.proc.stop(timeout=3)
        self.etcd.stop()

    def _ready(self) -> bool:
        self.proc.check_running()
        return self.admin().get("/readyz").status_code == 200

    # -- clients ---------------------------------------------------------------
    def ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.serving_ca_path))
        ctx.load_cert_chain(str(self.admin_cert), str(self.admin_key))
        return ctx

    def admin(self) -> httpx2.Client:
        """A plain httpx2 client with admin credentials (test-side helper, not atlasd's)."""
        return httpx2.Client(base_url=self.url, verify=self.ssl_context(), timeout=30)

    def kubectl(self, *args: str, input: str | None = None, check: bool = True) -> str:
        return run_kubectl("kubectl", self.admin_kubeconfig, *args, input=input, check=check)

    def create_namespace(self, name: str) -> None:
        with self.admin() as c:
            r = c.post(
                "/api/v1/namespaces",
                json={"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}},
            )
            if r.status_code not in (201, 409):
                raise RuntimeError(f"create namespace {name}: {r.status_code} {r.text}")

    def service_account_kubeconfig(
        self,
        name: str,
        namespace: str,
        rules: list[dict[str, Any]],
        *,
        expiration_seconds: int = 3600,
    ) -> Path:
        """Create ServiceAccount ``name`` bound to a Role with ``rules`` in ``namespace``
        and return a kubeconfig holding a token for it (TokenRequest API)."""
        with self.admin() as c:
            for path, body in (
                (
                    f"/api/v1/namespaces/{namespace}/serviceaccounts",
                    {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name}},
                ),
                (
                    f"/apis/rbac.authorization.k8s.io/v1/namespaces/{namespace}/roles",
                    {
                        "apiVersion": "rbac.authorization.k8s.io/v1",
                        "kind": "Role",
                        "metadata": {"name": name},
                        "rules": rules,
                    },
                ),
                (
                    f"/apis/rbac.authorization.k8s.io/v1/namespaces/{namespace}/rolebindings",
                    {
                        "apiVersion": "rbac.authorization.k8s.io/v1",
                        "kind": "RoleBinding",
                        "metadata": {"name": name},
                        "roleRef": {
                            "apiGroup": "rbac.authorization.k8s.io",
                            "kind": "Role",
                            "name": name,
                        },
                        "subjects": [
                            {"kind": "ServiceAccount", "name": name, "namespace": namespace}
                        ],
                    },
                ),
            ):
                r = c.post(path, json=body)
                if r.status_code not in (201, 409):
                    raise RuntimeError(f"POST {path}: {r.status_code} {r.text}")
            token = self.token_for(name, namespace, expiration_seconds=expiration_seconds)
        path = self.workdir / f"sa-{namespace}-{name}.kubeconfig"
        path.write_text(
            yaml.safe_dump(
                _kubeconfig(
                    server=self.url,
                    ca_pem=self.serving_ca.cert_pem,
                    user={"token": token},
                    namespace=namespace,
                )
            )
        )
        path.chmod(0o600)
        return path

    def client_kubeconfig(self, stem: str, cn: str, *, orgs: tuple[str, ...] = ()) -> Path:
        """A kubeconfig holding a client certificate for user ``cn`` in groups ``orgs``."""
        pair = self.client_ca.issue(cn, orgs=orgs, client=True)
        return self._cert_kubeconfig(self.workdir / f"{stem}.kubeconfig", pair)

    def _cert_kubeconfig(self, path: Path, pair: Pair) -> Path:
        path.write_text(
            yaml.safe_dump(
                _kubeconfig(
                    server=self.url,
                    ca_pem=self.serving_ca.cert_pem,
                    user={
                        "client-certificate-data": _b64(pair.cert_pem),
                        "client-key-data": _b64(pair.key_pem),
                    },
                )
            )
        )
        path.chmod(0o600)
        return path

    def token_for(self, name: str, namespace: str, *, expiration_seconds: int = 3600) -> str:
        with self.admin() as c:
            r = c.post(
                f"/api/v1/namespaces/{namespace}/serviceaccounts/{name}/token",
                json={
                    "apiVersion": "authentication.k8s.io/v1",
                    "kind": "TokenRequest",
                    "spec": {"expirationSeconds": expiration_seconds},
                },
            )
            r.raise_for_status()
            return str(r.json()["status"]["token"])


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _kubeconfig(
    *, server: str, ca_pem: bytes, user: dict[str, str], namespace: str | None = None
) -> dict[str, Any]:
    context: dict[str, str] = {"cluster": "harness", "user": "harness"}
    if namespace:
        context["namespace"] = namespace
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "harness",
                "cluster": {"server": server, "certificate-authority-data": _b64(ca_pem)},
            }
        ],
        "users": [{"name": "harness", "user": user}],
        "contexts": [{"name": "harness", "context": context}],
        "current-context": "harness",
    }


def dump(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=True)
