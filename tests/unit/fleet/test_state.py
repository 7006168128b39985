"""FleetState: objects in by key, validated members and immutable versions out (pure)."""

from __future__ import annotations

import copy
import datetime as dt
import itertools
import random
from typing import Any

import pytest
import trio
import trio.testing

from atlasd import labels
from atlasd.fleet.feed import FleetFeed
from atlasd.fleet.keys import FLEET_KEY
from atlasd.fleet.state import FleetState, fleet_of
from atlasd.fleet.validate import validate_all
from atlasd.model import Settings
from atlasd.reconcile.pki import plan_pki
from tests.unit.reconcile.builders import cluster_service
from tests.unit.reconcile.pkitools import CountingKeys, plan_secrets

NOW = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
S = Settings()
_rv = itertools.count(1)


def stored(obj: dict[str, Any], *, created: str = "2026-01-01T00:00:00Z") -> dict[str, Any]:
    out = copy.deepcopy(obj)
    meta = out.setdefault("metadata", {})
    meta["resourceVersion"] = str(next(_rv))
    meta.setdefault("creationTimestamp", created)
    meta.setdefault("uid", f"uid-{meta['name']}")
    return out


def _pki_secrets(*names: str, start: int = 1000) -> dict[str, dict[str, Any]]:
    from atlasd.fleet.validate import validate_cluster

    clusters = []
    for n in names:
        c = validate_cluster(cluster_service(n, "203.0.113.1"), S)
        assert not isinstance(c, list)
        clusters.append(c)
    plan = plan_pki(
        secrets={}, clusters=clusters, settings=S, now=NOW, keys=CountingKeys(start=start)
    )
    return {n: stored(dict(s)) for n, s in plan_secrets(plan).items()}


def _observe_secrets(state: FleetState, secrets: dict[str, dict[str, Any]]) -> set[str]:
    keys: set[str] = set()
    for name, s in secrets.items():
        keys |= state.observe("owned-secrets", name, s)
    return keys


def test_a_cluster_is_pending_until_its_identity_is_stored_then_served() -> None:
    state = FleetState(S)
    secrets = _pki_secrets("east", "west")
    east_identity = secrets.pop("east-atlas-identity")
    _observe_secrets(state, secrets)
    for n, ip in (("east", "203.0.113.1"), ("west", "203.0.113.2")):
        state.observe("cluster-services", n, stored(cluster_service(n, ip)))
    v = state.derive(state.keys(), now=NOW).version
    assert v.members["east"].state == "pending" and v.members["west"].state == "served"
    assert set(v.model.clusters) == {"west"} and set(v.model.identities) == {"atlas", "west"}
    assert v.model.pki is not None
    update = state.derive(
        state.observe("owned-secrets", "east-atlas-identity", east_identity), now=NOW
    )
    assert update.changed == {"east"}
    assert set(update.version.model.clusters) == {"east", "west"}
    # Versions are immutable: the earlier one still says what it said.
    assert set(v.model.clusters) == {"west"}


def _enrolled(name: str, ip: str, value: str | None = "true") -> dict[str, Any]:
    anns = {labels.ENROLLMENT_ANNOTATION: value} if value is not None else None
    return stored(cluster_service(name, ip, annotations=anns))


def test_an_enrolled_cluster_is_served_without_an_identity() -> None:
    state = FleetState(S)
    secrets = _pki_secrets("west")
    _observe_secrets(state, secrets)
    state.observe("cluster-services", "east", _enrolled("east", "203.0.113.1"))
    state.observe("cluster-services", "west", stored(cluster_service("west", "203.0.113.2")))
    v = state.derive(state.keys(), now=NOW).version
    east = v.members["east"]
    assert east.state == "served" and east.cluster is not None and east.cluster.enrolled
    assert east.identity is None and east.certificates == ()
    assert set(v.model.clusters) == {"east", "west"}
    assert set(v.model.identities) == {"atlas", "west"}  # no key of east anywhere


def test_switching_to_enrollment_by_annotation_stops_serving_the_stored_identity() -> None:
    state = FleetState(S)
    _observe_secrets(state, _pki_secrets("east"))
    state.observe("cluster-services", "east", stored(cluster_service("east", "203.0.113.1")))
    v = state.derive(state.keys(), now=NOW).version
    assert "east" in v.model.identities and not v.members["east"].cluster.enrolled  # type: ignore[union-attr]
    # The identity Secret is still stored (the reconciler deletes it): not served.
    update = state.derive(
        state.observe("cluster-services", "east", _enrolled("east", "203.0.113.1")), now=NOW
    )
    v = update.version
    assert update.changed == {"east"}
    assert v.members["east"].state == "served" and v.members["east"].identity is None
    assert "east" in v.model.clusters and "east" not in v.model.identities
    # And back: "false" serves the stored identity again.
    update = state.derive(
        state.observe("cluster-services", "east", _enrolled("east", "203.0.113.1", "false")),
        now=NOW,
    )
    assert "east" in update.version.model.identities


