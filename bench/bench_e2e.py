"""Benchmark: one change, end to end, at fleet scale — API write to the Envoy's ACK.

    .venv/bin/python bench/bench_e2e.py --clusters N [--changes K] [--xds delta|sotw]
        [--idle-seconds 330] [--scrape-rounds 3] [--floor] [--onboard-only] [--py-spy DIR]
        [--workdir DIR] [--json]

Real etcd + kube-apiserver (the test harness's, on loopback), N cluster Services created
first, then ``atlasd run`` as its own process (leader election on: the command a pod runs)
and a real observability Envoy (node ``atlas``) on ADS, Delta or State of the World,
bootstrapped from the ``atlas-envoy-values`` Secret atlasd wrote. Measured:

- ``onboard_s``: from starting atlasd until the Envoy has ACKed a configuration holding all
  N clusters (atlas's snapshot serves N clusters and the Envoy's ACKed CDS and SRDS versions
  are that snapshot's);
- ``onboard_cpu_ms_per_cluster``: atlasd's CPU from its start until then, per cluster; with
  ``--floor``, ``floor_s`` (bench_floor.py: a bare writer of the same objects, measured first
  in the same run) and ``onboard_over_floor``; ``onboard_cpu_s``, the CPU-seconds of atlasd,
  kube-apiserver, etcd and the Envoy over the onboarding, and ``onboard_requests``, atlasd's
  API requests by list/get/write; ``--onboard-only`` stops there; ``--py-spy DIR`` samples
  atlasd from its start until then (collapsed stacks: ``DIR/onboard-atlasd.txt``) and reads
  the API server's own CPU profile over the same time (``DIR/onboard-apiserver-NNN.pprof``,
  ``bench_floor.sampled``);
- ``ip_change_ms``, ``new_cluster_ms``, ``remove_ms`` (p50/p99 over K each, with the max and which change it was): from the API
  write's response to the moment atlasd saw the Envoy ACK the version that carries the
  change — EDS for an IP change; CDS, EDS and SRDS for a new cluster; CDS and SRDS for a
  removal (atlasd's ``/status/envoys`` gives each ACK's time and the snapshot's versions;
  the first, middle and last change of each kind are also checked in the Envoy's config
  dump). With ``--detect dump`` (any control plane, e.g. an earlier atlasd through
  ``--atlasd-path``), to the moment the config dump shows it instead;
- ``requests_per_change``: atlasd's own API requests (``atlasd_kube_requests_total``) per IP
  change, by list/get/write (Lease renewals, the look at the original's lock every 15 s
  and watch re-connects not counted);
- ``cpu_ms_per_change``: atlasd's CPU time over K more IP changes made without polling
  atlasd (0.25 s apart), per change, less its idle rate;
- ``scrape_stall_ms``: while /metrics and /status are read ``--scrape-rounds`` times each
  (a Prometheus scrape, a status watcher), the longest and median answer of
  ``/status/envoys`` polled every 5 ms (how long anything else waits on atlasd meanwhile;
  the large reads come from another process), and the longest of theirs;
  ``alone_max``, the longest with nothing else read for as long again right after (the
  control: what atlasd's other work costs the poll);
- ``unrelated_secret_pushes``: xDS pushes caused by creating and editing a Secret atlasd does
  not own (must be 0), with the requests it caused;
- ``idle_cpu_pct`` over ``--idle-seconds`` (≥ 300 s spans a full resync pass, every 300 s),
  ``rss_mib`` at the end, ``load_avg`` (1, 5, 15 min) at the end;
- ``gc_pause_max_ms`` and ``gc_pauses_over_100ms``: the garbage collector's pauses that
  allocation caused over the whole run (``atlasd_gc_pause_seconds``; the event loop
  stands still meanwhile), and ``gc_settle_max_ms``, the longest of atlasd's own heap
  settles (``atlasd.heap``: a full one at start and hourly);
- ``loop`` (after onboarding as ``onboard_loop``, and at the end): atlasd's own watchdog
  (``atlasd.watchdog``): its stalls (event loop batches over 100 ms), the longest batch,
  how many batches ran and passed 100 ms, and where the loop was held in the last stall
  (``None`` from an atlasd without the watchdog).

Prints a table; with ``--json`` one JSON object on its last line.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx2
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_floor import cluster_service, cpu_seconds, measure_floor, print_result, sampled
from tests.harness.envoy import Envoy
from tests.harness.kube import ApiServer
from tests.harness.wait import wait_until
from tests.integration.daemon_helpers import Atlasd

NAMESPACE = "bench"
MIB = 1024 * 1024
WRITE_VERBS = ("apply", "create", "update", "patch", "delete")


def from_checkout(atlasd: Atlasd, path: Path) -> None:
    """Run another checkout's atlasd (e.g. an earlier commit) with this one's harness:
    ``--atlasd-path`` of the benchmarks that compare before and after."""
    where = path.resolve()
    atlasd.proc.env = {"PYTHONPATH": str(where)}
    atlasd.proc.cwd = where  # ``python -m`` puts the working directory first


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024 / MIB
    return 0.0


def metric(url: str, name: str, text: str | None = None) -> dict[str, float]:
    """Samples of one metric family from atlasd's /metrics (or from ``text``, one scrape
    of it), by their label text."""
    if text is None:
        text = httpx2.get(f"{url}/metrics", timeout=30).text
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(name):
            key, value = line.rsplit(" ", 1)
            out[key[len(name) :]] = float(value)
    return out


def gc_pauses(url: str) -> dict[str, Any]:
    """The collector's pauses over the whole run (atlasd.heap), from one scrape: the
    longest that allocation caused (at any moment, a change's included), in ms, how many
    of those stood the event loop still over 100 ms, and the longest of the heap settles
    (on atlasd's schedule). None from an atlasd that does not time them."""
    text = httpx2.get(f"{url}/metrics", timeout=30).text
    longest = metric(url, "atlasd_gc_pause_max_seconds", text)
    if not longest:
        return {"gc_pause_max_ms": None, "gc_pauses_over_100ms": None, "gc_settle_max_ms": None}
    counts = metric(url, "atlasd_gc_pause_seconds_count", text)
    under = {
        k.replace(',le="0.1"', ""): v
        for k, v in metric(url, "atlasd_gc_pause_seconds_bucket", text).items()
        if ',le="0.1"' in k
    }

    def caused(by: str) -> list[str]:
        return [k for k in longest if f'cause="{by}"' in k]

    return {
        "gc_pause_max_ms": round(1000 * max(longest[k] for k in caused("allocation")), 1),
        "gc_pauses_over_100ms": int(sum(counts[k] - under[k] for k in caused("allocation"))),
        "gc_settle_max_ms": round(1000 * max(longest[k] for k in caused("settle")), 1),
    }


def loop_stalls(url: str) -> dict[str, Any] | None:
    """atlasd's watchdog so far (``atlasd.watchdog``): stalls, the longest event loop batch
    (ms), the batches and those over 100 ms, and where the last stall held the loop; None
    without a watchdog."""
    text = httpx2.get(f"{url}/metrics", timeout=30).text
    longest = metric(url, "atlasd_event_loop_busy_max_seconds", text)
    if not longest:
        return None
    buckets = metric(url, "atlasd_event_loop_busy_seconds_bucket", text)
    count = metric(url, "atlasd_event_loop_busy_seconds_count", text)
    last = (httpx2.get(f"{url}/status", timeout=30).json().get("loop") or {}).get("last") or {}
    return {
        "stalls": int(sum(metric(url, "atlasd_event_loop_stalls_total", text).values())),
        "busy_max_ms": round(1000 * max(longest.values()), 1),
        "batches": int(sum(count.values())),
        "batches_over_100ms": int(sum(count.values()) - buckets.get('{le="0.1"}', 0.0)),
        "last_where": last.get("where"),
    }


def requests_by_kind(url: str) -> dict[str, float] | None:
    """atlasd's API requests so far: list, get, write; None when this atlasd does not count
    them (before the request metric existed). Left out: watches and what the leader does
    on a clock whatever changes (Lease renewals; the look at the original Atlas's lock,
    a GET of ConfigMap and Lease ``atlas`` every 15 s)."""
    out = {"list": 0.0, "get": 0.0, "write": 0.0}
    samples = metric(url, "atlasd_kube_requests_total")
    if not samples:
        return None
    for labels, n in samples.items():
        if 'resource="leases"' in labels or 'verb="watch"' in labels:
            continue
        if 'verb="get"' in labels and 'resource="configmaps"' in labels:
            continue
        for verb in ("list", "get"):
            if f'verb="{verb}"' in labels:
                out[verb] += n
        if any(f'verb="{v}"' in labels for v in WRITE_VERBS):
            out["write"] += n
    return out


# The large reads, in a process of their own: in a thread beside the poller, the client's
# own GIL hand-overs (reading megabytes while the poller waits for the GIL after each system
# call) would be timed as atlasd's stall.
_READ_BIG = """
import json, sys, time
import httpx2
url, rounds = sys.argv[1], int(sys.argv[2])
took = []
with httpx2.Client(timeout=60) as c:
    c.get(url + "/status/envoys").raise_for_status()  # connected before the go
    print("ready", flush=True)
    for _ in range(rounds):
        for path in ("/metrics", "/status"):
            t = time.perf_counter()
            c.get(url + path).raise_for_status()
            took.append(1000 * (time.perf_counter() - t))
print(json.dumps(took), flush=True)
"""


def scrape_stall(url: str, rounds: int = 3) -> dict[str, float]:
    """How long the small endpoint (/status/envoys, polled every 5 ms) takes to answer while
    the large ones are read (/metrics, /status, as a Prometheus scrape and a status
    watcher would, from another process): the longest answer while they were being read,
    and theirs; then, as a control, the longest while nothing else is read for as long
    again (``alone_max``: what the loop's own work meanwhile costs, scrapes or not)."""

    def poll(c: httpx2.Client, until: Callable[[], bool]) -> list[float]:
        out: list[float] = []
        while not until():
            t = time.perf_counter()
            c.get(f"{url}/status/envoys").raise_for_status()
            out.append(1000 * (time.perf_counter() - t))
            time.sleep(0.005)
        return out

    with httpx2.Client(timeout=60) as c:
        c.get(f"{url}/status/envoys")  # the connection is open before timing
        reader = subprocess.Popen(
            [sys.executable, "-c", _READ_BIG, url, str(rounds)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert reader.stdout is not None
        if reader.stdout.readline().strip() != "ready":
            reader.wait(60)
            raise RuntimeError("the reader of /metrics and /status failed (its traceback above)")
        started = time.monotonic()
        small = poll(c, lambda: reader.poll() is not None)
        window = time.monotonic() - started
        last = reader.stdout.read().strip().splitlines()
        if reader.wait() != 0 or not last:
            raise RuntimeError("reading /metrics or /status failed (its traceback above)")
        big: list[float] = json.loads(last[-1])
        end = time.monotonic() + window
        alone = poll(c, lambda: time.monotonic() >= end)
    return {
        "small_max": round(max(small), 1),
        "small_p50": round(statistics.median(small), 1),
        "big_max": round(max(big), 1),
        "alone_max": round(max(alone), 1) if alone else 0.0,
    }


def pushes(url: str) -> float:
    return sum(metric(url, "atlasd_xds_pushes_total").values())


class EnvoyView:
    """The observability Envoy as atlasd sees it: ACKed versions, when, and the target."""

    def __init__(self, atlasd: Atlasd, client: httpx2.Client) -> None:
        self.url = f"{atlasd.url}/status/envoys"
        self.client = client

    def read(self) -> tuple[dict[str, str], dict[str, float], dict[str, str]]:
        doc = self.client.get(self.url, timeout=10).json()
        for e in doc["envoys"]:
            if e["node"] == "atlas":
                return e["acked"], e["acked_at"], doc["snapshots"].get("atlas", {})
        return {}, {}, {}

    def wait_acked(
        self, types: tuple[str, ...], before: dict[str, str], timeout: float = 120
    ) -> float:
        """Wait until the Envoy ACKed, for every type, the snapshot's version and that differs
        from ``before``; returns the latest of those ACKs' times."""
        deadline = time.monotonic() + timeout
        while True:
            acked, at, want = self.read()
            if all(t in want and acked.get(t) == want[t] != before.get(t) for t in types):
                return max(at[t] for t in types)
            if time.monotonic() > deadline:
                raise TimeoutError(f"the Envoy did not ACK {types}: acked {acked}, want {want}")
            time.sleep(0.003)


SLOW_MS = 100.0
"""A change slower than this is printed with its wall-clock time (the first SLOW_SHOWN of
each kind; a State-of-the-World stream makes every new cluster and removal slow)."""
SLOW_SHOWN = 10


def _pct(values: list[float]) -> dict[str, float]:
    """p50 and p99, and which change was the slowest (0-based, in the order made)."""
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return {
        "p50": round(statistics.median(ordered), 1),
        "p99": round(p99, 1),
        "max": round(ordered[-1], 1),
        "slowest": values.index(ordered[-1]),
    }


def _dump_has(envoy: Envoy, name: str, needle: str | None) -> bool:
    """Whether the Envoy holds cluster ``<name>-prom`` dialling an address that starts with
    ``needle`` (None: whether it holds no such cluster)."""
    addrs = envoy.endpoint_addresses(f"{name}-prom")
    if needle is None:
        return addrs is None
    return addrs is not None and any(a.startswith(needle) for a in addrs)


def measure(
    kind: str,
    count: int,
    write: Callable[[int], None],
    view: EnvoyView | None,
    types: tuple[str, ...],
    check: Callable[[int], bool],
) -> list[float]:
    """``count`` changes; with ``view`` timed to atlasd's record of the Envoy's ACK (the dump
    checked on a sample), without (``--detect dump``: any control plane) to the moment the
    Envoy's config dump shows the change (polled every 5 ms)."""
    took: list[float] = []
    slow = 0  # changes over SLOW_MS so far
    sample = {0, count // 2, count - 1}
    for i in range(count):
        before = view.read()[0] if view is not None else {}
        write(i)
        t0 = time.time()
        if view is not None:
            acked_at = view.wait_acked(types, before)
            took.append(1000 * max(0.0, acked_at - t0))
            if i in sample:
                wait_until(lambda i=i: check(i), timeout=60, what=f"{kind} {i} in the dump")
        else:
            wait_until(lambda i=i: check(i), timeout=120, what=f"{kind} {i}", interval=0.005)
            took.append(1000 * (time.time() - t0))
        if took[-1] > SLOW_MS:
            slow += 1
            if slow <= SLOW_SHOWN:  # when it was written: to line up with a trace of atlasd
                print(f"slow: {kind} {i} written at {t0:.3f} took {took[-1]:.1f} ms", flush=True)
        time.sleep(0.05)  # let the change's echoes (watch events of atlasd's writes) settle
    if slow > SLOW_SHOWN:
        print(f"slow: {kind}: {slow} in all", flush=True)
    return took


def run(args: argparse.Namespace, api: ApiServer, workdir: Path) -> dict[str, Any]:
    n, k = args.clusters, args.changes
    floor = measure_floor(api, n) if args.floor else None
    if floor is not None:
        print(f"floor: {floor}", flush=True)
    api.create_namespace(NAMESPACE)
    path = f"/api/v1/namespaces/{NAMESPACE}/services"
    t0 = time.perf_counter()
    with api.admin() as c:
        for i in range(n):
            c.post(path, json=cluster_service(i)).raise_for_status()
    print(f"setup: {n} cluster Services created in {time.perf_counter() - t0:.1f} s", flush=True)

    atlasd = Atlasd(
        workdir / "atlasd",
        f"--kubeconfig={api.admin_kubeconfig}",
        f"--namespace={NAMESPACE}",
        "--identity=bench-e2e",
    )
    if args.atlasd_path:
        from_checkout(atlasd, Path(args.atlasd_path))
    api_cpu0, etcd_cpu0 = cpu_seconds(api.proc.pid), cpu_seconds(api.etcd.proc.pid)
    started = time.time()
    atlasd.proc.start()
    pid = atlasd.proc.pid
    profile = contextlib.ExitStack()  # py-spy (--py-spy) from the start until onboarded
    profile.enter_context(sampled(args.py_spy, "onboard", {"atlasd": pid}, api=api))
    atlasd.wait_ready(timeout=300)
    out: dict[str, Any] = {"clusters": n, "xds": args.xds, "detect": args.detect}
    envoy: Envoy | None = None
    client = httpx2.Client()
    try:

        def obs_values() -> dict[str, Any] | None:
            with api.admin() as c:
                r = c.get(f"/api/v1/namespaces/{NAMESPACE}/secrets/atlas-envoy-values")
            if r.status_code != 200:
                return None
            return yaml.safe_load(base64.b64decode(r.json()["data"]["values.yaml"]))  # type: ignore[no-any-return]

        values = wait_until(obs_values, timeout=300, what="atlas-envoy-values")
        boot = yaml.safe_load(values["files"]["envoy.yaml"])
        boot["dynamic_resources"]["ads_config"]["api_type"] = (
            "DELTA_GRPC" if args.xds == "delta" else "GRPC"
        )
        envoy = Envoy(boot, "atlas", workdir=workdir)
        envoy.start()
        view = EnvoyView(atlasd, client) if args.detect == "ack" else None

        def dumped() -> float | None:
            first, last = "c00000", f"c{n - 1:05d}"
            if _dump_has(envoy, first, "198.18.") and _dump_has(envoy, last, "198.18."):  # type: ignore[arg-type]
                return time.time()
            return None

        def onboarded() -> float | None:
            if view is None:
                return dumped()
            # Every cluster's node and atlas have a snapshot (/metrics is too big to poll).
            if client.get(view.url, timeout=10).json()["nodes"] < n + 1:
                return None
            acked, at, want = view.read()
            if all(t in want and acked.get(t) == want[t] for t in ("cds", "srds")):
                return max(at["cds"], at["srds"])
            return None

        done_at = wait_until(onboarded, timeout=1800, what="all clusters served", interval=0.5)
        profile.close()
        out["onboard_s"] = round(done_at - started, 1)
        # All of atlasd's CPU from its start (read once it is done: includes its start-up).
        out["onboard_cpu_ms_per_cluster"] = round(cpu_seconds(pid) * 1000 / n, 2)
        # The other processes' CPU over the same time (the API server's writes, etcd's
        # commits): where the machine's two cores went.
        out["onboard_cpu_s"] = {
            "atlasd": round(cpu_seconds(pid), 1),
            "apiserver": round(cpu_seconds(api.proc.pid) - api_cpu0, 1),
            "etcd": round(cpu_seconds(api.etcd.proc.pid) - etcd_cpu0, 1),
            "envoy": round(cpu_seconds(envoy.proc.pid), 1),
        }
        out["onboard_requests"] = requests_by_kind(atlasd.url)
        out["onboard_loop"] = loop_stalls(atlasd.url)
        if floor is not None:
            out["floor_s"] = floor["floor_s"]
            out["floor_cpu_s"] = {
                k: floor[k] for k in ("writer_cpu_s", "apiserver_cpu_s", "etcd_cpu_s")
            }
            out["onboard_over_floor"] = round(out["onboard_s"] / floor["floor_s"], 2)
        print(
            f"onboard: {n} clusters served by the Envoy {out['onboard_s']} s after start",
            flush=True,
        )
        assert _dump_has(envoy, f"c{n - 1:05d}", f"198.18.{(n - 1) // 250}.")
        if args.onboard_only:
            out["load_avg"] = [round(x, 2) for x in os.getloadavg()]
            return out
        time.sleep(5)  # the start's echoes and the first full pass settle

        # IP changes.
        def move(i: int, net: int = 19) -> None:
            with api.admin() as c:
                c.patch(
                    f"{path}/c{i:05d}",
                    content=json.dumps(
                        {"spec": {"externalIPs": [f"198.{net}.{i // 250}.{i % 250 + 1}"]}}
                    ),
                    headers={"content-type": "application/merge-patch+json"},
                ).raise_for_status()

        ip = measure(
            "ip change",
            k,
            move,
            view,
            ("eds",),
            lambda i: _dump_has(envoy, f"c{i:05d}", f"198.19.{i // 250}.{i % 250 + 1}"),  # type: ignore[arg-type]
        )
        out["ip_change_ms"] = _pct(ip)

        # New clusters and removals.
        def create(i: int) -> None:
            with api.admin() as c:
                c.post(path, json=cluster_service(n + i)).raise_for_status()

        def remove(i: int) -> None:
            with api.admin() as c:
                c.delete(f"{path}/c{n + i:05d}").raise_for_status()

        out["new_cluster_ms"] = _pct(
            measure(
                "new cluster",
                k,
                create,
                view,
                ("cds", "eds", "srds"),
                lambda i: _dump_has(envoy, f"c{n + i:05d}", "198.18."),  # type: ignore[arg-type]
            )
        )
        out["remove_ms"] = _pct(
            measure(
                "removal",
                k,
                remove,
                view,
                ("cds", "srds"),
                lambda i: _dump_has(envoy, f"c{n + i:05d}", None),  # type: ignore[arg-type]
            )
        )

        # The endpoints while /metrics and /status are read (at 5,000 clusters /metrics
        # holds 20,000 certificate series).
        out["scrape_stall_ms"] = scrape_stall(atlasd.url, rounds=args.scrape_rounds)

        # A Secret atlasd does not own.
        time.sleep(3)
        p0, r0 = pushes(atlasd.url), requests_by_kind(atlasd.url)
        with api.admin() as c:
            secrets = f"/api/v1/namespaces/{NAMESPACE}/secrets"
            c.post(
                secrets, json={"metadata": {"name": "unrelated"}, "stringData": {"a": "1"}}
            ).raise_for_status()
            c.patch(
                f"{secrets}/unrelated",
                content=json.dumps({"stringData": {"a": "2"}}),
                headers={"content-type": "application/merge-patch+json"},
            ).raise_for_status()
        time.sleep(5)  # an observation window: nothing may happen in it
        out["unrelated_secret_pushes"] = int(pushes(atlasd.url) - p0)
        r1 = requests_by_kind(atlasd.url)
        out["unrelated_secret_requests"] = (
            {v: int(r1[v] - r0[v]) for v in r0} if r0 is not None and r1 is not None else None
        )

        # Idle.
        c0, w0 = cpu_seconds(pid), time.monotonic()
        time.sleep(args.idle_seconds)  # the measurement window: nothing changes, by design
        c1, w1 = cpu_seconds(pid), time.monotonic()
        idle_rate = (c1 - c0) / (w1 - w0)
        out["idle_cpu_pct"] = round(100 * idle_rate, 3)

        # What an IP change costs: K changes 0.25 s apart with nothing polling atlasd, less
        # its idle rate over the same time; and the API requests they caused.
        req0, cpu0, wall0 = requests_by_kind(atlasd.url), cpu_seconds(pid), time.monotonic()
        for i in range(k):
            move(i, net=20)
            time.sleep(0.25)
        time.sleep(2)  # the last change's work finishes
        cpu1, wall1 = cpu_seconds(pid), time.monotonic()
        req1 = requests_by_kind(atlasd.url)
        assert _dump_has(envoy, f"c{k - 1:05d}", f"198.20.{(k - 1) // 250}.{(k - 1) % 250 + 1}")
        out["requests_per_change"] = (
            {v: round((req1[v] - req0[v]) / k, 2) for v in req0}
            if req0 is not None and req1 is not None
            else None
        )
        out["cpu_ms_per_change"] = round(
            1000 * max(0.0, (cpu1 - cpu0) - idle_rate * (wall1 - wall0)) / k, 2
        )
        out["rss_mib"] = round(rss_mib(pid), 1)
        out.update(gc_pauses(atlasd.url))
        out["loop"] = loop_stalls(atlasd.url)
    finally:
        profile.close()
        client.close()
        if envoy is not None:
            envoy.stop()
        atlasd.proc.stop()
    out["load_avg"] = [round(x, 2) for x in os.getloadavg()]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clusters", type=int, default=1000)
    parser.add_argument("--changes", type=int, default=30)
    parser.add_argument("--xds", choices=("delta", "sotw"), default="delta")
    parser.add_argument("--idle-seconds", type=float, default=330.0)
    parser.add_argument(
        "--scrape-rounds",
        type=int,
        default=3,
        help="scrape_stall_ms: how many times /metrics and /status are each read",
    )
    parser.add_argument(
        "--detect",
        choices=("ack", "dump"),
        default="ack",
        help="ack: time to atlasd's record of the Envoy's ACK; dump: to the Envoy's config "
        "dump showing the change (works with any control plane, slower to poll)",
    )
    parser.add_argument(
        "--atlasd-path",
        default=None,
        help="run the atlasd package found in this directory (another checkout)",
    )
    parser.add_argument(
        "--floor",
        action="store_true",
        help="first measure the API server's floor for the same N (bench_floor.py, in "
        "another namespace) and print onboard_s as a ratio of it",
    )
    parser.add_argument(
        "--py-spy",
        type=Path,
        help="sample atlasd with py-spy (and read the API server's CPU profile) from its "
        "start until onboarded, into this directory",
    )
    parser.add_argument(
        "--onboard-only",
        action="store_true",
        help="stop after onboarding (onboard_s, its CPU per process and its requests)",
    )
    parser.add_argument("--workdir", default=None, help="keep every log here (default: a temp dir)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        if args.workdir:
            workdir = Path(args.workdir)
            workdir.mkdir(parents=True, exist_ok=True)
        else:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-e2e-")))
        api = ApiServer(workdir / "apiserver").start()
        try:
            result = run(args, api, workdir)
        finally:
            api.stop()
    print_result(result, as_json=args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
