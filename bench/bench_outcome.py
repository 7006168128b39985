"""Benchmark: does Thanos Query see every cluster? (issue 23's outcome, end to end)

    .venv/bin/python bench/bench_outcome.py --clusters N [--changes K] [--refresh 5]
                                            [--extra M] [--observer] [--json]

Real processes, as a user runs them, in a network namespace of the benchmark's own (root;
its loopback also holds 198.18.0.0/15, the clusters' external IPs): etcd + kube-apiserver
(the test harness's); N cluster Services (externalIPs 198.18.x.y, port ``thanos`` 10901) created,
then ``atlasd run`` (leader election on) writing the zone and Thanos Query's endpoint
configuration (``--endpoints-dir``); the observability Envoy bootstrapped from the
``atlas-envoy-values`` Secret atlasd wrote; the downstream-fleet simulator
(``tests/harness/fleet_sim.py``) standing in for the N downstream Envoys + sidecars with
*each cluster's own* server certificate and key, read from its ``<c>-envoy-values``
Secret, answering Thanos's ``Info`` with ``cluster=<name>``; a CoreDNS serving atlasd's
zone (``atlas.``) and standing in for the cluster DNS (every ``*.cluster.local`` name is
the observability Envoy, 127.0.0.1); real Thanos Query v0.39.2 processes (in a private
mount namespace whose resolv.conf points at that CoreDNS; root needed).

1. **Endpoint configuration**: a Thanos Query with ``--endpoint.sd-config-file`` (atlasd's
   ``all.yaml``, re-read every ``--refresh`` s). ``query_sees``: stores Query lists as
   healthy with the right ``cluster`` label / N; ``time_to_all_seen_s``: from the
   Services' creation (and ``..._from_atlasd_start_s``); then K clusters are deleted and
   created again one at a time: ``removed_cluster_gone_s`` (DELETE answered -> Query no
   longer lists it) and ``new_cluster_seen_s`` (POST answered -> Query lists it healthy),
   p50/p99/max, with ``new_cluster_in_file_s`` (POST answered -> atlasd's ``all.yaml``
   lists it: atlasd's share). Thanos's share is its two timers in series: the file is
   re-read every ``--endpoint.sd-config-reload-interval`` (``--refresh``), and the endpoint
   set is updated from it every ``--endpoint.info-timeout`` (5 s, hidden flag), so a new
   cluster appears within about refresh + 5 s of atlasd writing it.
2. **SRV**: a fresh Thanos Query with ``--endpoint=dnssrvnoa+_thanos._tcp.sidecars.thanos.atlas.``
   (``--store.sd-dns-interval`` = ``--refresh``); what it sees after 2 DNS and 2 Info
   intervals + 10 s
   (``srv_query_sees``), ``srv_answer_records`` (what one TCP lookup of CoreDNS returns, and
   ``srv_answer_tc``), and atlasd's own verdict from ``/status`` (``srv_flagged``: the
   name in ``zone.too_large``) with ``srv_event``: the Warning Event on ``atlas-ca``.

3. **Observer** (``--observer``; issue 22): two more ``atlasd run`` replicas (followers,
   serving from their caches), one observing pass 1's Thanos Query
   (``--thanos-query-url``, ``--thanos-query-interval`` = ``--query-interval``, probing
   through the observability Envoy), one not: ``observer_rest_cpu_pct`` (each replica's CPU
   over ``--rest-seconds`` with every cluster seen, % of one core, measured side by side)
   and ``observer_extra_pct_of_core`` (the difference); then one cluster's external IP
   becomes unreachable (an ``unreachable`` route in the namespace's local table) and
   ``unreachable_reported_s``: until ``/status`` says Query does not see it,
   ``unreachable_metric_s``: until ``atlasd_query_clusters{state="unseen"}`` is 1, and
   ``unreachable_hop``: where the probe says its path stops, with ``unreachable_probed_s``.

``--info-timeout S`` is Thanos Query's ``--endpoint.info-timeout``: it asks every endpoint
for its Info that often (5 s by default, i.e. 1,000 Info calls a second at 5,000 clusters,
each through the observability Envoy to the simulator). ``--extra M`` adds M cluster
Services nobody answers for (192.0.2.x), to cross the SRV
ceiling with a small N. Also: CPU-seconds of each process and the load average.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import random
import shlex
import signal
import socket
import struct
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dns.flags
import dns.message
import httpx2
import trio
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from atlasd.xds.plan import ListenPlan
from bench.bench_floor import cpu_seconds, print_result
from tests.harness import components, objects
from tests.harness.envoy import Envoy
from tests.harness.kube import ApiServer
from tests.harness.net import free_port
from tests.harness.procs import Proc
from tests.integration.daemon_helpers import Atlasd
from tests.integration.test_dns_thanos import corefile, dns_address

SRV = "_thanos._tcp.sidecars.thanos.atlas."
NAMESPACE = "bench"
THANOS_PORT = 10901


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class Processes:
    """Every child process of the run, stopped at the end."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: dict[str, Proc] = {}

    def start(self, name: str, argv: list[str]) -> Proc:
        proc = Proc(name, argv, log_dir=self.workdir)
        self.procs[name] = proc
        return proc.start()

    def cpu(self) -> dict[str, float]:
        out = {}
        for name, proc in self.procs.items():
            try:
                out[name] = round(cpu_seconds(proc.pid), 2)
            except (OSError, ValueError, RuntimeError):
                out[name] = float("nan")
        return out

    def stop(self) -> None:
        for proc in reversed(list(self.procs.values())):
            proc.stop()


