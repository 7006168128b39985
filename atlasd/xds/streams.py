"""Per-Envoy status and the xDS Prometheus metrics.

``EnvoyStatus`` is what the status endpoint and the CLI show for one ADS stream: the
node, the stream kind, the version ACKed per type, the last NACK and its message, and
when the stream connected. ``StatusBoard`` holds the live ones (plain Python, no I/O).

Metrics are registered on the ``CollectorRegistry`` handed to ``XdsMetrics``; atlasd's
main passes the registry it serves on :6309, tests pass a fresh one so they stay
isolated (registering twice on one registry is an error, so there is no implicit
default).
"""

from __future__ import annotations

import datetime as dt
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TypedDict

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from atlasd.xds.protocol import Nack
from atlasd.xds.snapshot import SHORT_NAMES


class NackDict(TypedDict):
    type: str
    version: str
    message: str
    at: str


class EnvoyStatusDict(TypedDict):
    """The JSON shape of one ``EnvoyStatus`` (status endpoint, CLI)."""

    stream_id: int
    node: str
    kind: str
    peer: str
    connected_since: str
    acked: dict[str, str]
    acked_at: dict[str, float]
    last_nack: NackDict | None
    nacks: int


@dataclass(frozen=True)
class EnvoyStatus:
    """One connected ADS stream, as the status view shows it."""

    stream_id: int
    node: str
    kind: str  # "sotw" | "delta"
    peer: str
    connected_since: dt.datetime
    acked: tuple[tuple[str, str], ...] = ()  # (type short name, version)
    acked_at: tuple[tuple[str, float], ...] = ()  # (type short name, unix time of that ACK)
    last_nack: Nack | None = None
    last_nack_at: dt.datetime | None = None
    nacks: int = 0

    def acked_version(self, type_url: str) -> str | None:
        short = SHORT_NAMES.get(type_url, type_url)
        return dict(self.acked).get(short)

    def as_dict(self) -> EnvoyStatusDict:
        nack: NackDict | None = None
        if self.last_nack is not None and self.last_nack_at is not None:
            n = self.last_nack
            nack = {
                "type": SHORT_NAMES.get(n.type_url, n.type_url),
                "version": n.version,
                "message": n.message,
                "at": self.last_nack_at.isoformat(),
            }
        return {
            "stream_id": self.stream_id,
            "node": self.node,
            "kind": self.kind,
            "peer": self.peer,
            "connected_since": self.connected_since.isoformat(),
            "acked": dict(self.acked),
            "acked_at": dict(self.acked_at),
            "last_nack": nack,
            "nacks": self.nacks,
        }


