"""A full pass's LIST against the cache: what the cache must come to show before a key is
acted on again. Only atlasd's own objects are waited for, and never where the cache already
shows a write made after the LIST (a cluster created between the LISTs of a pass, or a
Secret a worker wrote meanwhile, held a key for the expectation's 30 s deadline), nor for
an object the leader wrote or deleted while the LIST was in flight (a cluster scaled down
during a pass: its removed sidecar Services, which the cache will never show again)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, cast

import pytest
import trio

from atlasd.fleet.feed import FleetFeed
from atlasd.fleet.keys import ObjectId
from atlasd.reconcile import loop as loop_mod
from atlasd.reconcile.expectations import Expectations
from atlasd.reconcile.loop import Listed, ReconcileLoop

SVC: ObjectId = ("Service", "east-envoy")
SECRET: ObjectId = ("Secret", "east-atlas-identity")


def listed(owned: dict[ObjectId, str], *, at: str = "100") -> Listed:
    return Listed(
        versions={"east": {("Service", "east"): "90", **owned}},
        owned={"east": owned},
        owned_at={"Service": at, "Secret": at},
    )


def test_a_cached_write_after_the_list_leads() -> None:
    lst = listed({})
    assert lst.cache_leads(SVC, "101")  # created (or changed) after the LIST
    assert not lst.cache_leads(SVC, "100")
    assert not lst.cache_leads(SVC, "99")  # the cache lags: wait for it
    assert not lst.cache_leads(SVC, None)


def test_versions_that_are_not_numbers_are_never_judged_newer() -> None:
    assert not listed({}, at="abc").cache_leads(SVC, "101")
    assert not listed({}).cache_leads(SVC, "x1")
    assert not Listed({}, {}, {}).cache_leads(SVC, "101")


def test_a_lagging_cache_waits_for_the_listed_versions_and_for_deletions() -> None:
    lst = listed({SECRET: "95"})
    # The cache shows an older Secret and a Service the LIST no longer has.
    assert lst.expected("east", {SECRET: "80", SVC: "70"}) == {SECRET: "95", SVC: None}
    # ... a missing Secret is waited for too.
    assert lst.expected("east", {}) == {SECRET: "95"}
    # In step: nothing to wait for.
    assert lst.expected("east", {SECRET: "95"}) == {}


def test_writes_after_the_list_are_not_waited_for() -> None:
    lst = listed({SECRET: "95"})
    # A worker rewrote the Secret and created the Service after the LIST.
    assert lst.expected("east", {SECRET: "120", SVC: "121"}) == {}


def test_what_users_write_is_never_waited_for() -> None:
    # The cluster Service is in the LIST's versions but not among atlasd's own objects: a
    # cache that shows it newer, older or not at all makes the key wait for nothing.
    lst = listed({})
    assert lst.expected("east", {}) == {}
    assert lst.expected("west", {}) == {}


def test_objects_written_while_the_list_was_in_flight_are_not_waited_for() -> None:
    lst = listed({SECRET: "95", SVC: "96"})
    # The leader deleted the Service while the LIST was in flight: the LIST still shows
    # it, the cache never will again.
    assert lst.expected("east", {SECRET: "80"}, written={SVC}) == {SECRET: "95"}
    # ... and created one the LIST did not show yet.
    other: ObjectId = ("Service", "east-thanos-sidecar1")
    assert lst.expected("east", {SECRET: "95", SVC: "96", other: "99"}, written={other}) == {}
    assert lst.expected("east", {SECRET: "95", SVC: "96", other: "99"}) == {other: None}


def test_expectations_remember_what_is_written_while_a_list_is_in_flight() -> None:
    exp = Expectations()
    exp.expect("east", {SECRET: "1"}, now=0)  # before the LIST: the LIST shows it
    exp.begin_list()
    exp.expect("east", {SVC: None}, now=0)
    exp.expect("west", {}, now=0)
    assert exp.end_list() == {SVC}
    exp.expect("east", {SECRET: "2"}, now=0)  # after: nothing is remembered
    assert exp.end_list() == frozenset()


def _passing_loop(
    monkeypatch: pytest.MonkeyPatch, during_list: Any, listed_objects: dict[ObjectId, str]
) -> tuple[ReconcileLoop, Expectations]:
    """A loop whose full pass LISTs ``listed_objects`` for east (``during_list()`` runs
    while the LIST is in flight) over a cache showing east's Secret alone."""
    expectations = Expectations()
    cached = SimpleNamespace(
        members={"east": object()},
        object_versions=lambda key, owned=False: {SECRET: "95"} if key == "east" else {},
    )
    feed = FleetFeed()
    feed.latest = cast(Any, cached)
    reconciler = SimpleNamespace(
        expectations=expectations, settings=None, is_synced=lambda key, owned: False
    )

    async def list_during(api: Any, settings: Any) -> Listed:
        during_list()
        await trio.lowlevel.checkpoint()
        return listed(listed_objects)

    monkeypatch.setattr(loop_mod, "listed_versions", list_during)
    loop = ReconcileLoop(
        api=cast(Any, None), feed=feed, reconciler=cast(Any, reconciler), resync_seconds=300
    )
    return loop, expectations


async def test_a_full_pass_does_not_wait_for_what_the_leader_deleted_during_its_list(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A worker deletes east's Service (scaled down) while the pass's LIST is in flight; the
    # LIST still shows it. The deletion's own expectation (gone) is what the key waits for.
    loop, expectations = _passing_loop(
        monkeypatch,
        lambda: expectations.expect("east", {SVC: None}, now=0),
        {SECRET: "95", SVC: "96"},
    )
    await loop._full_pass(initial=False)
    gone = {SECRET: "95"}
    assert expectations.pending("east", gone.get, now=1) is None


async def test_a_full_pass_waits_for_what_the_cache_has_not_shown_yet(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The same LIST with nothing written meanwhile: the cache lags it, the key waits.
    loop, expectations = _passing_loop(monkeypatch, lambda: None, {SECRET: "95", SVC: "96"})
    await loop._full_pass(initial=False)
    assert expectations.pending("east", {SECRET: "95"}.get, now=1) is not None
    assert expectations.pending("east", {SECRET: "95", SVC: "96"}.get, now=1) is None
