"""The downstream values' bootstrap drives a real Envoy: it dials the xDS address over mTLS
with the cluster's own client certificate and accepts only a server named ``atlas``."""

from __future__ import annotations

import datetime as dt
import socket
import ssl
import threading
from pathlib import Path
from typing import Any

import httpx2
import pytest
import yaml
from cryptography import x509

from atlasd.kube.secrets import secret_data
from atlasd.model import CertKey, DownstreamCluster, ServicePort, Settings
from atlasd.reconcile.desired import desired_state
from atlasd.reconcile.pki import PKIPlan, RandomKeys, plan_pki
from tests.harness.wait import wait_until

pytestmark = pytest.mark.integration

NOW = dt.datetime.now(dt.UTC)


class TLSServer:
    """Accepts TLS connections that present a client certificate from ``bundle``;
    records each peer certificate's SAN DNS names."""

    def __init__(self, tmp: Path, server: CertKey, bundle: bytes) -> None:
        (tmp / "srv.crt").write_bytes(server.cert_pem)
        (tmp / "srv.key").write_bytes(server.key_pem)
        (tmp / "bundle.pem").write_bytes(bundle)
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(tmp / "srv.crt", tmp / "srv.key")
        self.ctx.load_verify_locations(tmp / "bundle.pem")
        self.ctx.verify_mode = ssl.CERT_REQUIRED
        self.ctx.set_alpn_protocols(["h2"])
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.sock.settimeout(0.2)
        self.port: int = self.sock.getsockname()[1]
        self.peers: list[set[str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            conn.settimeout(5)
            try:
                with self.ctx.wrap_socket(conn, server_side=True) as tls:
                    der = tls.getpeercert(binary_form=True)
                    if der:
                        cert = x509.load_der_x509_certificate(der)
                        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
                        self.peers.append(set(san.value.get_values_for_type(x509.DNSName)))
            except (ssl.SSLError, OSError):
                conn.close()

    def __enter__(self) -> TLSServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()


CLUSTER = DownstreamCluster(
    name="east", external_ip="203.0.113.1", ports=(ServicePort("thanos", 10901),)
)


def _plan() -> PKIPlan:
    # SANs depend on the xDS address, not on its port: plan first, learn the port later.
    settings = Settings(envoy_ads_address="127.0.0.1")
    return plan_pki(secrets={}, clusters=[CLUSTER], settings=settings, now=NOW, keys=RandomKeys())


def _values_bootstrap(plan: PKIPlan, port: int) -> dict[str, Any]:
    settings = Settings(envoy_ads_address="127.0.0.1", envoy_ads_port=port)
    state = desired_state(clusters=[CLUSTER], alertmanagers=(), plan=plan, settings=settings)
    values = yaml.safe_load(secret_data(state.secrets["east-envoy-values"])["values.yaml"])
    boot: dict[str, Any] = yaml.safe_load(values["files"]["envoy.yaml"])
    return boot


def _stat(admin_url: str, name: str) -> int:
    text = httpx2.get(f"{admin_url}/stats", params={"filter": name}, timeout=5).text
    for line in text.splitlines():
        key, _, value = line.partition(": ")
        if key == name:
            return int(value)
    return 0


def test_downstream_envoy_dials_xds_with_its_own_identity(
    envoy_factory: Any, tmp_path: Path
) -> None:
    plan = _plan()
    atlas = plan.identities["atlas"]
    assert atlas is not None
    with TLSServer(tmp_path, atlas.server, plan.pki.trust_bundle) as srv:
        envoy = envoy_factory(_values_bootstrap(plan, srv.port), "east")
        wait_until(lambda: bool(srv.peers), timeout=30, what="an mTLS handshake from Envoy")
        assert srv.peers[0] == {"east", "east.monitoring.atlas"}
        assert _stat(envoy.admin_url, "cluster.xds_cluster.ssl.fail_verify_san") == 0


def test_downstream_envoy_refuses_a_server_not_named_atlas(
    envoy_factory: Any, tmp_path: Path
) -> None:
    plan = _plan()
    impostor = plan.identities["east"]
    assert impostor is not None
    # A valid certificate of the same CA, but a cluster's, not the observability server's.
    with TLSServer(tmp_path, impostor.server, plan.pki.trust_bundle) as srv:
        envoy = envoy_factory(_values_bootstrap(plan, srv.port), "east")
        wait_until(
            lambda: _stat(envoy.admin_url, "cluster.xds_cluster.ssl.fail_verify_san") > 0,
            timeout=30,
            what="Envoy rejecting the server's SAN",
        )
        assert srv.peers == []
