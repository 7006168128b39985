"""A full pass's LIST against the cache: what the cache must come to show before a key is
acted on again. Only atlasd's own objects are waited for, and never where the cache already
shows a write made after the LIST (a cluster created between the LISTs of a pass, or a
Secret a worker wrote meanwhile, held a key for the expectation's 30 s deadline)."""

from __future__ import annotations

from atlasd.fleet.keys import ObjectId
from atlasd.reconcile.loop import Listed

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
