"""``PushBacklog``: whether the ADS server has a fleet-wide push outstanding (the leader's
writes wait)."""

from __future__ import annotations

import pytest

from atlasd.xds.cache import PushBacklog


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_busy_while_a_build_runs() -> None:
    b = PushBacklog()
    assert not b.busy()
    b.building = True
    assert b.busy()
    b.building = False
    assert not b.busy()


def test_a_push_of_more_than_large_streams_holds_until_every_stream_is_done() -> None:
    b = PushBacklog(large=2, clock=Clock())
    b.enter()
    b.enter()
    assert not b.busy()  # two streams at once: the trickle writes cause
    b.enter()
    assert b.busy() and b.active == 3  # fleet-wide
    b.leave()
    b.leave()
    assert b.busy()  # the last one is not done yet
    b.leave()
    assert not b.busy() and b.active == 0
    b.enter()
    assert not b.busy()  # a new trickle does not hold


def test_streams_that_make_no_progress_stop_holding_the_writes() -> None:
    clock = Clock()
    b = PushBacklog(large=1, fresh=5.0, clock=clock)
    b.enter()
    b.enter()  # this one's Envoy stopped answering: it stays in
    clock.now += 4.0
    b.leave()  # progress: the window starts again
    clock.now += 4.0
    assert b.busy()
    clock.now += 1.1
    assert not b.busy() and b.active == 1
    b.enter()  # a new push of its own makes it busy again
    assert b.busy()


def test_leaving_more_than_entered_is_a_bug() -> None:
    b = PushBacklog()
    b.enter()
    b.leave()
    with pytest.raises(RuntimeError):
        b.leave()


def test_the_hold_ends_at_a_tenth_of_large() -> None:
    """A trickle beside a fleet-wide push's tail never ends in a busy fleet: the hold ends
    once at most ``large // 10`` streams are left."""
    b = PushBacklog(large=20, clock=Clock())
    for _ in range(21):
        b.enter()
    assert b.busy()
    for _ in range(18):
        b.leave()
    assert b.busy() and b.active == 3
    b.leave()
    assert not b.busy() and b.active == 2
