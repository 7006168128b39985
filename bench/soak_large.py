"""The soak at scale (issue 25): N clusters, N downstream ADS streams, two replicas, M
minutes of churn under faults, a real Envoy pair carrying traffic all along.

    .venv/bin/python bench/soak.py --scale large [--clusters 2000] [--minutes 30] [--json]

(or ``bench/soak_large.py`` with the same flags). The setup is ``bench_fleet``'s, in a
network and mount namespace of its own (root): etcd + kube-apiserver, N cluster Services,
two ``atlasd run`` replicas (leader election on) behind one name, the observability Envoy
from ``atlas-envoy-values``, one ADS stream per cluster through its 10900 with that
cluster's own certificate (the load processes of ``tests/harness/ads_load.py``). On top:

- **the traffic pair**: cluster ``traffic`` (its own external IP) has a real downstream
  Envoy bootstrapped from ``traffic-envoy-values`` (its xDS through the observability
  Envoy's 10900 like every stream) in front of a real Prometheus; a client asks
  ``/prom/traffic/api/v1/status/buildinfo`` of the observability Envoy's 10904 every 20 ms
  for the whole soak (client -> observability Envoy -> mTLS -> downstream Envoy ->
  Prometheus: ``tests/integration/test_soak.py``'s ``Traffic``); every answer that is not
  a 200 counts as failed.
- **rounds** until M minutes have passed, each a churn step (``--churn K``: K clusters
  added and K removed from a pool of stream-less clusters, K stream clusters' external IPs
  changed, two invalid Services) plus one fault, in turn: the API server restarted; the
  leader SIGKILLed (churn while it is dead, then started again as its pod would be); etcd
  compacted while the API server is down (churn before and after: the watches resume into
  a 410); the CA rotated; a rolling restart of both replicas — the short soak's faults
  (``tests/integration/test_soak.py``) with the kill made a leader's kill, plus the roll.
- **after each round**, each with a deadline (``--converge-timeout``) and its time from the
  round's start: the API server holds exactly the objects atlasd should have written
  (per valid cluster ``<c>-envoy-values``, ``<c>-atlas-identity``, ``<c>-thanos-sidecar0``;
  none for removed or invalid Services: ``atlasd/reconcile/desired.py``), ``objects_s``;
  the observability Envoy sends each changed, added or removed cluster where it should
  (``envoy_s``); every invalid Service has its Warning Event (``InvalidCluster``); every
  stream is current (``bench_fleet.Fleet.converge``: ACKed its replica's snapshot, the
  load process agreeing) and so are the observability and traffic Envoys, ``streams_s``;
  after a rotation every stream holds its cluster's new leaves, ``leaves_s``.
- **RSS** of both replicas every ``--rss-interval`` s (60): first / last / max per replica
  (a replica restarted by a fault starts a new process: also per process, with the median
  of each third of its samples: flat, or growing).

Prints one line per round and a summary; with ``--json`` one JSON object last. Exit 1 when
an object is missing or extra, a stream is stale, or a request failed after a round.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from atlasd import labels
from atlasd.model import OBS_PROMETHEUS_PORT
from bench.bench_e2e import cpu_seconds, rss_mib
from bench.bench_fleet import (
    ALERTMANAGER,
    DNS,
    NAMESPACE,
    REPLICAS,
    SECRETS,
    SERVICES,
    Fleet,
    corefile,
    identity_leaves,
    lease_holder,
    load_specs,
    pcts,
    replica,
    run_dir,
    secret_exists,
    strip,
)
from bench.bench_floor import cluster_service, print_result
from bench.bench_outcome import (
    Processes,
    in_private_network,
    observability_bootstrap,
    values_secrets,
)
from tests.harness import ads_load, components, objects
from tests.harness.envoy import Envoy
from tests.harness.kube import ApiServer
from tests.harness.prom import WebProc, prometheus
from tests.harness.wait import WaitTimeout, wait_until
from tests.integration.daemon_helpers import Atlasd
from tests.integration.test_soak import Traffic

NETNS_ENV = "ATLASD_SOAK_LARGE_NETNS"
TRAFFIC = "traffic"
TRAFFIC_IP = "198.19.255.250"  # the benchmark network, outside every other cluster's
PROM_NAME = "prometheus.traffic.soak"  # the traffic cluster's Prometheus, by CoreDNS
POOL_BASE = 50_000  # stream-less churn clusters: c50000, c50001, ...
FIXED_SECRETS = {"atlas-ca", "atlas-envoy-values", "atlas-server", "atlas-client", "atlas-tls", "atlasd-ads"}  # fmt: skip
METADATA_ONLY = {"Accept": "application/json;as=PartialObjectMetadataList;v=v1;g=meta.k8s.io"}
FAULTS = (
    "apiserver-restart",
    "leader-sigkill",
    "etcd-compaction",
    "ca-rotation",
    "rolling-restart",
)


def names(api: ApiServer, kind: str) -> set[str]:
    """The names of every object of ``kind`` in the namespace (one metadata-only LIST)."""
    with api.admin() as c:
        r = c.get(f"/api/v1/namespaces/{NAMESPACE}/{kind}", headers=METADATA_ONLY, timeout=120)
    r.raise_for_status()
    return {item["metadata"]["name"] for item in r.json()["items"]}


def warned(api: ApiServer) -> set[str]:
    """The objects with an ``InvalidCluster`` Warning Event."""
    with api.admin() as c:
        r = c.get(f"/api/v1/namespaces/{NAMESPACE}/events", timeout=120)
    r.raise_for_status()
    return {
        e["involvedObject"]["name"]
        for e in r.json()["items"]
        if e.get("type") == "Warning" and e.get("reason") == "InvalidCluster"
    }


@dataclass
class Churn:
    """The cluster Services the soak wrote, and what follows from them."""

    api: ApiServer
    streams: list[str]  # the clusters with a stream (stable set: their IPs change)
    pool: list[str] = field(default_factory=list)  # stream-less churn clusters, oldest first
    invalid: set[str] = field(default_factory=set)
    net: dict[str, int] = field(default_factory=dict)  # stream cluster -> 18 or 19
    expect: dict[str, str | None] = field(default_factory=dict)  # cluster -> its IP, or gone
    ops: dict[str, int] = field(default_factory=lambda: {"add": 0, "remove": 0, "ip": 0, "invalid": 0})  # fmt: skip
    steps: int = 0
    _next_pool: int = 0

    def valid(self) -> set[str]:
        return {*self.streams, *self.pool, TRAFFIC}

    def add_pool(self) -> None:
        body = cluster_service(POOL_BASE + self._next_pool)
        self._next_pool += 1
        with self.api.admin() as c:
            c.post(SERVICES, json=body).raise_for_status()
        name = body["metadata"]["name"]
        self.pool.append(name)
        self.expect[name] = body["spec"]["externalIPs"][0]
        self.ops["add"] += 1

    def remove_pool(self) -> None:
        name = self.pool.pop(0)
        with self.api.admin() as c:
            c.delete(f"{SERVICES}/{name}").raise_for_status()
        self.expect[name] = None
        self.ops["remove"] += 1

    def change_ip(self, i: int) -> None:
        name = self.streams[i]
        net = self.net[name] = 37 - self.net.get(name, 18)  # 18 <-> 19
        ip = cluster_service(i, net=net)["spec"]["externalIPs"][0]
        patch = {"spec": {"externalIPs": [ip]}}
        with self.api.admin() as c:
            c.patch(
                f"{SERVICES}/{name}",
                content=json.dumps(patch),
                headers={"content-type": "application/merge-patch+json"},
            ).raise_for_status()
        self.expect[name] = ip
        self.ops["ip"] += 1

    def add_invalid(self) -> None:
        """Two Services the API server takes and atlasd must refuse (a Warning Event each)."""
        tag = f"bad{self.steps:04d}"
        bodies = (
            objects.cluster_service(f"{tag}a", "198.19.254.1", labels={labels.REPLICAS_LABEL: "abc"}),
            objects.cluster_service(f"{tag}b", "239.1.2.3"),  # multicast
        )  # fmt: skip
        with self.api.admin() as c:
            for body in bodies:
                c.post(SERVICES, json=body).raise_for_status()
                self.invalid.add(body["metadata"]["name"])
        self.ops["invalid"] += len(bodies)

    def step(self, k: int) -> None:
        """K added, K removed (oldest first), K stream clusters' IPs changed, 2 invalid."""
        for j in range(k):
            self.add_pool()
            self.change_ip((self.steps * k + j) % len(self.streams))
            if len(self.pool) > k:
                self.remove_pool()
        self.add_invalid()
        self.steps += 1

    def object_diff(self) -> dict[str, list[str]]:
        """What the API server holds against what atlasd should have written."""
        valid = self.valid()
        want = FIXED_SECRETS | {f"{c}-{s}" for c in valid for s in ("envoy-values", "atlas-identity")}  # fmt: skip
        want_svc = valid | self.invalid | {f"{c}-thanos-sidecar0" for c in valid}
        want_svc.add(ALERTMANAGER["metadata"]["name"])
        got, got_svc = names(self.api, "secrets"), names(self.api, "services")
        return {
            "missing": sorted((want - got) | (want_svc - got_svc)),
            "extra": sorted((got - want) | (got_svc - want_svc)),
        }