def thanos_query(
    procs: Processes, name: str, dns_addr: str, flags: list[str], workdir: Path
) -> str:
    resolv = workdir / "resolv.conf"
    resolv.write_text(f"nameserver {dns_addr}\noptions ndots:1 timeout:1 attempts:2\n")
    http_port = free_port()
    argv = [
        str(components.thanos()),
        "query",
        f"--http-address=127.0.0.1:{http_port}",
        f"--grpc-address=127.0.0.1:{free_port()}",
        *flags,
    ]
    script = 'mount --bind "$1" /etc/resolv.conf && shift && exec "$@"'
    wrap = ["unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh", str(resolv)]
    procs.start(name, [*wrap, *argv])
    return f"http://127.0.0.1:{http_port}"


async def healthy(url: str, client: httpx2.AsyncClient) -> dict[str, str]:
    try:
        body = (await client.get(f"{url}/api/v1/stores")).json()
    except (httpx2.HTTPError, ValueError):
        return {}
    out = {}
    for group in (body.get("data") or {}).values():
        for store in group:
            if not store.get("lastError"):
                labels = [ls.get("cluster", "") for ls in store.get("labelSets") or []]
                out[store["name"]] = ",".join(labels)
    return out


async def wait_for(
    check: Callable[[], Any], *, within: float, interval: float = 0.1
) -> float | None:
    """Seconds until ``await check()`` is true, or None after ``within`` seconds."""
    start = time.monotonic()
    while time.monotonic() - start < within:
        if await check():
            return time.monotonic() - start
        await trio.sleep(interval)
    return None


def srv_over_tcp(addr: str) -> tuple[int, bool]:
    query = dns.message.make_query(SRV, "SRV", use_edns=False).to_wire()
    with socket.create_connection((addr, 53), timeout=5) as sock:
        sock.sendall(struct.pack("!H", len(query)) + query)
        data = b""
        while len(data) < 2 or len(data) < 2 + struct.unpack("!H", data[:2])[0]:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    msg = dns.message.from_wire(data[2:])
    return sum(len(r) for r in msg.answer), bool(msg.flags & dns.flags.TC)


def cluster_service(name: str, ip: str) -> dict[str, Any]:
    return objects.cluster_service(name, ip, ports=(("thanos", THANOS_PORT),))


