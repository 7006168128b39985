"""The work queue's metrics mean what client-go's do (util/workqueue/metrics.go)."""

from __future__ import annotations

import gc
import itertools

import pytest
import trio
from prometheus_client import REGISTRY, generate_latest

from atlasd.watch.workqueue import WorkQueue

_names = itertools.count()


class Clock:
    """The metrics' clock, moved by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _queue(clock: Clock | None = None) -> WorkQueue[str]:
    return WorkQueue(name=f"test-{next(_names)}", clock=clock or Clock())


def _value(metric: str, q: WorkQueue[str], **labels: str) -> float:
    value = REGISTRY.get_sample_value(metric, {"name": q.name, **labels})
    assert value is not None, (metric, q.name)
    return value


async def test_adds_count_the_adds_that_make_a_key_wait() -> None:
    q = _queue()
    for key in ["a", "b", "a", "a"]:  # the two later "a"s coalesce
        q.add(key)
    assert _value("workqueue_adds_total", q) == 2
    key = await q.get()
    q.add(key)  # changed while a worker has it: it waits again, counted
    q.add(key)
    assert _value("workqueue_adds_total", q) == 3


async def test_depth_is_the_keys_waiting_for_a_worker() -> None:
    q = _queue()
    q.add("a")
    q.add("b")
    assert _value("workqueue_depth", q) == 2
    assert await q.get() == "a"
    assert _value("workqueue_depth", q) == 1
    q.add("a")  # waits for the worker holding it
    assert _value("workqueue_depth", q) == 2
    q.done("a")
    assert _value("workqueue_depth", q) == 2
    assert q.drain_ready() == ["b", "a"]
    assert _value("workqueue_depth", q) == 0


async def test_queue_duration_is_from_the_first_add_to_the_get() -> None:
    clock = Clock()
    q = _queue(clock)
    q.add("a")
    clock.now += 3.0
    q.add("a")  # coalesced: the wait still started at the first add
    clock.now += 2.0
    await q.get()
    assert _value("workqueue_queue_duration_seconds_count", q) == 1
    assert _value("workqueue_queue_duration_seconds_sum", q) == pytest.approx(5.0)
    assert _value("workqueue_queue_duration_seconds_bucket", q, le="1.0") == 0
    assert _value("workqueue_queue_duration_seconds_bucket", q, le="10.0") == 1
    # Re-added while processing: its next wait starts at that add.
    q.add("a")
    clock.now += 1.0
    q.done("a")
    clock.now += 0.5
    await q.get()
    assert _value("workqueue_queue_duration_seconds_count", q) == 2
    assert _value("workqueue_queue_duration_seconds_sum", q) == pytest.approx(6.5)


async def test_work_duration_is_from_the_get_to_done() -> None:
    clock = Clock()
    q = _queue(clock)
    q.add("a")
    clock.now += 9.0  # waiting is not work
    await q.get()
    clock.now += 2.5
    q.done("a")
    q.done("a")  # a second done is not a second piece of work
    assert _value("workqueue_work_duration_seconds_count", q) == 1
    assert _value("workqueue_work_duration_seconds_sum", q) == pytest.approx(2.5)
    # Keys taken in one batch each count their own work.
    q.add("b")
    q.add("c")
    keys = q.drain_ready()
    clock.now += 1.0
    for k in keys:
        q.done(k)
    assert _value("workqueue_work_duration_seconds_count", q) == 3
    assert _value("workqueue_work_duration_seconds_sum", q) == pytest.approx(4.5)


async def test_retries_count_every_delayed_add() -> None:
    q = _queue()
    q.add("a")
    assert _value("workqueue_retries_total", q) == 0
    q.add_rate_limited("a")
    q.add_rate_limited("a")
    q.add_after("b", 30.0)
    q.add_after("c", 0.0)  # client-go counts it before adding it at once
    assert _value("workqueue_retries_total", q) == 4


async def test_unfinished_work_and_the_longest_running_processor() -> None:
    clock = Clock()
    q = _queue(clock)
    assert _value("workqueue_unfinished_work_seconds", q) == 0
    assert _value("workqueue_longest_running_processor_seconds", q) == 0
    q.add("a")
    await q.get()
    clock.now += 2.0
    q.add("b")
    await q.get()
    clock.now += 3.0
    assert _value("workqueue_unfinished_work_seconds", q) == pytest.approx(5.0 + 3.0)
    assert _value("workqueue_longest_running_processor_seconds", q) == pytest.approx(5.0)
    q.done("a")
    assert _value("workqueue_unfinished_work_seconds", q) == pytest.approx(3.0)
    assert _value("workqueue_longest_running_processor_seconds", q) == pytest.approx(3.0)
    q.done("b")
    assert _value("workqueue_unfinished_work_seconds", q) == 0
    assert _value("workqueue_longest_running_processor_seconds", q) == 0


async def test_scraped_from_a_thread_as_metrics_is_served() -> None:
    q = _queue()
    for i in range(3):
        q.add(str(i))
    await q.get()
    text = (await trio.to_thread.run_sync(generate_latest, REGISTRY)).decode()
    assert f'workqueue_depth{{name="{q.name}"}} 2.0' in text
    assert f'workqueue_adds_total{{name="{q.name}"}} 3.0' in text


async def test_the_newest_queue_of_a_name_is_the_one_exported() -> None:
    """A new leader term makes a new reconcile queue under the same name."""
    old = _queue()
    old.add("a")
    old.add("b")
    new: WorkQueue[str] = WorkQueue(name=old.name, clock=Clock())
    new.add("c")
    assert _value("workqueue_depth", new) == 1
    assert _value("workqueue_adds_total", new) == 3  # a counter keeps counting
    name = new.name
    del old, new
    gc.collect()
    # A queue that is gone reads as empty (its keys are nobody's work any more).
    assert REGISTRY.get_sample_value("workqueue_depth", {"name": name}) == 0


def test_an_unnamed_queue_exports_nothing() -> None:
    q: WorkQueue[str] = WorkQueue()
    q.add("a")
    assert REGISTRY.get_sample_value("workqueue_adds_total", {"name": ""}) is None
