"""The original Atlas's lock keeps atlasd from leading: client-go's expiry rule (mock clock)."""

from __future__ import annotations

import json
from typing import Any

import pytest
import trio
import trio.testing

from atlasd.kube.lease import GATE_INTERVAL, LeaseTimings, run_leader_election
from atlasd.kube.legacy_lock import LEADER_ANNOTATION, LeadershipGate, configmap_record
from tests.unit.fakekube import FakeKube
from tests.unit.kube.test_lease import holder, lease


def _record(holder: str, renew: str, duration: int = 45) -> str:
    # As client-go writes it (metav1.Time: RFC 3339, seconds).
    return json.dumps(
        {
            "holderIdentity": holder,
            "leaseDurationSeconds": duration,
            "acquireTime": "2021-03-01T10:00:00Z",
            "renewTime": renew,
            "leaderTransitions": 0,
        }
    )


def hold(kube: FakeKube, name: str, holder: str, renew: str, duration: int = 45) -> None:
    """The original holds (or renews) its ConfigMap lock ``name``."""
    kube.put(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {
                "name": name,
                "annotations": {LEADER_ANNOTATION: _record(holder, renew, duration)},
            },
        }
    )


def _gate(kube: FakeKube, **kw: Any) -> tuple[LeadershipGate, list[Any]]:
    changes: list[Any] = []
    gate = LeadershipGate(
        kube,
        namespace="monitoring",
        identity="atlasd-0",
        own_lease="atlasd",
        on_change=changes.append,
        **kw,
    )
    return gate, changes


def test_configmap_record_parses_client_gos_annotation() -> None:
    cm = {"metadata": {"annotations": {LEADER_ANNOTATION: _record("atlas-7d9f", "x", 45)}}}
    parsed = configmap_record(cm)
    assert parsed is not None
    assert parsed[1].holder == "atlas-7d9f" and parsed[1].lease_duration_seconds == 45
    assert configmap_record({"metadata": {}}) is None
    with pytest.raises(ValueError, match="not JSON"):
        configmap_record({"metadata": {"annotations": {LEADER_ANNOTATION: "{"}}})


async def test_a_renewing_holder_blocks_and_a_stopped_one_expires_after_the_lease(
    autojump_clock: trio.testing.MockClock,
) -> None:
    kube = FakeKube()
    hold(kube, "atlas", "atlas-controller-5c6", "2021-03-01T10:00:00Z")
    gate, changes = _gate(kube)
    start = trio.current_time()
    # It renews every 2 s for a minute: blocked the whole time, reported once.
    last_change = start
    for i in range(30):
        hold(kube, "atlas", "atlas-controller-5c6", f"2021-03-01T10:00:{i:02d}Z")
        last_change = trio.current_time()
        assert await gate() is not None
        await trio.sleep(2)
    assert len(changes) == 1
    assert changes[0]["blocked_by"] == "ConfigMap monitoring/atlas"
    assert changes[0]["holder"] == "atlas-controller-5c6"
    # It stops renewing: still blocked until 45 s after the last change we saw.
    while await gate() is not None:  # noqa: ASYNC110 - polls the gate under mock time
        await trio.sleep(1)
    waited = trio.current_time() - last_change
    assert 45 <= waited <= 46, waited
    assert trio.current_time() - start > 60
    assert changes[-1] == {"blocked_by": None, "holder": None, "reason": None}


async def test_renew_time_is_never_compared_with_our_clock(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # A renewTime from years ago, but the record keeps changing: a live holder.
    kube = FakeKube()
    gate, _ = _gate(kube)
    for i in range(40):
        hold(kube, "atlas", "old-clock", f"2001-01-01T00:00:{i:02d}Z")
        assert await gate() is not None
        await trio.sleep(2)


async def test_released_and_missing_locks_and_our_own_identity_do_not_block(
    autojump_clock: trio.testing.MockClock,
) -> None:
    kube = FakeKube()
    gate, changes = _gate(kube)
    assert await gate() is None  # no ConfigMap, no Lease
    hold(kube, "atlas", "", "2021-03-01T10:00:00Z", duration=1)  # ReleaseOnCancel
    assert await gate() is None
    hold(kube, "atlas", "atlasd-0", "2021-03-01T10:00:00Z")  # this pod's previous life
    assert await gate() is None
    kube.put(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "atlas", "annotations": {LEADER_ANNOTATION: "garbage"}},
        }
    )
    assert await gate() is None
    assert changes == [{"blocked_by": None, "holder": None, "reason": None}]


