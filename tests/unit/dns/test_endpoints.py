"""Thanos Query's endpoint configuration: content, groups, incremental = full, sizing."""

from __future__ import annotations

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from atlasd.dns.endpoints import (
    ALL_KEY,
    MAX_CONFIGMAP_BYTES,
    UNGROUPED_KEY,
    EndpointState,
    configmaps,
    data_bytes,
    render_files,
)
from atlasd.dns.zone import InvalidZoneInput, ZoneError, records
from atlasd.model import DownstreamCluster, Fleet, ServicePort, Settings

SETTINGS = Settings(namespace="obs")
PORTS = (ServicePort("prometheus", 9090), ServicePort("thanos", 10901))


def cluster(
    name: str, *, replicas: int = 1, group: str | None = None, port: int = 10901
) -> DownstreamCluster:
    return DownstreamCluster(
        name=name,
        external_ip="192.0.2.1",
        ports=(ServicePort("prometheus", 9090), ServicePort("thanos", port)),
        replicas=replicas,
        dns_group=group,
    )


def addresses(text: str) -> list[str]:
    doc = yaml.safe_load(text)
    assert set(doc) == {"endpoints"}
    return [e["address"] for e in doc["endpoints"]]


def test_lists_the_zones_thanos_srv_records_without_dns() -> None:
    fleet = Fleet.of(SETTINGS, [cluster("west", replicas=2), cluster("east")])
    files = render_files(fleet)
    assert list(files) == [ALL_KEY]
    assert addresses(files[ALL_KEY]) == [
        "east-thanos-sidecar0.obs.svc.cluster.local:10901",
        "west-thanos-sidecar0.obs.svc.cluster.local:10901",
        "west-thanos-sidecar1.obs.svc.cluster.local:10901",
    ]
    # Exactly the targets and ports of the zone's _thanos._tcp records.
    srv = sorted(
        f"{r.target[:-1]}:{r.port}"
        for r in records(fleet)
        if r.owner == "_thanos._tcp.sidecars.thanos.atlas."
    )
    assert sorted(addresses(files[ALL_KEY])) == srv


def test_empty_fleet_is_an_empty_list_thanos_accepts() -> None:
    files = render_files(Fleet.of(SETTINGS))
    assert yaml.safe_load(files[ALL_KEY]) == {"endpoints": []}


def test_groups_get_their_own_file_and_ungrouped_the_rest() -> None:
    fleet = Fleet.of(
        SETTINGS,
        [cluster("a", group="prod"), cluster("b", group="dev"), cluster("c"), cluster("d")],
    )
    files = render_files(fleet)
    assert sorted(files) == [ALL_KEY, "group-dev.yaml", "group-prod.yaml", UNGROUPED_KEY]
    assert addresses(files["group-prod.yaml"]) == ["a-thanos-sidecar0.obs.svc.cluster.local:10901"]
    assert addresses(files["group-dev.yaml"]) == ["b-thanos-sidecar0.obs.svc.cluster.local:10901"]
    assert [a.split("-")[0] for a in addresses(files[UNGROUPED_KEY])] == ["c", "d"]
    # Every cluster exactly once across the partition files.
    partition = [a for k, t in files.items() if k != ALL_KEY for a in addresses(t)]
    assert sorted(partition) == sorted(addresses(files[ALL_KEY]))


def test_port_name_is_configurable() -> None:
    s = Settings(namespace="obs", thanos_endpoints_port_name="prometheus")
    files = render_files(Fleet.of(s, [cluster("a")]))
    assert addresses(files[ALL_KEY]) == ["a-thanos-sidecar0.obs.svc.cluster.local:9090"]


def test_hostile_name_raises_instead_of_writing() -> None:
    bad = DownstreamCluster(name="a\nendpoints: []", external_ip="192.0.2.1", ports=PORTS)
    with pytest.raises(InvalidZoneInput):
        render_files(Fleet.of(SETTINGS, [bad]))
    state = EndpointState()
    state.update(Fleet.of(SETTINGS, [cluster("ok")]))
    before = state.files()
    with pytest.raises(ZoneError):
        state.update(Fleet.of(SETTINGS, [cluster("ok"), bad]), {bad.name})
    assert state.files() == before


def test_update_reports_only_the_files_that_changed() -> None:
    state = EndpointState()
    base = [cluster("a", group="prod"), cluster("b")]
    assert state.update(Fleet.of(SETTINGS, base)) == {ALL_KEY, "group-prod.yaml", UNGROUPED_KEY}
    # An external IP change is not in the files.
    moved = DownstreamCluster(name="b", external_ip="192.0.2.9", ports=cluster("b").ports)
    assert state.update(Fleet.of(SETTINGS, [base[0], moved]), {"b"}) == set()
    # A new ungrouped cluster touches the fleet file and ungrouped only.
    fleet = Fleet.of(SETTINGS, [*base, cluster("c")])
    assert state.update(fleet, {"c"}) == {ALL_KEY, UNGROUPED_KEY}
    # The last group goes: its file goes, and so does ungrouped.yaml.
    fleet = Fleet.of(SETTINGS, [base[1], cluster("c")])
    assert state.update(fleet, {"a"}) == {ALL_KEY, "group-prod.yaml", UNGROUPED_KEY}
    assert state.keys() == [ALL_KEY]
    assert state.text("group-prod.yaml") is None
    assert state.text(UNGROUPED_KEY) is None


