"""A keyed, coalescing work queue (client-go ``util/workqueue`` semantics).

Guarantees:
- a key is queued at most once (adding a queued key again is a no-op: bursts coalesce);
- a key is handed to at most one worker at a time: a key re-added while it is being
  processed is queued again only after ``done(key)``, so it is processed once more
  with the newest state;
- ``add_after`` delays an add; a key waiting already keeps the earlier of its two
  deadlines (client-go's delaying queue), so a key is in the delay heap at most once as
  far as ``get`` is concerned; ``add_rate_limited`` delays it by a per-key exponential
  backoff until ``forget(key)``.

State (all mutated only from trio tasks, no locks needed):
``_queue`` (FIFO of keys ready to hand out), ``_dirty`` (keys that need processing:
queued or waiting for their in-flight run to finish), ``_processing`` (keys handed out
and not yet ``done``), ``_delayed`` (heap of (deadline, seq, key); an entry counts only
while ``_waiting[key]`` equals its deadline), ``_waiting`` (key -> its earliest deadline).
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
from collections import deque
from collections.abc import Hashable
from typing import Generic, TypeVar

import trio

K = TypeVar("K", bound=Hashable)


class ShutDown(Exception):
    """``get`` on a queue that was shut down and drained."""


class WorkQueue(Generic[K]):
    def __init__(
        self, *, base_delay: float = 0.005, max_delay: float = 300.0, name: str = ""
    ) -> None:
        self.name = name
        self._queue: deque[K] = deque()
        self._dirty: set[K] = set()
        self._processing: set[K] = set()
        self._delayed: list[tuple[float, int, K]] = []
        self._waiting: dict[K, float] = {}
        self._seq = itertools.count()
        self._failures: dict[K, int] = {}
        self._base_delay = base_delay
        self._max_delay = max_delay
        # Getters waiting, each on its own Event (oldest first): a new key wakes one of
        # them, not all (16 workers would otherwise all wake for every key).
        self._getters: deque[trio.Event] = deque()
        self._shutting_down = False

    def __len__(self) -> int:
        return len(self._queue)

    @property
    def processing(self) -> frozenset[K]:
        return frozenset(self._processing)

    def add(self, key: K) -> None:
        if self._shutting_down or key in self._dirty:
            return
        self._dirty.add(key)
        if key in self._processing:
            return
        self._queue.append(key)
        self._wake_one()

    def _wake_one(self) -> None:
        while self._getters:
            ev = self._getters.popleft()
            if not ev.is_set():
                ev.set()
                return

    def _wake_all(self) -> None:
        while self._getters:
            self._getters.popleft().set()

    def add_after(self, key: K, delay: float) -> None:
        if self._shutting_down:
            return
        if delay <= 0:
            self.add(key)
            return
        deadline = trio.current_time() + delay
        current = self._waiting.get(key)
        if current is not None and current <= deadline:
            return
        self._waiting[key] = deadline
        heapq.heappush(self._delayed, (deadline, next(self._seq), key))
        # Keep stale entries from piling up when deadlines keep moving earlier.
        if len(self._delayed) > 2 * len(self._waiting) + 64:
            self._delayed = [e for e in self._delayed if self._waiting.get(e[2]) == e[0]]
            heapq.heapify(self._delayed)
        # A getter must re-arm its timer for the new earliest deadline.
        self._wake_one()

    def add_rate_limited(self, key: K) -> None:
        """Re-add ``key`` after its next per-key backoff delay (base x 2^failures)."""
        n = self._failures.get(key, 0)
        self._failures[key] = n + 1
        self.add_after(key, min(self._max_delay, self._base_delay * (2**n)))

    def forget(self, key: K) -> None:
        """Reset ``key``'s rate-limit backoff (it was processed successfully)."""
        self._failures.pop(key, None)

    def num_requeues(self, key: K) -> int:
        return self._failures.get(key, 0)

    def _promote_due(self) -> float:
        """Move due delayed keys to the queue; return the next deadline (inf if none)."""
        now = trio.current_time()
        while self._delayed and self._delayed[0][0] <= now:
            deadline, _, key = heapq.heappop(self._delayed)
            if self._waiting.get(key) != deadline:
                continue  # superseded by an earlier deadline, already promoted
            del self._waiting[key]
            self.add(key)
        while self._delayed and self._waiting.get(self._delayed[0][2]) != self._delayed[0][0]:
            heapq.heappop(self._delayed)
        return self._delayed[0][0] if self._delayed else float("inf")

    async def get(self) -> K:
        """Wait for a key and mark it processing; call ``done(key)`` when finished."""
        while True:
            deadline = self._promote_due()
            if self._queue:
                key = self._queue.popleft()
                self._processing.add(key)
                self._dirty.discard(key)
                return key
            if self._shutting_down:
                raise ShutDown(self.name)
            ev = trio.Event()
            self._getters.append(ev)
            returned = False
            try:
                with trio.move_on_at(deadline):
                    await ev.wait()
                returned = True
            finally:
                if not ev.is_set():
                    with contextlib.suppress(ValueError):
                        self._getters.remove(ev)
                elif not returned:
                    self._wake_one()  # cancelled after being woken: the key is someone's

    def done(self, key: K) -> None:
        self._processing.discard(key)
        if key in self._dirty:
            self._queue.append(key)
            self._wake_one()

    def shut_down(self) -> None:
        """Stop accepting adds; ``get`` raises ShutDown once the queue is drained."""
        self._shutting_down = True
        self._delayed.clear()
        self._waiting.clear()
        self._wake_all()

    def drain_ready(self) -> list[K]:
        """Take every ready key at once (marking them processing): one batched pass."""
        self._promote_due()
        keys = list(self._queue)
        self._queue.clear()
        for key in keys:
            self._processing.add(key)
            self._dirty.discard(key)
        return keys
