"""run_xds: a lone change is built on the event loop at once; a build of more than a few
nodes runs in a worker thread, so the loop keeps serving meanwhile."""

from __future__ import annotations

import threading
from collections.abc import Iterable

import trio

from atlasd import model
from atlasd.fleet.feed import FleetFeed
from atlasd.fleet.state import FleetState
from atlasd.hub import StatusHub
from atlasd.subsystems import INLINE_BUILD, run_xds
from atlasd.xds.builders import BuildResult, SnapshotBuilder
from atlasd.xds.cache import SnapshotCache
from tests.harness.wait import wait_until_async
from tests.unit.fleet.test_state import NOW, S


class RecordingBuilder(SnapshotBuilder):
    """Builds nothing; records which thread each build ran in and for how many keys."""

    def __init__(self) -> None:
        super().__init__()
        self.builds: list[tuple[int, int]] = []

    def update(self, fleet: model.Fleet, changed: Iterable[str] | None) -> BuildResult:
        self.builds.append((threading.get_ident(), len(list(changed or ()))))
        return BuildResult()


def test_a_lone_change_is_built_on_the_loop_and_a_large_one_in_a_thread() -> None:
    state, feed, builder = FleetState(S), FleetFeed(), RecordingBuilder()
    many = [f"c{i}" for i in range(INLINE_BUILD + 1)]

    async def main() -> int:
        loop_thread = threading.get_ident()
        async with trio.open_nursery() as nursery:
            feed.publish(state.derive([], now=NOW))  # the first version: run_xds starts
            await nursery.start(lambda task_status: run_xds(
                feed=feed, builder=builder, cache=SnapshotCache(), hub=StatusHub(),
                task_status=task_status))  # fmt: skip
            one = state.derive([], now=NOW)
            feed.publish(type(one)(version=one.version, changed=frozenset({"c0"})))
            await wait_until_async(lambda: len(builder.builds) >= 2, timeout=10, what="build")
            feed.publish(type(one)(version=one.version, changed=frozenset(many)))
            await wait_until_async(lambda: len(builder.builds) >= 3, timeout=10, what="build")
            nursery.cancel_scope.cancel()
        return loop_thread

    loop_thread = trio.run(main)
    (_, _), (lone_thread, lone), (large_thread, large) = builder.builds
    assert (lone, large) == (1, INLINE_BUILD + 1)
    assert lone_thread == loop_thread
    assert large_thread != loop_thread
