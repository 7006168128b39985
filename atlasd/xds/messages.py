"""Constructors of the Envoy v3 messages the builders assemble (pure, no state).

Only non-deprecated fields are used (``tests/unit/xds/test_builders.py`` walks every
built resource for deprecated fields and enum values). TLS material is always named
through SDS (``validation``, ``server``, ``client``): over ADS, or — for an enrolled
cluster's node, with ``sds_dir`` — from the files its agent writes (``atlasd.certdir``);
only ``tls_secret`` and ``validation_secret`` carry certificates and keys.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from envoy.config.accesslog.v3 import accesslog_pb2
from envoy.config.cluster.v3 import circuit_breaker_pb2, cluster_pb2, outlier_detection_pb2
from envoy.config.core.v3 import address_pb2, base_pb2, config_source_pb2, protocol_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.rbac.v3 import rbac_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2, scoped_route_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as rbac_filter_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.retry.host.previous_hosts.v3 import previous_hosts_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, secret_pb2, tls_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from envoy.type.matcher.v3 import string_pb2
from google.protobuf import (  # type: ignore[import-untyped]
    any_pb2,
    duration_pb2,
    message,
    wrappers_pb2,
)

from atlasd import certdir, model
from atlasd.addresses import is_ip_literal
from atlasd.xds.snapshot import ENDPOINT, SECRET, field_bytes

VALIDATION_SECRET = "validation"
SERVER_SECRET = "server"
CLIENT_SECRET = "client"
# Dynamic cluster behind 10900. Must differ from the static ADS cluster of the
# observability Envoy's bootstrap (Envoy refuses a CDS cluster shadowing a static one).
ADS_FORWARD_CLUSTER = "atlasd-ads-forward"
ATLAS_ALERTMANAGER_CLUSTER = "atlas-alertmanager"
RBAC_FILTER = "envoy.filters.http.rbac"
XFCC_HEADER = "x-forwarded-client-cert"

HTTP_PROTOCOL_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


# ---------------------------------------------------------------------------------------
# protobuf helpers


@dataclass(frozen=True)
class Piece:
    """A cached serialized fragment (a resource body or a route/virtual host)."""

    body: bytes = field(repr=False)  # may hold a private key
    refs: frozenset[tuple[str, str]] = frozenset()


def pack(msg: message.Message) -> any_pb2.Any:
    a = any_pb2.Any()
    a.Pack(msg)
    return a


def serialize(msg: message.Message) -> bytes:
    return bytes(msg.SerializeToString(deterministic=True))


def repeated_field(field_number: int, items: Iterable[bytes]) -> bytes:
    """Encode already-serialized messages as occurrences of a length-delimited field."""
    return b"".join(field_bytes(field_number, b) for b in items)


def sds_ref(name: str, sds_dir: str | None = None) -> secret_pb2.SdsSecretConfig:
    """Secret ``name`` over ADS, or with ``sds_dir`` from the agent's files there (its
    ``sds-<name>.yaml``, the directory watched: the agent's swap reloads them together)."""
    if sds_dir is not None:
        source = config_source_pb2.ConfigSource(
            path_config_source=config_source_pb2.PathConfigSource(
                path=certdir.sds_path(sds_dir, name),
                watched_directory=base_pb2.WatchedDirectory(path=sds_dir),
            ),
            resource_api_version=config_source_pb2.ApiVersion.V3,
        )
    else:
        source = config_source_pb2.ConfigSource(
            ads=config_source_pb2.AggregatedConfigSource(),
            resource_api_version=config_source_pb2.ApiVersion.V3,
        )
    return secret_pb2.SdsSecretConfig(name=name, sds_config=source)


def _secret_refs(names: Iterable[str], sds_dir: str | None) -> frozenset[tuple[str, str]]:
    """What a resource naming ``names`` needs in its snapshot: the secrets, unless they
    come from files."""
    return frozenset() if sds_dir is not None else frozenset((SECRET, n) for n in names)


def san_matchers(names: Sequence[str]) -> list[common_pb2.SubjectAltNameMatcher]:
    return [
        common_pb2.SubjectAltNameMatcher(
            san_type=common_pb2.SubjectAltNameMatcher.DNS,
            matcher=string_pb2.StringMatcher(exact=n),
        )
        for n in names
    ]


