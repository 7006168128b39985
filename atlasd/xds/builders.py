"""Pure builders: ``model.Fleet`` -> one ``Snapshot`` per Envoy node.

Node ``atlas`` (the observability Envoy):

- ``xds`` (10900): TLS, client certificate required; forwards gRPC to atlasd's ADS port
  with ``x-forwarded-client-cert`` (SANITIZE_SET, DNS and URI SANs) so atlasd can check
  that the certificate names the node it asks for (see docs/xds-authorization.md).
- ``thanos`` (10901): plaintext; authority ``<cluster>-thanos-sidecar<i>.<ns>.svc.<domain>``
  (with or without a port) -> ``<cluster>-thanos`` (mTLS, HTTP/2, SAN = cluster name).
- ``prometheus`` (10904): plaintext; ``/prom/<cluster>/`` rewritten to ``/`` ->
  ``<cluster>-prom`` (mTLS, SAN = cluster name).
- ``alertmanager`` (10903, only with local Alertmanagers): TLS, CA-signed client
  certificate required, and per-route RBAC allows only certificates naming a current
  cluster; authority ``alertmanager<i>...`` -> ``alertmanager<i>``, each its own Service.

Node ``<cluster>``: ``thanos`` (11901) and ``prometheus`` (11904) terminate mTLS (client
SAN must be ``atlas``) and forward to the local components, one Thanos cluster per
replica chosen by authority (replica pinning); ``alertmanager`` (11903, only when the
observability cluster has Alertmanagers) relays plaintext local alerts over mTLS to the
observability Envoy's 10903.

Certificates: every identity's DNS SANs include its node id (``atlas`` or the cluster name).
Secrets are served by SDS over ADS under the names ``validation``, ``server``, ``client``;
only the referenced ones are included.

Work is proportional to change: ``SnapshotBuilder`` memoizes every serialized resource
keyed by (node, type, name) together with the inputs it was built from, and the large
route configurations of node ``atlas`` are assembled from cached per-cluster pieces by
concatenating their encoded bytes (protobuf repeated fields may be encoded piecewise).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable

from envoy.config.route.v3 import route_components_pb2, route_pb2

from atlasd import model
from atlasd.labels import FORWARDER_TOKEN_HEADER
from atlasd.xds.messages import (
    ADS_FORWARD_CLUSTER,
    ATLAS_ALERTMANAGER_CLUSTER,
    CLIENT_SECRET,
    RBAC_FILTER,
    ROUTES_FIELD,
    SERVER_SECRET,
    VALIDATION_SECRET,
    VHOSTS_FIELD,
    XFCC_HEADER,
    Piece,
    downstream_tls_chain,
    host_domains,
    make_cluster,
    make_hcm,
    make_listener,
    make_route,
    rbac_allow_principals,
    repeated_field,
    serialize,
    tls_secret,
    validation_secret,
)
from atlasd.xds.plan import ListenPlan
from atlasd.xds.snapshot import (
    CLUSTER,
    LISTENER,
    ROUTE,
    SECRET,
    InconsistentSnapshot,
    Resource,
    Snapshot,
)

log = logging.getLogger(__name__)

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
# the memoizing builder


class SnapshotBuilder:
    """Builds snapshots for a fleet, reusing every piece whose inputs did not change.

    The memo maps (node, kind, name) -> (inputs, piece); a piece is rebuilt only when its
    inputs (frozen model objects) differ. Pieces of nodes or clusters that disappear are
    dropped at the end of each ``build``.
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
        self._memo: dict[tuple[str, str, str], tuple[Hashable, Piece]] = {}
        self._resources: dict[tuple[str, str, str], tuple[Hashable, Resource]] = {}
        self._snapshots: dict[str, tuple[tuple[tuple[str, str, str], ...], Snapshot]] = {}
        # Keys used while building the current downstream node (None: not tracking).
        self._node_keys: set[tuple[str, str, str]] | None = None
        # node -> (inputs, memo keys it used): the downstream fast path.
        self._node_inputs: dict[str, tuple[Hashable, frozenset[tuple[str, str, str]]]] = {}
        self._used: set[tuple[str, str, str]] = set()
        # Inconsistencies found in the last build (builder bugs; see ``_snapshot``).
        self.problems: list[str] = []
        # Counters for tests and the benchmark: pieces built vs reused in the last build.
        self.built = 0
        self.reused = 0

    def _piece(
        self, key: tuple[str, str, str], inputs: Hashable, make: Callable[[], Piece]
    ) -> Piece:
        self._used.add(key)
        if self._node_keys is not None:
            self._node_keys.add(key)
        hit = self._memo.get(key)
        if hit is not None and hit[0] == inputs:
            self.reused += 1
            return hit[1]
        piece = make()
        self._memo[key] = (inputs, piece)
        self.built += 1
        return piece

    def _res(
        self, node: str, type_url: str, name: str, inputs: Hashable, make: Callable[[], Piece]
    ) -> Resource:
        key = (node, type_url, name)
        self._used.add(key)
        if self._node_keys is not None:
            self._node_keys.add(key)
        hit = self._resources.get(key)
        if hit is not None and hit[0] == inputs:
            self.reused += 1
            return hit[1]
        p = make()
        r = Resource.of(type_url, name, p.body, p.refs)
        self._resources[key] = (inputs, r)
        self.built += 1
        return r

    def _snapshot(self, node: str, resources: list[Resource]) -> Snapshot | None:
        """Reuse the previous snapshot object when every resource is unchanged."""
        sig = tuple((r.type_url, r.name, r.version) for r in resources)
        prev = self._snapshots.get(node)
        if prev is not None and prev[0] == sig:
            return prev[1]
        try:
            snap = Snapshot.create(node, resources)
        except InconsistentSnapshot as exc:
            # A builder bug, not bad input: never publish it; keep serving the last good
            # snapshot of this node (or nothing yet), and say so.
            self.problems.append(str(exc))
            log.error("xds: not publishing node %r: %s", node, exc)
            return None if prev is None else prev[1]
        self._snapshots[node] = (sig, snap)
        return snap

    def build(self, fleet: model.Fleet) -> dict[str, Snapshot]:
        """One snapshot per node; none at all without a PKI (Envoy cannot do TLS)."""
        self._used = set()
        self.built = self.reused = 0
        self.problems = []
        out: dict[str, Snapshot] = {}
        pki = fleet.pki
        if pki is not None:
            idents = dict(pki.identities)
            atlas_ident = idents.get(model.OBSERVABILITY_NODE)
            if atlas_ident is not None:
                snap = self._snapshot(
                    model.OBSERVABILITY_NODE, self._atlas(fleet, pki, atlas_ident)
                )
                if snap is not None:
                    out[model.OBSERVABILITY_NODE] = snap
            for c in fleet.clusters:
                ident = idents.get(c.name)
                if ident is None or c.name == model.OBSERVABILITY_NODE:
                    continue
                snap = self._downstream_snapshot(fleet, c, pki, ident)
                if snap is not None:
                    out[c.name] = snap
        for k in set(self._memo) - self._used:
            del self._memo[k]
        for k in set(self._resources) - self._used:
            del self._resources[k]
        for n in set(self._snapshots) - set(out):
            del self._snapshots[n]
        for n in set(self._node_inputs) - set(out):
            del self._node_inputs[n]
        return out

    def _downstream_snapshot(
        self, fleet: model.Fleet, c: model.DownstreamCluster, pki: model.PKI, ident: model.Identity
    ) -> Snapshot | None:
        """A downstream node's snapshot depends only on these inputs: when they are equal
        to last time, reuse the snapshot without visiting its pieces."""
        inputs = (
            c,
            fleet.settings,
            self.plan.ports_for(c.name),
            ident,
            pki.trust_bundle,
            len(fleet.alertmanagers),
            self._conn_seconds,
        )
        prev = self._node_inputs.get(c.name)
        snap = self._snapshots.get(c.name)
        if prev is not None and snap is not None and prev[0] == inputs:
            self._used |= prev[1]
            self.reused += 1
            return snap[1]
        self._node_keys = set()
        problems = len(self.problems)
        try:
            snapshot = self._snapshot(c.name, self._downstream(fleet, c, pki, ident))
            if len(self.problems) == problems:
                self._node_inputs[c.name] = (inputs, frozenset(self._node_keys))
        finally:
            self._node_keys = None
        return snapshot

    # -- node atlas ------------------------------------------------------------------

    def _atlas(self, fleet: model.Fleet, pki: model.PKI, ident: model.Identity) -> list[Resource]:
        node = model.OBSERVABILITY_NODE
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

        res.append(self._res(node, LISTENER, "xds", (obs,), xds_listener))

        def xds_route() -> Piece:
            # OVERWRITE_IF_EXISTS_OR_ADD replaces any copy a caller sent. (A virtual-host
            # level remove would run after this route-level add and drop it.)
            headers = [(FORWARDER_TOKEN_HEADER, self._token)] if self._token else []
            vh = route_components_pb2.VirtualHost(
                name="xds",
                domains=["*"],
                routes=[make_route(ADS_FORWARD_CLUSTER, streaming=True, headers_to_add=headers)],
            )
            rc = route_pb2.RouteConfiguration(name="xds", virtual_hosts=[vh])
            return Piece(serialize(rc), frozenset({(CLUSTER, ADS_FORWARD_CLUSTER)}))

        res.append(self._res(node, ROUTE, "xds", (self._token,), xds_route))

        def ads_cluster() -> Piece:
            c, refs = make_cluster(
                name=ADS_FORWARD_CLUSTER, host=s.atlasd_ads_host, port=s.atlasd_ads_port, http2=True
            )
            return Piece(serialize(c), refs)

        res.append(
            self._res(
                node,
                CLUSTER,
                ADS_FORWARD_CLUSTER,
                (s.atlasd_ads_host, s.atlasd_ads_port),
                ads_cluster,
            )
        )

        # 10901 Thanos and 10904 Prometheus: one upstream pair per downstream cluster.
        thanos_vhosts: list[bytes] = []
        prom_routes: list[bytes] = []
        route_refs: set[tuple[str, str]] = set()
        for c in fleet.clusters:
            ports = self.plan.ports_for(c.name)
            for kind, port in (("thanos", ports.thanos), ("prom", ports.prometheus)):
                cname = f"{c.name}-{kind}"

                def up(
                    cname: str = cname, c: model.DownstreamCluster = c, port: int = port
                ) -> Piece:
                    cl, refs = make_cluster(
                        name=cname,
                        host=c.external_ip,
                        port=port,
                        http2=True,
                        tls_san=c.name,
                        max_connection_seconds=self._conn_seconds,
                    )
                    return Piece(serialize(cl), refs)

                res.append(self._res(node, CLUSTER, cname, (c.name, c.external_ip, port), up))
                route_refs.add((CLUSTER, cname))

            def thanos_vh(c: model.DownstreamCluster = c) -> Piece:
                domains = [
                    d
                    for svc in c.sidecar_services()
                    for d in host_domains(f"{svc}.{s.namespace}.svc.{s.cluster_domain}")
                ]
                vh = route_components_pb2.VirtualHost(
                    name=f"{c.name}-thanos",
                    domains=domains,
                    routes=[make_route(f"{c.name}-thanos", streaming=True)],
                )
                return Piece(serialize(vh), frozenset())

            thanos_vhosts.append(
                self._piece(
                    (node, "vhost/thanos", c.name),
                    (c.name, c.replicas, s.namespace, s.cluster_domain),
                    thanos_vh,
                ).body
            )

            def prom_route(c: model.DownstreamCluster = c) -> Piece:
                r = make_route(f"{c.name}-prom", prefix=f"/prom/{c.name}/", rewrite="/")
                return Piece(serialize(r), frozenset())

            prom_routes.append(self._piece((node, "route/prom", c.name), c.name, prom_route).body)

        res.append(self._plain_listener(node, "thanos", obs.address, obs.thanos, streaming=True))
        res.append(self._plain_listener(node, "prometheus", obs.address, obs.prometheus))
        thanos_rc = serialize(route_pb2.RouteConfiguration(name="thanos")) + repeated_field(
            VHOSTS_FIELD, thanos_vhosts
        )
        prom_vh = serialize(
            route_components_pb2.VirtualHost(name="prometheus", domains=["*"])
        ) + repeated_field(ROUTES_FIELD, prom_routes)
        prom_rc = serialize(route_pb2.RouteConfiguration(name="prometheus")) + repeated_field(
            VHOSTS_FIELD, [prom_vh]
        )
        thanos_refs = {r for r in route_refs if r[1].endswith("-thanos")}
        res.append(Resource.of(ROUTE, "thanos", thanos_rc, thanos_refs))
        res.append(Resource.of(ROUTE, "prometheus", prom_rc, route_refs - thanos_refs))

        # 10903: alerts from downstream Envoys to the i-th local Alertmanager, each to its
        # own Service. TLS requires a CA-signed client certificate; which clusters may
        # call is per-route RBAC in RDS, so adding or removing a cluster changes the
        # route configuration only (a listener update would drain its connections).
        if fleet.alertmanagers:
            names = tuple(c.name for c in fleet.clusters)

            def am_listener() -> Piece:
                chain, refs = downstream_tls_chain(client_sans=None)
                hcm = make_hcm(
                    stat_prefix="alertmanager", route_name="alertmanager", rbac_deny_by_default=True
                )
                lst = make_listener(
                    name="alertmanager",
                    address=obs.address,
                    port=obs.alertmanager,
                    hcm=hcm,
                    tls_chain=chain,
                )
                return Piece(serialize(lst), refs | {(ROUTE, "alertmanager")})

            res.append(self._res(node, LISTENER, "alertmanager", (obs,), am_listener))
            allow = rbac_allow_principals(names)
            vhosts = []
            am_refs = set()
            for i, am in enumerate(fleet.alertmanagers):
                cname = f"alertmanager{i}"
                host = self.plan.service_host(
                    name=am.name, namespace=am.namespace, domain=s.cluster_domain
                )

                def am_cluster(cname: str = cname, host: str = host, port: int = am.port) -> Piece:
                    cl, refs = make_cluster(name=cname, host=host, port=port, http2=False)
                    return Piece(serialize(cl), refs)

                res.append(self._res(node, CLUSTER, cname, (host, am.port), am_cluster))
                am_refs.add((CLUSTER, cname))
                vh = route_components_pb2.VirtualHost(
                    name=cname,
                    domains=host_domains(f"{cname}.{s.namespace}.svc.{s.cluster_domain}"),
                    routes=[make_route(cname)],
                )
                vh.typed_per_filter_config[RBAC_FILTER].CopyFrom(allow)
                vhosts.append(vh)
            rc = route_pb2.RouteConfiguration(name="alertmanager", virtual_hosts=vhosts)
            res.append(Resource.of(ROUTE, "alertmanager", serialize(rc), am_refs))

        res.extend(self._referenced_secrets(node, res, pki, ident))
        return res

    def _plain_listener(
        self, node: str, name: str, address: str, port: int, *, streaming: bool = False
    ) -> Resource:
        def make() -> Piece:
            hcm = make_hcm(stat_prefix=name, route_name=name, streaming=streaming)
            lst = make_listener(name=name, address=address, port=port, hcm=hcm, tls_chain=None)
            return Piece(serialize(lst), frozenset({(ROUTE, name)}))

        return self._res(node, LISTENER, name, (address, port, streaming), make)

    def _referenced_secrets(
        self, node: str, res: list[Resource], pki: model.PKI, ident: model.Identity
    ) -> list[Resource]:
        wanted = {name for r in res for t, name in r.refs if t == SECRET}
        out: list[Resource] = []
        if VALIDATION_SECRET in wanted:
            bundle = pki.trust_bundle
            out.append(
                self._res(
                    node, SECRET, VALIDATION_SECRET, bundle, lambda: validation_secret(bundle)
                )
            )
        for name, ck in ((SERVER_SECRET, ident.server), (CLIENT_SECRET, ident.client)):
            if name in wanted:

                def make(name: str = name, ck: model.CertKey = ck) -> Piece:
                    return tls_secret(name, ck)

                out.append(self._res(node, SECRET, name, ck, make))
        return out

    # -- node <cluster> --------------------------------------------------------------

    def _downstream(
        self, fleet: model.Fleet, c: model.DownstreamCluster, pki: model.PKI, ident: model.Identity
    ) -> list[Resource]:
        node = c.name
        s = fleet.settings
        ports = self.plan.ports_for(c.name)
        res: list[Resource] = []
        atlas = [model.OBSERVABILITY_NODE]

        for name, port in (("thanos", ports.thanos), ("prometheus", ports.prometheus)):

            def mtls_listener(name: str = name, port: int = port) -> Piece:
                chain, refs = downstream_tls_chain(client_sans=atlas)
                hcm = make_hcm(stat_prefix=name, route_name=name, streaming=name == "thanos")
                lst = make_listener(
                    name=name, address=ports.address, port=port, hcm=hcm, tls_chain=chain
                )
                return Piece(serialize(lst), refs | {(ROUTE, name)})

            res.append(self._res(node, LISTENER, name, (ports.address, port), mtls_listener))

        # Replica pinning: the authority names the sidecar Service of replica i.
        def thanos_routes() -> Piece:
            vhosts = [
                route_components_pb2.VirtualHost(
                    name=f"thanos{i}",
                    domains=host_domains(
                        f"{c.sidecar_service(i)}.{s.namespace}.svc.{s.cluster_domain}"
                    ),
                    routes=[make_route(f"thanos{i}", streaming=True)],
                )
                for i in range(c.replicas)
            ]
            rc = route_pb2.RouteConfiguration(name="thanos", virtual_hosts=vhosts)
            return Piece(
                serialize(rc), frozenset((CLUSTER, f"thanos{i}") for i in range(c.replicas))
            )

        res.append(
            self._res(
                node,
                ROUTE,
                "thanos",
                (c.name, c.replicas, s.namespace, s.cluster_domain),
                thanos_routes,
            )
        )
        for i in range(c.replicas):
            up = c.thanos_upstream(i)

            def thanos_cluster(i: int = i, up: model.Upstream = up) -> Piece:
                cl, refs = make_cluster(name=f"thanos{i}", host=up.host, port=up.port, http2=True)
                return Piece(serialize(cl), refs)

            res.append(self._res(node, CLUSTER, f"thanos{i}", up, thanos_cluster))

        def prom_routes() -> Piece:
            vh = route_components_pb2.VirtualHost(
                name="prometheus", domains=["*"], routes=[make_route("prometheus")]
            )
            rc = route_pb2.RouteConfiguration(name="prometheus", virtual_hosts=[vh])
            return Piece(serialize(rc), frozenset({(CLUSTER, "prometheus")}))

        res.append(self._res(node, ROUTE, "prometheus", (), prom_routes))

        def prom_cluster() -> Piece:
            cl, refs = make_cluster(
                name="prometheus", host=c.prometheus.host, port=c.prometheus.port, http2=False
            )
            return Piece(serialize(cl), refs)

        res.append(self._res(node, CLUSTER, "prometheus", c.prometheus, prom_cluster))

        # 11903: local alerts -> observability Envoy 10903 over mTLS. Authorities naming an
        # Alertmanager are kept; anything else goes to alertmanager0.
        if fleet.alertmanagers:
            n_am = len(fleet.alertmanagers)

            def relay_listener() -> Piece:
                hcm = make_hcm(stat_prefix="alertmanager", route_name="alertmanager")
                lst = make_listener(
                    name="alertmanager",
                    address=ports.address,
                    port=ports.alertmanager,
                    hcm=hcm,
                    tls_chain=None,
                )
                return Piece(serialize(lst), frozenset({(ROUTE, "alertmanager")}))

            res.append(
                self._res(
                    node,
                    LISTENER,
                    "alertmanager",
                    (ports.address, ports.alertmanager),
                    relay_listener,
                )
            )

            def relay_routes() -> Piece:
                hosts = [
                    f"alertmanager{i}.{s.namespace}.svc.{s.cluster_domain}" for i in range(n_am)
                ]
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

            res.append(
                self._res(
                    node, ROUTE, "alertmanager", (n_am, s.namespace, s.cluster_domain), relay_routes
                )
            )

            def relay_cluster() -> Piece:
                cl, refs = make_cluster(
                    name=ATLAS_ALERTMANAGER_CLUSTER,
                    host=s.envoy_address,
                    port=s.envoy_alertmanager_port,
                    http2=True,
                    tls_san=model.OBSERVABILITY_NODE,
                    max_connection_seconds=self._conn_seconds,
                )
                return Piece(serialize(cl), refs)

            res.append(
                self._res(
                    node,
                    CLUSTER,
                    ATLAS_ALERTMANAGER_CLUSTER,
                    (s.envoy_address, s.envoy_alertmanager_port),
                    relay_cluster,
                )
            )

        res.extend(self._referenced_secrets(node, res, pki, ident))
        return res


def build_snapshots(fleet: model.Fleet, plan: ListenPlan | None = None) -> dict[str, Snapshot]:
    """One-shot form of ``SnapshotBuilder(plan).build(fleet)`` (no memo kept)."""
    return SnapshotBuilder(plan).build(fleet)
