"""The ADS stream state machines, State-of-the-World and Delta. Pure: no I/O, no clock.

The server feeds each stream's machine the requests it receives (``on_request``) and
every change of the node's snapshot (``on_snapshot``); the machine answers with a
``Step``: the responses to send, in order, and the ACKs and NACKs it saw.

Rules (Envoy's xds_protocol documentation; go-control-plane pkg/cache/v3 and pkg/server):

- Nonces: each response carries a fresh nonce. SotW ignores a request whose nonce is not
  the latest one sent for its type, except that a stale request of a type sent in parts
  (EDS) still updates the subscription and is answered with what it adds: an Envoy sends
  its current watches in every request, and a stale one may be the only request that says
  a name was dropped and named again (see "Sent in parts"); Delta tracks every outstanding
  nonce and honours
  subscription changes whatever the nonce.
- ACK / NACK: a request with a known nonce ACKs it unless ``error_detail`` is set. A
  NACKed SotW response is parked: the same content is never sent again on that stream;
  the next different content is. A NACKed Delta resource version is remembered as known
  to the Envoy, so only a new version of it goes out.
- Send only on change: a SotW type is re-sent when the content for its subscription
  changes; Delta sends only resources whose version differs from what the Envoy has.
  SotW endpoints (EDS) go out as only the assignments that changed: the protocol lets every
  type but listeners and clusters be sent in parts, so a new address of one cluster costs
  one small response, not every cluster's.
- Sent in parts: for such a type the stream keeps, per name, the version the Envoy holds
  (``HeldVersions``; a name leaves it when the Envoy stops watching it), answers a
  subscription with only what the Envoy lacks, and versions each response as the set the
  Envoy then holds (equal to the snapshot's type version once it holds all of it). A
  response's version never stands for more than the Envoy holds: a partial response
  carrying the snapshot's version made a later subscription to the whole set look answered
  already, and a cluster added while other assignments changed never got its assignment
  (the soak's ``c-0080-prom dials set()``; ``test_protocol_envoy_model``).
- One round at a time (flow control, as go-control-plane's watches give it): a snapshot
  change is not pushed while an earlier response on the stream is unanswered; changes
  meanwhile accumulate and go out together once the Envoy has ACKed or NACKed everything
  sent. An Envoy is never queued more updates than it can take, whatever the rate of
  change, so no pacing is needed upstream. A response unanswered for ``FLOW_TIMEOUT``
  seconds no longer holds anything back.
- Make-before-break: types go out in ``PUSH_ORDER`` (secrets, CDS, EDS, LDS, RDS);
  removals come last. In SotW, a CDS change that drops clusters first sends the union
  of the old and new clusters, then the other types, then the final CDS.
- Wildcard: an empty first subscription (or ``*``) is a wildcard until the Envoy names
  something. Requested names that do not exist yet are remembered and sent once they do.
- A new stream (a reconnect) starts with no state, so it receives the full current state.
- Warming: a cluster that a CDS response changes becomes a new cluster instance in the
  Envoy, which is not used until it has its ClusterLoadAssignment, and the Envoy ACKs that
  CDS response only then. Its assignment may be unchanged, already held, and its EDS
  request (if any) asks for nothing new: left alone, it warms for Envoy's initial fetch
  timeout (15 s) and then runs with cached or no endpoints (go-control-plane#1035,
  istio/istio#28402). So a CDS response that changes clusters is followed at once by
  their assignments (the Envoy takes them in order: after the new instances exist).
  And while a CDS response is unanswered, an EDS request naming an assignment the snapshot
  no longer has means the Envoy warms a cluster that is gone: the change that removes it
  goes out at once instead of waiting for that answer (which would come only after the
  Envoy's initial fetch timeout).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.discovery.v3.discovery_pb2 import (
    DeltaDiscoveryRequest,
    DeltaDiscoveryResponse,
    DiscoveryRequest,
    DiscoveryResponse,
)
from google.protobuf import any_pb2  # type: ignore[import-untyped]

from atlasd.xds.snapshot import (
    CLUSTER,
    ENDPOINT,
    FULL_STATE_TYPES,
    PARTIAL_TYPES,
    PUSH_ORDER,
    HeldVersions,
    Resource,
    Snapshot,
    extend_version,
    field_bytes,
    type_version,
)

# Per type, the names that changed since the snapshot a stream last saw (None: unknown).
Hint = dict[str, set[str]] | None
Req = TypeVar("Req", DiscoveryRequest, DeltaDiscoveryRequest)

__all__ = [
    "Ack",
    "DeltaDiscoveryRequest",
    "DeltaDiscoveryResponse",
    "DeltaStream",
    "DiscoveryRequest",
    "DiscoveryResponse",
    "Nack",
    "SotwStream",
    "Step",
]
_nonces = itertools.count(1)
_MAX_PENDING = 64
FLOW_TIMEOUT = 10.0


def _nonce() -> str:
    return f"{next(_nonces):x}"


def _any(r: Resource) -> any_pb2.Any:
    return any_pb2.Any(type_url=r.type_url, value=r.body)


class EncodedResponse:
    """A SotW ``DiscoveryResponse`` kept as its wire bytes, assembled from each resource's
    cached encoded ``Any`` (``Resource.any_field``): a full CDS of thousands of clusters is
    one join, not thousands of message objects. The server sends ``data`` as is
    (``atlasd.xds.server``'s codec); reading any other field parses it (tests, debugging).
    """

    def __init__(self, *, version_info: str, type_url: str, nonce: str, resources: Any) -> None:
        self.version_info = version_info
        self.type_url = type_url
        self.nonce = nonce
        self.data = (
            field_bytes(1, version_info.encode())
            + b"".join(r.any_field for r in resources)
            + field_bytes(4, type_url.encode())
            + field_bytes(5, nonce.encode())
        )
        self._parsed: DiscoveryResponse | None = None

    def SerializeToString(self) -> bytes:
        return self.data

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        if self._parsed is None:
            self._parsed = DiscoveryResponse.FromString(self.data)
        return getattr(self._parsed, name)


@dataclass(frozen=True)
class Ack:
    type_url: str
    version: str
    stamp: float  # caller-provided time the acknowledged content was published
    pushed: bool = True  # False: the Envoy already had it (no push to time)


@dataclass(frozen=True)
class Nack:
    type_url: str
    version: str
    message: str


@dataclass
class Step:
    """What one input to a machine produced."""

    responses: list[Any] = field(default_factory=list)
    acks: list[Ack] = field(default_factory=list)
    nacks: list[Nack] = field(default_factory=list)

    def extend(self, other: Step) -> None:
        self.responses += other.responses
        self.acks += other.acks
        self.nacks += other.nacks


class _Held:
    """Snapshot changes held back while responses are unanswered (one round at a time).

    Invariants: ``hint`` is the union of the held changes' hints (None: compare every
    type in full); ``stamp`` the publish time of the oldest held change; ``held`` whether
    any change is held at all.
    """

    def __init__(self) -> None:
        self.held = False
        self.hint: Hint = {}
        self.stamp = 0.0

    def hold(self, stamp: float, hint: Hint) -> None:
        if not self.held:
            self.held, self.hint, self.stamp = True, {}, stamp
        if hint is None or self.hint is None:
            self.hint = None
        else:
            for t, names in hint.items():
                self.hint.setdefault(t, set()).update(names)

    def release(self) -> tuple[float, Hint]:
        self.held = False
        hint, self.hint = self.hint, {}
        return self.stamp, hint


class _Stream(Generic[Req]):
    """What both stream kinds share: one round at a time (flow control).

    A subclass says when a response is unanswered (``_busy``), answers a request
    (``_on_request``) and pushes a snapshot change (``_push``); this class holds changes back
    while the Envoy has not answered and releases them with the request that answers.
    """

    def __init__(self, node: str) -> None:
        self.node = node
        self._held = _Held()
        # The Envoy asked for an assignment the snapshot no longer has while a CDS response
        # is unanswered: it warms a cluster that is gone, and answers that CDS response
        # only once the cluster is warm (or its 15 s initial fetch timeout ends). What
        # removes the cluster must not wait for that answer (``_busy`` is False meanwhile).
        self._warming_gone = False
        self._gone_checked: tuple[str, int] | None = None  # (EDS version, subscription)

    def _note_warming_gone(
        self, names: set[str], gen: int, snap: Snapshot | None, cds_unanswered: bool
    ) -> None:
        """Set ``_warming_gone`` if the EDS subscription ``names`` (generation ``gen``)
        names an assignment ``snap`` lacks while a CDS response is unanswered; the names
        are looked at once per subscription and snapshot, not on every ACK."""
        if snap is None or self._warming_gone or not cds_unanswered:
            return
        key = (snap.version(ENDPOINT), gen)
        if key == self._gone_checked:
            return
        self._gone_checked = key
        # In C (a keys view against the set): at thousands of subscribed assignments a
        # generator took ~4 % of onboarding's CPU, the check coming with every ACK then.
        self._warming_gone = not snap.of_type(ENDPOINT).keys() >= names

    def _busy(self, stamp: float) -> bool:
        raise NotImplementedError

    def _on_request(self, req: Req, snap: Snapshot | None, stamp: float) -> Step:
        raise NotImplementedError

    def _push(self, snap: Snapshot | None, stamp: float, hint: Hint) -> Step:
        raise NotImplementedError

    def on_request(self, req: Req, snap: Snapshot | None, stamp: float) -> Step:
        step = self._on_request(req, snap, stamp)
        if self._held.held and not self._busy(stamp):
            held_stamp, hint = self._held.release()
            step.extend(self._push(snap, held_stamp, hint))
        return step

    def in_flight(self, now: float) -> bool:
        """Whether this stream has work outstanding: a response its Envoy has not answered
        (within FLOW_TIMEOUT) or a change held back until it does."""
        return self._held.held or self._busy(now)

    def on_snapshot(self, snap: Snapshot | None, stamp: float, hint: Hint = None) -> Step:
        """A new snapshot; ``hint`` (types -> changed names) lets unchanged types and
        resources be skipped without looking at them (a change of one cluster costs that
        cluster, not the whole fleet)."""
        if snap is not None and self._busy(stamp):
            self._held.hold(stamp, hint)
            return Step()
        return self._push(snap, stamp, hint)


# ---------------------------------------------------------------------------------------
# State of the World


@dataclass
class _SotwType:
    wildcard: bool = False
    names: set[str] = field(default_factory=set)
    named_before: bool = False
    nonce: str = ""  # the latest nonce sent; only a request echoing it counts
    sent_version: str = ""  # version_info of the latest response ("" before any)
    sent_stamp: float = 0.0
    sent: dict[str, Resource] = field(default_factory=dict)  # what that response held
    parked: str = ""  # a version the Envoy NACKed: never re-sent on this stream
    acked_version: str = ""
    awaiting: bool = False  # the latest response is not ACKed or NACKed yet
    names_gen: int = 0  # bumped whenever ``names`` or ``wildcard`` changes
    # (snapshot type version, names_gen) when the Envoy was last known to hold all of its
    # subscription as of that snapshot: answering again from there would send nothing.
    basis: tuple[str, int] | None = None
    seen_version: str = ""  # the snapshot type version last looked at
    changed: set[str] = field(default_factory=set)  # CDS: held before, changed by the last send
    # PARTIAL_TYPES: what the Envoy holds of its subscription, by name (sent in parts).
    held: HeldVersions = field(default_factory=HeldVersions)


class SotwStream(_Stream[DiscoveryRequest]):
    """One SotW ADS stream. Invariant: ``_types`` holds only types the Envoy requested."""

    kind = "sotw"

    def __init__(self, node: str) -> None:
        super().__init__(node)
        self._types: dict[str, _SotwType] = {}
        self._sent_at = 0.0  # when the oldest unanswered response went out (approximately)

    def _busy(self, stamp: float) -> bool:
        """Whether a response is unanswered (and not for longer than FLOW_TIMEOUT)."""
        if self._warming_gone:
            return False
        return any(st.awaiting for st in self._types.values()) and (
            stamp - self._sent_at < FLOW_TIMEOUT
        )

    def _on_request(self, req: DiscoveryRequest, snap: Snapshot | None, stamp: float) -> Step:
        step = Step()
        t = req.type_url
        st = self._types.get(t)
        first = st is None
        if st is None:
            st = self._types[t] = _SotwType()
        stale = bool(req.response_nonce) and req.response_nonce != st.nonce
        if stale and t not in PARTIAL_TYPES:
            return step  # superseded by a later response, whose answer names the same
        if req.response_nonce and not stale:
            if t == CLUSTER:
                self._warming_gone = False
                self._gone_checked = None
            st.awaiting = False
            if req.HasField("error_detail"):
                st.parked = st.sent_version
                step.nacks.append(Nack(t, st.sent_version, req.error_detail.message))
            else:
                st.acked_version = req.version_info
                step.acks.append(Ack(t, req.version_info, st.sent_stamp))
        names = set(req.resource_names)
        wildcard_before = st.wildcard
        if "*" in names:
            names.discard("*")
            st.wildcard = True
        elif names:
            st.wildcard = False
            st.named_before = True
        elif not st.named_before:
            st.wildcard = True
        else:
            st.wildcard = False
        if names != st.names or wildcard_before != st.wildcard:
            st.names_gen += 1
            # The Envoy drops a resource with its last watch, and fetches it again by name.
            st.held.keep_only(set() if st.wildcard else names)
        st.names = names
        if t == ENDPOINT:
            cds = self._types.get(CLUSTER)
            self._note_warming_gone(names, st.names_gen, snap, cds is not None and cds.awaiting)
        # A stale request of a type sent in parts still names the Envoy's subscription as
        # it is now (an Envoy sends its current watches in every request): a name it adds
        # is answered at once, whatever response crossed it. (Left alone, a response sent
        # meanwhile with only other names could stand for the whole subscription.)
        self._respond(t, st, snap, stamp, step, force=first)
        return step

    def _push(self, snap: Snapshot | None, stamp: float, hint: Hint) -> Step:
        step = Step()
        if snap is None:
            return step
        final: list[tuple[str, _SotwType]] = []
        for t in self._ordered_types():
            if hint is not None and t not in hint:
                continue
            st = self._types[t]
            if t == CLUSTER and st.wildcard and st.sent:
                stale = {n: r for n, r in st.sent.items() if n not in snap.of_type(t)}
                if stale:
                    # Make before break: keep the stale clusters until routes moved off them.
                    union = dict(snap.of_type(t))
                    union.update(stale)
                    version = extend_version(snap.version(t), stale) + "-mbb"
                    self._send(t, st, union, version, stamp, step)
                    self._rewarm(snap, stamp, step)
                    final.append((t, st))
                    continue
            if hint is not None and self._partial(t, st):
                self._send_changed(t, st, snap, hint[t], stamp, step)
                continue
            self._respond(t, st, snap, stamp, step, force=False)
        for t, st in final:
            self._respond(t, st, snap, stamp, step, force=True)
        return step

    def _send_changed(
        self, t: str, st: _SotwType, snap: Snapshot, changed: set[str], stamp: float, step: Step
    ) -> None:
        """Only the subscribed resources of ``t`` named in ``changed`` (``PARTIAL_TYPES``)."""
        version = snap.version(t)
        in_sync = st.basis is not None and st.basis == (st.seen_version, st.names_gen)
        available = snap.of_type(t)
        selected = {
            n: available[n]
            for n in sorted(changed)
            if n in st.names and n in available and st.held.get(n) != available[n].version
        }
        st.seen_version = version
        if selected:
            sent = st.held.version_with(selected.values())
            if sent == st.parked:
                in_sync = False
            else:
                self._send(t, st, selected, sent, stamp, step)
        # If the Envoy held all of it before, it holds all of it now (removed names are
        # unsubscribed by the Envoy itself, with the clusters that named them).
        st.basis = (version, st.names_gen) if in_sync else None

    @staticmethod
    def _partial(t: str, st: _SotwType) -> bool:
        """Whether ``t`` goes out in parts on this stream: a named subscription of a type
        whose responses need not hold every resource (``PARTIAL_TYPES``). Its responses
        carry what changed or is missing, and their version is that of what the Envoy then
        holds (``HeldVersions``: the snapshot's type version once it holds it all)."""
        return t in PARTIAL_TYPES and not st.wildcard

    def _ordered_types(self) -> list[str]:
        known = [t for t in PUSH_ORDER if t in self._types]
        return known + sorted(t for t in self._types if t not in PUSH_ORDER)

    def _respond(
        self, t: str, st: _SotwType, snap: Snapshot | None, stamp: float, step: Step, *, force: bool
    ) -> None:
        if snap is None:
            return
        basis = (snap.version(t), st.names_gen)
        if not force and st.basis == basis:
            return  # answered from this snapshot and subscription already: nothing new
        st.basis, st.seen_version = basis, basis[0]
        available = snap.of_type(t)
        if self._partial(t, st):
            lacking = {
                n: available[n]
                for n in sorted(st.names)
                if n in available and st.held.get(n) != available[n].version
            }
            version = st.held.version_with(lacking.values())
            # Nothing lacking, but fewer names held (the Envoy unsubscribed some): an empty
            # response moves the version it reports to what it now holds.
            if (lacking or version != st.sent_version) and version != st.parked:
                self._send(t, st, lacking, version, stamp, step)
            return
        if st.wildcard:
            version = snap.version(t)
            if version == st.parked or (version == st.sent_version and not force):
                return  # nothing new (checked before copying a large set)
            selected = dict(available)
        else:
            selected = {n: available[n] for n in sorted(st.names) if n in available}
            version = type_version(selected)
        if not selected and t not in FULL_STATE_TYPES and not st.wildcard:
            return  # nothing named exists yet; sent once it does
        if version == st.parked:
            return
        if version == st.sent_version and not force:
            return
        self._send(t, st, selected, version, stamp, step)
        if t == CLUSTER:
            self._rewarm(snap, stamp, step)

    def _rewarm(self, snap: Snapshot, stamp: float, step: Step) -> None:
        """After a CDS response: the assignments of the subscribed clusters it changed (see
        "Warming" above)."""
        cds, st = self._types[CLUSTER], self._types.get(ENDPOINT)
        changed, cds.changed = cds.changed, set()
        if st is None or not changed:
            return
        available = snap.of_type(ENDPOINT)
        selected = {n: available[n] for n in sorted(changed & st.names) if n in available}
        version = st.held.version_with(selected.values())
        if selected and version != st.parked:
            self._send(ENDPOINT, st, selected, version, stamp, step)

    def _send(
        self,
        t: str,
        st: _SotwType,
        selected: dict[str, Resource],
        version: str,
        stamp: float,
        step: Step,
    ) -> None:
        if not any(x.awaiting for x in self._types.values()):
            self._sent_at = stamp
        if t == CLUSTER:
            st.changed = {
                n for n, r in selected.items() if n in st.sent and st.sent[n].version != r.version
            }
        if t in PARTIAL_TYPES:
            st.held.hold(selected.values())
        st.nonce = _nonce()
        st.sent_version = version
        st.sent_stamp = stamp
        st.sent = selected
        st.awaiting = True
        step.responses.append(
            EncodedResponse(
                version_info=version, type_url=t, nonce=st.nonce, resources=selected.values()
            )
        )

    def acked_versions(self) -> dict[str, str]:
        return {t: st.acked_version for t, st in self._types.items() if st.acked_version}


# ---------------------------------------------------------------------------------------
# Delta (incremental)


@dataclass
class _Sent:
    versions: dict[str, str | None]  # name -> version sent (None: removal)
    system_version: str
    stamp: float


@dataclass
class _DeltaType:
    wildcard: bool = False
    names: set[str] = field(default_factory=set)
    # What the Envoy holds, by name -> version (as we sent it, or as it told us).
    # A NACKed version stays here, so it is not re-sent until it changes.
    known: dict[str, str] = field(default_factory=dict)
    pending: dict[str, _Sent] = field(default_factory=dict)  # nonce -> what it carried
    responded: bool = False
    names_gen: int = 0  # bumped by every request that subscribes or unsubscribes


class DeltaStream(_Stream[DeltaDiscoveryRequest]):
    """One Delta ADS stream."""

    kind = "delta"

    def __init__(self, node: str) -> None:
        super().__init__(node)
        self._types: dict[str, _DeltaType] = {}
        self._acked: dict[str, str] = {}

    def _busy(self, stamp: float) -> bool:
        """Whether a response is unanswered (and not for longer than FLOW_TIMEOUT)."""
        if self._warming_gone:
            return False
        return any(
            stamp - sent.stamp < FLOW_TIMEOUT
            for st in self._types.values()
            for sent in st.pending.values()
        )

    def _on_request(self, req: DeltaDiscoveryRequest, snap: Snapshot | None, stamp: float) -> Step:
        step = Step()
        t = req.type_url
        st = self._types.get(t)
        first = st is None
        if st is None:
            st = self._types[t] = _DeltaType()
            st.known = dict(req.initial_resource_versions)
            if not req.resource_names_subscribe:
                st.wildcard = True
        for n in req.resource_names_subscribe:
            if n == "*":
                st.wildcard = True
            else:
                st.names.add(n)
        for n in req.resource_names_unsubscribe:
            if n == "*":
                st.wildcard = False
            else:
                st.names.discard(n)
                st.known.pop(n, None)
        if req.resource_names_subscribe or req.resource_names_unsubscribe:
            st.names_gen += 1
        if t == ENDPOINT:
            cds = self._types.get(CLUSTER)
            self._note_warming_gone(st.names, st.names_gen, snap, bool(cds and cds.pending))
        if req.response_nonce:
            sent = st.pending.pop(req.response_nonce, None)
            if t == CLUSTER and sent is not None:
                self._warming_gone = False
                self._gone_checked = None
            if sent is not None:
                if req.HasField("error_detail"):
                    step.nacks.append(Nack(t, sent.system_version, req.error_detail.message))
                else:
                    self._acked[t] = sent.system_version
                    step.acks.append(Ack(t, sent.system_version, sent.stamp))
        sent_before = len(step.responses)
        named = set(req.resource_names_subscribe) | set(req.resource_names_unsubscribe)
        if first or "*" in named:
            self._respond(t, st, snap, stamp, step, upserts=True, removals=True)
        elif named:
            # Only what the subscription change concerns (an ACK alone asks for nothing:
            # snapshot changes arrive through ``on_snapshot``).
            self._respond(t, st, snap, stamp, step, upserts=True, removals=False, only=named)
        if first and snap is not None and len(step.responses) == sent_before:
            # A reconnecting Envoy already holds exactly the current resources (its
            # initial_resource_versions said so): nothing to send, and it is up to date.
            self._acked[t] = snap.version(t)
            step.acks.append(Ack(t, snap.version(t), stamp, pushed=False))
        return step

    def _push(self, snap: Snapshot | None, stamp: float, hint: Hint) -> Step:
        step = Step()
        if snap is None:
            return step
        order = [t for t in PUSH_ORDER if t in self._types]
        order += sorted(t for t in self._types if t not in PUSH_ORDER)
        if hint is not None:
            order = [t for t in order if t in hint]
        for t in order:
            only = hint.get(t) if hint is not None else None
            self._respond(
                t, self._types[t], snap, stamp, step, upserts=True, removals=False, only=only
            )
        for t in reversed(order):
            only = hint.get(t) if hint is not None else None
            self._respond(
                t, self._types[t], snap, stamp, step, upserts=False, removals=True, only=only
            )
        return step

    def _respond(
        self,
        t: str,
        st: _DeltaType,
        snap: Snapshot | None,
        stamp: float,
        step: Step,
        *,
        upserts: bool,
        removals: bool,
        only: set[str] | None = None,
        resend: bool = False,
    ) -> None:
        """``resend``: upserts go out even where the Envoy holds that version already."""
        if snap is None:
            return
        available = snap.of_type(t)
        out: list[Resource] = []
        removed: list[str] = []
        if upserts:
            if only is not None:
                interest: Iterable[str] = (
                    n for n in only if n in available and (st.wildcard or n in st.names)
                )
            else:
                interest = available.keys() if st.wildcard else st.names & available.keys()
            out = [
                available[n]
                for n in sorted(interest)
                if resend or st.known.get(n) != available[n].version
            ]
        if removals:
            candidates: Iterable[str] = only if only is not None else st.known
            removed = sorted(n for n in candidates if n in st.known and n not in available)
        first_wildcard = st.wildcard and not st.responded
        if not out and not removed and not first_wildcard:
            return
        nonce = _nonce()
        versions: dict[str, str | None] = {}
        changed = {r.name for r in out if r.name in st.known} if t == CLUSTER else set()
        for r in out:
            st.known[r.name] = r.version
            versions[r.name] = r.version
        for n in removed:
            del st.known[n]
            versions[n] = None
        st.responded = True
        st.pending[nonce] = _Sent(versions, snap.version(t), stamp)
        while len(st.pending) > _MAX_PENDING:  # an Envoy that never ACKs cannot grow this
            del st.pending[next(iter(st.pending))]
        step.responses.append(
            DeltaDiscoveryResponse(
                system_version_info=snap.version(t),
                type_url=t,
                nonce=nonce,
                resources=[
                    discovery_pb2.Resource(name=r.name, version=r.version, resource=_any(r))
                    for r in out
                ],
                removed_resources=removed,
            )
        )
        if changed and ENDPOINT in self._types:
            # See "Warming" above: the changed clusters' assignments follow.
            self._respond(
                ENDPOINT,
                self._types[ENDPOINT],
                snap,
                stamp,
                step,
                upserts=True,
                removals=False,
                only=changed,
                resend=True,
            )

    def acked_versions(self) -> dict[str, str]:
        return dict(self._acked)
