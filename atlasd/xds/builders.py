"""Pure builders: ``model.Fleet`` -> one ``Snapshot`` per Envoy node.

Node ``atlas`` (the observability Envoy):

- ``xds`` (10900): TLS, client certificate required; forwards gRPC to atlasd's ADS port
  with ``x-forwarded-client-cert`` (SANITIZE_SET, DNS and URI SANs) so atlasd can check
  that the certificate names the node it asks for, over mTLS with the ``atlas`` client
  certificate (the forwarder identity; atlasd's server pinned to
  ``model.ADS_SERVER_NAME``) and, if configured, the forwarder token (see
  docs/xds-authorization.md).
- ``thanos`` (10901): plaintext; authority ``<cluster>-thanos-sidecar<i>.<ns>.svc.<domain>``
  (with or without a port) -> ``<cluster>-thanos`` (mTLS, HTTP/2, SAN = cluster name; a
  cluster with revoked certificates also carries their CRL, ``model.Revocation``).
- ``prometheus`` (10904): plaintext; ``/prom/<cluster>/`` rewritten to ``/`` ->
  ``<cluster>-prom`` (mTLS, SAN = cluster name).

  On both, Envoy's own reply to a call whose upstream connection failed names the
  transport's failure reason (``labels.UPSTREAM_FAILURE_HEADER``): `atlasd probe` tells a
  refused TLS handshake, and which side refused, from a refused TCP connection by it.

  Both route by **scope** (SRDS): a request's key is its authority without the port
  (10901) or the first two segments of its path (10904, ``prom`` and the cluster name), and
  each cluster's scopes (``thanos/<authority>`` per sidecar, ``prometheus/<cluster>``) carry
  their own one-route configuration inline. Adding, changing or removing a cluster is an
  update of its own scopes: Envoy's cost does not grow with the fleet (one route
  configuration holding every cluster cost it 0.2-0.5 s per change at 5,000 clusters).
  The upstream clusters take their one endpoint (the external IP) from EDS, so a new IP
  changes two endpoint assignments and no cluster.
- ``alertmanager`` (10903, only with local Alertmanagers): TLS, CA-signed client
  certificate required, and per-route RBAC allows only certificates naming a current
  cluster and not revoked (the ``Hash`` of the XFCC header the listener sets, removed
  before the Alertmanager); authority ``alertmanager<i>...`` -> ``alertmanager<i>``, each
  its own Service.

Node ``<cluster>``: ``thanos`` (11901) and ``prometheus`` (11904) terminate mTLS (client
SAN must be ``atlas``) and forward to the local components, one Thanos cluster per
replica chosen by authority (replica pinning); ``alertmanager`` (11903, only when the
observability cluster has Alertmanagers) relays plaintext local alerts over mTLS to the
observability Envoy's 10903.

Certificates: every identity's DNS SANs include its node id (``atlas`` or the cluster name).
Secrets are served by SDS over ADS under the names ``validation``, ``server``, ``client``;
only the referenced ones are included. ``server`` and ``client`` carry the leaf followed by
the PKI's cross-signed chain (``model.PKI.chain``), so peers that trust only an earlier CA
still verify them. An enrolled cluster's node (``enrolled``) names the same three secrets
by SDS from the files its agent writes in ``settings.agent_cert_dir`` (``atlasd.certdir``)
and is served none: atlasd holds no key of it.

Work is proportional to change: ``SnapshotBuilder.update(fleet, changed)`` rebuilds the
nodes and pieces of the keys that changed (see the class).
"""

from __future__ import annotations

import bisect
import dataclasses
import logging
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field

from envoy.config.core.v3 import base_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2

from atlasd import model
from atlasd.fleet.keys import FLEET_KEY
from atlasd.labels import CLUSTER_HEADER, FORWARDER_TOKEN_HEADER, UPSTREAM_FAILURE_HEADER
from atlasd.memo import Memo
from atlasd.xds.messages import (
    ADS_FORWARD_CLUSTER,
    ADS_SERVER_MAX_STREAMS,
    ATLAS_ALERTMANAGER_CLUSTER,
    CLIENT_SECRET,
    RBAC_FILTER,
    SERVER_SECRET,
    VALIDATION_SECRET,
    XFCC_HEADER,
    HeaderPart,
    Piece,
    downstream_tls_chain,
    failover_outlier_detection,
    failover_retry_policy,
    fleet_circuit_breakers,
    host_domains,
    make_cluster,
    make_endpoints,
    make_hcm,
    make_listener,
    make_route,
    make_scope,
    principal_bytes,
    rbac_allow_encoded,
    serialize,
    tls_secret,
    validation_secret,
)
from atlasd.xds.plan import ListenPlan, NodePorts
from atlasd.xds.snapshot import (
    CLUSTER,
    ENDPOINT,
    LISTENER,
    ROUTE,
    SCOPED_ROUTE,
    SECRET,
    InconsistentSnapshot,
    Resource,
    Snapshot,
)

