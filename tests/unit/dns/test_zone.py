"""The pure zone: records, groups, order, text (table-driven, no I/O)."""

from __future__ import annotations

import dataclasses

import pytest

from atlasd.dns.zone import SrvRecord, parse_serial, records, render_zone
from atlasd.model import DownstreamCluster, Fleet, ServicePort, Settings

PORTS = (
    ServicePort("prometheus", 9090),
    ServicePort("thanos", 10901),
    ServicePort("alertmanager", 9093),
)
SETTINGS = Settings()


def cluster(
    name: str, *, replicas: int = 1, group: str | None = None, **kw: object
) -> DownstreamCluster:
    return DownstreamCluster(
        name=name,
        external_ip="192.0.2.10",
        ports=kw.pop("ports", PORTS),  # type: ignore[arg-type]
        replicas=replicas,
        dns_group=group,
    )


def fleet(*clusters: DownstreamCluster, settings: Settings = SETTINGS) -> Fleet:
    return Fleet.of(settings, tuple(clusters))


def srv_lines(zone: str) -> list[str]:
    return [line for line in zone.splitlines() if " IN SRV " in line]


def srv(owner: str, port: int, target: str) -> str:
    return f"{owner} 60 IN SRV 10 100 {port} {target}"


SIDE = "sidecars.thanos.atlas."
MON = "monitoring.svc.cluster.local."

CASES: list[tuple[str, Fleet, list[str]]] = [
    ("no clusters", fleet(), []),
    (
        "one cluster, one replica, thanos only",
        fleet(cluster("east", ports=(ServicePort("thanos", 10901),))),
        [srv(f"_thanos._tcp.{SIDE}", 10901, f"east-thanos-sidecar0.{MON}")],
    ),
    (
        "two replicas",
        fleet(cluster("east", replicas=2, ports=(ServicePort("thanos", 10901),))),
        [
            srv(f"_thanos._tcp.{SIDE}", 10901, f"east-thanos-sidecar0.{MON}"),
            srv(f"_thanos._tcp.{SIDE}", 10901, f"east-thanos-sidecar1.{MON}"),
        ],
    ),
    (
        "group also published under the group name",
        fleet(cluster("west", group="prod", ports=(ServicePort("thanos", 10901),))),
        [
            srv(f"_thanos._tcp.prod.{SIDE}", 10901, f"west-thanos-sidecar0.{MON}"),
            srv(f"_thanos._tcp.{SIDE}", 10901, f"west-thanos-sidecar0.{MON}"),
        ],
    ),
    (
        "every port of the Service, sorted by owner",
        fleet(cluster("east")),
        [
            srv(f"_alertmanager._tcp.{SIDE}", 9093, f"east-thanos-sidecar0.{MON}"),
            srv(f"_prometheus._tcp.{SIDE}", 9090, f"east-thanos-sidecar0.{MON}"),
            srv(f"_thanos._tcp.{SIDE}", 10901, f"east-thanos-sidecar0.{MON}"),
        ],
    ),
    (
        "namespace and cluster domain from settings",
        fleet(
            cluster("east", ports=(ServicePort("thanos", 10901),)),
            settings=Settings(namespace="obs", cluster_domain="k8s.example.org"),
        ),
        [srv(f"_thanos._tcp.{SIDE}", 10901, "east-thanos-sidecar0.obs.svc.k8s.example.org.")],
    ),
    (
        "udp port gets _udp (RFC 2782)",
        fleet(cluster("east", ports=(ServicePort("dns", 53, "UDP"),))),
        [srv(f"_dns._udp.{SIDE}", 53, f"east-thanos-sidecar0.{MON}")],
    ),
    (
        "zero replicas publish nothing",
        fleet(cluster("east", replicas=0)),
        [],
    ),
]


@pytest.mark.parametrize(("fl", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_render_srv_records(fl: Fleet, expected: list[str]) -> None:
    assert srv_lines(render_zone(fl, serial=7)) == expected


def test_zone_header_soa_and_ns() -> None:
    text = render_zone(fleet(), serial=1764000000)
    lines = text.splitlines()
    assert "$ORIGIN atlas." in lines
    assert (
        "atlas. 60 IN SOA atlasd-dns.monitoring.svc.cluster.local. hostmaster.atlas. "
        "1764000000 7200 3600 1209600 30"
    ) in lines
    assert "atlas. 60 IN NS atlasd-dns.monitoring.svc.cluster.local." in lines
    assert text.endswith("\n")
    assert parse_serial(text) == 1764000000


def test_order_does_not_depend_on_cluster_order() -> None:
    a, b, c = cluster("alpha", replicas=3), cluster("bravo", group="g1"), cluster("charlie")
    one = render_zone(fleet(a, b, c), serial=5)
    two = render_zone(fleet(c, a, b), serial=5)
    assert one == two
    assert records(fleet(a, b, c)) == records(fleet(b, c, a))
    # Cluster by cluster in name order, each cluster's records sorted.
    lines = srv_lines(one)
    owners = [line.split()[-1].split("-thanos-sidecar")[0] for line in lines]
    assert owners == sorted(owners)
    for name in ("alpha", "bravo", "charlie"):
        mine = [line for line, o in zip(lines, owners, strict=True) if o == name]
        assert mine == sorted(mine)


def test_records_change_only_with_what_reaches_the_zone() -> None:
    base = cluster("east")
    # The external IP and upstreams are the Envoy's business, not the zone's.
    moved = dataclasses.replace(base, external_ip="192.0.2.99")
    assert records(fleet(base)) == records(fleet(moved))
    for changed in (
        dataclasses.replace(base, replicas=2),
        dataclasses.replace(base, dns_group="prod"),
        dataclasses.replace(base, ports=(ServicePort("thanos", 10902),)),
        dataclasses.replace(base, name="west"),
    ):
        assert records(fleet(base)) != records(fleet(changed))


def test_records_are_deduplicated() -> None:
    dup = cluster("east", ports=(ServicePort("thanos", 10901), ServicePort("thanos", 10901)))
    assert len(records(fleet(dup))) == 1


def test_group_members_are_a_subset() -> None:
    fl = fleet(cluster("a", group="prod"), cluster("b", group="dev"), cluster("c"))
    recs = records(fl)
    prod = {r.target for r in recs if r.owner == f"_thanos._tcp.prod.{SIDE}"}
    dev = {r.target for r in recs if r.owner == f"_thanos._tcp.dev.{SIDE}"}
    everyone = {r.target for r in recs if r.owner == f"_thanos._tcp.{SIDE}"}
    assert prod == {f"a-thanos-sidecar0.{MON}"}
    assert dev == {f"b-thanos-sidecar0.{MON}"}
    assert everyone == prod | dev | {f"c-thanos-sidecar0.{MON}"}


def test_srv_record_text() -> None:
    rec = SrvRecord(owner=f"_thanos._tcp.{SIDE}", target=f"x.{MON}", port=10901)
    assert rec.text() == srv(f"_thanos._tcp.{SIDE}", 10901, f"x.{MON}")


def test_render_5000_clusters_is_deterministic() -> None:
    many = [cluster(f"c{i:05d}", replicas=1 + i % 3, group=f"g{i % 7}") for i in range(5000)]
    one = render_zone(fleet(*many), serial=9)
    two = render_zone(fleet(*reversed(many)), serial=9)
    assert one == two
    # 3 ports x replicas x (everyone + group)
    assert len(srv_lines(one)) == sum(3 * (1 + i % 3) * 2 for i in range(5000))
