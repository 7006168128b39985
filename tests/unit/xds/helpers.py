"""Test material for the xDS tests, made by the product's own functions (tests may import
atlasd.reconcile; atlasd.xds may not): a CA as ``atlasd.reconcile.certs.new_ca`` makes one,
identities and the ADS server certificate issued by ``issue_leaf`` from the specs
``atlasd.reconcile.pki`` uses, fleets, and Envoy bootstraps from ``envoy_bootstrap``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from atlasd import labels, model
from atlasd.reconcile.certs import CA, RandomKeys, issue_leaf, key_pem, new_ca
from atlasd.reconcile.desired import envoy_bootstrap
from atlasd.reconcile.pki import LeafSpec, cluster_specs, observability_specs

LIFETIME = dt.timedelta(days=2)


def make_ca(name: str = "atlas-test-ca") -> CA:
    """A CA as atlasd makes one, named ``name`` (so two test CAs are told apart)."""
    now = dt.datetime.now(dt.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert, key = new_ca(keys=RandomKeys(), now=now, lifetime=LIFETIME, name=subject)
    material = model.CertKey(cert.public_bytes(serialization.Encoding.PEM), key_pem(key))
    return CA(cert=cert, key=key, material=material, revision=1)


def issue(ca: CA, spec: LeafSpec) -> model.CertKey:
    return issue_leaf(
        spec, ca=ca, keys=RandomKeys(), now=dt.datetime.now(dt.UTC), lifetime=LIFETIME
    )


def identity(ca: CA, node: str) -> model.Identity:
    """``node``'s identity with the SANs atlasd.reconcile.pki issues a cluster: the node
    id first, then <node>.<namespace>.atlas (the observability node gets the same here:
    the xDS tests need no Envoy addresses in its server certificate)."""
    server, client = cluster_specs(node, model.Settings())
    return model.Identity(server=issue(ca, server), client=issue(ca, client))


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
    ca = ca or make_ca()
    pki = dataclasses.replace(ca.pki, trust_bundle=ca.bundle + extra_trust)
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
    """atlasd's ADS server certificate as atlasd.reconcile.pki issues it for ``host``."""
    spec = observability_specs(model.Settings(atlasd_ads_host=host))[labels.ADS_SECRET]
    return issue(ca, spec)


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
