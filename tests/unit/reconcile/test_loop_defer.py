"""xDS first: a reconcile worker waits while the ADS server has changes to send
(``ReconcileLoop(defer=...)``, ``atlasd.xds.cache.PushBacklog.busy``), at most
``MAX_DEFER`` seconds, and the time it waited is counted."""

from __future__ import annotations

from typing import Any, cast

import trio
import trio.testing

from atlasd.fleet.feed import FleetFeed
from atlasd.metrics import RECONCILE_DEFERRED
from atlasd.reconcile import loop as loop_mod
from atlasd.reconcile.loop import MAX_DEFER, ReconcileLoop


def _loop(defer: Any) -> tuple[ReconcileLoop, list[tuple[str, float]]]:
    loop = ReconcileLoop(
        api=cast(Any, None),
        feed=FleetFeed(),
        reconciler=cast(Any, None),
        resync_seconds=300,
        defer=defer,
    )
    done: list[tuple[str, float]] = []

    async def one(key: str) -> None:
        done.append((key, trio.current_time()))

    loop._one = one  # type: ignore[method-assign]
    return loop, done


async def _work(loop: ReconcileLoop, seconds: float) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(loop._worker)
        await trio.sleep(seconds)
        nursery.cancel_scope.cancel()


def _deferred() -> float:
    return cast(float, RECONCILE_DEFERRED._value.get())  # type: ignore[attr-defined]


async def test_a_key_waits_while_the_ads_server_is_busy(
    autojump_clock: trio.testing.MockClock,
) -> None:
    start = trio.current_time()
    busy_until = start + 3.0
    loop, done = _loop(lambda: trio.current_time() < busy_until)
    before = _deferred()
    loop.queue.add("east")
    await _work(loop, 20)
    [(key, at)] = done
    assert key == "east"
    assert 3.0 <= at - start < 3.0 + 2 * loop_mod.DEFER_POLL
    assert 3.0 <= _deferred() - before < 3.0 + 2 * loop_mod.DEFER_POLL


async def test_a_busy_server_holds_a_key_at_most_max_defer(
    autojump_clock: trio.testing.MockClock,
) -> None:
    start = trio.current_time()
    loop, done = _loop(lambda: True)
    loop.queue.add("east")
    await _work(loop, MAX_DEFER * 3)
    [(_, at)] = done
    assert MAX_DEFER <= at - start < MAX_DEFER + 2 * loop_mod.DEFER_POLL


async def test_without_a_backlog_a_key_goes_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    start = trio.current_time()
    for defer in (None, lambda: False):
        loop, done = _loop(defer)
        loop.queue.add("east")
        await _work(loop, 1)
        [(_, at)] = done
        assert at - start < loop_mod.DEFER_POLL
        start = trio.current_time()
