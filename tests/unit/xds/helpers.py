"""Test material for the xDS tests: a PKI (ECDSA P-256 CA, one identity per node with
SAN DNS = node id), fleets, and Envoy bootstraps for the observability and downstream
Envoys from atlasd.reconcile's ``envoy_bootstrap`` (tests may import it; atlasd.xds may not).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from atlasd import model
from atlasd.reconcile.desired import envoy_bootstrap
from tests.harness.certs import CA


def identity(ca: CA, node: str) -> model.Identity:
    # The SANs atlasd.reconcile.pki issues: the node id first, then <node>.<ns>.atlas.
    dns = (node, f"{node}.monitoring.atlas")
    server = ca.issue(node, dns=dns, server=True)
    client = ca.issue(node, dns=dns, client=True)
    return model.Identity(
        server=model.CertKey(server.cert_pem, server.key_pem),
        client=model.CertKey(client.cert_pem, client.key_pem),
    )


@dataclass(frozen=True)
class Trust:
    """A test PKI: the shared trust material and one identity per node."""

    pki: model.PKI
    identities: tuple[tuple[str, model.Identity], ...]

    @property
    def trust_bundle(self) -> bytes:
        return self.pki.trust_bundle

    def identity(self, node: str) -> model.Identity | None:
        return dict(self.identities).get(node)

    def with_identities(self, identities: tuple[tuple[str, model.Identity], ...]) -> Trust:
        return dataclasses.replace(self, identities=identities)

    def fleet(
        self,
        clusters: tuple[model.DownstreamCluster, ...] = (),
        alertmanagers: tuple[model.LocalAlertmanager, ...] = (),
        settings: model.Settings | None = None,
    ) -> model.Fleet:
        """A fleet serving ``clusters`` (those this PKI has an identity for)."""
        return model.Fleet.of(
            settings or model.Settings(),
            clusters,
            alertmanagers=alertmanagers,
            pki=self.pki,
            identities=self.identities,
        )


def make_pki(
    nodes: list[str], *, ca: CA | None = None, extra_trust: bytes = b""
) -> tuple[CA, Trust]:
    ca = ca or CA("atlas-test-ca")
    key = b"unused"
    pki = model.PKI(
        ca=model.CertKey(ca.cert_pem, key),
        trust_bundle=ca.cert_pem + extra_trust,
        ca_serial=str(ca.cert.serial_number),
        ca_revision=1,
    )
    return ca, Trust(pki, tuple((n, identity(ca, n)) for n in nodes))


def cluster(
    name: str,
    *,
    replicas: int = 1,
    thanos_port: int = 10901,
    prom_port: int = 9090,
    host: str = "127.0.0.1",
    template: str | None = None,
) -> model.DownstreamCluster:
    return model.DownstreamCluster(
        name=name,
        external_ip="127.0.0.1",
        ports=(model.ServicePort("thanos", 10901),),
        replicas=replicas,
        thanos=model.Upstream(host, thanos_port),
        prometheus=model.Upstream(host, prom_port),
        replica_host_template=template,
    )


def ads_server_cert(ca: CA, host: str = "127.0.0.1") -> model.CertKey:
    """atlasd's ADS server certificate as atlasd.reconcile.pki issues it."""
    pair = ca.issue("atlasd-ads", dns=(model.ADS_SERVER_NAME,), ips=(host,), server=True)
    return model.CertKey(pair.cert_pem, pair.key_pem)


def atlas_bootstrap(
    ads_port: int,
    trust: Trust | None = None,
    *,
    delta: bool = False,
    token: str | None = None,
) -> dict[str, Any]:
    """The observability Envoy's bootstrap, by the product's bootstrap builder: ADS straight
    to atlasd over mTLS with the ``atlas`` client certificate of ``trust`` (as
    ``atlas-envoy-values`` has it), or plaintext without ``trust``; with ``token``, it
    sends the forwarder token."""
    ident = trust.identity(model.OBSERVABILITY_NODE) if trust is not None else None
    return envoy_bootstrap(
        model.OBSERVABILITY_NODE,
        xds_host="127.0.0.1",
        xds_port=ads_port,
        tls=ident,
        ca_bundle=trust.trust_bundle if trust is not None else None,
        chain=trust.pki.chain if trust is not None else b"",
        server_san=model.ADS_SERVER_NAME,
        api_type="DELTA_GRPC" if delta else "GRPC",
        forwarder_token=token,
    )


def downstream_bootstrap(
    node: str,
    ident: model.Identity,
    trust: bytes,
    xds_port: int,
    *,
    delta: bool = False,
    chain: bytes = b"",
) -> dict[str, Any]:
    """A downstream Envoy: ADS over mTLS to the observability Envoy's 10900 (the product's
    bootstrap, as shipped in ``<cluster>-envoy-values``)."""
    return envoy_bootstrap(
        node,
        xds_host="127.0.0.1",
        xds_port=xds_port,
        tls=ident,
        ca_bundle=trust,
        chain=chain,
        api_type="DELTA_GRPC" if delta else "GRPC",
    )