def test_the_default_mode_spares_a_cluster_with_a_stored_identity() -> None:
    """With enrollment the default, an unannotated cluster enrolls unless its identity
    Secret exists (an installation upgraded with running downstream Envoys)."""
    settings = Settings(enrollment_default=True)
    state = FleetState(settings)
    _observe_secrets(state, _pki_secrets("east"))
    state.observe("cluster-services", "east", stored(cluster_service("east", "203.0.113.1")))
    state.observe("cluster-services", "new", _enrolled("new", "203.0.113.2", None))
    v = state.derive(state.keys(), now=NOW).version
    east, new = v.members["east"].cluster, v.members["new"].cluster
    assert east is not None and not east.enrolled and "east" in v.model.identities
    assert new is not None and new.enrolled and v.members["new"].state == "served"
    # A bad annotation: the cluster is invalid (protected), the problem names it.
    update = state.derive(
        state.observe("cluster-services", "east", _enrolled("east", "203.0.113.1", "yes")),
        now=NOW,
    )
    m = update.version.members["east"]
    assert m.state == "invalid"
    assert [p.field for p in m.problems] == [
        f'metadata.annotations["{labels.ENROLLMENT_ANNOTATION}"]'
    ]


def test_no_ca_means_no_pki_and_nothing_served() -> None:
    state = FleetState(S)
    secrets = _pki_secrets("east")
    del secrets[labels.CA_SECRET]
    _observe_secrets(state, secrets)
    state.observe("cluster-services", "east", stored(cluster_service("east", "203.0.113.1")))
    v = state.derive(state.keys(), now=NOW).version
    assert v.model.pki is None and dict(v.model.clusters) == {}
    assert v.members["east"].state == "pending"


def test_the_clusters_a_fleet_wide_change_shows_or_hides_are_changed_keys() -> None:
    """A cluster's identity can be stored (and verified against the CA) before atlas's
    own certificates are: the model shows no cluster until the PKI is whole. When the
    last fixed Secret then arrives, the trust bundle is unchanged, yet every served
    cluster appears in the model: its key is a changed key, or a reader that follows
    changed keys (the zone writer) never sees it (a soak run found this)."""
    state = FleetState(S)
    secrets = _pki_secrets("east")
    server = secrets.pop(labels.SERVER_SECRET)
    _observe_secrets(state, secrets)
    state.observe("cluster-services", "east", stored(cluster_service("east", "203.0.113.1")))
    v = state.derive(state.keys(), now=NOW).version
    assert v.model.pki is None and dict(v.model.clusters) == {}
    keys = state.observe("owned-secrets", labels.SERVER_SECRET, server)
    assert keys == {FLEET_KEY}
    update = state.derive(keys, now=NOW)
    assert set(update.version.model.clusters) == {"east"}
    assert update.changed == {FLEET_KEY, "east"}
    # ... and the same when the PKI goes again.
    gone = state.observe("owned-secrets", labels.SERVER_SECRET, None)
    update = state.derive(gone, now=NOW)
    assert dict(update.version.model.clusters) == {}
    assert update.changed == {FLEET_KEY, "east"}


def test_a_new_trust_bundle_rejudges_every_identity() -> None:
    state = FleetState(S)
    old = _pki_secrets("east")
    _observe_secrets(state, old)
    state.observe("cluster-services", "east", stored(cluster_service("east", "203.0.113.1")))
    assert state.derive(state.keys(), now=NOW).version.members["east"].state == "served"
    # A different CA (e.g. a fresh install's) without the old one in its bundle.
    other = _pki_secrets("west", start=1033)
    keys = state.observe("owned-secrets", labels.CA_SECRET, other[labels.CA_SECRET])
    assert keys == {FLEET_KEY}
    update = state.derive(keys, now=NOW)
    assert "east" in update.changed
    assert update.version.members["east"].state == "pending"
    assert update.version.members["east"].identity is None