log = logging.getLogger(__name__)


def _marked(rc: route_pb2.RouteConfiguration, cluster: str) -> route_pb2.RouteConfiguration:
    """A downstream Envoy's route configuration whose every answer says whose Envoy it
    passed through (``labels.CLUSTER_HEADER``), the Envoy's own replies too (an upstream
    it cannot reach): `atlasd probe` tells the hops apart by it."""
    rc.response_headers_to_add.append(
        base_pb2.HeaderValueOption(
            header=base_pb2.HeaderValue(key=CLUSTER_HEADER, value=cluster),
            append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
        )
    )
    return rc


THANOS_SCOPES = "thanos"
PROM_SCOPES = "prometheus"
PROM_PREFIX = "/prom/"
# Pieces shared by nodes kept at most (``SnapshotBuilder._shared``): a handful per distinct
# input (ports, upstream hosts), so a fleet holds tens; past this they are dropped at once.
MEMO_LIMIT = 4096
# 10901: the authority without its port; 10904: the first two segments of the path.
THANOS_KEY = (HeaderPart(":authority", ":", 0),)
PROM_KEY = (HeaderPart(":path", "/", 1), HeaderPart(":path", "/", 2))

__all__ = [
    "ADS_FORWARD_CLUSTER",
    "ATLAS_ALERTMANAGER_CLUSTER",
    "CLIENT_SECRET",
    "FORWARDER_TOKEN_HEADER",
    "SERVER_SECRET",
    "VALIDATION_SECRET",
    "XFCC_HEADER",
    "SnapshotBuilder",
    "build_snapshots",
]


# ---------------------------------------------------------------------------------------
# the incremental builder


@dataclass(frozen=True)
class _ClusterPieces:
    """What one downstream cluster contributes to node ``atlas``."""

    clusters: tuple[Resource, ...]  # <c>-thanos, <c>-prom
    endpoints: tuple[Resource, ...]  # their endpoints (EDS): the external IP
    scopes: tuple[Resource, ...]  # thanos/<authority> per sidecar, prometheus/<c>
    principal: bytes  # its RBAC principal (alertmanager routes)

    def resources(self) -> tuple[Resource, ...]:
        return (*self.clusters, *self.endpoints, *self.scopes)


@dataclass
class BuildResult:
    """Nodes whose snapshot changed (None: the node is gone) and the pieces rebuilt."""

    changed: dict[str, Snapshot | None] = field(default_factory=dict)
    built: int = 0


