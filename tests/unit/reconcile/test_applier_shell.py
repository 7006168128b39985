"""The applier's shell against an in-memory client: fault handling and Event de-duplication."""

from __future__ import annotations

import datetime as dt

import pytest

from atlasd import labels
from atlasd.kube.errors import Conflict, Invalid
from atlasd.model import Settings
from atlasd.reconcile.applier import Reconciler, reconcile_once
from tests.unit.fakekube import FakeKube
from tests.unit.reconcile.builders import cluster_service
from tests.unit.reconcile.pkitools import CountingKeys

NOW = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
S = Settings()


async def _kube(*services: dict[str, object]) -> FakeKube:
    kube = FakeKube()
    for svc in services:
        await kube.create(svc)
    kube.writes.clear()
    return kube


def _rec(kube: FakeKube, **kw: object) -> Reconciler:
    return Reconciler(settings=S, keys=CountingKeys(), post_event=kube.post_event, **kw)  # type: ignore[arg-type]


async def test_first_then_steady_pass() -> None:
    kube = await _kube(
        cluster_service("east", "203.0.113.1"), cluster_service("west", "203.0.113.2")
    )
    rec = _rec(kube)
    first = await rec.reconcile_once(kube, now=NOW)
    assert (first.created, first.applied) == (1, 5 + 2 * 3)  # 4 TLS + atlas values
    assert kube.writes[0] == ("create", "atlas-ca"), "the CA is written before any leaf"
    kube.writes.clear()
    second = await rec.reconcile_once(kube, now=NOW)
    assert second.writes == 0 and kube.writes == []


async def test_one_rejected_object_becomes_a_problem_and_the_rest_is_written() -> None:
    kube = await _kube(
        cluster_service("east", "203.0.113.1"), cluster_service("west", "203.0.113.2")
    )
    kube.fail[("apply", "west-thanos-sidecar0")] = Invalid(
        status=422, reason="Invalid", message="", verb="apply", resource="services"
    )
    rec = _rec(kube)
    result = await rec.reconcile_once(kube, now=NOW)
    assert result.applied == 5 + 2 * 3 - 1
    (problem,) = result.problems
    assert (problem.source.name, problem.reason) == ("west", "ApplyFailed")
    assert problem.field == "Service west-thanos-sidecar0"
    assert [(ref.name, reason) for ref, reason, _ in kube.events] == [("west", "ApplyFailed")]
    assert ("apply", "east-thanos-sidecar0") in kube.writes


async def test_ca_conflict_propagates_and_nothing_else_is_written() -> None:
    kube = await _kube(cluster_service("east", "203.0.113.1"))
    rec = _rec(kube)
    await rec.reconcile_once(kube, now=NOW)
    ca = kube.objects[("secrets", labels.CA_SECRET)]
    ca["metadata"]["annotations"] = {labels.CA_ROTATE_ANNOTATION: "x"}
    kube.fail[("replace", labels.CA_SECRET)] = Conflict(
        status=409, reason="Conflict", message="", verb="update", resource="secrets"
    )
    kube.writes.clear()
    with pytest.raises(Conflict):
        await rec.reconcile_once(kube, now=NOW)
    assert kube.writes == [], "no leaf of an unstored CA may be written"


async def test_events_are_posted_once_per_distinct_problem() -> None:
    kube = await _kube(cluster_service("east", "203.0.113.1"), cluster_service("bad", None))
    rec = _rec(kube)
    assert (await rec.reconcile_once(kube, now=NOW)).events == 1
    assert (await rec.reconcile_once(kube, now=NOW)).events == 0
    # The problem goes away, then comes back: reported again.
    bad = kube.objects[("services", "bad")]
    bad["spec"]["externalIPs"] = ["203.0.113.9"]
    assert (await rec.reconcile_once(kube, now=NOW)).events == 0
    del bad["spec"]["externalIPs"]
    assert (await rec.reconcile_once(kube, now=NOW)).events == 1
    assert len(kube.events) == 2
    # A fresh Reconciler (no memory) without an Event poster only logs.
    result = await reconcile_once(kube, settings=S, now=NOW)
    assert result.events == 1 and len(kube.events) == 2


async def test_loopback_clusters_only_in_standalone_mode() -> None:
    kube = await _kube(cluster_service("east", "127.0.0.2"))
    assert (await _rec(kube).reconcile_once(kube, now=NOW)).problems
    result = await _rec(kube, allow_loopback=True).reconcile_once(kube, now=NOW)
    assert result.problems == ()
    assert ("secrets", "east-envoy-values") in kube.objects