def test_a_derivation_stopped_by_its_deadline_leaves_the_rest_in_order() -> None:
    """``enough``: the keys not derived yet come back as ``left``; deriving them next gives
    what one call would have (a CA rotation's re-judging of every identity included)."""
    names = [f"c{i}" for i in range(6)]
    secrets = _pki_secrets(*names)

    def fleet() -> FleetState:
        state = FleetState(S)
        _observe_secrets(state, secrets)
        for i, n in enumerate(names):
            state.observe("cluster-services", n, stored(cluster_service(n, f"203.0.113.{i + 1}")))
        return state

    whole, stepped = fleet(), fleet()
    want = whole.derive(whole.keys(), now=NOW).version
    asked = [0]

    def every_second() -> bool:  # asked before each key but the first: two keys a call
        asked[0] += 1
        return asked[0] % 2 == 0

    first = stepped.derive([FLEET_KEY, *names], now=NOW, enough=every_second)
    assert first.left == tuple(names[2:])
    assert {FLEET_KEY, "c0", "c1"} <= first.changed and not first.changed & set(first.left)
    left = first.left
    while left:
        left = stepped.derive(left, now=NOW, enough=every_second).left
    final = stepped.derive([], now=NOW).version
    assert {k: m.state for k, m in final.members.items()} == {
        k: m.state for k, m in want.members.items()
    }
    assert set(final.model.clusters) == set(want.model.clusters) == set(names)

    # A new trust bundle adds every member to the keys to judge: a deadline leaves them.
    other = _pki_secrets("x", start=1033)
    ca_keys = stepped.observe("owned-secrets", labels.CA_SECRET, other[labels.CA_SECRET])
    update = stepped.derive(ca_keys, now=NOW, enough=lambda: True)
    assert len(update.left) == len(names) - 1 and set(update.left) < set(names)
    while update.left:
        update = stepped.derive(update.left, now=NOW, enough=lambda: True)
    assert all(m.identity is None for m in update.version.members.values() if m.cluster)


def _alertmanager(name: str, port: int = 9093) -> dict[str, Any]:
    return stored(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {
                "name": name,
                "namespace": "monitoring",
                "labels": {"app": "kube-prometheus-stack-alertmanager"},
            },
            "spec": {"selector": {"app": name}, "ports": [{"name": "http", "port": port}]},
        }
    )


def test_a_new_alertmanager_count_changes_every_cluster_key() -> None:
    """Each cluster's values carry the number of local Alertmanagers
    (``atlas.alertmanagerCount``): when it changes, every cluster key is a changed key (the
    reconcile loop re-applies each one's values); an Alertmanager change that keeps the
    count changes the fleet-wide key only."""
    state = FleetState(S)
    _observe_secrets(state, _pki_secrets("east", "west"))
    for n, ip in (("east", "203.0.113.1"), ("west", "203.0.113.2")):
        state.observe("cluster-services", n, stored(cluster_service(n, ip)))
    bad = cluster_service("broken", "203.0.113.3")
    bad["metadata"]["labels"][labels.REPLICAS_LABEL] = "many"
    state.observe("cluster-services", "broken", stored(bad))
    before = state.derive(state.keys(), now=NOW).version
    assert before.members["broken"].state == "invalid"

    keys = state.observe("alertmanager-services", "am-a", _alertmanager("am-a"))
    assert keys == {FLEET_KEY}
    update = state.derive(keys, now=NOW)
    assert len(update.version.model.alertmanagers) == 1
    assert update.changed == {FLEET_KEY, "east", "west"}
    # Same members: nothing of a cluster was derived again.
    assert all(update.version.members[k] is before.members[k] for k in before.members)

    moved = state.observe("alertmanager-services", "am-a", _alertmanager("am-a", port=9094))
    assert state.derive(moved, now=NOW).changed == {FLEET_KEY}
    gone = state.observe("alertmanager-services", "am-a", None)
    assert state.derive(gone, now=NOW).changed == {FLEET_KEY, "east", "west"}


def test_a_label_that_is_not_exactly_true_is_reported_and_not_served() -> None:
    state = FleetState(S)
    svc = cluster_service("east", "203.0.113.1")
    svc["metadata"]["labels"][labels.CLUSTER_LABEL] = "True"
    state.observe("cluster-services", "east", stored(svc))
    m = state.derive(state.keys(), now=NOW).version.members["east"]
    assert m.state == "absent" and not m.is_cluster
    (p,) = m.problems
    assert p.reason == "InvalidClusterLabel" and p.field == 'metadata.labels["goatlas.io/cluster"]'


