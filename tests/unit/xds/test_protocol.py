"""The ADS state machines, driven by hand-made requests (no network)."""

from __future__ import annotations

from typing import Any

from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3.discovery_pb2 import DeltaDiscoveryRequest, DiscoveryRequest
from google.rpc import status_pb2

from atlasd.xds.protocol import FLOW_TIMEOUT, DeltaStream, SotwStream
from atlasd.xds.snapshot import CLUSTER, ENDPOINT, LISTENER, ROUTE, SECRET, Resource, Snapshot

NODE = base_pb2.Node(id="n")


def snap(clusters: dict[str, str], route_to: str = "c1", secret_body: str = "s") -> Snapshot:
    rs = [Resource.of(CLUSTER, n, f"{n}:{b}".encode()) for n, b in clusters.items()]
    rs.append(Resource.of(LISTENER, "l", b"l", {(ROUTE, "r"), (SECRET, "server")}))
    rs.append(Resource.of(ROUTE, "r", f"r->{route_to}".encode(), {(CLUSTER, route_to)}))
    rs.append(Resource.of(SECRET, "server", secret_body.encode()))
    return Snapshot.create("n", rs)


def req(
    t: str, names: list[str] | None = None, nonce: str = "", version: str = "", error: str = ""
) -> Any:
    r = DiscoveryRequest(
        type_url=t, resource_names=names or [], response_nonce=nonce, version_info=version
    )
    if error:
        r.error_detail.CopyFrom(status_pb2.Status(code=3, message=error))
    return r


def names_of(resp: Any) -> list[str]:
    return sorted(a.value.decode().split(":")[0] for a in resp.resources)


S1 = snap({"c1": "a", "c2": "a"})


def test_sotw_wildcard_ack_and_no_resend() -> None:
    m = SotwStream("n")
    step = m.on_request(req(CLUSTER), S1, 0)
    [resp] = step.responses
    assert resp.version_info == S1.version(CLUSTER) and len(resp.resources) == 2
    # ACK: nothing new to send.
    step = m.on_request(req(CLUSTER, nonce=resp.nonce, version=resp.version_info), S1, 0)
    assert step.responses == [] and [a.version for a in step.acks] == [S1.version(CLUSTER)]
    # An equal snapshot sends nothing.
    assert m.on_snapshot(snap({"c1": "a", "c2": "a"}), 0).responses == []


def test_sotw_stale_nonce_is_ignored() -> None:
    m = SotwStream("n")
    first = m.on_request(req(CLUSTER), S1, 0).responses[0]
    # A new subscription answered before the first response was ACKed: the ACK of the
    # first is stale.
    second = m.on_request(req(CLUSTER, ["c1"]), S1, 0).responses[0]
    step = m.on_request(req(CLUSTER, nonce=first.nonce, version=first.version_info), S1, 0)
    assert step.responses == [] and step.acks == []
    step = m.on_request(
        req(CLUSTER, ["c1"], nonce=second.nonce, version=second.version_info), S1, 0
    )
    assert [a.version for a in step.acks] == [second.version_info]


def _acked(m: Any, t: str, names: list[str], snapshot: Snapshot, delta: bool = False) -> Any:
    """Subscribe to ``t`` and ACK the answer."""
    first = m.on_request(dreq(t, names) if delta else req(t, names), snapshot, 0).responses[0]
    if delta:
        m.on_request(dreq(t, nonce=first.nonce), snapshot, 0)
    else:
        m.on_request(req(t, names, nonce=first.nonce, version=first.version_info), snapshot, 0)
    return first


def test_sotw_one_round_at_a_time() -> None:
    m = SotwStream("n")
    _acked(m, CLUSTER, [], S1)
    s2, s3 = snap({"c1": "b", "c2": "a"}), snap({"c1": "c", "c2": "a"})
    [pushed] = m.on_snapshot(s2, 1.0).responses
    # Unanswered: later changes wait, however many...
    assert m.on_snapshot(s3, 2.0).responses == []
    assert m.on_snapshot(snap({"c1": "d", "c2": "a"}), 3.0).responses == []
    # ...and go out together, as the newest snapshot, once the Envoy has answered.
    s4 = snap({"c1": "d", "c2": "a"})
    step = m.on_request(req(CLUSTER, nonce=pushed.nonce, version=pushed.version_info), s4, 4.0)
    assert [a.version for a in step.acks] == [s2.version(CLUSTER)]
    [held] = step.responses
    assert held.version_info == s4.version(CLUSTER)
    # A NACK answers too.
    s5 = snap({"c1": "e", "c2": "a"})
    assert m.on_snapshot(s5, 5.0).responses == []
    step = m.on_request(req(CLUSTER, nonce=held.nonce, error="no"), s5, 6.0)
    assert [r.version_info for r in step.responses] == [s5.version(CLUSTER)]