def validation_with_sans(
    san: Sequence[str], *, crl: bytes = b"", sds_dir: str | None = None
) -> tls_pb2.CommonTlsContext.CombinedCertificateValidationContext:
    """The peer must name one of ``san`` and chain to the CA bundle (SDS ``validation``,
    merged into this context by Envoy); with ``crl`` (PEM, signed by the current CA), a
    peer certificate whose serial it lists is refused in the handshake. Only the leaf is
    checked against it (``only_verify_leaf_cert_crl``): the CAs have no CRL of their own."""
    ctx = common_pb2.CertificateValidationContext(match_typed_subject_alt_names=san_matchers(san))
    if crl:
        ctx.crl.inline_bytes = crl
        ctx.only_verify_leaf_cert_crl = True
    return tls_pb2.CommonTlsContext.CombinedCertificateValidationContext(
        default_validation_context=ctx,
        validation_context_sds_secret_config=sds_ref(VALIDATION_SECRET, sds_dir),
    )


def downstream_tls_chain(
    *, client_sans: Sequence[str] | None, sds_dir: str | None = None
) -> tuple[listener_components_pb2.FilterChain, frozenset[tuple[str, str]]]:
    """A TLS filter chain requiring a client certificate (``client_sans`` None: any SAN);
    its secrets from the agent's files in ``sds_dir`` when given (``sds_ref``)."""
    common = tls_pb2.CommonTlsContext(
        tls_certificate_sds_secret_configs=[sds_ref(SERVER_SECRET, sds_dir)],
        alpn_protocols=["h2", "http/1.1"],
    )
    if client_sans is None:
        common.validation_context_sds_secret_config.CopyFrom(sds_ref(VALIDATION_SECRET, sds_dir))
    else:
        common.combined_validation_context.CopyFrom(
            validation_with_sans(client_sans, sds_dir=sds_dir)
        )
    ctx = tls_pb2.DownstreamTlsContext(
        common_tls_context=common,
        require_client_certificate=wrappers_pb2.BoolValue(value=True),
    )
    chain = listener_components_pb2.FilterChain(
        transport_socket=base_pb2.TransportSocket(
            name="envoy.transport_sockets.tls", typed_config=pack(ctx)
        )
    )
    return chain, _secret_refs((SERVER_SECRET, VALIDATION_SECRET), sds_dir)


def _ads_source() -> config_source_pb2.ConfigSource:
    return config_source_pb2.ConfigSource(
        ads=config_source_pb2.AggregatedConfigSource(),
        resource_api_version=config_source_pb2.ApiVersion.V3,
    )


@dataclass(frozen=True)
class HeaderPart:
    """One fragment of a routing scope's key: element ``index`` of header ``header`` split
    on ``separator`` (Envoy's ``ScopedRoutes.ScopeKeyBuilder.FragmentBuilder``)."""

    header: str
    separator: str
    index: int


