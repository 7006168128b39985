"""Leadership: a change is never missed by a reader that looked before it waited."""

from __future__ import annotations

import trio
import trio.testing

from atlasd.hub import StatusHub
from atlasd.subsystems import Leadership


async def test_a_change_between_reading_and_waiting_is_not_missed() -> None:
    leadership = Leadership(StatusHub())
    leading = leadership.leading  # a subsystem reads, then starts its work ...
    assert leading is False
    async with leadership.hold():  # ... the election leads meanwhile ...
        with trio.fail_after(1):
            await leadership.wait_changed(leading)  # ... and the waiter still sees it.
        assert leadership.leading is True
    with trio.fail_after(1):
        await leadership.wait_changed(True)


async def test_wait_changed_waits_while_nothing_changes() -> None:
    leadership = Leadership(StatusHub())
    done = trio.Event()

    async def wait() -> None:
        await leadership.wait_changed(False)
        done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(wait)
        await trio.testing.wait_all_tasks_blocked()
        assert not done.is_set()
        async with leadership.hold():
            with trio.fail_after(1):
                await done.wait()
