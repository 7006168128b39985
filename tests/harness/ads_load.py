"""An ADS load process: one process standing in for the xDS side of N downstream Envoys,
for benchmarks and tests (the data side of the same fleet is ``fleet_sim``).

Every stream is one downstream cluster's Envoy as it runs in production: its own TLS
connection to the observability Envoy's xDS listener (10900) with *that cluster's* client
certificate (from its ``<c>-envoy-values``), the server checked against the values' CA
bundle with SAN ``atlas`` (what the bootstrap pins), node id = the cluster name, ADS in
State of the World or Delta. It subscribes to every type by wildcard, ACKs every response,
and, like Envoy, opens a new stream after a failure with a jittered exponential back-off
(``backoff``: uniform below 0.5 s doubling up to 30 s, Envoy's gRPC mux defaults; reset by
a response), on the same connection while it lives.

Per stream it keeps what a test needs to judge convergence without trusting atlasd's own
view: the version it ACKed per type (short names: ``cds``, ``lds``, ``sds``, ...), the
SHA-256 of the first certificate of each SDS secret it holds and when it got it, how many
streams it opened and the last error. On SIGUSR1 it writes that state to ``<spec>.state``
(atomically); it exits on SIGTERM/SIGINT or after ``--duration`` seconds.

Run: ``python -m tests.harness.ads_load LOAD.json --duration 600``; the spec is
``{"host": "127.0.0.1", "port": 10900, "server_name": "atlas", "streams": [{"node": ...,
"kind": "delta"|"sotw", "ca": "<CA bundle PEM>", "cert": "<client cert PEM>", "key":
"<key PEM>"}, ...]}``. ``split_spec`` spreads a fleet over a few such processes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import random
import signal
import ssl
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

MAX_STREAMS = 20_000
MAX_DURATION = 4 * 3600.0
BACKOFF_BASE = 0.5
BACKOFF_MAX = 30.0
# Opening connections at once past the listener's accept backlog (Envoy's default 128)
# only adds SYN retransmits; a real fleet does not connect in lock step either.
CONNECTING_AT_ONCE = 128

_PREFIX = "type.googleapis.com/"
SECRET = _PREFIX + "envoy.extensions.transport_sockets.tls.v3.Secret"
TYPES: dict[str, str] = {
    SECRET: "sds",
    _PREFIX + "envoy.config.cluster.v3.Cluster": "cds",
    _PREFIX + "envoy.config.endpoint.v3.ClusterLoadAssignment": "eds",
    _PREFIX + "envoy.config.listener.v3.Listener": "lds",
    _PREFIX + "envoy.config.route.v3.ScopedRouteConfiguration": "srds",
    _PREFIX + "envoy.config.route.v3.RouteConfiguration": "rds",
}
SOTW_METHOD = "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources"
DELTA_METHOD = "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources"


@dataclass
class StreamState:
    """One downstream Envoy's xDS as this process holds it (JSON in the state file)."""

    node: str
    kind: str
    acked: dict[str, str] = field(default_factory=dict)  # short type -> version ACKed
    acked_at: dict[str, float] = field(default_factory=dict)  # short type -> unix time
    certs: dict[str, str] = field(default_factory=dict)  # SDS secret -> sha256 of its leaf
    certs_at: dict[str, float] = field(default_factory=dict)  # when that leaf arrived
    opened: int = 0  # streams opened (1 + reconnects)
    live: bool = False  # a stream is open and has had a response
    last_error: str = ""


def backoff(failures: int) -> float:
    """Seconds before the next stream, after ``failures`` streams in a row that ended
    without a response (0: the last one had one), as Envoy's gRPC mux waits
    (``JitteredExponentialBackOffStrategy``, reset by a response): uniform below 0.5 s,
    then below 1 s, 2 s, ... up to 30 s."""
    return random.uniform(0, min(BACKOFF_BASE * 2**failures, BACKOFF_MAX))


def leaf_fingerprint(pem: bytes) -> str:
    """SHA-256 (hex) of the first certificate of a PEM chain."""
    text = pem.decode()
    end = text.index("-----END CERTIFICATE-----") + len("-----END CERTIFICATE-----")
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(text[:end])).hexdigest()


def _secret_leaf(any_msg: Any) -> tuple[str, str | None]:
    """(name, fingerprint of its certificate) of an SDS ``Secret`` in an ``Any``; None for a
    secret without a certificate (the validation context)."""
    from envoy.extensions.transport_sockets.tls.v3 import secret_pb2

    secret = secret_pb2.Secret()
    any_msg.Unpack(secret)
    if not secret.HasField("tls_certificate"):
        return secret.name, None
    chain = secret.tls_certificate.certificate_chain
    pem = chain.inline_bytes or chain.inline_string.encode()
    return secret.name, leaf_fingerprint(pem)


