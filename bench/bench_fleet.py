"""Benchmark: N downstream Envoys' ADS streams for real, through the observability Envoy,
against two atlasd replicas — initial state, a fleet-wide push, a CA rotation, a leader
SIGKILL and a rolling restart (issue 25).

    .venv/bin/python bench/bench_fleet.py --clusters N [--load-procs P] [--no-floor] [--atlasd-path DIR] [--json]
        [--until push|rotation]

Real processes, as in production, in a network and mount namespace of the benchmark's own
(root; nothing on the machine changes and no fixed port clashes with another run): etcd +
kube-apiserver (the test harness's), N cluster Services, two ``atlasd run`` replicas
(leader election on) on 127.0.0.2:6305 and 127.0.0.3:6305 behind one name,
``atlasd-ads.bench.svc.cluster.local``, which a CoreDNS answers with both addresses (the
ADS Service's stand-in: the observability Envoy balances across what the name resolves to);
the observability Envoy bootstrapped from the ``atlas-envoy-values`` Secret atlasd wrote
(its own ADS over mTLS with the ``atlas`` certificate; its 10900 listener forwarding every
downstream stream, client certificate in XFCC, as docs/xds-authorization.md says); and the
ADS load processes (``tests/harness/adsload``, driven by ``tests/harness/ads_load.py``)
holding one stream per cluster, Delta and SotW alternately, each over its own TLS
connection to 10900 with *that cluster's* client certificate from its ``<c>-envoy-values``.

A stream is **current** when it has ACKed, for every type its node's snapshot holds, the
snapshot's version on the replica serving it (``/status/envoys``: versions are content
hashes, the same on both replicas), and the load process agrees (its own record of what it
ACKed). Phases, each timed from its cause, per stream p50/p99/max and ``time_to_all``:

1. ``initial``: the load processes dial (each has loaded its streams' TLS contexts
   first, as Envoys do at boot) -> every stream current (``rss_per_stream_kib``:
   both replicas' RSS growth over N).
2. ``push``: a fleet-wide push — a local Alertmanager Service appears, so every
   downstream node gets the alert relay (listener, route, cluster) -> every stream current
   at a new version; ``cpu_s``: both replicas' CPU over it (``cpu_by_process_s``: every
   process's), and the API writes it caused (every cluster's values carry
   ``alertmanagerCount``: N rewrites by the leader, not on the xDS path; the leader sends
   the Envoys theirs first, ``writes_deferred_s``): ``writes_when_all_current``, then
   ``writes_done_s`` (the phase waits for all N before the next).
3. ``rotation``: ``goatlas.io/ca-rotate`` on ``atlas-ca`` -> every stream holds new SDS
   leaves, checked against each cluster's ``<c>-atlas-identity`` Secret (fingerprints);
   ``writes``, ``writes_done_s`` and ``write_rate``; with the floor (``bench_floor``: a bare
   writer of two Secrets and a Service per cluster at atlasd's write concurrency, measured
   first in the same run) ``writes_over_floor``; with the rotation's own floor
   (``bench_floor.measure_rotation_floor``: the same objects written, then every cluster's
   two Secrets applied again with leaves of a new CA, timed: the rotation's writes as
   updates, ``rotation_floor_s``) ``leaves_over_rotation_floor`` (every stream holding its
   new leaves, over it); ``cpu_by_process_s``: every process's CPU
   until every stream is current; ``loop``: each replica's watchdog since it started
   (``bench_e2e.loop_stalls``: event loop stalls, the longest batch, where the last stall
   held the loop; also after ``initial``).
4. ``kill``: SIGKILL of the leader, then at once a new cluster Service; ``lease_s`` (kill
   -> the survivor holds the Lease), ``new_leader_wrote_s`` (kill -> the new cluster's
   values written); the dead replica's streams -> current elsewhere (``time_to_all``);
   ``reopens_per_stream`` and ``reopened_more_than_once`` (each of those streams should
   reopen once: the observability Envoy retries a refused connect on the live replica) and
   ``forward_cluster``, the observability Envoy's counters of its forwarding cluster over
   the phase (connect failures, 503s, retries, ejections); then the dead replica is started
   again (as its pod would be).
5. ``roll``: each replica in turn stopped (SIGTERM) and started, waiting for its
   readiness -> every stream current; ``roll_s`` and ``time_to_all`` from the roll's start.
   The replicas come back with ``--ads-max-stream-age`` = ``--stream-age`` (until then 0).
6. ``spread``: the streams per replica right after the roll (the replica restarted last
   holds nearly all), then the time until no replica holds more than 60 % of them (each
   stream ends at its age and the observability Envoy balances the new one).

With ``--py-spy DIR`` (py-spy: the ``profile`` extra; root), each replica is sampled over
the initial snapshots, the push and the rotation's writes (``DIR/<phase>-<replica>.txt``,
collapsed stacks, idle frames left out); the API server's own CPU profile is read over
the rotation (``DIR/rotation-apiserver-NNN.pprof``, Go's pprof).

Each phase also reports ``stale`` (streams not current at its deadline, must be 0), the
load process's reconnects and ``by_replica_s`` (each replica's streams' p50/p99/max: is
one replica's half the slow one?). ``--until push`` stops after the push, ``--until
rotation`` after the rotation. Prints a table;
with ``--json`` one JSON object last.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx2

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from atlasd.reconcile.applier import DEFAULT_CONCURRENCY as APPLY_CONCURRENCY
from bench.bench_e2e import (
    cluster_service,
    cpu_seconds,
    from_checkout,
    loop_stalls,
    metric,
    requests_by_kind,
    rss_mib,
)
from bench.bench_floor import measure_floor, measure_rotation_floor, print_result, sampled
from bench.bench_outcome import (
    Processes,
    in_private_network,
    observability_bootstrap,
    values_secrets,
)
from tests.harness import ads_load, components
from tests.harness.ads_load import leaf_fingerprint, release, split_spec, wait_ready
from tests.harness.envoy import Envoy
from tests.harness.kube import ApiServer
from tests.harness.wait import wait_until
from tests.integration.daemon_helpers import Atlasd

NAMESPACE = "bench"  # bench_outcome reads this namespace (values_secrets, observability_bootstrap)
ADS_NAME = f"atlasd-ads.{NAMESPACE}.svc.cluster.local"
ADS_PORT = 6305
REPLICAS = {"fleet-a": "127.0.0.2", "fleet-b": "127.0.0.3"}
DNS = "127.0.0.53"
NETNS_ENV = "ATLASD_BENCH_FLEET_NETNS"
XDS_PORT = 10900  # the observability Envoy's, as atlasd serves it (the design's port)
LEASE = f"/apis/coordination.k8s.io/v1/namespaces/{NAMESPACE}/leases/atlasd"
SECRETS = f"/api/v1/namespaces/{NAMESPACE}/secrets"
SERVICES = f"/api/v1/namespaces/{NAMESPACE}/services"
ALERTMANAGER = {
    "apiVersion": "v1",
    "kind": "Service",
    "metadata": {"name": "alertmanager-main", "labels": {"app": "kube-prometheus-stack-alertmanager"}},
    "spec": {"selector": {"app": "alertmanager"}, "ports": [{"name": "http", "port": 9093}]},
}  # fmt: skip


def corefile(extra_hosts: dict[str, str] | None = None) -> str:
    """The ADS Service's stand-in: its name answers with both replicas' addresses (and
    ``extra_hosts``, name -> address, with theirs)."""
    pairs = [(ADS_NAME, ip) for ip in REPLICAS.values()] + list((extra_hosts or {}).items())
    hosts = "".join(f"        {ip} {name}\n" for name, ip in pairs)
    return f".:53 {{\n    bind {DNS}\n    hosts {{\n{hosts}        ttl 5\n    }}\n    errors\n}}\n"


def pcts(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p99": None, "max": None}
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return {
        "p50": round(statistics.median(ordered), 2),
        "p99": round(p99, 2),
        "max": round(ordered[-1], 2),
    }


class Fleet:
    """The two replicas, the load processes and what they say about the streams."""

    def __init__(self, replicas: dict[str, Atlasd], loads: list[Any], specs: list[Path]) -> None:
        self.replicas = replicas
        self.loads = loads
        self.specs = specs
        self.client = httpx2.Client(timeout=30)

    def served(self) -> dict[str, tuple[str, dict[str, Any], dict[str, str]]]:
        """For every downstream node with a current stream on a live replica: (replica,
        its stream, its snapshot's versions). A node with a stream that is not current on
        every replica holding one is left out."""
        out: dict[str, tuple[str, dict[str, Any], dict[str, str]]] = {}
        for name, r in self.replicas.items():
            if not r.proc.running():
                continue
            try:
                doc = self.client.get(f"{r.url}/status/envoys").json()
            except httpx2.HTTPError:
                continue
            for e in doc["envoys"]:
                node = e["node"]
                want = doc["snapshots"].get(node)
                if node == "atlas" or not want:
                    continue
                if all(e["acked"].get(t) == v for t, v in want.items()):
                    out[node] = (name, e, want)
        return out

    def on_replica(self, name: str) -> set[str]:
        doc = self.client.get(f"{self.replicas[name].url}/status/envoys").json()
        return {e["node"] for e in doc["envoys"] if e["node"] != "atlas"}

    def client_state(self) -> dict[str, dict[str, Any]]:
        """Every stream as the load processes hold it (they write it on SIGUSR1)."""
        out: dict[str, dict[str, Any]] = {}
        for proc, spec in zip(self.loads, self.specs, strict=True):
            state = Path(f"{spec}.state")
            state.unlink(missing_ok=True)
            proc.signal(signal.SIGUSR1)
            wait_until(state.exists, timeout=60, what=f"{spec.name} state", interval=0.05)
            for s in json.loads(state.read_text())["streams"]:
                out[s["node"]] = s
        return out

    def cpu(self) -> float:
        return sum(cpu_seconds(r.proc.pid) for r in self.replicas.values() if r.proc.running())

    def rss(self) -> float:
        return sum(rss_mib(r.proc.pid) for r in self.replicas.values() if r.proc.running())

    def deferred(self) -> float | None:
        """Seconds the replicas' reconcile workers waited for their ADS server so far
        (``atlasd_reconcile_deferred_seconds_total``); None for an atlasd without it."""
        got = [metric(r.url, "atlasd_reconcile_deferred_seconds_total") for r in self.replicas.values() if r.proc.running()]  # fmt: skip
        if not any(got):
            return None
        return sum(sum(g.values()) for g in got if g)

    def writes(self) -> float:
        total = 0.0
        for r in self.replicas.values():
            if r.proc.running():
                counts = requests_by_kind(r.url)
                total += counts["write"] if counts else 0.0
        return total

    def converge(
        self,
        nodes: set[str],
        *,
        since: float,
        timeout: float,
        ok: Callable[[str, dict[str, Any], dict[str, str]], bool] = lambda n, e, w: True,
    ) -> dict[str, Any]:
        """Wait until every node of ``nodes`` is current (and ``ok``); per node, seconds from
        ``since`` to its stream's last ACK of the versions it is current at."""
        deadline = time.monotonic() + timeout
        while True:
            served = self.served()
            done = {n: v for n, v in served.items() if n in nodes and ok(n, v[1], v[2])}
            if len(done) == len(nodes) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        took = [
            max(e["acked_at"][t] for t in want) - since for _, e, want in done.values()
        ]  # fmt: skip
        stale = sorted(nodes - set(done))
        clients = self.client_state()
        # The load process ACKed what atlasd says it ACKed.
        disagree = [
            n for n, (_, e, want) in done.items()
            if any(clients.get(n, {}).get("acked", {}).get(t) != v for t, v in want.items())
        ]  # fmt: skip
        return {
            "streams": len(nodes),
            "current": len(done),
            "stale": len(stale),
            "stale_sample": stale[:5],
            "client_disagrees": len(disagree),
            "per_stream_s": pcts(took),
            "time_to_all_s": round(max(took), 2) if took and not stale else None,
            "on_replica": {r: sum(1 for v in done.values() if v[0] == r) for r in self.replicas},
            # Per replica, its streams' p50 and last ACK: is one replica's half the slow one?
            "by_replica_s": {
                r: pcts(
                    [t for (name, _, _), t in zip(done.values(), took, strict=True) if name == r]
                )
                for r in self.replicas
            },
            "_done": done,
        }


def identity_leaves(api: ApiServer) -> dict[str, dict[str, str]]:
    """Every cluster's current leaves (``<c>-atlas-identity``), by SDS secret name."""
    with api.admin() as c:
        r = c.get(SECRETS, params={"labelSelector": "goatlas.io/cert=identity"}, timeout=300)
    r.raise_for_status()
    out = {}
    for item in r.json()["items"]:
        data = {k: base64.b64decode(v) for k, v in item["data"].items()}
        name = item["metadata"]["name"].removesuffix("-atlas-identity")
        out[name] = {
            "server": leaf_fingerprint(data["server.crt"]),
            "client": leaf_fingerprint(data["client.crt"]),
        }
    return out


def values_counting_alertmanagers(api: ApiServer, nodes: set[str]) -> int:
    """How many clusters' values count the one local Alertmanager (``alertmanagerCount``)."""
    got = values_secrets(api)
    return sum(1 for c in nodes if got.get(c, {}).get("atlas", {}).get("alertmanagerCount") == 1)


def lease_holder(api: ApiServer) -> str | None:
    with api.admin() as c:
        r = c.get(LEASE)
    return r.json().get("spec", {}).get("holderIdentity") if r.status_code == 200 else None


def secret_exists(api: ApiServer, name: str) -> bool:
    with api.admin() as c:
        return c.get(f"{SECRETS}/{name}").status_code == 200


def forward_stats(envoy: Envoy) -> dict[str, int]:
    """The observability Envoy's counters for the cluster that forwards downstream xDS
    (``atlasd-ads-forward``), short names."""
    prefix = "cluster.atlasd-ads-forward."
    return {k.removeprefix(prefix): v for k, v in envoy.stats(prefix).items()}


def strip(phase: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in phase.items() if not k.startswith("_")}


def replica(
    api: ApiServer, workdir: Path, identity: str, ip: str, *, atlasd_path: Path | None = None
) -> Atlasd:
    """One ``atlasd run`` replica (leader election on), its ADS on ``ip``, telling the
    observability Envoy to reach ADS by ``ADS_NAME`` (both replicas); with
    ``atlasd_path``, the atlasd package of that checkout (before/after)."""
    atlasd = Atlasd(
        workdir / identity,
        f"--kubeconfig={api.admin_kubeconfig}",
        f"--namespace={NAMESPACE}",
        f"--identity={identity}",
        f"--ads-listen={ip}:{ADS_PORT}",
        f"--atlasd-ads-host={ADS_NAME}",
        f"--atlasd-ads-port={ADS_PORT}",
        ads_port=ADS_PORT,
    )
    if atlasd_path is not None:
        from_checkout(atlasd, atlasd_path)
    return atlasd


def load_specs(
    values: dict[str, dict[str, Any]], nodes: set[str], workdir: Path, processes: int
) -> list[Path]:
    """The load processes' specs: one stream per node (Delta and SotW alternately), each
    with its cluster's own certificate, key and CA bundle from its values."""
    certs = workdir / "certs"
    certs.mkdir()
    streams = []
    for i, name in enumerate(sorted(nodes)):
        files = values[name]["files"]
        for key, suffix in (("client.pem", "crt"), ("client-key.pem", "key"), ("ca.pem", "ca")):
            (certs / f"{name}.{suffix}").write_text(files[key])
        streams.append({
            "node": name, "kind": "delta" if i % 2 == 0 else "sotw",
            "ca": str(certs / f"{name}.ca"), "cert": str(certs / f"{name}.crt"),
            "key": str(certs / f"{name}.key"),
        })  # fmt: skip
    return split_spec(
        host="127.0.0.1", port=XDS_PORT, streams=streams, processes=processes, workdir=workdir
    )


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    n = args.clusters
    nodes = {f"c{i:05d}" for i in range(n)}
    out: dict[str, Any] = {"clusters": n, "load_procs": args.load_procs}
    procs = Processes(workdir)
    api = ApiServer(workdir / "apiserver").start()
    replicas: dict[str, Atlasd] = {}
    envoy: Envoy | None = None
    try:
        if args.floor:
            # At atlasd's write concurrency (the reconcile's limiter), as the issue's
            # rotation target says: 16 writers finish sooner and made the ratio unfair.
            floor = measure_floor(api, n, concurrency=APPLY_CONCURRENCY)
            out["floor_s"] = floor["floor_s"]
            out["floor_concurrency"] = APPLY_CONCURRENCY
            print(f"floor: {floor}", file=sys.stderr, flush=True)
            if args.until != "push":
                # The rotation's own writes: two Secrets per cluster, updated in place.
                rotation_floor = measure_rotation_floor(api, n, concurrency=APPLY_CONCURRENCY)
                out["rotation_floor_s"] = rotation_floor["floor_s"]
                print(f"rotation floor: {rotation_floor}", file=sys.stderr, flush=True)
        api.create_namespace(NAMESPACE)
        (workdir / "Corefile").write_text(corefile())
        procs.start("coredns", [str(components.coredns()), "-conf", str(workdir / "Corefile")])
        t0 = time.monotonic()
        with api.admin() as c:
            for i in range(n):
                c.post(SERVICES, json=cluster_service(i)).raise_for_status()
        print(f"{n} cluster Services in {time.monotonic() - t0:.1f} s", file=sys.stderr)

        for identity, ip in REPLICAS.items():
            replicas[identity] = replica(api, workdir, identity, ip, atlasd_path=args.atlasd_path)
            # No stream ends on its own until phase spread (a default age could fall
            # within a long run's phases and blur them).
            replicas[identity].proc.argv.append("--ads-max-stream-age=0")
        t_start = time.monotonic()
        for r in replicas.values():
            r.start(timeout=600)

        def every_values() -> bool:
            got = values_secrets(api)
            return nodes <= set(got) and secret_exists(api, "atlas-envoy-values")

        wait_until(every_values, timeout=1800, what="every cluster's values", interval=2)
        out["values_written_s"] = round(time.monotonic() - t_start, 1)
        values = values_secrets(api)

        envoy = Envoy(observability_bootstrap(api), "atlas", workdir=workdir)
        envoy.start()
        envoy.wait_ready(timeout=600)

        specs = load_specs(values, nodes, workdir, args.load_procs)
        obs = envoy

        def cpu_by_process() -> dict[str, float]:
            """CPU-seconds so far of every process of the run (replicas, Envoy, API server,
            etcd, load processes, CoreDNS)."""
            got = procs.cpu()
            got.update({k: cpu_seconds(r.proc.pid) for k, r in replicas.items() if r.proc.running()})  # fmt: skip
            got["envoy-atlas"] = cpu_seconds(obs.proc.pid)
            got["apiserver"] = cpu_seconds(api.proc.pid)
            got["etcd"] = cpu_seconds(api.etcd.proc.pid)
            return got

        def cpu_since(before: dict[str, float]) -> dict[str, float]:
            return {k: round(v - before.get(k, 0.0), 2) for k, v in cpu_by_process().items()}

        time.sleep(3)  # the onboarding's echoes settle before the baseline is read
        rss0 = sum(rss_mib(r.proc.pid) for r in replicas.values())
        # The load processes start and load their streams' TLS contexts first (what a
        # fleet of Envoys has done at boot, elsewhere); the clock starts when they dial.
        loads = [
            procs.start(f"load-{k}", ads_load.command(spec, duration=args.max_seconds, hold=True))
            for k, spec in enumerate(specs)
        ]
        wait_ready(specs, timeout=600)
        with sampled(args.py_spy, "initial", {k: r.proc.pid for k, r in replicas.items()}):
            cpu0_all = cpu_by_process()
            since = time.time()
            release([p.pid for p in loads])
            fleet = Fleet(replicas, loads, specs)
            phase = fleet.converge(nodes, since=since, timeout=args.timeout)
        # Where the machine's CPU went: the load processes stand in for 5,000 Envoys.
        phase["cpu_by_process_s"] = cpu_since(cpu0_all)
        phase["rss_mib_before"] = round(rss0, 1)
        phase["rss_mib_after"] = round(fleet.rss(), 1)
        phase["rss_per_stream_kib"] = round((fleet.rss() - rss0) * 1024 / n, 1)
        phase["loop"] = {k: loop_stalls(r.url) for k, r in replicas.items()}
        out["initial"] = strip(phase)
        print(f"initial: {out['initial']}", file=sys.stderr, flush=True)

        # -- a fleet-wide push -----------------------------------------------------------
        time.sleep(2)
        before = {node: want for node, (_, _, want) in phase["_done"].items()}
        pids = {k: r.proc.pid for k, r in replicas.items()}
        with sampled(args.py_spy, "push", pids):
            cpu0, w0, deferred0 = fleet.cpu(), fleet.writes(), fleet.deferred()
            cpu0_all = cpu_by_process()
            since = time.time()
            with api.admin() as c:
                c.post(SERVICES, json=ALERTMANAGER).raise_for_status()
            phase = fleet.converge(
                nodes, since=since, timeout=args.timeout,
                ok=lambda node, e, want: want != before.get(node),
            )  # fmt: skip
        phase["cpu_s"] = round(fleet.cpu() - cpu0, 2)
        phase["cpu_by_process_s"] = cpu_since(cpu0_all)
        phase["cpu_ms_per_stream"] = round(phase["cpu_s"] * 1000 / n, 3)
        phase["writes_when_all_current"] = int(fleet.writes() - w0)
        # The push is done when its N values rewrites are too (the rotation must not start
        # with them still queued: its writes and their rate would count them).
        wait_until(
            lambda: fleet.writes() - w0 >= n, timeout=args.timeout, what="the push's writes",
            interval=0.5,
        )  # fmt: skip
        phase["writes_done_s"] = round(time.time() - since, 2)
        time.sleep(3)
        deferred = fleet.deferred()
        # How long the leader's writes waited for its ADS server (xDS first) over the phase.
        phase["writes_deferred_s"] = (
            None if deferred is None else round(deferred - (deferred0 or 0.0), 2)
        )
        phase["writes"] = int(fleet.writes() - w0)
        # Every cluster's values carry the Alertmanager count (atlas.alertmanagerCount).
        phase["values_counting_it"] = values_counting_alertmanagers(api, nodes)
        out["push"] = strip(phase)
        print(f"push: {out['push']}", file=sys.stderr, flush=True)
        if args.until == "push":
            return out

        # -- a CA rotation ---------------------------------------------------------------
        time.sleep(2)
        old = identity_leaves(api)
        w0 = fleet.writes()
        cpu0_all = cpu_by_process()
        since = time.time()
        with api.admin() as c:
            c.patch(
                f"{SECRETS}/atlas-ca",
                content=json.dumps(
                    {"metadata": {"annotations": {"goatlas.io/ca-rotate": "bench"}}}
                ),
                headers={"content-type": "application/merge-patch+json"},
            ).raise_for_status()
        last_write = [since, w0]

        def writes_quiet() -> bool:
            w = fleet.writes()
            if w != last_write[1]:
                last_write[:] = [time.time(), w]
            return w - w0 >= 2 * n and time.time() - last_write[0] > 5

        with sampled(args.py_spy, "rotation", pids, api=api):
            wait_until(
                writes_quiet, timeout=args.timeout, what="the rotation's writes", interval=0.5
            )  # fmt: skip
        new = identity_leaves(api)
        renewed = {c for c in nodes if new.get(c) != old.get(c)}

        deadline = time.monotonic() + args.timeout
        while True:  # the load process's own leaves against the identity Secrets
            clients = fleet.client_state()
            holding = [c for c in nodes if clients.get(c, {}).get("certs") == new.get(c)]
            if len(holding) == n or time.monotonic() > deadline:
                break
            time.sleep(1)
        got_at = [max(clients[c]["certs_at"].values()) - since for c in holding]
        phase = fleet.converge(nodes, since=since, timeout=args.timeout)
        writes = int(last_write[1] - w0)
        rot = {
            "renewed_identities": len(renewed),
            "streams_holding_new_leaves": len(holding),
            "leaves_per_stream_s": pcts(got_at),
            "time_to_all_new_leaves_s": round(max(got_at), 2) if len(holding) == n else None,
            "writes": writes,
            "writes_done_s": round(last_write[0] - since, 2),
            "write_rate_per_s": round(writes / max(last_write[0] - since, 1e-3), 1),
            "then_current": strip(phase),
            # From the annotation until every stream is current at the new leaves.
            "cpu_by_process_s": cpu_since(cpu0_all),
            # Each replica's watchdog since it started (atlasd.watchdog).
            "loop": {k: loop_stalls(r.url) for k, r in replicas.items()},
        }
        if args.floor:
            rot["writes_over_floor"] = round((last_write[0] - since) / out["floor_s"], 2)
            if rot["time_to_all_new_leaves_s"] is not None:
                rot["leaves_over_rotation_floor"] = round(
                    rot["time_to_all_new_leaves_s"] / out["rotation_floor_s"], 2
                )
        out["rotation"] = rot
        print(f"rotation: {rot}", file=sys.stderr, flush=True)
        if args.until == "rotation":
            return out

        # -- the leader SIGKILLed --------------------------------------------------------
        time.sleep(2)
        leader = lease_holder(api)
        assert leader in replicas, f"the Lease is held by {leader!r}"
        survivor = next(r for r in replicas if r != leader)
        held = fleet.on_replica(leader)
        fwd0 = forward_stats(envoy)
        opened0 = {n: s["opened"] for n, s in fleet.client_state().items()}
        t_kill = time.monotonic()
        since = time.time()
        replicas[leader].proc.kill()
        newcomer = f"c{n:05d}"
        with api.admin() as c:
            c.post(SERVICES, json=cluster_service(n)).raise_for_status()
        lease_s = wait_until(
            lambda: lease_holder(api) == survivor and time.monotonic() - t_kill,
            timeout=120, what="the survivor holds the Lease", interval=0.1,
        )  # fmt: skip
        wrote_s = wait_until(
            lambda: secret_exists(api, f"{newcomer}-envoy-values") and time.monotonic() - t_kill,
            timeout=120, what="the new leader writes", interval=0.1,
        )  # fmt: skip
        phase = fleet.converge(held, since=since, timeout=args.timeout)
        phase["lease_s"] = round(lease_s, 2)
        phase["new_leader_wrote_s"] = round(wrote_s, 2)
        phase["held_by_dead_replica"] = len(held)
        # Why a stream took long: how often it reopened, and what the observability Envoy's
        # forwarding cluster saw (connect failures, 503s, retries, ejections) meanwhile.
        clients = fleet.client_state()
        reopened = [clients[n]["opened"] - opened0.get(n, 0) for n in held if n in clients]
        phase["reopens_per_stream"] = pcts([float(x) for x in reopened])
        # A stream that had to reopen more than once was sent to a dead replica again.
        phase["reopened_more_than_once"] = sum(1 for x in reopened if x > 1)
        phase["forward_cluster"] = {
            k: v - fwd0.get(k, 0) for k, v in forward_stats(envoy).items() if v != fwd0.get(k, 0)
        }
        replicas[leader].start(timeout=600)
        everyone = fleet.converge(nodes, since=since, timeout=args.timeout)
        phase["all_current_after_restart"] = everyone["current"]
        phase["stale_after_restart"] = everyone["stale"]
        phase["values_counting_alertmanager"] = values_counting_alertmanagers(api, nodes)
        out["kill"] = strip(phase)
        print(f"kill: {out['kill']}", file=sys.stderr, flush=True)

        # -- a rolling restart -------------------------------------------------------------
        time.sleep(2)
        opened0 = sum(s["opened"] for s in fleet.client_state().values())
        t_roll = time.monotonic()
        since = time.time()
        for r in replicas.values():
            r.proc.stop()
            # From here on, downstream streams end at --stream-age (the replicas ran
            # without it so far: no phase above sees a stream end on its own).
            r.proc.argv.append(f"--ads-max-stream-age={args.stream_age}")
            r.start(timeout=600)
        roll_s = time.monotonic() - t_roll
        phase = fleet.converge(
            nodes, since=since, timeout=args.timeout,
            ok=lambda node, e, want: min(e["acked_at"].values()) >= since,
        )  # fmt: skip
        phase["roll_s"] = round(roll_s, 2)
        phase["streams_reopened"] = (
            sum(s["opened"] for s in fleet.client_state().values()) - opened0
        )
        out["roll"] = strip(phase)
        print(f"roll: {out['roll']}", file=sys.stderr, flush=True)

        # -- streams spread again -----------------------------------------------------------
        # After the roll the replica restarted last holds (nearly) every stream; each ends
        # at its age and the observability Envoy sends it anywhere: wait until 99 % of the
        # streams are open (with every stream ending once a minute some are always between
        # two: ~20 of 5,000) and no replica holds more than 60 % of N.
        t_spread = time.monotonic()
        after_roll = {r: len(fleet.on_replica(r)) for r in replicas}
        bound = max(1, int(0.6 * n))

        def spread() -> dict[str, int] | None:
            held_now = {r: len(fleet.on_replica(r)) for r in replicas}
            spread_out = max(held_now.values()) <= bound and sum(held_now.values()) >= 0.99 * n
            return held_now if spread_out else None

        spread_now = wait_until(
            spread, timeout=3 * args.stream_age + 60, what="streams spread over the replicas",
            interval=0.5,
        )  # fmt: skip
        out["spread"] = {
            "stream_age_s": args.stream_age,
            "on_replica_after_roll": after_roll,
            "on_replica_spread": spread_now,
            "spread_s": round(time.monotonic() - t_spread, 2),
        }
        print(f"spread: {out['spread']}", file=sys.stderr, flush=True)

        out["cpu_s"] = procs.cpu()
        out["cpu_s"].update({k: round(cpu_seconds(r.proc.pid), 2) for k, r in replicas.items()})
        out["cpu_s"]["envoy-atlas"] = round(cpu_seconds(envoy.proc.pid), 2)
        nacks = [e for r in replicas.values() for e in fleet.client.get(f"{r.url}/status/envoys").json()["envoys"] if e["nacks"]]  # fmt: skip
        out["nacks"] = len(nacks)
    finally:
        out["load_avg"] = [round(x, 2) for x in os.getloadavg()]
        if envoy is not None:
            envoy.stop()
        procs.stop()
        for r in replicas.values():
            r.proc.stop()
        api.stop()
    return out


@contextlib.contextmanager
def run_dir(args: argparse.Namespace, prefix: str) -> Iterator[Path]:
    """The run's directory: ``--workdir`` (kept), or a temporary one; ``--load-procs`` 0
    filled in (one load process per 2,500 streams)."""
    if args.load_procs <= 0:
        args.load_procs = max(1, -(-args.clusters // 2500))
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        yield args.workdir
        return
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        yield Path(tmp)


def main() -> int:
    in_private_network(
        NETNS_ENV, resolv=f"nameserver {DNS}\noptions ndots:1 timeout:1 attempts:2\n"
    )
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--clusters", type=int, required=True)
    parser.add_argument("--load-procs", type=int, default=0, help="default: 1 per 2,500 streams")
    parser.add_argument("--timeout", type=float, default=300, help="seconds a phase may take")
    parser.add_argument("--no-floor", dest="floor", action="store_false")
    parser.add_argument(
        "--stream-age", type=int, default=60,
        help="--ads-max-stream-age of the replicas from the rolling restart on (phase spread)",
    )  # fmt: skip
    parser.add_argument("--max-seconds", type=int, default=3600)
    parser.add_argument("--workdir", type=Path, help="keep every log here (default: a temp dir)")
    parser.add_argument(
        "--atlasd-path",
        type=Path,
        default=None,
        help="run the replicas from the atlasd package in this directory (another checkout)",
    )
    parser.add_argument("--json", action="store_true")
    parser.add_argument(
        "--py-spy",
        type=Path,
        help="sample the replicas into this directory",
    )
    parser.add_argument(
        "--until", choices=["push", "rotation", "all"], default="all",
        help="push: stop after the fleet-wide push (the initial snapshots and the push only); "
        "rotation: after the CA rotation",
    )  # fmt: skip
    args = parser.parse_args()
    with run_dir(args, "atlasd-bench-fleet-") as where:
        out = run(args, where)
    print_result(out, as_json=args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
