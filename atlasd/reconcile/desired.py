"""Desired Kubernetes objects for the fleet: sidecar Services, Helm values, Envoy bootstraps.

Pure: validated clusters + the PKI plan + settings -> the Services and Secrets atlasd wants.

Per downstream cluster ``<c>`` (labels ``app.kubernetes.io/managed-by: atlasd`` and
``goatlas.io/owner-cluster: <c>``, ownerReference to the cluster Service):

- ``<c>-thanos-sidecar<i>`` for i in 0..replicas-1: headless Service (clusterIP None),
  selector = the cluster's envoy selectors (so the name resolves to the observability
  Envoy), the cluster Service's ports copied (targetPort = port), label
  ``goatlas.io/thanos-sidecar: "<i>"``;
- ``<c>-envoy-values`` (key ``values.yaml``): values for ``charts/envoy`` on the downstream
  cluster, keeping the original chart's keys — ``atlas.alertmanagerCount``,
  ``replicaCount``, ``args``, ``service.ports``, ``ports`` and ``files`` (``envoy.yaml``,
  ``ca.pem``, ``server.pem``, ``server-key.pem``, ``client.pem``, ``client-key.pem``);
  for an **enrolled** cluster (``DownstreamCluster.enrolled``) the same keys but no key,
  certificate or bundle in ``files`` (only ``envoy.yaml``, whose xDS TLS reads the agent's
  files), plus ``agent`` (``enabled``, ``cluster``, ``namespace``, ``server``,
  ``certDir``) for the envoy chart's ``atlasd agent`` (docs/interface.md);
- ``<c>-atlas-identity`` (built by ``pki``; none for an enrolled cluster).

Cluster-wide: ``atlas-envoy-values`` (observability Envoy, node ``atlas``: xDS over mTLS
to atlasd's ADS Service with the ``atlas`` client certificate, atlasd's server pinned to
SAN ``model.ADS_SERVER_NAME``, plus the forwarder token when one is configured) plus the
PKI Secrets from ``pki``.

``envoy_bootstrap`` is the one bootstrap builder (daemon demo and xDS tests use it too):
node id, ADS (SotW ``GRPC`` by default, V3, node on first message only) to one static
cluster ``xds_cluster`` over HTTP/2, mTLS when an identity is given (client certificate of
that identity followed by the cross-signed chain, server validated against the CA bundle
and pinned to a SAN: ``atlas`` by default), certificates inline so the bootstrap needs no
files — or, with ``sds_dir``, the client certificate and the bundle by SDS from the files
``atlasd agent`` writes there (``atlasd.certdir``), reloaded when it renews; admin on
127.0.0.1.
"""

from __future__ import annotations

import functools
from collections.abc import Collection, Hashable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import msgspec
import yaml

from atlasd import certdir, labels
from atlasd.addresses import is_ip_literal
from atlasd.kube import bodies
from atlasd.memo import Memo
from atlasd.model import (
    ADS_SERVER_NAME,
    DOWNSTREAM_ALERTMANAGER_PORT,
    DOWNSTREAM_PROMETHEUS_PORT,
    DOWNSTREAM_THANOS_PORT,
    ENVOY_ADMIN_PORT,
    OBS_ALERTMANAGER_PORT,
    OBS_PROMETHEUS_PORT,
    OBS_THANOS_PORT,
    OBS_XDS_PORT,
    OBSERVABILITY_NODE,
    PKI,
    DownstreamCluster,
    Fleet,
    Identity,
    LocalAlertmanager,
    Settings,
)
from atlasd.reconcile.objects import (
    ObjectMeta,
    SecretObject,
    ServiceObject,
    managed_labels,
    owner_references,
    secret_object,
)
from atlasd.reconcile.pki import PKIPlan

XDS_CLUSTER = "xds_cluster"
VALUES_KEY = "values.yaml"
ENVOY_ARGS = ("-l", "info", "-c", "/config/envoy.yaml")


try:  # libyaml's emitter is ~10x faster; 1,000 clusters mean 2,000 documents a pass.
    from yaml import CSafeDumper as _SafeDumper
except ImportError:  # pragma: no cover - PyYAML built without libyaml
    from yaml import SafeDumper as _SafeDumper  # type: ignore[assignment]


class _BlockDumper(_SafeDumper):
    """Multi-line strings (PEM, embedded YAML) as literal blocks, for readable values."""


def _str_representer(dumper: _SafeDumper, data: str) -> yaml.ScalarNode:
    style = "|" if "\n" in data else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)


