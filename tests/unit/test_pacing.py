"""atlasd.pacing: the pause after a piece of work in a burst, from its CPU time."""

from __future__ import annotations

import threading
import time

import pytest

from atlasd.pacing import burst_pause, cpu_timed


def test_the_pause_keeps_the_work_to_its_share_and_under_the_cap() -> None:
    assert burst_pause(0.01, share=0.25, cap=1.0) == pytest.approx(0.03)
    assert burst_pause(0.01, share=0.1, cap=1.0) == pytest.approx(0.09)
    assert burst_pause(0.5, share=0.1, cap=1.0) == 1.0
    assert burst_pause(0.0, share=0.1, cap=1.0) == 0.0
    assert burst_pause(0.2, share=1.0, cap=1.0) == 0.0


@pytest.mark.parametrize("share", [0.0, -0.5, 1.5])
def test_a_share_outside_zero_to_one_is_refused(share: float) -> None:
    with pytest.raises(ValueError, match="share"):
        burst_pause(0.1, share=share, cap=1.0)


def test_waiting_is_not_counted_work_is() -> None:
    def nap() -> str:
        time.sleep(0.2)
        return "slept"

    result, waited = cpu_timed(nap)
    assert result == "slept"
    assert waited < 0.05

    def spin() -> int:
        # Until this thread has used 50 ms of CPU, however busy the machine is.
        end, n = time.thread_time() + 0.05, 0
        while time.thread_time() < end:
            n += 1
        return n

    _, worked = cpu_timed(spin)
    assert 0.05 <= worked < 1.0


def test_another_threads_work_is_not_counted() -> None:
    """The zone writer's case: a reader thread keeps the interpreter busy meanwhile."""
    stop = threading.Event()

    def busy() -> None:
        while not stop.is_set():
            sum(range(1000))

    t = threading.Thread(target=busy)
    t.start()
    try:
        _, cpu = cpu_timed(lambda: time.sleep(0.2))
    finally:
        stop.set()
        t.join()
    assert cpu < 0.05
