"""Builders: table-driven checks of what each node gets, without I/O."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2, scoped_route_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as rbac_filter_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2, tls_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from google.protobuf import any_pb2, descriptor_pool, message, message_factory

from atlasd import model
from atlasd.xds import builders
from atlasd.xds.builders import SnapshotBuilder, build_snapshots
from atlasd.xds.plan import ListenPlan, NodePorts
from atlasd.xds.snapshot import (
    CLUSTER,
    ENDPOINT,
    LISTENER,
    ROUTE,
    SCOPED_ROUTE,
    SECRET,
    Snapshot,
)
from tests.unit.xds import helpers

_CA, _PKI = helpers.make_pki(["atlas", "east", "west", "north"])
AMS = (
    model.LocalAlertmanager("am-a", "monitoring", 9093),
    model.LocalAlertmanager("am-b", "other", 9094),
)


def fleet(
    clusters: tuple[model.DownstreamCluster, ...] = (helpers.cluster("east"),),
    alertmanagers: tuple[model.LocalAlertmanager, ...] = (),
    pki: helpers.Trust | None = _PKI,
) -> model.Fleet:
    if pki is None:
        return model.Fleet.of(model.Settings(), clusters, alertmanagers=alertmanagers)
    return pki.fleet(clusters, alertmanagers)


SIDECAR = "{}-thanos-sidecar{}.monitoring.svc.cluster.local"


def names(snap: Snapshot, t: str) -> set[str]:
    return set(snap.of_type(t))


def endpoint(snap: Snapshot, name: str) -> tuple[str, int]:
    """Where cluster ``name`` sends: inline, or (type EDS) its ClusterLoadAssignment."""
    cl = parse(snap, CLUSTER, name, cluster_pb2.Cluster)
    cla = cl.load_assignment
    if cl.type == cluster_pb2.Cluster.EDS:
        assert cl.eds_cluster_config.eds_config.HasField("ads") and not cla.endpoints
        cla = parse(snap, ENDPOINT, name, endpoint_pb2.ClusterLoadAssignment)
        assert cla.cluster_name == name
    addr = cla.endpoints[0].lb_endpoints[0].endpoint.address.socket_address
    return addr.address, addr.port_value


def parse(snap: Snapshot, t: str, name: str, cls: Any) -> Any:
    r = snap.get(t, name)
    assert r is not None, f"{name} missing"
    return cls.FromString(r.body)


def hcm_of(lst: Any) -> Any:
    return hcm_pb2.HttpConnectionManager.FromString(
        lst.filter_chains[0].filters[0].typed_config.value
    )


def tls_of(lst: Any) -> Any:
    return tls_pb2.DownstreamTlsContext.FromString(
        lst.filter_chains[0].transport_socket.typed_config.value
    )


@pytest.mark.parametrize(
    ("name", "f", "want"),
    [
        (
            "one cluster, no alertmanagers",
            fleet(),
            {
                "atlas": {
                    LISTENER: {"xds", "thanos", "prometheus"},
                    CLUSTER: {"atlasd-ads-forward", "east-thanos", "east-prom"},
                    ROUTE: {"xds"},
                    SCOPED_ROUTE: {f"thanos/{SIDECAR.format('east', 0)}", "prometheus/east"},
                    SECRET: {"validation", "server", "client"},
                },
                "east": {
                    LISTENER: {"thanos", "prometheus"},
                    CLUSTER: {"thanos0", "prometheus"},
                    ROUTE: {"thanos", "prometheus"},
                    SECRET: {"validation", "server"},
                },
            },
        ),
        (
            "no clusters: the client secret for atlasd only; 10903 allows nobody",
            fleet(clusters=(), alertmanagers=AMS),
            {
                "atlas": {
                    LISTENER: {"xds", "thanos", "prometheus", "alertmanager"},
                    CLUSTER: {"atlasd-ads-forward", "alertmanager0", "alertmanager1"},
                    ROUTE: {"xds", "alertmanager"},
                    SCOPED_ROUTE: set(),
                    SECRET: {"validation", "server", "client"},
                },
            },
        ),
        (
            "alertmanagers and two replicas",
            fleet(clusters=(helpers.cluster("east", replicas=2),), alertmanagers=AMS),
            {
                "atlas": {
                    LISTENER: {"xds", "thanos", "prometheus", "alertmanager"},
                    CLUSTER: {
                        "atlasd-ads-forward",
                        "east-thanos",
                        "east-prom",
                        "alertmanager0",
                        "alertmanager1",
                    },
                    ROUTE: {"xds", "alertmanager"},
                    SCOPED_ROUTE: {
                        f"thanos/{SIDECAR.format('east', 0)}",
                        f"thanos/{SIDECAR.format('east', 1)}",
                        "prometheus/east",
                    },
                    SECRET: {"validation", "server", "client"},
                },
                "east": {
                    LISTENER: {"thanos", "prometheus", "alertmanager"},
                    CLUSTER: {"thanos0", "thanos1", "prometheus", "atlas-alertmanager"},
                    ROUTE: {"thanos", "prometheus", "alertmanager"},
                    SECRET: {"validation", "server", "client"},
                },
            },
        ),
        (
            "cluster without identity: no node snapshot, routes still built",
            fleet(clusters=(helpers.cluster("east"), helpers.cluster("nokey"))),
            {
                "atlas": {
                    LISTENER: {"xds", "thanos", "prometheus"},
                    CLUSTER: {
                        "atlasd-ads-forward",
                        "east-thanos",
                        "east-prom",
                        "nokey-thanos",
                        "nokey-prom",
                    },
                    ROUTE: {"xds"},
                    SCOPED_ROUTE: {
                        f"thanos/{SIDECAR.format('east', 0)}",
                        f"thanos/{SIDECAR.format('nokey', 0)}",
                        "prometheus/east",
                        "prometheus/nokey",
                    },
                    SECRET: {"validation", "server", "client"},
                },
                "east": {
                    LISTENER: {"thanos", "prometheus"},
                    CLUSTER: {"thanos0", "prometheus"},
                    ROUTE: {"thanos", "prometheus"},
                    SECRET: {"validation", "server"},
                },
            },
        ),
        ("no PKI: nothing to serve", fleet(pki=None), {}),
    ],
)
def test_resources_per_node(
    name: str, f: model.Fleet, want: dict[str, dict[str, set[str]]]
) -> None:
    snaps = build_snapshots(f)
    assert set(snaps) == set(want), name
    for node, types in want.items():
        for t, expected in types.items():
            assert names(snaps[node], t) == expected, (name, node, t)


def scopes(snap: Snapshot) -> dict[str, tuple[list[str], list[tuple[str, str, str]]]]:
    """Each routing scope: its key, and its routes (prefix, rewrite, cluster)."""
    out = {}
    for name, r in snap.of_type(SCOPED_ROUTE).items():
        scope = scoped_route_pb2.ScopedRouteConfiguration.FromString(r.body)
        assert scope.name == name and not scope.route_configuration_name
        [vh] = scope.route_configuration.virtual_hosts
        assert list(vh.domains) == ["*"]
        out[name] = (
            [f.string_key for f in scope.key.fragments],
            [(x.match.prefix, x.route.prefix_rewrite, x.route.cluster) for x in vh.routes],
        )
    return out


def test_scope_keys_are_built_from_the_authority_and_the_path() -> None:
    atlas = build_snapshots(fleet())["atlas"]
    keys = {}
    for name in ("thanos", "prometheus"):
        hcm = hcm_of(parse(atlas, LISTENER, name, listener_pb2.Listener))
        assert hcm.WhichOneof("route_specifier") == "scoped_routes"
        assert hcm.scoped_routes.scoped_rds.scoped_rds_config_source.HasField("ads")
        keys[name] = [
            (f.header_value_extractor.name, f.header_value_extractor.element_separator,
             f.header_value_extractor.index)
            for f in hcm.scoped_routes.scope_key_builder.fragments
        ]  # fmt: skip
    # The authority without its port; "prom" and the cluster name from /prom/<cluster>/...
    assert keys == {
        "thanos": [(":authority", ":", 0)],
        "prometheus": [(":path", "/", 1), (":path", "/", 2)],
    }


def test_thanos_routes_by_authority_and_upstream_san() -> None:
    snaps = build_snapshots(
        fleet(clusters=(helpers.cluster("east", replicas=2), helpers.cluster("west")))
    )
    atlas = snaps["atlas"]
    thanos = {n: v for n, v in scopes(atlas).items() if n.startswith("thanos/")}
    assert thanos == {
        f"thanos/{SIDECAR.format(c, i)}": ([SIDECAR.format(c, i)], [("/", "", f"{c}-thanos")])
        for c, i in (("east", 0), ("east", 1), ("west", 0))
    }
    cl = parse(atlas, CLUSTER, "east-thanos", cluster_pb2.Cluster)
    up = tls_pb2.UpstreamTlsContext.FromString(cl.transport_socket.typed_config.value)
    sans = up.common_tls_context.combined_validation_context.default_validation_context
    assert [m.matcher.exact for m in sans.match_typed_subject_alt_names] == ["east"]
    assert up.common_tls_context.tls_certificate_sds_secret_configs[0].name == "client"
    assert endpoint(atlas, "east-thanos") == ("127.0.0.1", model.DOWNSTREAM_THANOS_PORT)


def test_prometheus_prefix_rewrite() -> None:
    snaps = build_snapshots(fleet(clusters=(helpers.cluster("east"), helpers.cluster("west"))))
    prom = {n: v for n, v in scopes(snaps["atlas"]).items() if n.startswith("prometheus/")}
    assert prom == {
        "prometheus/east": (["prom", "east"], [("/prom/east/", "/", "east-prom")]),
        "prometheus/west": (["prom", "west"], [("/prom/west/", "/", "west-prom")]),
    }


def test_each_alertmanager_gets_its_own_service() -> None:
    plan = ListenPlan()
    snaps = SnapshotBuilder(plan).build(fleet(alertmanagers=AMS))
    atlas = snaps["atlas"]
    rc = parse(atlas, ROUTE, "alertmanager", route_pb2.RouteConfiguration)
    assert [(vh.domains[0], vh.routes[0].route.cluster) for vh in rc.virtual_hosts] == [
        ("alertmanager0.monitoring.svc.cluster.local", "alertmanager0"),
        ("alertmanager1.monitoring.svc.cluster.local", "alertmanager1"),
    ]
    targets = []
    for i in range(2):
        cl = parse(atlas, CLUSTER, f"alertmanager{i}", cluster_pb2.Cluster)
        a = cl.load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.socket_address
        targets.append((a.address, a.port_value))
    assert targets == [
        ("am-a.monitoring.svc.cluster.local", 9093),
        ("am-b.other.svc.cluster.local", 9094),
    ]
    # 10903 requires a client certificate, and RBAC allows only current clusters.
    lst = parse(atlas, LISTENER, "alertmanager", listener_pb2.Listener)
    assert tls_of(lst).require_client_certificate.value is True
    hcm = hcm_of(lst)
    assert [f.name for f in hcm.http_filters] == [
        "envoy.filters.http.rbac",
        "envoy.filters.http.router",
    ]
    deny = rbac_filter_pb2.RBAC.FromString(hcm.http_filters[0].typed_config.value)
    assert deny.rules.action == deny.rules.ALLOW and not deny.rules.policies  # nobody by default
    for vh in rc.virtual_hosts:
        assert allowed(vh) == ["east"]


def allowed(vh: Any) -> list[str]:
    per = rbac_filter_pb2.RBACPerRoute.FromString(
        vh.typed_per_filter_config["envoy.filters.http.rbac"].value
    )
    return [
        p.authenticated.principal_name.exact
        for pol in per.rbac.rules.policies.values()
        for p in pol.principals
    ]


def test_adding_a_cluster_changes_10903_routes_not_the_listener() -> None:
    b = SnapshotBuilder()
    one = b.build(fleet(alertmanagers=AMS))["atlas"]
    two = b.build(
        fleet(clusters=(helpers.cluster("east"), helpers.cluster("west")), alertmanagers=AMS)
    )["atlas"]
    assert one.get(LISTENER, "alertmanager") == two.get(LISTENER, "alertmanager")
    rc = parse(two, ROUTE, "alertmanager", route_pb2.RouteConfiguration)
    assert allowed(rc.virtual_hosts[0]) == ["east", "west"]
    none = b.build(fleet(clusters=(), alertmanagers=AMS))["atlas"]
    rc = parse(none, ROUTE, "alertmanager", route_pb2.RouteConfiguration)
    assert allowed(rc.virtual_hosts[0]) == []


def test_xds_listener_requires_cert_and_forwards_it() -> None:
    atlas = build_snapshots(fleet())["atlas"]
    lst = parse(atlas, LISTENER, "xds", listener_pb2.Listener)
    assert tls_of(lst).require_client_certificate.value is True
    hcm = hcm_of(lst)
    assert hcm.forward_client_cert_details == hcm_pb2.HttpConnectionManager.SANITIZE_SET
    assert hcm.set_current_client_cert_details.dns is True
    assert hcm.http2_protocol_options.connection_keepalive.interval.ToSeconds() == 30
    rc = parse(atlas, ROUTE, "xds", route_pb2.RouteConfiguration)
    assert rc.virtual_hosts[0].routes[0].route.cluster == builders.ADS_FORWARD_CLUSTER
    assert rc.virtual_hosts[0].routes[0].route.timeout.ToSeconds() == 0


def test_xds_is_forwarded_to_atlasd_over_mtls_as_the_forwarder() -> None:
    atlas = build_snapshots(fleet(clusters=()))["atlas"]
    cl = parse(atlas, CLUSTER, builders.ADS_FORWARD_CLUSTER, cluster_pb2.Cluster)
    ctx = tls_pb2.UpstreamTlsContext.FromString(cl.transport_socket.typed_config.value)
    assert ctx.sni == model.ADS_SERVER_NAME
    common = ctx.common_tls_context
    assert [c.name for c in common.tls_certificate_sds_secret_configs] == ["client"]
    vc = common.combined_validation_context
    assert vc.validation_context_sds_secret_config.name == "validation"
    assert [
        m.matcher.exact for m in vc.default_validation_context.match_typed_subject_alt_names
    ] == [model.ADS_SERVER_NAME]
    assert list(common.alpn_protocols) == ["h2"]


def test_served_certificates_carry_the_chain() -> None:
    f = fleet()
    assert f.pki is not None
    linked = dataclasses.replace(f, pki=dataclasses.replace(f.pki, chain=b"<link>"))
    for node, snap in build_snapshots(linked).items():
        for name in ("server", "client"):
            r = snap.get(SECRET, name)
            if r is None:
                continue
            chain = secret_pb2.Secret.FromString(r.body).tls_certificate.certificate_chain
            assert chain.inline_bytes.endswith(b"<link>"), (node, name)
    plain = build_snapshots(f)
    assert all(b"<link>" not in r.body for s in plain.values() for r in s.of_type(SECRET).values())


def test_forwarder_token_is_added_and_incoming_copies_stripped() -> None:
    atlas = SnapshotBuilder(forwarder_token="s3cret").build(fleet())["atlas"]
    rc = parse(atlas, ROUTE, "xds", route_pb2.RouteConfiguration)
    vh = rc.virtual_hosts[0]
    hv = vh.routes[0].request_headers_to_add[0]
    assert (hv.header.key, hv.header.value) == (builders.FORWARDER_TOKEN_HEADER, "s3cret")
    assert hv.append_action == hv.OVERWRITE_IF_EXISTS_OR_ADD  # a caller's copy is replaced


def test_downstream_replica_pinning_and_client_san() -> None:
    c = helpers.cluster(
        "east", replicas=2, template="prom-{replica}.prometheus-operated", thanos_port=10901
    )
    east = build_snapshots(fleet(clusters=(c,)))["east"]
    rc = parse(east, ROUTE, "thanos", route_pb2.RouteConfiguration)
    assert [(vh.domains[0], vh.routes[0].route.cluster) for vh in rc.virtual_hosts] == [
        ("east-thanos-sidecar0.monitoring.svc.cluster.local", "thanos0"),
        ("east-thanos-sidecar1.monitoring.svc.cluster.local", "thanos1"),
    ]
    # Every answer through east's Envoy names east (atlasd probe tells the hops apart).
    assert [(h.header.key, h.header.value) for h in rc.response_headers_to_add] == [
        ("x-atlas-cluster", "east")
    ]
    hosts = []
    for i in range(2):
        cl = parse(east, CLUSTER, f"thanos{i}", cluster_pb2.Cluster)
        assert cl.type == cluster_pb2.Cluster.STRICT_DNS
        assert cl.dns_lookup_family == cluster_pb2.Cluster.V4_PREFERRED
        a = cl.load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.socket_address
        hosts.append(a.address)
    assert hosts == ["prom-0.prometheus-operated", "prom-1.prometheus-operated"]
    for name in ("thanos", "prometheus"):
        tls = tls_of(parse(east, LISTENER, name, listener_pb2.Listener))
        assert tls.require_client_certificate.value is True
        vc = tls.common_tls_context.combined_validation_context.default_validation_context
        assert [m.matcher.exact for m in vc.match_typed_subject_alt_names] == ["atlas"]


def test_per_node_ports_apply_to_both_ends() -> None:
    plan = ListenPlan(
        downstream=(("east", NodePorts(thanos=21901, prometheus=21904, alertmanager=21903)),)
    )
    snaps = SnapshotBuilder(plan).build(
        fleet(clusters=(helpers.cluster("east"), helpers.cluster("west")))
    )

    def port(snap: Snapshot, t: str, name: str) -> int:
        if t == LISTENER:
            return int(
                parse(snap, t, name, listener_pb2.Listener).address.socket_address.port_value
            )
        return endpoint(snap, name)[1]

    assert port(snaps["east"], LISTENER, "thanos") == 21901
    assert port(snaps["atlas"], CLUSTER, "east-thanos") == 21901
    assert port(snaps["atlas"], CLUSTER, "east-prom") == 21904
    assert port(snaps["west"], LISTENER, "thanos") == model.DOWNSTREAM_THANOS_PORT
    assert port(snaps["atlas"], CLUSTER, "west-thanos") == model.DOWNSTREAM_THANOS_PORT


def test_secrets_carry_the_node_identity() -> None:
    snaps = build_snapshots(fleet(alertmanagers=AMS))
    ident = _PKI.identity("east")
    assert ident is not None
    s = parse(snaps["east"], SECRET, "server", secret_pb2.Secret)
    assert s.tls_certificate.certificate_chain.inline_bytes == ident.server.cert_pem
    s = parse(snaps["east"], SECRET, "client", secret_pb2.Secret)
    assert s.tls_certificate.private_key.inline_bytes == ident.client.key_pem
    v = parse(snaps["atlas"], SECRET, "validation", secret_pb2.Secret)
    assert v.validation_context.trusted_ca.inline_bytes == _PKI.trust_bundle
    # No node gets another node's keys.
    for node, snap in snaps.items():
        mine = _PKI.identity(node)
        assert mine is not None
        for r in snap.of_type(SECRET).values():
            for other, ident in _PKI.identities:
                if other != node:
                    assert ident.server.key_pem not in r.body and ident.client.key_pem not in r.body


_POOL = descriptor_pool.Default()


def _walk(msg: message.Message, path: str) -> Iterator[str]:
    """Paths of every populated deprecated field, unpacking Any recursively."""
    if isinstance(msg, any_pb2.Any):
        desc = _POOL.FindMessageTypeByName(msg.type_url.split("/")[-1])
        inner = message_factory.GetMessageClass(desc).FromString(msg.value)
        yield from _walk(inner, f"{path}<{desc.name}>")
        return
    for field, value in msg.ListFields():
        opts = field.GetOptions()
        if opts.deprecated or "deprecated_at_minor_version" in str(opts):
            yield f"{path}.{field.name}"
        if field.enum_type is not None:
            for v in value if field.is_repeated else [value]:
                ev = field.enum_type.values_by_number.get(v)
                if ev is not None and ev.GetOptions().deprecated:
                    yield f"{path}.{field.name}={ev.name}"
        if field.message_type is None:
            continue
        if field.message_type.GetOptions().map_entry:
            for k, v in value.items():
                if isinstance(v, message.Message):
                    yield from _walk(v, f"{path}.{field.name}[{k}]")
        elif field.is_repeated:
            for i, v in enumerate(value):
                yield from _walk(v, f"{path}.{field.name}[{i}]")
        else:
            yield from _walk(value, f"{path}.{field.name}")


def test_no_deprecated_fields_anywhere() -> None:
    c = helpers.cluster("east", replicas=2, template="p-{replica}.x")
    snaps = SnapshotBuilder(forwarder_token="t").build(fleet(clusters=(c,), alertmanagers=AMS))
    found = []
    for node, snap in snaps.items():
        for t, rs in snap.resources.items():
            for r in rs.values():
                found += list(_walk(any_pb2.Any(type_url=t, value=r.body), f"{node}/{r.name}"))
    assert found == []


def test_a_change_of_one_cluster_touches_its_own_scopes_only() -> None:
    clusters = [helpers.cluster(n) for n in ("east", "west")]
    b = SnapshotBuilder()
    first = b.build(fleet(clusters=tuple(clusters)))["atlas"]
    # Two replicas: a second sidecar scope appears, nothing else of the routes changes.
    clusters[1] = dataclasses.replace(clusters[1], replicas=2)
    second = b.update(fleet(clusters=tuple(clusters)), {"west"}).changed["atlas"]
    assert second is not None
    assert dict(second.diff_from(first) or {}) == {
        SCOPED_ROUTE: frozenset({f"thanos/{SIDECAR.format('west', 1)}"})
    }
    # Gone: its clusters and every scope of it, removed.
    third = b.update(fleet(clusters=(clusters[0],)), {"west"}).changed["atlas"]
    assert third is not None
    assert dict(third.diff_from(second) or {}) == {
        CLUSTER: frozenset({"west-thanos", "west-prom"}),
        ENDPOINT: frozenset({"west-thanos", "west-prom"}),
        SCOPED_ROUTE: frozenset(
            {f"thanos/{SIDECAR.format('west', i)}" for i in (0, 1)} | {"prometheus/west"}
        ),
    }


def test_rebuild_is_proportional_to_change() -> None:
    clusters = tuple(helpers.cluster(f"c{i}") for i in range(50))
    _ca, pki = helpers.make_pki(["atlas", *(c.name for c in clusters[:3])], ca=_CA)
    b = SnapshotBuilder()
    first = b.build(fleet(clusters=clusters, pki=pki))
    total = b.built
    again = b.build(fleet(clusters=clusters, pki=pki))
    assert b.built == 0
    assert all(again[n] is first[n] for n in first)  # same objects: nothing to send
    changed = dataclasses.replace(clusters[1], prometheus=model.Upstream("127.0.0.1", 9999))
    third = b.build(fleet(clusters=(clusters[0], changed, *clusters[2:]), pki=pki))
    assert 0 < b.built <= 2 < total
    assert third["c0"] is first["c0"]
    assert third["atlas"] is first["atlas"]  # the atlas side does not depend on that field
    assert third["c1"].version(CLUSTER) != first["c1"].version(CLUSTER)
    assert third["c1"].version(LISTENER) == first["c1"].version(LISTENER)


def test_deprecation_walker_finds_a_deprecated_field() -> None:
    from envoy.config.core.v3 import protocol_pb2

    old = cluster_pb2.Cluster(name="x", http2_protocol_options=protocol_pb2.Http2ProtocolOptions())
    packed = any_pb2.Any()
    packed.Pack(old)
    assert list(_walk(packed, "x")) == ["x<Cluster>.http2_protocol_options"]


def test_an_inconsistent_snapshot_is_never_published(monkeypatch: pytest.MonkeyPatch) -> None:
    b = SnapshotBuilder()
    good = b.build(fleet())
    real = SnapshotBuilder._downstream

    def broken(self: SnapshotBuilder, *args: Any) -> Any:
        res = real(self, *args)
        return [r for r in res if r.type_url != ROUTE]  # listeners now name missing routes

    monkeypatch.setattr(SnapshotBuilder, "_downstream", broken)
    changed = fleet(clusters=(helpers.cluster("east", prom_port=1234),))
    out = b.build(changed)
    assert out["east"] is good["east"]  # the last good snapshot stays
    # Said as evolving from the good one finds it: a route still named, gone.
    assert b.problems and "rds 'thanos' is still named" in b.problems[0], b.problems
    # A node that never had a good snapshot is left out.
    assert "east" not in SnapshotBuilder().build(changed)


@pytest.mark.parametrize(
    ("external_ip", "bind"),
    [("2001:db8::10", "::"), ("192.0.2.10", "0.0.0.0")],
    ids=["ipv6", "ipv4"],
)
def test_a_downstream_envoy_listens_on_the_family_of_its_external_ip(
    external_ip: str, bind: str
) -> None:
    """docs/interface.md, "IPv6": a downstream Envoy reached over IPv6 binds ``::``, one
    reached over IPv4 ``0.0.0.0``; the observability Envoy dials the address as given."""
    east = dataclasses.replace(helpers.cluster("east"), external_ip=external_ip)
    snaps = build_snapshots(fleet(clusters=(east,), alertmanagers=AMS))
    listeners = names(snaps["east"], LISTENER)
    assert listeners == {"thanos", "prometheus", "alertmanager"}
    for name in listeners:
        lst = parse(snaps["east"], LISTENER, name, listener_pb2.Listener)
        assert lst.address.socket_address.address == bind, name
    for name in ("east-thanos", "east-prom"):
        assert endpoint(snaps["atlas"], name)[0] == external_ip, name
    # The observability Envoy's own listeners do not depend on a cluster's address family.
    for name in names(snaps["atlas"], LISTENER):
        lst = parse(snaps["atlas"], LISTENER, name, listener_pb2.Listener)
        assert lst.address.socket_address.address == "0.0.0.0", name


def test_thanos_calls_are_reset_after_the_idle_bound_and_prometheus_keeps_its_timeout() -> None:
    def routes(settings: model.Settings) -> dict[str, Any]:
        snap = build_snapshots(_PKI.fleet((helpers.cluster("east"),), settings=settings))["atlas"]
        out = {}
        for name, r in snap.of_type(SCOPED_ROUTE).items():
            scope = scoped_route_pb2.ScopedRouteConfiguration.FromString(r.body)
            out[name.split("/")[0]] = scope.route_configuration.virtual_hosts[0].routes[0].route
        return out

    default = routes(model.Settings())
    assert default["thanos"].idle_timeout.seconds == 30
    assert default["thanos"].HasField("timeout") and default["thanos"].timeout.seconds == 0
    assert not default["prometheus"].HasField("idle_timeout")
    assert routes(model.Settings(thanos_idle_seconds=7))["thanos"].idle_timeout.seconds == 7
    # 0: never reset (Envoy reads an explicit 0 as "off", whatever the listener's default).
    off = routes(model.Settings(thanos_idle_seconds=0))["thanos"]
    assert off.HasField("idle_timeout") and off.idle_timeout.seconds == 0


def test_xds_forwarding_fails_over_to_a_live_replica() -> None:
    """atlasd's ADS name may resolve to several replicas: a reconnecting downstream stream
    is retried on another host when its connect is refused (never the same one again), and
    a replica refusing connections is ejected from the balancing."""
    atlas = build_snapshots(fleet(clusters=()))["atlas"]
    rc = parse(atlas, ROUTE, "xds", route_pb2.RouteConfiguration)
    retry = rc.virtual_hosts[0].routes[0].route.retry_policy
    assert {"connect-failure", "reset", "refused-stream", "unavailable"} <= set(
        retry.retry_on.split(",")
    )
    assert retry.num_retries.value >= 1
    assert [p.name for p in retry.retry_host_predicate] == [
        "envoy.retry_host_predicates.previous_hosts"
    ]
    assert retry.host_selection_retry_max_attempts > 1
    cl = parse(atlas, CLUSTER, builders.ADS_FORWARD_CLUSTER, cluster_pb2.Cluster)
    od = cl.outlier_detection
    assert cl.HasField("outlier_detection")
    # A refused connect is a local-origin error counted as a gateway failure (503).
    assert od.split_external_local_origin_errors is False
    assert od.consecutive_gateway_failure.value == 2
    assert od.enforcing_consecutive_gateway_failure.value == 100
    # Never every replica ejected (panic mode would balance over the dead ones again).
    assert 0 < od.max_ejection_percent.value <= 50
    # A fleet's streams and a reconnect storm's retries are not refused by Envoy's default
    # circuit breakers (1,024 requests, 3 retries in flight).
    (limits,) = cl.circuit_breakers.thresholds
    for field in ("max_requests", "max_pending_requests", "max_retries", "max_connections"):
        assert getattr(limits, field).value >= 100_000, field
    assert 0 < od.base_ejection_time.ToSeconds() <= od.max_ejection_time.ToSeconds() <= 30
    # Never more streams on one connection than atlasd's ADS server accepts (grpclib closes
    # the connection on the 101st), even before its SETTINGS arrive.
    opts = http_protocol_options_pb2.HttpProtocolOptions.FromString(
        cl.typed_extension_protocol_options[
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
        ].value
    )
    http2 = opts.explicit_http_config.http2_protocol_options
    assert http2.max_concurrent_streams.value == 100
    # Other clusters are not retried or ejected this way (one upstream each).
    for name, r in atlas.of_type(CLUSTER).items():
        if name != builders.ADS_FORWARD_CLUSTER:
            assert not cluster_pb2.Cluster.FromString(r.body).HasField("outlier_detection")


def _files_source(src: Any, name: str) -> None:
    """``src`` (an SdsSecretConfig) names secret ``name`` from the agent's files."""
    assert src.name == name
    path = src.sds_config.path_config_source
    assert not src.sds_config.HasField("ads")
    assert path.path == f"/etc/atlas/certs/sds-{name}.yaml"
    assert path.watched_directory.path == "/etc/atlas/certs"


