"""What atlasd reports about the fleet: the ``/status`` parts kept key by key, the
certificate gauges, and the ADS streams (``/status/envoys``).

``run_status`` is the subsystem: fleet versions in, per-key status parts and gauges out
(a change of one cluster costs that cluster), plus the list of Envoy streams, woken by the
stream board's changes. The document's schema is ``atlasd.hub.StatusDocument``.
"""

from __future__ import annotations

from typing import Any

import trio

from atlasd import metrics
from atlasd.fleet.feed import FleetFeed
from atlasd.fleet.keys import FLEET_KEY
from atlasd.fleet.state import CertInfo, FleetVersion, Member
from atlasd.hub import CertDoc, ProblemDoc, StatusHub
from atlasd.model import Problem
from atlasd.xds.cache import SnapshotCache
from atlasd.xds.snapshot import SHORT_NAMES
from atlasd.xds.streams import EnvoyStatus


def _problem_doc(p: Problem) -> ProblemDoc:
    return {
        "object": f"{p.source.kind}/{p.source.name}",
        "field": p.field,
        "message": p.brief(),
        "reason": p.reason,
    }


def _cert_docs(certs: tuple[CertInfo, ...], serial: str | None = None) -> list[CertDoc]:
    out: list[CertDoc] = []
    for c in certs:
        doc: CertDoc = {"name": c.name, "not_after": c.not_after}
        if c.name == "ca" and serial is not None:
            doc["serial"] = serial
        out.append(doc)
    return out


class FleetReport:
    """/status parts and gauges, kept key by key (a change of one cluster costs that
    cluster). Invariants: ``_states[key]`` is the state last reported for ``key``;
    ``_exported[key]`` the certificates whose gauges it set (``metrics.KeyedGauge``)."""

    def __init__(self, hub: StatusHub) -> None:
        self.hub = hub
        self._states: dict[str, str] = {}
        self._counts: dict[str, int] = {}
        self._exported: dict[str, tuple[CertInfo, ...]] = {}

    def update(self, version: FleetVersion, keys: frozenset[str]) -> None:
        hub = self.hub
        for key in keys:
            if key == FLEET_KEY:
                fw = version.fleetwide
                serial = fw.ca.serial if fw.ca is not None else None
                hub.publish_keyed("certificates", "", _cert_docs(fw.certificates, serial))
                hub.publish_keyed("problems", "", [_problem_doc(p) for p in fw.problems])
                self._export(key, fw.certificates)
                metrics.REVOKED.set(sum(len(r.hashes) for r in fw.revocations.values()))
                continue
            m = version.members.get(key)
            # A change in a cluster's revocations marks its key changed (FleetState).
            revoked = version.fleetwide.revocations.get(key)
            self._member(key, m, len(revoked.hashes) if revoked is not None else 0)
        metrics.CLUSTERS.set(self._counts.get("served", 0))
        metrics.PENDING.set(self._counts.get("pending", 0))
        metrics.INVALID.set(self._counts.get("invalid", 0))

    def _set_state(self, key: str, state: str | None) -> None:
        old = self._states.pop(key, None)
        if old is not None:
            self._counts[old] -= 1
        if state is not None:
            self._states[key] = state
            self._counts[state] = self._counts.get(state, 0) + 1

    def _member(self, key: str, m: Member | None, revoked: int) -> None:
        hub = self.hub
        if m is None:
            self._set_state(key, None)
            for section in ("clusters", "pending", "problems", "certificates"):
                hub.publish_keyed(section, key, None)
            self._export(key, ())
            return
        state = m.state
        if state == "absent" and m.problems:
            state = "invalid"  # a Service whose cluster label is not exactly "true"
        self._set_state(key, state)
        served = m.state == "served" and m.cluster is not None
        certs = m.certificates if served else ()
        c = m.cluster
        expiry = [x.not_after for x in certs if x.not_after is not None]
        hub.publish_keyed(
            "clusters",
            key,
            [
                {
                    "name": c.name,
                    "external_ip": c.external_ip,
                    "replicas": c.replicas,
                    "dns_group": c.dns_group,
                    "sidecars": list(c.sidecar_services()),
                    # "enrollment": its agent holds its keys and atlasd does not know
                    # their expiry (certificate_expiry null); "compatible": atlasd's.
                    "mode": "enrollment" if c.enrolled else "compatible",
                    "certificate_expiry": min(expiry) if expiry else None,
                    # Its certificates revoked and still in force (atlasd cluster revoke).
                    "revoked_certificates": revoked,
                }
            ]
            if served and c is not None
            else None,
        )
        hub.publish_keyed("pending", key, [key] if m.state == "pending" else None)
        hub.publish_keyed("problems", key, [_problem_doc(p) for p in m.problems])
        hub.publish_keyed("certificates", key, _cert_docs(certs))
        self._export(key, certs)

    def _export(self, key: str, certs: tuple[CertInfo, ...]) -> None:
        if self._exported.get(key) == certs:
            return
        if certs:
            self._exported[key] = certs
        else:
            self._exported.pop(key, None)
        metrics.CERT_EXPIRY.set_key(
            key, {c.name: c.not_after for c in certs if c.not_after is not None}
        )
        metrics.CERT_RENEWAL.set_key(
            key, {c.name: c.renew_at for c in certs if c.renew_at is not None}
        )


