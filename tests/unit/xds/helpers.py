"""Test material for the xDS tests: a PKI (ECDSA P-256 CA, one identity per node with
SAN DNS = node id), fleets, and Envoy bootstraps for the observability and downstream
Envoys (atlasd.reconcile owns the product's bootstrap; tests must not import it from xds).
"""

from __future__ import annotations

from typing import Any

from atlasd import model
from tests.harness.certs import CA


def identity(ca: CA, node: str) -> model.Identity:
    server = ca.issue(node, dns=(node,), server=True)
    client = ca.issue(node, dns=(node,), client=True)
    return model.Identity(
        server=model.CertKey(server.cert_pem, server.key_pem),
        client=model.CertKey(client.cert_pem, client.key_pem),
    )


def make_pki(
    nodes: list[str], *, ca: CA | None = None, extra_trust: bytes = b""
) -> tuple[CA, model.PKI]:
    ca = ca or CA("atlas-test-ca")
    key = b"unused"
    pki = model.PKI(
        ca=model.CertKey(ca.cert_pem, key),
        trust_bundle=ca.cert_pem + extra_trust,
        ca_serial=str(ca.cert.serial_number),
        ca_revision=1,
        identities=tuple((n, identity(ca, n)) for n in nodes),
    )
    return ca, pki


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


def _ads(api_type: str, cluster_name: str) -> dict[str, Any]:
    return {
        "ads_config": {
            "api_type": api_type,
            "transport_api_version": "V3",
            "set_node_on_first_message_only": True,
            "grpc_services": [{"envoy_grpc": {"cluster_name": cluster_name}}],
        },
        "cds_config": {"ads": {}, "resource_api_version": "V3"},
        "lds_config": {"ads": {}, "resource_api_version": "V3"},
    }


def _h2() -> dict[str, Any]:
    return {
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {}},
        }
    }


def _static(name: str, host: str, port: int) -> dict[str, Any]:
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "2s",
        "typed_extension_protocol_options": _h2(),
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {
                                "address": {"socket_address": {"address": host, "port_value": port}}
                            }
                        }
                    ]
                }
            ],
        },
    }


def atlas_bootstrap(
    ads_port: int, *, delta: bool = False, token: str | None = None
) -> dict[str, Any]:
    """The observability Envoy: ADS straight to atlasd (plaintext, in-cluster)."""
    ads = _ads("DELTA_GRPC" if delta else "GRPC", "atlasd-ads")
    if token:
        ads["ads_config"]["grpc_services"][0]["initial_metadata"] = [
            {"key": "x-atlasd-forwarder-token", "value": token}
        ]
    return {
        "node": {"id": model.OBSERVABILITY_NODE, "cluster": "atlas"},
        "static_resources": {"clusters": [_static("atlasd-ads", "127.0.0.1", ads_port)]},
        "dynamic_resources": ads,
    }


def downstream_bootstrap(
    node: str, ident: model.Identity, trust: bytes, xds_port: int, *, delta: bool = False
) -> dict[str, Any]:
    """A downstream Envoy: ADS over mTLS to the observability Envoy's 10900."""
    xds = _static("atlas-xds", "127.0.0.1", xds_port)
    xds["transport_socket"] = {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            "sni": "atlas",
            "common_tls_context": {
                "alpn_protocols": ["h2"],
                "tls_certificates": [
                    {
                        "certificate_chain": {"inline_bytes": _b64(ident.client.cert_pem)},
                        "private_key": {"inline_bytes": _b64(ident.client.key_pem)},
                    }
                ],
                "validation_context": {
                    "trusted_ca": {"inline_bytes": _b64(trust)},
                    "match_typed_subject_alt_names": [
                        {"san_type": "DNS", "matcher": {"exact": "atlas"}}
                    ],
                },
            },
        },
    }
    return {
        "node": {"id": node, "cluster": node},
        "static_resources": {"clusters": [xds]},
        "dynamic_resources": _ads("DELTA_GRPC" if delta else "GRPC", "atlas-xds"),
    }


def _b64(data: bytes) -> str:
    import base64

    return base64.b64encode(data).decode()
