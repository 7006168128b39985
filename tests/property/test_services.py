"""One generated cluster Service at a time: rejected with Problems naming exactly the
fields made hostile, or accepted and then every output builds and a sample of them is
accepted by named-checkzone and by a real Envoy."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from hypothesis import example, given, settings
from hypothesis import strategies as st

from atlasd.model import LocalAlertmanager
from tests.property import pipeline
from tests.property.external import ExternalChecks
from tests.property.fieldpath import names_something
from tests.property.outputs import check_desired, check_snapshots, check_zone
from tests.property.profile import CURRENT, examples
from tests.property.report import RESULTS
from tests.property.services import Drawn, cluster_services, expected_problem_fields

ALERTMANAGERS = (
    LocalAlertmanager("alertmanager-main", "monitoring", 9093),
    LocalAlertmanager("am-1", "other", 8080),
)


def bucket(c: pipeline.DownstreamCluster, settings_index: int, ams: int) -> tuple[Any, ...]:
    """A coarse shape of a cluster's outputs: the sample takes one of each first."""
    return (
        settings_index,
        ams,
        ":" in c.external_ip,
        min(c.replicas, 3),
        c.replica_host_template is not None,
        c.dns_group is not None,
        len(c.name) > 40,
        len(c.ports),
    )


def check_one(
    drawn: Drawn,
    settings_index: int,
    ams: int,
    *,
    ext: ExternalChecks,
    stats: Counter[str],
) -> None:
    s = pipeline.SETTINGS[settings_index]
    svc = drawn.service
    stats["examples"] += 1
    expected = expected_problem_fields(drawn)
    clusters, problems = pipeline.validate_fleet([svc], s)
    if expected is None:
        assert clusters == () and problems == (), (clusters, problems)
        stats["not a cluster"] += 1
        return
    for p in problems:
        assert p.source.kind == "Service" and p.reason == "InvalidCluster", p
        assert names_something(svc, p.field), f"{p.field!r} names nothing in the input"
        assert p.message and all(ch.isprintable() for ch in p.message), repr(p.message)
    assert {p.field for p in problems} == expected, [str(p)[:300] for p in problems]
    if expected:
        assert clusters == ()
        stats["rejected"] += 1
        for f in expected:
            stats[f"rejected at {f.split('[')[0]}"] += 1
        return
    [c] = clusters
    stats["accepted"] += 1
    meta, spec = svc["metadata"], svc["spec"]
    assert c.name == meta["name"] and c.replicas == drawn.replicas
    assert c.external_ip == str(pipeline.parse_ip(c.external_ip))
    assert pipeline.canonical_ip(spec["externalIPs"][0]) == c.external_ip
    assert [p.name for p in c.ports] == [p["name"] for p in spec["ports"]]

    out = pipeline.run(clusters, s, alertmanagers=ALERTMANAGERS[:ams])
    check_desired(out, clusters)
    check_zone(out, clusters)
    check_snapshots(out, clusters)
    shape = bucket(c, settings_index, ams)
    ext.offer_zone(out.zone, bucket=shape, origin=svc)
    for snap in out.snapshots.values():
        ext.offer_snapshot(snap, bucket=shape, origin=svc)


def _svc(
    *,
    name: Any = "east",
    ips: Any = ("203.0.113.10",),
    ports: Any = ({"name": "thanos", "port": 10901},),
    labels: dict[str, Any] | None = None,
    annotations: Any = None,
    spec: Any = None,
) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": name,
        "labels": {"goatlas.io/cluster": "true", **(labels or {})},
    }
    if annotations is not None:
        meta["annotations"] = annotations
    if spec is None:
        spec = {"externalIPs": list(ips), "ports": [dict(p) for p in ports]}
    return {"apiVersion": "v1", "kind": "Service", "metadata": meta, "spec": spec}


R = 'metadata.labels["goatlas.io/replicas"]'
A = 'metadata.annotations["goatlas.io/thanos-service-port"]'
# Regressions: each was accepted, silently misread, misreported or crashed before the
# fix in validate.py / addresses.py that this test's first runs led to.
REGRESSIONS = [
    # A YAML number where a string belongs was silently ignored: 1 replica, port 10901.
    Drawn(_svc(labels={"goatlas.io/replicas": 3}), {R}),
    Drawn(_svc(annotations={"goatlas.io/thanos-service-port": 10902}), {A}),
    Drawn(
        _svc(annotations={"goatlas.io/alertmanager-service-port": None}),
        {A.replace("thanos", "alertmanager")},
    ),
    # A numeric name was accepted as the cluster "123".
    Drawn(_svc(name=123), {"metadata.name"}),
    # Annotations that are not an object were silently dropped.
    Drawn(_svc(annotations=["goatlas.io/dns-group=x"]), set(), structural="metadata.annotations"),
    # A 63-character port name passed validation and then stopped the whole zone from
    # rendering (the SRV label "_<name>" has 64): every cluster's DNS went stale.
    Drawn(_svc(ports=({"name": "a" * 63, "port": 1},)), {"spec.ports[0].name"}),
    # A list for spec was reported as missing externalIPs and ports.
    Drawn(_svc(spec=[]), set(), structural="spec"),
    # A string for externalIPs was reported as "at least one external IP is required".
    Drawn(
        _svc(spec={"externalIPs": "192.0.2.1", "ports": [{"name": "t", "port": 1}]}),
        {"spec.externalIPs"},
    ),
    # A list for metadata crashed validate_all (AttributeError): now not a cluster.
    Drawn(
        {"apiVersion": "v1", "kind": "Service", "metadata": ["x"], "spec": {}},
        set(),
        structural="metadata",
    ),
    # Issue 14 part 3: IPv4 inside IPv6 passed the loopback and link-local checks, and
    # a zone index reached Envoy.
    Drawn(_svc(ips=("::ffff:127.0.0.1",)), {"spec.externalIPs[0]"}),
    Drawn(_svc(ips=("::ffff:169.254.169.254",)), {"spec.externalIPs[0]"}),
    Drawn(_svc(ips=("2002:7f00:1::1",)), {"spec.externalIPs[0]"}),
    Drawn(_svc(ips=("2001:db8::1%eth0",)), {"spec.externalIPs[0]"}),
]


def test_each_service_is_rejected_by_field_or_served(tmp_path: Path) -> None:
    ext = ExternalChecks(tmp_path / "checks", zones=CURRENT.zones, envoys=CURRENT.envoys)
    stats: Counter[str] = Counter()

    @settings(max_examples=examples(5000))
    @given(
        drawn=cluster_services(),
        settings_index=st.integers(0, len(pipeline.SETTINGS) - 1),
        ams=st.integers(0, len(ALERTMANAGERS)),
    )
    def prop(drawn: Drawn, settings_index: int, ams: int) -> None:
        check_one(drawn, settings_index, ams, ext=ext, stats=stats)

    for regression in REGRESSIONS:
        prop = example(drawn=regression, settings_index=0, ams=0)(prop)

    prop()
    rejections = ext.finish()
    RESULTS["services"] = {**dict(stats), "external": ext.summary(), "rejections": len(rejections)}
    assert not rejections, "\n\n".join(str(r) for r in rejections)
    # The generator must reach both verdicts in earnest (a test that cannot fail...).
    assert stats["accepted"] >= stats["examples"] // 5, dict(stats)
    assert stats["rejected"] >= stats["examples"] // 5, dict(stats)
