"""A writer subsystem (``run_zone_writer``, ``run_endpoints_writer``) running in a test's
nursery, fed by hand: the one way the DNS tests start one, push a fleet and wait for it.

    async with fed(run_zone_writer, callback="on_zone", path=p, kube=None, settings=s) as w:
        await w.push(fleet)          # returns once the writer reported a pass
        w.seen[-1]                   # what it reported (a Zone, a dict of files, ...)
        w.started                    # what it handed to task_status.started (its state)
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import trio

from tests.harness.wait import WaitTimeout


@dataclass
class Fed:
    """The running writer: its input channel, its reports in order, its started value."""

    send: trio.MemorySendChannel[Any]
    started: Any = None
    seen: list[Any] = field(default_factory=list)
    _reported: trio.Event = field(default_factory=trio.Event)

    def report(self, value: Any) -> None:
        """The writer's callback: one more pass."""
        self.seen.append(value)
        self._reported.set()

    async def push(self, item: Any, *, within: float = 10, what: str = "a pass") -> None:
        """Send ``item`` and wait (with a deadline) until the writer reports one more pass."""
        self._reported = trio.Event()
        await self.send.send(item)
        with trio.move_on_after(within):
            await self._reported.wait()
            return
        raise WaitTimeout(f"timed out after {within}s waiting for {what}")


@asynccontextmanager
async def fed(
    run: Callable[..., Awaitable[object]], *, callback: str, **kwargs: Any
) -> AsyncIterator[Fed]:
    """Start ``run(fleets=<channel>, <callback>=<recorder>, **kwargs)`` in a nursery; the
    writer ends when the block does (its input channel closed)."""
    send, recv = trio.open_memory_channel[Any](0)
    writer = Fed(send=send)
    async with trio.open_nursery() as nursery:
        start = functools.partial(run, fleets=recv, **{callback: writer.report}, **kwargs)
        writer.started = await nursery.start(start)
        async with send:
            yield writer
