"""Two atlasd instances contend for a real Lease: one leads, handover, the loser never writes."""

from __future__ import annotations

import pytest
import trio

from atlasd.kube.client import KubeClient
from atlasd.kube.config import load_config
from atlasd.kube.lease import LeaseTimings, record_from_lease, run_leader_election
from atlasd.kube.resources import LEASES
from tests.harness.kube import ApiServer
from tests.harness.wait import wait_until_async

pytestmark = pytest.mark.integration

TIMINGS = LeaseTimings(lease_duration=6.0, renew_deadline=4.0, retry_period=1.0)


class Instance:
    """One atlasd replica: its own client; guarded work writes a ConfigMap as itself."""

    def __init__(
        self,
        apiserver: ApiServer,
        namespace: str,
        identity: str,
        writes: list[tuple[float, str]],
        leading: list[str],
    ) -> None:
        self.config = load_config(str(apiserver.admin_kubeconfig))
        self.namespace = namespace
        self.identity = identity
        self.writes = writes
        self.leading = leading
        self.scope = trio.CancelScope()
        self.led_at: float | None = None

    async def guarded(self, kube: KubeClient) -> None:
        assert not self.leading, f"{self.identity} leads while {self.leading} does"
        self.leading.append(self.identity)
        self.led_at = trio.current_time()
        try:
            n = 0
            while True:
                n += 1
                await kube.apply(
                    {
                        "apiVersion": "v1",
                        "kind": "ConfigMap",
                        "metadata": {"name": "written-by-leader", "namespace": self.namespace},
                        "data": {"holder": self.identity, "n": str(n)},
                    }
                )
                self.writes.append((trio.current_time(), self.identity))
                await trio.sleep(0.1)
        finally:
            self.leading.remove(self.identity)

    async def run(self, *, release: bool) -> None:
        async with KubeClient(self.config) as kube:
            with self.scope:
                await run_leader_election(
                    kube,
                    name="atlasd-leader",
                    namespace=self.namespace,
                    identity=self.identity,
                    on_leading=lambda: self.guarded(kube),
                    timings=TIMINGS,
                    release_on_exit=release,
                )


async def _holder(apiserver: ApiServer, namespace: str) -> str:
    async with KubeClient(load_config(str(apiserver.admin_kubeconfig))) as kube:
        lease = await kube.get(LEASES, "atlasd-leader", namespace=namespace)
    return record_from_lease(lease).holder


async def test_one_leads_a_killed_leader_hands_over_and_the_loser_never_writes(
    apiserver: ApiServer, namespace: str
) -> None:
    writes: list[tuple[float, str]] = []
    leading: list[str] = []
    a = Instance(apiserver, namespace, "replica-a", writes, leading)
    b = Instance(apiserver, namespace, "replica-b", writes, leading)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: a.run(release=False))
        await wait_until_async(lambda: a.led_at is not None, timeout=30, what="a to lead")
        nursery.start_soon(lambda: b.run(release=False))
        await wait_until_async(lambda: len(writes) >= 30, timeout=30, what="a's writes")
        assert leading == ["replica-a"] and b.led_at is None
        assert {w for _, w in writes} == {"replica-a"}
        assert await _holder(apiserver, namespace) == "replica-a"

        killed = trio.current_time()
        a.scope.cancel()  # a crash: the lease is not released
        await wait_until_async(lambda: b.led_at is not None, timeout=30, what="b to lead")
        assert b.led_at is not None
        handover = b.led_at - killed
        assert handover <= TIMINGS.lease_duration + 2 * 1.2 * TIMINGS.retry_period + 2.0
        assert await _holder(apiserver, namespace) == "replica-b"
        await wait_until_async(
            lambda: sum(1 for _, w in writes if w == "replica-b") >= 3,
            timeout=30,
            what="b's writes",
        )
        last_a = max(t for t, w in writes if w == "replica-a")
        first_b = min(t for t, w in writes if w == "replica-b")
        assert last_a <= killed < first_b  # never two writers
        nursery.cancel_scope.cancel()


async def test_clean_shutdown_releases_the_lease(apiserver: ApiServer, namespace: str) -> None:
    writes: list[tuple[float, str]] = []
    leading: list[str] = []
    a = Instance(apiserver, namespace, "replica-a", writes, leading)
    b = Instance(apiserver, namespace, "replica-b", writes, leading)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: a.run(release=True))
        await wait_until_async(lambda: a.led_at is not None, timeout=30, what="a to lead")
        nursery.start_soon(lambda: b.run(release=True))
        await wait_until_async(lambda: len(writes) >= 5, timeout=30, what="a's writes")
        stopped = trio.current_time()
        a.scope.cancel()
        await wait_until_async(lambda: b.led_at is not None, timeout=30, what="b to lead")
        assert b.led_at is not None
        # Released: b need not wait for the lease to expire.
        assert b.led_at - stopped < 2 * 1.2 * TIMINGS.retry_period + 1.5
        b.scope.cancel()
        await wait_until_async(lambda: not leading, timeout=30, what="b to stop")
    assert await _holder(apiserver, namespace) == ""
