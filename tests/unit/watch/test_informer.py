"""The informer's reflector loop against a scripted fake API (mock clock)."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import trio
import trio.testing

from atlasd.kube.errors import Gone, ServerError, TooManyRequests, TransportError
from atlasd.kube.resources import SERVICES
from atlasd.watch.backoff import Backoff
from atlasd.watch.informer import (
    Change,
    Informer,
    all_synced,
    run_informers,
)
from atlasd.watch.workqueue import WorkQueue
from tests.unit.fakekube import HANG, FakeKube


def obj(name: str, rv: str, **extra: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": "m", "resourceVersion": rv},
        **extra,
    }


def ev(kind: str, name: str, rv: str) -> dict[str, Any]:
    return {"type": kind, "object": obj(name, rv)}


def bookmark(rv: str) -> dict[str, Any]:
    return {"type": "BOOKMARK", "object": {"kind": "Service", "metadata": {"resourceVersion": rv}}}


def informer(kube: FakeKube, **kw: Any) -> Informer:
    kw.setdefault("backoff", Backoff(jitter=0.0))
    return Informer(kube, SERVICES, namespace="m", watch_timeout=(300, 600), **kw)  # type: ignore[arg-type]


def watch_gaps(kube: FakeKube) -> list[float]:
    """Seconds (mock time) between one watch request and the next."""
    times = [c[2] for c in kube.watch_calls]
    return [round(b - a, 3) for a, b in itertools.pairwise(times)]


async def run_until(inf: Informer, predicate: Any, *, limit: float = 3600) -> None:
    """Run the informer (mock time) until ``predicate()`` holds, then stop it."""
    async with trio.open_nursery() as nursery:
        await nursery.start(inf.run)
        with trio.fail_after(limit):
            while not predicate():  # noqa: ASYNC110 - polls state the fake API mutates
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()


async def test_list_then_watch_from_list_rv(autojump_clock: trio.testing.MockClock) -> None:
    kube = FakeKube(
        lists=[([obj("a", "1"), obj("b", "2")], "10")],
        watches=[
            [
                ev("ADDED", "c", "11"),
                ev("MODIFIED", "a", "12"),
                ev("DELETED", "b", "13"),
                bookmark("20"),
                HANG,
            ]
        ],
    )
    inf = informer(kube)
    changes: list[tuple[str, str]] = []
    inf.subscribe(lambda ch: changes.append((ch.type, ch.key)))
    await run_until(inf, lambda: inf.resource_version == "20")
    assert kube.watch_calls[0][0] == "10"
    assert 300 <= kube.watch_calls[0][1] <= 600
    assert {k: v["metadata"]["resourceVersion"] for k, v in inf.items().items()} == {
        "a": "12",
        "c": "11",
    }
    assert changes == [
        ("ADDED", "a"),
        ("ADDED", "b"),
        ("ADDED", "c"),
        ("MODIFIED", "a"),
        ("DELETED", "b"),
    ]
    assert inf.has_synced and kube.list_calls == 1


@pytest.mark.parametrize("gone_at_start", [True, False])
async def test_gone_relists_and_missing_objects_become_deletions(
    autojump_clock: trio.testing.MockClock, gone_at_start: bool
) -> None:
    gone = Gone(status=410, reason="Expired", message="too old", verb="watch", resource="services")
    first_watch = [gone] if gone_at_start else [ev("ADDED", "c", "11"), gone]
    kube = FakeKube(
        lists=[
            ([obj("a", "1"), obj("b", "2")], "10"),
            ([obj("b", "2"), obj("c", "30"), obj("d", "31")], "40"),
        ],
        watches=[first_watch, [HANG]],
    )
    inf = informer(kube)
    changes: list[Change] = []
    inf.subscribe(changes.append)
    await run_until(inf, lambda: kube.list_calls == 2 and len(kube.watch_calls) == 2)
    assert sorted(inf.items()) == ["b", "c", "d"]
    assert kube.watch_calls[1][0] == "40"
    after_relist = [(c.type, c.key) for c in changes[2 + (0 if gone_at_start else 1) :]]
    expected_c = "ADDED" if gone_at_start else "MODIFIED"
    assert after_relist == [("DELETED", "a"), (expected_c, "c"), ("ADDED", "d")]
    deleted = next(c for c in changes if c.type == "DELETED")
    assert deleted.obj["metadata"]["name"] == "a"  # the last known state


async def test_clean_end_rewatches_from_last_rv_without_relist(
    autojump_clock: trio.testing.MockClock,
) -> None:
    kube = FakeKube(
        lists=[([], "10")],
        watches=[[ev("ADDED", "a", "11"), bookmark("15")], [ev("ADDED", "b", "16")], [HANG]],
    )
    inf = informer(kube)
    await run_until(inf, lambda: len(kube.watch_calls) == 3)
    assert [c[0] for c in kube.watch_calls] == ["10", "15", "16"]
    assert kube.list_calls == 1 and sorted(inf.items()) == ["a", "b"]


async def test_errors_back_off_and_resume_from_last_rv(
    autojump_clock: trio.testing.MockClock,
) -> None:
    refused = TransportError("watch services: ConnectError: connection refused")
    boom = ServerError(
        status=500, reason="InternalError", message="", verb="watch", resource="services"
    )
    kube = FakeKube(
        lists=[([], "10")], watches=[[ev("ADDED", "a", "11"), refused], [refused], [boom], [HANG]]
    )
    inf = informer(kube)
    await run_until(inf, lambda: len(kube.watch_calls) == 4)
    gaps = watch_gaps(kube)
    assert gaps == [0.8, 1.6, 3.2]
    assert [c[0] for c in kube.watch_calls] == ["10", "11", "11", "11"]
    assert kube.list_calls == 1 and inf.errors == 3


REFUSED = TransportError("watch services: ConnectError: connection refused")


@pytest.mark.parametrize(
    ("last_watch", "expected"),
    [
        # It worked, then failed (the API server going away).
        ([[ev("ADDED", "a", "11"), REFUSED]], [0.8, 1.6, 3.2, 0.8]),
        # It worked and ended cleanly; the next one is refused.
        ([[ev("ADDED", "a", "11")], [REFUSED]], [0.8, 1.6, 3.2, 0.0, 0.8]),
    ],
    ids=["failed", "ended-cleanly"],
)
async def test_a_watch_that_worked_ends_the_outage_the_next_failure_backs_off_from_the_start(
    autojump_clock: trio.testing.MockClock, last_watch: list[list[Any]], expected: list[float]
) -> None:
    """API server restarts a minute apart: after each, once a watch works again (however
    it ends), the next restart's first retry comes after the first delay, not after the
    last outage's (without the reset: 6.4 s, growing to 30-60 s)."""
    kube = FakeKube(
        lists=[([], "10")], watches=[[REFUSED], [REFUSED], [REFUSED], *last_watch, [HANG]]
    )
    inf = informer(kube)
    await run_until(inf, lambda: len(kube.watch_calls) == len(expected) + 1)
    assert watch_gaps(kube) == expected


