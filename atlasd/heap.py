"""Short garbage-collector pauses with a large, long-lived heap.

CPython's full (generation-2) collection walks every tracked object, and most of atlasd's
heap is long-lived state that grows with the fleet: the watch caches, fleet versions, xDS
snapshots. At 5,000 clusters one full collection stopped the event loop for 0.37-0.69 s,
and since allocation is what triggers collections, they fell on changes: each was the p99
of a change reaching Envoy.

So atlasd schedules its full collections itself. ``Heap.take_over()`` turns off the
full collections allocation would trigger (generation 2's threshold out of reach; the
young generations are collected as before), and ``Heap.settle()`` collects what is
garbage now and freezes the rest (``gc.freeze``: moved to a permanent generation no
collection walks), so each settle walks only what was made since the one before. The
daemon settles once it serves and every 10 s (what a full reconcile pass or an onboarding
burst leaves is settled within 10 s): a settle walks the last seconds' survivors, not
the fleet. A frozen object is
still freed when its last reference goes; only a cycle of frozen objects that dies waits,
for the next full settle (``gc.unfreeze`` first), at most ``full_seconds`` later: the one
long pause (the whole heap walked) then comes hourly on a timer, not with a change. A
cycle that holds memory outside Python's heap must not wait that long: trio's TLS streams
are such cycles, broken by ``release_tls`` wherever atlasd closes one.
Nothing in the Python ecosystem packages this; it is CPython's own ``gc`` API, used the
way large services (Instagram's, for one) use it.

Each settle also hands the C allocator's free pages back to the system (glibc's
``malloc_trim``; elsewhere nothing): onboarding a large fleet leaves much memory freed
(LIST pages, API responses) that the allocator would otherwise keep in the RSS.

``GcPauses`` is the evidence: a histogram of every collection's pause on ``/metrics``
(``atlasd_gc_pause_seconds``) by generation and cause (``allocation``: at any moment, a
change's included; ``settle``: a settle's own, on atlasd's schedule) and the longest of
each.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import REGISTRY, Collector, CollectorRegistry

log = logging.getLogger(__name__)

BUCKETS: tuple[float, ...] = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


CAUSES = ("allocation", "settle")
"""Why a collection ran: allocation crossed a threshold (any moment), or a settle did it."""


class GcPauses(Collector):
    """Times every collection through ``gc.callbacks``; a Prometheus collector.

    The callback only does arithmetic on preallocated lists: it may run inside any
    allocation, so it must neither take a lock (a metric's would deadlock if the
    collection started inside that metric's own update) nor allocate containers.
    Collections are told apart by cause: ``settling`` is set while a settle collects.
    """

    def __init__(self, buckets: Sequence[float] = BUCKETS) -> None:
        self.buckets = tuple(buckets)
        n = len(CAUSES) * 3
        # Per (cause, generation), at index cause * 3 + generation: cumulative count per
        # bucket (+Inf last), sum, max.
        self._counts = [[0] * (len(self.buckets) + 1) for _ in range(n)]
        self._sums = [0.0] * n
        self._maxes = [0.0] * n
        self._started = 0.0
        self._installed = False
        self.settling = False

    def install(self) -> None:
        if not self._installed:
            gc.callbacks.append(self._callback)
            self._installed = True

    def uninstall(self) -> None:
        if self._installed:
            gc.callbacks.remove(self._callback)
            self._installed = False

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        seconds = time.perf_counter() - self._started
        at = (3 if self.settling else 0) + info.get("generation", 2)
        counts = self._counts[at]
        for i, bound in enumerate(self.buckets):
            if seconds <= bound:
                counts[i] += 1
        counts[-1] += 1
        self._sums[at] += seconds
        if seconds > self._maxes[at]:
            self._maxes[at] = seconds

    def longest(self, generation: int = 2, cause: str = "allocation") -> float:
        return self._maxes[CAUSES.index(cause) * 3 + generation]

    def collect(self) -> Iterator[HistogramMetricFamily | GaugeMetricFamily]:
        hist = HistogramMetricFamily(
            "atlasd_gc_pause_seconds",
            "Garbage-collector pauses (the event loop stands still), by generation and "
            "cause (allocation: at any moment; settle: atlasd.heap's, on its schedule).",
            labels=["generation", "cause"],
        )
        longest = GaugeMetricFamily(
            "atlasd_gc_pause_max_seconds",
            "The longest garbage-collector pause since start, by generation and cause.",
            labels=["generation", "cause"],
        )
        bounds = [str(b) for b in self.buckets] + ["+Inf"]
        for c, cause in enumerate(CAUSES):
            for gen in range(3):
                at = c * 3 + gen
                labels = [str(gen), cause]
                cumulative = [(b, float(n)) for b, n in zip(bounds, self._counts[at], strict=True)]
                hist.add_metric(labels, cumulative, self._sums[at])
                longest.add_metric(labels, self._maxes[at])
        yield hist
        yield longest
        # No frozen-object gauge: gc.get_freeze_count() walks every frozen object (~25 ms
        # per 3 million), a pause on every scrape.


# Generation 2's threshold counts generation-1 collections: this many never come.
_NEVER = 2**30


def _malloc_trim() -> Callable[[], object] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return lambda: trim(0)


class Heap:
    """Settles the heap: collect, then freeze what survives (see the module's text)."""

    def __init__(
        self,
        *,
        full_seconds: float = 3600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.full_seconds = full_seconds
        self._clock = clock
        self._last_full: float | None = None
        self._trim = _malloc_trim()
        self._thresholds: tuple[int, int, int] | None = None
        self.settles = 0

    def take_over(self) -> None:
        """No full collection but a settle's from now on (the young ones go on)."""
        if self._thresholds is None:
            self._thresholds = gc.get_threshold()
            young, middle, _ = self._thresholds
            gc.set_threshold(young, middle, _NEVER)

    def release(self) -> None:
        """Full collections as CPython schedules them again."""
        if self._thresholds is not None:
            gc.set_threshold(*self._thresholds)
            self._thresholds = None

    def settle(self, reason: str) -> float:
        """Collect and freeze; a full settle (unfreeze first) every ``full_seconds``.

        Returns the seconds it took (the event loop stands still that long).
        """
        now = self._clock()
        full = self._last_full is None or now - self._last_full >= self.full_seconds
        started = time.perf_counter()
        if full:
            gc.unfreeze()
            self._last_full = now
        PAUSES.settling = True
        try:
            gc.collect()
        finally:
            PAUSES.settling = False
        gc.freeze()
        if self._trim is not None:
            self._trim()
        took = time.perf_counter() - started
        self.settles += 1
        if log.isEnabledFor(logging.DEBUG):  # counting the frozen objects walks them all
            log.debug(
                "heap settled (%s%s) in %.3fs: %d objects frozen",
                reason,
                ", full" if full else "",
                took,
                gc.get_freeze_count(),
            )
        return took


def release_tls(stream: object) -> None:
    """Let a closed trio ``SSLStream`` go as soon as nothing refers to it.

    trio's ``SSLStream`` refers to itself (trio 0.35: ``_handshook = _Once(self._do_handshake)``,
    a bound method), so a closed one is freed by the cycle collector only, and a settle
    freezes whatever lives: a TLS connection open at a settle and closed after it held its
    OpenSSL state and buffers until the hourly full settle. The API client's connections
    (idle past the pool's keep-alive, every one at an API server restart) grew the leader's
    C heap ~7 MB a minute at 2,000 clusters (glibc's in-use heap 38 -> 457 MiB in 58
    minutes, back to 104 MiB at the full settle; bench/README.md, issue 25). Closed, the
    stream needs its handshake no more: the reference is dropped. Reads trio's attributes;
    if they are renamed this does nothing (and tests/unit/test_heap.py fails)."""
    once = getattr(stream, "_handshook", None)
    if once is not None and hasattr(once, "_afn"):
        once._afn = None


PAUSES = GcPauses()
_registered: set[int] = set()


def export_pauses(registry: CollectorRegistry = REGISTRY) -> GcPauses:
    """Time collections and export them on ``registry`` (once per registry)."""
    PAUSES.install()
    if id(registry) not in _registered:
        registry.register(PAUSES)
        _registered.add(id(registry))
    return PAUSES