async def test_a_lease_lock_of_the_same_name_blocks_too(
    autojump_clock: trio.testing.MockClock,
) -> None:
    kube = FakeKube()
    kube.put(
        {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": "atlas"},
            "spec": {"holderIdentity": "atlas-controller-1", "leaseDurationSeconds": 45},
        }
    )
    gate, _ = _gate(kube)
    reason = await gate()
    assert reason is not None and "Lease monitoring/atlas" in reason
    # atlasd's own Lease name is never treated as a legacy lock.
    gate2, _ = _gate(kube, legacy_locks=("atlasd",))
    await gate2()
    assert "Lease/atlasd" not in kube.gets


async def test_rbac_blocks_with_a_reason_and_a_passing_failure_keeps_the_verdict(
    autojump_clock: trio.testing.MockClock,
) -> None:
    kube = FakeKube()
    kube.forbidden.add("ConfigMap")
    gate, _ = _gate(kube)
    reason = await gate()
    assert reason is not None and "Forbidden" in reason and "--legacy-locks" in reason
    kube.forbidden.clear()
    hold(kube, "atlas", "atlas-controller-1", "t0")
    assert await gate() is not None
    kube.down = True  # TransportError from now on: keep "blocked"
    assert await gate() is not None
    kube.down = False
    del kube.objects[("configmaps", "atlas")]
    assert await gate() is None
    kube.down = True  # and keep "not blocked"
    assert await gate() is None


async def test_first_read_failing_blocks() -> None:
    kube = FakeKube()
    kube.down = True
    gate, _ = _gate(kube)
    reason = await gate()
    assert reason is not None and "cannot read" in reason


async def test_serve_only_never_reads_a_lock() -> None:
    kube = FakeKube()
    gate, changes = _gate(kube, serve_only=True)
    assert "envoy-ads" in (await gate() or "")
    assert kube.gets == [] and changes[0]["blocked_by"] == "serve-only"


async def test_election_waits_for_the_original_then_steps_down_when_it_returns(
    autojump_clock: trio.testing.MockClock,
) -> None:
    kube = FakeKube()
    hold(kube, "atlas", "original", "t0")
    gate, _ = _gate(kube)
    leading: list[tuple[float, bool]] = []

    async def on_leading() -> None:
        leading.append((trio.current_time(), True))
        try:
            await trio.sleep_forever()
        finally:
            leading.append((trio.current_time(), False))

    timings = LeaseTimings(lease_duration=15.0, renew_deadline=10.0, retry_period=2.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(
            lambda task_status: run_leader_election(
                kube,  # type: ignore[arg-type]
                name="atlasd",
                namespace="monitoring",
                identity="atlasd-0",
                on_leading=on_leading,
                timings=timings,
                gate=gate,
                task_status=task_status,
            )
        )
        t0 = trio.current_time()
        await trio.sleep(30)
        assert leading == [] and lease(kube, "atlasd") is None  # never touched its own Lease
        await trio.sleep(20)  # the record has not changed for 45 s: expired
        assert leading and leading[0][1] and 45 <= leading[0][0] - t0 <= 50
        assert holder(kube, "atlasd") == "atlasd-0"
        # The original comes back and takes its lock: atlasd stops its work and
        # releases its Lease when it next looks at the lock (every GATE_INTERVAL).
        hold(kube, "atlas", "original-2", "t1")
        returned = trio.current_time()
        await trio.sleep(GATE_INTERVAL + 5)
        assert leading[-1][1] is False
        assert leading[-1][0] - returned <= GATE_INTERVAL + timings.retry_period + 0.5
        assert holder(kube, "atlasd") == ""
        nursery.cancel_scope.cancel()
