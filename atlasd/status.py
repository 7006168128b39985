"""The status hub: what atlasd reports about itself, as one JSON-able document.

Every subsystem publishes its part (``clusters``, ``problems``, ``envoys``,
``certificates``, ``subsystems``, ``leader`` ...) with :meth:`StatusHub.publish`; the
HTTP endpoint serves the merged document at ``/status`` and streams it over WebSocket,
and readiness is derived from it. Publishing never blocks: watchers wait on a
generation counter and always read the latest document (slow watchers skip
intermediate states rather than queueing them).
"""

from __future__ import annotations

import copy
import time
from typing import Any

import trio

from atlasd import __version__


class StatusHub:
    """Latest-value store of atlasd's status with change notification."""

    def __init__(self) -> None:
        # Invariant: ``_generation`` grows by one per publish; ``_changed`` is set
        # (and replaced) exactly when it grows.
        self._doc: dict[str, Any] = {
            "version": __version__,
            "started_at": time.time(),
            "leader": False,
            "subsystems": {},
        }
        self._generation = 0
        self._changed = trio.Event()
        self._ready_parts: dict[str, bool] = {}

    @property
    def generation(self) -> int:
        return self._generation

    def publish(self, **parts: Any) -> None:
        """Replace the named top-level parts of the status document."""
        self._doc.update(parts)
        self._bump()

    def subsystem(self, name: str, state: str) -> None:
        """Record a subsystem's state (``starting``, ``running``, ``restarting: ...``)."""
        self._doc["subsystems"] = {**self._doc["subsystems"], name: state}
        self._bump()

    def set_ready(self, part: str, ready: bool) -> None:
        """Readiness is the AND of every registered part."""
        self._ready_parts[part] = ready
        self._bump()

    def expect_ready(self, *parts: str) -> None:
        """Register parts that must report ready before ``/readyz`` says yes."""
        for part in parts:
            self._ready_parts.setdefault(part, False)

    @property
    def ready(self) -> bool:
        return bool(self._ready_parts) and all(self._ready_parts.values())

    def not_ready(self) -> list[str]:
        return sorted(p for p, ok in self._ready_parts.items() if not ok)

    def snapshot(self) -> dict[str, Any]:
        doc = copy.deepcopy(self._doc)
        doc["ready"] = self.ready
        doc["not_ready"] = self.not_ready()
        doc["generation"] = self._generation
        return doc

    async def wait_changed(self, seen: int) -> int:
        """Wait until the generation is past ``seen``; return the new generation."""
        while self._generation <= seen:
            await self._changed.wait()
        return self._generation

    def _bump(self) -> None:
        self._generation += 1
        self._changed.set()
        self._changed = trio.Event()
