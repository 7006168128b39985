"""Several cluster Services at once: duplicate addresses (in any spelling), duplicate
names, names of another cluster's sidecar Services, Services that are no clusters.

The rule (validate's docstring): the oldest Service (``creationTimestamp``, then name)
keeps a name or an address; every later one gets a Problem (``metadata.name`` or
``spec.externalIPs[0]``). So the accepted set has unique names and unique addresses,
every rejected cluster Service has a Problem, and the outputs build for that set — also
through one ``SnapshotBuilder`` kept across examples, whose memo must give exactly what a
fresh builder gives.
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hypothesis import example, given, settings
from hypothesis import strategies as st

from tests.property import pipeline
from tests.property.external import ExternalChecks
from tests.property.outputs import check_desired, check_snapshots, check_zone
from tests.property.profile import CURRENT, examples
from tests.property.report import RESULTS
from tests.property.services import (
    SIDECAR_INFIX,
    Drawn,
    cluster_services,
    expected_problem_fields,
)
from tests.property.test_services import ALERTMANAGERS


@dataclass
class Member:
    drawn: Drawn
    uid: str
    cluster: bool = True  # labeled goatlas.io/cluster: "true"


def other_spelling(ip: str) -> str:
    """The same address written differently (atlasd.addresses canonicalizes both)."""
    a = ipaddress.ip_address(ip)
    if isinstance(a, ipaddress.IPv4Address):
        return f"::ffff:{a}"
    if a.ipv4_mapped is not None:
        return str(a.ipv4_mapped)
    return a.exploded.upper()


@st.composite
def fleets(draw: st.DrawFn) -> list[Member]:
    members: list[Member] = []
    for i in range(draw(st.integers(2, 6))):
        uid = f"uid-{i}"
        accepted_before = [
            m.drawn for m in members if m.cluster and expected_problem_fields(m.drawn) == set()
        ]
        how = draw(
            st.sampled_from(["fresh", "same-ip", "other-spelling", "same-name", "sidecar", "plain"])
        )
        hostile = draw(st.integers(0, 3)) == 0
        name = ip = None
        if accepted_before and how != "fresh":
            prev = draw(st.sampled_from(accepted_before))
            if how == "same-ip":
                ip = prev.service["spec"]["externalIPs"][0]
            elif how == "other-spelling":
                ip = other_spelling(prev.service["spec"]["externalIPs"][0])
            elif how == "same-name":
                name = prev.name
            elif how == "sidecar":
                name = f"{prev.name}{SIDECAR_INFIX}{draw(st.integers(0, 3))}"
        d = draw(cluster_services(name=name, ip=ip, uid=uid, hostile=hostile))
        if how == "sidecar" and name is not None:
            d.tainted.add("metadata.name")
        m = Member(d, uid)
        if how == "plain":  # a Service in the namespace that is not a cluster
            meta = d.service["metadata"]
            lbls = meta.get("labels") if isinstance(meta, dict) else None
            if isinstance(lbls, dict):
                lbls["goatlas.io/cluster"] = draw(st.sampled_from(["false", "True", ""]))
            m.cluster = False
        members.append(m)
    return members


def age_key(m: Member) -> tuple[str, str]:
    meta = m.drawn.service["metadata"]
    if not isinstance(meta, dict):
        return ("~", "")
    return (str(meta.get("creationTimestamp") or "~"), str(meta.get("name", "")))


def expected_verdicts(members: list[Member]) -> dict[str, set[str] | None]:
    """uid -> the Problem fields expected (empty: accepted; None: not a cluster)."""
    out: dict[str, set[str] | None] = {}
    names: set[str] = set()
    addresses: set[str] = set()
    for m in sorted(members, key=age_key):  # stable: input order breaks ties
        alone = expected_problem_fields(m.drawn) if m.cluster else None
        if alone is None or alone:
            out[m.uid] = alone
            continue
        name = m.drawn.name
        address = pipeline.canonical_ip(m.drawn.service["spec"]["externalIPs"][0])
        if name in names:
            out[m.uid] = {"metadata.name"}
        elif address in addresses:
            out[m.uid] = {"spec.externalIPs[0]"}
        else:
            out[m.uid] = set()
            names.add(name)
            addresses.add(address)
    return out


def _member(name: str, ip: str, uid: str, when: str | None = None) -> Member:
    service: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": name,
            "namespace": "monitoring",
            "uid": uid,
            "labels": {"goatlas.io/cluster": "true"},
            **({"creationTimestamp": when} if when else {}),
        },
        "spec": {"externalIPs": [ip], "ports": [{"name": "thanos", "port": 10901}]},
    }
    return Member(Drawn(service=service), uid)


# Regressions: defects found by this test, fixed in validate.py.
# Two Services named alike were both accepted: the atlas node then held two clusters
# "east-thanos" (an inconsistent snapshot, not published: every cluster lost service).
DUPLICATE_NAMES = [
    _member("east", "192.0.2.1", "uid-0", "2026-01-01T00:00:00Z"),
    _member("east", "192.0.2.2", "uid-1", "2026-02-01T00:00:00Z"),
]
# One host written as IPv4 and as IPv4-mapped IPv6 was two clusters dialling one Envoy.
MAPPED_DUPLICATE = [
    _member("east", "192.0.2.1", "uid-0"),
    _member("west", "::ffff:192.0.2.1", "uid-1"),
]


HOLDER = re.compile(r"is already used by cluster '([^']+)'$")


def check_fleet(
    members: list[Member],
    settings_index: int,
    ams: int,
    *,
    ext: ExternalChecks,
    stats: Counter[str],
    builders: dict[int, Any],
) -> None:
    s = pipeline.SETTINGS[settings_index]
    stats["examples"] += 1
    stats["services"] += len(members)
    want = expected_verdicts(members)
    clusters, problems = pipeline.validate_fleet([m.drawn.service for m in members], s)

    names = [c.name for c in clusters]
    assert len(names) == len(set(names)), names
    ips = [pipeline.canonical_ip(c.external_ip) for c in clusters]
    assert len(ips) == len(set(ips)), ips
    got: dict[str, set[str]] = {}
    for p in problems:
        got.setdefault(p.source.uid, set()).add(p.field)
        holder = HOLDER.search(p.message)
        if holder:  # the cluster named as holding the address is one that was accepted
            assert holder[1] in names, p.message
    accepted = {c.source.uid for c in clusters if c.source is not None}
    for uid, fields in want.items():
        if fields is None:
            assert uid not in accepted and uid not in got, uid
        elif fields:
            assert uid not in accepted and got.get(uid) == fields, (uid, fields, got.get(uid))
            stats["rejected"] += 1
        else:
            assert uid in accepted and uid not in got, (uid, got.get(uid))
            stats["accepted"] += 1
    stats["fleet duplicates"] += sum(
        1 for f in want.values() if f in ({"metadata.name"}, {"spec.externalIPs[0]"})
    )

    out = pipeline.run(clusters, s, alertmanagers=ALERTMANAGERS[:ams])
    check_desired(out, clusters)
    check_zone(out, clusters)
    check_snapshots(out, clusters)
    # The memoizing builder, fed one fleet after another, agrees with a fresh one.
    builder = builders.setdefault(settings_index, pipeline.new_builder(s))
    kept = pipeline.snapshots(out.desired.fleet, builder)
    assert {n: dict(v.versions) for n, v in kept.items()} == {
        n: dict(v.versions) for n, v in out.snapshots.items()
    }
    shape = (settings_index, ams, len(clusters))
    ext.offer_zone(out.zone, bucket=shape, origin=[m.drawn.service for m in members])
    for snap in out.snapshots.values():
        ext.offer_snapshot(snap, bucket=shape, origin=[m.drawn.service for m in members])


def test_a_fleet_keeps_unique_names_and_addresses(tmp_path: Path) -> None:
    ext = ExternalChecks(tmp_path / "checks", zones=CURRENT.zones, envoys=CURRENT.envoys)
    stats: Counter[str] = Counter()
    builders: dict[int, Any] = {}

    @settings(max_examples=examples(500))
    @given(
        members=fleets(),
        settings_index=st.integers(0, len(pipeline.SETTINGS) - 1),
        ams=st.integers(0, len(ALERTMANAGERS)),
    )
    @example(members=DUPLICATE_NAMES, settings_index=0, ams=0)
    @example(members=MAPPED_DUPLICATE, settings_index=0, ams=1)
    def prop(members: list[Member], settings_index: int, ams: int) -> None:
        check_fleet(members, settings_index, ams, ext=ext, stats=stats, builders=builders)

    prop()
    rejections = ext.finish()
    RESULTS["fleet"] = {**dict(stats), "external": ext.summary(), "rejections": len(rejections)}
    assert not rejections, "\n\n".join(str(r) for r in rejections)
    assert stats["fleet duplicates"] >= stats["examples"] // 4, dict(stats)
