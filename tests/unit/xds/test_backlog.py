"""``PushBacklog``: whether the ADS server has changes to send (the leader's writes wait)."""

from __future__ import annotations

import pytest

from atlasd.xds.cache import PushBacklog


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_busy_while_a_build_runs_or_a_woken_stream_has_not_sent() -> None:
    clock = Clock()
    b = PushBacklog(fresh=5.0, clock=clock)
    assert not b.busy()
    b.building = True
    assert b.busy()
    b.building = False
    b.woken()
    b.woken()
    assert b.busy() and b.waiting == 2
    b.sent()
    assert b.busy()
    b.sent()
    assert not b.busy() and b.waiting == 0


def test_a_stream_that_never_sends_stops_holding_the_writes_once_wakes_are_stale() -> None:
    clock = Clock()
    b = PushBacklog(fresh=5.0, clock=clock)
    b.woken()  # its Envoy stopped reading: the wake stays
    clock.now += 4.9
    assert b.busy()
    clock.now += 0.2
    assert not b.busy() and b.waiting == 1
    b.woken()  # a new change makes the backlog fresh again
    assert b.busy()
    b.sent(2)
    assert not b.busy()


def test_more_sends_than_wakes_is_a_bug() -> None:
    b = PushBacklog()
    b.woken()
    with pytest.raises(RuntimeError):
        b.sent(2)