_BlockDumper.add_representer(str, _str_representer)


def _dump(data: Any) -> str:
    return yaml.dump(data, Dumper=_BlockDumper, sort_keys=False, default_flow_style=False)


# Top-level entries of YAML documents that many documents hold alike, as YAML, by (key,
# the value's JSON). Only entries named ``shared`` (never key material) are kept.
_SHARED_YAML: Memo[tuple[str, bytes], str] = Memo(1024)


def dump_yaml(data: Any, *, shared: Collection[str] = ()) -> str:
    """Deterministic YAML (insertion order kept).

    ``shared``: top-level keys of the mapping ``data`` whose entries many documents hold
    alike (a downstream Envoy's values and bootstrap are mostly the same for every
    cluster); each such entry is dumped once per distinct value and its text reused. The
    result is the same text: a block mapping's top-level entries are dumped one after
    another (unless one ends its document or holds an anchor: then the whole is dumped
    once, as without ``shared``). Building a cluster's values Secret took 0.67-0.71 ms,
    now 0.42-0.43 (bench/README.md, issue 25)."""
    if not shared:
        return _dump(data)
    parts: list[str] = []
    run: dict[str, Any] = {}  # consecutive entries not shared, dumped together
    for key, value in data.items():
        if key not in shared:
            run[key] = value
            continue
        if run:
            parts.append(_dump(run))
            run = {}
        make = functools.partial(_dump, {key: value})
        parts.append(_SHARED_YAML.get((key, msgspec.json.encode(value)), make))
    if run:
        parts.append(_dump(run))
    if len(parts) > 1 and any(p.endswith("\n...\n") or "&id0" in p for p in parts):
        # An entry that ended its document ("..." after a block scalar keeping its final
        # newlines) or named an anchor: one dump of the whole is the text.
        return _dump(data)
    return "".join(parts)


# What of a downstream Envoy's bootstrap and values is alike for every cluster (for equal
# settings and Alertmanager count): ``dump_yaml``'s ``shared``.
_BOOTSTRAP_SHARED = frozenset({"admin", "stats_flush_on_admin", "dynamic_resources"})
_VALUES_SHARED = frozenset({"atlas", "replicaCount", "args", "service", "ports"})


def envoy_bootstrap(
    node: str,
    *,
    xds_host: str,
    xds_port: int,
    tls: Identity | None,
    ca_bundle: bytes | None,
    admin_port: int = ENVOY_ADMIN_PORT,
    api_type: str = "GRPC",
    server_san: str = OBSERVABILITY_NODE,
    forwarder_token: str | None = None,
    chain: bytes = b"",
    sds_dir: str | None = None,
) -> dict[str, Any]:
    """An Envoy v3 bootstrap whose only static cluster is the xDS server (see docstring):
    mTLS with ``tls`` inline, or with ``sds_dir`` from the agent's files there."""
    xds: dict[str, Any] = {
        "name": XDS_CLUSTER,
        "type": "STATIC" if is_ip_literal(xds_host) else "STRICT_DNS",
        "connect_timeout": "5s",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        },
        "load_assignment": {
            "cluster_name": XDS_CLUSTER,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {
                                "address": {
                                    "socket_address": {"address": xds_host, "port_value": xds_port}
                                }
                            }
                        }
                    ]
                }
            ],
        },
    }
    if tls is not None and sds_dir is not None:
        raise ValueError("an mTLS bootstrap takes its certificates inline or from files, not both")
    sans = [{"san_type": "DNS", "matcher": {"exact": server_san}}]
    common: dict[str, Any] | None = None
    if tls is not None:
        if ca_bundle is None:
            raise ValueError("an mTLS bootstrap needs the CA bundle")
        common = {
            "alpn_protocols": ["h2"],
            "tls_certificates": [
                {
                    "certificate_chain": {"inline_string": (tls.client.cert_pem + chain).decode()},
                    "private_key": {"inline_string": tls.client.key_pem.decode()},
                }
            ],
            "validation_context": {
                "trusted_ca": {"inline_string": ca_bundle.decode()},
                "match_typed_subject_alt_names": sans,
            },
        }
    elif sds_dir is not None:
        # The agent's client certificate and the bundle it keeps current; the SAN pin stays
        # here (Envoy merges the two validation contexts).
        common = {
            "alpn_protocols": ["h2"],
            "tls_certificate_sds_secret_configs": [
                {"name": "client", "sds_config": certdir.sds_config(sds_dir, "client")}
            ],
            "combined_validation_context": {
                "default_validation_context": {"match_typed_subject_alt_names": sans},
                "validation_context_sds_secret_config": {
                    "name": certdir.VALIDATION,
                    "sds_config": certdir.sds_config(sds_dir, certdir.VALIDATION),
                },
            },
        }
    if common is not None:
        xds["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "sni": server_san,
                "common_tls_context": common,
            },
        }
    return {
        "node": {"id": node, "cluster": node},
        "admin": {
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}
        },
        # No periodic stats flush (by default every 5 s): it runs on the main thread, which
        # also applies xDS, and with 5,000 clusters it took 50-90 ms even idle, so a config
        # push that arrived meanwhile waited. There are no stats sinks to flush to; with
        # this, a query of the admin interface (loopback only) flushes instead.
        "stats_flush_on_admin": True,
        "dynamic_resources": {
            "ads_config": {
                "api_type": api_type,
                "transport_api_version": "V3",
                "set_node_on_first_message_only": True,
                "grpc_services": [
                    {
                        "envoy_grpc": {"cluster_name": XDS_CLUSTER},
                        **(
                            {
                                "initial_metadata": [
                                    {"key": labels.FORWARDER_TOKEN_HEADER, "value": forwarder_token}
                                ]
                            }
                            if forwarder_token
                            else {}
                        ),
                    }
                ],
            },
            "cds_config": {"resource_api_version": "V3", "ads": {}},
            "lds_config": {"resource_api_version": "V3", "ads": {}},
        },
        "static_resources": {"clusters": [xds]},
    }