def client_context(ca: Path, cert: Path, key: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_verify_locations(cafile=str(ca))
    ctx.load_cert_chain(cert, key)
    ctx.set_alpn_protocols(["h2"])
    return ctx


class Load:
    def __init__(self, spec: dict[str, Any]) -> None:
        self.host: str = spec["host"]
        self.port = int(spec["port"])
        self.server_name: str = spec.get("server_name", "atlas")
        self.specs: list[dict[str, str]] = spec["streams"]
        if len(self.specs) > MAX_STREAMS:
            raise SystemExit(f"{len(self.specs)} streams: at most {MAX_STREAMS}")
        self.states = [StreamState(s["node"], s["kind"]) for s in self.specs]
        self.connecting = asyncio.Semaphore(CONNECTING_AT_ONCE)

    async def run_one(self, i: int) -> None:
        import grpclib.client
        import grpclib.config
        from grpclib.exceptions import GRPCError, ProtocolError, StreamTerminatedError

        spec, st = self.specs[i], self.states[i]
        ctx = client_context(Path(spec["ca"]), Path(spec["cert"]), Path(spec["key"]))
        config = grpclib.config.Configuration(ssl_target_name_override=self.server_name)
        channel = grpclib.client.Channel(self.host, self.port, ssl=ctx, config=config)
        failures = 0
        first = True
        try:
            while True:
                st.opened += 1
                got = asyncio.Event()
                task = asyncio.ensure_future(self._stream(channel, st, got))
                if first:  # hold a connecting slot until the stream is answered
                    async with self.connecting:
                        waiter = asyncio.ensure_future(got.wait())
                        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
                        waiter.cancel()
                    first = False
                try:
                    await task
                    st.last_error = "stream ended by the server"
                except (GRPCError, StreamTerminatedError, ProtocolError) as exc:
                    st.last_error = f"{type(exc).__name__}: {exc}"
                except OSError as exc:  # ssl errors and timeouts too
                    st.last_error = f"{type(exc).__name__}: {exc}"
                    channel.close()  # a broken connection: dial again next time
                    channel = grpclib.client.Channel(self.host, self.port, ssl=ctx, config=config)
                st.live = False
                failures = 0 if got.is_set() else failures + 1
                await asyncio.sleep(backoff(failures))
        finally:
            channel.close()

    async def _stream(self, channel: Any, st: StreamState, got: asyncio.Event) -> None:
        """One ADS stream until it fails or the server ends it; ``got`` is set at its first
        response."""
        import grpclib.const
        from envoy.config.core.v3 import base_pb2
        from envoy.service.discovery.v3 import discovery_pb2 as d

        delta = st.kind == "delta"
        method, req, resp = (
            (DELTA_METHOD, d.DeltaDiscoveryRequest, d.DeltaDiscoveryResponse)
            if delta
            else (SOTW_METHOD, d.DiscoveryRequest, d.DiscoveryResponse)
        )
        node = base_pb2.Node(id=st.node, cluster=st.node)
        async with channel.request(
            method, grpclib.const.Cardinality.STREAM_STREAM, req, resp
        ) as stream:
            for k, type_url in enumerate(TYPES):
                await stream.send_message(req(node=node if k == 0 else None, type_url=type_url))
            while (r := await stream.recv_message()) is not None:
                short = TYPES.get(r.type_url, r.type_url)
                now = time.time()
                if r.type_url == SECRET:
                    for res in r.resources:
                        name, fp = _secret_leaf(res.resource if delta else res)
                        if fp is not None and st.certs.get(name) != fp:
                            st.certs[name], st.certs_at[name] = fp, now
                if delta:
                    version = r.system_version_info
                    ack = req(type_url=r.type_url, response_nonce=r.nonce)
                else:
                    version = r.version_info
                    ack = req(type_url=r.type_url, version_info=version, response_nonce=r.nonce)
                await stream.send_message(ack)
                st.acked[short], st.acked_at[short] = version, now
                st.live = True
                got.set()

    def dump(self, path: Path) -> None:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(
            json.dumps({"pid": os.getpid(), "streams": [asdict(s) for s in self.states]})
        )
        tmp.replace(path)


async def serve(spec_path: Path, duration: float) -> None:
    load = Load(json.loads(spec_path.read_text()))
    state = Path(f"{spec_path}.state")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, load.dump, state)
    tasks = [asyncio.ensure_future(load.run_one(i)) for i in range(len(load.states))]
    Path(f"{spec_path}.ready").write_text(f"{len(tasks)}\n")
    try:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=duration)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def split_spec(
    *, host: str, port: int, streams: Sequence[dict[str, str]], processes: int, workdir: Path
) -> list[Path]:
    """Write the spec of ``streams`` spread over ``processes`` load processes (round robin,
    so each gets both kinds); returns their paths."""
    paths = []
    for k in range(processes):
        path = workdir / f"load-{k}.json"
        part = list(streams[k::processes])
        path.write_text(json.dumps({"host": host, "port": port, "streams": part}))
        paths.append(path)
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("spec", type=Path)
    parser.add_argument("--duration", type=float, required=True, help="seconds, then exit")
    args = parser.parse_args(argv)
    asyncio.run(serve(args.spec, min(float(args.duration), MAX_DURATION)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
