"""atlasd's zone writer feeding a real CoreDNS (file plugin, reload 1s).

What a Thanos Query would see: the SRV answers for every port, for the whole fleet and
per group, after clusters are added, removed, scaled and moved between groups; the SOA
serial growing across a writer restart; and a zone file that is never seen half-written.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from atlasd.dns.writer import run_zone_writer
from atlasd.dns.zone import parse_serial, records
from atlasd.model import DownstreamCluster, Fleet, ServicePort, Settings
from tests.harness import components
from tests.harness.coredns import CoreDNS
from tests.harness.feed import Fed, fed
from tests.harness.wait import wait_until_async

pytestmark = pytest.mark.integration

SETTINGS = Settings(namespace="monitoring")
ALL = "_thanos._tcp.sidecars.thanos.atlas."
PORTS = (ServicePort("thanos", 10901), ServicePort("prometheus", 9090))


def cl(name: str, *, replicas: int = 1, group: str | None = None) -> DownstreamCluster:
    return DownstreamCluster(
        name=name, external_ip="203.0.113.1", ports=PORTS, replicas=replicas, dns_group=group
    )


def fleet(*clusters: DownstreamCluster) -> Fleet:
    return Fleet.of(SETTINGS, clusters)


def expected(fl: Fleet, owner: str) -> list[str]:
    """What CoreDNS must answer for ``owner``: the writer's records, as rdata text."""
    return sorted(
        f"{r.priority} {r.weight} {r.port} {r.target}" for r in records(fl) if r.owner == owner
    )


@asynccontextmanager
async def zone_writer(path: Path, **kw: Any) -> AsyncIterator[Fed]:
    """The zone writer on ``path``: ``push`` waits for the write, ``seen`` lists the zones
    written, ``started`` is its ZoneState."""
    async with fed(
        run_zone_writer, callback="on_zone", path=path, kube=None, settings=SETTINGS, **kw
    ) as w:
        yield w