def _chart_ports(named: Iterable[tuple[str, int, bool]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(service.ports, ports) of the Envoy chart for (name, port, in_service) triples: every
    port is a container port, those with ``in_service`` are also ports of the chart's
    Service; the others are ``null`` there, which removes the chart's default entry of
    that name (helm drops a null key when it merges values). No ``hostPort``: Pod Security
    ``baseline`` (hence ``restricted``) forbids it."""
    service: dict[str, Any] = {}
    ports: dict[str, Any] = {"admin": {"containerPort": ENVOY_ADMIN_PORT, "protocol": "TCP"}}
    for name, port, in_service in named:
        service[name] = (
            {"port": port, "targetPort": name, "protocol": "TCP"} if in_service else None
        )
        ports[name] = {"containerPort": port, "protocol": "TCP"}
    return service, ports


def downstream_values(
    cluster: DownstreamCluster,
    *,
    identity: Identity | None,
    ca_bundle: bytes,
    chain: bytes = b"",
    settings: Settings,
    alertmanager_count: int,
) -> dict[str, Any]:
    """Helm values for the Envoy chart on downstream cluster ``cluster``: with its keys
    (compatible mode, ``identity`` required), or for its agent (enrolled: no key, no
    certificate; ``identity`` ignored)."""
    service_ports, ports = _chart_ports(
        [
            ("thanos", DOWNSTREAM_THANOS_PORT, True),
            # The alert relay is plaintext and for the local Prometheus only: the chart's
            # headless alertmanager<i> Services reach it, the LoadBalancer does not.
            ("alertmanager", DOWNSTREAM_ALERTMANAGER_PORT, False),
            ("prometheus", DOWNSTREAM_PROMETHEUS_PORT, True),
        ]
    )
    values: dict[str, Any] = {
        "atlas": {"alertmanagerCount": alertmanager_count},
        "replicaCount": 1,
        "args": list(ENVOY_ARGS),
        # 11901/11904 are dialed from the observability cluster: a LoadBalancer Service
        # (its address goes into the cluster Service's externalIPs), not hostPorts, which
        # Pod Security baseline/restricted refuse (docs/charts.md, "Exposing a downstream
        # Envoy").
        "service": {"enabled": True, "type": "LoadBalancer", "ports": service_ports},
        "ports": ports,
    }
    if cluster.enrolled:
        return values | enrolled_values(cluster, settings=settings)
    if identity is None:
        raise ValueError(f"cluster {cluster.name!r} is not enrolled: its values need its keys")
    bootstrap = envoy_bootstrap(
        cluster.name,
        xds_host=settings.envoy_ads_address,
        xds_port=settings.envoy_ads_port,
        tls=identity,
        ca_bundle=ca_bundle,
        chain=chain,
    )
    values["files"] = {
        "envoy.yaml": dump_yaml(bootstrap, shared=_BOOTSTRAP_SHARED),
        "ca.pem": ca_bundle.decode(),
        "server.pem": (identity.server.cert_pem + chain).decode(),
        "server-key.pem": identity.server.key_pem.decode(),
        "client.pem": (identity.client.cert_pem + chain).decode(),
        "client-key.pem": identity.client.key_pem.decode(),
    }
    return values


def enrolled_values(cluster: DownstreamCluster, *, settings: Settings) -> dict[str, Any]:
    """What an enrolled cluster's values hold beyond the common keys: ``agent`` (what the
    envoy chart's ``atlasd agent`` is started with; the join token is never here, the
    operator gives it at install) and a bootstrap whose xDS TLS reads the agent's files.
    No key, no certificate, no bundle: the agent fetches the bundle itself (pinned by its
    token) and makes the keys."""
    cert_dir = settings.agent_cert_dir
    bootstrap = envoy_bootstrap(
        cluster.name,
        xds_host=settings.envoy_ads_address,
        xds_port=settings.envoy_ads_port,
        tls=None,
        ca_bundle=None,
        sds_dir=cert_dir,
    )
    return {
        "agent": {
            "enabled": True,
            "cluster": cluster.name,
            "namespace": settings.namespace,
            "server": settings.enroll_address,
            "certDir": cert_dir,
        },
        "files": {"envoy.yaml": dump_yaml(bootstrap, shared=_BOOTSTRAP_SHARED)},
    }


def observability_values(settings: Settings, *, identity: Identity, pki: PKI) -> dict[str, Any]:
    """Helm values for the observability Envoy: node ``atlas``, xDS over mTLS to atlasd's
    ADS server with the ``atlas`` client certificate (the forwarder identity, see
    docs/xds-authorization.md), the server pinned to ``ADS_SERVER_NAME``."""
    bootstrap = envoy_bootstrap(
        OBSERVABILITY_NODE,
        xds_host=settings.atlasd_ads_host,
        xds_port=settings.atlasd_ads_port,
        tls=identity,
        ca_bundle=pki.trust_bundle,
        chain=pki.chain,
        server_san=ADS_SERVER_NAME,
        forwarder_token=settings.forwarder_token,
    )
    service_ports, ports = _chart_ports(
        [
            ("xds", OBS_XDS_PORT, True),
            ("thanos", OBS_THANOS_PORT, True),
            ("alertmanager", OBS_ALERTMANAGER_PORT, True),
            ("prometheus", OBS_PROMETHEUS_PORT, True),
        ]
    )
    return {
        "atlas": {"alertmanagerCount": 0},
        "replicaCount": 1,
        "args": list(ENVOY_ARGS),
        "service": {"enabled": True, "ports": service_ports},
        "ports": ports,
        "files": {"envoy.yaml": dump_yaml(bootstrap)},
    }


def sidecar_services(cluster: DownstreamCluster, settings: Settings) -> list[ServiceObject]:
    """The headless ``<c>-thanos-sidecar<i>`` Services of one cluster."""
    out: list[ServiceObject] = []
    for i in range(cluster.replicas):
        meta: ObjectMeta = {
            "name": cluster.sidecar_service(i),
            "namespace": settings.namespace,
            "labels": managed_labels(cluster.name, **{labels.THANOS_SIDECAR_LABEL: str(i)}),
        }
        refs = owner_references(cluster)
        if refs:
            meta["ownerReferences"] = refs
        out.append(
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": meta,
                "spec": {
                    "clusterIP": "None",
                    "selector": dict(cluster.envoy_selectors),
                    "ports": [
                        {
                            "name": p.name,
                            "port": p.port,
                            "protocol": p.protocol,
                            "targetPort": p.port,
                        }
                        for p in cluster.ports
                    ],
                },
            }
        )
    return out


def values_secret(
    cluster: DownstreamCluster,
    *,
    identity: Identity | None,
    ca_bundle: bytes,
    chain: bytes = b"",
    ca_serial: str,
    settings: Settings,
    alertmanager_count: int,
) -> SecretObject:
    """``<c>-envoy-values``: the downstream Envoy chart's values for ``cluster``."""
    values = downstream_values(
        cluster,
        identity=identity,
        ca_bundle=ca_bundle,
        chain=chain,
        settings=settings,
        alertmanager_count=alertmanager_count,
    )
    # An enrolled cluster's values hold nothing the CA signed: a rotation leaves them be.
    signed = {} if cluster.enrolled else {labels.CA_SIGNED_LABEL: ca_serial}
    return secret_object(
        name=labels.values_secret_name(cluster.name),
        namespace=settings.namespace,
        data={VALUES_KEY: dump_yaml(values, shared=_VALUES_SHARED).encode()},
        obj_labels=managed_labels(cluster.name, **signed),
        owner_refs=owner_references(cluster),
    )


def observability_values_secret(
    settings: Settings, *, identity: Identity, pki: PKI
) -> SecretObject:
    """``atlas-envoy-values``: the observability Envoy chart's values (they hold the
    ``atlas`` client key)."""
    return secret_object(
        name=labels.OBS_VALUES_SECRET,
        namespace=settings.namespace,
        data={
            VALUES_KEY: dump_yaml(
                observability_values(settings, identity=identity, pki=pki)
            ).encode()
        },
        obj_labels=managed_labels(**{labels.CA_SIGNED_LABEL: pki.ca_serial}),
    )


def objects_inputs(cluster: DownstreamCluster) -> Hashable:
    """What of a cluster its desired objects depend on (its external IP and upstreams are
    served over xDS, not written): equal inputs, equal objects."""
    return (
        cluster.name,
        cluster.ports,
        cluster.replicas,
        cluster.envoy_selectors,
        cluster.enrolled,
        cluster.source.uid if cluster.source is not None else "",
    )


@dataclass(frozen=True)
class ClusterObjects:
    """What atlasd makes exist for one cluster: its sidecar Services and its Secrets
    (``<c>-envoy-values`` and, unless it is enrolled, ``<c>-atlas-identity``), by name."""

    services: Mapping[str, ServiceObject]
    secrets: Mapping[str, SecretObject]


def cluster_objects(
    cluster: DownstreamCluster,
    *,
    identity: Identity | None,
    identity_secret: SecretObject | None,
    ca_bundle: bytes,
    chain: bytes = b"",
    ca_serial: str,
    settings: Settings,
    alertmanager_count: int,
) -> ClusterObjects:
    values = values_secret(
        cluster,
        identity=identity,
        ca_bundle=ca_bundle,
        chain=chain,
        ca_serial=ca_serial,
        settings=settings,
        alertmanager_count=alertmanager_count,
    )
    secrets = {bodies.name(values): values}
    if identity_secret is not None and not cluster.enrolled:
        secrets[bodies.name(identity_secret)] = identity_secret
    return ClusterObjects(
        services={bodies.name(s): s for s in sidecar_services(cluster, settings)},
        secrets=secrets,
    )


@dataclass(frozen=True)
class DesiredState:
    """Everything the applier makes exist for a whole fleet (``atlas-ca`` is written
    separately, first)."""

    fleet: Fleet
    ca_secret: SecretObject
    services: Mapping[str, ServiceObject]
    secrets: Mapping[str, SecretObject]


def desired_state(
    *,
    clusters: Iterable[DownstreamCluster],
    alertmanagers: tuple[LocalAlertmanager, ...],
    plan: PKIPlan,
    settings: Settings,
) -> DesiredState:
    """The whole desired state at once: ``cluster_objects`` of every cluster plus the
    fleet-wide Secrets (the daemon builds the same objects key by key)."""
    clusters = tuple(sorted(clusters, key=lambda c: c.name))
    services: dict[str, ServiceObject] = {}
    secrets: dict[str, SecretObject] = {}
    for s in plan.tls_secrets:
        secrets[bodies.name(s)] = s
    secrets[labels.OBS_VALUES_SECRET] = observability_values_secret(
        settings, identity=plan.identities[OBSERVABILITY_NODE], pki=plan.pki
    )
    for cluster in clusters:
        objs = cluster_objects(
            cluster,
            identity=plan.identities.get(cluster.name),
            identity_secret=plan.identity_secrets.get(cluster.name),
            ca_bundle=plan.pki.trust_bundle,
            chain=plan.pki.chain,
            ca_serial=plan.pki.ca_serial,
            settings=settings,
            alertmanager_count=len(alertmanagers),
        )
        services.update(objs.services)
        secrets.update(objs.secrets)
    fleet = Fleet.of(
        settings,
        clusters,
        alertmanagers=alertmanagers,
        pki=plan.pki,
        identities={
            n: plan.identities[n]
            for n in (OBSERVABILITY_NODE, *(c.name for c in clusters if not c.enrolled))
        },
    )
    return DesiredState(fleet=fleet, ca_secret=plan.ca_secret, services=services, secrets=secrets)