async def test_gone_from_a_watched_resource_version_relists_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """After an outage with etcd compacted, the watch resumed from the last event's
    resourceVersion is Gone at once: that is not a fresh list's Gone (no spin), so the
    relist follows without a backoff."""
    refused = TransportError("watch services: ConnectError: connection refused")
    gone = Gone(status=410, reason="Expired", message="", verb="watch", resource="services")
    kube = FakeKube(
        lists=[([], "10"), ([obj("a", "11")], "30")],
        watches=[[ev("ADDED", "a", "11"), refused], [refused], [gone], [HANG]],
    )
    inf = informer(kube)
    await run_until(inf, lambda: len(kube.watch_calls) == 4)
    gaps = watch_gaps(kube)
    assert gaps == [0.8, 1.6, 0.0]  # the old rule slept 3.2 s before relisting
    assert [c[0] for c in kube.watch_calls] == ["10", "11", "11", "30"]
    assert kube.list_calls == 2


async def test_too_many_requests_waits_for_retry_after(
    autojump_clock: trio.testing.MockClock,
) -> None:
    busy = TooManyRequests(
        status=429,
        reason="TooManyRequests",
        message="",
        verb="watch",
        resource="services",
        retry_after=7.0,
    )
    kube = FakeKube(lists=[([], "10")], watches=[[busy], [HANG]])
    inf = informer(kube)
    await run_until(inf, lambda: len(kube.watch_calls) == 2)
    assert kube.watch_calls[1][2] - kube.watch_calls[0][2] == pytest.approx(7.0)


