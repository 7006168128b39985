"""How a subsystem paces itself in a burst: after a piece of work, pause a multiple of the
CPU time it took, so that in a burst it takes at most a known share of the process while
the changes that arrive meanwhile coalesce into its next piece. A lone change is handled at
once (the pause comes after the work).

CPU time, not wall time: waiting for the disk, for another process or for the interpreter
(a thread holding the GIL) is not work, and counting it lengthened the pauses of the zone
writer tenfold in a test with a busy reader thread. ``cpu_timed`` runs in whichever thread
does the work (``trio.to_thread.run_sync(cpu_timed, call)`` for work done off the Trio
thread).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

_T = TypeVar("_T")


def cpu_timed(call: Callable[[], _T]) -> tuple[_T, float]:
    """``call()``'s result and the CPU time the calling thread spent in it (seconds)."""
    t0 = time.thread_time()
    result = call()
    return result, time.thread_time() - t0


def burst_pause(cpu: float, *, share: float, cap: float) -> float:
    """The pause (seconds) after work that took ``cpu`` seconds of CPU so that the work takes
    at most ``share`` of the time in a burst, and never more than ``cap``."""
    if not 0 < share <= 1:
        raise ValueError(f"share must be in (0, 1], not {share}")
    return min(cap, cpu * (1 - share) / share)