def test_a_service_without_the_cluster_label_is_no_cluster_and_no_problem() -> None:
    """The watch filters by the label, but a cache may still hand over a Service that
    lost it: it is absent (what atlasd made for it goes), never validated as a cluster."""
    state = FleetState(S)
    svc = cluster_service("east", "203.0.113.1")
    del svc["metadata"]["labels"][labels.CLUSTER_LABEL]
    state.observe("cluster-services", "east", stored(svc))
    m = state.derive(state.keys(), now=NOW).version.members["east"]
    assert m.state == "absent" and m.cluster is None and m.problems == ()


def test_validation_is_reused_while_the_service_is_unchanged() -> None:
    state = FleetState(S)
    svc = stored(cluster_service("east", "203.0.113.1"))
    state.observe("cluster-services", "east", svc)
    first = state.derive(state.keys(), now=NOW).version.members["east"]
    # An owned object of the key changes; the Service does not.
    state.observe(
        "owned-services",
        "east-thanos-sidecar0",
        stored(
            {
                "metadata": {
                    "name": "east-thanos-sidecar0",
                    "labels": {
                        labels.MANAGED_BY_LABEL: labels.MANAGED_BY_VALUE,
                        labels.OWNER_CLUSTER_LABEL: "east",
                    },
                }
            }
        ),
    )
    second = state.derive({"east"}, now=NOW).version.members["east"]
    assert second.cluster is first.cluster
    assert set(second.services) == {"east-thanos-sidecar0"}


def test_objects_move_between_keys_when_their_labels_do() -> None:
    state = FleetState(S)
    obj = stored(
        {
            "metadata": {
                "name": "x-envoy-values",
                "labels": {
                    labels.MANAGED_BY_LABEL: labels.MANAGED_BY_VALUE,
                    labels.OWNER_CLUSTER_LABEL: "a",
                },
            }
        }
    )
    assert state.observe("owned-secrets", "x-envoy-values", obj) == {"a"}
    moved = copy.deepcopy(obj)
    moved["metadata"]["labels"][labels.OWNER_CLUSTER_LABEL] = "b"
    assert state.observe("owned-secrets", "x-envoy-values", moved) == {"a", "b"}
    assert state.observe("owned-secrets", "x-envoy-values", None) == {"b"}
    assert state.keys() == {FLEET_KEY}


@pytest.mark.parametrize("seed", range(6))
def test_duplicate_ips_judged_incrementally_agree_with_validate_all(seed: int) -> None:
    """Random edits, derived key by key, always accept what ``validate_all`` (the whole
    fleet at once) accepts, with the same duplicate-IP problems."""
    rnd = random.Random(seed)
    state = FleetState(S)
    services: dict[str, dict[str, Any]] = {}
    for step in range(80):
        name = f"c{rnd.randint(0, 9)}"
        if name in services and rnd.random() < 0.3:
            del services[name]
            keys = state.observe("cluster-services", name, None)
        else:
            ip = f"203.0.113.{rnd.randint(1, 4)}" if rnd.random() < 0.9 else None
            svc = stored(
                cluster_service(name, ip), created=f"2026-01-01T00:00:{rnd.randint(0, 59):02d}Z"
            )
            services[name] = svc
            keys = state.observe("cluster-services", name, svc)
        v = state.derive(keys, now=NOW).version
        want_clusters, want_problems = validate_all(list(services.values()), S)
        accepted = {n for n, m in v.members.items() if m.state in ("served", "pending")}
        assert accepted == {c.name for c in want_clusters}, step
        got = sorted(str(p) for m in v.members.values() for p in m.problems)
        assert got == sorted(str(p) for p in want_problems), step


def test_fleet_of_plain_lists_files_objects_by_selector() -> None:
    secrets = list(_pki_secrets("east").values())
    services = [
        stored(cluster_service("east", "203.0.113.1")),
        stored({"metadata": {"name": "grafana", "labels": {"app": "grafana"}}, "spec": {}}),
    ]
    v = fleet_of(services=services, secrets=secrets, settings=S, now=NOW)
    assert set(v.members) == {"east"} and set(v.model.clusters) == {"east"}


async def test_the_feed_coalesces_for_a_slow_reader() -> None:
    state = FleetState(S)
    feed = FleetFeed()
    sub = feed.subscribe()
    for n in ("a", "b", "c"):
        feed.publish(
            state.derive(
                state.observe(
                    "cluster-services", n, stored(cluster_service(n, f"203.0.113.{len(n)}"))
                ),
                now=NOW,
            )
        )
    update = await sub.receive()
    assert update.changed == {"a", "b", "c"} and update.version is feed.latest
    with trio.move_on_after(0.01) as scope:
        await sub.receive()
    assert scope.cancelled_caught
    late = feed.subscribe()
    assert (await late.receive()).changed == {"a", "b", "c", FLEET_KEY}
