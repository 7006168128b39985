"""The event loop's watchdog: how long the loop runs without looking at I/O, and what held
it when that is too long.

Everything atlasd serves runs on one Trio event loop, so one step that computes too long
(encoding a large document, transforming a relist, a queue drained without a checkpoint)
delays every Envoy push, every write and every scrape behind it. Such steps were found so
far by a throwaway profiler run under a benchmark; this module keeps that instrument in the
product, cheap enough to stay on:

- a Trio instrument times each *batch*: the time from the loop's return from its I/O wait
  to its next one, in which it runs every task that was ready (a change, push or scrape
  that becomes ready meanwhile waits for the batch to end): ``atlasd_event_loop_busy_seconds``
  (a histogram; the longest since start, ``atlasd_event_loop_busy_max_seconds``). It uses
  only the two I/O-wait hooks, not the per-step ones: its cost grows with batches, not
  with tasks;
- a thread of its own looks every ``interval`` s at the batch in progress; once one has run
  for ``threshold`` s it reads the loop thread's stack (``sys._current_frames``): the code
  holding the loop at that moment. When the batch ends, the stall is counted
  (``atlasd_event_loop_stalls_total``), published as the status document's ``loop`` part
  and logged at WARNING naming where the loop was held (at most one line per
  ``log_every`` s; the ones in between are counted in the next line).

An idle loop is not woken: the thread only reads two fields (~10 wake-ups a second of a
thread that finds nothing to do). A stall has two usual causes: a step that holds the loop
(the stack names it) or many ready tasks at once, or a machine too busy to run the process
(the stack is then wherever the loop happened to be; the load average says which). A C call
that holds the GIL (a large collection: ``atlasd.heap``'s pauses are on
``atlasd_gc_pause_seconds``) keeps the thread from sampling until it ends: the stall is
still timed, its sample is marked late.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType
from typing import ClassVar

import trio

from atlasd import metrics

log = logging.getLogger(__name__)

DEFAULT_THRESHOLD = 0.1
"""Seconds of one batch counted as a stall (``atlasd run --stall-threshold``)."""

DEFAULT_INTERVAL = 0.1
"""Seconds between two looks of the watchdog thread at the batch in progress."""

# How many of atlasd's own frames a stall's ``where`` names (innermost first).
_OWN_FRAMES = 6


@dataclass(frozen=True)
class Stall:
    """One stall: a batch of ``held`` s; ``where`` is the loop thread's stack when the
    batch had run ``sampled`` s (much later than the threshold when a C call held the GIL;
    None when the thread did not look while it ran)."""

    at: float  # wall-clock time the stall ended
    held: float
    sampled: float | None
    where: str | None


class LoopWatchdog(trio.abc.Instrument):
    """The watchdog of the event loop it is started in (``start``/``stop``, both from the
    loop's thread). Invariants: ``_batch`` is when the batch in progress began (None while
    the loop waits for I/O), written by the loop's hooks only; ``_sample`` is the thread's
    look at one batch (its start, the stack, when), written by the thread only; ``stalls``
    and ``last`` are written in the loop (``on_stall`` runs there too)."""

    # The longest batch of the process, as ``atlasd_event_loop_busy_max_seconds`` says:
    # one for every watchdog, so one restarted by its supervisor goes on from it.
    longest: ClassVar[float] = 0.0

    def __init__(
        self,
        *,
        threshold: float = DEFAULT_THRESHOLD,
        interval: float = DEFAULT_INTERVAL,
        log_every: float = 10.0,
        on_stall: Callable[[Stall, int], None] | None = None,
    ) -> None:
        self._threshold = threshold
        self._interval = interval
        self._log_every = log_every
        self._on_stall = on_stall
        self._token: trio.lowlevel.TrioToken | None = None
        self._loop_thread = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._batch: float | None = None
        self._sample: tuple[float, str, float] | None = None
        self.stalls = 0
        self.last: Stall | None = None
        # Stalls not logged yet (rate limit) and the longest of them.
        self._unlogged = 0
        self._unlogged_longest = 0.0
        self._logged_at = -float("inf")

    # -- the loop's side ---------------------------------------------------------------------

    def start(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._loop_thread = threading.get_ident()
        trio.lowlevel.add_instrument(self)
        self._thread = threading.Thread(
            target=self._watch, name="atlasd-loop-watchdog", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        trio.lowlevel.remove_instrument(self)
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2 * self._interval + 1.0)
            self._thread = None

    def after_io_wait(self, timeout: float) -> None:
        self._batch = time.perf_counter()

    def before_io_wait(self, timeout: float) -> None:
        began = self._batch
        if began is None:
            return
        self._batch = None
        held = time.perf_counter() - began
        metrics.LOOP_BUSY.observe(held)
        if held > LoopWatchdog.longest:
            LoopWatchdog.longest = held
            metrics.LOOP_BUSY_MAX.set(held)
        if held >= self._threshold and self._token is not None:
            # Reported outside the hook (it runs inside Trio's scheduler).
            self._token.run_sync_soon(self._stalled, began, held)

    def _stalled(self, began: float, held: float) -> None:
        sample = self._sample
        sampled, where = (sample[2], sample[1]) if sample and sample[0] == began else (None, None)
        stall = Stall(at=time.time(), held=held, sampled=sampled, where=where)
        self.stalls += 1
        self.last = stall
        metrics.LOOP_STALLS.inc()
        self._unlogged += 1
        self._unlogged_longest = max(self._unlogged_longest, held)
        now = time.monotonic()
        if now - self._logged_at >= self._log_every:
            self._log(stall)
            self._logged_at = now
            self._unlogged = 0
            self._unlogged_longest = 0.0
        if self._on_stall is not None:
            self._on_stall(stall, self.stalls)

    def _log(self, stall: Stall) -> None:
        if stall.where is None:
            at = "(not sampled: the watchdog's thread did not look while it lasted)"
        elif stall.sampled is not None and stall.sampled > 2 * self._threshold:
            at = f"{stall.where} (sampled at {stall.sampled * 1000:.0f} ms: the GIL was held)"
        else:
            at = stall.where
        more = (
            f"; {self._unlogged - 1} more since the last warning, the longest "
            f"{self._unlogged_longest * 1000:.0f} ms"
            if self._unlogged > 1
            else ""
        )
        log.warning(
            "the event loop was held for %.0f ms (over %.0f ms); it was in: %s%s",
            stall.held * 1000,
            self._threshold * 1000,
            at,
            more,
        )

    # -- the thread's side -------------------------------------------------------------------

    def _watch(self) -> None:
        while not self._stop.wait(self._interval):
            began = self._batch
            if began is None or (self._sample is not None and self._sample[0] == began):
                continue
            ran = time.perf_counter() - began
            if ran >= self._threshold:
                frame = sys._current_frames().get(self._loop_thread)
                where = "(the loop thread is gone)" if frame is None else describe_stack(frame)
                if self._batch == began:  # still that batch: the stack is its
                    self._sample = (began, where, ran)


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
    for marker in ("/site-packages/", "/dist-packages/"):
        if marker in path:
            return path.rsplit(marker, 1)[1]
    if "/lib/python" in path:  # the standard library: json/encoder.py
        rest = path.rsplit("/lib/python", 1)[1]
        return rest.split("/", 1)[1] if "/" in rest else rest
    if "/atlasd/" in path:
        return "atlasd/" + path.rsplit("/atlasd/", 1)[1]
    return path.rsplit("/", 1)[-1]
