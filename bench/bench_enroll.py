"""Benchmark: N downstream agents enrolling at once against one atlasd (issue 24).

    .venv/bin/python bench/bench_enroll.py [--clusters 1000] [--json]

Real processes, in a network namespace of the benchmark's own (root; the set-up of
``bench_outcome.py``: its loopback also holds 198.18.0.0/15, the clusters' external IPs):
etcd + kube-apiserver; N cluster Services; ``atlasd run`` with its enrollment endpoint
(``--enroll-listen``). Once atlasd serves every cluster, one join token per cluster is
minted as ``atlasd cluster token`` does (``atlasd.enroll.store.mint``, before the clock
starts). Then all N agents start at once (``atlasd.enroll.agent``, in this process, each
connecting from an address of its own, 127.0.x.y, as distinct clusters would): make two
P-256 keys, fetch and pin-check the bundle, send the CSRs with the token, write the
credentials directory. Figures: ``time_to_all_s`` (start -> the last certificate on
disk), ``token_to_cert_s`` p50/p99/max per agent, failures (with their reasons counted),
atlasd's CPU-seconds over the burst, the load average before and after. Target: 1,000
within 60 s.
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx2
import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from atlasd.certpolicy import load_cert
from atlasd.enroll import agent, store
from atlasd.kube.client import KubeClient
from atlasd.kube.config import load_config
from atlasd.kube.errors import NotFound
from atlasd.kube.resources import SECRETS
from atlasd.kube.secrets import secret_data
from atlasd.model import Settings
from bench.bench_floor import print_result
from bench.bench_outcome import (
    NAMESPACE,
    cluster_service,
    cpu_seconds,
    in_private_network,
    summary,
    wait_for,
)
from tests.harness.kube import ApiServer
from tests.harness.net import free_port
from tests.integration.daemon_helpers import Atlasd


def _clusters_served(daemon: Atlasd, n: int) -> bool:
    doc = httpx2.get(f"{daemon.url}/status", timeout=30).json()
    clusters = doc.get("clusters") or []
    return len(clusters) >= n


async def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    n = args.clusters
    out: dict[str, Any] = {"clusters": n}
    ips = {f"c{i:05d}": f"198.18.{i // 250}.{i % 250 + 1}" for i in range(n)}
    api = ApiServer(workdir / "apiserver").start()
    daemon: Atlasd | None = None
    port = free_port()
    try:
        api.create_namespace(NAMESPACE)
        with api.admin() as c:
            for name, ip in ips.items():
                c.post(
                    f"/api/v1/namespaces/{NAMESPACE}/services", json=cluster_service(name, ip)
                ).raise_for_status()
        daemon = Atlasd(
            workdir / "atlasd",
            f"--kubeconfig={api.admin_kubeconfig}",
            f"--namespace={NAMESPACE}",
            "--identity=bench-enroll",
            f"--enroll-listen=127.0.0.1:{port}",
        )
        daemon.start(timeout=600)
        settings = Settings(namespace=NAMESPACE)
        async with KubeClient(load_config(str(api.admin_kubeconfig), None)) as kube:

            async def ca_ready() -> bool:
                try:
                    secret = await kube.get(SECRETS, "atlas-ca", namespace=NAMESPACE)
                except NotFound:
                    return False
                return load_cert(secret_data(secret).get("ca.pem", b"")) is not None

            if await wait_for(ca_ready, within=600, interval=1) is None:
                raise RuntimeError("atlasd made no CA")
            secret = await kube.get(SECRETS, "atlas-ca", namespace=NAMESPACE)
            ca = load_cert(secret_data(secret)["ca.pem"])
            assert ca is not None

            async def served() -> bool:
                return await trio.to_thread.run_sync(_clusters_served, daemon, n)

            if await wait_for(served, within=900, interval=2) is None:
                raise RuntimeError("atlasd does not list every cluster")
            now = dt.datetime.now(dt.UTC)
            tokens = {}
            for name in ips:
                tokens[name], _ = await store.mint(
                    kube, name, namespace=NAMESPACE, ca_cert=ca, now=now
                )
        # Let the set-up's work (every cluster's certificates) settle before the clock.
        await trio.sleep(5)
        out["load_start"] = round(os.getloadavg()[0], 2)
        cpu0 = cpu_seconds(daemon.proc.pid)
        latencies: list[float] = []
        failures: collections.Counter[str] = collections.Counter()
        start = time.monotonic()

        async def one(i: int, name: str) -> None:
            server = agent.Server(
                "127.0.0.1", port, local_address=f"127.0.{i // 250}.{i % 250 + 2}"
            )
            t = time.monotonic()
            try:
                creds = await agent.enroll(server, tokens[name], cluster=name, settings=settings)
                await trio.to_thread.run_sync(agent.write, workdir / "certs" / name, creds)
            except agent.AgentError as exc:
                failures[str(exc).replace(f"127.0.0.1:{port}", "")[:80]] += 1
                return
            latencies.append(time.monotonic() - t)

        async with trio.open_nursery() as nursery:
            for i, name in enumerate(ips):
                nursery.start_soon(one, i, name)
        out["time_to_all_s"] = round(time.monotonic() - start, 2)
        out["enrolled"] = f"{len(latencies)}/{n}"
        out["token_to_cert_s"] = summary(latencies, 3)
        out["failures"] = dict(failures)
        out["atlasd_cpu_s"] = round(cpu_seconds(daemon.proc.pid) - cpu0, 2)
        out["load_end"] = round(os.getloadavg()[0], 2)
    finally:
        if daemon is not None:
            daemon.proc.stop()
        api.stop()
    return out


def main() -> int:
    in_private_network()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clusters", type=int, default=1000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="atlasd-bench-enroll-") as tmp:
        out = trio.run(run, args, Path(tmp))
    print_result(out, as_json=args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