class SnapshotBuilder:
    """Builds and keeps every node's snapshot, rebuilding only what a change touches.

    ``update(fleet, changed)`` takes the keys that changed (``atlasd.fleet``; None: all):
    a downstream node is rebuilt only when its own cluster or the fleet-wide inputs changed;
    node ``atlas`` keeps one set of pieces per cluster (two upstream clusters, its routing
    scopes, an RBAC principal) and evolves its snapshot with the changed ones only, so
    nothing unchanged is re-serialized or re-hashed. Pieces many downstream nodes hold
    alike are built once per distinct inputs (``_shared``), so a fleet-wide change costs
    each node its own pieces only.

    Invariants: ``_pieces`` holds the pieces of exactly the clusters of the last fleet that
    are served on node ``atlas``, ``_names`` their names sorted; ``_nodes[n]`` the inputs and
    snapshot of every downstream node published.
    """

    def __init__(
        self,
        plan: ListenPlan | None = None,
        *,
        forwarder_token: str | None = None,
        upstream_connection_seconds: int = 600,
    ) -> None:
        """``upstream_connection_seconds``: mTLS upstream connections are recycled after
        this long, so certificates rotated out stop being used within that bound."""
        self.plan = plan or ListenPlan()
        self._token = forwarder_token
        self._conn_seconds = upstream_connection_seconds
        # Per cluster: the inputs of its clusters, endpoints and routes, and the pieces.
        self._pieces: dict[
            str, tuple[tuple[Hashable, Hashable, Hashable, Hashable], _ClusterPieces]
        ] = {}
        self._names: list[str] = []
        self._principals: bytes | None = None
        self._nodes: dict[str, tuple[Hashable, Snapshot]] = {}
        self._atlas: Snapshot | None = None
        self._fleet_inputs: Hashable = None
        # Pieces shared by nodes, by their maker and inputs (``_shared``).
        self._memo: Memo[Hashable, Resource] = Memo(MEMO_LIMIT)
        # Inconsistencies found by the last update (builder bugs; see ``_consistent``).
        self.problems: list[str] = []
        # Pieces built by the last update (tests and the benchmark).
        self.built = 0

    # -- the seam the soak test uses to dial its stand-in network -------------------------

    def upstream_host(self, cluster: model.DownstreamCluster) -> str:
        """Where node ``atlas`` dials ``cluster``'s Envoy: its external IP."""
        return cluster.external_ip

    # -- public ------------------------------------------------------------------------------

    def snapshots(self) -> dict[str, Snapshot]:
        out = {n: snap for n, (_, snap) in self._nodes.items()}
        if self._atlas is not None:
            out[model.OBSERVABILITY_NODE] = self._atlas
        return out

    def build(self, fleet: model.Fleet) -> dict[str, Snapshot]:
        """Every node's snapshot for ``fleet`` (none at all without a PKI)."""
        self.update(fleet, None)
        return self.snapshots()

    def update(self, fleet: model.Fleet, changed: Iterable[str] | None) -> BuildResult:
        """Bring the snapshots up to ``fleet``; ``changed``: the keys that may differ from
        the previous fleet (None: any)."""
        self.problems = []
        self.built = 0
        result = BuildResult()
        pki = fleet.pki
        atlas_ident = fleet.identities.get(model.OBSERVABILITY_NODE)
        fleet_inputs = (
            fleet.settings,
            pki,
            atlas_ident,
            fleet.alertmanagers,
            self.plan,
            self._token,
            self._conn_seconds,
        )
        if changed is None or fleet_inputs != self._fleet_inputs:
            keys: set[str] = set(fleet.clusters) | set(self._pieces) | set(self._nodes)
            everything = True
        else:
            keys = {k for k in changed if k != FLEET_KEY}
            everything = False
        self._fleet_inputs = fleet_inputs
        if pki is None or atlas_ident is None:
            for n in list(self._nodes):
                result.changed[n] = None
            if self._atlas is not None:
                result.changed[model.OBSERVABILITY_NODE] = None
            self._nodes.clear()
            self._pieces.clear()
            self._names = []
            self._principals = None
            self._atlas = None
            return result
        # Downstream nodes.
        for name in sorted(keys):
            c = fleet.clusters.get(name)
            ident = fleet.identities.get(name)
            if c is None or (ident is None and not c.enrolled) or name == model.OBSERVABILITY_NODE:
                if self._nodes.pop(name, None) is not None:
                    result.changed[name] = None
                continue
            snap = self._downstream_snapshot(fleet, c, pki, ident)
            if snap is not None:
                result.changed[name] = snap
        # Node atlas.
        atlas = self._atlas_update(fleet, pki, atlas_ident, keys, everything)
        if atlas is not None:
            result.changed[model.OBSERVABILITY_NODE] = atlas
        result.built = self.built
        return result

    # -- downstream nodes ------------------------------------------------------------------

    def _downstream_snapshot(
        self,
        fleet: model.Fleet,
        c: model.DownstreamCluster,
        pki: model.PKI,
        ident: model.Identity | None,
    ) -> Snapshot | None:
        """A downstream node's snapshot depends only on these inputs: when they are equal to
        last time, nothing is built. Returns the new snapshot, or None if unchanged."""
        # Its own config names no external IP, only whether to listen on IPv6.
        inputs = (
            dataclasses.replace(c, external_ip="ipv6" if ":" in c.external_ip else "ipv4"),
            fleet.settings,
            self.plan.ports_for(c.name),
            ident,
            # An enrolled node carries nothing of the PKI (its secrets are files).
            None if c.enrolled else (pki.trust_bundle, pki.chain),
            len(fleet.alertmanagers),
            self._conn_seconds,
        )
        prev = self._nodes.get(c.name)
        if prev is not None and prev[0] == inputs:
            return None
        resources = self._downstream(fleet, c, pki, ident)
        self.built += 1
        snap = self._consistent(c.name, resources, prev[1] if prev is not None else None)
        if snap is None or (prev is not None and prev[1] is snap):
            return None
        self._nodes[c.name] = (inputs, snap)
        return snap

    def _consistent(
        self, node: str, resources: list[Resource], prev: Snapshot | None
    ) -> Snapshot | None:
        """A snapshot of ``resources``, evolved from ``prev`` where possible; an inconsistent
        one is never published: the node keeps its last good snapshot (or has none yet)."""
        try:
            if prev is None:
                return Snapshot.create(node, resources)
            # Evolved directly: only what differs is hashed and checked (``evolve``
            # returns ``prev`` itself when nothing does).
            names = {(r.type_url, r.name) for r in resources}
            if len(names) != len(resources):
                Snapshot.create(node, resources)  # raises, naming the duplicate
            gone = [(t, n) for t, rs in prev.resources.items() for n in rs if (t, n) not in names]
            return prev.evolve(resources, gone)
        except InconsistentSnapshot as exc:
            # A builder bug, not bad input: say so, keep serving the last good snapshot.
            self.problems.append(str(exc))
            log.error("xds: not publishing node %r: %s", node, exc, extra={"key": node})
            return prev

    # -- node atlas: per-cluster pieces -------------------------------------------------------

    def _cluster_resources(
        self, c: model.DownstreamCluster, ports: NodePorts, crl: bytes
    ) -> tuple[Resource, ...]:
        """The two upstream clusters node ``atlas`` dials ``c`` with. They name no address
        (their endpoints come by EDS): a new external IP rebuilds the endpoints only, so
        Envoy keeps the clusters and a State-of-the-World stream sends two endpoint
        assignments, not every cluster. ``crl``: ``c``'s revoked certificates
        (``model.Revocation``), refused in the handshake; revoking changes ``c``'s two
        clusters and nothing else, and Envoy drains their pooled connections."""
        ups: list[Resource] = []
        for kind, port in (("thanos", ports.thanos), ("prom", ports.prometheus)):
            cname = f"{c.name}-{kind}"
            cl, refs = make_cluster(
                name=cname,
                host=None,
                port=port,
                http2=True,
                tls_san=c.name,
                max_connection_seconds=self._conn_seconds,
                crl=crl,
            )
            ups.append(Resource.of(CLUSTER, cname, serialize(cl), refs))
        self.built += 1
        return tuple(ups)

    def _endpoint_resources(
        self, c: model.DownstreamCluster, ports: NodePorts
    ) -> tuple[Resource, ...]:
        """The endpoints (EDS) of ``c``'s two upstream clusters: its external IP."""
        host = self.upstream_host(c)
        eps = tuple(
            Resource.of(ENDPOINT, cname, serialize(make_endpoints(cname, host, port)))
            for cname, port in (
                (f"{c.name}-thanos", ports.thanos),
                (f"{c.name}-prom", ports.prometheus),
            )
        )
        self.built += 1
        return eps

    def _route_pieces(self, c: model.DownstreamCluster, s: model.Settings) -> tuple[Resource, ...]:
        """``c``'s routing scopes: its name's and replicas' business, not its IP's."""
        thanos, prom = f"{c.name}-thanos", f"{c.name}-prom"
        scopes = []
        for svc in c.sidecar_services():
            host = model.service_host(svc, s.namespace, s.cluster_domain)
            name = f"{THANOS_SCOPES}/{host}"
            route = make_route(thanos, streaming=True, idle_seconds=s.thanos_idle_seconds)
            scope = make_scope(name, [host], route)
            scopes.append(Resource.of(SCOPED_ROUTE, name, serialize(scope), {(CLUSTER, thanos)}))
        name = f"{PROM_SCOPES}/{c.name}"
        route = make_route(prom, prefix=f"{PROM_PREFIX}{c.name}/", rewrite="/")
        scope = make_scope(name, [PROM_PREFIX.strip("/"), c.name], route)
        scopes.append(Resource.of(SCOPED_ROUTE, name, serialize(scope), {(CLUSTER, prom)}))
        self.built += 1
        return tuple(scopes)

    def _atlas_update(
        self,
        fleet: model.Fleet,
        pki: model.PKI,
        ident: model.Identity,
        keys: set[str],
        everything: bool,
    ) -> Snapshot | None:
        """Node ``atlas`` for ``fleet``: the new snapshot, or None if unchanged."""
        node = model.OBSERVABILITY_NODE
        upserts: list[Resource] = []
        removals: list[tuple[str, str]] = []
        # The clusters or their RBAC principals changed: the alertmanager routes follow.
        principals_changed = everything
        for name in keys:
            c = fleet.clusters.get(name)
            if c is None:
                old = self._pieces.pop(name, None)
                if old is not None:
                    removals += [(r.type_url, r.name) for r in old[1].resources()]
                    i = bisect.bisect_left(self._names, name)
                    del self._names[i]
                    principals_changed = True
                continue
            ports = self.plan.ports_for(c.name)
            rev = fleet.revocations.get(name)
            crl = rev.crl if rev is not None else b""
            cds_in = (c.name, ports.thanos, ports.prometheus, crl)
            eds_in = (c.name, self.upstream_host(c), ports.thanos, ports.prometheus)
            st = fleet.settings
            route_in = (c.name, c.replicas, st.namespace, st.cluster_domain, st.thanos_idle_seconds)
            # Its revoked client certificates are refused on the alertmanager routes.
            principal_in = (c.name, rev.hashes if rev is not None else frozenset())
            old = self._pieces.get(name)
            if old is not None and old[0] == (cds_in, eds_in, route_in, principal_in):
                continue
            if old is not None and old[0][0] == cds_in:
                clusters = old[1].clusters
            else:
                clusters = self._cluster_resources(c, ports, crl)
                upserts += clusters
            if old is not None and old[0][1] == eds_in:
                endpoints = old[1].endpoints
            else:
                endpoints = self._endpoint_resources(c, ports)
                upserts += endpoints
            if old is not None and old[0][2] == route_in:
                scopes = old[1].scopes
            else:
                scopes = self._route_pieces(c, fleet.settings)
                upserts += scopes
                if old is not None:
                    kept = {r.name for r in scopes}
                    removals += [
                        (SCOPED_ROUTE, r.name) for r in old[1].scopes if r.name not in kept
                    ]
            if old is not None and old[0][3] == principal_in:
                principal = old[1].principal
            else:
                principal = principal_bytes(*principal_in)
                principals_changed = True
            self._pieces[name] = (
                (cds_in, eds_in, route_in, principal_in),
                _ClusterPieces(clusters, endpoints, scopes, principal),
            )
            if old is None:
                bisect.insort(self._names, name)
        if principals_changed:
            self._principals = None
        if everything or self._atlas is None:
            resources = self._atlas_fixed(fleet, pki, ident)
            resources += [r for _, p in self._pieces.values() for r in p.resources()]
            resources += self._alertmanager_routes(fleet)
            resources += self._referenced_secrets(node, resources, pki, ident)
            snap = self._consistent(node, resources, self._atlas)
        else:
            if principals_changed and fleet.alertmanagers:
                upserts += self._alertmanager_routes(fleet)
            if not upserts and not removals:
                return None
            try:
                snap = self._atlas.evolve(upserts, removals)
            except InconsistentSnapshot as exc:
                self.problems.append(str(exc))
                log.error("xds: not publishing node %r: %s", node, exc, extra={"key": node})
                return None
        if snap is None or snap is self._atlas:
            return None
        self._atlas = snap
        return snap

    # -- node atlas: what does not depend on one cluster ------------------------------------

    def _atlas_fixed(
        self, fleet: model.Fleet, pki: model.PKI, ident: model.Identity
    ) -> list[Resource]:
        """Listeners, the xDS forwarding route and cluster, the Alertmanager clusters."""
        s = fleet.settings
        obs = self.plan.observability
        res: list[Resource] = []

        # 10900: xDS for downstream Envoys, forwarded to atlasd with the client cert.
        def xds_listener() -> Piece:
            chain, refs = downstream_tls_chain(client_sans=None)
            hcm = make_hcm(
                stat_prefix="xds", route_name="xds", streaming=True, forward_client_cert=True
            )
            lst = make_listener(
                name="xds", address=obs.address, port=obs.xds, hcm=hcm, tls_chain=chain
            )
            return Piece(serialize(lst), refs | {(ROUTE, "xds")})

        res.append(_mk(LISTENER, "xds", xds_listener))

        def xds_route() -> Piece:
            # OVERWRITE_IF_EXISTS_OR_ADD replaces any copy a caller sent. (A virtual-host
            # level remove would run after this route-level add and drop it.)
            headers = [(FORWARDER_TOKEN_HEADER, self._token)] if self._token else []
            vh = route_components_pb2.VirtualHost(
                name="xds",
                domains=["*"],
                routes=[
                    make_route(
                        ADS_FORWARD_CLUSTER,
                        streaming=True,
                        headers_to_add=headers,
                        retry=failover_retry_policy(),
                    )
                ],
            )
            rc = route_pb2.RouteConfiguration(name="xds", virtual_hosts=[vh])
            return Piece(serialize(rc), frozenset({(CLUSTER, ADS_FORWARD_CLUSTER)}))

        res.append(_mk(ROUTE, "xds", xds_route))

        def ads_cluster() -> Piece:
            # mTLS with the atlas client certificate: atlasd honours XFCC from this peer only.
            c, refs = make_cluster(
                name=ADS_FORWARD_CLUSTER,
                host=s.atlasd_ads_host,
                port=s.atlasd_ads_port,
                http2=True,
                tls_san=model.ADS_SERVER_NAME,
                max_streams=ADS_SERVER_MAX_STREAMS,
            )
            # The name may resolve to several replicas: a reconnecting stream must not be
            # routed to a dead one again (retried on another, the dead one ejected).
            c.outlier_detection.CopyFrom(failover_outlier_detection())
            c.circuit_breakers.CopyFrom(fleet_circuit_breakers())
            return Piece(serialize(c), refs)

        res.append(_mk(CLUSTER, ADS_FORWARD_CLUSTER, ads_cluster))
        # 10901 Thanos and 10904 Prometheus: routes assembled from per-cluster pieces.
        res.append(
            self._plain_listener(
                THANOS_SCOPES, obs.address, obs.thanos, streaming=True, scope_key=THANOS_KEY
            )
        )
        res.append(
            self._plain_listener(PROM_SCOPES, obs.address, obs.prometheus, scope_key=PROM_KEY)
        )

        # 10903: alerts from downstream Envoys to the i-th local Alertmanager, each to its
        # own Service. TLS requires a CA-signed client certificate; which clusters may
        # call is per-route RBAC in RDS (``_alertmanager_routes``), so adding or removing a
        # cluster changes the route configuration only (a listener update would drain).
        if fleet.alertmanagers:

            def am_listener() -> Piece:
                chain, refs = downstream_tls_chain(client_sans=None)
                # XFCC (SANITIZE_SET: the certificate Envoy verified, with its Hash) for
                # the per-route RBAC to refuse revoked certificates by; the routes remove
                # it before the Alertmanager.
                hcm = make_hcm(
                    stat_prefix="alertmanager",
                    route_name="alertmanager",
                    rbac_deny_by_default=True,
                    forward_client_cert=True,
                )
                lst = make_listener(
                    name="alertmanager",
                    address=obs.address,
                    port=obs.alertmanager,
                    hcm=hcm,
                    tls_chain=chain,
                )
                return Piece(serialize(lst), refs | {(ROUTE, "alertmanager")})

            res.append(_mk(LISTENER, "alertmanager", am_listener))
            for i, am in enumerate(fleet.alertmanagers):
                cname = f"alertmanager{i}"
                host = self.plan.service_host(
                    name=am.name, namespace=am.namespace, domain=s.cluster_domain
                )

                def am_cluster(cname: str = cname, host: str = host, port: int = am.port) -> Piece:
                    cl, refs = make_cluster(name=cname, host=host, port=port, http2=False)
                    return Piece(serialize(cl), refs)

                res.append(_mk(CLUSTER, cname, am_cluster))
        return res

    def _alertmanager_routes(self, fleet: model.Fleet) -> list[Resource]:
        """Route configuration ``alertmanager``: the i-th host to the i-th Alertmanager,
        allowed to callers whose certificate names a cluster served now."""
        if not fleet.alertmanagers:
            return []
        s = fleet.settings
        if self._principals is None:
            self._principals = b"".join(self._pieces[n][1].principal for n in self._names)
        allow = rbac_allow_encoded(self._principals)
        vhosts = []
        refs = set()
        for i in range(len(fleet.alertmanagers)):
            cname = f"alertmanager{i}"
            refs.add((CLUSTER, cname))
            vh = route_components_pb2.VirtualHost(
                name=cname,
                domains=host_domains(f"{cname}.{s.namespace}.svc.{s.cluster_domain}"),
                routes=[make_route(cname)],
                request_headers_to_remove=[XFCC_HEADER],
            )
            vh.typed_per_filter_config[RBAC_FILTER].CopyFrom(allow)
            vhosts.append(vh)
        rc = route_pb2.RouteConfiguration(name="alertmanager", virtual_hosts=vhosts)
        return [Resource.of(ROUTE, "alertmanager", serialize(rc), refs)]

    def _plain_listener(
        self,
        name: str,
        address: str,
        port: int,
        *,
        streaming: bool = False,
        scope_key: tuple[HeaderPart, ...] = (),
    ) -> Resource:
        def make() -> Piece:
            hcm = make_hcm(
                stat_prefix=name,
                route_name=name,
                streaming=streaming,
                scope_key=scope_key,
                failure_header=UPSTREAM_FAILURE_HEADER,
            )
            lst = make_listener(name=name, address=address, port=port, hcm=hcm, tls_chain=None)
            # Scopes are a wildcard set, not named by the listener.
            return Piece(serialize(lst), frozenset() if scope_key else frozenset({(ROUTE, name)}))

        return _mk(LISTENER, name, make)

    def _referenced_secrets(
        self, node: str, res: list[Resource], pki: model.PKI, ident: model.Identity
    ) -> list[Resource]:
        wanted = {name for r in res for t, name in r.refs if t == SECRET}
        out: list[Resource] = []
        if VALIDATION_SECRET in wanted:
            out.append(self._shared(SECRET, VALIDATION_SECRET, validation_secret, pki.trust_bundle))
        for name, ck in ((SERVER_SECRET, ident.server), (CLIENT_SECRET, ident.client)):
            if name in wanted:

                def make(name: str = name, ck: model.CertKey = ck) -> Piece:
                    return tls_secret(name, ck, pki.chain)

                out.append(_mk(SECRET, name, make))
        return out

    def _shared(
        self, type_url: str, name: str, make: Callable[..., Piece], *args: Hashable
    ) -> Resource:
        """A resource many nodes hold alike, made by ``make(*args)`` (a pure function of
        them): built once per distinct ``args`` and the same object in every snapshot.
        A fleet-wide change (an Alertmanager, the observability Envoy's address) then
        builds each such piece once, not once per node."""
        return self._memo.get(
            (type_url, name, make, args), lambda: _mk(type_url, name, lambda: make(*args))
        )

    # -- node <cluster> --------------------------------------------------------------

    def _downstream(
        self,
        fleet: model.Fleet,
        c: model.DownstreamCluster,
        pki: model.PKI,
        ident: model.Identity | None,
    ) -> list[Resource]:
        node = c.name
        s = fleet.settings
        # An enrolled cluster's Envoy reads its secrets from its agent's files; no key of
        # it is here to serve.
        sds_dir = s.agent_cert_dir if c.enrolled else None
        ports = self.plan.ports_for(c.name)
        if ports.address == "0.0.0.0" and ":" in c.external_ip:
            # An IPv6 external IP: listen on every IPv6 (and, dual-stack, IPv4) address.
            ports = dataclasses.replace(ports, address="::")
        res: list[Resource] = []
        shared = self._shared
        for name, port in (("thanos", ports.thanos), ("prometheus", ports.prometheus)):
            res.append(shared(LISTENER, name, _mtls_listener, name, ports.address, port, sds_dir))

        # Replica pinning: the authority names the sidecar Service of replica i.
        def thanos_routes() -> Piece:
            vhosts = [
                route_components_pb2.VirtualHost(
                    name=f"thanos{i}",
                    domains=host_domains(
                        model.service_host(c.sidecar_service(i), s.namespace, s.cluster_domain)
                    ),
                    routes=[make_route(f"thanos{i}", streaming=True)],
                )
                for i in range(c.replicas)
            ]
            rc = _marked(route_pb2.RouteConfiguration(name="thanos", virtual_hosts=vhosts), c.name)
            return Piece(
                serialize(rc), frozenset((CLUSTER, f"thanos{i}") for i in range(c.replicas))
            )

        res.append(_mk(ROUTE, "thanos", thanos_routes))
        for i in range(c.replicas):
            up = c.thanos_upstream(i)
            res.append(
                shared(CLUSTER, f"thanos{i}", _upstream, f"thanos{i}", up.host, up.port, True)
            )

        def prom_routes() -> Piece:
            vh = route_components_pb2.VirtualHost(
                name="prometheus", domains=["*"], routes=[make_route("prometheus")]
            )
            rc = _marked(
                route_pb2.RouteConfiguration(name="prometheus", virtual_hosts=[vh]), c.name
            )
            return Piece(serialize(rc), frozenset({(CLUSTER, "prometheus")}))

        res.append(_mk(ROUTE, "prometheus", prom_routes))
        up = c.prometheus
        res.append(shared(CLUSTER, "prometheus", _upstream, "prometheus", up.host, up.port, False))

        # 11903: local alerts -> observability Envoy 10903 over mTLS. Authorities naming an
        # Alertmanager are kept; anything else goes to alertmanager0.
        if fleet.alertmanagers:
            n_am = len(fleet.alertmanagers)
            where = (ports.address, ports.alertmanager)
            res.append(shared(LISTENER, "alertmanager", _relay_listener, *where))
            names = (n_am, s.namespace, s.cluster_domain)
            res.append(shared(ROUTE, "alertmanager", _relay_routes, *names))
            to = (s.envoy_address, s.envoy_alertmanager_port, self._conn_seconds, sds_dir)
            res.append(shared(CLUSTER, ATLAS_ALERTMANAGER_CLUSTER, _relay_cluster, *to))

        if ident is not None and sds_dir is None:
            res.extend(self._referenced_secrets(node, res, pki, ident))
        return res