def make_hcm(
    *,
    stat_prefix: str,
    route_name: str,
    streaming: bool = False,
    forward_client_cert: bool = False,
    rbac_deny_by_default: bool = False,
    scope_key: Sequence[HeaderPart] = (),
    failure_header: str | None = None,
) -> hcm_pb2.HttpConnectionManager:
    """An HTTP connection manager taking its routes from RDS over ADS.

    ``scope_key``: instead, scoped routes over ADS (SRDS): each request's key is built from
    these header fragments and picks the ``ScopedRouteConfiguration`` holding that key
    (each carrying its own small route configuration inline); ``route_name`` then names
    the set. A change of one scope costs Envoy that scope, not every route.

    ``rbac_deny_by_default``: an RBAC filter that allows nothing unless the route's
    virtual host overrides it (``rbac_allow_principals``), so who may call lives in
    RDS and changes without a listener update (no drain).

    ``failure_header``: Envoy's own reply to a request whose upstream connection failed
    (response flag ``UF``) carries this header with the transport's failure reason
    (``%UPSTREAM_TRANSPORT_FAILURE_REASON%``: ``delayed_connect_error:_Connection_refused``,
    ``TLS_error:...CERTIFICATE_VERIFY_FAILED:verify_cert_failed:...``,
    ``TLS_error:...TLSV1_ALERT_UNKNOWN_CA...``), which Envoy 1.40 leaves out of the reply's
    body; nothing else about the reply changes.
    """
    hcm = hcm_pb2.HttpConnectionManager(
        stat_prefix=stat_prefix,
        codec_type=hcm_pb2.HttpConnectionManager.AUTO,
        http_filters=[
            hcm_pb2.HttpFilter(
                name="envoy.filters.http.router", typed_config=pack(router_pb2.Router())
            )
        ],
    )
    if scope_key:
        builder = hcm_pb2.ScopedRoutes.ScopeKeyBuilder
        hcm.scoped_routes.CopyFrom(
            hcm_pb2.ScopedRoutes(
                name=route_name,
                scope_key_builder=builder(
                    fragments=[
                        builder.FragmentBuilder(
                            header_value_extractor=builder.FragmentBuilder.HeaderValueExtractor(
                                name=part.header,
                                element_separator=part.separator,
                                index=part.index,
                            )
                        )
                        for part in scope_key
                    ]
                ),
                rds_config_source=_ads_source(),
                scoped_rds=hcm_pb2.ScopedRds(scoped_rds_config_source=_ads_source()),
            )
        )
    else:
        hcm.rds.CopyFrom(hcm_pb2.Rds(config_source=_ads_source(), route_config_name=route_name))
    if rbac_deny_by_default:
        deny_all = rbac_filter_pb2.RBAC(rules=rbac_pb2.RBAC(action=rbac_pb2.RBAC.ALLOW))
        hcm.http_filters.insert(
            0, hcm_pb2.HttpFilter(name=RBAC_FILTER, typed_config=pack(deny_all))
        )
    if failure_header is not None:
        hcm.local_reply_config.mappers.append(
            hcm_pb2.ResponseMapper(
                filter=accesslog_pb2.AccessLogFilter(
                    response_flag_filter=accesslog_pb2.ResponseFlagFilter(flags=["UF"])
                ),
                headers_to_add=[
                    base_pb2.HeaderValueOption(
                        header=base_pb2.HeaderValue(
                            key=failure_header, value="%UPSTREAM_TRANSPORT_FAILURE_REASON%"
                        ),
                        append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
                    )
                ],
            )
        )
    if streaming:
        # gRPC streams (xDS, Thanos StoreAPI series) may stay quiet for long.
        hcm.stream_idle_timeout.CopyFrom(duration_pb2.Duration(seconds=0))
    if forward_client_cert:
        # Downstream Envoys hold quiet, long-lived streams here: ping them, so a vanished
        # one ends its stream (and atlasd's) instead of lingering.
        hcm.http2_protocol_options.connection_keepalive.CopyFrom(
            protocol_pb2.KeepaliveSettings(
                interval=duration_pb2.Duration(seconds=30),
                timeout=duration_pb2.Duration(seconds=20),
            )
        )
        hcm.forward_client_cert_details = hcm_pb2.HttpConnectionManager.SANITIZE_SET
        hcm.set_current_client_cert_details.CopyFrom(
            hcm_pb2.HttpConnectionManager.SetCurrentClientCertDetails(dns=True, uri=True)
        )
    return hcm


_PRINCIPALS_FIELD = rbac_pb2.Policy.DESCRIPTOR.fields_by_name["principals"].number
_ALLOW_ANY = serialize(rbac_pb2.Policy(permissions=[rbac_pb2.Permission(any=True)]))


def principal_bytes(name: str, revoked: Iterable[str] = ()) -> bytes:
    """One encoded ``principals`` entry of an RBAC policy (tag included): callers whose
    verified certificate names ``name`` (Envoy matches ``principal_name`` against the URI
    SANs, then the DNS SANs) and is none of ``revoked`` (SHA-256 hex: the ``Hash`` of the
    ``x-forwarded-client-cert`` header the listener sets, ``forward_client_cert``)."""
    p = rbac_pb2.Principal(
        authenticated=rbac_pb2.Principal.Authenticated(
            principal_name=string_pb2.StringMatcher(exact=name)
        )
    )
    hashes = sorted(revoked)
    if hashes:
        refused = rbac_pb2.Principal(
            or_ids=rbac_pb2.Principal.Set(
                ids=[
                    rbac_pb2.Principal(
                        header=route_components_pb2.HeaderMatcher(
                            name=XFCC_HEADER,
                            string_match=string_pb2.StringMatcher(
                                contains=f"Hash={h}", ignore_case=True
                            ),
                        )
                    )
                    for h in hashes
                ]
            )
        )
        p = rbac_pb2.Principal(
            and_ids=rbac_pb2.Principal.Set(ids=[p, rbac_pb2.Principal(not_id=refused)])
        )
    return repeated_field(_PRINCIPALS_FIELD, [serialize(p)])


