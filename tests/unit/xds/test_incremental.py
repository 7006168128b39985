"""The incremental path: a builder fed key by key, snapshots evolved, Delta hints.

Each step of a seeded random walk over fleets (clusters added, removed, moved to another
IP, re-replicated; Alertmanagers coming and going) is applied with
``SnapshotBuilder.update(fleet, changed)`` and must give exactly what a fresh
``build_snapshots(fleet)`` gives; evolved snapshots must equal snapshots made from scratch.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Any

import pytest

from atlasd import model
from atlasd.xds import builders
from atlasd.xds.builders import SnapshotBuilder, build_snapshots
from atlasd.xds.protocol import DeltaDiscoveryRequest, DeltaStream, DiscoveryRequest, SotwStream
from atlasd.xds.snapshot import (
    CLUSTER,
    ENDPOINT,
    LISTENER,
    ROUTE,
    SECRET,
    InconsistentSnapshot,
    Resource,
    Snapshot,
)
from tests.unit.xds import helpers

NAMES = [f"c{i}" for i in range(12)]
_CA, TRUST = helpers.make_pki(["atlas", *NAMES])
AMS = (model.LocalAlertmanager("am-a", "monitoring", 9093),)


def _fleet(clusters: dict[str, model.DownstreamCluster], ams: bool) -> model.Fleet:
    return TRUST.fleet(tuple(clusters.values()), AMS if ams else ())


def _versions(snaps: dict[str, Snapshot]) -> dict[str, dict[str, str]]:
    return {n: dict(s.versions) for n, s in snaps.items()}


def _bodies(snap: Snapshot) -> dict[tuple[str, str], bytes]:
    return {(t, n): r.body for t, rs in snap.resources.items() for n, r in rs.items()}


@pytest.mark.parametrize("seed", range(8))
def test_updates_key_by_key_equal_a_fresh_build(seed: int) -> None:
    rnd = random.Random(seed)
    clusters: dict[str, model.DownstreamCluster] = {}
    ams = False
    builder = SnapshotBuilder()
    builder.update(_fleet(clusters, ams), None)
    for _step in range(60):
        changed: set[str] = set()
        for _ in range(rnd.randint(1, 3)):
            name = rnd.choice(NAMES)
            op = rnd.random()
            if op < 0.4 or name not in clusters:
                c = helpers.cluster(name, replicas=rnd.randint(1, 3))
                clusters[name] = dataclasses.replace(
                    c, external_ip=f"192.0.2.{rnd.randint(1, 200)}"
                )
            elif op < 0.7:
                del clusters[name]
            else:
                clusters[name] = dataclasses.replace(
                    clusters[name], external_ip=f"198.51.100.{rnd.randint(1, 200)}"
                )
            changed.add(name)
        if rnd.random() < 0.1:
            ams = not ams
            changed.add("*fleet*")
        fleet = _fleet(clusters, ams)
        builder.update(fleet, changed)
        got, want = builder.snapshots(), build_snapshots(fleet)
        assert _versions(got) == _versions(want)
        for node in want:
            assert _bodies(got[node]) == _bodies(want[node])
    assert builder.problems == []


def test_an_ip_change_touches_two_endpoints_of_atlas_and_nothing_else(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clusters = {n: helpers.cluster(n) for n in NAMES}
    builder = SnapshotBuilder()
    builder.update(_fleet(clusters, True), None)
    before = builder.snapshots()
    clusters["c3"] = dataclasses.replace(clusters["c3"], external_ip="192.0.2.77")
    made: list[str] = []
    make_cluster = builders.make_cluster

    def counting(**kw: Any) -> Any:
        made.append(kw["name"])
        return make_cluster(**kw)

    monkeypatch.setattr(builders, "make_cluster", counting)
    result = builder.update(_fleet(clusters, True), {"c3"})
    assert made == []  # only the endpoints are built, not the clusters again
    assert set(result.changed) == {"atlas"}  # node c3's own config does not name its IP
    atlas = result.changed["atlas"]
    assert atlas is not None
    # The clusters stay (Envoy keeps them and their connection pools); their endpoints move.
    assert atlas.diff_from(before["atlas"]) == {ENDPOINT: frozenset({"c3-thanos", "c3-prom"})}
    assert atlas.version(ROUTE) == before["atlas"].version(ROUTE)


def test_evolve_checks_what_changed() -> None:
    snap = Snapshot.create(
        "n",
        [
            Resource.of(LISTENER, "l", b"l", {(ROUTE, "r"), (SECRET, "s")}),
            Resource.of(ROUTE, "r", b"r", {(CLUSTER, "c")}),
            Resource.of(CLUSTER, "c", b"c"),
            Resource.of(SECRET, "s", b"s"),
        ],
    )
    with pytest.raises(InconsistentSnapshot, match="names missing"):
        snap.evolve([Resource.of(ROUTE, "r", b"r2", {(CLUSTER, "gone")})])
    with pytest.raises(InconsistentSnapshot, match="still named"):
        snap.evolve(removals=[(CLUSTER, "c")])
    with pytest.raises(InconsistentSnapshot, match="unreferenced"):
        snap.evolve([Resource.of(SECRET, "extra", b"x")])
    same = snap.evolve([Resource.of(CLUSTER, "c", b"c")])
    assert same is snap
    nxt = snap.evolve([Resource.of(CLUSTER, "c", b"c2")])
    assert nxt.diff_from(snap) == {CLUSTER: frozenset({"c"})}
    fresh = Snapshot.create("n", [r for rs in nxt.resources.values() for r in rs.values()])
    assert dict(nxt.versions) == dict(fresh.versions)
    assert nxt.diff_from(fresh) is None
    # The reference counts are the base's until a change moves a reference, then a copy:
    # the route stops naming cluster c, which is then free to go in the new snapshot only.
    moved = nxt.evolve([Resource.of(ROUTE, "r", b"r3")])
    assert moved.evolve(removals=[(CLUSTER, "c")]).of_type(CLUSTER) == {}
    with pytest.raises(InconsistentSnapshot, match="still named"):
        nxt.evolve(removals=[(CLUSTER, "c")])


def _ack(stream: DeltaStream, step: Any, snap: Any) -> None:
    for r in step.responses:
        stream.on_request(
            DeltaDiscoveryRequest(type_url=r.type_url, response_nonce=r.nonce), snap, 0.0
        )


def _subscribe_and_ack(stream: DeltaStream, snap: Any) -> None:
    for t in (CLUSTER, ENDPOINT, LISTENER, ROUTE, SECRET):
        _ack(stream, stream.on_request(DeltaDiscoveryRequest(type_url=t), snap, 0.0), snap)


def test_delta_with_a_hint_sends_only_the_changed_resources() -> None:
    clusters = {n: helpers.cluster(n) for n in NAMES}
    builder = SnapshotBuilder()
    builder.update(_fleet(clusters, False), None)
    first = builder.snapshots()["atlas"]
    stream = DeltaStream("atlas")
    _subscribe_and_ack(stream, first)
    clusters["c5"] = dataclasses.replace(clusters["c5"], external_ip="192.0.2.55")
    second = builder.update(_fleet(clusters, False), {"c5"}).changed["atlas"]
    assert second is not None
    hint = {t: set(ns) for t, ns in (second.diff_from(first) or {}).items()}
    step = stream.on_snapshot(second, 1.0, hint)
    assert [(r.type_url, sorted(x.name for x in r.resources)) for r in step.responses] == [
        (ENDPOINT, ["c5-prom", "c5-thanos"])
    ]
    # Without a hint the result is the same, found by comparing everything.
    full = DeltaStream("atlas")
    _subscribe_and_ack(full, first)
    unhinted = full.on_snapshot(second, 1.0)
    assert [(r.type_url, sorted(x.name for x in r.resources)) for r in unhinted.responses] == [
        (ENDPOINT, ["c5-prom", "c5-thanos"])
    ]
    # A removal reaches the Envoy as a removal.
    _ack(stream, step, second)
    del clusters["c5"]
    third = builder.update(_fleet(clusters, False), {"c5"}).changed["atlas"]
    assert third is not None
    hint = {t: set(ns) for t, ns in (third.diff_from(second) or {}).items()}
    step = stream.on_snapshot(third, 2.0, hint)
    removed = {
        r.type_url: sorted(r.removed_resources) for r in step.responses if r.removed_resources
    }
    assert removed == {CLUSTER: ["c5-prom", "c5-thanos"], ENDPOINT: ["c5-prom", "c5-thanos"]}


def test_sotw_sends_only_the_endpoints_that_changed() -> None:
    clusters = {n: helpers.cluster(n) for n in NAMES}
    builder = SnapshotBuilder()
    first = builder.build(_fleet(clusters, False))["atlas"]
    stream = SotwStream("atlas")
    eds = sorted(first.of_type(ENDPOINT))
    for t, names in ((CLUSTER, []), (ENDPOINT, eds)):
        [r] = stream.on_request(
            DiscoveryRequest(type_url=t, resource_names=names), first, 0.0
        ).responses
        stream.on_request(
            DiscoveryRequest(
                type_url=t,
                resource_names=names,
                response_nonce=r.nonce,
                version_info=r.version_info,
            ),
            first,
            0.0,
        )
    clusters["c5"] = dataclasses.replace(clusters["c5"], external_ip="192.0.2.55")
    second = builder.update(_fleet(clusters, False), {"c5"}).changed["atlas"]
    assert second is not None
    hint = {t: set(ns) for t, ns in (second.diff_from(first) or {}).items()}
    [r] = stream.on_snapshot(second, 1.0, hint).responses
    # Two assignments, under the snapshot's version of the whole type.
    assert (r.type_url, sorted(a.value for a in r.resources)) == (
        ENDPOINT,
        sorted(second.of_type(ENDPOINT)[n].body for n in ("c5-prom", "c5-thanos")),
    )
    assert r.version_info == second.version(ENDPOINT)
    # Its ACK needs nothing more; without a hint the whole subscription would go out.
    ack = DiscoveryRequest(
        type_url=ENDPOINT, resource_names=eds, response_nonce=r.nonce, version_info=r.version_info
    )
    assert stream.on_request(ack, second, 2.0).responses == []
    fresh = SotwStream("atlas")
    [full] = fresh.on_request(
        DiscoveryRequest(type_url=ENDPOINT, resource_names=eds), second, 0.0
    ).responses
    assert len(full.resources) == len(eds) and full.version_info == r.version_info