def checkzone(path: Path) -> None:
    """BIND's verdict on the file as written (out-of-zone lookups skipped: "-i local")."""
    binary = components.apt("named-checkzone")
    proc = subprocess.run(
        [str(binary), "-i", "local", "atlas.", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


async def answers(server: CoreDNS, name: str) -> list[str]:
    # TCP: a 40-record answer does not fit a plain 512-byte UDP reply (resolvers, Go's
    # included, retry over TCP when the reply is truncated).
    return await trio.to_thread.run_sync(lambda: server.query(name, "SRV", tcp=True))


async def serves(server: CoreDNS, fl: Fleet, *owners: str) -> None:
    """Wait until CoreDNS answers every ``owner`` exactly as the fleet's records say."""
    for owner in owners or (ALL,):
        want = expected(fl, owner)

        async def match(owner: str = owner, want: list[str] = want) -> bool:
            return await answers(server, owner) == want

        await wait_until_async(match, timeout=30, what=f"CoreDNS answering {owner} = {want}")


async def start_coredns(factory: Callable[..., CoreDNS], path: Path) -> CoreDNS:
    return await trio.to_thread.run_sync(factory, path)


async def test_answers_follow_add_remove_scale_and_group(
    tmp_path: Path, coredns_factory: Callable[..., CoreDNS]
) -> None:
    path = tmp_path / "atlas.zone"
    prod = "_thanos._tcp.prod.sidecars.thanos.atlas."
    dev = "_thanos._tcp.dev.sidecars.thanos.atlas."
    prom = "_prometheus._tcp.sidecars.thanos.atlas."
    async with zone_writer(path) as w:
        await w.push(fleet(cl("east")))
        server = await start_coredns(coredns_factory, path)
        await serves(server, fleet(cl("east")), ALL, prom)
        assert await answers(server, ALL) == [
            "10 100 10901 east-thanos-sidecar0.monitoring.svc.cluster.local."
        ]

        steps = [
            ("add", fleet(cl("east"), cl("west"))),
            ("scale up", fleet(cl("east", replicas=3), cl("west"))),
            ("group", fleet(cl("east", replicas=3), cl("west", group="prod"))),
            ("move group", fleet(cl("east", replicas=3), cl("west", group="dev"))),
            ("scale down", fleet(cl("east", replicas=1), cl("west", group="dev"))),
            ("remove", fleet(cl("west", group="dev"))),
            ("remove last", fleet()),
        ]
        serials = [w.seen[-1].serial]
        for _what, fl in steps:
            await w.push(fl)
            await trio.to_thread.run_sync(checkzone, path)
            await serves(server, fl, ALL, prom, prod, dev)
            serials.append(w.seen[-1].serial)
            soa = await trio.to_thread.run_sync(server.query, "atlas.", "SOA")
            assert str(serials[-1]) in soa[0]
        assert serials == sorted(set(serials)), "one write per change, serial strictly growing"
        # After the group move, prod is empty and dev holds west only (checked by `serves`);
        # after the last removal the sidecar name is gone entirely.
        assert await answers(server, ALL) == []


async def test_serial_grows_across_writer_restart(
    tmp_path: Path, coredns_factory: Callable[..., CoreDNS]
) -> None:
    path = tmp_path / "atlas.zone"
    # The clock of the restarted writer is an hour behind: the serial still grows.
    async with zone_writer(path) as w:
        await w.push(fleet(cl("east")))
    first = w.seen[-1].serial
    server = await start_coredns(coredns_factory, path)
    await serves(server, fleet(cl("east")))

    async with zone_writer(path, clock=lambda: float(first - 3600)) as w2:
        assert w2.started.serial == first
        await w2.push(fleet(cl("east"), cl("west")))
    second = w2.seen[-1].serial
    assert second == first + 1
    await serves(server, fleet(cl("east"), cl("west")))
    soa = await trio.to_thread.run_sync(server.query, "atlas.", "SOA")
    assert f" {second} " in soa[0]

    # A restart with nothing changed does not rewrite (same file, same serial).
    inode = path.stat().st_ino
    async with zone_writer(path) as w3:
        await w3.send.send(fleet(cl("west"), cl("east")))
    assert all(z.serial == second for z in w3.seen)  # at most reported as found
    assert path.stat().st_ino == inode
    assert parse_serial(path.read_text()) == second


async def test_reader_never_sees_a_partial_zone_during_1000_rewrites(
    tmp_path: Path, coredns_factory: Callable[..., CoreDNS]
) -> None:
    path = tmp_path / "atlas.zone"
    # Fleet i has clusters c0..c{i % 40}: a complete file has exactly i % 40 + 1
    # sidecars, all of c0..c{n-1}; a torn file would lose its tail.
    fleets = [fleet(*(cl(f"c{j}") for j in range(i % 40 + 1))) for i in range(1000)]
    async with zone_writer(path) as w:
        await w.push(fleets[0])
        server = await start_coredns(coredns_factory, path)
        # The reader is a process, as CoreDNS is (tests/harness/zone_reader.py says why).
        reader = await trio.lowlevel.open_process(
            [sys.executable, "-m", "tests.harness.zone_reader", str(path), "atlas.", ALL],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=Path(__file__).parents[2],
        )
        try:
            assert reader.stdout is not None and reader.stdin is not None
            out = b""
            with trio.fail_after(30):
                while b"\n" not in out and (chunk := await reader.stdout.receive_some()):
                    out += chunk
            assert out == b"ready\n", out
            for fl in fleets[1:]:
                await w.push(fl)
                # CoreDNS reads the same file concurrently; it must keep answering.
                if len(w.seen) % 100 == 0:
                    assert await answers(server, ALL)
            await reader.stdin.aclose()  # the reader's signal to report
            out = b""
            with trio.fail_after(30):
                while chunk := await reader.stdout.receive_some():
                    out += chunk
            seen = json.loads(out)
        finally:
            reader.kill()
            with trio.fail_after(10):
                await reader.wait()
    assert len(w.seen) == 1000
    assert seen["reads"] > 100, "the reader did not overlap the rewrites"
    assert seen["bad"] == 0, seen["samples"]
    serials = [z.serial for z in w.seen]
    assert all(b > a for a, b in itertools.pairwise(serials))
    await serves(server, fleets[-1])
    assert "error" not in server.log_text().lower()