def rbac_allow_encoded(principals: bytes) -> any_pb2.Any:
    """Per-route RBAC allowing the callers of the encoded ``principals`` (``principal_bytes``
    concatenated): the policy is parsed from its pieces, not built principal by principal."""
    rules = rbac_pb2.RBAC(action=rbac_pb2.RBAC.ALLOW)
    if principals:  # an ALLOW rule set without policies allows nobody
        rules.policies["current-clusters"].CopyFrom(
            rbac_pb2.Policy.FromString(_ALLOW_ANY + principals)
        )
    return pack(rbac_filter_pb2.RBACPerRoute(rbac=rbac_filter_pb2.RBAC(rules=rules)))


def rbac_allow_principals(names: Sequence[str]) -> any_pb2.Any:
    """Per-route RBAC: allow only callers whose verified certificate names one of ``names``."""
    return rbac_allow_encoded(b"".join(principal_bytes(n) for n in names))


def make_listener(
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
            name="envoy.filters.network.http_connection_manager", typed_config=pack(hcm)
        )
    )
    return listener_pb2.Listener(
        name=name,
        address=address_pb2.Address(
            socket_address=address_pb2.SocketAddress(address=address, port_value=port)
        ),
        filter_chains=[chain],
    )


def make_endpoints(name: str, host: str, port: int) -> endpoint_pb2.ClusterLoadAssignment:
    """Cluster ``name``'s one endpoint, ``host:port`` (inline, or an EDS resource)."""
    return endpoint_pb2.ClusterLoadAssignment(
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
    )


def make_cluster(
    *,
    name: str,
    host: str | None,
    port: int,
    http2: bool,
    tls_san: str | None = None,
    max_connection_seconds: int | None = None,
    max_streams: int | None = None,
    crl: bytes = b"",
    sds_dir: str | None = None,
) -> tuple[cluster_pb2.Cluster, frozenset[tuple[str, str]]]:
    """An upstream cluster; mTLS when ``tls_san`` is set (refusing the certificates
    ``crl`` lists, see ``validation_with_sans``; secrets from ``sds_dir``'s files when
    given, see ``sds_ref``). With ``host``, its endpoint is
    inline; without, it comes over EDS (ADS) as the ``ClusterLoadAssignment`` of the same
    name (``make_endpoints``), so the endpoint's address changes without the cluster."""
    if host is None:
        c = cluster_pb2.Cluster(
            name=name,
            type=cluster_pb2.Cluster.EDS,
            connect_timeout=duration_pb2.Duration(seconds=5),
            eds_cluster_config=cluster_pb2.Cluster.EdsClusterConfig(eds_config=_ads_source()),
        )
    else:
        c = cluster_pb2.Cluster(
            name=name,
            type=cluster_pb2.Cluster.STATIC
            if is_ip_literal(host)
            else cluster_pb2.Cluster.STRICT_DNS,
            connect_timeout=duration_pb2.Duration(seconds=5),
            load_assignment=make_endpoints(name, host, port),
        )
    if host is not None and not is_ip_literal(host):
        # Kubernetes Service names resolve to IPv4 first on dual-stack clusters, and a
        # component listening on 127.0.0.1 only is not reachable through ::1.
        c.dns_lookup_family = cluster_pb2.Cluster.V4_PREFERRED
    if http2:
        opts = http_protocol_options_pb2.HttpProtocolOptions(
            explicit_http_config=http_protocol_options_pb2.HttpProtocolOptions.ExplicitHttpConfig(
                http2_protocol_options=protocol_pb2.Http2ProtocolOptions()
            )
        )
        if max_streams is not None:
            # Streams per connection, from the first one: Envoy opens another connection
            # past it instead of waiting for the server's SETTINGS to say so.
            h2 = opts.explicit_http_config.http2_protocol_options
            h2.max_concurrent_streams.value = max_streams
        if max_connection_seconds is not None:
            # Bounds how long a connection authenticated by a rotated-out certificate lives.
            opts.common_http_protocol_options.max_connection_duration.CopyFrom(
                duration_pb2.Duration(seconds=max_connection_seconds)
            )
        c.typed_extension_protocol_options[HTTP_PROTOCOL_OPTIONS].CopyFrom(pack(opts))
    refs: frozenset[tuple[str, str]] = frozenset()
    if tls_san is not None:
        ctx = tls_pb2.UpstreamTlsContext(
            common_tls_context=tls_pb2.CommonTlsContext(
                tls_certificate_sds_secret_configs=[sds_ref(CLIENT_SECRET, sds_dir)],
                combined_validation_context=validation_with_sans(
                    [tls_san], crl=crl, sds_dir=sds_dir
                ),
                alpn_protocols=["h2"] if http2 else ["http/1.1"],
            ),
            sni=tls_san,
        )
        c.transport_socket.CopyFrom(
            base_pb2.TransportSocket(name="envoy.transport_sockets.tls", typed_config=pack(ctx))
        )
        refs = _secret_refs((CLIENT_SECRET, VALIDATION_SECRET), sds_dir)
    if host is None:
        refs |= {(ENDPOINT, name)}
    return c, refs