async def run_status(
    *,
    feed: FleetFeed,
    hub: StatusHub,
    cache: SnapshotCache,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Fleet versions -> /status parts and gauges; Envoy streams -> /status ``envoys``
    (woken by the streams' changes, published at most twice a second; nothing while idle)."""
    report = FleetReport(hub)
    task_status.started()
    wake = trio.Event()
    wake.set()  # publish the first (empty) list at once

    def changed() -> None:
        wake.set()

    async def envoys() -> None:
        nonlocal wake
        made = EnvoyDocs()
        while True:
            await wake.wait()
            wake = trio.Event()
            docs, changed = made(cache.status())
            if changed:
                hub.publish(envoys=docs)
            await trio.sleep(0.5)

    stop_listening = cache.board.listen(changed)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(envoys)
            async for update in feed.subscribe():
                report.update(update.version, update.changed)
    finally:
        stop_listening()


class EnvoyDocs:
    """The documents of the ADS streams, each made again only when its stream's status
    changed (a status is replaced, never mutated, on every ACK or NACK): at 2,500 streams
    on a replica, converting every one on each change (``dataclasses.asdict``) took a third
    to two thirds of the replica's CPU through a CA rotation (bench/README.md). Each is
    ``EnvoyStatus.as_dict`` (~6 us; ``asdict`` took ~170 us, and after a rotation, with
    every stream's status new, one read of 2,000 held the event loop 0.2-1.2 s: the
    watchdog's stalls in the soak at scale). The
    documents returned are never mutated afterwards."""

    def __init__(self) -> None:
        self._made: dict[int, tuple[EnvoyStatus, dict[str, Any]]] = {}

    def __call__(self, statuses: list[EnvoyStatus]) -> tuple[list[dict[str, Any]], bool]:
        """The documents of ``statuses`` (in their order), and whether any differs from
        the previous call's."""
        made: dict[int, tuple[EnvoyStatus, dict[str, Any]]] = {}
        docs = []
        changed = len(statuses) != len(self._made)
        for st in statuses:
            kept = self._made.get(st.stream_id)
            if kept is not None and kept[0] is st:
                doc = kept[1]
            else:
                doc, changed = dict(st.as_dict()), True
            made[st.stream_id] = (st, doc)
            docs.append(doc)
        self._made = made
        return docs, changed


def envoys_now(cache: SnapshotCache, made: EnvoyDocs) -> dict[str, Any]:
    """``/status/envoys``: every open ADS stream, for each node streaming the versions it
    should be at (its current snapshot), and how many nodes have a snapshot. Read at request
    time; small whatever the fleet's size (benchmarks poll it). ``made``: the documents
    kept from the previous read (only changed streams are converted again)."""
    docs, _ = made(cache.status())
    snapshots = {}
    for node in {d["node"] for d in docs}:
        snap = cache.get(node)
        if snap is not None:
            snapshots[node] = {
                SHORT_NAMES.get(t, t): v for t, v in snap.versions.items() if snap.of_type(t)
            }
    return {"envoys": docs, "snapshots": snapshots, "nodes": len(cache)}