# Downstream pieces alike for every node with the same inputs (``SnapshotBuilder._shared``):
# each reads nothing but its arguments.


def _mtls_listener(name: str, address: str, port: int, sds_dir: str | None) -> Piece:
    """Listener ``name`` (thanos, prometheus): mTLS, only node ``atlas``'s certificate."""
    chain, refs = downstream_tls_chain(client_sans=[model.OBSERVABILITY_NODE], sds_dir=sds_dir)
    hcm = make_hcm(stat_prefix=name, route_name=name, streaming=name == "thanos")
    lst = make_listener(name=name, address=address, port=port, hcm=hcm, tls_chain=chain)
    return Piece(serialize(lst), refs | {(ROUTE, name)})


def _upstream(name: str, host: str, port: int, http2: bool) -> Piece:
    """A local service the downstream Envoy sends to (a Thanos sidecar, Prometheus)."""
    cl, refs = make_cluster(name=name, host=host, port=port, http2=http2)
    return Piece(serialize(cl), refs)


def _relay_listener(address: str, port: int) -> Piece:
    """11903: the cluster's alerts in, to the relay route."""
    hcm = make_hcm(stat_prefix="alertmanager", route_name="alertmanager")
    lst = make_listener(name="alertmanager", address=address, port=port, hcm=hcm, tls_chain=None)
    return Piece(serialize(lst), frozenset({(ROUTE, "alertmanager")}))


