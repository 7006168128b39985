"""The SotW and Delta machines against a model of Envoy's ADS client, under every interleaving
Hypothesis finds: whatever the order in which responses, requests and snapshot changes
cross, once the changes stop and the stream drains, the Envoy holds every cluster of the
last snapshot, none warming, each with its current assignment, and it never had to wait
out its initial fetch timeout.

The model follows Envoy's ``GrpcMuxImpl`` (source/extensions/config_subscription/grpc/
grpc_mux_impl.cc) and cluster manager, for the two types that matter here:

- every response is answered by one request of its type carrying the latest nonce
  received, the version accepted and the names of the current watches (``sendDiscovery
  Request`` recomputes the names at send time);
- a type is paused while a response of that type is processed, and EDS also while a CDS
  response is (``cds_api_helper``): requests asked for meanwhile are sent once, at resume;
- a cluster added or changed by CDS is a new instance that warms until a response
  carrying its ClusterLoadAssignment arrives, and CDS requests (its ACK included) are
  paused while any cluster warms (``ClusterManagerImpl::updateClusterCounts``);
- a response's assignments reach only the clusters that watch them; others are dropped.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from atlasd.xds.protocol import FLOW_TIMEOUT, DeltaStream, SotwStream
from atlasd.xds.snapshot import CLUSTER, ENDPOINT, Resource, Snapshot
from tests.unit.xds.test_protocol import dreq, req


@dataclass
class _Api:
    nonce: str = ""
    version: str = ""
    pauses: int = 0
    pending: bool = False
    subscribed: bool = False  # a watch was added once (only then are requests sent)


@dataclass
class EnvoyModel:
    """What a SotW Envoy holds and the requests it sends (see the module docstring)."""

    clusters: dict[str, bytes] = field(default_factory=dict)  # name -> body it runs
    warming: set[str] = field(default_factory=set)
    assignments: dict[str, bytes] = field(default_factory=dict)  # name -> body held
    api: dict[str, _Api] = field(default_factory=lambda: {CLUSTER: _Api(), ENDPOINT: _Api()})
    out: deque[Any] = field(default_factory=deque)  # requests on their way to the server
    cds_paused_for_warming: bool = False

    def start(self) -> None:
        self.api[CLUSTER].subscribed = True
        self._queue(CLUSTER)

    def _names(self, t: str) -> list[str]:
        return [] if t == CLUSTER else sorted(self.clusters.keys() | self.warming)

    def _may_send(self, t: str) -> bool:
        """Whether a request of ``t`` goes out now (``queueDiscoveryRequest``): never before
        a watch of ``t`` exists; while ``t`` is paused, once at resume."""
        a = self.api[t]
        if not a.subscribed:
            return False
        if a.pauses:
            a.pending = True
            return False
        return True

    def _queue(self, t: str) -> None:
        if self._may_send(t):
            a = self.api[t]
            self.out.append(req(t, self._names(t), nonce=a.nonce, version=a.version))

    def _pause(self, t: str) -> None:
        self.api[t].pauses += 1

    def _resume(self, t: str) -> None:
        a = self.api[t]
        a.pauses -= 1
        if a.pauses == 0 and a.pending:
            a.pending = False
            self._queue(t)

    def _warming_changed(self) -> None:
        if self.warming and not self.cds_paused_for_warming:
            self.cds_paused_for_warming = True
            self._pause(CLUSTER)
        elif not self.warming and self.cds_paused_for_warming:
            self.cds_paused_for_warming = False
            self._resume(CLUSTER)

    def initial_fetch_timeout(self) -> None:
        """Envoy's 15 s initial fetch timeout: the warming clusters start without their
        assignments (they keep watching them)."""
        self.warming.clear()
        self._warming_changed()

    def receive(self, resp: Any) -> None:
        t = resp.type_url
        self._pause(t)
        if t == CLUSTER:
            self._pause(ENDPOINT)
            new = {a.value.split(b":")[0].decode(): a.value for a in resp.resources}
            for name in list(self.clusters):
                if name not in new:
                    del self.clusters[name]
                    self.assignments.pop(name, None)
            self.warming &= new.keys()
            watches_changed = len(new) != len(self.clusters)
            for name, body in new.items():
                if self.clusters.get(name) != body:
                    self.clusters[name] = body
                    self.warming.add(name)
                    watches_changed = True  # a new instance's watch (the old one's gone)
                    self.api[ENDPOINT].subscribed = True
            if watches_changed:
                self._queue(ENDPOINT)
            self._warming_changed()
            self._resume(ENDPOINT)
        else:
            watched = self.clusters.keys() | self.warming
            for a in resp.resources:
                name = a.value.split(b":")[0].decode()
                if name in watched:
                    self.assignments[name] = a.value
                    self.warming.discard(name)
            self._warming_changed()
        self.api[t].nonce = resp.nonce
        self.api[t].version = resp.version_info
        self._queue(t)
        self._resume(t)


@dataclass
class DeltaEnvoyModel(EnvoyModel):
    """The same Envoy on a Delta stream (``NewGrpcMuxImpl``): a request tells the
    subscription's changes and ACKs one response; ACKs wait while the type is paused and
    then go out one request each (``pausable_ack_queue``); a response upserts and removes
    by name, and a removed assignment ends its cluster's warming (with no endpoints)."""

    told: dict[str, set[str]] = field(default_factory=lambda: {CLUSTER: set(), ENDPOINT: set()})
    acks: dict[str, list[str]] = field(default_factory=lambda: {CLUSTER: [], ENDPOINT: []})

    def _queue(self, t: str) -> None:
        if not self._may_send(t):
            return
        want = set(self._names(t))
        sub, unsub = sorted(want - self.told[t]), sorted(self.told[t] - want)
        self.told[t] = want
        nonces = self.acks[t] or [""]
        self.acks[t] = []
        for i, nonce in enumerate(nonces):
            first = i == 0
            self.out.append(dreq(t, sub if first else [], unsub if first else [], nonce=nonce))

    def receive(self, resp: Any) -> None:
        t = resp.type_url
        self._pause(t)
        if t == CLUSTER:
            self._pause(ENDPOINT)
            for name in resp.removed_resources:
                self.clusters.pop(name, None)
                self.assignments.pop(name, None)
                self.warming.discard(name)
            for r in resp.resources:
                body = r.resource.value
                if self.clusters.get(r.name) != body:
                    self.clusters[r.name] = body
                    self.warming.add(r.name)
                    self.api[ENDPOINT].subscribed = True
            self._queue(ENDPOINT)
            self._warming_changed()
            self._resume(ENDPOINT)
        else:
            watched = self.clusters.keys() | self.warming
            for r in resp.resources:
                if r.name in watched:
                    self.assignments[r.name] = r.resource.value
                    self.warming.discard(r.name)
            for name in resp.removed_resources:
                self.assignments.pop(name, None)
                self.warming.discard(name)
            self._warming_changed()
        self.acks[t].append(resp.nonce)
        self._queue(t)
        self._resume(t)


