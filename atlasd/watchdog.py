"""The event loop's watchdog: how late the loop answers, and what held it when it is late.

Everything atlasd serves runs on one Trio event loop, so one step that computes too long
(encoding a large document, transforming a relist, a queue drained without a checkpoint)
delays every Envoy push, every write and every scrape behind it. Such steps were found so
far by a throwaway profiler run under a benchmark; this module keeps that instrument in the
product, cheap enough to stay on:

- a thread of its own posts a callback to the loop every ``interval`` s
  (``TrioToken.run_sync_soon``) and measures how long the loop takes to run it: the loop's
  *lag*, ``atlasd_event_loop_lag_seconds`` (a histogram; the longest since start,
  ``atlasd_event_loop_lag_max_seconds``);
- when the callback has not run after ``threshold`` s, the thread reads the loop thread's
  stack (``sys._current_frames``): the code holding the loop at that moment. Once the loop
  answers, the stall is counted (``atlasd_event_loop_stalls_total``), published as the
  status document's ``loop`` part and logged at WARNING naming where the loop was held (at
  most one line per ``log_every`` s; the ones in between are counted in the next line).

A stall has two usual causes: a step that holds the loop (the stack names it), or a machine
too busy to run the process (the stack is then wherever the loop happened to be; the load
average says which). A C call that holds the GIL (a large collection, ``atlasd.heap``'s own
pauses are on ``atlasd_gc_pause_seconds``) keeps this thread from sampling until it ends:
the stall is still measured, and its sample is marked late.

The thread only reads clocks, frames and its own fields; everything it tells the loop goes
through ``run_sync_soon`` (the status hub is the loop's). Its cost: ``1 / interval``
wake-ups of the loop a second (~10 at the default, a few microseconds each).
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType

import trio

from atlasd import metrics

log = logging.getLogger(__name__)

DEFAULT_THRESHOLD = 0.1
"""Seconds of lag counted as a stall (``atlasd run --stall-threshold``)."""

DEFAULT_INTERVAL = 0.1
"""Seconds between two callbacks posted to the loop."""

# How many of atlasd's own frames a stall's ``where`` names (innermost first).
_OWN_FRAMES = 6


@dataclass(frozen=True)
class Stall:
    """One stall: the loop answered ``held`` s after the callback was posted; ``where`` is
    the loop thread's stack when the lag passed the threshold (``sampled`` s after the post:
    much later than the threshold when a C call held the GIL)."""

    at: float  # wall-clock time the stall ended
    held: float
    sampled: float
    where: str


class LoopWatchdog:
    """The watchdog of the event loop whose token it is given; ``start``/``stop`` its
    thread. Invariants: ``stalls`` counts every stall since start and ``last`` is the latest
    (both written by the thread only, read by anyone); ``on_stall`` runs in the loop."""

    def __init__(
        self,
        token: trio.lowlevel.TrioToken,
        *,
        threshold: float = DEFAULT_THRESHOLD,
        interval: float = DEFAULT_INTERVAL,
        log_every: float = 10.0,
        on_stall: Callable[[Stall, int], None] | None = None,
    ) -> None:
        self._token = token
        self._threshold = threshold
        self._interval = interval
        self._log_every = log_every
        self._on_stall = on_stall
        self._loop_thread = threading.get_ident()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.stalls = 0
        self.last: Stall | None = None
        self._longest = 0.0
        # Stalls not logged yet (rate limit) and the longest of them.
        self._unlogged = 0
        self._unlogged_longest = 0.0
        self._logged_at = -float("inf")

    def start(self) -> None:
        """Start the thread; call it from the loop's own thread."""
        self._loop_thread = threading.get_ident()
        self._thread = threading.Thread(
            target=self._watch, name="atlasd-loop-watchdog", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2 * self._interval + 1.0)
            self._thread = None

    def _watch(self) -> None:
        while not self._stop.wait(self._interval):
            answered = threading.Event()
            posted = time.monotonic()
            try:
                self._token.run_sync_soon(answered.set)
            except trio.RunFinishedError:
                return
            if answered.wait(self._threshold):
                self._observe(time.monotonic() - posted)
                continue
            sampled = time.monotonic() - posted
            where = self._where()
            while not answered.wait(self._interval):
                if self._stop.is_set():
                    return
            held = time.monotonic() - posted
            self._observe(held)
            self._stalled(Stall(at=time.time(), held=held, sampled=sampled, where=where))

    def _observe(self, lag: float) -> None:
        metrics.LOOP_LAG.observe(lag)
        if lag > self._longest:
            self._longest = lag
            metrics.LOOP_LAG_MAX.set(lag)

    def _where(self) -> str:
        frame = sys._current_frames().get(self._loop_thread)
        return "(the loop thread is gone)" if frame is None else describe_stack(frame)

    def _stalled(self, stall: Stall) -> None:
        self.stalls += 1
        self.last = stall
        metrics.LOOP_STALLS.inc()
        self._unlogged += 1
        self._unlogged_longest = max(self._unlogged_longest, stall.held)
        now = time.monotonic()
        if now - self._logged_at >= self._log_every:
            late = (
                f" (sampled at {stall.sampled * 1000:.0f} ms: the GIL was held)"
                if stall.sampled > 2 * self._threshold
                else ""
            )
            more = (
                f"; {self._unlogged - 1} more since the last warning, the longest "
                f"{self._unlogged_longest * 1000:.0f} ms"
                if self._unlogged > 1
                else ""
            )
            log.warning(
                "the event loop was held for %.0f ms (over %.0f ms); it was in: %s%s%s",
                stall.held * 1000,
                self._threshold * 1000,
                stall.where,
                late,
                more,
            )
            self._logged_at = now
            self._unlogged = 0
            self._unlogged_longest = 0.0
        if self._on_stall is not None:
            with contextlib.suppress(trio.RunFinishedError):
                self._token.run_sync_soon(self._on_stall, stall, self.stalls)


def describe_stack(frame: FrameType) -> str:
    """A stack in one line: its innermost frame, then atlasd's own frames innermost first
    (``file:line function``, paths from the package), e.g. ``yaml/representer.py:33
    represent_data < atlasd/reconcile/objects.py:90 dump_yaml < ...``."""
    frames = traceback.StackSummary.extract(traceback.walk_stack(frame), lookup_lines=False)
    if not frames:
        return "(no frame)"
    shown = [frames[0]]
    shown += [f for f in frames[1:] if _own(f.filename)][:_OWN_FRAMES]
    return " < ".join(f"{_short(f.filename)}:{f.lineno} {f.name}" for f in shown)


def _own(filename: str) -> bool:
    return "/atlasd/" in filename.replace("\\", "/")


def _short(filename: str) -> str:
    # The path from the package on: atlasd/..., or a library's (site-packages/yaml/...).
    path = filename.replace("\\", "/")
    for marker in ("/site-packages/", "/dist-packages/", "/lib/python"):
        if marker in path:
            path = path.rsplit(marker, 1)[1]
            return path.split("/", 1)[1] if marker == "/lib/python" and "/" in path else path
    if "/atlasd/" in path:
        return "atlasd/" + path.rsplit("/atlasd/", 1)[1]
    return path.rsplit("/", 1)[-1]
