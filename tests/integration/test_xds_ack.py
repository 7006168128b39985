"""Real Envoys ACK what atlasd serves: the observability Envoy and two downstream Envoys
(which fetch through the observability Envoy's mTLS 10900), for SotW and for Delta."""

from __future__ import annotations

from typing import Any

import httpx2
import pytest
import trio

from atlasd import model
from tests.harness.net import free_port
from tests.unit.xds.world import xds_world

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
async def test_every_envoy_acks(envoy_factory: Any, delta: bool) -> None:
    # With a local Alertmanager, so 10903 and 11903 are configured too.
    am = [model.LocalAlertmanager("am0", "monitoring", free_port())]
    async with xds_world(envoy_factory, delta=delta, alertmanagers=am) as w:
        await w.start_ready("atlas")
        await w.start_ready("east", "west")
        kinds = {(s.node, s.kind) for s in w.cache.status()}
        want = "delta" if delta else "sotw"
        assert kinds == {("atlas", want), ("east", want), ("west", want)}
        for name, envoy in w.envoys.items():
            log = await trio.to_thread.run_sync(envoy.log_text)
            assert "deprecated" not in log.lower(), f"{name}: {log}"
            assert "rejected" not in log.lower(), f"{name}: {log}"
        for name in ("atlas", "east", "west"):
            listeners = await trio.to_thread.run_sync(
                lambda n=name: httpx2.get(f"{w.envoys[n].admin_url}/listeners", timeout=5).text
            )
            assert "alertmanager::" in listeners, f"{name}: {listeners}"
        assert all(s.last_nack is None for s in w.cache.status())
        # Metrics: three connected Envoys of this kind, pushes made, latencies observed.
        samples = {
            (sm.name, tuple(sorted(sm.labels.items()))): sm.value
            for metric in w.registry.collect()
            for sm in metric.samples
        }
        assert samples[("atlasd_xds_connected_envoys", (("kind", want),))] == 3
        assert samples[("atlasd_xds_pushes_total", (("type", "cds"),))] >= 3
        assert samples[("atlasd_xds_push_latency_seconds_count", (("type", "cds"),))] >= 3
