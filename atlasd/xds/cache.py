"""The published snapshots: one per node, with change notification. Trio-agnostic.

Publishing an equal snapshot (same versions for every type) is a no-op: nobody is
notified and nothing is sent. ``publish`` replaces the whole set at once, so a node
whose cluster disappeared loses its snapshot in the same step (its streams are told
and close; see ``server``).

Subscribers are plain callables run synchronously in ``set_snapshot``/``clear``; the
server's callbacks only wake their stream (they never block or raise).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

from prometheus_client import CollectorRegistry

from atlasd.xds.snapshot import Snapshot
from atlasd.xds.status import EnvoyStatus, StatusBoard, XdsMetrics

Callback = Callable[[], None]


class SnapshotCache:
    """Snapshots by node id, watchers by node id, and the status board of live streams."""

    def __init__(self, *, metrics: XdsMetrics | None = None) -> None:
        # Invariant: every snapshot here passed ``Snapshot.create``'s consistency check.
        self._snapshots: dict[str, Snapshot] = {}
        # When each node's current snapshot was published (monotonic), for push latency.
        self._published_at: dict[str, float] = {}
        self._watchers: dict[str, dict[int, Callback]] = {}
        self._next_watch = 0
        self.metrics = metrics if metrics is not None else XdsMetrics(CollectorRegistry())
        self.board = StatusBoard()

    # -- reading ---------------------------------------------------------------------

    def get(self, node: str) -> Snapshot | None:
        return self._snapshots.get(node)

    def nodes(self) -> list[str]:
        return sorted(self._snapshots)

    def published_at(self, node: str) -> float | None:
        return self._published_at.get(node)

    def status(self) -> list[EnvoyStatus]:
        return self.board.all()

    # -- writing ---------------------------------------------------------------------

    def set_snapshot(self, node: str, snapshot: Snapshot) -> bool:
        """Publish ``snapshot`` for ``node``; False (and no notification) if unchanged."""
        if snapshot.node != node:
            raise ValueError(f"snapshot for {snapshot.node!r} published as {node!r}")
        prev = self._snapshots.get(node)
        if prev is snapshot or (prev is not None and prev.versions == snapshot.versions):
            return False
        self._snapshots[node] = snapshot
        self._published_at[node] = time.monotonic()
        self._notify(node)
        return True

    def clear(self, node: str) -> bool:
        """Drop ``node``'s snapshot; its streams are notified (and then close)."""
        if self._snapshots.pop(node, None) is None:
            return False
        self._published_at.pop(node, None)
        self._notify(node)
        return True

    def publish(self, snapshots: Mapping[str, Snapshot]) -> set[str]:
        """Make ``snapshots`` the complete set; returns the nodes that changed."""
        changed = {n for n in list(self._snapshots) if n not in snapshots and self.clear(n)}
        for node, snap in snapshots.items():
            if self.set_snapshot(node, snap):
                changed.add(node)
        return changed

    # -- watching --------------------------------------------------------------------

    def watch(self, node: str, callback: Callback) -> Callable[[], None]:
        """Call ``callback`` whenever ``node``'s snapshot changes; returns the canceller."""
        self._next_watch += 1
        wid = self._next_watch
        self._watchers.setdefault(node, {})[wid] = callback

        def cancel() -> None:
            ws = self._watchers.get(node)
            if ws is not None:
                ws.pop(wid, None)
                if not ws:
                    del self._watchers[node]

        return cancel

    def _notify(self, node: str) -> None:
        for cb in list(self._watchers.get(node, {}).values()):
            cb()
