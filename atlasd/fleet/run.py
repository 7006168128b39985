"""The fleet subsystem: watched objects in, keyed fleet versions out.

``FleetSink`` is what the sources call: each change is recorded in the ``FleetState`` at
once and its keys are queued (``atlasd.watch.workqueue``: bursts coalesce). ``run_fleet``
takes whatever keys are ready, derives them in chunks (so that a start with thousands of
clusters never holds the event loop for long) and publishes each version on the
``FleetFeed``. Each Problem is logged once, when it appears.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Callable

import trio
import trio.lowlevel

from atlasd.fleet.feed import FleetFeed
from atlasd.fleet.keys import FLEET_KEY
from atlasd.fleet.state import FleetState, FleetUpdate, FleetVersion
from atlasd.metrics import FLEET_SECONDS
from atlasd.model import Problem
from atlasd.watch.role import Role
from atlasd.watch.workqueue import WorkQueue

log = logging.getLogger(__name__)

CHUNK = 250


class FleetSink:
    """Where the sources deliver: into the state, keys onto the queue."""

    def __init__(
        self,
        state: FleetState,
        queue: WorkQueue[str],
        *,
        on_relist: Callable[[Role], None] | None = None,
    ) -> None:
        self.state = state
        self.queue = queue
        # Told when a role relisted (the leader's expectations of that kind are met).
        self.on_relist = on_relist

    def changed(self, role: Role, name: str, obj: dict[str, object] | None) -> None:
        for key in self.state.observe(role.name, name, obj):
            self.queue.add(key)

    def relisted(self, role: Role) -> None:
        if self.on_relist is not None:
            self.on_relist(role)


def _problem_keys(version: FleetVersion | None, key: str) -> set[Problem]:
    if version is None:
        return set()
    if key in version.members:
        return set(version.members[key].problems)
    return set(version.fleetwide.problems) if key == FLEET_KEY else set()


def _log_new_problems(before: FleetVersion | None, update: FleetUpdate) -> None:
    for key in sorted(update.changed):
        new = _problem_keys(update.version, key) - _problem_keys(before, key)
        for p in sorted(new, key=str):
            log.warning("rejected: %s (%s)", p, p.reason)


async def run_fleet(
    *,
    state: FleetState,
    queue: WorkQueue[str],
    feed: FleetFeed,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Derive and publish until cancelled; started once the first version (everything the
    sources listed) is published."""
    first = True
    while True:
        if first:
            # The fleet-wide key first: the members' trust checks need its CA.
            keys = [FLEET_KEY, *sorted(state.keys() - {FLEET_KEY})]
            # Whatever is queued now is covered by deriving every key.
            for k in queue.drain_ready():
                queue.done(k)
        else:
            key = await queue.get()
            keys = [key, *queue.drain_ready()]
        for i in range(0, len(keys), CHUNK):
            chunk = keys[i : i + CHUNK]
            t0 = time.perf_counter()
            update = state.derive(chunk, now=dt.datetime.now(dt.UTC))
            FLEET_SECONDS.observe(time.perf_counter() - t0)
            before = feed.latest
            feed.publish(update)
            _log_new_problems(before, update)
            if not first:
                for k in chunk:
                    queue.done(k)
            if i + CHUNK < len(keys):
                await trio.lowlevel.checkpoint()
        if first:
            first = False
            task_status.started()
