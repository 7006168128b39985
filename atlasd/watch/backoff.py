"""The one backoff (client-go's ExponentialBackoffManager): watches reconnecting, the
daemon's supervisor restarting a subsystem, the zone writer's ConfigMap retries and the
namespace readiness check each keep one ``Backoff`` with their own numbers.

The delay starts at ``initial`` (0.8 s), doubles up to ``cap`` (30 s), and gets
``jitter`` x delay of random extra (the cap applies before the jitter, as in client-go,
so reconnecting clients stay spread out even at the cap). After ``reset_after`` (2 min) without a failure it
starts over from ``initial``. Time is trio time, so tests drive it with ``MockClock``.

The work queue's per-key retries (``WorkQueue.add_rate_limited``, client-go's
``ItemExponentialFailureRateLimiter``) take their delays from a ``Backoff`` too, through
``delay_for(failures)``: the same curve, counted per key by the queue instead of per loop.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

import trio


def exponential(failures: int, *, initial: float, factor: float, cap: float) -> float:
    """``initial`` x ``factor``^``failures``, at most ``cap`` (no overflow however many)."""
    delay = initial
    for _ in range(failures):
        if delay >= cap:
            break
        delay *= factor
    return min(cap, delay)


@dataclass
class Backoff:
    """Mutable backoff state of one reconnecting loop."""

    initial: float = 0.8
    cap: float = 30.0
    factor: float = 2.0
    jitter: float = 1.0
    reset_after: float = 120.0
    rand: Callable[[], float] = field(default=random.random, repr=False)
    # Failures since the last reset (the next delay is ``delay_for(_failures)``).
    _failures: int = 0
    # trio time of the last failure; -inf = never failed.
    _last_failure: float = float("-inf")

    def delay_for(self, failures: int) -> float:
        """The delay after ``failures`` earlier failures: ``initial`` x ``factor``^failures,
        at most ``cap``, plus the jitter."""
        return exponential(failures, initial=self.initial, factor=self.factor, cap=self.cap) * (
            1.0 + self.jitter * self.rand()
        )

    def next_delay(self, now: float) -> float:
        """Record a failure at ``now`` and return how long to wait before retrying."""
        if now - self._last_failure >= self.reset_after:
            self._failures = 0
        delay = self.delay_for(self._failures)
        self._failures += 1
        self._last_failure = now
        return delay

    def reset(self) -> None:
        self._failures = 0
        self._last_failure = float("-inf")

    async def sleep(self, *, at_least: float = 0.0) -> float:
        """Sleep the next delay (but at least ``at_least``, e.g. a Retry-After)."""
        delay = max(at_least, self.next_delay(trio.current_time()))
        await trio.sleep(delay)
        return delay