class RssSampler:
    """Both replicas' RSS every ``interval`` s: (seconds since start, replica, pid, MiB)."""

    def __init__(self, replicas: dict[str, Atlasd], interval: float) -> None:
        self.replicas = replicas
        self.interval = interval
        self.samples: list[tuple[float, str, int, float]] = []
        self._t0 = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def sample(self) -> None:
        for name, r in self.replicas.items():
            if r.proc.running():
                try:
                    mib = rss_mib(r.proc.pid)
                except OSError:
                    continue
                self.samples.append((round(time.monotonic() - self._t0), name, r.proc.pid, mib))

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def start(self) -> RssSampler:
        self.sample()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self.sample()

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in self.replicas:
            mine = [s for s in self.samples if s[1] == name]
            if not mine:
                continue
            procs: dict[int, list[float]] = {}
            for _, _, pid, mib in mine:
                procs.setdefault(pid, []).append(mib)
            out[name] = {
                "first_mib": round(mine[0][3], 1),
                "last_mib": round(mine[-1][3], 1),
                "max_mib": round(max(s[3] for s in mine), 1),
                "samples": len(mine),
                "per_process": [
                    {
                        "first": round(v[0], 1),
                        "last": round(v[-1], 1),
                        "max": round(max(v), 1),
                        "n": len(v),
                        # Flat or growing: the median of each third of its samples (the
                        # CA rotations' peaks do not move a median).
                        "thirds_median": _thirds(v),
                    }
                    for v in procs.values()
                ],
            }
        return out


