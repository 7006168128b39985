"""Leader election against an in-memory Lease store (mock clock)."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import trio
import trio.testing

from atlasd.kube.lease import (
    LeaderElector,
    LeaseTimings,
    micro_time,
    record_from_lease,
    run_leader_election,
)
from atlasd.kube.resources import LEASES
from tests.unit.fakekube import FakeKube

FAST = LeaseTimings(lease_duration=15.0, renew_deadline=10.0, retry_period=2.0)


def lease(store: FakeKube, name: str | None = None) -> dict[str, Any] | None:
    """The stored Lease named ``name`` (default: the only one)."""
    return store.only("leases") if name is None else store.get_stored("leases", name)


def holder(store: FakeKube, name: str | None = None) -> str:
    return record_from_lease(lease(store, name) or {}).holder


def lease_writes(store: FakeKube) -> list[tuple[float, str]]:
    """(trio time, holder) of each Lease write."""
    return [(t, o["spec"]["holderIdentity"]) for t, _, o in store.log if o["kind"] == "Lease"]


class Candidate:
    def __init__(self, store: FakeKube, identity: str, *, release: bool = True) -> None:
        self.store = store
        self.identity = identity
        self.release = release
        self.leading_since: float | None = None
        self.stopped_at: float | None = None
        self.scope = trio.CancelScope()
        self.log: list[str]

    async def work(self) -> None:
        self.leading_since = trio.current_time()
        try:
            await trio.sleep_forever()
        finally:
            self.stopped_at = trio.current_time()

    async def run(self, leading: list[str]) -> None:
        async def guarded() -> None:
            assert not leading, f"{self.identity} leads while {leading} does"
            leading.append(self.identity)
            try:
                await self.work()
            finally:
                leading.remove(self.identity)

        with self.scope:
            await run_leader_election(
                self.store,  # type: ignore[arg-type]
                name="atlasd",
                namespace="m",
                identity=self.identity,
                on_leading=guarded,
                timings=FAST,
                release_on_exit=self.release,
            )


async def _until(predicate: Any, limit: float = 300) -> float:
    with trio.fail_after(limit):
        while not predicate():  # noqa: ASYNC110 - polls the fake store under mock time
            await trio.sleep(0.01)
    return trio.current_time()


def test_timings_are_validated() -> None:
    LeaseTimings()
    with pytest.raises(ValueError, match="renew_deadline"):
        LeaseTimings(lease_duration=10, renew_deadline=10, retry_period=2)
    with pytest.raises(ValueError, match=r"1.2"):
        LeaseTimings(lease_duration=15, renew_deadline=2, retry_period=2)


def test_micro_time() -> None:
    import datetime as dt

    assert micro_time(dt.datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=dt.UTC)) == (
        "2026-01-02T03:04:05.000006Z"
    )


async def test_exactly_one_leads_and_a_crash_hands_over_within_the_lease(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = FakeKube()
    leading: list[str] = []
    a, b = Candidate(store, "a", release=False), Candidate(store, "b", release=False)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(a.run, leading)
        await _until(lambda: a.leading_since is not None)
        nursery.start_soon(b.run, leading)
        await trio.sleep(60)  # a keeps renewing; b never leads
        assert leading == ["a"] and b.leading_since is None
        assert {h for _, h in lease_writes(store)} == {"a"}  # the loser never wrote
        killed_at = trio.current_time()
        a.scope.cancel()  # a crash: no release
        last_renewal = lease_writes(store)[-1][0]
        took_over = await _until(lambda: b.leading_since is not None)
        # Expiry counts from when b *saw* a's last renewal (b polls every ~retry period)
        # and b notices it at its next poll: lease + 2 polls after a's last renewal.
        assert took_over - last_renewal <= FAST.lease_duration + 2 * FAST.retry_period * 1.2
        assert took_over - killed_at >= FAST.lease_duration - FAST.retry_period
        assert holder(store) == "b"
        assert record_from_lease(lease(store) or {}).transitions == 1
        nursery.cancel_scope.cancel()


async def test_clean_shutdown_releases_after_work_stopped(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = FakeKube()
    leading: list[str] = []
    a, b = Candidate(store, "a"), Candidate(store, "b")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(a.run, leading)
        await _until(lambda: a.leading_since is not None)
        nursery.start_soon(b.run, leading)
        await trio.sleep(10)
        a.scope.cancel()
        await _until(lambda: holder(store) != "a")
        assert a.stopped_at is not None
        release_time, last_holder = lease_writes(store)[-1]
        assert last_holder == "" and release_time >= a.stopped_at
        released = trio.current_time()
        took_over = await _until(lambda: b.leading_since is not None)
        assert took_over - released <= FAST.retry_period * 1.2 + 0.1  # no expiry wait
        nursery.cancel_scope.cancel()


async def test_renewal_failure_cancels_work_before_the_lease_expires(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = FakeKube()
    leading: list[str] = []
    a = Candidate(store, "a")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(a.run, leading)
        await _until(lambda: a.leading_since is not None)
        await trio.sleep(7)
        last_renewal = lease_writes(store)[-1][0]
        store.down = True
        stopped = await _until(lambda: a.stopped_at is not None)
        # Cancelled once the renew deadline passed, and before anyone could take over.
        assert stopped - last_renewal <= FAST.retry_period + FAST.renew_deadline + 0.1
        assert stopped < last_renewal + FAST.lease_duration
        assert leading == []
        nursery.cancel_scope.cancel()


async def test_another_holder_cancels_work_at_the_next_renewal(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = FakeKube()
    a = Candidate(store, "a")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(a.run, [])
        await _until(lambda: a.leading_since is not None)
        assert lease(store) is not None
        stolen = copy.deepcopy(lease(store))
        stolen["spec"]["holderIdentity"] = "intruder"
        store.put(stolen)
        t0 = trio.current_time()
        stopped = await _until(lambda: a.stopped_at is not None)
        assert stopped - t0 <= FAST.retry_period + 0.1
        nursery.cancel_scope.cancel()


async def test_expiry_is_judged_by_local_observation_not_renew_time(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = FakeKube()
    # Held by a peer whose clock is far behind: renewTime looks ancient, but we have
    # only just seen the record, so it is not expired for another lease duration.
    store.put(
        {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": "atlasd", "namespace": "m"},
            "spec": {
                "holderIdentity": "peer",
                "leaseDurationSeconds": 15,
                "renewTime": "1999-01-01T00:00:00.000000Z",
                "leaseTransitions": 4,
            },
        }
    )
    elector = LeaderElector(store, name="atlasd", namespace="m", identity="me", timings=FAST)  # type: ignore[arg-type]
    t0 = trio.current_time()
    assert not await elector.try_acquire_or_renew()
    await elector.acquire()
    assert trio.current_time() - t0 >= 15.0
    record = record_from_lease(lease(store) or {})
    assert record.holder == "me" and record.transitions == 5
    first_acquire = record.acquire_time
    assert await elector.try_acquire_or_renew()  # a renewal keeps acquireTime
    again = record_from_lease(lease(store) or {})
    assert again.acquire_time == first_acquire and again.transitions == 5


async def test_a_renewing_peer_is_never_taken_over(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = FakeKube()
    peer = LeaderElector(store, name="atlasd", namespace="m", identity="peer", timings=FAST)  # type: ignore[arg-type]
    me = LeaderElector(store, name="atlasd", namespace="m", identity="me", timings=FAST)  # type: ignore[arg-type]
    assert await peer.try_acquire_or_renew()
    for _ in range(30):
        await trio.sleep(2)
        assert await peer.try_acquire_or_renew()
        assert not await me.try_acquire_or_renew()
    assert holder(store) == "peer"


async def test_losing_a_race_is_a_conflict_not_an_error(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = FakeKube()
    a = LeaderElector(store, name="l", namespace="m", identity="a", timings=FAST)  # type: ignore[arg-type]
    b = LeaderElector(store, name="l", namespace="m", identity="b", timings=FAST)  # type: ignore[arg-type]
    assert await a.try_acquire_or_renew()
    assert await a.release()
    # b saw the released record; a re-acquires in between; b's PUT carries a stale RV.
    lease = await store.get(LEASES, "l", namespace="m")
    b._observe(record_from_lease(lease), lease["metadata"]["resourceVersion"])
    assert await a.try_acquire_or_renew()
    original_get = store.get

    async def stale_get(*args: Any, **kw: Any) -> dict[str, Any]:
        return lease

    store.get = stale_get  # type: ignore[method-assign]
    assert not await b.try_acquire_or_renew()
    store.get = original_get  # type: ignore[method-assign]
    assert holder(store) == "a"


async def test_on_leading_returning_ends_election_and_releases(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = FakeKube()
    ran = []

    async def once() -> None:
        ran.append(trio.current_time())

    await run_leader_election(
        store,
        name="l",
        namespace="m",
        identity="a",
        on_leading=once,
        timings=FAST,  # type: ignore[arg-type]
    )
    assert len(ran) == 1 and holder(store) == ""
