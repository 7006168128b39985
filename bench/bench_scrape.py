"""Benchmark: what reading /metrics and /status costs atlasd's event loop at fleet scale.

    .venv/bin/python bench/bench_scrape.py [--clusters 5000] [--rounds 3] [--json]

No API server and no Envoy: the status side of ``atlasd run`` alone, in this process. N
served clusters (two leaf certificates each, as the fleet reports them) go through
``atlasd.report.FleetReport`` into a ``StatusHub`` and the certificate gauges, and
``atlasd.http.StatusApp`` serves them with hypercorn on loopback from a Trio loop in a
thread of its own (as the daemon does, with ``/status/envoys`` answering one stream).
Measured:

- ``metrics_ms``, ``status_ms``: one ``/metrics`` and one ``/status`` answer, end to end
  over HTTP (median of ``--rounds``), with their sizes;
- ``after_change_ms``: the same two, read right after one cluster changed (its IP and
  certificates: what the kept text has to redo);
- ``change_ms``: reporting that one cluster's change (``FleetReport.update``);
- ``scrape_stall_ms``: ``bench_e2e``'s figure, from the same function: the longest and
  median answer of ``/status/envoys`` polled every 5 ms while ``/metrics`` and ``/status``
  are read ``--rounds`` times each, and the longest of theirs.

Runs against another checkout with ``PYTHONPATH=DIR`` (its ``atlasd`` package is imported
first; only APIs both have are used). Prints a table; with ``--json`` one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import types
from pathlib import Path
from typing import Any

import httpx2
import trio

sys.path.append(str(Path(__file__).resolve().parents[1]))  # after PYTHONPATH: another checkout wins

from atlasd import model
from atlasd.fleet.state import CertInfo, FleetWide, Member
from atlasd.http import StatusApp, run_http
from atlasd.hub import StatusHub
from atlasd.report import FleetReport
from bench.bench_e2e import scrape_stall


def member(i: int, *, net: int = 18) -> Member:
    name = f"c{i:05d}"
    cluster = model.DownstreamCluster(
        name=name,
        external_ip=f"198.{net}.{i // 250}.{i % 250 + 1}",
        ports=(model.ServicePort("thanos", 10901), model.ServicePort("prometheus", 9090)),
    )
    certs = tuple(
        CertInfo(f"{name}/{kind}", 1.8e9 + i + net, 1.7e9 + i + net)
        for kind in ("server", "client")
    )
    return Member(
        name=name,
        service=None,
        services={},
        secrets={},
        cluster=cluster,
        problems=(),
        identity=None,
        certificates=certs,
        state="served",
    )


def envoys() -> dict[str, Any]:
    """``/status/envoys`` of one observability Envoy (what bench_e2e polls)."""
    doc = {"node": "atlas", "stream_id": 1, "kind": "delta", "acked": {"cds": "1"}}
    return {"envoys": [doc], "snapshots": {"atlas": {"cds": "1"}}, "nodes": 1}


class Served:
    """The status side on a Trio loop in a thread; ``call`` runs a function on that loop."""

    def __init__(self, n: int) -> None:
        self.hub = StatusHub()
        self.report = FleetReport(self.hub)
        self.members = {f"c{i:05d}": member(i) for i in range(n)}
        self.version = types.SimpleNamespace(members=self.members, fleetwide=FleetWide())
        self.report.update(self.version, frozenset(self.members))  # type: ignore[arg-type]
        self.app = StatusApp(self.hub, envoys=envoys)
        self._token: trio.lowlevel.TrioToken | None = None
        self._port: int | None = None
        self._ready = threading.Event()
        self._stop: trio.Event | None = None
        self._thread = threading.Thread(target=trio.run, args=(self._main,), daemon=True)
        self._thread.start()
        self._ready.wait(30)
        self.url = f"http://127.0.0.1:{self._port}"

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._stop = trio.Event()
        async with trio.open_nursery() as nursery:

            async def serve(task_status: trio.TaskStatus[int]) -> None:
                await run_http(self.app, host="127.0.0.1", port=0, task_status=task_status)

            self._port = await nursery.start(serve)
            self._ready.set()
            await self._stop.wait()
            nursery.cancel_scope.cancel()

    def call(self, fn: Any, *args: Any) -> Any:
        assert self._token is not None
        return trio.from_thread.run_sync(fn, *args, trio_token=self._token)

    def change(self, i: int, net: int) -> float:
        """One cluster changes (IP and certificates); the seconds reporting it took."""

        def update() -> float:
            key = f"c{i:05d}"
            self.members[key] = member(i, net=net)
            t = time.perf_counter()
            self.report.update(self.version, frozenset({key}))  # type: ignore[arg-type]
            return time.perf_counter() - t

        seconds: float = self.call(update)
        return seconds

    def stop(self) -> None:
        assert self._stop is not None
        self.call(self._stop.set)
        self._thread.join(10)


def timed_get(c: httpx2.Client, url: str) -> tuple[float, int]:
    t = time.perf_counter()
    r = c.get(url)
    r.raise_for_status()
    return 1000 * (time.perf_counter() - t), len(r.content)


def client(url: str, what: str, rounds: int) -> dict[str, Any]:
    """The reads, in their own process: ``gets`` (each large answer ``rounds`` times after
    a first one; the median), ``after`` (each once), ``stall`` (``scrape_stall``)."""
    if what == "stall":
        return scrape_stall(url, rounds=rounds)
    out: dict[str, Any] = {}
    with httpx2.Client(timeout=60) as c:
        for path, name in (("/metrics", "metrics"), ("/status", "status")):
            if what == "after":
                out[name] = round(timed_get(c, url + path)[0], 1)
                continue
            timed_get(c, url + path)  # the first read builds what is kept
            runs = [timed_get(c, url + path) for _ in range(rounds)]
            out[f"{name}_ms"] = round(statistics.median(ms for ms, _ in runs), 1)
            out[f"{name}_bytes"] = runs[-1][1]
    return out


def in_child(url: str, what: str, rounds: int) -> dict[str, Any]:
    argv = [sys.executable, __file__, "--client", url, "--what", what, "--rounds", str(rounds)]
    done = subprocess.run(argv, check=True, capture_output=True, text=True, timeout=600)
    result: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
    return result


def run(n: int, rounds: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    served = Served(n)
    out: dict[str, Any] = {"clusters": n, "fill_s": round(time.perf_counter() - t0, 2)}
    try:
        out.update(in_child(served.url, "gets", rounds))
        changes, after_m, after_s = [], [], []
        for r in range(rounds):
            changes.append(1000 * served.change(r, 19 + r))
            after = in_child(served.url, "after", rounds)
            after_m.append(after["metrics"])
            after_s.append(after["status"])
        out["change_ms"] = round(statistics.median(changes), 2)
        out["after_change_ms"] = {
            "metrics": round(statistics.median(after_m), 1),
            "status": round(statistics.median(after_s), 1),
        }
        out["scrape_stall_ms"] = in_child(served.url, "stall", rounds)
    finally:
        served.stop()
    out["load_avg"] = [round(x, 2) for x in os.getloadavg()]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clusters", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--client", metavar="URL", help=argparse.SUPPRESS)
    parser.add_argument("--what", choices=("gets", "after", "stall"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        print(json.dumps(client(args.client, args.what, args.rounds)))
        return 0
    result = run(args.clusters, args.rounds)
    for key, value in result.items():
        print(f"{key:<20} {value}")
    if args.json:
        print(json.dumps(result, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
