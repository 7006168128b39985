"""The downstream-fleet simulator: per-address server certificates, the observability
Envoy's client certificate required, Thanos Info answered with cluster=<name>."""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import sys
from pathlib import Path

import pytest
from cryptography import x509
from grpclib.client import Channel
from grpclib.exceptions import GRPCError, StreamTerminatedError

from atlasd.model import Identity
from atlasd.thanospb.thanos import info
from tests.harness.net import free_port
from tests.harness.procs import Proc
from tests.harness.wait import wait_until
from tests.unit.xds.helpers import identity, make_ca

pytestmark = pytest.mark.integration

NAMES = ("east", "west", "north")


class Sim:
    def __init__(self, tmp_path: Path, request: pytest.FixtureRequest) -> None:
        self.ca = make_ca()
        self.dir = tmp_path / "sim"
        self.dir.mkdir()
        (self.dir / "ca.pem").write_bytes(self.ca.material.cert_pem)
        self.port = free_port()
        base = 50 + free_port() % 150  # a 127.<base>.0.x block of this run
        self.addresses = {n: f"127.{base}.0.{i + 1}" for i, n in enumerate(NAMES)}
        self.ids: dict[str, Identity] = {n: identity(self.ca, n) for n in (*NAMES, "atlas")}
        clusters = []
        for n in NAMES:
            cert, key = self.dir / f"{n}.pem", self.dir / f"{n}-key.pem"
            cert.write_bytes(self.ids[n].server.cert_pem)
            key.write_bytes(self.ids[n].server.key_pem)
            clusters.append(
                {"name": n, "address": self.addresses[n], "cert": str(cert), "key": str(key)}
            )
        self.spec = self.dir / "spec.json"
        spec = {"ca": str(self.dir / "ca.pem"), "port": self.port, "clusters": clusters}
        self.spec.write_text(json.dumps(spec))
        self.proc = Proc(
            "fleet-sim",
            [sys.executable, "-m", "tests.harness.fleet_sim", str(self.spec), "--duration", "120"],
            log_dir=self.dir,
        )
        request.addfinalizer(self.proc.stop)

    def start(self) -> Sim:
        self.proc.start()
        ready = Path(f"{self.spec}.ready")
        wait_until(
            lambda: self.proc.check_running() or ready.exists(), timeout=30, what="sim ready"
        )
        return self

    def client_context(self, client: str | None) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.dir / "ca.pem"))
        ctx.check_hostname = False  # the SAN is checked by the tests themselves
        ctx.set_alpn_protocols(["h2"])
        if client is not None:
            cert, key = self.dir / f"client-{client}.pem", self.dir / f"client-{client}-key.pem"
            cert.write_bytes(self.ids[client].client.cert_pem)
            key.write_bytes(self.ids[client].client.key_pem)
            ctx.load_cert_chain(cert, key)
        return ctx

    def server_names(self, cluster: str) -> list[str]:
        """DNS SANs of the certificate served on ``cluster``'s address."""
        ctx = self.client_context("atlas")
        with (
            socket.create_connection((self.addresses[cluster], self.port), timeout=5) as raw,
            ctx.wrap_socket(raw) as tls,
        ):
            der = tls.getpeercert(binary_form=True)
        assert der is not None
        cert = x509.load_der_x509_certificate(der)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        return san.get_values_for_type(x509.DNSName)

    def info(self, cluster: str, client: str | None) -> info.InfoResponse:
        async def ask() -> info.InfoResponse:
            channel = Channel(self.addresses[cluster], self.port, ssl=self.client_context(client))
            try:
                return await info.InfoStub(channel).info(info.InfoRequest(), timeout=5)
            finally:
                channel.close()

        return asyncio.run(ask())


def test_each_address_serves_its_clusters_certificate_and_labels(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    sim = Sim(tmp_path, request).start()
    for name in NAMES:
        assert sim.server_names(name)[0] == name
        answer = sim.info(name, "atlas")
        assert [(lb.name, lb.value) for lb in answer.label_sets[0].labels] == [("cluster", name)]
        assert answer.component_type == "sidecar"
        assert answer.store.max_time > answer.store.min_time


def test_only_the_observability_envoy_is_answered(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    sim = Sim(tmp_path, request).start()
    # A downstream cluster's client certificate (same CA) is not the observability Envoy.
    with pytest.raises(GRPCError) as denied:
        sim.info("east", "west")
    assert denied.value.status.name == "PERMISSION_DENIED"
    # No client certificate: the handshake fails.
    with pytest.raises((ssl.SSLError, ConnectionError, StreamTerminatedError, OSError)):
        sim.info("east", None)
    stats = Path(f"{sim.spec}.stats")
    sim.proc.stop()
    assert json.loads(stats.read_text()) == {}  # nothing was answered


def test_refuses_a_non_loopback_address(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    sim = Sim(tmp_path, request)
    spec = json.loads(sim.spec.read_text())
    spec["clusters"][0]["address"] = "192.0.2.10"
    sim.spec.write_text(json.dumps(spec))
    sim.proc.start()
    wait_until(lambda: not sim.proc.running(), timeout=30, what="the simulator to exit")
    assert "is not a loopback address" in sim.proc.log_text()
    assert not Path(f"{sim.spec}.ready").exists()