async def test_quick_empty_watch_counts_as_failure(autojump_clock: trio.testing.MockClock) -> None:
    kube = FakeKube(lists=[([], "10")], watches=[[], [], [HANG]])
    inf = informer(kube)
    await run_until(inf, lambda: len(kube.watch_calls) == 3)
    times = [c[2] for c in kube.watch_calls]
    assert times[1] - times[0] == pytest.approx(0.8) and times[2] - times[1] == pytest.approx(1.6)


async def test_inactivity_deadline_restarts_a_silent_watch(
    autojump_clock: trio.testing.MockClock,
) -> None:
    kube = FakeKube(lists=[([], "10")], watches=[[ev("ADDED", "a", "11"), HANG], [HANG]])
    inf = informer(kube, inactivity_grace=30.0)
    await run_until(inf, lambda: len(kube.watch_calls) == 2)
    first_timeout = kube.watch_calls[0][1]
    gap = kube.watch_calls[1][2] - kube.watch_calls[0][2]
    assert gap == pytest.approx(first_timeout + 30.0 + 0.8)
    assert kube.watch_calls[1][0] == "11"


async def test_list_failure_backs_off_and_readiness_waits(
    autojump_clock: trio.testing.MockClock,
) -> None:
    refused = TransportError("list services: ConnectError")
    kube = FakeKube(lists=[refused, refused, ([obj("a", "1")], "5")], watches=[])
    inf = informer(kube)
    other = informer(FakeKube(lists=[([], "1")], watches=[]))
    assert not all_synced([inf, other])
    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        await nursery.start(run_informers, [inf, other])
        assert trio.current_time() - start == pytest.approx(0.8 + 1.6)
        assert all_synced([inf, other]) and list(inf.items()) == ["a"]
        nursery.cancel_scope.cancel()


async def test_change_feed_into_a_work_queue(autojump_clock: trio.testing.MockClock) -> None:
    events = [ev("MODIFIED", "a", str(i)) for i in range(11, 1011)]
    kube = FakeKube(lists=[([obj("a", "1")], "10")], watches=[[*events, HANG]])
    inf = informer(kube)
    queue: WorkQueue[str] = WorkQueue()
    unsubscribe = inf.subscribe(lambda change: queue.add(change.key))
    await run_until(inf, lambda: inf.resource_version == "1010")
    assert queue.drain_ready() == ["a"]  # 1001 changes, one work item
    unsubscribe()