def values_secrets(api: ApiServer) -> dict[str, dict[str, Any]]:
    """Every ``<c>-envoy-values`` Secret's values, by cluster (one LIST)."""
    with api.admin() as c:
        r = c.get(f"/api/v1/namespaces/{NAMESPACE}/secrets", timeout=120)
    r.raise_for_status()
    out = {}
    for item in r.json()["items"]:
        name = item["metadata"]["name"]
        if name.endswith("-envoy-values") and name != "atlas-envoy-values":
            values = yaml.safe_load(base64.b64decode(item["data"]["values.yaml"]))
            out[name.removesuffix("-envoy-values")] = values
    return out


def observability_bootstrap(api: ApiServer) -> dict[str, Any]:
    """The observability Envoy's bootstrap, from the values atlasd wrote for it."""
    with api.admin() as c:
        r = c.get(f"/api/v1/namespaces/{NAMESPACE}/secrets/atlas-envoy-values")
    obs = yaml.safe_load(base64.b64decode(r.json()["data"]["values.yaml"]))
    boot: dict[str, Any] = yaml.safe_load(obs["files"]["envoy.yaml"])
    return boot


async def simulate_clusters(
    api: ApiServer,
    ips: dict[str, str],
    workdir: Path,
    procs: Processes,
    *,
    within: float,
    duration: float,
) -> float:
    """Once atlasd has written every cluster's values (waiting up to ``within`` seconds),
    the downstream-fleet simulator with each cluster's own server certificate from them.
    Returns when the values were all there (``time.monotonic()``)."""

    async def every_values() -> bool:
        got = await trio.to_thread.run_sync(values_secrets, api)
        return set(ips) <= set(got)

    if await wait_for(every_values, within=within, interval=2) is None:
        raise RuntimeError("atlasd did not write every cluster's values")
    values = await trio.to_thread.run_sync(values_secrets, api)
    written = time.monotonic()
    sim = workdir / "sim"
    sim.mkdir()
    entries = []
    for name, ip in ips.items():
        files = values[name]["files"]
        (sim / f"{name}.pem").write_text(files["server.pem"])
        (sim / f"{name}.key").write_text(files["server-key.pem"])
        (sim / "ca.pem").write_text(files["ca.pem"])
        entries.append(
            {"name": name, "address": ip, "cert": str(sim / f"{name}.pem"),
             "key": str(sim / f"{name}.key")}
        )  # fmt: skip
    spec = sim / "fleet.json"
    port = ListenPlan().downstream_default.thanos
    spec.write_text(json.dumps({"ca": str(sim / "ca.pem"), "port": port, "clusters": entries}))
    sim_argv = [sys.executable, "-m", "tests.harness.fleet_sim", str(spec)]
    procs.start("simulator", [*sim_argv, "--duration", str(duration)])
    ready = Path(f"{spec}.ready")
    if await wait_for(lambda: trio.to_thread.run_sync(ready.exists), within=600) is None:
        raise RuntimeError("the simulator did not get ready")
    return written


