"""run_fleet: keys are derived in steps sized by their cost, so an expensive derivation (a
CA rotation re-judging every stored leaf) does not hold the event loop for long."""

from __future__ import annotations

import time
from collections.abc import Iterable

import trio

from atlasd.fleet.feed import FleetFeed
from atlasd.fleet.run import CHUNK, STEP_SECONDS, run_fleet
from atlasd.fleet.state import FleetState, FleetUpdate
from atlasd.watch.workqueue import WorkQueue
from tests.unit.fleet.test_state import NOW, S, stored
from tests.unit.reconcile.builders import cluster_service

# What one key costs to derive here: ten keys fill a step.
PER_KEY = STEP_SECONDS / 10


def test_costly_keys_are_derived_in_steps_of_about_the_budget() -> None:
    state = FleetState(S)
    for n in range(300):
        state.observe(
            "cluster-services",
            f"c{n}",
            stored(cluster_service(f"c{n}", f"203.0.113.{n % 250 + 1}")),
        )
    steps: list[int] = []
    derive = state.derive

    def costly(keys: Iterable[str], *, now: object) -> FleetUpdate:
        keys = list(keys)
        steps.append(len(keys))
        time.sleep(PER_KEY * len(keys))  # what a costly key does to the loop
        return derive(keys, now=NOW)

    state.derive = costly  # type: ignore[method-assign]
    feed = FleetFeed()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(lambda task_status: run_fleet(
                state=state, queue=WorkQueue(name="test-fleet"), feed=feed, task_status=task_status))  # fmt: skip
            nursery.cancel_scope.cancel()

    trio.run(main)
    assert sum(steps) == 301  # every cluster and the fleet-wide key, each once
    assert steps[0] == CHUNK  # nothing known of the cost yet
    # Then about ten a step (fewer when the machine is slower than time.sleep promises).
    assert 1 <= max(steps[1:]) <= 12, steps
    assert feed.latest is not None and len(feed.latest.members) == 300
