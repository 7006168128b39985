"""Subsystem supervision: retriable failures restart the subsystem inside its own
cancel scope with backoff; anything else ends the daemon (never half alive)."""

from __future__ import annotations

import itertools

import pytest
import trio
import trio.testing

from atlasd.hub import STABLE_SECONDS, UNHEALTHY_FAILURES, StatusHub
from atlasd.kube.errors import TransportError
from atlasd.supervise import supervise


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
        await nursery.start(supervise, "informers", hub, flaky)
        await fourth.wait()
        await trio.testing.wait_all_tasks_blocked()
        state = hub.snapshot()["subsystems"]["informers"]
        assert state == "running"
        nursery.cancel_scope.cancel()
    gaps = [b - a for a, b in itertools.pairwise(runs)]
    assert len(gaps) == 3
    # Exponential backoff with jitter: each wait at least the base delay, growing.
    assert gaps[0] >= 0.5 and gaps[1] >= 1.0 and gaps[2] >= 2.0


async def test_a_subsystem_that_keeps_failing_is_unhealthy_until_a_run_lasts(
    autojump_clock: trio.testing.MockClock,
) -> None:
    hub = StatusHub()
    runs = 0
    recovered = trio.Event()
    healthy_run = trio.Event()

    async def flaky(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        nonlocal runs
        runs += 1
        task_status.started()
        if runs <= UNHEALTHY_FAILURES:
            raise TransportError("the API server went away")
        healthy_run.set()
        await trio.sleep(STABLE_SECONDS + 1)
        recovered.set()
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        await nursery.start(supervise, "sources", hub, flaky)
        await healthy_run.wait()
        assert hub.unhealthy() == [f"sources failed {UNHEALTHY_FAILURES} times in a row"]
        await recovered.wait()
        assert hub.unhealthy() == [], "a run that lasted STABLE_SECONDS clears it"
        nursery.cancel_scope.cancel()


async def test_a_bug_propagates_and_ends_the_daemon() -> None:
    hub = StatusHub()

    async def buggy(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        raise ValueError("a bug, not an outage")

    with pytest.RaisesGroup(ValueError, flatten_subgroups=True):
        async with trio.open_nursery() as nursery:
            await nursery.start(supervise, "fleet", hub, buggy)
            await trio.sleep_forever()


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


def test_certificate_expiry_metric_drops_removed_certificates() -> None:
    from prometheus_client import REGISTRY
    from prometheus_client.parser import text_string_to_metric_families

    from atlasd.fleet.state import CertInfo
    from atlasd.metrics import KEYED, exposition
    from atlasd.report import FleetReport

    report = FleetReport(StatusHub())

    def exported(name: str) -> dict[str, float]:
        """What /metrics serves of ``name``."""
        out: dict[str, float] = {}
        for metric in text_string_to_metric_families(exposition(REGISTRY, KEYED).decode()):
            if metric.name == name:
                out.update({s.labels["name"]: s.value for s in metric.samples})
        return out

    report._export("east", (CertInfo("east/server", 100.0, 50.0),))
    report._export("west", (CertInfo("west/server", 200.0, 150.0),))
    assert exported("atlasd_certificate_expiry_timestamp_seconds") == {
        "east/server": 100.0,
        "west/server": 200.0,
    }
    assert exported("atlasd_certificate_renewal_timestamp_seconds")["east/server"] == 50.0
    report._export("east", ())
    report._export("west", (CertInfo("west/server", 300.0, 250.0),))
    assert exported("atlasd_certificate_expiry_timestamp_seconds") == {"west/server": 300.0}
    assert exported("atlasd_certificate_renewal_timestamp_seconds") == {"west/server": 250.0}
