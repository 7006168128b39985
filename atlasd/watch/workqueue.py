"""A keyed, coalescing work queue (client-go ``util/workqueue`` semantics).

Guarantees:
- a key is queued at most once (adding a queued key again is a no-op: bursts coalesce);
- a key is handed to at most one worker at a time: a key re-added while it is being
  processed is queued again only after ``done(key)``, so it is processed once more
  with the newest state;
- ``add_after`` delays an add; a key waiting already keeps the earlier of its two
  deadlines (client-go's delaying queue), so a key is in the delay heap at most once as
  far as ``get`` is concerned; ``add_rate_limited`` delays it by a per-key exponential
  backoff (``atlasd.watch.backoff``: the one backoff curve, counted per key) until
  ``forget(key)``.

A named queue exports client-go's workqueue metrics with client-go's meanings (label
``name``; ``atlasd.metrics``): ``workqueue_adds_total`` counts adds that made a key wait
(not the coalesced ones), ``workqueue_depth`` the keys waiting (a key re-added while a
worker has it included), ``workqueue_queue_duration_seconds`` the time from such an add to
the ``get`` that hands the key out, ``workqueue_work_duration_seconds`` the time from that
``get`` to ``done``, ``workqueue_retries_total`` every delayed add (``add_after``,
``add_rate_limited``), and ``workqueue_unfinished_work_seconds`` /
``workqueue_longest_running_processor_seconds`` the work handed out and not done yet. An
unnamed queue (tests) exports nothing. The per-operation cost is a counter increment, a
histogram observation and a clock read; the gauges are computed when /metrics is read.

Logging: ``get`` binds the key it hands out to the calling task's log lines (field ``key``,
``atlasd.logs``) until that task calls ``done(key)`` or takes several keys at once
(``drain_ready``), so a worker's lines name the key it works on without passing it along.

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
import time
import weakref
from collections import deque
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

import trio

from atlasd import logs
from atlasd.metrics import (
    WORKQUEUE_ADDS,
    WORKQUEUE_DEPTH,
    WORKQUEUE_LONGEST_SECONDS,
    WORKQUEUE_QUEUE_SECONDS,
    WORKQUEUE_RETRIES,
    WORKQUEUE_UNFINISHED_SECONDS,
    WORKQUEUE_WORK_SECONDS,
)
from atlasd.watch.backoff import Backoff

K = TypeVar("K", bound=Hashable)


class ShutDown(Exception):
    """``get`` on a queue that was shut down and drained."""


class _Metrics(Generic[K]):
    """client-go's ``defaultQueueMetrics`` for one named queue.

    Written only from trio tasks; the gauges' functions run in the thread /metrics is
    formatted in (``atlasd.http``), so they read the queue's state with one C call each
    (``len(set)``, ``list(dict.values())``: atomic under the GIL, never a dict seen
    mid-change).
    """

    def __init__(self, queue: WorkQueue[K], clock: Callable[[], float]) -> None:
        name = queue.name
        self.clock = clock
        self._adds = WORKQUEUE_ADDS.labels(name)
        self._retries = WORKQUEUE_RETRIES.labels(name)
        self._latency = WORKQUEUE_QUEUE_SECONDS.labels(name)
        self._work = WORKQUEUE_WORK_SECONDS.labels(name)
        # key -> clock at the add that made it wait (dropped when it is handed out).
        self._added_at: dict[K, float] = {}
        # key -> clock when it was handed out (dropped at done).
        self._started_at: dict[K, float] = {}
        # The newest queue of a name is the one its gauges read (a leader's reconcile queue
        # is made anew each term); a queue that is gone reads as empty.
        queue_ref = weakref.ref(queue)
        self_ref = weakref.ref(self)
        WORKQUEUE_DEPTH.labels(name).set_function(lambda: _depth(queue_ref()))
        WORKQUEUE_UNFINISHED_SECONDS.labels(name).set_function(
            lambda: _unfinished(self_ref(), longest=False)
        )
        WORKQUEUE_LONGEST_SECONDS.labels(name).set_function(
            lambda: _unfinished(self_ref(), longest=True)
        )

    def add(self, key: K) -> None:
        self._adds.inc()
        self._added_at.setdefault(key, self.clock())

    def get(self, key: K) -> None:
        now = self.clock()
        self._started_at[key] = now
        added = self._added_at.pop(key, None)
        if added is not None:
            self._latency.observe(now - added)

    def done(self, key: K) -> None:
        started = self._started_at.pop(key, None)
        if started is not None:
            self._work.observe(self.clock() - started)

    def retry(self) -> None:
        self._retries.inc()

    def unfinished(self) -> tuple[float, float]:
        """(seconds of work handed out and not done, the oldest such work's seconds)."""
        starts = list(self._started_at.values())
        if not starts:
            return 0.0, 0.0
        now = self.clock()
        return sum(now - t for t in starts), now - min(starts)


def _depth(queue: WorkQueue[K] | None) -> float:
    # client-go's depth: +1 by an add that makes a key wait, -1 by the get handing it out.
    return 0.0 if queue is None else float(len(queue._dirty))


def _unfinished(m: _Metrics[K] | None, *, longest: bool) -> float:
    if m is None:
        return 0.0
    total, oldest = m.unfinished()
    return oldest if longest else total


class WorkQueue(Generic[K]):
    def __init__(
        self,
        *,
        base_delay: float = 0.005,
        max_delay: float = 300.0,
        name: str = "",
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        """``base_delay`` and ``max_delay``: the per-key retry backoff; ``name``: the
        metrics' label (none without it); ``clock``: the metrics' clock (seconds)."""
        self.name = name
        self._queue: deque[K] = deque()
        self._dirty: set[K] = set()
        self._processing: set[K] = set()
        self._delayed: list[tuple[float, int, K]] = []
        self._waiting: dict[K, float] = {}
        self._seq = itertools.count()
        # key -> failures since its last ``forget``; its next retry waits
        # ``_backoff.delay_for(failures)`` (client-go: no jitter, no reset by time).
        self._failures: dict[K, int] = {}
        self._backoff = Backoff(
            initial=base_delay, cap=max_delay, jitter=0.0, reset_after=float("inf")
        )
        # Getters waiting, each on its own Event (oldest first): a new key wakes one of
        # them, not all (16 workers would otherwise all wake for every key).
        self._getters: deque[trio.Event] = deque()
        self._shutting_down = False
        self._metrics: _Metrics[K] | None = _Metrics(self, clock) if name else None

    def __len__(self) -> int:
        return len(self._queue)

    @property
    def processing(self) -> frozenset[K]:
        return frozenset(self._processing)

    def add(self, key: K) -> None:
        if self._shutting_down or key in self._dirty:
            return
        if self._metrics is not None:
            self._metrics.add(key)
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
        if self._metrics is not None:
            self._metrics.retry()
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
        self.add_after(key, self._backoff.delay_for(n))

    def forget(self, key: K) -> None:
        """Reset ``key``'s rate-limit backoff (it was processed successfully)."""
        self._failures.pop(key, None)

    def num_requeues(self, key: K) -> int:
        return self._failures.get(key, 0)

    @property
    def retrying(self) -> int:
        """Keys re-added after a failure (``add_rate_limited``) and not forgotten since."""
        return len(self._failures)

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
        """Wait for a key and mark it processing; call ``done(key)`` when finished.

        Always a checkpoint (as Trio's own ``receive`` is), also when a key is ready: a
        worker whose keys need no I/O (in sync) would otherwise run through the whole
        queue in one step and hold the event loop (~0.3 s at 5,000 keys)."""
        await trio.lowlevel.checkpoint()
        while True:
            deadline = self._promote_due()
            if self._queue:
                key = self._queue.popleft()
                self._hand_out(key)
                logs.bind(key=key)
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

    def _hand_out(self, key: K) -> None:
        self._processing.add(key)
        self._dirty.discard(key)
        if self._metrics is not None:
            self._metrics.get(key)

    def done(self, key: K) -> None:
        if key not in self._processing:
            return
        self._processing.discard(key)
        if self._metrics is not None:
            self._metrics.done(key)
        if logs.bound_fields().get("key") == key:
            logs.bind(key=None)
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
            self._hand_out(key)
        if keys:
            logs.bind(key=None)  # the task holds several keys: its lines name none
        return keys
