"""Benchmark: what a running, idle ``atlasd run`` costs — CPU and memory with N clusters.

    .venv/bin/python bench/bench_idle.py [--clusters 100] [--seconds 30] [--envoy]

Starts the test harness's etcd + kube-apiserver (loopback), creates N cluster Services,
starts a real ``atlasd run`` process (leader election on, informers, ADS, zone writer;
the same command a pod runs) and waits until it has converged: every cluster's values
Secret exists and a reconcile pass wrote nothing. Then, with nothing changing, it reads
atlasd's CPU ticks (``utime + stime`` from ``/proc/<pid>/stat``) over ``--seconds`` and
prints the idle CPU share, plus the resident set (``VmRSS``) and its peak (``VmHWM``)
from ``/proc/<pid>/status``.

With ``--envoy`` an observability Envoy (node ``atlas``, bootstrapped from the
``atlas-envoy-values`` Secret atlasd wrote) holds an ADS stream during the window. It
binds the design's default listener ports (10900/10901/10904 on 0.0.0.0), so it is off by
default.

The idle window includes whatever atlasd does when nothing changes: Lease renewals
(every 2 s), watch bookmarks/timeouts and, if the window crosses it, the periodic resync
pass (every 60 s).
"""

from __future__ import annotations

import argparse
import base64
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.harness.envoy import Envoy
from tests.harness.kube import ApiServer
from tests.harness.wait import wait_until
from tests.integration.daemon_helpers import Atlasd

NAMESPACE = "bench"
MIB = 1024 * 1024


def cluster_service(i: int) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": f"c{i:04d}", "labels": {"goatlas.io/cluster": "true"}},
        "spec": {
            "clusterIP": "None",
            "externalIPs": [f"198.18.{i // 250}.{i % 250 + 1}"],
            "ports": [
                {"name": "thanos", "port": 10901},
                {"name": "prometheus", "port": 9090},
                {"name": "alertmanager", "port": 9093},
            ],
        },
    }


def cpu_ticks(pid: int) -> int:
    # Fields after the parenthesised command: state is [0], utime [11], stime [12].
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[11]) + int(fields[12])


def memory(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


def secrets(api: ApiServer) -> dict[str, Any]:
    with api.admin() as c:
        items = c.get(f"/api/v1/namespaces/{NAMESPACE}/secrets").json()["items"]
    return {i["metadata"]["name"]: i for i in items}


def run(api: ApiServer, workdir: Path, clusters: int, seconds: float, with_envoy: bool) -> None:
    api.create_namespace(NAMESPACE)
    t0 = time.perf_counter()
    with api.admin() as c:
        for i in range(clusters):
            r = c.post(f"/api/v1/namespaces/{NAMESPACE}/services", json=cluster_service(i))
            r.raise_for_status()
    print(f"setup: {clusters} cluster Services created in {time.perf_counter() - t0:.1f} s")

    atlasd = Atlasd(
        workdir / "atlasd",
        f"--kubeconfig={api.admin_kubeconfig}",
        f"--namespace={NAMESPACE}",
        "--identity=bench-idle",
    )
    t0 = time.perf_counter()
    atlasd.start(timeout=120)
    pid = atlasd.proc.pid
    try:

        def converged() -> bool:
            status = atlasd.status()
            last = status.get("last_reconcile") or {}
            done = len(status.get("clusters") or []) == clusters and last.get("writes") == 0
            return done and all(f"c{i:04d}-envoy-values" in secrets(api) for i in range(clusters))

        wait_until(converged, timeout=600, what="atlasd converged", interval=0.5)
        print(
            f"atlasd run: ready and converged on {clusters} clusters in "
            f"{time.perf_counter() - t0:.1f} s (RSS {memory(pid)['VmRSS'] / MIB:.0f} MiB)"
        )
        envoy = None
        if with_envoy:
            values = yaml.safe_load(
                base64.b64decode(secrets(api)["atlas-envoy-values"]["data"]["values.yaml"])
            )
            envoy = Envoy(yaml.safe_load(values["files"]["envoy.yaml"]), "atlas", workdir=workdir)
            envoy.start()

            def acked() -> bool:
                return any(
                    e["node"] == "atlas" and {"cds", "lds"} <= set(e["acked"])
                    for e in atlasd.status().get("envoys") or []
                )

            wait_until(acked, timeout=120, what="the observability Envoy ACKs")
            print("observability Envoy connected and ACKed")
        try:
            hz = os.sysconf("SC_CLK_TCK")
            ticks0, wall0 = cpu_ticks(pid), time.monotonic()
            time.sleep(seconds)  # the measurement window itself: nothing happens, by design
            ticks1, wall1 = cpu_ticks(pid), time.monotonic()
            mem = memory(pid)
            cpu_s = (ticks1 - ticks0) / hz
            wall = wall1 - wall0
            print(
                f"idle {wall:.1f} s with {clusters} clusters"
                f"{' and an observability Envoy' if envoy else ''}: "
                f"atlasd CPU {cpu_s:.2f} s = {100 * cpu_s / wall:.2f}% of one core; "
                f"RSS {mem['VmRSS'] / MIB:.0f} MiB (peak {mem['VmHWM'] / MIB:.0f} MiB)"
            )
        finally:
            if envoy is not None:
                envoy.stop()
    finally:
        atlasd.proc.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clusters", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--envoy", action="store_true", help="connect an observability Envoy")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-idle-") as tmp:
        api = ApiServer(Path(tmp) / "apiserver").start()
        try:
            run(api, Path(tmp), args.clusters, args.seconds, args.envoy)
        finally:
            api.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
