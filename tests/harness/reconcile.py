"""The leader's reconcile path as ``atlasd run`` wires it, for tests and benchmarks.

``leader(api, settings, now=...)`` starts what the daemon runs for the leader's writes
(``atlasd.daemon``: the ``sources``, ``fleet`` and ``reconcile`` subsystems): an informer per
role feeding a ``FleetRunner``, its ``FleetFeed``, and a ``ReconcileLoop`` with its
``Reconciler``, the two sharing one ``Expectations``. Only the wall clock differs: the
fleet and the loop read ``run.now``, which a test sets (certificates are judged, issued
and renewed at that time, so PKI tests are deterministic).

``await run.settle()`` asks the loop for a full pass (a LIST compared with the watch cache:
whatever changed before the call is seen) and waits until the loop is idle (every key done,
every write seen by the watch); it returns what the loop did since the previous ``settle``,
combined (``ReconcileResult.combine``). Leaving the context stops everything: a new
``leader(...)`` is a restart with nothing remembered.
"""

from __future__ import annotations

import datetime as dt
import functools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import trio

from atlasd.fleet.feed import FleetFeed
from atlasd.fleet.keys import roles
from atlasd.fleet.run import FleetRunner
from atlasd.kube.api import KubeApi
from atlasd.model import Fleet, Settings
from atlasd.reconcile.applier import (
    DEFAULT_CONCURRENCY,
    EventPoster,
    Reconciler,
    ReconcileResult,
    log_event,
)
from atlasd.reconcile.expectations import Expectations
from atlasd.reconcile.loop import DEFAULT_WORKERS, ReconcileLoop
from atlasd.reconcile.pki import KeySource
from atlasd.watch.sources import run_sources
from tests.harness.wait import wait_until_async


@dataclass
class LeaderRun:
    """A running reconcile path (see the module docstring)."""

    now: dt.datetime
    feed: FleetFeed = field(default_factory=FleetFeed)
    loop: ReconcileLoop | None = None
    # Every result the loop reported since the last ``settle``.
    results: list[ReconcileResult] = field(default_factory=list)

    @property
    def reconciler(self) -> Reconciler:
        assert self.loop is not None
        return self.loop.reconciler

    @property
    def fleet(self) -> Fleet:
        """What the replicas serve now (the watch cache's latest version)."""
        assert self.feed.latest is not None
        return self.feed.latest.model

    async def settle(self, *, timeout: float = 120) -> ReconcileResult:  # noqa: ASYNC109
        loop = self.loop
        assert loop is not None
        passes = loop.full_passes
        loop.request_full_pass()
        await wait_until_async(
            lambda: loop.full_passes > passes and loop.idle,
            timeout=timeout,
            what="the reconcile loop to settle",
            interval=0.01,
        )
        results, self.results = self.results, []
        return ReconcileResult.combine(results)


@asynccontextmanager
async def leader(
    api: KubeApi,
    settings: Settings,
    *,
    now: dt.datetime,
    post_event: EventPoster = log_event,
    keys: KeySource | None = None,
    allow_loopback: bool = False,
    concurrency: int = DEFAULT_CONCURRENCY,
    workers: int = DEFAULT_WORKERS,
) -> AsyncIterator[LeaderRun]:
    """The daemon's reconcile path over ``api`` until the context ends."""
    run = LeaderRun(now=now)
    expectations = Expectations()
    fleet = FleetRunner(
        settings,
        feed=run.feed,
        allow_loopback=allow_loopback,
        expectations=expectations,
        wall_clock=lambda: run.now,
    )
    run.loop = ReconcileLoop(
        api=api,
        feed=run.feed,
        reconciler=Reconciler(
            settings=settings,
            keys=keys,
            concurrency=concurrency,
            post_event=post_event,
            expectations=expectations,
        ),
        # Full passes only when settle() asks (the daemon's safety net, not needed here).
        resync_seconds=float("inf"),
        workers=workers,
        on_result=lambda result, _seconds: run.results.append(result),
        wall_clock=lambda: run.now,
    )
    sources = functools.partial(
        run_sources, api, roles(settings), namespace=settings.namespace, sink=fleet
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(sources)
        await nursery.start(fleet.run)
        await nursery.start(run.loop.run)
        yield run
        nursery.cancel_scope.cancel()