def _snapshot(clusters: dict[str, str], endpoints: dict[str, str]) -> Snapshot:
    rs = [
        Resource.of(CLUSTER, n, f"{n}:{b}".encode(), {(ENDPOINT, n)}) for n, b in clusters.items()
    ]
    rs += [Resource.of(ENDPOINT, n, f"{n}:{b}".encode()) for n, b in endpoints.items()]
    return Snapshot.create("n", rs)


@dataclass
class World:
    """A SotW stream between the machine and the Envoy model, driven one step at a time."""

    machine: SotwStream | DeltaStream = field(default_factory=lambda: SotwStream("n"))
    envoy: EnvoyModel = field(default_factory=EnvoyModel)
    to_envoy: deque[Any] = field(default_factory=deque)
    clusters: dict[str, str] = field(default_factory=dict)
    endpoints: dict[str, str] = field(default_factory=dict)
    snap: Snapshot | None = None
    hint: dict[str, set[str]] | None = field(default_factory=dict)  # None: unknown
    woken: bool = False  # a change is noted and the stream loop has not looked yet
    now: float = 0.0
    counter: int = 0
    removed: set[str] = field(default_factory=set)
    timeouts: int = 0  # initial fetch timeouts the Envoy went through

    def publish(self, change: int, which: int) -> None:
        """A snapshot change: add a cluster, change one's cluster or assignment, remove one,
        add one again under a name removed before."""
        self.counter += 1
        names = sorted(self.clusters)
        gone = sorted(self.removed - self.clusters.keys())
        if change == 4 and gone:
            name = gone[which % len(gone)]
            self.clusters[name] = self.endpoints[name] = str(self.counter)
        elif change in (0, 4) or not names:
            name = f"c{self.counter}"
            self.clusters[name] = self.endpoints[name] = "0"
        else:
            name = names[which % len(names)]
            if change == 1:
                self.clusters[name] = str(self.counter)
            elif change == 2:
                self.endpoints[name] = str(self.counter)
            else:
                del self.clusters[name], self.endpoints[name]
                self.removed.add(name)
        prev, self.snap = self.snap, _snapshot(self.clusters, self.endpoints)
        diff = self.snap.diff_from(prev)
        self.woken = True
        if diff is None or self.hint is None:
            self.hint = None
        else:
            for t, ns in diff.items():
                self.hint.setdefault(t, set()).update(ns)

    def wake(self) -> None:
        """The stream loop notices the published changes (the server's ``_CHANGED``)."""
        if self.snap is None or not self.woken:
            return
        hint, self.hint, self.woken = self.hint, {}, False
        self.to_envoy.extend(self.machine.on_snapshot(self.snap, self.now, hint).responses)

    def deliver_request(self) -> None:
        r = self.envoy.out.popleft()
        self.to_envoy.extend(self.machine.on_request(r, self.snap, self.now).responses)

    def deliver_response(self) -> None:
        self.envoy.receive(self.to_envoy.popleft())

    def drain(self) -> None:
        """No more changes: everything in flight arrives, and time passes."""
        for _ in range(10_000):
            if self.woken:
                self.wake()
            elif self.to_envoy:
                self.deliver_response()
            elif self.envoy.out:
                self.deliver_request()
            elif self.envoy.warming:
                self.now += 15.0
                self.timeouts += 1
                self.envoy.initial_fetch_timeout()
            else:
                return
        raise AssertionError("the stream never went quiet")


