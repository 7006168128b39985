"""The keyed work queue: coalescing, one worker per key, re-processing after done."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from atlasd import logs
from atlasd.watch.workqueue import ShutDown, WorkQueue


async def test_duplicates_coalesce_in_fifo_order() -> None:
    q: WorkQueue[str] = WorkQueue()
    for key in ["a", "b", "a", "c", "b", "a"]:
        q.add(key)
    assert len(q) == 3
    assert [await q.get() for _ in range(3)] == ["a", "b", "c"]


async def test_get_is_a_checkpoint_even_with_a_key_ready() -> None:
    """Workers whose keys need no I/O (in sync) would otherwise take the whole queue in one
    step of the event loop, every other task waiting meanwhile."""
    q: WorkQueue[str] = WorkQueue()
    q.add("a")
    with trio.testing.assert_checkpoints():
        assert await q.get() == "a"


async def test_burst_of_1000_adds_is_one_item() -> None:
    q: WorkQueue[str] = WorkQueue()
    for _ in range(1000):
        q.add("zone")
    assert q.drain_ready() == ["zone"]
    assert len(q) == 0


async def test_key_readded_while_processing_runs_again_after_done() -> None:
    q: WorkQueue[str] = WorkQueue()
    q.add("a")
    key = await q.get()
    q.add("a")
    q.add("a")
    assert len(q) == 0  # not handed to a second worker while "a" is in flight
    assert q.processing == {"a"}
    q.done(key)
    assert len(q) == 1
    assert await q.get() == "a"
    q.done("a")
    assert len(q) == 0 and q.processing == frozenset()


async def test_done_without_readd_does_not_requeue() -> None:
    q: WorkQueue[str] = WorkQueue()
    q.add("a")
    q.done(await q.get())
    with trio.move_on_after(0.05):
        await q.get()
        pytest.fail("the queue should be empty")


async def test_get_waits_for_an_add() -> None:
    q: WorkQueue[str] = WorkQueue()
    got: list[str] = []

    async def worker() -> None:
        got.append(await q.get())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(worker)
        await trio.testing.wait_all_tasks_blocked()
        assert got == []
        q.add("x")
    assert got == ["x"]


async def test_concurrent_workers_never_share_a_key(
    autojump_clock: trio.testing.MockClock,
) -> None:
    q: WorkQueue[int] = WorkQueue()
    in_flight: set[int] = set()
    runs: dict[int, int] = {}

    async def worker() -> None:
        while True:
            try:
                key = await q.get()
            except ShutDown:
                return
            assert key not in in_flight
            in_flight.add(key)
            runs[key] = runs.get(key, 0) + 1
            if runs[key] == 1:
                q.add(key)  # changed again while being processed
            await trio.sleep(0.01)
            in_flight.discard(key)
            q.done(key)

    async with trio.open_nursery() as nursery:
        for _ in range(4):
            nursery.start_soon(worker)
        for i in range(10):
            q.add(i)
        await trio.sleep(5)  # mock time: far more than the work needs
        q.shut_down()
    assert runs == {i: 2 for i in range(10)}


async def test_add_after_and_rate_limit(autojump_clock: trio.testing.MockClock) -> None:
    q: WorkQueue[str] = WorkQueue(base_delay=1.0, max_delay=8.0)
    start = trio.current_time()
    q.add_after("later", 5.0)
    q.add("now")
    assert await q.get() == "now"
    assert await q.get() == "later"
    assert trio.current_time() - start == pytest.approx(5.0)

    delays = []
    for _ in range(5):
        t0 = trio.current_time()
        q.add_rate_limited("flaky")
        assert await q.get() == "flaky"
        q.done("flaky")
        delays.append(trio.current_time() - t0)
    assert delays == pytest.approx([1.0, 2.0, 4.0, 8.0, 8.0])
    assert q.num_requeues("flaky") == 5
    q.forget("flaky")
    t0 = trio.current_time()
    q.add_rate_limited("flaky")
    await q.get()
    assert trio.current_time() - t0 == pytest.approx(1.0)


async def test_shut_down_drains_then_raises() -> None:
    q: WorkQueue[str] = WorkQueue()
    q.add("a")
    q.shut_down()
    q.add("b")  # ignored
    assert await q.get() == "a"
    with pytest.raises(ShutDown):
        await q.get()


async def test_a_key_wakes_one_getter_and_a_cancelled_one_passes_it_on() -> None:
    q: WorkQueue[str] = WorkQueue()
    got: list[tuple[int, str]] = []

    async def getter(i: int) -> None:
        key = await q.get()
        got.append((i, key))
        q.done(key)

    async with trio.open_nursery() as nursery:
        scopes = []
        for i in range(4):
            scope = trio.CancelScope()
            scopes.append(scope)

            async def run(i: int = i, scope: trio.CancelScope = scope) -> None:
                with scope:
                    await getter(i)

            nursery.start_soon(run)
        await trio.testing.wait_all_tasks_blocked()
        # Getter 0 is cancelled as the key arrives (before it can run): whether or not its
        # was the getter the key woke, the key must reach another one.
        scopes[0].cancel()
        q.add("a")
        await trio.testing.wait_all_tasks_blocked()
        assert len(got) == 1 and got[0][1] == "a" and got[0][0] != 0
        assert len(q._getters) == 2  # the other two still wait, nobody else was woken
        q.add("b")
        await trio.testing.wait_all_tasks_blocked()
        assert [k for _, k in got] == ["a", "b"]
        nursery.cancel_scope.cancel()


async def test_a_worker_s_log_lines_name_the_key_it_holds() -> None:
    q: WorkQueue[str] = WorkQueue()
    seen: list[tuple[str, object]] = []

    async def worker() -> None:
        while True:
            try:
                key = await q.get()
            except ShutDown:
                return
            seen.append((key, logs.bound_fields().get("key")))
            q.done(key)
            seen.append(("after done", logs.bound_fields().get("key")))

    q.add("east")
    q.add("west")
    q.shut_down()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(worker)
    assert seen == [("east", "east"), ("after done", None), ("west", "west"), ("after done", None)]
    assert logs.bound_fields() == {}  # the test's own task was never bound


async def test_a_task_holding_several_keys_names_none() -> None:
    """The fleet takes one key, then every ready one: its lines name no single key."""
    q: WorkQueue[str] = WorkQueue()
    q.add("a")
    first = await q.get()
    assert logs.bound_fields().get("key") == "a"
    assert q.drain_ready() == []  # still just "a"
    assert logs.bound_fields().get("key") == "a"
    q.add("b")
    q.add("c")
    assert q.drain_ready() == ["b", "c"]
    assert logs.bound_fields().get("key") is None
    for key in (first, "b", "c"):
        q.done(key)
    assert q.processing == frozenset()