async def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    n, k = args.clusters, args.changes
    procs = Processes(workdir)
    out: dict[str, Any] = {"clusters": n, "changes": k, "refresh_s": args.refresh}
    ips = {f"sim{i:05d}": f"198.18.{i // 250}.{i % 250 + 1}" for i in range(n)}
    pads = {f"pad{i:05d}": f"192.0.2.{i % 250 + 1}" for i in range(args.extra)}
    dns_addr = dns_address()
    api = ApiServer(workdir / "apiserver").start()
    envoy: Envoy | None = None
    daemon: Atlasd | None = None
    try:
        api.create_namespace(NAMESPACE)
        path = f"/api/v1/namespaces/{NAMESPACE}/services"
        t_created = time.monotonic()
        with api.admin() as c:
            for name, ip in {**ips, **pads}.items():
                c.post(path, json=cluster_service(name, ip)).raise_for_status()
        out["create_services_s"] = round(time.monotonic() - t_created, 1)
        ep_dir = workdir / "endpoints"
        daemon = Atlasd(
            workdir / "atlasd",
            f"--kubeconfig={api.admin_kubeconfig}",
            f"--namespace={NAMESPACE}",
            f"--endpoints-dir={ep_dir}",
            "--identity=bench-outcome",
        )
        t_atlasd = time.monotonic()
        daemon.start(timeout=600)
        client = httpx2.AsyncClient(timeout=10)

        # The simulator: each cluster's own server certificate and key (its values).
        written = await simulate_clusters(
            api, ips, workdir, procs, within=args.max_seconds / 3, duration=args.max_seconds
        )
        out["values_written_s"] = round(written - t_atlasd, 1)

        # The observability Envoy, from the values atlasd wrote for it.
        envoy = Envoy(observability_bootstrap(api), "atlas", workdir=workdir)
        envoy.start()

        zone = daemon.zone_file
        (workdir / "Corefile").write_text(corefile(dns_addr, zone))
        procs.start("coredns", [str(components.coredns()), "-conf", str(workdir / "Corefile")])

        addr = {name: f"{name}-thanos-sidecar0.{NAMESPACE}.svc.cluster.local:{THANOS_PORT}" for name in ips}  # fmt: skip
        want = {addr[name]: name for name in ips}

        # -- pass 1: the endpoint configuration ---------------------------------------
        (workdir / "q1").mkdir()
        url = thanos_query(
            procs,
            "query-file",
            dns_addr,
            [
                f"--endpoint.sd-config-file={ep_dir / 'all.yaml'}",
                f"--endpoint.sd-config-reload-interval={args.refresh}s",
                f"--endpoint.info-timeout={args.info_timeout}s",
            ],
            workdir / "q1",
        )

        async def all_seen() -> bool:
            return await healthy(url, client) == want

        seen = await wait_for(all_seen, within=args.max_seconds / 3, interval=0.5)
        now = time.monotonic()
        out["time_to_all_seen_s"] = round(now - t_created, 1) if seen is not None else None
        out["time_to_all_seen_from_atlasd_start_s"] = (
            round(now - t_atlasd, 1) if seen is not None else None
        )
        got = await healthy(url, client)
        out["query_sees"] = round(sum(1 for a, lb in got.items() if want.get(a) == lb) / n, 4)
        print(f"pass 1: {out}", file=sys.stderr, flush=True)

        new_s: list[float] = []
        gone_s: list[float] = []
        file_s: list[float] = []
        for name in random.Random(7).sample(sorted(ips), min(k, n)):
            t = time.monotonic()
            with api.admin() as c:
                c.delete(f"{path}/{name}").raise_for_status()

            async def absent(name: str = name) -> bool:
                return addr[name] not in await healthy(url, client)

            s = await wait_for(absent, within=args.refresh + args.info_timeout * 3 + 60)
            gone_s.append(time.monotonic() - t if s is not None else float("inf"))
            t = time.monotonic()
            with api.admin() as c:
                c.post(path, json=cluster_service(name, ips[name])).raise_for_status()

            async def in_file(name: str = name) -> bool:
                text = await trio.to_thread.run_sync((ep_dir / "all.yaml").read_text)
                return f"- address: {addr[name]}\n" in text

            s = await wait_for(in_file, within=60, interval=0.01)
            file_s.append(time.monotonic() - t if s is not None else float("inf"))

            async def present(name: str = name) -> bool:
                return (await healthy(url, client)).get(addr[name]) == name

            s = await wait_for(present, within=args.refresh + args.info_timeout * 3 + 60)
            new_s.append(time.monotonic() - t if s is not None else float("inf"))
        out["removed_cluster_gone_s"] = summary(gone_s)
        out["new_cluster_seen_s"] = summary(new_s)
        out["new_cluster_in_file_s"] = summary(file_s)

        # -- pass 3: the observer (issue 22) -------------------------------------------
        if args.observer:
            obs_thanos = f"127.0.0.1:{THANOS_PORT}"
            out.update(await observer_pass(args, api, workdir, url, ips, obs_thanos))
            print(f"pass 3: {out}", file=sys.stderr, flush=True)

        # -- pass 2: the SRV name -----------------------------------------------------
        doc = (await client.get(f"{daemon.url}/status")).json()
        flagged = [a for a in doc["zone"]["too_large"] if a["name"] == SRV]
        out["srv_records_in_zone"] = doc["zone"]["records"]
        out["srv_flagged"] = flagged[0] if flagged else False
        with api.admin() as c:
            events = c.get(f"/api/v1/namespaces/{NAMESPACE}/events").json()["items"]
        out["srv_event"] = any(e["reason"] == "SrvAnswerTooLarge" for e in events)
        answered, tc = await trio.to_thread.run_sync(srv_over_tcp, dns_addr)
        out["srv_answer_records"] = answered
        out["srv_answer_tc"] = tc
        (workdir / "q2").mkdir()
        url2 = thanos_query(
            procs,
            "query-srv",
            dns_addr,
            [
                f"--endpoint=dnssrvnoa+{SRV}",
                f"--store.sd-dns-interval={args.refresh}s",
                f"--endpoint.info-timeout={args.info_timeout}s",
            ],
            workdir / "q2",
        )

        async def srv_all_seen() -> bool:
            return await healthy(url2, client) == want

        s = await wait_for(srv_all_seen, within=args.refresh * 2 + args.info_timeout * 2 + 10)
        got2 = await healthy(url2, client)
        out["srv_query_sees"] = round(sum(1 for a, lb in got2.items() if want.get(a) == lb) / n, 4)
        out["srv_time_to_all_seen_s"] = round(s, 2) if s is not None else None
        await client.aclose()
        out["cpu_s"] = procs.cpu()
        out["cpu_s"]["atlasd"] = round(cpu_seconds(daemon.proc.pid), 2)
        out["cpu_s"]["envoy-atlas"] = round(cpu_seconds(envoy.proc.pid), 2)
    finally:
        if envoy is not None:
            envoy.stop()
        procs.stop()
        if daemon is not None:
            daemon.proc.stop()
        api.stop()
    out["load_avg"] = [round(x, 2) for x in os.getloadavg()]
    return out