def make_route(
    cluster: str,
    *,
    prefix: str = "/",
    rewrite: str | None = None,
    host_rewrite: str | None = None,
    streaming: bool = False,
    idle_seconds: int | None = None,
    headers_to_add: Sequence[tuple[str, str]] = (),
    retry: route_components_pb2.RetryPolicy | None = None,
) -> route_components_pb2.Route:
    """``idle_seconds``: reset a request that carries no bytes either way for this long
    (0: never; None: the connection manager's stream idle timeout applies)."""
    action = route_components_pb2.RouteAction(cluster=cluster)
    if retry is not None:
        action.retry_policy.CopyFrom(retry)
    if rewrite is not None:
        action.prefix_rewrite = rewrite
    if host_rewrite is not None:
        action.host_rewrite_literal = host_rewrite
    if streaming:
        action.timeout.CopyFrom(duration_pb2.Duration(seconds=0))
    if idle_seconds is not None:
        action.idle_timeout.CopyFrom(duration_pb2.Duration(seconds=idle_seconds))
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


# Failover between replicas of one upstream (atlasd's ADS behind a name that resolves to
# every replica). Measured with bench/bench_fleet.py (leader SIGKILL, 500 streams): without
# these, half of the reconnecting streams were routed to the dead replica again (round
# robin over both addresses, each time a local 503 from a refused connect, no retry, no
# ejection), so a stream reopened up to 9 times under Envoy's doubling back-off and the last
# one was current 85 s after the kill.
# At 1,000 streams with the retry policy alone, 609 of the retries overflowed Envoy's
# default circuit breaker (3 retries in flight per cluster) and were answered 503.
FAILOVER_RETRIES = 2  # enough to reach a live replica past one or two dead ones
FAILOVER_EJECTION_S = 5  # base ejection; Envoy multiplies it by the times ejected ...
FAILOVER_MAX_EJECTION_S = 30  # ... up to this


def failover_retry_policy() -> route_components_pb2.RetryPolicy:
    """Retry on another host a request that reached no live upstream: a refused or failed
    connect, a reset before any response, a stream refused by the upstream's HTTP/2, or
    gRPC UNAVAILABLE in the response headers. Safe for streams that have had no response
    yet (an ADS stream is idempotent: a new stream asks for the full state); a stream that
    has had a response is never retried (Envoy cannot), its client reconnects."""
    policy = route_components_pb2.RetryPolicy
    return policy(
        retry_on="connect-failure,refused-stream,reset,unavailable",
        num_retries=wrappers_pb2.UInt32Value(value=FAILOVER_RETRIES),
        retry_host_predicate=[
            policy.RetryHostPredicate(
                name="envoy.retry_host_predicates.previous_hosts",
                typed_config=pack(previous_hosts_pb2.PreviousHostsPredicate()),
            )
        ],
        host_selection_retry_max_attempts=5,
    )


