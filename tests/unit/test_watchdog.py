"""atlasd.watchdog: a step that holds the event loop is timed, counted, published and
logged naming the code that held it; a loop that keeps looking at I/O has no stall."""

from __future__ import annotations

import logging
import sys
import time

import pytest
import trio
from prometheus_client import REGISTRY

from atlasd.hub import StatusHub
from atlasd.subsystems import run_watchdog
from atlasd.watchdog import LoopWatchdog, Stall, describe_stack
from tests.harness.wait import wait_until_async


def _sample(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


def _hold_the_loop(seconds: float) -> None:
    # What a step computing too long looks like to the loop: no checkpoint until it ends.
    time.sleep(seconds)


def test_a_held_loop_is_a_stall_named_by_the_code_that_held_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="atlasd.watchdog")
    hub = StatusHub()
    stalls_before = _sample("atlasd_event_loop_stalls_total")
    batches_before = _sample("atlasd_event_loop_busy_seconds_count")

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(lambda task_status: run_watchdog(
                threshold=0.05, hub=hub, task_status=task_status))  # fmt: skip
            _hold_the_loop(0.4)
            await wait_until_async(lambda: "loop" in hub.snapshot(), timeout=10, what="a stall")
            nursery.cancel_scope.cancel()

    trio.run(main)
    doc = hub.snapshot()["loop"]
    assert doc["stalls"] >= 1
    assert doc["threshold_ms"] == 50.0
    # The batch held the loop at least as long as the step (a busy machine may add to it).
    assert doc["last"]["held_ms"] >= 400
    assert "test_watchdog.py" in doc["last"]["where"]
    assert "_hold_the_loop" in doc["last"]["where"]
    assert _sample("atlasd_event_loop_stalls_total") >= stalls_before + 1
    assert _sample("atlasd_event_loop_busy_seconds_count") > batches_before
    assert _sample("atlasd_event_loop_busy_max_seconds") >= 0.4
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("event loop was held for" in m and "_hold_the_loop" in m for m in warnings)


def test_the_longest_batch_is_the_process_s_whatever_watchdog_timed_it() -> None:
    # A watchdog started after another (its supervisor restarted it) keeps the longest.
    async def held(seconds: float) -> None:
        watchdog = LoopWatchdog(threshold=30.0)
        watchdog.start()
        try:
            await trio.lowlevel.checkpoint()
            _hold_the_loop(seconds)
            await trio.lowlevel.checkpoint()
        finally:
            watchdog.stop()

    trio.run(held, 0.2)
    longest = _sample("atlasd_event_loop_busy_max_seconds")
    assert longest >= 0.2
    trio.run(held, 0.0)
    assert _sample("atlasd_event_loop_busy_max_seconds") == longest


def test_a_loop_that_keeps_looking_at_io_has_no_stall() -> None:
    # A threshold no batch of a live loop comes near: batches are timed, none is a stall.
    async def main() -> LoopWatchdog:
        watchdog = LoopWatchdog(threshold=30.0, interval=0.01)
        before = _sample("atlasd_event_loop_busy_seconds_count")
        watchdog.start()
        try:
            await wait_until_async(
                lambda: _sample("atlasd_event_loop_busy_seconds_count") >= before + 5,
                timeout=10,
                what="five batches timed",
            )
        finally:
            watchdog.stop()
        return watchdog

    watchdog = trio.run(main)
    assert watchdog.stalls == 0
    assert watchdog.last is None


def test_a_stall_the_thread_did_not_see_is_still_counted() -> None:
    """A batch just over the threshold may end before the thread looks: timed and counted
    by the loop's own hooks, its place unknown."""
    seen: list[Stall] = []

    async def main() -> None:
        # The thread looks once an hour: it never samples.
        watchdog = LoopWatchdog(threshold=0.05, interval=3600, on_stall=lambda s, n: seen.append(s))
        watchdog.start()
        try:
            await trio.lowlevel.checkpoint()  # the next batch: the first the hooks time
            _hold_the_loop(0.1)
            await wait_until_async(lambda: seen, timeout=10, what="the stall reported")
        finally:
            watchdog._stop.set()
            trio.lowlevel.remove_instrument(watchdog)
        assert seen[0].held >= 0.1 and seen[0].where is None

    trio.run(main)


def test_a_stack_is_its_innermost_frame_then_atlasds_own() -> None:
    frame = sys._getframe()
    text = describe_stack(frame)
    first = text.split(" < ")[0]
    assert first.startswith("test_watchdog.py:")
    assert first.endswith("test_a_stack_is_its_innermost_frame_then_atlasds_own")
    # Outside atlasd (pytest's frames) nothing else is named.
    assert " < " not in text
