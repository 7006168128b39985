"""atlasd.watchdog: a step that holds the event loop is measured, counted, published and
logged naming the code that held it; a loop that keeps answering is not a stall."""

from __future__ import annotations

import logging
import sys
import time

import pytest
import trio
from prometheus_client import REGISTRY

from atlasd.hub import StatusHub
from atlasd.subsystems import run_watchdog
from atlasd.watchdog import LoopWatchdog, describe_stack
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
    lags_before = _sample("atlasd_event_loop_lag_seconds_count")

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
    # The stall spans the hold from the watchdog's first post within it (one interval,
    # 0.1 s, at most after the hold began; a busy machine may add to it, never take).
    assert doc["last"]["held_ms"] >= 250
    assert "test_watchdog.py" in doc["last"]["where"]
    assert "_hold_the_loop" in doc["last"]["where"]
    assert _sample("atlasd_event_loop_stalls_total") >= stalls_before + 1
    assert _sample("atlasd_event_loop_lag_seconds_count") > lags_before
    assert _sample("atlasd_event_loop_lag_max_seconds") >= 0.25
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("event loop was held for" in m and "_hold_the_loop" in m for m in warnings)


def test_a_loop_that_keeps_answering_has_no_stall() -> None:
    # A threshold no answer on a live loop comes near: lags are measured, none is a stall.
    async def main() -> LoopWatchdog:
        watchdog = LoopWatchdog(trio.lowlevel.current_trio_token(), threshold=30.0, interval=0.01)
        before = _sample("atlasd_event_loop_lag_seconds_count")
        watchdog.start()
        try:
            await wait_until_async(
                lambda: _sample("atlasd_event_loop_lag_seconds_count") >= before + 5,
                timeout=10,
                what="five lags measured",
            )
        finally:
            watchdog.stop()
        return watchdog

    watchdog = trio.run(main)
    assert watchdog.stalls == 0
    assert watchdog.last is None


def test_the_watchdog_ends_with_its_loop() -> None:
    async def main() -> LoopWatchdog:
        watchdog = LoopWatchdog(trio.lowlevel.current_trio_token(), threshold=30.0, interval=0.01)
        watchdog.start()
        return watchdog

    watchdog = trio.run(main)
    thread = watchdog._thread
    assert thread is not None
    # Its next post finds the run finished (RunFinishedError) and the thread returns.
    thread.join(timeout=10)
    assert not thread.is_alive()


def test_a_stack_is_its_innermost_frame_then_atlasds_own() -> None:
    frame = sys._getframe()
    text = describe_stack(frame)
    first = text.split(" < ")[0]
    assert first.startswith("test_watchdog.py:")
    assert first.endswith("test_a_stack_is_its_innermost_frame_then_atlasds_own")
    # Outside atlasd (pytest's frames) nothing else is named.
    assert " < " not in text
