"""Subsystem supervision: retriable failures restart the subsystem inside its own
cancel scope with backoff; anything else ends the daemon (never half alive)."""

from __future__ import annotations

import itertools

import pytest
import trio
import trio.testing

from atlasd.daemon import Observed, _supervise
from atlasd.kube.errors import TransportError
from atlasd.status import StatusHub


async def test_retriable_failures_restart_with_backoff(
    autojump_clock: trio.testing.MockClock,
) -> None:
    hub = StatusHub()
    runs: list[float] = []
    fourth = trio.Event()

    async def flaky(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        runs.append(trio.current_time())
        task_status.started()
        if len(runs) < 4:
            raise TransportError("the API server went away")
        fourth.set()
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        await nursery.start(_supervise, "informers", hub, flaky)
        await fourth.wait()
        await trio.testing.wait_all_tasks_blocked()
        state = hub.snapshot()["subsystems"]["informers"]
        assert state == "running"
        nursery.cancel_scope.cancel()
    gaps = [b - a for a, b in itertools.pairwise(runs)]
    assert len(gaps) == 3
    # Exponential backoff with jitter: each wait at least the base delay, growing.
    assert gaps[0] >= 0.5 and gaps[1] >= 1.0 and gaps[2] >= 2.0


async def test_a_bug_propagates_and_ends_the_daemon() -> None:
    hub = StatusHub()

    async def buggy(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        raise ValueError("a bug, not an outage")

    with pytest.RaisesGroup(ValueError, flatten_subgroups=True):
        async with trio.open_nursery() as nursery:
            await nursery.start(_supervise, "fleet", hub, buggy)
            await trio.sleep_forever()


async def test_observed_generation_wakes_waiters() -> None:
    observed = Observed()
    woke: list[int] = []

    async def waiter() -> None:
        woke.append(await observed.wait_changed(0))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        assert woke == []
        observed.bump()
    assert woke == [1]


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


def test_certificate_expiry_metric_drops_removed_certificates() -> None:
    from prometheus_client import REGISTRY

    from atlasd.daemon import Daemon, DaemonOptions

    daemon = Daemon(DaemonOptions())

    def exported() -> dict[str, float]:
        out: dict[str, float] = {}
        for metric in REGISTRY.collect():
            if metric.name == "atlasd_certificate_expiry_timestamp_seconds":
                out.update({s.labels["name"]: s.value for s in metric.samples})
        return out

    daemon._export_expiry(
        [{"name": "east/server", "not_after": 100.0}, {"name": "west/server", "not_after": 200.0}]
    )
    assert exported() == {"east/server": 100.0, "west/server": 200.0}
    daemon._export_expiry([{"name": "west/server", "not_after": 300.0}])
    assert exported() == {"west/server": 300.0}