@dataclass
class StatusBoard:
    """Live stream statuses by stream id. Invariant: only open streams are present."""

    _streams: dict[int, EnvoyStatus] = field(default_factory=dict)
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    # Open streams per node, and the types each stream last NACKed (not since ACKed).
    _per_node: dict[str, int] = field(default_factory=dict)
    _nacking: dict[int, set[str]] = field(default_factory=dict)
    # Called with (node, has_stream) when a node gains its first or loses its last stream.
    on_node: Callable[[str, bool], None] | None = None
    # Called with the number of nodes currently NACKing when it may have changed.
    on_nacking: Callable[[int], None] | None = None
    # Told after any change of any stream's status (so a reader need not poll); see
    # ``listen``.
    _listeners: dict[int, Callable[[], None]] = field(default_factory=dict)
    _listener_ids: itertools.count[int] = field(default_factory=itertools.count)

    def listen(self, fn: Callable[[], None]) -> Callable[[], None]:
        """Call ``fn()`` after every change of any stream's status (it must not block or
        raise); returns the function that stops it."""
        token = next(self._listener_ids)
        self._listeners[token] = fn

        def stop() -> None:
            self._listeners.pop(token, None)

        return stop

    def _changed(self) -> None:
        for fn in list(self._listeners.values()):
            fn()

    def open(self, *, node: str, kind: str, peer: str) -> int:
        sid = next(self._ids)
        self._streams[sid] = EnvoyStatus(
            stream_id=sid, node=node, kind=kind, peer=peer, connected_since=dt.datetime.now(dt.UTC)
        )
        n = self._per_node.get(node, 0)
        self._per_node[node] = n + 1
        if n == 0 and self.on_node is not None:
            self.on_node(node, True)
        self._changed()
        return sid

    def close(self, sid: int) -> None:
        st = self._streams.pop(sid, None)
        if st is None:
            return
        n = self._per_node.get(st.node, 1) - 1
        if n:
            self._per_node[st.node] = n
        else:
            self._per_node.pop(st.node, None)
            if self.on_node is not None:
                self.on_node(st.node, False)
        if self._nacking.pop(sid, None):
            self._report_nacking()
        self._changed()

    def has_stream(self, node: str) -> bool:
        return node in self._per_node

    def _report_nacking(self) -> None:
        if self.on_nacking is not None:
            nodes = {self._streams[sid].node for sid, ts in self._nacking.items() if ts}
            self.on_nacking(len(nodes))

    def acked(self, sid: int, type_url: str, version: str) -> None:
        st = self._streams.get(sid)
        if st is None:
            return
        short = SHORT_NAMES.get(type_url, type_url)
        acked = dict(st.acked)
        acked[short] = version
        at = dict(st.acked_at)
        at[short] = time.time()
        self._streams[sid] = replace(
            st, acked=tuple(sorted(acked.items())), acked_at=tuple(sorted(at.items()))
        )
        types = self._nacking.get(sid)
        if types and type_url in types:
            types.discard(type_url)
            self._report_nacking()
        self._changed()

    def nacked(self, sid: int, type_url: str, version: str, message: str) -> None:
        st = self._streams.get(sid)
        if st is None:
            return
        nack = Nack(type_url, version, message)
        at = dt.datetime.now(dt.UTC)
        self._streams[sid] = replace(st, last_nack=nack, last_nack_at=at, nacks=st.nacks + 1)
        self._nacking.setdefault(sid, set()).add(type_url)
        self._report_nacking()
        self._changed()

    def all(self) -> list[EnvoyStatus]:
        return sorted(self._streams.values(), key=lambda s: (s.node, s.stream_id))


class XdsMetrics:
    """The xDS metrics, registered on ``registry``."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.connected = Gauge(
            "atlasd_xds_connected_envoys",
            "ADS streams currently open, by stream kind.",
            ["kind"],
            registry=registry,
        )
        self.pushes = Counter(
            "atlasd_xds_pushes",
            "xDS responses sent, by resource type.",
            ["type"],
            registry=registry,
        )
        self.nacks = Counter(
            "atlasd_xds_nacks",
            "xDS responses rejected by an Envoy, by node and resource type.",
            ["node", "type"],
            registry=registry,
        )
        self.denied = Counter(
            "atlasd_xds_denied_streams",
            "ADS streams refused because the caller may not fetch the node it named.",
            registry=registry,
        )
        self.aged = Counter(
            "atlasd_xds_aged_streams",
            "ADS streams ended because they reached --ads-max-stream-age (the Envoy "
            "reconnects, balanced over the replicas again).",
            registry=registry,
        )
        self.disconnected_nodes = Gauge(
            "atlasd_xds_disconnected_nodes",
            "Nodes atlasd has a snapshot for but no open ADS stream from.",
            registry=registry,
        )
        self.nacked_nodes = Gauge(
            "atlasd_xds_nacked_nodes",
            "Nodes whose Envoy rejected the latest response of some type (not ACKed since).",
            registry=registry,
        )
        self.push_latency = Histogram(
            "atlasd_xds_push_latency_seconds",
            "From a snapshot being published to the Envoy ACKing it, by resource type.",
            ["type"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=registry,
        )
