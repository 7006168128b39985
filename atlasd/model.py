"""The typed domain objects every layer shares.

Data flows one way: ``watch`` observes Kubernetes objects, ``reconcile`` validates them
into these objects (and decides the PKI), and ``reconcile``, ``xds`` and ``dns`` each
derive their desired state from them. Those three packages never import each other;
this module (and ``atlasd.labels``) is what they have in common.

Every object here is frozen and hashable, and holds only validated values: a
``DownstreamCluster`` exists only for a Service that passed validation, so builders
downstream may trust its fields (names are DNS labels, the IP is a usable address,
ports are in range).

Private keys live only in ``CertKey.key_pem``; its ``repr`` never shows them, so a
stray log line or assertion message cannot leak a key.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TypeVar

from atlasd.certdir import DEFAULT_CERT_DIR

_V = TypeVar("_V")

# Ports of the design (docs/interface.md, "Topology"); all configurable through Settings.
ADS_GRPC_PORT = 6305
METRICS_PORT = 6309
OBS_XDS_PORT = 10900
OBS_THANOS_PORT = 10901
OBS_ALERTMANAGER_PORT = 10903
OBS_PROMETHEUS_PORT = 10904
DOWNSTREAM_THANOS_PORT = 11901
DOWNSTREAM_ALERTMANAGER_PORT = 11903
DOWNSTREAM_PROMETHEUS_PORT = 11904
ENVOY_ADMIN_PORT = 9000
# What a downstream Envoy forwards to by default: the usual kube-prometheus components.
THANOS_SIDECAR_PORT = 10901
PROMETHEUS_PORT = 9090
ALERTMANAGER_PORT = 9093
# The named ports of a cluster Service made by `atlasd cluster add` without --port.
DEFAULT_CLUSTER_PORTS: tuple[tuple[str, int], ...] = (
    ("prometheus", PROMETHEUS_PORT),
    ("thanos", THANOS_SIDECAR_PORT),
    ("alertmanager", ALERTMANAGER_PORT),
)

DEFAULT_NAMESPACE = "monitoring"
"""atlasd's namespace by default, and where a downstream cluster's Prometheus runs."""
CLUSTER_DOMAIN = "cluster.local"


def service_host(
    name: str, namespace: str = DEFAULT_NAMESPACE, domain: str = CLUSTER_DOMAIN
) -> str:
    """The in-cluster DNS name of Service ``name``."""
    return f"{name}.{namespace}.svc.{domain}"


MESSAGE_LIMIT = 1024
"""The longest Problem message shown anywhere (an Event's limit)."""

OBSERVABILITY_NODE = "atlas"
"""Envoy node id of the observability Envoy; no downstream cluster may use it."""

ADS_SERVER_NAME = "atlasd-ads.atlas"
"""The DNS SAN of atlasd's ADS server certificate, which the observability Envoy pins.
No node's certificate can carry it: node SANs are ``<node>`` (one DNS label) and
``<node>.<namespace>.atlas`` (three labels or more)."""


@dataclass(frozen=True)
class Settings:
    """How this installation is configured (CLI flags / environment / chart values)."""

    namespace: str = DEFAULT_NAMESPACE
    cluster_domain: str = CLUSTER_DOMAIN
    # Where the observability Envoy reaches atlasd's ADS server (in-cluster, over TLS).
    atlasd_ads_host: str = service_host("atlasd")
    atlasd_ads_port: int = ADS_GRPC_PORT
    # Where downstream Envoys reach xDS: the observability Envoy's TLS listener
    # (ATLAS_ENVOY_ADS_ADDRESS / ATLAS_ENVOY_ADS_PORT of the original chart).
    envoy_ads_address: str = "127.0.0.1"
    envoy_ads_port: int = OBS_XDS_PORT
    # Where downstream Envoys forward alerts to (ATLAS_ENVOY_ADDRESS): the
    # observability Envoy's 10903 listener.
    envoy_address: str = "127.0.0.1"
    envoy_alertmanager_port: int = OBS_ALERTMANAGER_PORT
    dns_configmap_name: str = "atlas-coredns"
    # Thanos Query's endpoint configuration (atlasd.dns.endpoints): the ConfigMap holding
    # the fleet-wide list (the per-group lists go to "<name>-groups"), and the cluster
    # Service port whose SRV records it lists (the StoreAPI port).
    thanos_endpoints_configmap_name: str = "atlas-thanos-endpoints"
    thanos_endpoints_port_name: str = "thanos"
    alertmanager_selector: tuple[tuple[str, str], ...] = (
        ("app", "kube-prometheus-stack-alertmanager"),
    )
    default_envoy_selectors: tuple[tuple[str, str], ...] = (("app", "envoy"), ("release", "atlas"))
    leaf_lifetime: dt.timedelta = dt.timedelta(days=365)
    ca_lifetime: dt.timedelta = dt.timedelta(days=3650)
    # A leaf is renewed once this fraction of its lifetime has passed.
    renew_fraction: float = 2 / 3
    # A Thanos StoreAPI call through the observability Envoy that carries no bytes either
    # way for this long is reset (Envoy's route idle timeout; 0: never), so one stalled
    # cluster costs a query at most this long (docs/operations.md, "Slow and dead clusters").
    thanos_idle_seconds: int = 30
    # Shared secret that authenticates the observability Envoy on plaintext ADS
    # connections (the fallback to its client certificate over TLS; None: plaintext
    # callers are never trusted). Never shown in repr.
    forwarder_token: str | None = field(default=None, repr=False)
    # Enrollment (docs/security.md, "Enrollment mode"): the mode of a cluster Service
    # without the goatlas.io/enrollment annotation (one whose identity Secret exists keeps
    # the compatible mode); where downstream agents reach the enrollment endpoint
    # ("host:port", into the values; empty: not configured, a Warning Event says so); and
    # where the downstream pod's agent writes its certificates and Envoy reads them.
    enrollment_default: bool = False
    enroll_address: str = ""
    agent_cert_dir: str = DEFAULT_CERT_DIR


@dataclass(frozen=True)
class ServicePort:
    """A named port copied from a cluster Service (names are DNS-1123 labels)."""

    name: str
    port: int
    protocol: str = "TCP"


@dataclass(frozen=True)
class Upstream:
    """Where a downstream Envoy finds one of its local components (host:port)."""

    host: str
    port: int


@dataclass(frozen=True)
class ObjectRef:
    """The Kubernetes object a cluster (or a problem) comes from; used for Events."""

    kind: str
    name: str
    namespace: str
    uid: str = ""
    api_version: str = "v1"


@dataclass(frozen=True)
class DownstreamCluster:
    """One validated downstream cluster (a labeled Service in atlasd's namespace)."""

    name: str
    external_ip: str
    ports: tuple[ServicePort, ...]
    replicas: int = 1
    envoy_selectors: tuple[tuple[str, str], ...] = (("app", "envoy"), ("release", "atlas"))
    thanos: Upstream = Upstream(service_host("prometheus-operated"), THANOS_SIDECAR_PORT)
    prometheus: Upstream = Upstream(service_host("prometheus-operated"), PROMETHEUS_PORT)
    alertmanager: Upstream = Upstream(service_host("alertmanager-operated"), ALERTMANAGER_PORT)
    # goatlas.io/dns-group: also published under _<port>._tcp.<group>.sidecars.thanos.atlas.
    dns_group: str | None = None
    # Per-replica host template for replica pinning, e.g.
    # "prometheus-k8s-{replica}.prometheus-operated.monitoring.svc.cluster.local";
    # None: every replica goes to ``thanos``.
    replica_host_template: str | None = None
    # The mode served (``atlasd.fleet.validate.enrollment_mode``): True, the cluster enrolls
    # (``atlasd agent`` makes its keys; atlasd stores none, its Envoy reads them from
    # files); False, the compatible mode (atlasd makes and stores its keys).
    enrolled: bool = False
    # What the Service says (goatlas.io/enrollment; None: not annotated).
    enrollment_annotation: bool | None = None
    source: ObjectRef | None = None

    def sidecar_service(self, replica: int) -> str:
        """Name of the headless Service Thanos Query dials for replica ``replica``."""
        return f"{self.name}-thanos-sidecar{replica}"

    def sidecar_services(self) -> tuple[str, ...]:
        return tuple(self.sidecar_service(i) for i in range(self.replicas))

    def thanos_upstream(self, replica: int) -> Upstream:
        """Where the downstream Envoy sends Thanos traffic for replica ``replica``."""
        if self.replica_host_template is None:
            return self.thanos
        return Upstream(self.replica_host_template.format(replica=replica), self.thanos.port)


@dataclass(frozen=True)
class LocalAlertmanager:
    """An Alertmanager Service on the observability cluster (selected by label)."""

    name: str
    namespace: str
    port: int


@dataclass(frozen=True)
class Problem:
    """Why an input object was rejected: reported as a Warning Event on ``source``."""

    source: ObjectRef
    field: str
    message: str
    reason: str = "InvalidCluster"

    def __str__(self) -> str:
        return f"{self.source.kind} {self.source.namespace}/{self.source.name}: {self.field}: {self.brief()}"

    def brief(self, limit: int = MESSAGE_LIMIT) -> str:
        """The message cut to ``limit`` characters (a hostile value can be 100 KB long;
        logs, /status and CLI errors show this, as Events do, capped at 1,024)."""
        if len(self.message) <= limit:
            return self.message
        return self.message[: limit - 15] + "... (truncated)"


@dataclass(frozen=True)
class CertKey:
    """A PEM certificate and its PEM private key. ``repr`` never shows the key."""

    cert_pem: bytes
    key_pem: bytes = field(repr=False)

    def __repr__(self) -> str:
        return f"CertKey(cert_pem=<{len(self.cert_pem)} bytes>, key_pem=<redacted>)"


@dataclass(frozen=True)
class Identity:
    """The server and client certificates of one Envoy node."""

    server: CertKey
    client: CertKey


@dataclass(frozen=True)
class PKI:
    """The trust material every node shares.

    ``trust_bundle`` holds the current CA first, then every earlier CA still trusted
    (rotation overlaps old and new until every leaf is re-issued). ``chain`` holds the
    links from the current CA back to the earlier ones: the current CA's certificate
    cross-signed by the CA before it, and so on (newest first). Every leaf certificate
    atlasd hands out is followed by ``chain`` (``with_chain``), so a peer that trusts
    only an earlier CA (an Envoy restarted from values rendered before a rotation)
    still verifies leaf -> current CA (cross-signed) -> earlier CA. Each node's own
    certificates are in ``Fleet.identities``.
    """

    ca: CertKey
    trust_bundle: bytes
    ca_serial: str
    ca_revision: int
    chain: bytes = b""

    def with_chain(self, cert_pem: bytes) -> bytes:
        """A leaf certificate (PEM) followed by the cross-signed links (see above)."""
        return cert_pem + self.chain


@dataclass(frozen=True)
class Revocation:
    """A cluster's revoked certificates in force (``atlasd.revocation``): the SHA-256 of
    each (hex, DER) and a PEM CRL of their serials signed by the current CA (empty when it
    could not be signed)."""

    hashes: frozenset[str]
    crl: bytes = b""


def _frozen_map(items: Mapping[str, _V] | Iterable[tuple[str, _V]]) -> Mapping[str, _V]:
    return MappingProxyType(dict(items))


@dataclass(frozen=True, eq=False)
class Fleet:
    """Everything the xDS and DNS builders derive their desired state from.

    ``clusters`` are the clusters served (valid, unique external IP, certificates
    issued), by name; ``identities`` the certificates of every node served — ``atlas``
    and each cluster — by node id. Both are read-only mappings; a new Fleet is made for
    every change (``atlasd.fleet`` publishes them), so a Fleet never changes once built.
    Iterating ``clusters`` follows no particular order: builders sort where order shows.
    """

    settings: Settings
    clusters: Mapping[str, DownstreamCluster] = field(default_factory=lambda: _frozen_map({}))
    alertmanagers: tuple[LocalAlertmanager, ...] = ()
    pki: PKI | None = None
    identities: Mapping[str, Identity] = field(default_factory=lambda: _frozen_map({}))
    # Clusters with revoked certificates in force, by name (served or not).
    revocations: Mapping[str, Revocation] = field(default_factory=lambda: _frozen_map({}))

    @classmethod
    def of(
        cls,
        settings: Settings,
        clusters: Iterable[DownstreamCluster] = (),
        *,
        alertmanagers: Iterable[LocalAlertmanager] = (),
        pki: PKI | None = None,
        identities: Mapping[str, Identity] | Iterable[tuple[str, Identity]] = (),
        revocations: Mapping[str, Revocation] | Iterable[tuple[str, Revocation]] = (),
    ) -> Fleet:
        """A Fleet from plain collections (tests, one-shot builds)."""
        return cls(
            settings=settings,
            clusters=_frozen_map((c.name, c) for c in clusters),
            alertmanagers=tuple(alertmanagers),
            pki=pki,
            identities=_frozen_map(identities),
            revocations=_frozen_map(revocations),
        )

    def sorted_clusters(self) -> list[DownstreamCluster]:
        return [self.clusters[n] for n in sorted(self.clusters)]