def _check_converged(w: World) -> None:
    want = {n: f"{n}:{b}".encode() for n, b in w.clusters.items()}
    e = w.envoy
    assert e.clusters == want, "clusters differ"
    assert not e.warming, f"clusters still warming: {sorted(e.warming)}"
    got = {n: e.assignments.get(n) for n in want}
    assert got == {n: f"{n}:{w.endpoints[n]}".encode() for n in want}, "assignments differ"


_STEP = st.tuples(st.integers(0, 6), st.integers(0, 4), st.integers(0, 50))


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(delta=st.booleans(), initial=st.integers(0, 4), steps=st.lists(_STEP, max_size=80))
def test_envoy_converges_under_any_interleaving(
    delta: bool, initial: int, steps: list[tuple[int, int, int]]
) -> None:
    w = World(DeltaStream("n"), DeltaEnvoyModel()) if delta else World()
    for i in range(initial):
        w.publish(0, i)
    w.envoy.start()
    for action, change, which in steps:
        if action == 0:
            w.publish(change, which)
        elif action == 1:
            w.wake()
        elif action in (2, 3) and w.to_envoy:
            w.deliver_response()
        elif action in (4, 5) and w.envoy.out:
            w.deliver_request()
        elif action == 6:
            w.now += FLOW_TIMEOUT * (which % 3) / 2
    w.drain()
    _check_converged(w)
    assert w.timeouts == 0, "the Envoy waited out its initial fetch timeout"
