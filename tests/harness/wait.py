"""Waiting on conditions with deadlines: the only way tests wait for anything."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import trio

T = TypeVar("T")


class WaitTimeout(AssertionError):
    """The condition did not hold before the deadline."""


def wait_until(
    predicate: Callable[[], T], *, timeout: float, what: str, interval: float = 0.05
) -> T:
    """Poll ``predicate`` until it returns a truthy value (returned) or ``timeout`` passes.

    Exceptions from the predicate count as "not yet"; the last one is chained into the
    timeout error so a failure says why.
    """
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while True:
        try:
            value = predicate()
            if value:
                return value
            last_exc = None
        except Exception as exc:
            last_exc = exc
        if time.monotonic() >= deadline:
            raise WaitTimeout(f"timed out after {timeout}s waiting for {what}") from last_exc
        time.sleep(interval)


async def wait_until_async(
    predicate: Callable[[], Awaitable[T]] | Callable[[], T],
    *,
    timeout: float,  # noqa: ASYNC109 - mirrors wait_until; the deadline is the point
    what: str,
    interval: float = 0.05,
) -> T:
    """Async twin of :func:`wait_until`; ``predicate`` may be sync or async."""
    last_exc: BaseException | None = None
    with trio.move_on_after(timeout):
        while True:
            try:
                value = predicate()
                if isinstance(value, Awaitable):
                    value = await value
                if value:
                    return value  # type: ignore[return-value]
                last_exc = None
            except Exception as exc:
                last_exc = exc
            await trio.sleep(interval)
    raise WaitTimeout(f"timed out after {timeout}s waiting for {what}") from last_exc
