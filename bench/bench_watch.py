"""Benchmark: how fast a change reaches an informer's cache, and what the cache costs,
against a real kube-apiserver (the test harness's etcd + kube-apiserver on loopback).

    .venv/bin/python bench/bench_watch.py [--services 10000] [--concurrency 64]

Prints create-to-cache latency (from just before the create request is sent to the
moment the informer's cache holds the object) for bursts of 1, 100 and 1,000
ConfigMaps: median, p99, max, the watch path alone (create response to cache) and the
burst's wall time (bursts are bounded by create throughput, not by the watch); then the informer's memory
(tracemalloc) and initial fill time with ``--services`` headless Services: LIST as
listed, LIST with managedFields stripped, and a streaming list.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from atlasd.kube.client import KubeClient
from atlasd.kube.config import load_config
from atlasd.kube.resources import CONFIGMAPS, SERVICES
from atlasd.watch.informer import Change, Informer, strip_managed_fields
from tests.harness.kube import ApiServer


def _pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


async def _latency(kube: KubeClient, namespace: str, concurrency: int) -> None:
    sent: dict[str, float] = {}
    answered: dict[str, float] = {}
    arrived: dict[str, float] = {}
    inf = Informer(kube, CONFIGMAPS, namespace=namespace)

    def on_change(change: Change) -> None:
        if change.type == "ADDED" and change.key not in arrived:
            arrived[change.key] = time.perf_counter()

    inf.subscribe(on_change)
    async with trio.open_nursery() as nursery:
        await nursery.start(inf.run)
        for burst in (1, 100, 1000):
            names = [f"b{burst}-{i}" for i in range(burst)]
            sem = trio.Semaphore(concurrency)

            async def create(name: str, sem: trio.Semaphore = sem) -> None:
                async with sem:
                    sent[name] = time.perf_counter()
                    await kube.create(
                        {
                            "apiVersion": "v1",
                            "kind": "ConfigMap",
                            "metadata": {"name": name, "namespace": namespace},
                            "data": {"k": "v" * 64},
                        }
                    )
                    answered[name] = time.perf_counter()

            t0 = time.perf_counter()
            async with trio.open_nursery() as burst_nursery:
                for name in names:
                    burst_nursery.start_soon(create, name)
            with trio.fail_after(120):
                while not all(n in arrived for n in names):  # noqa: ASYNC110
                    await trio.sleep(0.001)
            wall = time.perf_counter() - t0
            lat = [(arrived[n] - sent[n]) * 1000 for n in names]
            # The watch path alone: from the create's response to the cache (negative
            # when the watch event was processed before the create's response).
            watch = [(arrived[n] - answered[n]) * 1000 for n in names]
            print(
                f"create-to-cache, burst of {burst:>4}: median {statistics.median(lat):7.1f} ms"
                f"  p99 {_pct(lat, 99):7.1f} ms  max {max(lat):7.1f} ms"
                f" | response-to-cache median {statistics.median(watch):6.1f} ms"
                f"  p99 {_pct(watch, 99):6.1f} ms"
                f" | burst wall time {wall:.2f} s, concurrency {concurrency}",
                flush=True,
            )
        nursery.cancel_scope.cancel()


async def _memory(kube: KubeClient, namespace: str, services: int, concurrency: int) -> None:
    sem = trio.Semaphore(concurrency)

    async def create(i: int) -> None:
        async with sem:
            await kube.create(
                {
                    "apiVersion": "v1",
                    "kind": "Service",
                    "metadata": {
                        "name": f"svc-{i}",
                        "namespace": namespace,
                        "labels": {"goatlas.io/cluster": "true", "app": "bench"},
                        "annotations": {"goatlas.io/envoy-selectors": "app=envoy,release=atlas"},
                    },
                    "spec": {
                        "clusterIP": "None",
                        "externalIPs": [f"192.0.2.{i % 250 + 1}"],
                        "ports": [
                            {"name": "prometheus", "port": 9090},
                            {"name": "thanos", "port": 10901},
                            {"name": "alertmanager", "port": 9093},
                        ],
                    },
                }
            )

    t0 = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for i in range(services):
            nursery.start_soon(create, i)
    print(f"created {services} Services in {time.perf_counter() - t0:.1f} s", flush=True)

    variants: tuple[tuple[str, Any, bool], ...] = (
        ("LIST, as listed", None, False),
        ("LIST, managedFields stripped", strip_managed_fields, False),
        ("streaming list, as listed", None, True),
    )
    for label, transform, streaming in variants:
        gc.collect()
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        inf = Informer(
            kube, SERVICES, namespace=namespace, transform=transform, streaming_list=streaming
        )
        t0 = time.perf_counter()
        async with trio.open_nursery() as nursery:
            await nursery.start(inf.run)
            listed = time.perf_counter() - t0
            nursery.cancel_scope.cancel()
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - base
        tracemalloc.stop()
        cache: Any = inf.items()
        assert len(cache) == services, len(cache)
        print(
            f"informer cache with {services} Services ({label}): {held / 2**20:.1f} MiB "
            f"({held / services / 1024:.2f} KiB per Service, tracemalloc), "
            f"initial fill {listed:.2f} s (under tracemalloc)",
            flush=True,
        )
        del inf, cache


async def _bench(api: ApiServer, services: int, concurrency: int) -> None:
    async with KubeClient(load_config(str(api.admin_kubeconfig))) as kube:
        for ns in ("bench-latency", "bench-memory"):
            api.create_namespace(ns)
        await _latency(kube, "bench-latency", concurrency)
        await _memory(kube, "bench-memory", services, concurrency)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--services", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-watch-") as tmp:
        api = ApiServer(Path(tmp) / "apiserver").start()
        try:
            trio.run(_bench, api, args.services, args.concurrency)
        finally:
            api.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
