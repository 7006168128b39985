"""Watch reconnect backoff: 0.8 s doubling to 30 s, jitter, reset after a healthy period."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from atlasd.watch.backoff import Backoff, exponential


def test_doubles_to_the_cap_without_jitter() -> None:
    b = Backoff(jitter=0.0)
    delays = [b.next_delay(now=float(i)) for i in range(9)]
    assert delays == pytest.approx([0.8, 1.6, 3.2, 6.4, 12.8, 25.6, 30.0, 30.0, 30.0])


@pytest.mark.parametrize(("rand", "expected"), [(0.0, 0.8), (0.5, 1.2), (0.999, 1.5992)])
def test_jitter_adds_up_to_one_delay(rand: float, expected: float) -> None:
    b = Backoff(rand=lambda: rand)
    assert b.next_delay(now=0.0) == pytest.approx(expected)


def test_cap_applies_before_jitter_as_in_client_go() -> None:
    b = Backoff(rand=lambda: 0.5)
    assert max(b.next_delay(now=float(i)) for i in range(20)) == pytest.approx(45.0)


def test_resets_after_a_healthy_period() -> None:
    b = Backoff(jitter=0.0, reset_after=120.0)
    for i in range(5):
        b.next_delay(now=float(i))
    assert b.next_delay(now=10.0) == pytest.approx(25.6)
    assert b.next_delay(now=10.0 + 119.0) == pytest.approx(30.0)  # not healthy long enough
    assert b.next_delay(now=129.0 + 120.0) == pytest.approx(0.8)


def test_explicit_reset() -> None:
    b = Backoff(jitter=0.0)
    b.next_delay(now=0.0)
    b.next_delay(now=0.0)
    b.reset()
    assert b.next_delay(now=0.0) == pytest.approx(0.8)


async def test_sleep_honours_retry_after(autojump_clock: trio.testing.MockClock) -> None:
    b = Backoff(jitter=0.0)
    start = trio.current_time()
    assert await b.sleep(at_least=5.0) == 5.0
    assert trio.current_time() - start == pytest.approx(5.0)
    assert await b.sleep() == pytest.approx(1.6)


def test_delay_for_is_the_curve_without_the_state() -> None:
    """The work queue counts failures per key and asks for the delay of the n-th."""
    b = Backoff(initial=0.5, cap=60.0, jitter=0.0)
    assert [b.delay_for(n) for n in range(9)] == pytest.approx(
        [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0]
    )
    assert b.next_delay(now=0.0) == pytest.approx(0.5)  # delay_for kept no state
    assert Backoff(initial=1.0, rand=lambda: 0.5).delay_for(2) == pytest.approx(6.0)


def test_a_key_failing_forever_stays_at_the_cap() -> None:
    assert exponential(10**6, initial=0.005, factor=2.0, cap=300.0) == 300.0