def test_sotw_an_unanswered_response_holds_nothing_back_forever() -> None:
    m = SotwStream("n")
    _acked(m, CLUSTER, [], S1)
    assert len(m.on_snapshot(snap({"c1": "b", "c2": "a"}), 1.0).responses) == 1
    assert m.on_snapshot(snap({"c1": "c", "c2": "a"}), 2.0).responses == []
    late = m.on_snapshot(snap({"c1": "d", "c2": "a"}), 1.0 + FLOW_TIMEOUT).responses
    assert len(late) == 1


def test_sotw_nack_is_parked_not_resent() -> None:
    m = SotwStream("n")
    good = m.on_request(req(CLUSTER), S1, 0).responses[0]
    m.on_request(req(CLUSTER, nonce=good.nonce, version=good.version_info), S1, 0)
    bad_snap = snap({"c1": "bad", "c2": "a"})
    bad = m.on_snapshot(bad_snap, 0).responses[0]
    step = m.on_request(
        req(CLUSTER, nonce=bad.nonce, version=good.version_info, error="no"), bad_snap, 0
    )
    assert step.responses == []  # not re-sent in reply to the NACK
    assert [(n.version, n.message) for n in step.nacks] == [(bad.version_info, "no")]
    assert m.on_snapshot(bad_snap, 0).responses == []  # nor on a re-publish of the same
    fixed = m.on_snapshot(snap({"c1": "fixed", "c2": "a"}), 0).responses
    assert len(fixed) == 1  # the next change goes out


def test_sotw_named_subscription_waits_for_missing_names() -> None:
    m = SotwStream("n")
    assert (
        m.on_request(req(ROUTE, ["r", "later"]), S1, 0)
        .responses[0]
        .resources[0]
        .value.startswith(b"r->")
    )
    m2 = SotwStream("n")
    assert m2.on_request(req(SECRET, ["missing"]), S1, 0).responses == []
    with_missing = Snapshot.create(
        "n",
        [
            *[r for rs in S1.resources.values() for r in rs.values()],
            Resource.of(SECRET, "missing", b"x"),
            Resource.of(LISTENER, "l2", b"l2", {(SECRET, "missing"), (ROUTE, "r")}),
        ],
    )
    [resp] = m2.on_snapshot(with_missing, 0).responses
    assert [a.value for a in resp.resources] == [b"x"]


def test_sotw_wildcard_ends_once_names_given() -> None:
    m = SotwStream("n")
    first = m.on_request(req(CLUSTER), S1, 0).responses[0]
    assert m.on_request(req(CLUSTER, ["c2"], nonce="x"), S1, 0).responses == []  # stale: ignored
    [resp] = m.on_request(req(CLUSTER, ["c2"], nonce=first.nonce), S1, 0).responses
    assert names_of(resp) == ["c2"]
    # Back to empty names after naming something is "nothing", not wildcard.
    [empty] = m.on_request(req(CLUSTER, [], nonce=resp.nonce), S1, 0).responses
    assert names_of(empty) == []


def test_sotw_make_before_break_order() -> None:
    m = SotwStream("n")
    for t, names in ((CLUSTER, []), (LISTENER, []), (ROUTE, ["r"]), (SECRET, ["server"])):
        r = m.on_request(req(t, names), S1, 0).responses[0]
        m.on_request(req(t, names, nonce=r.nonce, version=r.version_info), S1, 0)
    # c1 goes away, the route moves to c3, the secret rotates.
    new = snap({"c2": "a", "c3": "a"}, route_to="c3", secret_body="s2")
    out = m.on_snapshot(new, 0).responses
    assert [r.type_url for r in out] == [SECRET, CLUSTER, ROUTE, CLUSTER]
    assert names_of(out[1]) == ["c1", "c2", "c3"]  # union first: c1 kept while routes move
    assert names_of(out[3]) == ["c2", "c3"]  # then the stale one goes