_NAMES = st.sampled_from([f"c{i}" for i in range(8)])
_CLUSTER = st.builds(
    lambda name, replicas, group, port: cluster(name, replicas=replicas, group=group, port=port),
    _NAMES,
    st.integers(0, 3),
    st.sampled_from([None, None, "prod", "dev", "x-1"]),
    st.sampled_from([10901, 10902]),
)
# One step: clusters to put (add or change) and names to remove.
_STEP = st.tuples(st.lists(_CLUSTER, max_size=4), st.lists(_NAMES, max_size=3))


@settings(max_examples=300, deadline=None)
@given(steps=st.lists(_STEP, min_size=1, max_size=10), full_every=st.integers(2, 5))
def test_incremental_equals_full_render_after_any_changes(
    steps: list[tuple[list[DownstreamCluster], list[str]]], full_every: int
) -> None:
    state = EndpointState()
    current: dict[str, DownstreamCluster] = {}
    previous_files: dict[str, str] = {}
    for i, (puts, removes) in enumerate(steps):
        changed = {c.name for c in puts} | set(removes)
        for c in puts:
            current[c.name] = c
        for name in removes:
            current.pop(name, None)
        fleet = Fleet.of(SETTINGS, current.values())
        # Sometimes a full pass (changed=None), as at start or after a resync.
        dirty = state.update(fleet, None if i % full_every == 0 else changed)
        expected = render_files(fleet)
        assert state.files() == expected
        # The counts kept as clusters come and go are the endpoints each file lists.
        assert state.endpoint_counts() == {
            k: text.count("\n- address: ") for k, text in expected.items()
        }
        # Every file that differs from the previous step was reported.
        differs = {
            k
            for k in set(expected) | set(previous_files)
            if expected.get(k) != previous_files.get(k)
        }
        assert differs <= dirty
        previous_files = expected


def big_fleet(n: int, *, name_len: int, replicas: int = 1, groups: int = 0) -> Fleet:
    def name(i: int) -> str:
        base = f"c{i:05d}-"
        return (base + "x" * name_len)[:name_len]

    return Fleet.of(
        Settings(),
        [
            DownstreamCluster(
                name=name(i),
                external_ip="192.0.2.1",
                ports=(ServicePort("thanos", 10901),),
                replicas=replicas,
                dns_group=f"g{i % groups}" if groups else None,
            )
            for i in range(n)
        ],
    )


def test_ten_thousand_clusters_fit_each_configmap() -> None:
    """The sizing docs/dns.md states: 10,000 single-replica clusters with 36-character
    names, in DNS groups, fit both ConfigMaps (the fleet list; the groups)."""
    fleet = big_fleet(10_000, name_len=36, groups=20)
    state = EndpointState()
    state.update(fleet)
    cms = configmaps(fleet.settings, state.files())
    sizes = {name: data_bytes(cm["data"]) for name, cm in cms.items()}
    assert set(sizes) == {"atlas-thanos-endpoints", "atlas-thanos-endpoints-groups"}
    assert all(size <= MAX_CONFIGMAP_BYTES for size in sizes.values()), sizes
    assert sizes["atlas-thanos-endpoints"] > 0.95 * MAX_CONFIGMAP_BYTES  # the bound is tight
    assert list(cms["atlas-thanos-endpoints"]["data"]) == [ALL_KEY]
    assert len(cms["atlas-thanos-endpoints-groups"]["data"]) == 21  # 20 groups + ungrouped
    assert sum(state.endpoint_counts()[k] for k in state.keys() if k != ALL_KEY) == 10_000  # noqa: SIM118
    # Twice the sidecars (two replicas) do not fit: the writer then skips that ConfigMap.
    state2 = EndpointState()
    state2.update(big_fleet(10_000, name_len=36, replicas=2))
    cm = configmaps(fleet.settings, state2.files())["atlas-thanos-endpoints"]
    assert data_bytes(cm["data"]) > MAX_CONFIGMAP_BYTES


def test_configmaps_exist_even_without_groups() -> None:
    cms = configmaps(SETTINGS, render_files(Fleet.of(SETTINGS, [cluster("a")])))
    assert cms["atlas-thanos-endpoints-groups"]["data"] == {}
    assert cms["atlas-thanos-endpoints"]["metadata"]["namespace"] == "obs"
