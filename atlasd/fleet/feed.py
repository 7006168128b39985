"""The channel fleet versions travel on: one publisher, any number of coalescing readers.

``FleetFeed.publish(update)`` never blocks. Each ``Subscription`` holds the newest version
and the union of the keys changed since it last read, so a slow reader (the zone writer
during an fsync, say) skips intermediate versions but never misses a changed key. A reader
that subscribes late first gets the current version with every key marked changed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import trio

from atlasd.fleet.keys import FLEET_KEY
from atlasd.fleet.state import FleetUpdate, FleetVersion


class Subscription:
    """One reader's view; iterate it (``async for update in sub``)."""

    def __init__(self, feed: FleetFeed) -> None:
        self._feed = feed
        # Invariant: ``_event`` is set exactly when ``_pending`` holds unread keys.
        self._pending: set[str] = set()
        self._event = trio.Event()
        latest = feed.latest
        if latest is not None:
            self._offer(set(latest.members) | {FLEET_KEY})

    def _offer(self, keys: set[str] | frozenset[str]) -> None:
        self._pending |= keys
        if self._pending:
            self._event.set()

    async def receive(self) -> FleetUpdate:
        """The newest version and every key changed since the last ``receive``."""
        while not self._pending:
            await self._event.wait()
        version = self._feed.latest
        assert version is not None  # keys are only offered after a publish
        keys, self._pending = frozenset(self._pending), set()
        self._event = trio.Event()
        return FleetUpdate(version=version, changed=keys)

    def close(self) -> None:
        self._feed._subs.discard(self)

    def __aiter__(self) -> AsyncIterator[FleetUpdate]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[FleetUpdate]:
        try:
            while True:
                yield await self.receive()
        finally:
            self.close()


class FleetFeed:
    """The latest ``FleetVersion`` and its readers."""

    def __init__(self) -> None:
        self.latest: FleetVersion | None = None
        self._subs: set[Subscription] = set()
        self._published = trio.Event()

    def publish(self, update: FleetUpdate) -> None:
        self.latest = update.version
        for sub in list(self._subs):
            sub._offer(update.changed)
        self._published.set()

    def subscribe(self) -> Subscription:
        sub = Subscription(self)
        self._subs.add(sub)
        return sub

    async def wait_published(self) -> FleetVersion:
        """The latest version, once there is one."""
        await self._published.wait()
        assert self.latest is not None
        return self.latest