def test_sotw_reconnect_gets_full_state() -> None:
    m = SotwStream("n")
    r = m.on_request(req(CLUSTER, version=S1.version(CLUSTER)), S1, 0)
    assert len(r.responses) == 1  # a new stream always answers its first request


def dreq(
    t: str,
    sub: list[str] | None = None,
    unsub: list[str] | None = None,
    nonce: str = "",
    initial: dict[str, str] | None = None,
    error: str = "",
) -> Any:
    r = DeltaDiscoveryRequest(
        node=NODE,
        type_url=t,
        resource_names_subscribe=sub or [],
        resource_names_unsubscribe=unsub or [],
        response_nonce=nonce,
        initial_resource_versions=initial or {},
    )
    if error:
        r.error_detail.CopyFrom(status_pb2.Status(code=3, message=error))
    return r


def test_delta_sends_only_what_changed() -> None:
    m = DeltaStream("n")
    [r] = m.on_request(dreq(CLUSTER), S1, 0).responses
    assert sorted(x.name for x in r.resources) == ["c1", "c2"]
    step = m.on_request(dreq(CLUSTER, nonce=r.nonce), S1, 0)
    assert step.responses == [] and len(step.acks) == 1
    [r2] = m.on_snapshot(snap({"c1": "a", "c2": "b"}), 0).responses
    assert [x.name for x in r2.resources] == ["c2"] and list(r2.removed_resources) == []


def test_delta_initial_versions_avoid_resend() -> None:
    m = DeltaStream("n")
    have = {n: r.version for n, r in S1.of_type(CLUSTER).items()}
    [r] = m.on_request(dreq(CLUSTER, initial=have), S1, 0).responses
    assert list(r.resources) == []  # first wildcard answer is sent, but empty


def test_delta_removals_come_last() -> None:
    m = DeltaStream("n")
    for t, sub in ((CLUSTER, []), (LISTENER, []), (ROUTE, ["r"])):
        r = m.on_request(dreq(t, sub), S1, 0).responses[0]
        m.on_request(dreq(t, nonce=r.nonce), S1, 0)
    out = m.on_snapshot(snap({"c2": "a", "c3": "a"}, route_to="c3"), 0).responses
    kinds = [(r.type_url, [x.name for x in r.resources], list(r.removed_resources)) for r in out]
    assert kinds == [(CLUSTER, ["c3"], []), (ROUTE, ["r"], []), (CLUSTER, [], ["c1"])]


def test_delta_nack_parks_the_version() -> None:
    m = DeltaStream("n")
    r = m.on_request(dreq(CLUSTER), S1, 0).responses[0]
    m.on_request(dreq(CLUSTER, nonce=r.nonce), S1, 0)
    bad = snap({"c1": "bad", "c2": "a"})
    [b] = m.on_snapshot(bad, 0).responses
    step = m.on_request(dreq(CLUSTER, nonce=b.nonce, error="invalid"), bad, 0)
    assert step.responses == [] and [n.message for n in step.nacks] == ["invalid"]
    assert m.on_snapshot(bad, 0).responses == []
    [fixed] = m.on_snapshot(snap({"c1": "fixed", "c2": "a"}), 0).responses
    assert [x.name for x in fixed.resources] == ["c1"]


def test_delta_subscribe_unsubscribe() -> None:
    m = DeltaStream("n")
    [r] = m.on_request(dreq(SECRET, ["server"]), S1, 0).responses
    assert [x.name for x in r.resources] == ["server"]
    assert m.on_request(dreq(SECRET, unsub=["server"], nonce=r.nonce), S1, 0).responses == []
    # Re-subscribing sends it again (the Envoy forgot it).
    [r2] = m.on_request(dreq(SECRET, ["server"], nonce="stale"), S1, 0).responses
    assert [x.name for x in r2.resources] == ["server"]


