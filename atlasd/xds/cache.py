"""The published snapshots: one per node, with change notification. Trio-agnostic.

Publishing an equal snapshot (same versions for every type) is a no-op: nobody is
notified and nothing is sent. ``update`` publishes the nodes that changed (and clears the
nodes whose snapshot is gone: their streams are told and close; see ``server``), so a
change of one cluster touches that cluster's node and ``atlas`` only.

Watchers are plain callables run synchronously in ``set_snapshot``/``clear`` with what
changed: per type, the names that differ from the snapshot published before, or None when
that is not known (a snapshot made from scratch, a removal). The server's callbacks only
note it and wake their stream (they never block or raise).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

from prometheus_client import CollectorRegistry

from atlasd.xds.snapshot import Snapshot
from atlasd.xds.streams import EnvoyStatus, StatusBoard, XdsMetrics

Diff = Mapping[str, frozenset[str]] | None
Callback = Callable[[Diff], None]

# A push of more streams (a build of more nodes) than this at once is fleet-wide: the writes
# wait until it is done; fewer are the trickle a burst of writes itself causes (a CA
# rotation's new leaves), which must not hold the writes it follows from.
LARGE_PUSH = 200
# How long the ADS server stays "busy" without progress: once no stream has started or
# finished a push for this long, the streams still counted are stuck (an Envoy that stopped
# reading or answering) and hold nobody.
FRESH_SECONDS = 5.0


class PushBacklog:
    """What this replica's ADS server has still to do for snapshots already published: a
    large build in progress (``building``), and streams in a push (woken for a change, or
    waiting for their Envoy to answer a response, or holding a change until it does).
    ``busy`` says whether there is such work for a fleet-wide change; the leader's key
    reconciles wait while it is (``atlasd.reconcile.loop``), so a fleet-wide change reaches
    the Envoys before the Secrets the same change rewrites (those are on no Envoy's path: a
    ``<c>-envoy-values`` is read by whoever installs the chart, not by a running Envoy).

    Fleet-wide: once more than ``large`` streams are in a push at once, the backlog holds
    until at most a tenth of that are (hysteresis); the few pushes that writes cause one by one (each new leaf
    of a CA rotation goes to its node) never hold the writes. Streams count only while
    pushes make progress (some stream entered or left the count
    under ``fresh`` seconds ago): a stream whose Envoy stopped reading or answering must not
    hold the writes for ever. Plain Python, one thread (the ADS server's asyncio tasks and
    the Trio tasks share it under trio-asyncio)."""

    def __init__(
        self,
        *,
        large: int = LARGE_PUSH,
        fresh: float = FRESH_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.building = False
        self._active = 0
        self._holding = False
        self._large = large
        self._last = float("-inf")
        self._fresh = fresh
        self._clock = clock

    @property
    def active(self) -> int:
        """Streams in a push."""
        return self._active

    def enter(self) -> None:
        self._active += 1
        self._last = self._clock()
        if self._active > self._large:
            self._holding = True

    def leave(self) -> None:
        if self._active <= 0:
            raise RuntimeError("a stream left the push backlog it was not in")
        self._active -= 1
        self._last = self._clock()
        if self._active <= self._large // 10:
            # What is left is its tail, or a trickle beside it that never ends in a busy fleet.
            self._holding = False

    def busy(self) -> bool:
        if self.building:
            return True
        return self._holding and self._clock() - self._last < self._fresh


class SnapshotCache:
    """Snapshots by node id, watchers by node id, and the status board of live streams.

    Invariants: every snapshot here passed the consistency check; ``_disconnected`` holds
    exactly the nodes with a snapshot and no open stream (exported as a gauge).
    """

    def __init__(self, *, metrics: XdsMetrics | None = None) -> None:
        self._snapshots: dict[str, Snapshot] = {}
        # When each node's current snapshot was published (monotonic), for push latency.
        self._published_at: dict[str, float] = {}
        self._watchers: dict[str, dict[int, Callback]] = {}
        self._next_watch = 0
        self.metrics = metrics if metrics is not None else XdsMetrics(CollectorRegistry())
        self._disconnected: set[str] = set()
        self.backlog = PushBacklog()
        self.board = StatusBoard(on_node=self._on_node, on_nacking=self.metrics.nacked_nodes.set)

    # -- reading ---------------------------------------------------------------------

    def get(self, node: str) -> Snapshot | None:
        return self._snapshots.get(node)

    def nodes(self) -> list[str]:
        return sorted(self._snapshots)

    def __len__(self) -> int:
        """How many nodes have a snapshot."""
        return len(self._snapshots)

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
        if prev is None and not self.board.has_stream(node):
            self._disconnected.add(node)
            self.metrics.disconnected_nodes.set(len(self._disconnected))
        self._notify(node, snapshot.diff_from(prev))
        return True

    def clear(self, node: str) -> bool:
        """Drop ``node``'s snapshot; its streams are notified (and then close)."""
        if self._snapshots.pop(node, None) is None:
            return False
        self._published_at.pop(node, None)
        if node in self._disconnected:
            self._disconnected.discard(node)
            self.metrics.disconnected_nodes.set(len(self._disconnected))
        self._notify(node, None)
        return True

    def update(self, changes: Mapping[str, Snapshot | None]) -> set[str]:
        """Publish the nodes in ``changes`` (None: the node is gone); returns those that
        changed."""
        changed: set[str] = set()
        for node, snap in changes.items():
            if snap is None:
                if self.clear(node):
                    changed.add(node)
            elif self.set_snapshot(node, snap):
                changed.add(node)
        return changed

    def publish(self, snapshots: Mapping[str, Snapshot]) -> set[str]:
        """Make ``snapshots`` the complete set; returns the nodes that changed."""
        gone: dict[str, Snapshot | None] = {n: None for n in self._snapshots if n not in snapshots}
        return self.update({**gone, **snapshots})

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

    def wake(self, node: str) -> None:
        """Wake the streams of ``node`` with no change (each looks at its snapshot and at
        whether its client certificate was revoked meanwhile)."""
        self._notify(node, None)

    def _notify(self, node: str, diff: Diff) -> None:
        for cb in list(self._watchers.get(node, {}).values()):
            cb(diff)

    def _on_node(self, node: str, has_stream: bool) -> None:
        if has_stream:
            self._disconnected.discard(node)
        elif node in self._snapshots:
            self._disconnected.add(node)
        self.metrics.disconnected_nodes.set(len(self._disconnected))
