"""Starting ``atlasd run`` as a real process for integration tests."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx2
import yaml

from tests.harness.net import free_port
from tests.harness.procs import Proc
from tests.harness.wait import wait_until

ATLASD = [sys.executable, "-m", "atlasd"]


class Atlasd:
    """One ``atlasd run`` process with its own ports, zone file and log."""

    def __init__(self, workdir: Path, *args: str, ads_port: int | None = None) -> None:
        self.workdir = workdir
        self.http_port = free_port()
        self.ads_port = ads_port or free_port()
        self.zone_file = workdir / "atlas.zone"
        self.args = [
            *ATLASD,
            "run",
            f"--zone-file={self.zone_file}",
            f"--ads-listen=127.0.0.1:{self.ads_port}",
            f"--http-listen=127.0.0.1:{self.http_port}",
            "--atlasd-ads-host=127.0.0.1",
            f"--atlasd-ads-port={self.ads_port}",
            *args,
        ]
        self.proc = Proc(f"atlasd-{self.http_port}", self.args, log_dir=workdir)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self, *, timeout: float = 60) -> Atlasd:
        self.proc.start()
        self.wait_ready(timeout=timeout)
        return self

    def wait_ready(self, *, timeout: float = 60) -> None:
        def ready() -> bool:
            self.proc.check_running()
            return httpx2.get(f"{self.url}/readyz", timeout=2).status_code == 200

        wait_until(ready, timeout=timeout, what="atlasd /readyz")

    def status(self) -> dict[str, Any]:
        doc: dict[str, Any] = httpx2.get(f"{self.url}/status", timeout=5).json()
        return doc

    def log_text(self) -> str:
        return self.proc.log_text()


def cli(
    *args: str, check: bool = True, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the ``atlasd`` CLI; returns the completed process (stdout/stderr as text)."""
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    proc = subprocess.run(
        [*ATLASD, *args], capture_output=True, text=True, timeout=120, env=full_env
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"atlasd {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


def stored_secret_data(apiserver: Any, namespace: str, name: str) -> dict[str, bytes] | None:
    """A Secret's data as the API server holds it, decoded (None: no such Secret).
    ``apiserver``: a ``tests.harness.kube.ApiServer``."""
    with apiserver.admin() as c:
        r = c.get(f"/api/v1/namespaces/{namespace}/secrets/{name}")
    if r.status_code != 200:
        return None
    return {k: base64.b64decode(v) for k, v in (r.json().get("data") or {}).items()}


def values_of(apiserver: Any, namespace: str, name: str) -> bytes | None:
    """The ``values.yaml`` of an Envoy values Secret (None: not written yet)."""
    data = stored_secret_data(apiserver, namespace, name)
    return data.get("values.yaml") if data else None


def values_bootstrap(values: bytes) -> dict[str, Any]:
    """The Envoy bootstrap in Envoy chart values (``files["envoy.yaml"]``)."""
    boot: dict[str, Any] = yaml.safe_load(yaml.safe_load(values)["files"]["envoy.yaml"])
    return boot


def answers_through_chain(cluster: str, port: int = 10904) -> bool:
    """Whether ``/prom/<cluster>/`` answers through the observability Envoy's Prometheus
    listener on this host's ``port`` (observability Envoy -> mTLS -> the cluster's Envoy ->
    its Prometheus)."""
    url = f"http://127.0.0.1:{port}/prom/{cluster}/api/v1/status/buildinfo"
    try:
        return httpx2.get(url, timeout=5).status_code == 200
    except httpx2.HTTPError:
        return False


def join_token(kube: tuple[str, ...], cluster: str) -> str:
    """A join token for ``cluster`` (``atlasd cluster token``), once atlasd has its CA (the
    command refuses before). ``kube``: the ``--kubeconfig``/``--namespace`` options."""
    token = wait_until(
        lambda: (
            (p := cli("cluster", "token", cluster, *kube, check=False)).returncode == 0
            and p.stdout.strip()
        ),
        timeout=30,
        what=f"a join token for {cluster} (once atlasd has its CA)",
    )
    assert isinstance(token, str)
    return token


def served_serials(admin_url: str, cluster: str) -> set[str]:
    """The serials (lowercase hex) of the certificates naming ``cluster`` that the Envoy
    at ``admin_url`` holds now (admin ``/certs``): for an enrolled cluster, its server
    certificate and the client certificate it dials xDS with, both the agent's. An entry's
    order in ``/certs`` is not fixed: a caller looks for one serial in the set."""
    doc = httpx2.get(f"{admin_url}/certs", timeout=5).json()
    return {
        # Envoy prints the serial's bytes (a leading zero kept): normalized through int.
        format(int(str(chain.get("serial_number")), 16), "x")
        for entry in doc.get("certificates", [])
        for chain in entry.get("cert_chain", [])
        if cluster in [s.get("dns") for s in chain.get("subject_alt_names", [])]
    }


def pem_serial(path: Path) -> str:
    """The serial (lowercase hex) of the PEM certificate in ``path``."""
    from cryptography import x509

    return format(x509.load_pem_x509_certificate(path.read_bytes()).serial_number, "x")
