"""The status hub: what atlasd reports about itself, as one JSON-able document.

Every subsystem publishes its part (``envoys``, ``subsystems``, ``leader`` ...) with
:meth:`StatusHub.publish`; per-key parts (``clusters``, ``problems``, ``certificates``,
``pending``) are published key by key with :meth:`StatusHub.publish_keyed`, so a change of
one cluster costs that cluster, and are assembled into lists (in key order) only when the
document is read. The HTTP endpoint serves the merged document at ``/status`` and streams it
over WebSocket, and readiness is derived from it. Publishing never blocks: watchers wait on
a generation counter and always read the latest document (slow watchers skip
intermediate states rather than queueing them).

Published values are never mutated afterwards (publishers replace them), so reading the
document copies only its top level.
"""

from __future__ import annotations

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
        self._not_ready_reasons: dict[str, str] = {}
        # section -> key -> the items of that key (a list, concatenated in key order).
        self._keyed: dict[str, dict[str, list[Any]]] = {}

    @property
    def generation(self) -> int:
        return self._generation

    def publish(self, **parts: Any) -> None:
        """Replace the named top-level parts of the status document."""
        self._doc.update(parts)
        self._bump()

    def publish_keyed(self, section: str, key: str, items: list[Any] | None) -> None:
        """Replace ``key``'s items in ``section`` (None or empty: remove them)."""
        part = self._keyed.setdefault(section, {})
        if items:
            if part.get(key) == items:
                return
            part[key] = items
        elif part.pop(key, None) is None:
            return
        self._bump()

    def keyed(self, section: str) -> list[Any]:
        part = self._keyed.get(section, {})
        return [item for key in sorted(part) for item in part[key]]

    def subsystem(self, name: str, state: str) -> None:
        """Record a subsystem's state (``starting``, ``running``, ``restarting: ...``)."""
        self._doc["subsystems"] = {**self._doc["subsystems"], name: state}
        self._bump()

    def set_ready(self, part: str, ready: bool, reason: str = "") -> None:
        """Readiness is the AND of every registered part; ``reason`` says why a part is
        not ready (shown in /status and /readyz)."""
        if self._ready_parts.get(part) == ready and self._not_ready_reasons.get(part, "") == (
            "" if ready else reason
        ):
            return
        self._ready_parts[part] = ready
        if ready or not reason:
            self._not_ready_reasons.pop(part, None)
        else:
            self._not_ready_reasons[part] = reason
        self._bump()

    def expect_ready(self, *parts: str) -> None:
        """Register parts that must report ready before ``/readyz`` says yes."""
        for part in parts:
            self._ready_parts.setdefault(part, False)

    @property
    def ready(self) -> bool:
        return bool(self._ready_parts) and all(self._ready_parts.values())

    def not_ready(self) -> list[str]:
        """The parts not ready, each with its reason when one was given."""
        return [
            f"{p} ({self._not_ready_reasons[p]})" if p in self._not_ready_reasons else p
            for p, ok in sorted(self._ready_parts.items())
            if not ok
        ]

    def snapshot(self) -> dict[str, Any]:
        doc = dict(self._doc)
        for section in self._keyed:
            doc[section] = self.keyed(section)
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