# atlasd's ADS server (grpclib) advertises HTTP/2 MAX_CONCURRENT_STREAMS 100 and closes the
# whole connection on a peer that opens the 101st stream (h2's TooManyStreamsError is a
# protocol error). An Envoy opens streams on a new connection before the server's SETTINGS
# arrive, so in a reconnect storm (500 streams onto the survivor of a kill) it sent more than
# 100 at once: every stream on that connection reset before headers, 300 of 500 failed all
# three tries ("connection termination"). Capped here, Envoy opens one more connection.
ADS_SERVER_MAX_STREAMS = 100
# One forwarded stream per downstream Envoy, all through one cluster: Envoy's default
# circuit breakers (1,024 requests, 1,024 pending, 3 retries in flight) would refuse the
# 1,025th stream of a fleet, and all but 3 of the retries of a reconnect storm.
FLEET_STREAMS = 1_000_000


def fleet_circuit_breakers() -> circuit_breaker_pb2.CircuitBreakers:
    """Thresholds that do not bound a fleet's streams, their connects or their retries."""
    u32 = wrappers_pb2.UInt32Value
    return circuit_breaker_pb2.CircuitBreakers(
        thresholds=[
            circuit_breaker_pb2.CircuitBreakers.Thresholds(
                max_connections=u32(value=FLEET_STREAMS),
                max_pending_requests=u32(value=FLEET_STREAMS),
                max_requests=u32(value=FLEET_STREAMS),
                max_retries=u32(value=FLEET_STREAMS),
            )
        ]
    )


def failover_outlier_detection() -> outlier_detection_pb2.OutlierDetection:
    """Take a replica that refuses connections (or answers 502/503/504) out of the load
    balancing after two such results in a row, for ``FAILOVER_EJECTION_S`` and more each
    time again. At most half of the replicas are ejected: with every one ejected Envoy's
    panic mode balances over all of them again, dead ones included (1,000 streams with no
    bound: 664 picks in panic, a stream reopened up to 7 times)."""
    u32 = wrappers_pb2.UInt32Value
    return outlier_detection_pb2.OutlierDetection(
        consecutive_gateway_failure=u32(value=2),
        enforcing_consecutive_gateway_failure=u32(value=100),
        interval=duration_pb2.Duration(seconds=1),
        base_ejection_time=duration_pb2.Duration(seconds=FAILOVER_EJECTION_S),
        max_ejection_time=duration_pb2.Duration(seconds=FAILOVER_MAX_EJECTION_S),
        max_ejection_percent=u32(value=50),
    )


def make_scope(
    name: str, key: Sequence[str], route: route_components_pb2.Route
) -> scoped_route_pb2.ScopedRouteConfiguration:
    """A routing scope: requests whose key is ``key`` take ``route`` (its own route
    configuration, inline, one virtual host matching any authority).

    ``validate_clusters`` is off, as it is for RDS: Envoy checks an inline route
    configuration's clusters by default, and would refuse a scope whose new cluster is
    still warming (its endpoints on their way over EDS); such a route answers 503 for that
    moment instead."""
    scope = scoped_route_pb2.ScopedRouteConfiguration
    return scope(
        name=name,
        key=scope.Key(fragments=[scope.Key.Fragment(string_key=k) for k in key]),
        route_configuration=route_pb2.RouteConfiguration(
            name=name,
            virtual_hosts=[
                route_components_pb2.VirtualHost(name=name, domains=["*"], routes=[route])
            ],
            validate_clusters=wrappers_pb2.BoolValue(value=False),
        ),
    )


def host_domains(host: str) -> list[str]:
    """The authority with and without a port (``host:*`` is an Envoy prefix wildcard)."""
    return [host, f"{host}:*"]


def tls_secret(name: str, ck: model.CertKey, chain: bytes = b"") -> Piece:
    """A certificate and its key; ``chain`` (the PKI's cross-signed links) follows the
    certificate."""
    s = secret_pb2.Secret(
        name=name,
        tls_certificate=common_pb2.TlsCertificate(
            certificate_chain=base_pb2.DataSource(inline_bytes=ck.cert_pem + chain),
            private_key=base_pb2.DataSource(inline_bytes=ck.key_pem),
        ),
    )
    return Piece(serialize(s), frozenset())


def validation_secret(bundle: bytes) -> Piece:
    s = secret_pb2.Secret(
        name=VALIDATION_SECRET,
        validation_context=common_pb2.CertificateValidationContext(
            trusted_ca=base_pb2.DataSource(inline_bytes=bundle)
        ),
    )
    return Piece(serialize(s), frozenset())