def _relay_routes(alertmanagers: int, namespace: str, domain: str) -> Piece:
    """Authorities naming one of the ``alertmanagers`` are kept; others go to the first."""
    hosts = [f"alertmanager{i}.{namespace}.svc.{domain}" for i in range(alertmanagers)]
    vhosts = [
        route_components_pb2.VirtualHost(
            name=f"alertmanager{i}",
            domains=host_domains(h),
            routes=[make_route(ATLAS_ALERTMANAGER_CLUSTER)],
        )
        for i, h in enumerate(hosts)
    ]
    vhosts.append(
        route_components_pb2.VirtualHost(
            name="default",
            domains=["*"],
            routes=[make_route(ATLAS_ALERTMANAGER_CLUSTER, host_rewrite=hosts[0])],
        )
    )
    rc = route_pb2.RouteConfiguration(name="alertmanager", virtual_hosts=vhosts)
    return Piece(serialize(rc), frozenset({(CLUSTER, ATLAS_ALERTMANAGER_CLUSTER)}))


def _relay_cluster(host: str, port: int, conn_seconds: int, sds_dir: str | None) -> Piece:
    """The observability Envoy's 10903 over mTLS (its name ``atlas`` verified)."""
    cl, refs = make_cluster(
        name=ATLAS_ALERTMANAGER_CLUSTER,
        host=host,
        port=port,
        http2=True,
        tls_san=model.OBSERVABILITY_NODE,
        max_connection_seconds=conn_seconds,
        sds_dir=sds_dir,
    )
    return Piece(serialize(cl), refs)


def build_snapshots(fleet: model.Fleet, plan: ListenPlan | None = None) -> dict[str, Snapshot]:
    """One-shot form of ``SnapshotBuilder(plan).build(fleet)``."""
    return SnapshotBuilder(plan).build(fleet)


def _mk(type_url: str, name: str, make: Callable[[], Piece]) -> Resource:
    p = make()
    return Resource.of(type_url, name, p.body, p.refs)
