"""The ADS load process, as the benchmarks drive it: the compiled ``tests/harness/adsload``
(Go), one process standing in for the xDS side of N downstream Envoys.

Every stream is one downstream cluster's Envoy as it runs in production: its own TLS
connection to the observability Envoy's xDS listener (10900) with *that cluster's* client
certificate (from its ``<c>-envoy-values``), the server checked against the values' CA
bundle with SAN ``atlas`` (what the bootstrap pins), node id = the cluster name, ADS in
State of the World or Delta. It subscribes to every type by wildcard, ACKs every response,
and, like Envoy, opens a new stream after a failure with a jittered exponential back-off
(uniform below 0.5 s doubling up to 30 s, Envoy's gRPC mux defaults; reset by a response),
on the same connection while it lives.

Per stream it keeps what a test needs to judge convergence without trusting atlasd's own
view: the version it ACKed per type (short names: ``cds``, ``lds``, ``sds``, ...), the
SHA-256 of the first certificate of each SDS secret it holds and when it got it, how many
streams it opened and the last error. On SIGUSR1 it writes that state to ``<spec>.state``
(atomically: ``{"pid": ..., "streams": [{"node", "kind", "acked", "acked_at", "certs",
"certs_at", "opened", "live", "last_error"}, ...]}``); it exits on SIGTERM/SIGINT or after
``--duration`` seconds.

Before any stream it loads every stream's TLS context (its own client certificate and the
CA bundle, as an Envoy does at boot), then writes ``<spec>.ready``. With ``--hold`` it then
waits for SIGUSR2 before it dials (``release``): a benchmark starts its clock there, so its
figures hold the fleet's connecting, not the load process's start-up, which a fleet of real
Envoys does before and elsewhere.

Why compiled: these processes share the machine with what they measure. The Python one
(asyncio, grpclib; this module until 2026-12-07) spent more CPU than the two atlasd
replicas serving it: at 5,000 streams 24.2 CPU-s over the initial snapshots (4.8 ms per
stream) against the Go one's 8.3-8.9, and every stream was current 21.9 s after it started
against 13.1-14.3 s (bench/README.md, "The load generator compiled").

Run: ``adsload --duration 600 [--hold] LOAD.json`` (``command``); the spec is ``{"host":
"127.0.0.1", "port": 10900, "server_name": "atlas", "streams": [{"node": ..., "kind":
"delta"|"sotw", "ca": "<CA bundle PEM file>", "cert": "<client cert PEM file>", "key":
"<key PEM file>"}, ...]}``. ``split_spec`` spreads a fleet over a few such processes.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import ssl
from collections.abc import Sequence
from pathlib import Path

from tests.harness import components
from tests.harness.wait import wait_until


def leaf_fingerprint(pem: bytes) -> str:
    """SHA-256 (hex) of the first certificate of a PEM chain."""
    text = pem.decode()
    end = text.index("-----END CERTIFICATE-----") + len("-----END CERTIFICATE-----")
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(text[:end])).hexdigest()


def command(spec: Path, *, duration: float, hold: bool = False) -> list[str]:
    """The load process for ``spec`` (``tests/harness/adsload``, built and cached by
    ``components``)."""
    binary = components.ads_load()
    return [str(binary), "--duration", str(duration), *(["--hold"] if hold else []), str(spec)]


def wait_ready(specs: Sequence[Path], *, timeout: float) -> None:
    """Until every load process of ``specs`` has loaded its streams' TLS contexts
    (``<spec>.ready``)."""
    wait_until(
        lambda: all(Path(f"{s}.ready").exists() for s in specs),
        timeout=timeout,
        what="the load processes ready",
    )


def release(pids: Sequence[int]) -> None:
    """Let load processes started with ``--hold`` dial (SIGUSR2)."""
    for pid in pids:
        os.kill(pid, signal.SIGUSR2)


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