def test_an_enrolled_node_reads_its_secrets_from_its_agents_files() -> None:
    """No key of an enrolled cluster exists on atlasd's side: its node is served without
    an identity, names server/client/validation by SDS from files, and gets no secret;
    node atlas dials it as any other cluster (its own client certificate, SAN pinned)."""
    north = dataclasses.replace(helpers.cluster("north"), enrolled=True)
    trust = _PKI.with_identities(tuple((n, i) for n, i in _PKI.identities if n != "north"))
    snaps = build_snapshots(trust.fleet((helpers.cluster("east"), north), AMS))
    snap = snaps["north"]
    assert names(snap, SECRET) == set()
    assert names(snap, LISTENER) == names(snaps["east"], LISTENER)
    for name in ("thanos", "prometheus"):
        lst = parse(snap, LISTENER, name, listener_pb2.Listener)
        ctx = tls_pb2.DownstreamTlsContext.FromString(
            lst.filter_chains[0].transport_socket.typed_config.value
        )
        common = ctx.common_tls_context
        _files_source(common.tls_certificate_sds_secret_configs[0], "server")
        combined = common.combined_validation_context
        _files_source(combined.validation_context_sds_secret_config, "validation")
        sans = combined.default_validation_context.match_typed_subject_alt_names
        assert [m.matcher.exact for m in sans] == ["atlas"]
    relay = parse(snap, CLUSTER, "atlas-alertmanager", cluster_pb2.Cluster)
    up = tls_pb2.UpstreamTlsContext.FromString(relay.transport_socket.typed_config.value)
    _files_source(up.common_tls_context.tls_certificate_sds_secret_configs[0], "client")
    # Node atlas: north's upstream clusters as east's (ADS secrets, SAN north).
    cl = parse(snaps["atlas"], CLUSTER, "north-thanos", cluster_pb2.Cluster)
    up = tls_pb2.UpstreamTlsContext.FromString(cl.transport_socket.typed_config.value)
    assert up.sni == "north"
    assert up.common_tls_context.tls_certificate_sds_secret_configs[0].sds_config.HasField("ads")
    assert "north-prom" in names(snaps["atlas"], CLUSTER)
    # A compatible cluster without an identity is still not served.
    plain = trust.fleet((helpers.cluster("east"), helpers.cluster("north")))
    assert "north" not in build_snapshots(plain)


