"""Benchmark: the API server's own floor for onboarding N clusters.

    .venv/bin/python bench/bench_floor.py --clusters N [--concurrency 16] [--rotation] [--json]

Real etcd + kube-apiserver (the test harness's, on loopback), then a bare
Python writer that server-side-applies what atlasd writes per onboarded cluster -- two
Secrets (``<c>-atlas-identity``, ~3.4 KB of base64 data, and ``<c>-envoy-values``, ~10 KB)
and one headless sidecar Service, with their labels and owner reference -- with
``--concurrency`` requests in flight (atlasd's default write concurrency is 16 reconcile
workers). The bodies are atlasd's own (``atlasd.reconcile``'s builders, certificates
issued before the clock starts) for the clusters ``bench_e2e`` onboards
(``cluster_service``), so the API server parses, merges and stores the same bytes. No
watch, no xDS: the time and the API server's CPU any onboarding of N clusters costs at
least on this machine.

Until 2026-12-05 the floor wrote stand-ins of the wrong sizes (a 5.2 KB and a 2.6 KB
``stringData`` Secret and a one-port Service: 58 % of atlasd's bytes); the API server parses
an apply body as YAML, at a cost per byte, so that floor was ~20 % too low.

Figures: ``floor_s`` (wall time until every object is written), ``writer_cpu_s``,
``apiserver_cpu_s``, ``etcd_cpu_s`` (CPU-seconds of each process over the writes),
``objects``, ``load_avg``. ``measure_floor`` is also what other benchmarks call to print
their onboarding time as a ratio of the floor measured in the same run.

``--rotation``: the floor of a CA rotation's writes instead (``measure_rotation_floor``):
the same objects written first, not timed, then every cluster's two Secrets applied again
with leaves of a new CA, timed -- the Secrets atlasd rewrites at a rotation, as updates.

Prints a table; with ``--json`` one JSON object on its last line.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import queue
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any

import httpx2

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from atlasd.fleet.validate import validate_cluster
from atlasd.model import Settings
from atlasd.reconcile.certs import RandomKeys
from atlasd.reconcile.desired import cluster_objects
from atlasd.reconcile.pki import decide_ca, plan_identity
from tests.harness import objects
from tests.harness.kube import ApiServer

NAMESPACE = "bench-floor"
ROTATION_NAMESPACE = "bench-floor-rotation"
FIELD_MANAGER = "bench-floor"


def cpu_seconds(pid: int) -> float:
    """User + system CPU-seconds of a process (from /proc, Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# The API server's CPU profile is read in windows of this many seconds, one after another.
PPROF_WINDOW_S = 5


def _apiserver_profiles(api: ApiServer, stem: Path, stop: threading.Event) -> None:
    """kube-apiserver's own CPU profile (Go's pprof, on by default: ``--profiling``) in
    consecutive ``PPROF_WINDOW_S`` windows until ``stop``: ``<stem>-NNN.pprof``."""
    with api.admin() as client:
        k = 0
        while not stop.is_set():
            try:
                r = client.get(
                    "/debug/pprof/profile",
                    params={"seconds": str(PPROF_WINDOW_S)},
                    timeout=PPROF_WINDOW_S + 30,
                )
            except httpx2.HTTPError:
                return  # the API server went away (the run is over)
            if r.status_code != 200:
                return
            stem.with_name(f"{stem.name}-{k:03d}.pprof").write_bytes(r.content)
            k += 1


@contextlib.contextmanager
def sampled(
    where: Path | None, phase: str, pids: dict[str, int], *, api: ApiServer | None = None
) -> Iterator[None]:
    """py-spy over each of ``pids`` for the block (``where`` None: nothing): collapsed
    stacks into ``where/<phase>-<name>.txt``; with ``api``, the API server's own CPU
    profile too, ``where/<phase>-apiserver-NNN.pprof`` (read them together: ``go tool pprof
    -top <kube-apiserver binary> where/<phase>-apiserver-*.pprof``; the last window may
    run up to ``PPROF_WINDOW_S`` past the block)."""
    if where is None:
        yield
        return
    where.mkdir(parents=True, exist_ok=True)
    # The virtualenv's (`pip install -e '.[profile]'`) when PATH has none.
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    spies = [
        subprocess.Popen(
            [
                spy,
                "record",
                "--pid",
                str(pid),
                "--format",
                "raw",
                "--rate",
                "200",
                "--output",
                str(where / f"{phase}-{name}.txt"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for name, pid in pids.items()
    ]
    stop = threading.Event()
    profiler = None
    if api is not None:
        profiler = threading.Thread(
            target=_apiserver_profiles, args=(api, where / f"{phase}-apiserver", stop), daemon=True
        )
        profiler.start()
    time.sleep(1)  # attached
    try:
        yield
    finally:
        stop.set()
        for spy in spies:
            spy.send_signal(signal.SIGINT)
        for spy in spies:
            spy.wait(60)
        if profiler is not None:
            profiler.join(PPROF_WINDOW_S + 30)


def cluster_service(i: int, *, net: int = 18) -> dict[str, Any]:
    """The cluster Service of cluster ``i`` as the benchmarks create it (all three ports)."""
    ip = f"198.{net}.{i // 250}.{i % 250 + 1}"
    return objects.cluster_service(f"c{i:05d}", ip, ports=objects.ALL_PORTS)


def atlasd_objects(n: int, namespace: str) -> list[tuple[str, dict[str, Any]]]:
    """(path, apply body) of what atlasd writes for clusters 0..n-1 of ``cluster_service``:
    its own desired objects, each cluster with its own certificates from one CA."""
    settings = Settings(namespace=namespace)
    keys = RandomKeys()
    now = dt.datetime.now(dt.UTC)
    ca, _ = decide_ca(None, settings=settings, now=now, keys=keys)
    base = f"/api/v1/namespaces/{namespace}"
    out: list[tuple[str, dict[str, Any]]] = []
    for i in range(n):
        svc = cluster_service(i)
        # The owner reference names the cluster Service's uid (none exists here), the same
        # in every call (a rotation's writes keep it).
        uid = str(uuid.uuid5(uuid.NAMESPACE_URL, f"{namespace}/{svc['metadata']['name']}"))
        svc["metadata"] |= {"namespace": namespace, "uid": uid}
        cluster = validate_cluster(svc, settings)
        assert not isinstance(cluster, list), cluster
        plan = plan_identity(cluster, None, ca=ca, settings=settings, now=now, keys=keys)
        objs = cluster_objects(
            cluster,
            identity=plan.identity,
            identity_secret=plan.secrets[0],
            ca_bundle=ca.bundle,
            chain=ca.chain,
            ca_serial=ca.serial,
            settings=settings,
            alertmanager_count=0,
        )
        for plural, named in (("secrets", objs.secrets), ("services", objs.services)):
            for name, body in named.items():
                out.append((f"{base}/{plural}/{name}", dict(body)))
    return out


def _apply_all(
    api: ApiServer, objects: list[tuple[str, dict[str, Any]]], concurrency: int
) -> dict[str, Any]:
    """Server-side-apply ``objects`` with ``concurrency`` requests in flight; the time and
    the CPU of the writer, the API server and etcd it took."""
    work: queue.Queue[tuple[str, dict[str, Any]] | None] = queue.Queue()
    for item in objects:
        work.put(item)
    for _ in range(concurrency):
        work.put(None)
    errors: list[str] = []
    params = {"fieldManager": FIELD_MANAGER, "force": "true"}
    headers = {"Content-Type": "application/apply-patch+yaml"}

    def writer() -> None:
        with api.admin() as client:
            while (item := work.get()) is not None:
                path, body = item
                r = client.patch(path, params=params, headers=headers, content=json.dumps(body))
                if r.status_code >= 300:
                    errors.append(f"{path}: {r.status_code} {r.text[:200]}")

    api_pid, etcd_pid = api.proc.pid, api.etcd.proc.pid
    before = (cpu_seconds(api_pid), cpu_seconds(etcd_pid), time.process_time())
    t0 = time.perf_counter()
    threads = [threading.Thread(target=writer, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"{len(errors)} writes failed, first: {errors[0]}")
    return {
        "objects": len(objects),
        "body_bytes": sum(len(json.dumps(body)) for _, body in objects),
        "concurrency": concurrency,
        "floor_s": round(wall, 2),
        "writer_cpu_s": round(time.process_time() - before[2], 2),
        "apiserver_cpu_s": round(cpu_seconds(api_pid) - before[0], 2),
        "etcd_cpu_s": round(cpu_seconds(etcd_pid) - before[1], 2),
    }


def measure_floor(
    api: ApiServer, n: int, *, concurrency: int = 16, namespace: str = NAMESPACE
) -> dict[str, Any]:
    """Server-side-apply the objects of ``n`` clusters; the time and CPU it took."""
    api.create_namespace(namespace)
    return {"clusters": n, **_apply_all(api, atlasd_objects(n, namespace), concurrency)}


def measure_rotation_floor(
    api: ApiServer, n: int, *, concurrency: int, namespace: str = ROTATION_NAMESPACE
) -> dict[str, Any]:
    """The API server's floor for a CA rotation's writes: the objects of ``n`` clusters are
    written first (not timed), then every cluster's two Secrets are applied again with
    leaves of a new CA (timed): what atlasd writes at a rotation, as updates of Secrets
    that exist, at ``concurrency``."""
    api.create_namespace(namespace)
    _apply_all(api, atlasd_objects(n, namespace), concurrency)
    rotated = [item for item in atlasd_objects(n, namespace) if "/secrets/" in item[0]]
    return {"clusters": n, **_apply_all(api, rotated, concurrency)}


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--clusters", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument(
        "--rotation", action="store_true", help="the floor of a CA rotation's writes instead"
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    measure = measure_rotation_floor if args.rotation else measure_floor
    with tempfile.TemporaryDirectory(prefix="bench-floor-") as tmp:
        api = ApiServer(Path(tmp) / "apiserver").start()
        try:
            result = measure(api, args.clusters, concurrency=args.concurrency)
        finally:
            api.stop()
    result["load_avg"] = [round(x, 2) for x in os.getloadavg()]
    result["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print_result(result, as_json=args.json)
    return 0


def print_result(result: dict[str, Any], *, as_json: bool, omit: Collection[str] = ()) -> None:
    """A benchmark's figures as a table (but the keys in ``omit``); with ``as_json``, one
    JSON object of them all last."""
    width = max(len(k) for k in result)
    for key, value in result.items():
        if key not in omit:
            print(f"{key:<{width}}  {value}")
    if as_json:
        print(json.dumps(result, sort_keys=True))


if __name__ == "__main__":
    raise SystemExit(main())
