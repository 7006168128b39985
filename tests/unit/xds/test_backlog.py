"""``PushBacklog``: whether the ADS server has pushes outstanding (the leader's writes wait)."""

from __future__ import annotations

import pytest

from atlasd.xds.cache import PushBacklog


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_busy_while_a_build_runs_or_a_stream_is_in_a_push() -> None:
    clock = Clock()
    b = PushBacklog(fresh=5.0, clock=clock)
    assert not b.busy()
    b.building = True
    assert b.busy()
    b.building = False
    b.enter()
    b.enter()
    assert b.busy() and b.active == 2
    b.leave()
    assert b.busy()
    b.leave()
    assert not b.busy() and b.active == 0


def test_streams_that_make_no_progress_stop_holding_the_writes() -> None:
    clock = Clock()
    b = PushBacklog(fresh=5.0, clock=clock)
    b.enter()
    b.enter()  # this one's Envoy stopped answering: it stays in
    clock.now += 4.0
    b.leave()  # progress: the window starts again
    clock.now += 4.0
    assert b.busy()
    clock.now += 1.1
    assert not b.busy() and b.active == 1
    b.enter()  # a new push makes it busy again
    assert b.busy()


def test_leaving_more_than_entered_is_a_bug() -> None:
    b = PushBacklog()
    b.enter()
    b.leave()
    with pytest.raises(RuntimeError):
        b.leave()