def _thirds(values: list[float]) -> list[float] | None:
    """The medians of the first, middle and last third of ``values`` (None under 3)."""
    if len(values) < 3:
        return None
    k = len(values) // 3
    parts = (values[:k], values[k : len(values) - k], values[len(values) - k :])
    return [round(statistics.median(p), 1) for p in parts]


def within(check: Callable[[], Any], timeout: float, what: str, interval: float = 1.0) -> bool:
    try:
        wait_until(check, timeout=max(timeout, 1.0), what=what, interval=interval)
    except WaitTimeout:
        return False
    return True


def node_current(fleet: Fleet, node: str) -> bool:
    """``node``'s stream (a real Envoy's) ACKed its snapshot on the replica holding it."""
    for r in fleet.replicas.values():
        if not r.proc.running():
            continue
        doc = fleet.client.get(f"{r.url}/status/envoys").json()
        want = doc["snapshots"].get(node)
        for e in doc["envoys"]:
            if e["node"] == node and want and all(e["acked"].get(t) == v for t, v in want.items()):
                return True
    return False


class Soak:
    def __init__(self, args: argparse.Namespace, api: ApiServer, fleet: Fleet, churn: Churn,
                 obs: Envoy, traffic: Traffic) -> None:  # fmt: skip
        self.args, self.api, self.fleet, self.churn = args, api, fleet, churn
        self.obs, self.traffic = obs, traffic
        self.nodes = set(churn.streams)

    def restart(self, name: str) -> None:
        r = self.fleet.replicas[name]
        r.proc.stop()
        r.start(timeout=600)

    def fault(self, kind: str, k: int, out: dict[str, Any]) -> None:
        """Churn and one fault; what the fault measured goes into ``out``."""
        api, replicas = self.api, self.fleet.replicas
        if kind == "apiserver-restart":
            api.restart()
            self.churn.step(k)
        elif kind == "leader-sigkill":
            leader = lease_holder(api)
            assert leader in replicas, f"the Lease is held by {leader!r}"
            survivor = next(r for r in replicas if r != leader)
            out["held_by_dead_replica"] = len(self.fleet.on_replica(leader))
            t_kill = time.monotonic()
            replicas[leader].proc.kill()
            self.churn.step(k)  # changes made while the leader is dead
            out["lease_s"] = round(wait_until(
                lambda: lease_holder(api) == survivor and time.monotonic() - t_kill,
                timeout=120, what="the survivor holds the Lease", interval=0.2,
            ), 2)  # fmt: skip
            replicas[leader].start(timeout=600)
        elif kind == "etcd-compaction":
            self.churn.step(k)
            api.stop_apiserver()
            api.compact_etcd()
            api.start_apiserver()
            self.churn.step(k)
        elif kind == "ca-rotation":
            self.churn.step(k)
            out["_old_leaves"] = identity_leaves(api)
            with api.admin() as c:
                c.patch(
                    f"{SECRETS}/atlas-ca",
                    content=json.dumps({"metadata": {"annotations": {"goatlas.io/ca-rotate": "soak"}}}),
                    headers={"content-type": "application/merge-patch+json"},
                ).raise_for_status()  # fmt: skip
        elif kind == "rolling-restart":
            self.churn.step(k)
            for name in replicas:
                self.restart(name)
        else:
            raise ValueError(kind)

    def round(self, no: int, kind: str) -> dict[str, Any]:
        args, fleet, churn = self.args, self.fleet, self.churn
        self.traffic.phase = kind
        out: dict[str, Any] = {"round": no, "fault": kind}
        churn.expect.clear()
        failed0 = len(self.traffic.failures())
        t0, since = time.monotonic(), time.time()
        self.fault(kind, args.churn, out)
        out["fault_s"] = round(time.monotonic() - t0, 2)
        deadline = t0 + args.converge_timeout

        def left() -> float:
            return deadline - time.monotonic()

        diff: dict[str, list[str]] = {}

        def objects_ok() -> bool:
            diff.update(churn.object_diff())
            return not diff["missing"] and not diff["extra"]

        ok = within(objects_ok, left(), "every object atlasd should have written")
        out["objects_s"] = round(time.monotonic() - t0, 2) if ok else None
        out["objects_missing"], out["objects_extra"] = len(diff["missing"]), len(diff["extra"])
        out["objects_sample"] = (diff["missing"] + diff["extra"])[:5]

        pending = dict(churn.expect)

        def envoy_ok() -> bool:
            for name, ip in list(pending.items()):
                got = self.obs.endpoint_addresses(f"{name}-thanos")
                if (got is None) if ip is None else (got == {ip}):
                    del pending[name]
            return not pending

        ok = within(envoy_ok, left(), "the observability Envoy follows the churn")
        out["envoy_s"] = round(time.monotonic() - t0, 2) if ok else None
        out["envoy_behind"] = sorted(pending)[:5]

        if kind == "ca-rotation":
            old = out.pop("_old_leaves")
            new: dict[str, dict[str, str]] = {}

            def renewed() -> bool:
                new.update(identity_leaves(self.api))
                out["renewed"] = sum(1 for c in self.nodes if new.get(c) not in (None, old.get(c)))
                return out["renewed"] == len(self.nodes)

            def holding() -> bool:
                clients = fleet.client_state()
                out["streams_holding_new_leaves"] = sum(
                    1 for c in self.nodes if clients.get(c, {}).get("certs") == new.get(c)
                )
                return out["streams_holding_new_leaves"] == len(self.nodes)

            ok = within(renewed, left(), "every identity renewed", 3.0) and within(
                holding, left(), "every stream holds its new leaves", 3.0
            )
            out["leaves_s"] = round(time.monotonic() - t0, 2) if ok else None

        phase = fleet.converge(self.nodes, since=since, timeout=max(left(), 60.0))
        out["streams_s"] = round(time.monotonic() - t0, 2) if not phase["stale"] else None
        for key in ("stale", "stale_sample", "client_disagrees", "on_replica"):
            out[key] = phase[key]
        # Streams that ACKed anything since the round started, and when they last did.
        acked = [max(e["acked_at"].values()) - since for _, e, _ in phase["_done"].values()]
        out["streams_acked_since"] = sum(1 for t in acked if t >= 0)
        out["acked_since_s"] = pcts([t for t in acked if t >= 0])
        out["real_envoys_current"] = within(
            lambda: node_current(fleet, "atlas") and node_current(fleet, TRAFFIC),
            left(), "the observability and traffic Envoys current",
        )  # fmt: skip
        unwarned: set[str] = set()

        def all_warned() -> bool:
            unwarned.clear()
            unwarned.update(churn.invalid - warned(self.api))
            return not unwarned

        # Bounded on its own: a lost Event must not eat the streams' time.
        ok = within(all_warned, min(left(), 60), "Warning Events")
        out["unwarned"] = sorted(unwarned)[:5]
        out["invalid_warned"] = ok

        out["requests_failed"] = len(self.traffic.failures()) - failed0
        out["load_avg"] = round(os.getloadavg()[0], 2)
        out["ok"] = bool(
            out["objects_s"] is not None and out["envoy_s"] is not None and out["invalid_warned"]
            and out["streams_s"] is not None and not phase["client_disagrees"]
            and out["real_envoys_current"] and out.get("leaves_s", 0) is not None
            and not out["requests_failed"]
        )  # fmt: skip
        return out


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    n, k = args.clusters, args.churn
    streams = [f"c{i:05d}" for i in range(n)]
    out: dict[str, Any] = {"clusters": n, "minutes": args.minutes, "churn": k}
    procs = Processes(workdir)
    api = ApiServer(workdir / "apiserver").start()
    replicas: dict[str, Atlasd] = {}
    envoys: list[Envoy] = []
    backend: WebProc | None = None
    traffic: Traffic | None = None
    rss: RssSampler | None = None
    try:
        api.create_namespace(NAMESPACE)
        (workdir / "Corefile").write_text(corefile({PROM_NAME: "127.0.0.1"}))
        procs.start("coredns", [str(components.coredns()), "-conf", str(workdir / "Corefile")])
        backend = prometheus("global:\n  scrape_interval: 15s\n", workdir=workdir).start()
        churn = Churn(api, streams)
        traffic_svc = objects.cluster_service(
            TRAFFIC, TRAFFIC_IP, ports=(("thanos", 10901), ("prometheus", 9090)),
            annotations={labels.PROMETHEUS_SERVICE_ANNOTATION: PROM_NAME,
                         labels.PROMETHEUS_SERVICE_PORT_ANNOTATION: str(backend.port)},
        )  # fmt: skip
        t0 = time.monotonic()
        with api.admin() as c:
            for i in range(n):
                c.post(SERVICES, json=cluster_service(i)).raise_for_status()
            c.post(SERVICES, json=traffic_svc).raise_for_status()
            # A local Alertmanager: every downstream node gets the alert relay, so its
            # SDS holds a client leaf besides the server one (both checked on rotation).
            c.post(SERVICES, json=ALERTMANAGER).raise_for_status()
        for _ in range(k):
            churn.add_pool()
        print(f"{n + k + 1} cluster Services in {time.monotonic() - t0:.1f} s", file=sys.stderr)

        for identity, ip in REPLICAS.items():
            replicas[identity] = replica(api, workdir, identity, ip)
        t_start = time.monotonic()
        for r in replicas.values():
            r.start(timeout=600)
        wait_until(
            lambda: churn.valid() <= set(values_secrets(api)) and secret_exists(api, "atlas-envoy-values"),
            timeout=1800, what="every cluster's values", interval=2,
        )  # fmt: skip
        out["values_written_s"] = round(time.monotonic() - t_start, 1)
        values = values_secrets(api)

        obs = Envoy(observability_bootstrap(api), "atlas", workdir=workdir)
        envoys.append(obs.start())
        obs.wait_ready(timeout=600)
        boot = yaml.safe_load(values[TRAFFIC]["files"]["envoy.yaml"])
        envoys.append(Envoy(boot, TRAFFIC, workdir=workdir).start())
        envoys[-1].wait_ready(timeout=300)

        specs = load_specs(values, set(streams), workdir, args.load_procs)
        since = time.time()
        duration = args.minutes * 60 + 3600.0  # past the soak: the end stops them
        loads = [
            procs.start(f"load-{j}", ads_load.command(spec, duration=duration))
            for j, spec in enumerate(specs)
        ]  # fmt: skip
        fleet = Fleet(replicas, loads, specs)
        phase = fleet.converge(set(streams), since=since, timeout=args.converge_timeout)
        out["initial"] = strip(phase)
        print(f"initial: {out['initial']}", file=sys.stderr, flush=True)

        url = f"http://127.0.0.1:{OBS_PROMETHEUS_PORT}/prom/{TRAFFIC}/api/v1/status/buildinfo"
        wait_until(lambda: httpx2.get(url, timeout=5).status_code == 200, timeout=120,
                   what="traffic through the pair")  # fmt: skip
        traffic = Traffic(url).start()
        rss = RssSampler(replicas, args.rss_interval).start()
        soak = Soak(args, api, fleet, churn, obs, traffic)

        faults = args.faults.split(",")
        rounds: list[dict[str, Any]] = []
        t_soak = time.monotonic()
        while time.monotonic() - t_soak < args.minutes * 60 or len(rounds) < args.min_rounds:
            kind = faults[len(rounds) % len(faults)]
            result = soak.round(len(rounds) + 1, kind)
            rounds.append(result)
            print(f"round: {json.dumps(result)}", file=sys.stderr, flush=True)
            if args.rounds and len(rounds) >= args.rounds:
                break
        out["soak_s"] = round(time.monotonic() - t_soak, 1)
        traffic.stop()
        rss.stop()
        out["rounds"] = rounds
        failures = traffic.failures()
        out["requests"] = traffic.count()
        out["requests_failed"] = len(failures)
        out["failed_sample"] = [list(f) for f in failures[:5]]
        out["rss"] = rss.summary()
        out["ops"] = churn.ops
        out["clusters_at_end"] = {"valid": len(churn.valid()), "invalid": len(churn.invalid)}
        for key in ("objects_s", "envoy_s", "streams_s"):
            values_s = [r[key] for r in rounds if r[key] is not None]
            out[f"{key}_all_rounds"] = pcts(values_s)
        out["rounds_ok"] = sum(1 for r in rounds if r["ok"])
        out["stale_max"] = max((r["stale"] for r in rounds), default=0)
        out["objects_lost"] = sum(r["objects_missing"] for r in rounds)
        out["cpu_s"] = procs.cpu()
        out["cpu_s"].update({n_: round(cpu_seconds(r.proc.pid), 2) for n_, r in replicas.items()})
        out["cpu_s"]["envoy-atlas"] = round(cpu_seconds(obs.proc.pid), 2)
        docs = [fleet.client.get(f"{r.url}/status/envoys").json() for r in replicas.values()]
        out["nacks"] = sum(1 for d in docs for e in d["envoys"] if e["nacks"])
    finally:
        if traffic is not None:
            traffic.stop()
        if rss is not None:
            rss.stop()
        for e in reversed(envoys):
            e.stop()
        procs.stop()
        if backend is not None:
            backend.stop()
        for r in replicas.values():
            r.proc.stop()
        api.stop()
    out["load_avg"] = [round(x, 2) for x in os.getloadavg()]
    out["ok"] = bool(
        out.get("rounds") and out["rounds_ok"] == len(out["rounds"])
        and out["requests_failed"] == 0 and out["nacks"] == 0
        and out["initial"]["stale"] == 0
    )  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> int:
    in_private_network(
        NETNS_ENV, resolv=f"nameserver {DNS}\noptions ndots:1 timeout:1 attempts:2\n"
    )
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--clusters", type=int, default=2000, help="clusters with a stream")
    parser.add_argument("--minutes", type=float, default=30, help="rounds start until then")
    parser.add_argument("--churn", type=int, default=0, help="K per round (default N/100, >= 5)")
    parser.add_argument("--rounds", type=int, default=0, help="stop after this many rounds")
    parser.add_argument("--min-rounds", type=int, default=1)
    parser.add_argument("--faults", default=",".join(FAULTS), help="comma-separated, in turn")
    parser.add_argument("--converge-timeout", type=float, default=300, help="s per round")
    parser.add_argument("--rss-interval", type=float, default=60, help="s between samples")
    parser.add_argument("--load-procs", type=int, default=0, help="default: 1 per 2,500 streams")
    parser.add_argument("--workdir", type=Path, help="keep every log here (default: a temp dir)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    unknown = set(args.faults.split(",")) - set(FAULTS)
    if unknown:
        parser.error(f"--faults: {sorted(unknown)} are not among {list(FAULTS)}")
    if args.churn <= 0:
        args.churn = max(5, args.clusters // 100)
    with run_dir(args, "atlasd-soak-large-") as where:
        out = run(args, where)
    print_result(out, as_json=args.json, omit=("rounds",))
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
