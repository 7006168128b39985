"""Benchmark: the API server's own floor for onboarding N clusters.

    .venv/bin/python bench/bench_floor.py --clusters N [--concurrency 16] [--json]

Real etcd + kube-apiserver (the test harness's, on loopback), then a bare
Python writer that server-side-applies what atlasd writes per onboarded cluster -- two
Secrets (``<c>-atlas-identity`` ~5.2 KB, ``<c>-envoy-values`` ~2.6 KB) and one headless
sidecar Service -- with ``--concurrency`` requests in flight (atlasd's default write
concurrency is 16 reconcile workers). No PKI, no watch, no xDS: the time and the API
server's CPU any onboarding of N clusters costs at least on this machine.

Figures: ``floor_s`` (wall time until every object is written), ``writer_cpu_s``,
``apiserver_cpu_s``, ``etcd_cpu_s`` (CPU-seconds of each process over the writes),
``objects``, ``load_avg``. ``measure_floor`` is also what other benchmarks call to print
their onboarding time as a ratio of the floor measured in the same run.

Prints a table; with ``--json`` one JSON object on its last line.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import resource
import secrets
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.harness.kube import ApiServer

NAMESPACE = "bench-floor"
FIELD_MANAGER = "bench-floor"
# The sizes of what atlasd writes per cluster (measured on its Secrets at 5,000 clusters).
IDENTITY_BYTES = 5200
VALUES_BYTES = 2600


def cpu_seconds(pid: int) -> float:
    """User + system CPU-seconds of a process (from /proc, Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _secret(name: str, namespace: str, size: int) -> dict[str, Any]:
    # Base64-sized filler: the API server stores and encodes what it gets.
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": namespace},
        "type": "Opaque",
        "stringData": {"payload": secrets.token_urlsafe(size)[:size]},
    }


def cluster_objects(i: int, namespace: str) -> list[tuple[str, dict[str, Any]]]:
    """(path, body) of the three objects atlasd writes for cluster ``i``."""
    c = f"c{i:05d}"
    svc = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": f"{c}-thanos-sidecar0", "namespace": namespace},
        "spec": {
            "clusterIP": "None",
            "ports": [{"name": "grpc", "port": 11901, "protocol": "TCP"}],
        },
    }
    base = f"/api/v1/namespaces/{namespace}"
    return [
        (
            f"{base}/secrets/{c}-atlas-identity",
            _secret(f"{c}-atlas-identity", namespace, IDENTITY_BYTES),
        ),
        (f"{base}/secrets/{c}-envoy-values", _secret(f"{c}-envoy-values", namespace, VALUES_BYTES)),
        (f"{base}/services/{c}-thanos-sidecar0", svc),
    ]


def measure_floor(
    api: ApiServer, n: int, *, concurrency: int = 16, namespace: str = NAMESPACE
) -> dict[str, Any]:
    """Server-side-apply the objects of ``n`` clusters; the time and CPU it took."""
    api.create_namespace(namespace)
    work: queue.Queue[tuple[str, dict[str, Any]] | None] = queue.Queue()
    for i in range(n):
        for item in cluster_objects(i, namespace):
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
        "clusters": n,
        "objects": 3 * n,
        "concurrency": concurrency,
        "floor_s": round(wall, 2),
        "writer_cpu_s": round(time.process_time() - before[2], 2),
        "apiserver_cpu_s": round(cpu_seconds(api_pid) - before[0], 2),
        "etcd_cpu_s": round(cpu_seconds(etcd_pid) - before[1], 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--clusters", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-floor-") as tmp:
        api = ApiServer(Path(tmp) / "apiserver").start()
        try:
            result = measure_floor(api, args.clusters, concurrency=args.concurrency)
        finally:
            api.stop()
    result["load_avg"] = [round(x, 2) for x in os.getloadavg()]
    result["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print_result(result, as_json=args.json)
    return 0


def print_result(result: dict[str, Any], *, as_json: bool) -> None:
    """A benchmark's figures as a table; with ``as_json``, one JSON object last."""
    width = max(len(k) for k in result)
    for key, value in result.items():
        print(f"{key:<{width}}  {value}")
    if as_json:
        print(json.dumps(result, sort_keys=True))


if __name__ == "__main__":
    raise SystemExit(main())
