"""Revocation on the xDS side: a revoked cluster's upstream clusters carry its CRL (and
only its), and the ADS authorizer refuses a revoked client certificate however shown."""

from __future__ import annotations

import dataclasses
import datetime as dt

import pytest
from cryptography import x509
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as rbac_filter_pb2
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2

from atlasd import model, revocation
from atlasd.xds.authz import XFCC_HEADER, Authorizer, Denied, RevokedCerts, presented
from atlasd.xds.builders import SnapshotBuilder
from atlasd.xds.messages import RBAC_FILTER
from atlasd.xds.snapshot import CLUSTER, ROUTE, Snapshot
from tests.unit.xds import helpers

NOW = dt.datetime.now(dt.UTC)
CA, PKI = helpers.make_pki(["atlas", "east", "west"])
CLUSTERS = (helpers.cluster("east"), helpers.cluster("west"))


def _revoked(node: str) -> model.Revocation:
    ident = PKI.identity(node)
    assert ident is not None
    entries = [
        revocation.revoke(node, "server", ident.server.cert_pem, now=NOW),
        revocation.revoke(node, "client", ident.client.cert_pem, now=NOW),
    ]
    out = revocation.revocations(
        entries, ca_cert_pem=CA.material.cert_pem, ca_key_pem=CA.material.key_pem, now=NOW
    )
    return out[node]


def _validation(snap: Snapshot, name: str) -> tls_pb2.CertificateValidationContext:
    body = snap.resources[CLUSTER][name].body
    cl = cluster_pb2.Cluster.FromString(body)
    up = tls_pb2.UpstreamTlsContext.FromString(cl.transport_socket.typed_config.value)
    return up.common_tls_context.combined_validation_context.default_validation_context


def test_only_the_revoked_clusters_upstreams_change_and_carry_its_crl() -> None:
    fleet = PKI.fleet(CLUSTERS)
    builder = SnapshotBuilder()
    builder.build(fleet)
    before = builder.snapshots()["atlas"]
    assert not _validation(before, "east-thanos").HasField("crl")

    rev = _revoked("east")
    revoked_fleet = dataclasses.replace(fleet, revocations={"east": rev})
    result = builder.update(revoked_fleet, {"east"})
    assert set(result.changed) == {"atlas"}  # no downstream node is rebuilt
    after = builder.snapshots()["atlas"]
    for name in ("east-thanos", "east-prom"):
        ctx = _validation(after, name)
        assert ctx.crl.inline_bytes == rev.crl
        assert ctx.only_verify_leaf_cert_crl
        assert [m.matcher.exact for m in ctx.match_typed_subject_alt_names] == ["east"]
    crl = x509.load_pem_x509_crl(_validation(after, "east-prom").crl.inline_bytes)
    ident = PKI.identity("east")
    assert ident is not None
    server = x509.load_pem_x509_certificate(ident.server.cert_pem)
    assert crl.get_revoked_certificate_by_serial_number(server.serial_number) is not None
    changed = {n for n, r in after.resources[CLUSTER].items() if before.resources[CLUSTER][n] != r}
    assert changed == {"east-thanos", "east-prom"}
    assert not _validation(after, "west-thanos").HasField("crl")

    # The entries expire or are removed: the CRL goes with them.
    builder.update(fleet, {"east"})
    assert not _validation(builder.snapshots()["atlas"], "east-thanos").HasField("crl")


def _hash(node: str, kind: str) -> str:
    ident = PKI.identity(node)
    assert ident is not None
    pem = ident.client.cert_pem if kind == "client" else ident.server.cert_pem
    h = revocation.pem_fingerprint(pem)
    assert h is not None
    return h


def test_the_authorizer_refuses_a_revoked_certificate_forwarded_or_direct() -> None:
    revoked = RevokedCerts()
    authz = Authorizer(revoked=revoked)
    atlas = frozenset({"atlas"})
    east = _hash("east", "client")
    fwd = [(XFCC_HEADER, f'By=spiffe://x;Hash={east.upper()};DNS=east;DNS="east.monitoring.atlas"')]
    assert authz.authorize("east", fwd, atlas).startswith("forwarded:east")
    assert authz.authorize("east", [], frozenset({"east"}), east) == "certificate:east"

    assert revoked.update({"east": _revoked("east")}) == {"east"}
    assert revoked.update({"east": _revoked("east")}) == set()  # the same set: no change
    with pytest.raises(Denied, match="revoked"):
        authz.authorize("east", fwd, atlas)
    with pytest.raises(Denied, match="revoked"):
        authz.authorize("east", [], frozenset({"east"}), east)
    # Another cluster, and the forwarder itself, are not touched.
    west = _hash("west", "client")
    assert authz.authorize("west", [(XFCC_HEADER, f"Hash={west};DNS=west")], atlas)
    assert authz.authorize("atlas", [], atlas, _hash("atlas", "client"))


def test_a_stream_stands_on_the_forwarded_certificate_else_its_own() -> None:
    assert presented([(XFCC_HEADER, "Hash=AB;DNS=east")], "cd") == "ab"
    assert presented([], "cd") == "cd"
    assert presented([(XFCC_HEADER, "DNS=east")], "cd") is None
    assert presented([(XFCC_HEADER, "Hash=a,Hash=b")], None) is None


def test_with_alertmanagers_a_revocation_also_changes_the_alertmanager_routes_only() -> None:
    ams = (model.LocalAlertmanager("am0", "monitoring", 9093),)
    fleet = PKI.fleet(CLUSTERS, ams)
    builder = SnapshotBuilder()
    builder.build(fleet)
    before = builder.snapshots()["atlas"]
    builder.update(dataclasses.replace(fleet, revocations={"east": _revoked("east")}), {"east"})
    after = builder.snapshots()["atlas"]
    changed = {
        (t, n)
        for t, rs in after.resources.items()
        for n, r in rs.items()
        if before.resources.get(t, {}).get(n) != r
    }
    assert changed == {
        (CLUSTER, "east-thanos"),
        (CLUSTER, "east-prom"),
        (ROUTE, "alertmanager"),
    }
    rc = route_pb2.RouteConfiguration.FromString(after.resources[ROUTE]["alertmanager"].body)
    [vh] = rc.virtual_hosts
    assert list(vh.request_headers_to_remove) == [XFCC_HEADER]
    per_route = rbac_filter_pb2.RBACPerRoute()
    vh.typed_per_filter_config[RBAC_FILTER].Unpack(per_route)
    [policy] = per_route.rbac.rules.policies.values()
    by_name = {
        (
            p.authenticated.principal_name.exact
            or p.and_ids.ids[0].authenticated.principal_name.exact
        ): p
        for p in policy.principals
    }
    assert set(by_name) == {"east", "west"}
    assert not by_name["west"].HasField("and_ids")
    refused = by_name["east"].and_ids.ids[1].not_id.or_ids.ids
    assert {m.header.string_match.contains for m in refused} == {
        f"Hash={h}" for h in _revoked("east").hashes
    }