async def test_immediate_gone_after_a_list_backs_off_instead_of_spinning(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gone = Gone(status=410, reason="Expired", message="", verb="watch", resource="services")
    kube = FakeKube(lists=[([], "10"), ([], "11"), ([], "12")], watches=[[gone], [gone], [HANG]])
    inf = informer(kube)
    await run_until(inf, lambda: len(kube.watch_calls) == 3)
    times = [c[2] for c in kube.watch_calls]
    assert times[1] - times[0] == pytest.approx(0.8, abs=0.05)
    assert times[2] - times[1] == pytest.approx(1.6, abs=0.05)
    assert kube.list_calls == 3


async def test_transform_applies_to_listed_and_watched_objects(
    autojump_clock: trio.testing.MockClock,
) -> None:
    def with_mf(o: dict[str, Any]) -> dict[str, Any]:
        o["metadata"]["managedFields"] = [{"manager": "x"}]
        return o

    kube = FakeKube(
        lists=[([with_mf(obj("a", "1"))], "10")],
        watches=[[{"type": "ADDED", "object": with_mf(obj("b", "11"))}, HANG]],
    )

    def strip(o: dict[str, Any]) -> dict[str, Any]:
        o["metadata"].pop("managedFields")
        return o

    inf = informer(kube, transform=strip)
    await run_until(inf, lambda: inf.resource_version == "11")
    assert all("managedFields" not in o["metadata"] for o in inf.items().values())
    assert sorted(inf.items()) == ["a", "b"]


async def test_a_relist_lets_other_tasks_run_while_it_transforms(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Compacting a large list (5,000 Secrets: ~0.35 s) is done a chunk at a time; the cache
    is swapped at once, whole."""
    kube = FakeKube(lists=[([obj(f"s{i:04d}", "1") for i in range(1000)], "10")], watches=[[HANG]])
    order: list[str] = []

    def transform(o: dict[str, Any]) -> dict[str, Any]:
        order.append("transform")
        return o

    inf = informer(kube, transform=transform)

    async def other_task() -> None:
        while not inf.has_synced:
            await trio.lowlevel.checkpoint()
            order.append("other")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(other_task)
        await run_until(inf, lambda: inf.has_synced)
    first, last = order.index("transform"), len(order) - 1 - order[::-1].index("transform")
    assert order.count("transform") == 1000
    assert "other" in order[first:last]
    assert len(inf.items()) == 1000


def end_bookmark(rv: str) -> dict[str, Any]:
    return {
        "type": "BOOKMARK",
        "object": {
            "kind": "Service",
            "metadata": {
                "resourceVersion": rv,
                "annotations": {"k8s.io/initial-events-end": "true"},
            },
        },
    }


async def test_streaming_list_fills_then_continues_as_the_watch(
    autojump_clock: trio.testing.MockClock,
) -> None:
    kube = FakeKube(
        lists=[],
        watches=[
            [
                ev("ADDED", "a", "1"),
                ev("ADDED", "b", "2"),
                bookmark("5"),
                end_bookmark("10"),
                ev("MODIFIED", "a", "11"),
                HANG,
            ]
        ],
    )
    inf = informer(kube, streaming_list=True)
    changes: list[tuple[str, str]] = []
    inf.subscribe(lambda ch: changes.append((ch.type, ch.key)))
    async with trio.open_nursery() as nursery:
        await nursery.start(inf.run)
        assert sorted(inf.items()) == ["a", "b"] and inf.has_synced
        with trio.fail_after(60):
            while inf.resource_version != "11":  # noqa: ASYNC110
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert kube.watch_calls[0][0] == "" and kube.list_calls == 0
    assert changes == [("ADDED", "a"), ("ADDED", "b"), ("MODIFIED", "a")]


async def test_streaming_list_refused_falls_back_to_list(
    autojump_clock: trio.testing.MockClock,
) -> None:
    from atlasd.kube.errors import Invalid

    refused = Invalid(
        status=422,
        reason="Invalid",
        message="sendInitialEvents is forbidden",
        verb="watch",
        resource="services",
    )
    kube = FakeKube(lists=[([obj("a", "1")], "10")], watches=[[refused], [HANG]])
    inf = informer(kube, streaming_list=True)
    await run_until(inf, lambda: len(kube.watch_calls) == 2)
    assert not inf.streaming_list and kube.list_calls == 1
    assert [c[0] for c in kube.watch_calls] == ["", "10"]


async def test_streaming_list_gone_after_fill_refills_and_failure_before_backs_off(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gone = Gone(status=410, reason="Expired", message="", verb="watch", resource="services")
    refused = TransportError("connection refused")
    kube = FakeKube(
        lists=[],
        watches=[
            [ev("ADDED", "a", "1"), end_bookmark("10"), gone],
            [refused],
            [ev("ADDED", "b", "20"), end_bookmark("21"), HANG],
        ],
    )
    inf = informer(kube, streaming_list=True)
    deleted: list[str] = []
    inf.subscribe(lambda ch: deleted.append(ch.key) if ch.type == "DELETED" else None)
    await run_until(inf, lambda: inf.resource_version == "21")
    times = [c[2] for c in kube.watch_calls]
    assert [c[0] for c in kube.watch_calls] == ["", "", ""]
    assert times[1] - times[0] == pytest.approx(0.0, abs=0.05)  # Gone after fill: at once
    assert times[2] - times[1] == pytest.approx(0.8, abs=0.05)  # failure: backoff
    assert sorted(inf.items()) == ["b"] and deleted == ["a"]
