"""Builders: table-driven checks of what each node gets, without I/O."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as rbac_filter_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2, tls_pb2
from google.protobuf import any_pb2, descriptor_pool, message, message_factory

from atlasd import model
from atlasd.xds import builders
from atlasd.xds.builders import SnapshotBuilder, build_snapshots
from atlasd.xds.plan import ListenPlan, NodePorts
from atlasd.xds.snapshot import CLUSTER, LISTENER, ROUTE, SECRET, Snapshot
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


def names(snap: Snapshot, t: str) -> set[str]:
    return set(snap.of_type(t))


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
                    ROUTE: {"xds", "thanos", "prometheus"},
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
            "no clusters: no client secret; 10903 allows nobody",
            fleet(clusters=(), alertmanagers=AMS),
            {
                "atlas": {
                    LISTENER: {"xds", "thanos", "prometheus", "alertmanager"},
                    CLUSTER: {"atlasd-ads-forward", "alertmanager0", "alertmanager1"},
                    ROUTE: {"xds", "thanos", "prometheus", "alertmanager"},
                    SECRET: {"validation", "server"},
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
                    ROUTE: {"xds", "thanos", "prometheus", "alertmanager"},
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
                    ROUTE: {"xds", "thanos", "prometheus"},
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


def test_thanos_routes_by_authority_and_upstream_san() -> None:
    snaps = build_snapshots(
        fleet(clusters=(helpers.cluster("east", replicas=2), helpers.cluster("west")))
    )
    atlas = snaps["atlas"]
    rc = parse(atlas, ROUTE, "thanos", route_pb2.RouteConfiguration)
    by_vh = {vh.name: (list(vh.domains), vh.routes[0].route.cluster) for vh in rc.virtual_hosts}
    host = "east-thanos-sidecar{}.monitoring.svc.cluster.local"
    assert by_vh["east-thanos"] == (
        [host.format(0), host.format(0) + ":*", host.format(1), host.format(1) + ":*"],
        "east-thanos",
    )
    assert all("east.east" not in d for d, _ in by_vh.values() for d in d)
    cl = parse(atlas, CLUSTER, "east-thanos", cluster_pb2.Cluster)
    up = tls_pb2.UpstreamTlsContext.FromString(cl.transport_socket.typed_config.value)
    sans = up.common_tls_context.combined_validation_context.default_validation_context
    assert [m.matcher.exact for m in sans.match_typed_subject_alt_names] == ["east"]
    assert up.common_tls_context.tls_certificate_sds_secret_configs[0].name == "client"
    addr = cl.load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.socket_address
    assert (addr.address, addr.port_value) == ("127.0.0.1", model.DOWNSTREAM_THANOS_PORT)


def test_prometheus_prefix_rewrite() -> None:
    snaps = build_snapshots(fleet(clusters=(helpers.cluster("east"), helpers.cluster("west"))))
    rc = parse(snaps["atlas"], ROUTE, "prometheus", route_pb2.RouteConfiguration)
    routes = [
        (r.match.prefix, r.route.prefix_rewrite, r.route.cluster)
        for r in rc.virtual_hosts[0].routes
    ]
    assert routes == [("/prom/east/", "/", "east-prom"), ("/prom/west/", "/", "west-prom")]


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
        cl = parse(snap, t, name, cluster_pb2.Cluster)
        return int(
            cl.load_assignment.endpoints[0]
            .lb_endpoints[0]
            .endpoint.address.socket_address.port_value
        )

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


def test_piecewise_route_encoding_equals_normal_encoding() -> None:
    snaps = build_snapshots(
        fleet(clusters=(helpers.cluster("east"), helpers.cluster("west", replicas=3)))
    )
    for name in ("thanos", "prometheus"):
        body = snaps["atlas"].get(ROUTE, name)
        assert body is not None
        parsed = route_pb2.RouteConfiguration.FromString(body.body)
        rebuilt = route_pb2.RouteConfiguration(name=name)
        rebuilt.virtual_hosts.extend(parsed.virtual_hosts)
        assert parsed == rebuilt
        assert all(isinstance(vh, route_components_pb2.VirtualHost) for vh in parsed.virtual_hosts)


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
    assert b.problems and "missing rds" in b.problems[0]
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
        cl = parse(snaps["atlas"], CLUSTER, name, cluster_pb2.Cluster)
        addr = cl.load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.socket_address
        assert addr.address == external_ip, name
    # The observability Envoy's own listeners do not depend on a cluster's address family.
    for name in names(snaps["atlas"], LISTENER):
        lst = parse(snaps["atlas"], LISTENER, name, listener_pb2.Listener)
        assert lst.address.socket_address.address == "0.0.0.0", name
