"""The one backoff (client-go's ExponentialBackoffManager): watches reconnecting, the
daemon's supervisor restarting a subsystem, the zone writer's ConfigMap retries and the
namespace readiness check each keep one ``Backoff`` with their own numbers.

The delay starts at ``initial`` (0.8 s), doubles up to ``cap`` (30 s), and gets
``jitter`` x delay of random extra (the cap applies before the jitter, as in client-go,
so reconnecting clients stay spread out even at the cap). After ``reset_after`` (2 min) without a failure it
starts over from ``initial``. Time is trio time, so tests drive it with ``MockClock``.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

import trio


@dataclass
class Backoff:
    """Mutable backoff state of one reconnecting loop."""

    initial: float = 0.8
    cap: float = 30.0
    factor: float = 2.0
    jitter: float = 1.0
    reset_after: float = 120.0
    rand: Callable[[], float] = field(default=random.random, repr=False)
    # The un-jittered delay the next failure waits; None = start from ``initial``.
    _current: float | None = None
    # trio time of the last failure; -inf = never failed.
    _last_failure: float = float("-inf")

    def next_delay(self, now: float) -> float:
        """Record a failure at ``now`` and return how long to wait before retrying."""
        if self._current is None or now - self._last_failure >= self.reset_after:
            self._current = self.initial
        base = self._current
        self._current = min(self.cap, base * self.factor)
        self._last_failure = now
        return min(self.cap, base) * (1.0 + self.jitter * self.rand())

    def reset(self) -> None:
        self._current = None
        self._last_failure = float("-inf")

    async def sleep(self, *, at_least: float = 0.0) -> float:
        """Sleep the next delay (but at least ``at_least``, e.g. a Retry-After)."""
        delay = max(at_least, self.next_delay(trio.current_time()))
        await trio.sleep(delay)
        return delay
