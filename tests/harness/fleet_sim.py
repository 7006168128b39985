"""A downstream-fleet simulator: one process standing in for N downstream Envoys + Thanos
sidecars, for benchmarks and tests.

For every cluster of its spec it listens on ``<external IP>:<port>`` (port 11901, the
downstream Envoy's Thanos listener, by default; each cluster a distinct 127.x.y.z address),
and there:

- terminates TLS with *that cluster's* server certificate — one listener per address, so
  the certificate is chosen by the local address the observability Envoy dialled;
- requires a client certificate signed by the spec's CA, and answers only the
  observability Envoy's (SAN ``atlas``): any other, a downstream cluster's included, gets
  PERMISSION_DENIED;
- speaks gRPC (HTTP/2, ALPN h2) and answers the Thanos Info API (``thanos.info.Info/Info``,
  what Thanos Query v0.39 asks every endpoint) with the external labels
  ``cluster=<name>`` and a StoreAPI time range, as a Thanos sidecar does.

Types and the grpclib server come from Thanos's own ``.proto`` files (``proto/``),
generated with betterproto into ``atlasd/thanospb`` (``make proto``).

Bounds: at most ``MAX_CLUSTERS`` listeners, loopback addresses only (127/8, or the benchmark
network 198.18/15 inside a network namespace that routes it to loopback and has no other
route; anything else is
refused before binding), and the process exits after ``--duration`` seconds (at most
``MAX_DURATION``) or on SIGTERM/SIGINT. It writes ``<spec>.ready`` once every listener is
bound, and counts the Info calls it answered per cluster into ``<spec>.stats`` at exit.

Run: ``python -m tests.harness.fleet_sim FLEET.json --duration 600``; the spec is
``{"ca": "<CA bundle PEM path>", "port": 11901, "clusters": [{"name": ..., "address":
"127.0.1.1", "cert": "<server cert PEM path>", "key": "<key PEM path>"}, ...]}``.
``FleetSim`` runs it as a child process of a test.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import signal
import ssl
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MAX_CLUSTERS = 20_000
MAX_DURATION = 4 * 3600.0
DEFAULT_PORT = 11901
OBSERVABILITY_SAN = "atlas"


@dataclass(frozen=True)
class SimCluster:
    name: str
    address: str
    cert: Path
    key: Path


# The benchmark network (RFC 2544): never routed; bench/bench_outcome.py routes it to the
# loopback interface inside a network namespace of its own (Kubernetes refuses loopback
# external IPs, so a cluster Service cannot name a 127.x address).
BENCHMARK_NET = ipaddress.ip_network("198.18.0.0/15")


def is_local_only(address: str) -> bool:
    """A loopback address, or one of the benchmark network while it is routed to the
    loopback interface here (a private network namespace)."""
    ip = ipaddress.ip_address(address)
    if ip.is_loopback:
        return True
    if ip not in BENCHMARK_NET:
        return False
    try:
        routes = Path("/proc/net/route").read_text().splitlines()[1:]
    except OSError:
        return False
    # Only if every route of this namespace is on the loopback interface (no way out).
    return bool(routes) is False and _lo_local(ip)


def _lo_local(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    import subprocess

    out = subprocess.run(
        ["ip", "route", "show", "table", "local", "dev", "lo"],
        capture_output=True, text=True, check=False,
    ).stdout  # fmt: skip
    nets = [line.split()[1] for line in out.splitlines() if line.startswith("local ")]
    return any(ip in ipaddress.ip_network(n, strict=False) for n in nets)


def load_spec(path: Path) -> tuple[Path, int, list[SimCluster]]:
    spec = json.loads(path.read_text())
    clusters = [
        SimCluster(c["name"], c["address"], Path(c["cert"]), Path(c["key"]))
        for c in spec["clusters"]
    ]
    if len(clusters) > MAX_CLUSTERS:
        raise SystemExit(f"{len(clusters)} clusters: at most {MAX_CLUSTERS}")
    for c in clusters:
        if not is_local_only(c.address):
            raise SystemExit(f"cluster {c.name}: {c.address} is not a loopback address")
    if len({c.address for c in clusters}) != len(clusters):
        raise SystemExit("two clusters share an address")
    return Path(spec["ca"]), int(spec.get("port", DEFAULT_PORT)), clusters


def server_context(cluster: SimCluster, ca: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cluster.cert, cluster.key)
    ctx.load_verify_locations(cafile=str(ca))
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.set_alpn_protocols(["h2"])
    return ctx


def peer_dns_names(peer_cert: dict[str, Any] | None) -> set[str]:
    if not peer_cert:
        return set()
    return {value for kind, value in peer_cert.get("subjectAltName", ()) if kind == "DNS"}


def _info_service(name: str, calls: dict[str, int]) -> Any:
    # Imported here: the generated package needs betterproto, which only the simulator
    # process (and its tests) import.
    import grpclib
    import grpclib.const
    from grpclib.exceptions import GRPCError

    from atlasd.thanospb import thanos
    from atlasd.thanospb.thanos import info

    labels = thanos.ZLabelSet(labels=[thanos.Label(name="cluster", value=name)])
    now_ms = int(time.time() * 1000)
    answer = info.InfoResponse(
        label_sets=[labels],
        component_type="sidecar",
        store=info.StoreInfo(
            min_time=now_ms - 3600_000,
            max_time=2**63 - 1,  # a sidecar's head block: up to "now", always
            tsdb_infos=[
                info.TsdbInfo(labels=labels, min_time=now_ms - 3600_000, max_time=2**63 - 1)
            ],
        ),
    )

    async def handle(stream: Any) -> None:
        await stream.recv_message()
        peer = stream.peer.cert() if stream.peer is not None else None
        if OBSERVABILITY_SAN not in peer_dns_names(peer):
            raise GRPCError(
                grpclib.Status.PERMISSION_DENIED, "only the observability Envoy may ask"
            )
        calls[name] = calls.get(name, 0) + 1
        await stream.send_message(answer)

    class InfoService:
        """``thanos.info.Info`` with the generated types; the handler is grpclib's own
        (not ``info.InfoBase``'s) because it must see the peer's certificate."""

        def __mapping__(self) -> dict[str, grpclib.const.Handler]:
            return {
                "/thanos.info.Info/Info": grpclib.const.Handler(
                    handle,
                    grpclib.const.Cardinality.UNARY_UNARY,
                    info.InfoRequest,
                    info.InfoResponse,
                )
            }

    return InfoService()


async def serve(spec_path: Path, duration: float) -> dict[str, int]:
    from grpclib.server import Server

    ca, port, clusters = load_spec(spec_path)
    calls: dict[str, int] = {}
    servers: list[Any] = []
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        for cluster in clusters:
            server = Server([_info_service(cluster.name, calls)])
            await server.start(cluster.address, port, ssl=server_context(cluster, ca))
            servers.append(server)
        Path(f"{spec_path}.ready").write_text(f"{len(servers)}\n")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=duration)
    finally:
        for server in servers:
            server.close()
        for server in servers:
            await server.wait_closed()
    return calls


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("spec", type=Path)
    parser.add_argument("--duration", type=float, required=True, help="seconds, then exit")
    args = parser.parse_args(argv)
    duration = min(float(args.duration), MAX_DURATION)
    calls = asyncio.run(serve(args.spec, duration))
    Path(f"{args.spec}.stats").write_text(json.dumps(calls, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
