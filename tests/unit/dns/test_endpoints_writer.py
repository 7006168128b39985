"""The endpoint-configuration writer: files per key, only on change, ConfigMaps, metrics."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import pytest
import trio
import yaml
from prometheus_client import REGISTRY

from atlasd.dns.endpoints import ALL_KEY, UNGROUPED_KEY, render_files
from atlasd.dns.endpoints_writer import run_endpoints_writer
from atlasd.dns.writer import ZoneUpdate
from atlasd.kube.errors import Forbidden
from atlasd.model import DownstreamCluster, Fleet, ServicePort, Settings
from tests.unit.fakekube import FakeKube

SETTINGS = Settings(namespace="obs")
OWNER = "_thanos._tcp.sidecars.thanos.atlas."


def cluster(name: str, *, group: str | None = None) -> DownstreamCluster:
    return DownstreamCluster(
        name=name, external_ip="192.0.2.1", ports=(ServicePort("thanos", 10901),), dns_group=group
    )


def fleet(*clusters: DownstreamCluster) -> Fleet:
    return Fleet.of(SETTINGS, clusters)


def on_disk(path: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(path.iterdir())}


class Writer:
    """A running writer fed one update at a time; ``passes`` records what it published."""

    def __init__(self, path: Path, kube: FakeKube | None) -> None:
        self.path = path
        self.kube = kube
        self.passes: list[dict[str, str]] = []
        self.send, self.recv = trio.open_memory_channel[Fleet | ZoneUpdate](100)

    def record(self, files: Mapping[str, str]) -> None:
        self.passes.append(dict(files))

    async def start(self, nursery: trio.Nursery) -> None:
        await nursery.start(
            lambda task_status: run_endpoints_writer(
                fleets=self.recv,
                path=self.path,
                kube=self.kube,  # type: ignore[arg-type]
                settings=SETTINGS,
                on_files=self.record,
                task_status=task_status,
            )
        )

    async def put(self, item: Fleet | ZoneUpdate) -> None:
        """Send ``item`` and wait (with a deadline) for the pass that publishes it."""
        count = len(self.passes)
        await self.send.send(item)
        with trio.fail_after(5):
            while len(self.passes) == count:  # noqa: ASYNC110 - polls what on_files records
                await trio.sleep(0.005)


async def test_files_follow_the_fleet_key_by_key(tmp_path: Path) -> None:
    out = tmp_path / "endpoints"
    w = Writer(out, None)
    async with trio.open_nursery() as nursery:
        await w.start(nursery)
        await w.put(fleet(cluster("a"), cluster("b")))
        assert on_disk(out) == render_files(fleet(cluster("a"), cluster("b")))
        inode = (out / ALL_KEY).stat().st_ino

        # A group appears: its file and ungrouped.yaml are written.
        f2 = fleet(cluster("a", group="prod"), cluster("b"))
        await w.put(ZoneUpdate(f2, frozenset({"a"})))
        assert on_disk(out) == render_files(f2)
        assert sorted(on_disk(out)) == [ALL_KEY, "group-prod.yaml", UNGROUPED_KEY]
        # all.yaml did not change (same addresses): not rewritten.
        assert (out / ALL_KEY).stat().st_ino == inode

        # The group empties: its file and ungrouped.yaml are removed.
        f3 = fleet(cluster("b"))
        await w.put(ZoneUpdate(f3, frozenset({"a"})))
        assert on_disk(out) == render_files(f3)
        w.send.close()
    assert len(w.passes) == 3
    assert not [n for n in os.listdir(out) if n.startswith(".")]  # no temp files left


async def test_restart_keeps_equal_files_and_removes_stale_ones(tmp_path: Path) -> None:
    out = tmp_path / "endpoints"
    out.mkdir()
    current = render_files(fleet(cluster("a")))
    (out / ALL_KEY).write_text(current[ALL_KEY])
    (out / "group-old.yaml").write_text("endpoints: []\n")
    (out / "unrelated.txt").write_text("mine\n")
    inode = (out / ALL_KEY).stat().st_ino
    w = Writer(out, None)
    async with trio.open_nursery() as nursery:
        await w.start(nursery)
        await w.put(fleet(cluster("a")))
        w.send.close()
    assert sorted(os.listdir(out)) == [ALL_KEY, "unrelated.txt"]
    assert (out / ALL_KEY).stat().st_ino == inode


async def test_configmaps_hold_the_files(tmp_path: Path) -> None:
    kube = FakeKube()
    w = Writer(tmp_path / "e", kube)
    f = fleet(cluster("a", group="prod"), cluster("b"))
    async with trio.open_nursery() as nursery:
        await w.start(nursery)
        await w.put(f)
        with trio.fail_after(5):
            while kube.get_stored("configmaps", "atlas-thanos-endpoints-groups") is None:  # noqa: ASYNC110
                await trio.sleep(0.01)
        w.send.close()
    main = kube.get_stored("configmaps", "atlas-thanos-endpoints")
    groups = kube.get_stored("configmaps", "atlas-thanos-endpoints-groups")
    assert main is not None and groups is not None
    files = render_files(f)
    assert main["data"] == {ALL_KEY: files[ALL_KEY]}
    assert groups["data"] == {k: v for k, v in files.items() if k != ALL_KEY}
    assert yaml.safe_load(main["data"][ALL_KEY])["endpoints"]
    where = {(plural, ns) for _, plural, ns, _ in kube.calls}
    assert where == {("configmaps", "obs")}


async def test_forbidden_configmap_stops_the_writer(tmp_path: Path) -> None:
    kube = FakeKube()
    kube.fail[("apply", "atlas-thanos-endpoints")] = Forbidden(
        status=403, reason="Forbidden", message="", verb="apply", resource="configmaps"
    )
    w = Writer(tmp_path / "e", kube)
    with pytest.RaisesGroup(Forbidden, flatten_subgroups=True):
        async with trio.open_nursery() as nursery:
            await w.start(nursery)
            await w.send.send(fleet(cluster("a")))
            await trio.sleep_forever()


async def test_endpoint_counts_metric(tmp_path: Path) -> None:
    w = Writer(tmp_path / "e", None)
    async with trio.open_nursery() as nursery:
        await w.start(nursery)
        await w.put(fleet(*(cluster(f"c{i:05d}") for i in range(3)), cluster("g", group="prod")))
        assert REGISTRY.get_sample_value("atlasd_thanos_endpoints", {"file": ALL_KEY}) == 4
        assert (
            REGISTRY.get_sample_value("atlasd_thanos_endpoints", {"file": "group-prod.yaml"}) == 1
        )
        await w.put(ZoneUpdate(fleet(cluster("a")), None))
        assert REGISTRY.get_sample_value("atlasd_thanos_endpoints", {"file": ALL_KEY}) == 1
        # The group emptied: its file, and its series, are gone.
        assert (
            REGISTRY.get_sample_value("atlasd_thanos_endpoints", {"file": "group-prod.yaml"})
            is None
        )
        w.send.close()