def test_delta_reconnect_with_current_named_resources_counts_as_acked() -> None:
    m = DeltaStream("n")
    have = {"server": S1.of_type(SECRET)["server"].version}
    step = m.on_request(dreq(SECRET, ["server"], initial=have), S1, 0)
    assert step.responses == []
    assert [(a.version, a.pushed) for a in step.acks] == [(S1.version(SECRET), False)]
    # With an outdated version it is sent, and only the real ACK counts.
    m2 = DeltaStream("n")
    step = m2.on_request(dreq(SECRET, ["server"], initial={"server": "old"}), S1, 0)
    assert len(step.responses) == 1 and step.acks == []


def test_delta_one_round_at_a_time() -> None:
    m = DeltaStream("n")
    for t, sub in ((CLUSTER, []), (LISTENER, []), (ROUTE, ["r"])):
        _acked(m, t, sub, S1, delta=True)
    [c2] = m.on_snapshot(snap({"c1": "a", "c2": "b"}), 1.0, {CLUSTER: {"c2"}}).responses
    # While c2's update is unanswered, c1 changes and c3 arrives with a route to it.
    s3 = snap({"c1": "x", "c2": "b", "c3": "a"}, route_to="c3")
    assert m.on_snapshot(s3, 2.0, {CLUSTER: {"c1", "c3"}, ROUTE: {"r"}}).responses == []
    # Once answered, everything held goes out in one round, clusters before routes.
    step = m.on_request(dreq(CLUSTER, nonce=c2.nonce), s3, 3.0)
    sent = [(r.type_url, sorted(x.name for x in r.resources)) for r in step.responses]
    assert sent == [(CLUSTER, ["c1", "c3"]), (ROUTE, ["r"])]
    # Not answered yet (only the cluster response is): nothing more until the route is.
    s4 = snap({"c1": "y", "c2": "b", "c3": "a"}, route_to="c3")
    assert m.on_snapshot(s4, 4.0, {CLUSTER: {"c1"}}).responses == []
    cds, rds = step.responses
    assert m.on_request(dreq(CLUSTER, nonce=cds.nonce), s4, 5.0).responses == []
    [again] = m.on_request(dreq(ROUTE, nonce=rds.nonce), s4, 6.0).responses
    assert [x.name for x in again.resources] == ["c1"]


# -- warming: a cluster added or changed by CDS waits for its assignment ---------------------


def eds_snap(clusters: dict[str, str], endpoints: dict[str, str]) -> Snapshot:
    """EDS clusters (body per name) and their assignments (body per name)."""
    rs = [
        Resource.of(CLUSTER, n, f"{n}:{b}".encode(), {(ENDPOINT, n)}) for n, b in clusters.items()
    ]
    rs += [Resource.of(ENDPOINT, n, f"{n}:{b}".encode()) for n, b in endpoints.items()]
    return Snapshot.create("n", rs)


def _sotw_holding(s: Snapshot, eds_names: list[str]) -> SotwStream:
    """A SotW stream that ACKed CDS (wildcard) and EDS ``eds_names``."""
    m = SotwStream("n")
    cds = m.on_request(req(CLUSTER), s, 0).responses[0]
    eds = m.on_request(req(ENDPOINT, eds_names), s, 0).responses[0]
    m.on_request(req(CLUSTER, nonce=cds.nonce, version=cds.version_info), s, 0)
    m.on_request(req(ENDPOINT, eds_names, nonce=eds.nonce, version=eds.version_info), s, 0)
    return m


def test_sotw_a_changed_cluster_is_followed_by_its_unchanged_assignment() -> None:
    s1 = eds_snap({"c1": "a", "c2": "a", "c3": "a"}, {"c1": "e", "c2": "e", "c3": "e"})
    m = _sotw_holding(s1, ["c1", "c2"])
    # c1's and c3's clusters change, their assignments do not; c3 is not subscribed.
    s2 = eds_snap({"c1": "b", "c2": "a", "c3": "b"}, {"c1": "e", "c2": "e", "c3": "e"})
    cds, eds = m.on_snapshot(s2, 1, {CLUSTER: {"c1", "c3"}}).responses
    assert cds.type_url == CLUSTER and eds.type_url == ENDPOINT
    assert names_of(eds) == ["c1"]
    # An added cluster is named by the Envoy's next EDS request (answered then): nothing
    # follows the CDS response that adds it.
    m.on_request(req(CLUSTER, nonce=cds.nonce, version=cds.version_info), s2, 1)
    m.on_request(req(ENDPOINT, ["c1", "c2"], nonce=eds.nonce, version=eds.version_info), s2, 1)
    s3 = eds_snap(
        {"c1": "b", "c2": "a", "c3": "b", "c4": "a"}, {n: "e" for n in ("c1", "c2", "c3", "c4")}
    )
    [cds] = m.on_snapshot(s3, 2, {CLUSTER: {"c4"}, ENDPOINT: {"c4"}}).responses
    assert cds.type_url == CLUSTER


