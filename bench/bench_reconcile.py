"""Benchmark: reconcile N clusters from nothing, then steady-state passes, against a real
kube-apiserver (the test harness's etcd + kube-apiserver on loopback), by the leader's
reconcile path as the daemon runs it (watches, fleet, reconcile loop: ``tests.harness.reconcile``).

    .venv/bin/python bench/bench_reconcile.py [--clusters 1000] [--replicas 1]
        [--enrolled] [--rotate [--profile FILE]]

Prints, for the reconcile from nothing (start to settled: every key done and every write
seen by the watch): wall time, API writes, certificates issued and peak RSS; for a
steady-state full pass (same process) and a "restart" (a new loop, nothing remembered;
start to settled): wall time and writes, which must be 0. With ``--rotate``, also a CA
rotation (``goatlas.io/ca-rotate`` on ``atlas-ca``) in the first loop: annotation to settled,
writes, certificates issued, CPU; ``--profile FILE`` runs it under cProfile (written to FILE,
the top functions by own time printed; cProfile's times are wall-clock, so on a loaded
machine they include waiting for a CPU). With ``--enrolled``, every cluster enrolls
(``goatlas.io/enrollment: "true"``): no key is made or stored for it, its values carry
none, and a CA rotation leaves its objects as they are.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime as dt
import pstats
import resource
import sys
import tempfile
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from atlasd.kube.client import KubeClient
from atlasd.kube.config import load_config
from atlasd.kube.events import post_event
from atlasd.kube.resources import SECRETS
from atlasd.labels import ENROLLMENT_ANNOTATION
from atlasd.model import Settings
from tests.harness.kube import ApiServer
from tests.harness.reconcile import LeaderRun, leader
from tests.unit.reconcile.builders import cluster_service


def _rss_mib() -> float:
    # ru_maxrss is KiB on Linux: the peak resident set of this process so far.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _current_rss_mib() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() / (1024 * 1024)


async def _rotate(kube: KubeClient, run: LeaderRun, ns: str, profile: Path | None) -> None:
    """A CA rotation through the running loop, timed from the annotation to settled."""
    ca = await kube.get(SECRETS, "atlas-ca", namespace=ns)
    ca["metadata"].setdefault("annotations", {})["goatlas.io/ca-rotate"] = "bench"
    prof = cProfile.Profile() if profile is not None else None
    t0, c0 = time.perf_counter(), _cpu_s()
    if prof is not None:
        prof.enable()
    await kube.replace(ca)
    rotated = await run.settle(timeout=1800)
    if prof is not None:
        prof.disable()
    took, cpu = time.perf_counter() - t0, _cpu_s() - c0
    print(
        f"CA rotation: {took:.2f} s, {rotated.writes} writes, {len(rotated.issued)} "
        f"certificates issued, atlasd CPU {cpu:.2f} s{' (under cProfile)' if prof else ''}"
    )
    if prof is not None and profile is not None:
        prof.dump_stats(profile)
        pstats.Stats(str(profile), stream=sys.stdout).sort_stats("tottime").print_stats(15)


async def _bench(
    api: ApiServer,
    clusters: int,
    replicas: int,
    concurrency: int,
    rotate: bool = False,
    profile: Path | None = None,
    enrolled: bool = False,
) -> int:
    ns = "bench"
    api.create_namespace(ns)
    # With an enrollment address, as a configured installation has (without one, every
    # enrolled cluster gets a Warning Event saying it is missing).
    settings = Settings(namespace=ns, enroll_address="atlasd.example:6307")
    now = dt.datetime.now(dt.UTC)
    async with KubeClient(load_config(str(api.admin_kubeconfig))) as kube:
        t0 = time.perf_counter()
        limiter = trio.CapacityLimiter(32)

        async def make(i: int) -> None:
            ip = f"198.18.{i // 250}.{i % 250 + 1}"
            svc = cluster_service(
                f"c{i:04d}",
                ip,
                namespace=ns,
                replicas=str(replicas) if replicas > 1 else None,
                annotations={ENROLLMENT_ANNOTATION: "true"} if enrolled else None,
            )
            async with limiter:
                await kube.create(svc)

        async with trio.open_nursery() as nursery:
            for i in range(clusters):
                nursery.start_soon(make, i)
        print(f"setup: created {clusters} cluster Services in {time.perf_counter() - t0:.2f} s")

        rss_before = _current_rss_mib()
        t0, c0 = time.perf_counter(), _cpu_s()
        async with leader(
            kube, settings, now=now, post_event=post_event, concurrency=concurrency
        ) as run:
            full = await run.settle(timeout=1800)
            full_s, full_cpu = time.perf_counter() - t0, _cpu_s() - c0
            assert len(run.fleet.clusters) == clusters, full.problems[:3]
            print(
                f"full reconcile of {clusters} {'enrolled' if enrolled else 'compatible'} "
                f"clusters from nothing ({concurrency} parallel "
                f"writes): {full_s:.2f} s, "
                f"{full.writes} API writes ({full.created} create, {full.applied} apply), "
                f"{len(full.issued)} certificates issued, atlasd CPU {full_cpu:.2f} s, "
                f"RSS before {rss_before:.0f} MiB, peak RSS {_rss_mib():.0f} MiB"
            )

            run.now = now + dt.timedelta(minutes=1)
            t0, c0 = time.perf_counter(), _cpu_s()
            steady = await run.settle(timeout=1800)
            steady_s, steady_cpu = time.perf_counter() - t0, _cpu_s() - c0
            print(
                f"steady-state pass over {clusters} clusters: {steady_s:.2f} s, "
                f"{steady.writes} writes, {len(steady.issued)} certificates issued, "
                f"atlasd CPU {steady_cpu:.2f} s"
            )
            if rotate:
                await _rotate(kube, run, ns, profile)

        later = now + dt.timedelta(minutes=2)
        t0 = time.perf_counter()
        async with leader(
            kube, settings, now=later, post_event=post_event, concurrency=concurrency
        ) as run:
            restart = await run.settle(timeout=1800)
        restart_s = time.perf_counter() - t0
        print(
            f"restart (a new loop, nothing remembered) over {clusters} clusters: "
            f"{restart_s:.2f} s, {restart.writes} writes, {len(restart.issued)} issued"
        )
        print(f"peak RSS at end: {_rss_mib():.0f} MiB")
        if steady.writes or restart.writes or steady.issued or restart.issued:
            print("FAIL: a steady-state pass wrote or issued something", file=sys.stderr)
            return 1
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clusters", type=int, default=1000)
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=32, help="parallel writes")
    parser.add_argument("--rotate", action="store_true", help="also time a CA rotation")
    parser.add_argument("--profile", type=Path, help="with --rotate: cProfile it into FILE")
    parser.add_argument("--enrolled", action="store_true", help="every cluster enrolls")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-reconcile-") as tmp:
        api = ApiServer(Path(tmp) / "apiserver").start()
        try:
            return trio.run(
                _bench,
                api,
                args.clusters,
                args.replicas,
                args.concurrency,
                args.rotate,
                args.profile,
                args.enrolled,
            )
        finally:
            api.stop()


if __name__ == "__main__":
    raise SystemExit(main())
