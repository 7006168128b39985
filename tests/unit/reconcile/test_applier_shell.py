"""The applier's shell, run by the daemon's reconcile loop against an in-memory API:
fault handling and Event de-duplication."""

from __future__ import annotations

import copy
import datetime as dt
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from atlasd import labels
from atlasd.kube.errors import Conflict, Invalid
from atlasd.model import Settings
from tests.harness.reconcile import LeaderRun, leader
from tests.harness.wait import wait_until_async
from tests.unit.fakekube import FakeKube, live_with
from tests.unit.reconcile.builders import cluster_service
from tests.unit.reconcile.pkitools import CountingKeys

NOW = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
S = Settings()


@asynccontextmanager
async def _leader(kube: FakeKube, **kw: Any) -> AsyncIterator[LeaderRun]:
    async with leader(
        kube, S, now=NOW, keys=CountingKeys(), post_event=kube.post_event, **kw
    ) as run:
        yield run


def _changed(kube: FakeKube, plural: str, name: str) -> dict[str, Any]:
    """A copy of a stored object, to change and ``put`` back (someone else's write)."""
    stored = kube.get_stored(plural, name)
    assert stored is not None
    return copy.deepcopy(stored)


async def test_first_then_steady_pass() -> None:
    kube = await live_with(
        cluster_service("east", "203.0.113.1"), cluster_service("west", "203.0.113.2")
    )
    async with _leader(kube) as run:
        first = await run.settle()
        assert (first.created, first.applied) == (1, 5 + 2 * 3)  # 4 TLS + atlas values
        assert kube.writes[0] == ("create", "atlas-ca"), "the CA is written before any leaf"
        kube.writes.clear()
        second = await run.settle()
        assert second.writes == 0 and kube.writes == []


async def test_one_rejected_object_becomes_a_problem_and_the_rest_is_written() -> None:
    kube = await live_with(
        cluster_service("east", "203.0.113.1"), cluster_service("west", "203.0.113.2")
    )
    kube.fail[("apply", "west-thanos-sidecar0")] = Invalid(
        status=422, reason="Invalid", message="", verb="apply", resource="services"
    )
    async with _leader(kube) as run:
        result = await run.settle()
    assert result.applied == 5 + 2 * 3 - 1
    (problem,) = result.problems
    assert (problem.source.name, problem.reason) == ("west", "ApplyFailed")
    assert problem.field == "Service west-thanos-sidecar0"
    assert [(ref.name, reason) for ref, reason, _ in kube.events] == [("west", "ApplyFailed")]
    assert ("apply", "east-thanos-sidecar0") in kube.writes


async def test_a_ca_conflict_writes_no_leaf_and_is_retried() -> None:
    kube = await live_with(cluster_service("east", "203.0.113.1"))
    async with _leader(kube) as run:
        await run.settle()
        kube.fail[("replace", labels.CA_SECRET)] = Conflict(
            status=409, reason="Conflict", message="", verb="update", resource="secrets"
        )
        kube.writes.clear()
        ca = _changed(kube, "secrets", labels.CA_SECRET)
        ca["metadata"]["annotations"] = {labels.CA_ROTATE_ANNOTATION: "x"}
        kube.put(ca)  # an operator asks for a rotation

        def replaces() -> int:
            return sum(1 for c in kube.calls if c[0] == "replace" and c[3] == labels.CA_SECRET)

        await wait_until_async(lambda: replaces() >= 2, timeout=30, what="the replace retried")
        assert kube.writes == [], "no leaf of an unstored CA may be written"
        del kube.fail[("replace", labels.CA_SECRET)]
        rotated = await run.settle()
    assert rotated.ca_action == "rotated" and rotated.replaced == 1
    assert kube.writes[0] == ("replace", labels.CA_SECRET), "the CA is stored before any leaf"


async def test_events_are_posted_once_per_distinct_problem() -> None:
    kube = await live_with(cluster_service("east", "203.0.113.1"), cluster_service("bad", None))
    async with _leader(kube) as run:
        assert (await run.settle()).events == 1
        assert (await run.settle()).events == 0
        # The problem goes away, then comes back: reported again.
        bad = _changed(kube, "services", "bad")
        bad["spec"]["externalIPs"] = ["203.0.113.9"]
        kube.put(bad)
        assert (await run.settle()).events == 0
        del bad["spec"]["externalIPs"]
        kube.put(bad)
        assert (await run.settle()).events == 1
    assert len(kube.events) == 2
    # A restart (no memory) without an Event poster only logs.
    async with leader(kube, S, now=NOW) as run:
        result = await run.settle()
    assert result.events == 1 and len(kube.events) == 2


async def test_an_event_that_could_not_be_posted_is_posted_later() -> None:
    # The API server unreachable when the Warning is posted: the problem is not taken as
    # reported, and the key is tried again (with backoff) until it is, with no other change.
    kube = await live_with(cluster_service("east", "203.0.113.1"), cluster_service("bad", None))
    kube.events_down = True
    async with _leader(kube) as run:
        await wait_until_async(
            lambda: kube.events_failed >= 2, timeout=30, what="the key tried again"
        )
        assert kube.events == []
        kube.events_down = False
        await wait_until_async(lambda: kube.events, timeout=30, what="the Event posted again")
        assert [ref.name for ref, _, _ in kube.events] == ["bad"]
        await run.settle()
        assert (await run.settle()).events == 0
    assert len(kube.events) == 1, "posted once"


async def test_loopback_clusters_only_in_standalone_mode() -> None:
    kube = await live_with(cluster_service("east", "127.0.0.2"))
    async with _leader(kube) as run:
        assert (await run.settle()).problems
    assert ("secrets", "east-envoy-values") not in kube.objects
    async with _leader(kube, allow_loopback=True) as run:
        result = await run.settle()
    assert result.problems == ()
    assert ("secrets", "east-envoy-values") in kube.objects