def test_delta_a_changed_cluster_is_followed_by_its_assignment_again() -> None:
    s1 = eds_snap({"c1": "a", "c2": "a"}, {"c1": "e", "c2": "e"})
    m = DeltaStream("n")
    _acked(m, CLUSTER, [], s1, delta=True)
    _acked(m, ENDPOINT, ["c1", "c2"], s1, delta=True)
    s2 = eds_snap({"c1": "b", "c2": "a"}, {"c1": "e", "c2": "e"})
    cds, eds = m.on_snapshot(s2, 1, {CLUSTER: {"c1"}}).responses
    assert [r.name for r in cds.resources] == ["c1"]
    assert eds.type_url == ENDPOINT and [r.name for r in eds.resources] == ["c1"]
    m.on_request(dreq(CLUSTER, nonce=cds.nonce), s2, 1)
    m.on_request(dreq(ENDPOINT, nonce=eds.nonce), s2, 1)
    # An added cluster is subscribed by name (answered then): nothing follows.
    s3 = eds_snap({"c1": "b", "c2": "a", "c3": "a"}, {"c1": "e", "c2": "e", "c3": "e"})
    [cds] = m.on_snapshot(s3, 2, {CLUSTER: {"c3"}, ENDPOINT: {"c3"}}).responses
    assert cds.type_url == CLUSTER


def test_sotw_partial_responses_never_stand_for_the_whole_subscription() -> None:
    """The soak's lost assignment: c2 is added while c1's cluster changes; the EDS response
    that re-warms c1 must not carry a version that makes the Envoy's later subscription
    to {c1, c2} look answered already."""
    s1 = eds_snap({"c1": "a"}, {"c1": "e"})
    m = _sotw_holding(s1, ["c1"])
    s2 = eds_snap({"c1": "b", "c2": "a"}, {"c1": "e", "c2": "e"})
    _cds, eds = m.on_snapshot(s2, 1, {CLUSTER: {"c1", "c2"}, ENDPOINT: {"c2"}}).responses
    assert names_of(eds) == ["c1"] and eds.version_info != s2.version(ENDPOINT)
    # The Envoy adds c2's watch (a request crossing that response: stale), then ACKs it.
    step = m.on_request(req(ENDPOINT, ["c1", "c2"], nonce="old"), s2, 1)
    [answer] = step.responses
    assert names_of(answer) == ["c2"] and answer.version_info == s2.version(ENDPOINT)
    assert not m.on_request(
        req(ENDPOINT, ["c1", "c2"], nonce=answer.nonce, version=answer.version_info), s2, 1
    ).responses


def test_sotw_a_cluster_removed_while_warming_is_not_held_back() -> None:
    """CDS adds c2; before the Envoy answers (it waits for c2's assignment), c2 is removed:
    the Envoy's EDS request names c2, which is gone, so the removal goes out at once."""
    s1 = eds_snap({"c1": "a"}, {"c1": "e"})
    m = _sotw_holding(s1, ["c1"])
    s2 = eds_snap({"c1": "a", "c2": "a"}, {"c1": "e", "c2": "e"})
    [_cds] = m.on_snapshot(s2, 1, {CLUSTER: {"c2"}, ENDPOINT: {"c2"}}).responses
    assert m.on_snapshot(s1, 2, {CLUSTER: {"c2"}, ENDPOINT: {"c2"}}).responses == []  # held
    step = m.on_request(req(ENDPOINT, ["c1", "c2"], nonce="stale"), s1, 2)
    # (make before break: the union first, then the final set)
    assert {r.type_url for r in step.responses} == {CLUSTER}
    assert names_of(step.responses[-1]) == ["c1"]
