"""xDS benchmarks: snapshot builds, change -> ACK with a real Envoy, 1,000 ADS streams.

Usage::

    .venv/bin/python bench/bench_xds.py [build] [ack] [scale] [streams]   (default: all)
    .venv/bin/python bench/bench_xds.py load-client PORT N KIND    (internal: the load process)

- build: ``SnapshotBuilder.build`` for 10/100/1,000/5,000 clusters, from scratch ("full")
  and after changing one cluster ("one change", same builder: memoized pieces reused),
  and a fleet-wide change (a second local Alertmanager: every node's relay).
- ack: a real Envoy (node ``atlas``, SotW and Delta) holding 100 clusters; one cluster
  changes its external IP, time until the Envoy ACKs the new EDS version (median and p99
  over runs).
- scale: a real Envoy fetching node ``atlas`` for 5,000 clusters (10,000 Envoy clusters)
  from scratch, start -> CDS ACK.
- streams: a load client in a separate process holds 1,000 ADS streams (one node each,
  over 10 HTTP/2 connections); a change that touches every node is published; time until
  every stream has received it, with this process's (atlasd's) CPU time and RSS.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from atlasd import model  # noqa: E402
from atlasd.xds.authz import TOKEN_HEADER, XFCC_HEADER, Authorizer  # noqa: E402
from atlasd.xds.builders import SnapshotBuilder  # noqa: E402
from atlasd.xds.cache import SnapshotCache  # noqa: E402
from atlasd.xds.plan import ListenPlan, ObservabilityPorts  # noqa: E402
from atlasd.xds.snapshot import CLUSTER, ENDPOINT  # noqa: E402

# The benchmarks' Envoys and load client authenticate with the forwarder token (the
# plaintext fallback), as the observability Envoy does when configured with one.
BENCH_TOKEN = "bench-forwarder-token"
# The benchmarks' observability Envoys listen on ephemeral loopback ports: they measure the
# control plane round trip, and must not hold the design's fixed ports (10900, ...) that
# tests and the demo use.
EPHEMERAL = ListenPlan(
    observability=ObservabilityPorts(
        xds=0, thanos=0, alertmanager=0, prometheus=0, address="127.0.0.1"
    )
)

CDS = CLUSTER
EDS = ENDPOINT
LDS = "type.googleapis.com/envoy.config.listener.v3.Listener"


def _fleet(n: int, *, alert_port: int = model.OBS_ALERTMANAGER_PORT) -> model.Fleet:
    from tests.harness.certs import CA

    ca = CA("bench-ca")
    leaf = ca.issue("bench", dns=("bench",), server=True, client=True)
    ident = model.Identity(
        model.CertKey(leaf.cert_pem, leaf.key_pem), model.CertKey(leaf.cert_pem, leaf.key_pem)
    )
    clusters = tuple(
        model.DownstreamCluster(
            name=f"c{i:05d}",
            external_ip="127.0.0.1",
            ports=(model.ServicePort("thanos", 10901),),
            replicas=2,
        )
        for i in range(n)
    )
    pki = model.PKI(
        ca=model.CertKey(ca.cert_pem, b"unused"),
        trust_bundle=ca.cert_pem,
        ca_serial="1",
        ca_revision=1,
    )
    settings = model.Settings(envoy_alertmanager_port=alert_port)
    ams = (model.LocalAlertmanager("am", "monitoring", 9093),)
    return model.Fleet.of(
        settings,
        clusters,
        alertmanagers=ams,
        pki=pki,
        identities=(("atlas", ident), *((c.name, ident) for c in clusters)),
    )


def _change_one(fleet: model.Fleet, i: int, port: int) -> tuple[model.Fleet, str]:
    """``fleet`` with cluster ``i``'s Prometheus upstream moved, and that cluster's name."""
    name = sorted(fleet.clusters)[i]
    c = dataclasses.replace(fleet.clusters[name], prometheus=model.Upstream("127.0.0.1", port))
    return dataclasses.replace(fleet, clusters={**fleet.clusters, name: c}), name


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------------------------------


def bench_build() -> None:
    print("== snapshot build (nodes = clusters + 1; 2 replicas, 1 Alertmanager) ==")
    print(
        f"{'clusters':>8} {'full s':>9} {'one change s':>13} {'rebuilt pieces':>15} {'resources':>10}"
        f" {'fleet-wide s':>11}"
    )
    for n in (10, 100, 1000, 5000):
        fleet = _fleet(n)
        b = SnapshotBuilder()
        t0 = time.perf_counter()
        snaps = b.build(fleet)
        full = time.perf_counter() - t0
        resources = sum(len(rs) for s in snaps.values() for rs in s.resources.values())
        changes = []
        built = 0
        for k in range(5):
            f2, name = _change_one(fleet, n // 2, 20000 + k)
            t0 = time.perf_counter()
            b.update(f2, {name})
            changes.append(time.perf_counter() - t0)
            built = b.built
        # A fleet-wide change: a second local Alertmanager (every node's relay changes).
        wide = dataclasses.replace(
            fleet,
            alertmanagers=(
                *fleet.alertmanagers,
                model.LocalAlertmanager("am2", "monitoring", 9093),
            ),
        )
        t0 = time.perf_counter()
        b.update(wide, None)
        fleet_wide = time.perf_counter() - t0
        print(
            f"{n:>8} {full:>9.3f} {statistics.median(changes):>13.4f} {built:>15} {resources:>10}"
            f" {fleet_wide:>11.3f}"
        )


# ---------------------------------------------------------------------------------------


def bench_ack() -> None:
    import trio

    from atlasd.xds.server import run_ads_server
    from tests.harness.envoy import Envoy
    from tests.unit.xds import helpers

    async def run(delta: bool) -> list[float]:
        cache = SnapshotCache()
        fleet = _fleet(100)
        b = SnapshotBuilder(EPHEMERAL)
        cache.publish({"atlas": b.build(fleet)["atlas"]})
        lat: list[float] = []
        async with trio.open_nursery() as nursery:
            port = await nursery.start(
                lambda task_status: run_ads_server(
                    cache=cache,
                    host="127.0.0.1",
                    port=0,
                    authorizer=Authorizer(forwarder_token=BENCH_TOKEN),
                    task_status=task_status,
                )
            )
            with tempfile.TemporaryDirectory() as tmp:
                boot = helpers.atlas_bootstrap(port, delta=delta, token=BENCH_TOKEN)
                envoy = Envoy(boot, f"bench-{'delta' if delta else 'sotw'}", workdir=Path(tmp))
                await trio.to_thread.run_sync(envoy.start)

                async def acked(t: str, version: str) -> None:
                    while True:
                        if any(s.acked_version(t) == version for s in cache.status()):
                            return
                        await trio.sleep(0.0005)

                with trio.fail_after(30):
                    await acked(EDS, cache.get("atlas").version(EDS))  # type: ignore[union-attr]
                for k in range(60):
                    # A new external IP for one cluster: its two endpoint assignments change.
                    name = sorted(fleet.clusters)[k % 100]
                    moved = dataclasses.replace(
                        fleet.clusters[name], external_ip=f"127.0.{1 + k // 250}.{1 + k % 250}"
                    )
                    fleet = dataclasses.replace(fleet, clusters={**fleet.clusters, name: moved})
                    t0 = time.perf_counter()
                    b.update(fleet, {name})
                    snap = b.snapshots()["atlas"]
                    cache.publish({"atlas": snap})
                    with trio.fail_after(30):
                        await acked(EDS, snap.version(EDS))
                    lat.append(time.perf_counter() - t0)
                envoy.stop()
            nursery.cancel_scope.cancel()
        return lat

    print("== model change -> ACK from a real Envoy (node atlas, 100 clusters, 60 changes) ==")
    for delta in (False, True):
        lat = sorted(trio.run(run, delta))
        p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))]
        print(
            f"{'delta' if delta else 'sotw':>6}: median {statistics.median(lat) * 1000:.1f} ms, "
            f"p99 {p99 * 1000:.1f} ms (build + publish + push + Envoy apply + ACK)"
        )


def bench_scale(n: int = 5000) -> None:
    import trio

    from atlasd.xds.server import run_ads_server
    from tests.harness.envoy import Envoy
    from tests.harness.wait import wait_until_async
    from tests.unit.xds import helpers

    async def run(delta: bool) -> tuple[int, int, float]:
        cache = SnapshotCache()
        snap = SnapshotBuilder(EPHEMERAL).build(_fleet(n))["atlas"]
        size = sum(len(r.body) for rs in snap.resources.values() for r in rs.values())
        cache.publish({"atlas": snap})
        async with trio.open_nursery() as nursery:
            port = await nursery.start(
                lambda task_status: run_ads_server(
                    cache=cache,
                    host="127.0.0.1",
                    port=0,
                    authorizer=Authorizer(forwarder_token=BENCH_TOKEN),
                    task_status=task_status,
                )
            )
            with tempfile.TemporaryDirectory() as tmp:
                envoy = Envoy(
                    helpers.atlas_bootstrap(port, delta=delta, token=BENCH_TOKEN),
                    "scale",
                    workdir=Path(tmp),
                )
                t0 = time.perf_counter()
                await trio.to_thread.run_sync(envoy.start)
                await wait_until_async(
                    lambda: any(s.acked_version(CDS) == snap.version(CDS) for s in cache.status()),
                    timeout=300,
                    what="CDS ACK",
                )
                elapsed = time.perf_counter() - t0
                envoy.stop()
            nursery.cancel_scope.cancel()
        return len(snap.of_type(CDS)), size, elapsed

    print(f"== a real Envoy takes node atlas for {n} clusters from scratch ==")
    for delta in (False, True):
        clusters, size, elapsed = trio.run(run, delta)
        print(
            f"{'delta' if delta else 'sotw':>6}: {clusters} Envoy clusters, {size / 1e6:.1f} MB of "
            f"resources, Envoy start -> CDS ACK {elapsed:.2f} s"
        )


# ---------------------------------------------------------------------------------------


def bench_streams(n: int = 1000) -> None:
    import trio

    from atlasd.xds.server import run_ads_server

    async def run(kind: str) -> tuple[float, float, float, float, float]:
        fleet = _fleet(n)
        b = SnapshotBuilder()
        snaps = b.build(fleet)
        cache = SnapshotCache()
        cache.publish(snaps)
        # Each stream as the observability Envoy forwards it: the token and the XFCC header
        # naming the downstream node.
        authz = Authorizer(forwarder_token=BENCH_TOKEN)
        async with trio.open_nursery() as nursery:
            port = await nursery.start(
                lambda task_status: run_ads_server(
                    cache=cache, host="127.0.0.1", port=0, authorizer=authz, task_status=task_status
                )
            )
            rss_before = _rss_mb()
            proc = await trio.lowlevel.open_process(
                [sys.executable, __file__, "load-client", str(port), str(n), kind],
                stdout=subprocess.PIPE,
            )
            assert proc.stdout is not None
            buf = b""

            async def line() -> str:
                nonlocal buf
                while b"\n" not in buf:
                    chunk = await proc.stdout.receive_some(4096)  # type: ignore[union-attr]
                    if not chunk:
                        raise RuntimeError("load client exited")
                    buf += chunk
                out, buf = buf.split(b"\n", 1)
                return out.decode()

            t_connect = time.perf_counter()
            with trio.fail_after(300):
                while await line() != "READY":
                    pass
            connect_s = time.perf_counter() - t_connect
            # A change touching every downstream node: the relay's target port.
            changed = b.build(
                dataclasses.replace(
                    fleet,
                    settings=dataclasses.replace(
                        fleet.settings,
                        envoy_alertmanager_port=fleet.settings.envoy_alertmanager_port + 1,
                    ),
                )
            )
            cpu0 = time.process_time()
            t0 = time.perf_counter()
            cache.publish(changed)
            with trio.fail_after(300):
                while await line() != "DONE":
                    pass
            elapsed = time.perf_counter() - t0
            cpu = time.process_time() - cpu0
            rss = _rss_mb()
            proc.kill()
            await proc.wait()
            nursery.cancel_scope.cancel()
        return connect_s, elapsed, cpu, rss_before, rss

    print(f"== {n} ADS streams from a separate process (1 node each, CDS+LDS) ==")
    for kind in ("sotw", "delta"):
        connect_s, elapsed, cpu, rss_before, rss = trio.run(run, kind)
        print(
            f"{kind:>6}: all connected+initial state in {connect_s:.2f} s; change -> all {n} "
            f"streams have it: {elapsed:.3f} s; atlasd CPU during push {cpu:.3f} s; "
            f"RSS {rss:.0f} MB ({rss_before:.0f} MB before the streams)"
        )


# ---------------------------------------------------------------------------------------
# the load client (separate process, plain asyncio + grpclib)


async def _load_client(port: int, n: int, kind: str) -> None:
    import grpclib.client
    import grpclib.const
    from envoy.config.core.v3 import base_pb2
    from envoy.service.discovery.v3 import discovery_pb2 as d

    from atlasd.xds.server import DELTA_METHOD, SOTW_METHOD

    channels = [grpclib.client.Channel("127.0.0.1", port) for _ in range(10)]
    versions: list[set[str]] = [set() for _ in range(n)]
    ready = asyncio.Event()
    done = asyncio.Event()
    counts = {"ready": 0, "done": 0}

    def forwarded(node: str) -> dict[str, str]:
        return {TOKEN_HEADER: BENCH_TOKEN, XFCC_HEADER: f"Hash=0;DNS={node}"}

    def seen(i: int, version: str) -> None:
        before = len(versions[i])
        versions[i].add(version)
        if before == 0 and len(versions[i]) == 1:
            counts["ready"] += 1
            if counts["ready"] == n:
                ready.set()
        if before == 1 and len(versions[i]) == 2:
            counts["done"] += 1
            if counts["done"] == n:
                done.set()

    async def sotw(i: int) -> None:
        node = base_pb2.Node(id=f"c{i:05d}")
        async with channels[i % 10].request(
            SOTW_METHOD,
            grpclib.const.Cardinality.STREAM_STREAM,
            d.DiscoveryRequest,
            d.DiscoveryResponse,
            metadata=forwarded(node.id),
        ) as st:
            await st.send_message(d.DiscoveryRequest(node=node, type_url=CDS))
            await st.send_message(d.DiscoveryRequest(type_url=LDS))
            while (r := await st.recv_message()) is not None:
                if r.type_url == CDS:
                    seen(i, r.version_info)
                await st.send_message(
                    d.DiscoveryRequest(
                        type_url=r.type_url, version_info=r.version_info, response_nonce=r.nonce
                    )
                )

    async def delta(i: int) -> None:
        node = base_pb2.Node(id=f"c{i:05d}")
        async with channels[i % 10].request(
            DELTA_METHOD,
            grpclib.const.Cardinality.STREAM_STREAM,
            d.DeltaDiscoveryRequest,
            d.DeltaDiscoveryResponse,
            metadata=forwarded(node.id),
        ) as st:
            await st.send_message(d.DeltaDiscoveryRequest(node=node, type_url=CDS))
            await st.send_message(d.DeltaDiscoveryRequest(type_url=LDS))
            while (r := await st.recv_message()) is not None:
                if r.type_url == CDS:
                    seen(i, r.system_version_info)
                await st.send_message(
                    d.DeltaDiscoveryRequest(type_url=r.type_url, response_nonce=r.nonce)
                )

    fn = sotw if kind == "sotw" else delta
    tasks = [asyncio.ensure_future(fn(i)) for i in range(n)]
    await ready.wait()
    print("READY", flush=True)
    await done.wait()
    print("DONE", flush=True)
    for t in tasks:
        t.cancel()
    for ch in channels:
        ch.close()


def main(argv: list[str]) -> None:
    if argv and argv[0] == "load-client":
        asyncio.run(_load_client(int(argv[1]), int(argv[2]), argv[3]))
        return
    which = set(argv) or {"build", "ack", "scale", "streams"}
    print(f"cpus={os.cpu_count()} python={sys.version.split()[0]}")
    if "build" in which:
        bench_build()
    if "ack" in which:
        bench_ack()
    if "scale" in which:
        bench_scale()
    if "streams" in which:
        bench_streams()


if __name__ == "__main__":
    main(sys.argv[1:])
