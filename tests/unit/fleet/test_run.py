"""run_fleet: keys are derived in steps of about ``STEP_SECONDS``, so an expensive
derivation (a CA rotation re-judging every stored identity) does not hold the event loop."""

from __future__ import annotations

import time

import trio

from atlasd.fleet.feed import FleetFeed
from atlasd.fleet.keys import FLEET_KEY
from atlasd.fleet.run import STEP_SECONDS, run_fleet
from atlasd.fleet.state import FleetState, FleetUpdate, Member
from atlasd.watch.workqueue import WorkQueue
from tests.unit.fleet.test_state import S, stored
from tests.unit.reconcile.builders import cluster_service

# What one key costs to derive here: ten keys fill a step.
PER_KEY = STEP_SECONDS / 10


def test_costly_keys_are_derived_in_steps_of_about_the_budget() -> None:
    state = FleetState(S)
    for n in range(120):
        ip = f"203.0.113.{n + 1}"
        state.observe("cluster-services", f"c{n}", stored(cluster_service(f"c{n}", ip)))
    member = state._derive_member

    def costly(key: str, old: Member | None) -> Member | None:
        time.sleep(PER_KEY)  # what a costly key does to the loop
        return member(key, old)

    state._derive_member = costly  # type: ignore[method-assign]
    steps: list[FleetUpdate] = []
    feed = FleetFeed()
    publish = feed.publish
    feed.publish = lambda update: (steps.append(update), publish(update))[1]  # type: ignore[method-assign]

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(lambda task_status: run_fleet(
                state=state, queue=WorkQueue(name="test-fleet"), feed=feed, task_status=task_status))  # fmt: skip
            nursery.cancel_scope.cancel()

    trio.run(main)
    derived = [len(u.changed - {FLEET_KEY}) for u in steps]
    assert sum(derived) == 120  # every cluster once
    # About ten keys a step (fewer when the machine is slower than time.sleep promises);
    # without the deadline one step took all 120.
    assert max(derived) <= 11, derived
    assert len(steps) >= 11
    assert feed.latest is not None and len(feed.latest.members) == 120
