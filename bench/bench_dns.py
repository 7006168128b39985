"""Benchmark: the DNS zone — render time, and how fast a change reaches CoreDNS's answers.

    .venv/bin/python bench/bench_dns.py [--clusters 5000] [--changes 100] [--reload 1s]
                                        [--skip-e2e]

1. Render: ``records`` + ``render_records`` for N clusters (3 ports each, a third of them
   in a DNS group), and one writer pass (render + atomic write with fsyncs), median of 5.
2. Writer -> CoreDNS: a fleet change handed to the zone writer until a real CoreDNS
   (file plugin, ``reload`` as given) answers the new SRV record; median and p99 over
   ``--changes`` changes, split into "file written" and "answering".
3. End to end: a cluster Service created in a real kube-apiserver until CoreDNS answers
   its SRV record, with a real ``atlasd run`` (watch -> reconcile/fleet -> zone writer)
   in between; median and p99 over ``--changes`` Services.

CoreDNS's file plugin polls the zone file once per ``reload`` interval and swaps the zone
in when the SOA serial grew: that tick, not atlasd, bounds the latency (uniform between
0 and ``reload``: median about reload/2, p99 about reload).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx2
import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from atlasd.dns.writer import Zone, ZoneState, run_zone_writer
from atlasd.dns.zone import records, render_records
from atlasd.files import write_atomic
from atlasd.model import DownstreamCluster, Fleet, ServicePort, Settings
from tests.harness.coredns import CoreDNS
from tests.harness.kube import ApiServer
from tests.integration.daemon_helpers import Atlasd
from tests.unit.reconcile.builders import cluster_service

PORTS = (ServicePort("prometheus", 9090), ServicePort("thanos", 10901), ServicePort("alertmanager", 9093))  # fmt: skip
SRV = "_thanos._tcp.sidecars.thanos.atlas."


def _fleet(n: int, settings: Settings) -> Fleet:
    return Fleet.of(
        settings,
        tuple(
            DownstreamCluster(
                name=f"c{i:05d}",
                external_ip="198.18.0.1",
                ports=PORTS,
                dns_group=f"g{i % 7}" if i % 3 == 0 else None,
            )
            for i in range(n)
        ),
    )


def _seconds(duration: str) -> float:
    """A Go duration as CoreDNS takes it ("1s", "500ms", "2m")."""
    for unit, factor in (("ms", 0.001), ("s", 1.0), ("m", 60.0)):
        if duration.endswith(unit):
            return float(duration[: -len(unit)]) * factor
    raise ValueError(f"unsupported duration {duration!r}")


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _summary(what: str, seconds: list[float]) -> None:
    ms = [s * 1000 for s in seconds]
    print(
        f"{what}: median {statistics.median(ms):.1f} ms, p99 {_pct(ms, 0.99):.1f} ms, "
        f"min {min(ms):.1f} ms, max {max(ms):.1f} ms (n={len(ms)})"
    )


def bench_render(n: int, workdir: Path) -> None:
    settings = Settings()
    fleet = _fleet(n, settings)
    rec_t: list[float] = []
    text_t: list[float] = []
    pass_t: list[float] = []
    size = 0
    count = 0
    for i in range(5):
        # CPU time of this process: the figure that does not depend on what else runs.
        t0 = time.process_time()
        recs = records(fleet)
        t1 = time.process_time()
        text = render_records(recs, settings=settings, serial=1_800_000_000 + i)
        t2 = time.process_time()
        rec_t.append(t1 - t0)
        text_t.append(t2 - t1)
        size, count = len(text), len(recs)
        state = ZoneState(previous_text=None, previous_serial=None)
        t3 = time.perf_counter()
        zone = state.next_zone(fleet)
        assert zone is not None
        write_atomic(workdir / "render.zone", zone.text)
        pass_t.append(time.perf_counter() - t3)
    print(f"render {n} clusters -> {count} SRV records, {size / 1e6:.1f} MB of zone text")
    print(f"  records():        median {statistics.median(rec_t) * 1000:.0f} ms CPU")
    print(f"  render_records(): median {statistics.median(text_t) * 1000:.0f} ms CPU")
    print(f"  writer pass (records + render + atomic write with fsyncs): median "
          f"{statistics.median(pass_t) * 1000:.0f} ms wall")  # fmt: skip


async def bench_writer_to_coredns(changes: int, reload: str, workdir: Path) -> None:
    settings = Settings()
    reload_s = _seconds(reload)
    path = workdir / "writer.zone"
    send, recv = trio.open_memory_channel[Fleet](0)
    written: list[tuple[Zone, float]] = []
    file_t: list[float] = []
    answer_t: list[float] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(
            lambda task_status: run_zone_writer(
                fleets=recv,
                path=path,
                kube=None,
                settings=settings,
                on_zone=lambda z: written.append((z, time.perf_counter())),
                task_status=task_status,
            )
        )
        base = [DownstreamCluster(name="base", external_ip="198.18.0.1", ports=PORTS)]
        await send.send(Fleet.of(settings, tuple(base)))
        # run_zone_writer hands the fleet on before writing: wait for the file itself.
        while not path.exists():  # noqa: ASYNC110 - polling a file another thread writes
            await trio.sleep(0.001)
        server = await trio.to_thread.run_sync(
            lambda: CoreDNS(path, workdir=workdir, reload=reload).start()
        )
        try:
            for i in range(changes):
                # Changes arrive at random moments relative to CoreDNS's reload tick (a
                # change right after an answer would always wait a whole tick).
                await trio.sleep(random.uniform(0, reload_s))
                name = f"n{i:04d}"
                base.append(DownstreamCluster(name=name, external_ip="198.18.0.1", ports=PORTS))
                before = len(written)
                t0 = time.perf_counter()
                await send.send(Fleet.of(settings, tuple(base)))
                target = f"{name}-thanos-sidecar0.monitoring.svc.cluster.local."
                while True:
                    answer = await trio.to_thread.run_sync(
                        lambda: server.query(SRV, "SRV", tcp=True)
                    )
                    if any(a.endswith(target) for a in answer):
                        break
                    await trio.sleep(0.002)
                t1 = time.perf_counter()
                file_t.append(written[before][1] - t0)
                answer_t.append(t1 - t0)
        finally:
            server.stop()
        await send.aclose()
    print(f"writer -> CoreDNS (file plugin reload {reload}), {changes} changes:")
    _summary("  fleet change -> zone file written", file_t)
    _summary("  fleet change -> CoreDNS answers the new SRV", answer_t)


def bench_e2e(changes: int, reload: str, workdir: Path) -> None:
    reload_s = _seconds(reload)
    api = ApiServer(workdir / "apiserver").start()
    ns = "benchdns"
    atlasd: Atlasd | None = None
    server: CoreDNS | None = None
    try:
        api.create_namespace(ns)
        atlasd = Atlasd(
            workdir / "atlasd", f"--kubeconfig={api.admin_kubeconfig}", f"--namespace={ns}"
        )
        atlasd.workdir.mkdir(parents=True, exist_ok=True)
        atlasd.start()
        with api.admin() as c:
            first = cluster_service("base", "198.18.1.1", namespace=ns)
            assert c.post(f"/api/v1/namespaces/{ns}/services", json=first).status_code == 201
        deadline = time.monotonic() + 60
        while not atlasd.zone_file.exists() or "base-thanos" not in atlasd.zone_file.read_text():
            assert time.monotonic() < deadline, "atlasd wrote no zone"
            time.sleep(0.01)
        server = CoreDNS(atlasd.zone_file, workdir=workdir, reload=reload).start()
        file_t: list[float] = []
        answer_t: list[float] = []
        with api.admin() as c:
            for i in range(changes):
                name = f"e{i:04d}"
                svc = cluster_service(name, f"198.18.{2 + i // 250}.{i % 250 + 1}", namespace=ns)
                target = f"{name}-thanos-sidecar0.{ns}.svc.cluster.local."
                time.sleep(random.uniform(0, reload_s))
                t0 = time.perf_counter()
                resp = c.post(f"/api/v1/namespaces/{ns}/services", json=svc)
                assert resp.status_code == 201, resp.text
                seen_file: float | None = None
                while True:
                    now = time.perf_counter()
                    if seen_file is None and target in atlasd.zone_file.read_text():
                        seen_file = now
                    if any(a.endswith(target) for a in server.query(SRV, "SRV", tcp=True)):
                        break
                    assert now - t0 < 60, f"{name} never answered"
                    time.sleep(0.002)
                answer_t.append(time.perf_counter() - t0)
                file_t.append((seen_file or time.perf_counter()) - t0)
        print(f"end to end (Service create -> atlasd run -> CoreDNS reload {reload}), "
              f"{changes} Services:")  # fmt: skip
        _summary("  Service created -> zone file has it", file_t)
        _summary("  Service created -> CoreDNS answers its SRV", answer_t)
        status = httpx2.get(f"{atlasd.url}/status", timeout=5).json()
        print(f"  atlasd zone status: {status.get('zone')}")
    finally:
        if server is not None:
            server.stop()
        if atlasd is not None:
            atlasd.proc.stop()
        api.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clusters", type=int, default=5000)
    parser.add_argument("--changes", type=int, default=100)
    parser.add_argument("--reload", default="1s", help="CoreDNS file plugin reload interval")
    parser.add_argument("--skip-e2e", action="store_true", help="no apiserver/atlasd part")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="atlasd-bench-dns-") as tmp:
        work = Path(tmp)
        bench_render(args.clusters, work)
        trio.run(bench_writer_to_coredns, args.changes, args.reload, work)
        if not args.skip_e2e:
            bench_e2e(args.changes, args.reload, work)


if __name__ == "__main__":
    main()
