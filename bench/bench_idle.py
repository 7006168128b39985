"""Benchmark: what a running, idle ``atlasd run`` costs — CPU and memory with N clusters.

    .venv/bin/python bench/bench_idle.py [--clusters 100] [--seconds 30] [--envoy [--changes 20]]

Starts the test harness's etcd + kube-apiserver (loopback), creates N cluster Services,
starts a real ``atlasd run`` process (leader election on, informers, ADS, zone writer;
the same command a pod runs) and waits until it has converged: every cluster's values
Secret exists and a reconcile pass wrote nothing. Then, with nothing changing, it reads
atlasd's CPU ticks (``utime + stime`` from ``/proc/<pid>/stat``) over ``--seconds`` and
prints the idle CPU share, plus the resident set (``VmRSS``) and its peak (``VmHWM``)
from ``/proc/<pid>/status`` (with ``--envoy``, the observability Envoy's too).

With ``--envoy`` an observability Envoy (node ``atlas``, bootstrapped from the
``atlas-envoy-values`` Secret atlasd wrote) holds an ADS stream during the window. It
binds the design's default listener ports (10900/10901/10904 on 0.0.0.0), so it is off by
default. After the idle window, ``--changes N`` (with ``--envoy``) measures the whole
change-to-Envoy path N times: a new cluster Service is created in the API server, and the
clock stops when the observability Envoy holds both its upstream cluster
(``<name>-prom``) and its ``/prom/<name>/`` route (watch -> fleet -> snapshot -> ADS push
-> Envoy applies and ACKs).

The idle window includes whatever atlasd does when nothing changes: Lease renewals
(every 2 s), watch bookmarks/timeouts and, if the window crosses it, the periodic resync
pass (every 300 s: a 330 s window holds one).
"""

from __future__ import annotations

import argparse
import base64
import functools
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx2
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_floor import cluster_service
from tests.harness.envoy import Envoy
from tests.harness.kube import ApiServer
from tests.harness.wait import wait_until
from tests.integration.daemon_helpers import Atlasd

NAMESPACE = "bench"
MIB = 1024 * 1024


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


def _has(envoy: Envoy, name: str) -> bool:
    if not envoy.endpoint_addresses(f"{name}-prom"):
        return False
    scopes = httpx2.get(
        f"{envoy.admin_url}/config_dump", params={"resource": "dynamic_scoped_route_configs"}
    )
    return f'"/prom/{name}/"' in scopes.text


def _dials(envoy: Envoy, name: str, ip: str) -> bool:
    return envoy.endpoint_addresses(f"{name}-prom") == {ip}


def _report(what: str, took: list[float]) -> None:
    ordered = sorted(took)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    print(
        f"{what} ({len(took)} changes): median {1000 * statistics.median(took):.0f} ms,"
        f" p99 {1000 * p99:.0f} ms, min {1000 * ordered[0]:.0f} ms, max {1000 * ordered[-1]:.0f} ms"
    )


def print_histograms(url: str) -> None:
    """Mean of atlasd's own latency histograms over the run (where the time went)."""
    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    for line in httpx2.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        key, value = line.rsplit(" ", 1)
        for suffix, into in (("_sum", sums), ("_count", counts)):
            base, _, labels = key.partition("{")
            if base.endswith(suffix) and base.startswith(
                ("atlasd_fleet_publish", "atlasd_reconcile_duration", "atlasd_xds_push_latency")
            ):
                name = base[: -len(suffix)] + (("{" + labels) if labels else "")
                into[name] = into.get(name, 0.0) + float(value)
    for name in sorted(sums):
        if counts.get(name):
            print(
                f"  {name}: mean {1000 * sums[name] / counts[name]:.1f} ms over {counts[name]:.0f}"
            )


def change_to_envoy(api: ApiServer, envoy: Envoy, first: int, changes: int) -> None:
    created: list[float] = []
    updated: list[float] = []
    path = f"/api/v1/namespaces/{NAMESPACE}/services"
    with api.admin() as c:
        for i in range(first, first + changes):
            svc = cluster_service(i)
            name = svc["metadata"]["name"]
            t0 = time.perf_counter()
            c.post(path, json=svc).raise_for_status()
            wait_until(functools.partial(_has, envoy, name), timeout=60, what=name, interval=0.005)
            created.append(time.perf_counter() - t0)
        for i in range(changes):
            name = cluster_service(i)["metadata"]["name"]
            ip = cluster_service(i, net=19)["spec"]["externalIPs"][0]
            t0 = time.perf_counter()
            c.patch(
                f"{path}/{name}",
                content=json.dumps({"spec": {"externalIPs": [ip]}}),
                headers={"content-type": "application/merge-patch+json"},
            ).raise_for_status()
            wait_until(
                functools.partial(_dials, envoy, name, ip), timeout=60, what=name, interval=0.005
            )
            updated.append(time.perf_counter() - t0)
    # A new cluster is served once the leader has issued its certificates and the
    # identity Secret came back through the watch (every replica serves stored PKI only).
    _report("new cluster Service -> observability Envoy holds its cluster and route", created)
    _report("external IP changed -> observability Envoy dials the new address", updated)


def run(
    api: ApiServer,
    workdir: Path,
    clusters: int,
    seconds: float,
    with_envoy: bool,
    changes: int,
) -> None:
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
            if not done:
                return False
            have = secrets(api)
            names = (cluster_service(i)["metadata"]["name"] for i in range(clusters))
            return all(f"{name}-envoy-values" in have for name in names)

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
            if envoy is not None:
                # What the envoy chart's resource requests are sized from (docs/charts.md).
                emem = memory(envoy.proc.pid)
                print(
                    f"observability Envoy with {clusters} clusters: "
                    f"RSS {emem['VmRSS'] / MIB:.0f} MiB (peak {emem['VmHWM'] / MIB:.0f} MiB)"
                )
            if envoy is not None and changes:
                change_to_envoy(api, envoy, clusters, changes)
                print_histograms(atlasd.url)
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
    parser.add_argument(
        "--changes", type=int, default=20, help="with --envoy: change -> Envoy measurements"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-idle-") as tmp:
        api = ApiServer(Path(tmp) / "apiserver").start()
        try:
            run(api, Path(tmp), args.clusters, args.seconds, args.envoy, args.changes)
        finally:
            api.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