async def observer_pass(
    args: argparse.Namespace,
    api: ApiServer,
    workdir: Path,
    query_url: str,
    ips: dict[str, str],
    obs_thanos: str,
) -> dict[str, Any]:
    """Two follower replicas, observer on and off, side by side; then one cluster becomes
    unreachable and the observing one must say so (see the module docstring, pass 3)."""
    n = len(ips)
    kube = (f"--kubeconfig={api.admin_kubeconfig}", f"--namespace={NAMESPACE}")
    off = Atlasd(workdir / "atlasd-off", *kube, "--identity=bench-observer-off")
    on = Atlasd(
        workdir / "atlasd-on", *kube, "--identity=bench-observer-on",
        f"--thanos-query-url={query_url}", f"--thanos-query-interval={args.query_interval}",
        f"--probe-via={obs_thanos}",
    )  # fmt: skip
    out: dict[str, Any] = {"query_interval_s": args.query_interval}
    try:
        for replica in (off, on):
            await trio.to_thread.run_sync(lambda r=replica: r.start(timeout=600))

        async def query_section() -> dict[str, Any]:
            doc = await trio.to_thread.run_sync(on.status)
            q: dict[str, Any] = doc.get("query") or {}
            return q

        async def all_seen() -> bool:
            return ((await query_section()).get("counts") or {}).get("seen") == n

        if await wait_for(all_seen, within=args.query_interval * 3 + 120, interval=1) is None:
            raise RuntimeError("the observing replica never saw Query see every cluster")
        await trio.sleep(args.query_interval)  # past a round that saw everything
        before = {"off": cpu_seconds(off.proc.pid), "on": cpu_seconds(on.proc.pid)}
        await trio.sleep(args.rest_seconds)
        after = {"off": cpu_seconds(off.proc.pid), "on": cpu_seconds(on.proc.pid)}
        pct_core = {r: round((after[r] - before[r]) / args.rest_seconds * 100, 2) for r in after}
        out["observer_rest_cpu_pct"] = pct_core
        out["observer_extra_pct_of_core"] = round(pct_core["on"] - pct_core["off"], 2)

        victim = sorted(ips)[0]
        route = ["ip", "route", "add", "unreachable", f"{ips[victim]}/32", "table", "local"]
        t = time.monotonic()
        await trio.run_process(route)
        out["unreachable_cluster"] = victim

        async def reported() -> bool:
            c = ((await query_section()).get("clusters") or {}).get(victim) or {}
            return c.get("seen") is False

        async def in_metric() -> bool:
            text = (await trio.to_thread.run_sync(lambda: httpx2.get(f"{on.url}/metrics"))).text
            return 'atlasd_query_clusters{state="unseen"} 1.0' in text

        async def probed() -> bool:
            c = ((await query_section()).get("clusters") or {}).get(victim) or {}
            return bool(c.get("probe"))

        bound = args.query_interval * 4 + args.info_timeout * 4 + 60
        for key, check in (("unreachable_reported_s", reported),
                           ("unreachable_metric_s", in_metric),
                           ("unreachable_probed_s", probed)):  # fmt: skip
            s = await wait_for(check, within=bound, interval=0.5)
            out[key] = round(time.monotonic() - t, 1) if s is not None else None
        c = ((await query_section()).get("clusters") or {}).get(victim) or {}
        out["unreachable_hop"] = (c.get("probe") or {}).get("hop")
        await trio.run_process(["ip", "route", "del", *route[3:]], check=False)
    finally:
        for replica in (off, on):
            replica.proc.stop()
    return out


