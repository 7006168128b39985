"""Supervision: a subsystem that fails for a retriable reason is restarted, alone.

A retriable failure is any ``KubeError`` (the Kubernetes API, or standalone's directory,
which speaks the same error tree: a loop that starts over retries every ``KubeError``) or
an ``OSError`` of the local file system (the zone file). Each run lives in its own nursery
(a cancel scope), so a restart tears down everything that run started; the backoff grows
while runs keep failing and starts over after a run that lasted ``STABLE_SECONDS``. Any
other exception is a bug and ends the process with a non-zero exit (never half alive).

Every transition is reported to the ``StatusHub``: ``subsystems`` in ``/status`` shows
each one's state, and one that keeps failing makes ``/healthz`` answer 503
(``StatusHub.unhealthy``).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio

from atlasd.hub import STABLE_SECONDS, StatusHub
from atlasd.kube.errors import KubeError
from atlasd.watch.backoff import Backoff

log = logging.getLogger(__name__)

RESTARTS: tuple[type[Exception], ...] = (KubeError, OSError)


async def supervise(
    name: str,
    hub: StatusHub,
    fn: Callable[..., Awaitable[None]],
    *,
    stable_seconds: float = STABLE_SECONDS,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run ``fn(task_status=...)`` until it returns, restarting it with backoff on
    retriable errors. ``task_status.started()`` is passed through on the first run only."""
    backoff = Backoff(initial=0.5, jitter=0.5, reset_after=float("inf"))
    first = True
    while True:
        started_at = trio.current_time()
        try:
            async with trio.open_nursery() as nursery:
                if first:
                    await nursery.start(fn)
                    task_status.started()
                    first = False
                else:
                    nursery.start_soon(fn)
                hub.subsystem(name, "running")
                nursery.start_soon(_stable_after, name, hub, stable_seconds)
        except RESTARTS as exc:
            failure: BaseException = exc
        except BaseExceptionGroup as group:
            # Nurseries wrap errors in groups: restart only if every leaf is retriable
            # (a Cancelled or a bug among them propagates unchanged).
            retriable, rest = group.split(RESTARTS)
            if rest is not None or retriable is None:
                raise
            failure = _first_leaf(retriable)
        else:
            return
        if trio.current_time() - started_at > stable_seconds:
            backoff.reset()
        delay = backoff.next_delay(trio.current_time())
        log.warning(
            "%s failed (%s: %s); restarting in %.1fs", name, type(failure).__name__, failure, delay
        )
        hub.subsystem_failed(name, f"{type(failure).__name__}: {failure}")
        await trio.sleep(delay)


async def _stable_after(name: str, hub: StatusHub, seconds: float) -> None:
    # Cancelled with the run if it fails first.
    await trio.sleep(seconds)
    hub.subsystem_stable(name)


def _first_leaf(group: BaseExceptionGroup[BaseException]) -> BaseException:
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc
