"""The ADS load process reconnects as a real Envoy does, neither faster nor slower."""

from __future__ import annotations

import random

import pytest

from tests.harness import ads_load


@pytest.mark.parametrize(
    ("failures", "ceiling"),
    [(0, 0.5), (1, 1.0), (2, 2.0), (5, 16.0), (6, 30.0), (40, 30.0)],
)
def test_backoff_is_envoys_jittered_exponential(
    monkeypatch: pytest.MonkeyPatch, failures: int, ceiling: float
) -> None:
    # Envoy's gRPC mux: JitteredExponentialBackOffStrategy(500 ms, 30 s), next interval
    # doubled after each attempt, reset by a response; a wait is uniform below it.
    seen: list[tuple[float, float]] = []
    monkeypatch.setattr(random, "uniform", lambda a, b: seen.append((a, b)) or b)
    assert ads_load.backoff(failures) == ceiling
    assert seen == [(0, ceiling)]