def test_switching_a_node_to_enrollment_drops_its_secrets() -> None:
    b = SnapshotBuilder()
    b.update(fleet((helpers.cluster("east"),)), None)
    assert names(b.snapshots()["east"], SECRET) == {"server", "validation"}
    enrolled = dataclasses.replace(helpers.cluster("east"), enrolled=True)
    result = b.update(fleet((enrolled,)), {"east"})
    assert "east" in result.changed
    assert names(b.snapshots()["east"], SECRET) == set()


def _contents(snaps: dict[str, Snapshot]) -> dict[str, dict[tuple[str, str], bytes]]:
    return {
        n: {(t, name): r.body for t, rs in s.resources.items() for name, r in rs.items()}
        for n, s in snaps.items()
    }


def test_pieces_alike_across_nodes_are_built_once_and_never_mixed_up() -> None:
    """A fleet-wide change builds a piece every node holds alike once (the same object in
    every snapshot); a warm builder's snapshots, after changes that move those pieces'
    inputs node by node, are byte for byte a fresh builder's."""
    plain = (helpers.cluster("east"), helpers.cluster("west"))
    b = SnapshotBuilder()
    b.build(fleet(plain))
    wide = b.build(fleet(plain, AMS))  # every node gains the relay
    for t, name in ((LISTENER, "alertmanager"), (CLUSTER, builders.ATLAS_ALERTMANAGER_CLUSTER),
                    (LISTENER, "thanos"), (CLUSTER, "prometheus")):  # fmt: skip
        assert wide["east"].get(t, name) is wide["west"].get(t, name), name
    # Now each input of a shared piece differs on one node: upstream host and port,
    # replicas, the address family, enrollment (secrets from files), per-node ports.
    east = dataclasses.replace(helpers.cluster("east", prom_port=9191, replicas=2),
                               external_ip="2001:db8::1")  # fmt: skip
    west = dataclasses.replace(helpers.cluster("west", host="10.0.0.9"), enrolled=True)
    north = helpers.cluster("north")
    plan = ListenPlan(downstream=(("north", NodePorts(thanos=21901, alertmanager=21903)),))
    for step in (
        fleet((east, west, north), AMS),
        fleet((east, west, north), AMS[:1]),
        fleet((helpers.cluster("east"), west, north), AMS[:1]),
    ):
        b.plan = plan
        assert _contents(b.build(step)) == _contents(SnapshotBuilder(plan).build(step))