def summary(values: list[float], digits: int = 2) -> dict[str, float]:
    return {
        "p50": round(pct(values, 0.5), digits),
        "p99": round(pct(values, 0.99), digits),
        "max": round(max(values), digits) if values else float("nan"),
    }


NETNS_ENV = "ATLASD_BENCH_OUTCOME_NETNS"


def in_private_network(env: str = NETNS_ENV, *, resolv: str | None = None) -> None:
    """Re-run this command in a network namespace of its own whose loopback interface also
    holds the benchmark network 198.18.0.0/15: the simulated clusters' external IPs
    (Kubernetes refuses loopback external IPs), with no route out and nothing changed on
    the machine. With ``resolv`` (a resolv.conf's text), also in a mount namespace of its
    own whose /etc/resolv.conf is that text (a name server the benchmark starts inside).
    ``env`` marks the re-run. In the re-run, SIGTERM (timeout(1), a CI runner) unwinds like
    Ctrl-C, so the benchmark's ``finally`` stops every process it started."""
    if os.environ.get(env) == "1":
        signal.signal(signal.SIGTERM, _stop)
        return
    setup = "ip link set lo up && ip route add local 198.18.0.0/15 dev lo"
    unshare = ["unshare", "--net"]
    if resolv is not None:
        fd, path = tempfile.mkstemp(prefix="atlasd-bench-resolv-", suffix=".conf")
        with os.fdopen(fd, "w") as f:
            f.write(resolv)
        unshare += ["--mount", "--propagation", "private"]
        quoted = shlex.quote(path)
        setup += f" && mount --bind {quoted} /etc/resolv.conf && rm -f {quoted}"
    argv = [*unshare, "sh", "-c", f'{setup} && exec "$@"', "sh", sys.executable, *sys.argv]
    os.environ[env] = "1"
    os.execvp(argv[0], argv)


def _stop(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main() -> int:
    in_private_network()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clusters", type=int, required=True)
    parser.add_argument("--changes", type=int, default=10)
    parser.add_argument("--refresh", type=int, default=5, help="Thanos re-read/DNS interval, s")
    parser.add_argument("--extra", type=int, default=0, help="Services nobody answers for")
    parser.add_argument(
        "--info-timeout",
        type=int,
        default=5,
        help="Thanos Query's --endpoint.info-timeout, s: also how often it asks every "
        "endpoint for its Info (Thanos's default 5)",
    )
    parser.add_argument("--observer", action="store_true", help="pass 3 (issue 22)")
    parser.add_argument("--query-interval", type=int, default=30, help="pass 3, s")
    parser.add_argument("--rest-seconds", type=int, default=60, help="pass 3, s")
    parser.add_argument("--max-seconds", type=int, default=3600)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="atlasd-bench-outcome-") as tmp:
        out = trio.run(run, args, Path(tmp))
    print_result(out, as_json=args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
