"""Pure builders: ``model.Fleet`` -> one ``Snapshot`` per Envoy node.

Node ``atlas`` (the observability Envoy):

- ``xds`` (10900): TLS, client certificate required; forwards gRPC to atlasd's ADS port
  with ``x-forwarded-client-cert`` (SANITIZE_SET, DNS and URI SANs) so atlasd can check
  that the certificate names the node it asks for (see docs/xds-authorization.md).
- ``thanos`` (10901): plaintext; authority ``<cluster>-thanos-sidecar<i>.<ns>.svc.<domain>``
  (with or without a port) -> ``<cluster>-thanos`` (mTLS, HTTP/2, SAN = cluster name).
- ``prometheus`` (10904): plaintext; ``/prom/<cluster>/`` rewritten to ``/`` ->
  ``<cluster>-prom`` (mTLS, SAN = cluster name).
- ``alertmanager`` (10903, only with local Alertmanagers and at least one cluster): TLS,
  client certificate of a current cluster required; authority ``alertmanager<i>...``
  -> ``alertmanager<i>``, each its own local Service.

Node ``<cluster>``: ``thanos`` (11901) and ``prometheus`` (11904) terminate mTLS (client
SAN must be ``atlas``) and forward to the local components, one Thanos cluster per
replica chosen by authority (replica pinning); ``alertmanager`` (11903, only when the
observability cluster has Alertmanagers) relays plaintext local alerts over mTLS to the
observability Envoy's 10903.

Certificates: every identity's SAN DNS is its node id (``atlas`` or the cluster name).
Secrets are served by SDS over ADS under the names ``validation``, ``server``, ``client``;
only the referenced ones are included.

Work is proportional to change: ``SnapshotBuilder`` memoizes every serialized resource
keyed by (node, type, name) together with the inputs it was built from, and the large
route configurations of node ``atlas`` are assembled from cached per-cluster pieces by
concatenating their encoded bytes (protobuf repeated fields may be encoded piecewise).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2, base_pb2, config_source_pb2, protocol_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, secret_pb2, tls_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from envoy.type.matcher.v3 import string_pb2
from google.protobuf import (  # type: ignore[import-untyped]
    any_pb2,
    duration_pb2,
    message,
    wrappers_pb2,
)

from atlasd import model
from atlasd.xds.plan import ListenPlan
from atlasd.xds.snapshot import CLUSTER, LISTENER, ROUTE, SECRET, Resource, Snapshot

VALIDATION_SECRET = "validation"
SERVER_SECRET = "server"
CLIENT_SECRET = "client"
# Dynamic cluster behind 10900. Must differ from the static ADS cluster of the
# observability Envoy's bootstrap (Envoy refuses a CDS cluster shadowing a static one).
ADS_FORWARD_CLUSTER = "atlasd-ads-forward"
ATLAS_ALERTMANAGER_CLUSTER = "atlas-alertmanager"
FORWARDER_TOKEN_HEADER = "x-atlasd-forwarder-token"
XFCC_HEADER = "x-forwarded-client-cert"

_HTTP_PROTOCOL_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


# ---------------------------------------------------------------------------------------
# protobuf helpers


@dataclass(frozen=True)
class _Piece:
    """A cached serialized fragment (a resource body or a route/virtual host)."""

    body: bytes
    refs: frozenset[tuple[str, str]]


def _any(msg: message.Message) -> any_pb2.Any:
    a = any_pb2.Any()
    a.Pack(msg)
    return a


def _ser(msg: message.Message) -> bytes:
    return bytes(msg.SerializeToString(deterministic=True))


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _repeated(field_number: int, items: Iterable[bytes]) -> bytes:
    """Encode already-serialized messages as occurrences of a length-delimited field."""
    tag = _varint((field_number << 3) | 2)
    return b"".join(tag + _varint(len(b)) + b for b in items)


_VHOSTS_FIELD = route_pb2.RouteConfiguration.DESCRIPTOR.fields_by_name["virtual_hosts"].number
_ROUTES_FIELD = route_components_pb2.VirtualHost.DESCRIPTOR.fields_by_name["routes"].number


def _sds(name: str) -> secret_pb2.SdsSecretConfig:
    return secret_pb2.SdsSecretConfig(
        name=name,
        sds_config=config_source_pb2.ConfigSource(
            ads=config_source_pb2.AggregatedConfigSource(),
            resource_api_version=config_source_pb2.ApiVersion.V3,
        ),
    )


def _san_matchers(names: Sequence[str]) -> list[common_pb2.SubjectAltNameMatcher]:
    return [
        common_pb2.SubjectAltNameMatcher(
            san_type=common_pb2.SubjectAltNameMatcher.DNS,
            matcher=string_pb2.StringMatcher(exact=n),
        )
        for n in names
    ]


def _validation(
    san: Sequence[str],
) -> tls_pb2.CommonTlsContext.CombinedCertificateValidationContext:
    return tls_pb2.CommonTlsContext.CombinedCertificateValidationContext(
        default_validation_context=common_pb2.CertificateValidationContext(
            match_typed_subject_alt_names=_san_matchers(san)
        ),
        validation_context_sds_secret_config=_sds(VALIDATION_SECRET),
    )


def _downstream_tls(
    *, client_sans: Sequence[str] | None
) -> tuple[listener_components_pb2.FilterChain, frozenset[tuple[str, str]]]:
    """A TLS filter chain requiring a client certificate (``client_sans`` None: any SAN)."""
    common = tls_pb2.CommonTlsContext(
        tls_certificate_sds_secret_configs=[_sds(SERVER_SECRET)],
        alpn_protocols=["h2", "http/1.1"],
    )
    if client_sans is None:
        common.validation_context_sds_secret_config.CopyFrom(_sds(VALIDATION_SECRET))
    else:
        common.combined_validation_context.CopyFrom(_validation(client_sans))
    ctx = tls_pb2.DownstreamTlsContext(
        common_tls_context=common,
        require_client_certificate=wrappers_pb2.BoolValue(value=True),
    )
    chain = listener_components_pb2.FilterChain(
        transport_socket=base_pb2.TransportSocket(
            name="envoy.transport_sockets.tls", typed_config=_any(ctx)
        )
    )
    return chain, frozenset({(SECRET, SERVER_SECRET), (SECRET, VALIDATION_SECRET)})


def _hcm(
    *,
    stat_prefix: str,
    route_name: str,
    streaming: bool = False,
    forward_client_cert: bool = False,
) -> hcm_pb2.HttpConnectionManager:
    hcm = hcm_pb2.HttpConnectionManager(
        stat_prefix=stat_prefix,
        codec_type=hcm_pb2.HttpConnectionManager.AUTO,
        rds=hcm_pb2.Rds(
            config_source=config_source_pb2.ConfigSource(
                ads=config_source_pb2.AggregatedConfigSource(),
                resource_api_version=config_source_pb2.ApiVersion.V3,
            ),
            route_config_name=route_name,
        ),
        http_filters=[
            hcm_pb2.HttpFilter(
                name="envoy.filters.http.router", typed_config=_any(router_pb2.Router())
            )
        ],
    )
    if streaming:
        # gRPC streams (xDS, Thanos StoreAPI series) may stay quiet for long.
        hcm.stream_idle_timeout.CopyFrom(duration_pb2.Duration(seconds=0))
    if forward_client_cert:
        hcm.forward_client_cert_details = hcm_pb2.HttpConnectionManager.SANITIZE_SET
        hcm.set_current_client_cert_details.CopyFrom(
            hcm_pb2.HttpConnectionManager.SetCurrentClientCertDetails(dns=True, uri=True)
        )
    return hcm


def _listener(
    *,
    name: str,
    address: str,
    port: int,
    hcm: hcm_pb2.HttpConnectionManager,
    tls_chain: listener_components_pb2.FilterChain | None,
) -> listener_pb2.Listener:
    chain = listener_components_pb2.FilterChain()
    if tls_chain is not None:
        chain.CopyFrom(tls_chain)
    chain.filters.append(
        listener_components_pb2.Filter(
            name="envoy.filters.network.http_connection_manager", typed_config=_any(hcm)
        )
    )
    return listener_pb2.Listener(
        name=name,
        address=address_pb2.Address(
            socket_address=address_pb2.SocketAddress(address=address, port_value=port)
        ),
        filter_chains=[chain],
    )


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _cluster(
    *,
    name: str,
    host: str,
    port: int,
    http2: bool,
    tls_san: str | None = None,
    max_connection_seconds: int | None = None,
) -> tuple[cluster_pb2.Cluster, frozenset[tuple[str, str]]]:
    """An upstream cluster with its endpoint inline (no EDS); mTLS when ``tls_san`` is set."""
    c = cluster_pb2.Cluster(
        name=name,
        type=cluster_pb2.Cluster.STATIC if _is_ip(host) else cluster_pb2.Cluster.STRICT_DNS,
        connect_timeout=duration_pb2.Duration(seconds=5),
        load_assignment=endpoint_pb2.ClusterLoadAssignment(
            cluster_name=name,
            endpoints=[
                endpoint_components_pb2.LocalityLbEndpoints(
                    lb_endpoints=[
                        endpoint_components_pb2.LbEndpoint(
                            endpoint=endpoint_components_pb2.Endpoint(
                                address=address_pb2.Address(
                                    socket_address=address_pb2.SocketAddress(
                                        address=host, port_value=port
                                    )
                                )
                            )
                        )
                    ]
                )
            ],
        ),
    )
    if http2:
        opts = http_protocol_options_pb2.HttpProtocolOptions(
            explicit_http_config=http_protocol_options_pb2.HttpProtocolOptions.ExplicitHttpConfig(
                http2_protocol_options=protocol_pb2.Http2ProtocolOptions()
            )
        )
        if max_connection_seconds is not None:
            # Bounds how long a connection authenticated by a rotated-out certificate lives.
            opts.common_http_protocol_options.max_connection_duration.CopyFrom(
                duration_pb2.Duration(seconds=max_connection_seconds)
            )
        c.typed_extension_protocol_options[_HTTP_PROTOCOL_OPTIONS].CopyFrom(_any(opts))
    refs: frozenset[tuple[str, str]] = frozenset()
    if tls_san is not None:
        ctx = tls_pb2.UpstreamTlsContext(
            common_tls_context=tls_pb2.CommonTlsContext(
                tls_certificate_sds_secret_configs=[_sds(CLIENT_SECRET)],
                combined_validation_context=_validation([tls_san]),
                alpn_protocols=["h2"] if http2 else ["http/1.1"],
            ),
            sni=tls_san,
        )
        c.transport_socket.CopyFrom(
            base_pb2.TransportSocket(name="envoy.transport_sockets.tls", typed_config=_any(ctx))
        )
        refs = frozenset({(SECRET, CLIENT_SECRET), (SECRET, VALIDATION_SECRET)})
    return c, refs


def _route(
    cluster: str,
    *,
    prefix: str = "/",
    rewrite: str | None = None,
    host_rewrite: str | None = None,
    streaming: bool = False,
    headers_to_add: Sequence[tuple[str, str]] = (),
) -> route_components_pb2.Route:
    action = route_components_pb2.RouteAction(cluster=cluster)
    if rewrite is not None:
        action.prefix_rewrite = rewrite
    if host_rewrite is not None:
        action.host_rewrite_literal = host_rewrite
    if streaming:
        action.timeout.CopyFrom(duration_pb2.Duration(seconds=0))
    r = route_components_pb2.Route(
        match=route_components_pb2.RouteMatch(prefix=prefix),
        route=action,
    )
    for k, v in headers_to_add:
        r.request_headers_to_add.append(
            base_pb2.HeaderValueOption(
                header=base_pb2.HeaderValue(key=k, value=v),
                append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
            )
        )
    return r


def _host_domains(host: str) -> list[str]:
    """The authority with and without a port (``host:*`` is an Envoy prefix wildcard)."""
    return [host, f"{host}:*"]


def _tls_secret(name: str, ck: model.CertKey) -> _Piece:
    s = secret_pb2.Secret(
        name=name,
        tls_certificate=common_pb2.TlsCertificate(
            certificate_chain=base_pb2.DataSource(inline_bytes=ck.cert_pem),
            private_key=base_pb2.DataSource(inline_bytes=ck.key_pem),
        ),
    )
    return _Piece(_ser(s), frozenset())


def _validation_secret(bundle: bytes) -> _Piece:
    s = secret_pb2.Secret(
        name=VALIDATION_SECRET,
        validation_context=common_pb2.CertificateValidationContext(
            trusted_ca=base_pb2.DataSource(inline_bytes=bundle)
        ),
    )
    return _Piece(_ser(s), frozenset())


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
        self._memo: dict[tuple[str, str, str], tuple[Hashable, _Piece]] = {}
        self._resources: dict[tuple[str, str, str], tuple[Hashable, Resource]] = {}
        self._snapshots: dict[str, tuple[tuple[tuple[str, str, str], ...], Snapshot]] = {}
        # Keys used while building the current downstream node (None: not tracking).
        self._node_keys: set[tuple[str, str, str]] | None = None
        # node -> (inputs, memo keys it used): the downstream fast path.
        self._node_inputs: dict[str, tuple[Hashable, frozenset[tuple[str, str, str]]]] = {}
        self._used: set[tuple[str, str, str]] = set()
        # Counters for tests and the benchmark: pieces built vs reused in the last build.
        self.built = 0
        self.reused = 0

    def _piece(
        self, key: tuple[str, str, str], inputs: Hashable, make: Callable[[], _Piece]
    ) -> _Piece:
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
        self, node: str, type_url: str, name: str, inputs: Hashable, make: Callable[[], _Piece]
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

    def _snapshot(self, node: str, resources: list[Resource]) -> Snapshot:
        """Reuse the previous snapshot object when every resource is unchanged."""
        sig = tuple((r.type_url, r.name, r.version) for r in resources)
        prev = self._snapshots.get(node)
        if prev is not None and prev[0] == sig:
            return prev[1]
        snap = Snapshot.create(node, resources)
        self._snapshots[node] = (sig, snap)
        return snap

    def build(self, fleet: model.Fleet) -> dict[str, Snapshot]:
        """One snapshot per node; none at all without a PKI (Envoy cannot do TLS)."""
        self._used = set()
        self.built = self.reused = 0
        out: dict[str, Snapshot] = {}
        pki = fleet.pki
        if pki is not None:
            idents = dict(pki.identities)
            atlas_ident = idents.get(model.OBSERVABILITY_NODE)
            if atlas_ident is not None:
                out[model.OBSERVABILITY_NODE] = self._snapshot(
                    model.OBSERVABILITY_NODE, self._atlas(fleet, pki, atlas_ident)
                )
            for c in fleet.clusters:
                ident = idents.get(c.name)
                if ident is None or c.name == model.OBSERVABILITY_NODE:
                    continue
                out[c.name] = self._downstream_snapshot(fleet, c, pki, ident)
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
    ) -> Snapshot:
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
        try:
            snapshot = self._snapshot(c.name, self._downstream(fleet, c, pki, ident))
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
        def xds_listener() -> _Piece:
            chain, refs = _downstream_tls(client_sans=None)
            hcm = _hcm(
                stat_prefix="xds", route_name="xds", streaming=True, forward_client_cert=True
            )
            lst = _listener(name="xds", address=obs.address, port=obs.xds, hcm=hcm, tls_chain=chain)
            return _Piece(_ser(lst), refs | {(ROUTE, "xds")})

        res.append(self._res(node, LISTENER, "xds", (obs,), xds_listener))

        def xds_route() -> _Piece:
            # OVERWRITE_IF_EXISTS_OR_ADD replaces any copy a caller sent. (A virtual-host
            # level remove would run after this route-level add and drop it.)
            headers = [(FORWARDER_TOKEN_HEADER, self._token)] if self._token else []
            vh = route_components_pb2.VirtualHost(
                name="xds",
                domains=["*"],
                routes=[_route(ADS_FORWARD_CLUSTER, streaming=True, headers_to_add=headers)],
            )
            rc = route_pb2.RouteConfiguration(name="xds", virtual_hosts=[vh])
            return _Piece(_ser(rc), frozenset({(CLUSTER, ADS_FORWARD_CLUSTER)}))

        res.append(self._res(node, ROUTE, "xds", (self._token,), xds_route))

        def ads_cluster() -> _Piece:
            c, refs = _cluster(
                name=ADS_FORWARD_CLUSTER, host=s.atlasd_ads_host, port=s.atlasd_ads_port, http2=True
            )
            return _Piece(_ser(c), refs)

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
                ) -> _Piece:
                    cl, refs = _cluster(
                        name=cname,
                        host=c.external_ip,
                        port=port,
                        http2=True,
                        tls_san=c.name,
                        max_connection_seconds=self._conn_seconds,
                    )
                    return _Piece(_ser(cl), refs)

                res.append(self._res(node, CLUSTER, cname, (c.name, c.external_ip, port), up))
                route_refs.add((CLUSTER, cname))

            def thanos_vh(c: model.DownstreamCluster = c) -> _Piece:
                domains = [
                    d
                    for svc in c.sidecar_services()
                    for d in _host_domains(f"{svc}.{s.namespace}.svc.{s.cluster_domain}")
                ]
                vh = route_components_pb2.VirtualHost(
                    name=f"{c.name}-thanos",
                    domains=domains,
                    routes=[_route(f"{c.name}-thanos", streaming=True)],
                )
                return _Piece(_ser(vh), frozenset())

            thanos_vhosts.append(
                self._piece(
                    (node, "vhost/thanos", c.name),
                    (c.name, c.replicas, s.namespace, s.cluster_domain),
                    thanos_vh,
                ).body
            )

            def prom_route(c: model.DownstreamCluster = c) -> _Piece:
                r = _route(f"{c.name}-prom", prefix=f"/prom/{c.name}/", rewrite="/")
                return _Piece(_ser(r), frozenset())

            prom_routes.append(self._piece((node, "route/prom", c.name), c.name, prom_route).body)

        res.append(self._plain_listener(node, "thanos", obs.address, obs.thanos, streaming=True))
        res.append(self._plain_listener(node, "prometheus", obs.address, obs.prometheus))
        thanos_rc = _ser(route_pb2.RouteConfiguration(name="thanos")) + _repeated(
            _VHOSTS_FIELD, thanos_vhosts
        )
        prom_vh = _ser(
            route_components_pb2.VirtualHost(name="prometheus", domains=["*"])
        ) + _repeated(_ROUTES_FIELD, prom_routes)
        prom_rc = _ser(route_pb2.RouteConfiguration(name="prometheus")) + _repeated(
            _VHOSTS_FIELD, [prom_vh]
        )
        thanos_refs = {r for r in route_refs if r[1].endswith("-thanos")}
        res.append(Resource.of(ROUTE, "thanos", thanos_rc, thanos_refs))
        res.append(Resource.of(ROUTE, "prometheus", prom_rc, route_refs - thanos_refs))

        # 10903: alerts from downstream Envoys (client cert of a current cluster) to the
        # i-th local Alertmanager, each to its own Service.
        if fleet.alertmanagers and fleet.clusters:
            names = tuple(c.name for c in fleet.clusters)

            def am_listener() -> _Piece:
                chain, refs = _downstream_tls(client_sans=names)
                hcm = _hcm(stat_prefix="alertmanager", route_name="alertmanager")
                lst = _listener(
                    name="alertmanager",
                    address=obs.address,
                    port=obs.alertmanager,
                    hcm=hcm,
                    tls_chain=chain,
                )
                return _Piece(_ser(lst), refs | {(ROUTE, "alertmanager")})

            res.append(self._res(node, LISTENER, "alertmanager", (obs, names), am_listener))
            vhosts = []
            am_refs = set()
            for i, am in enumerate(fleet.alertmanagers):
                cname = f"alertmanager{i}"
                host = self.plan.service_host(
                    name=am.name, namespace=am.namespace, domain=s.cluster_domain
                )

                def am_cluster(cname: str = cname, host: str = host, port: int = am.port) -> _Piece:
                    cl, refs = _cluster(name=cname, host=host, port=port, http2=False)
                    return _Piece(_ser(cl), refs)

                res.append(self._res(node, CLUSTER, cname, (host, am.port), am_cluster))
                am_refs.add((CLUSTER, cname))
                vhosts.append(
                    route_components_pb2.VirtualHost(
                        name=cname,
                        domains=_host_domains(f"{cname}.{s.namespace}.svc.{s.cluster_domain}"),
                        routes=[_route(cname)],
                    )
                )
            rc = route_pb2.RouteConfiguration(name="alertmanager", virtual_hosts=vhosts)
            res.append(Resource.of(ROUTE, "alertmanager", _ser(rc), am_refs))

        res.extend(self._referenced_secrets(node, res, pki, ident))
        return res

    def _plain_listener(
        self, node: str, name: str, address: str, port: int, *, streaming: bool = False
    ) -> Resource:
        def make() -> _Piece:
            hcm = _hcm(stat_prefix=name, route_name=name, streaming=streaming)
            lst = _listener(name=name, address=address, port=port, hcm=hcm, tls_chain=None)
            return _Piece(_ser(lst), frozenset({(ROUTE, name)}))

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
                    node, SECRET, VALIDATION_SECRET, bundle, lambda: _validation_secret(bundle)
                )
            )
        for name, ck in ((SERVER_SECRET, ident.server), (CLIENT_SECRET, ident.client)):
            if name in wanted:

                def make(name: str = name, ck: model.CertKey = ck) -> _Piece:
                    return _tls_secret(name, ck)

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

            def mtls_listener(name: str = name, port: int = port) -> _Piece:
                chain, refs = _downstream_tls(client_sans=atlas)
                hcm = _hcm(stat_prefix=name, route_name=name, streaming=name == "thanos")
                lst = _listener(
                    name=name, address=ports.address, port=port, hcm=hcm, tls_chain=chain
                )
                return _Piece(_ser(lst), refs | {(ROUTE, name)})

            res.append(self._res(node, LISTENER, name, (ports.address, port), mtls_listener))

        # Replica pinning: the authority names the sidecar Service of replica i.
        def thanos_routes() -> _Piece:
            vhosts = [
                route_components_pb2.VirtualHost(
                    name=f"thanos{i}",
                    domains=_host_domains(
                        f"{c.sidecar_service(i)}.{s.namespace}.svc.{s.cluster_domain}"
                    ),
                    routes=[_route(f"thanos{i}", streaming=True)],
                )
                for i in range(c.replicas)
            ]
            rc = route_pb2.RouteConfiguration(name="thanos", virtual_hosts=vhosts)
            return _Piece(_ser(rc), frozenset((CLUSTER, f"thanos{i}") for i in range(c.replicas)))

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

            def thanos_cluster(i: int = i, up: model.Upstream = up) -> _Piece:
                cl, refs = _cluster(name=f"thanos{i}", host=up.host, port=up.port, http2=True)
                return _Piece(_ser(cl), refs)

            res.append(self._res(node, CLUSTER, f"thanos{i}", up, thanos_cluster))

        def prom_routes() -> _Piece:
            vh = route_components_pb2.VirtualHost(
                name="prometheus", domains=["*"], routes=[_route("prometheus")]
            )
            rc = route_pb2.RouteConfiguration(name="prometheus", virtual_hosts=[vh])
            return _Piece(_ser(rc), frozenset({(CLUSTER, "prometheus")}))

        res.append(self._res(node, ROUTE, "prometheus", (), prom_routes))

        def prom_cluster() -> _Piece:
            cl, refs = _cluster(
                name="prometheus", host=c.prometheus.host, port=c.prometheus.port, http2=False
            )
            return _Piece(_ser(cl), refs)

        res.append(self._res(node, CLUSTER, "prometheus", c.prometheus, prom_cluster))

        # 11903: local alerts -> observability Envoy 10903 over mTLS. Authorities naming an
        # Alertmanager are kept; anything else goes to alertmanager0.
        if fleet.alertmanagers:
            n_am = len(fleet.alertmanagers)

            def relay_listener() -> _Piece:
                hcm = _hcm(stat_prefix="alertmanager", route_name="alertmanager")
                lst = _listener(
                    name="alertmanager",
                    address=ports.address,
                    port=ports.alertmanager,
                    hcm=hcm,
                    tls_chain=None,
                )
                return _Piece(_ser(lst), frozenset({(ROUTE, "alertmanager")}))

            res.append(
                self._res(
                    node,
                    LISTENER,
                    "alertmanager",
                    (ports.address, ports.alertmanager),
                    relay_listener,
                )
            )

            def relay_routes() -> _Piece:
                hosts = [
                    f"alertmanager{i}.{s.namespace}.svc.{s.cluster_domain}" for i in range(n_am)
                ]
                vhosts = [
                    route_components_pb2.VirtualHost(
                        name=f"alertmanager{i}",
                        domains=_host_domains(h),
                        routes=[_route(ATLAS_ALERTMANAGER_CLUSTER)],
                    )
                    for i, h in enumerate(hosts)
                ]
                vhosts.append(
                    route_components_pb2.VirtualHost(
                        name="default",
                        domains=["*"],
                        routes=[_route(ATLAS_ALERTMANAGER_CLUSTER, host_rewrite=hosts[0])],
                    )
                )
                rc = route_pb2.RouteConfiguration(name="alertmanager", virtual_hosts=vhosts)
                return _Piece(_ser(rc), frozenset({(CLUSTER, ATLAS_ALERTMANAGER_CLUSTER)}))

            res.append(
                self._res(
                    node, ROUTE, "alertmanager", (n_am, s.namespace, s.cluster_domain), relay_routes
                )
            )

            def relay_cluster() -> _Piece:
                cl, refs = _cluster(
                    name=ATLAS_ALERTMANAGER_CLUSTER,
                    host=s.envoy_address,
                    port=s.envoy_alertmanager_port,
                    http2=True,
                    tls_san=model.OBSERVABILITY_NODE,
                    max_connection_seconds=self._conn_seconds,
                )
                return _Piece(_ser(cl), refs)

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
