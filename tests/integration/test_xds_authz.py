"""Keys go only where they belong: an Envoy holding cluster A's certificate cannot get
cluster B's configuration; a direct caller cannot claim a downstream node nor forge XFCC
(plaintext, or TLS without the forwarder's certificate); TLS listeners refuse clients
without a (suitable) certificate."""

from __future__ import annotations

import socket
import ssl
from pathlib import Path
from typing import Any

import pytest
import trio

from atlasd import model
from atlasd.reconcile.desired import envoy_bootstrap
from tests.harness.wait import wait_until_async
from tests.unit.xds import helpers
from tests.unit.xds.world import World, start_envoy_here, xds_world

pytestmark = pytest.mark.integration


def _denied(w: World) -> float:
    for metric in w.registry.collect():
        if metric.name == "atlasd_xds_denied_streams":
            return sum(s.value for s in metric.samples if s.name.endswith("_total"))
    return 0.0


def _dynamic(dump: dict[str, Any]) -> list[str]:
    """Names of everything an Envoy received over xDS (clusters, listeners, secrets)."""
    names: list[str] = []
    for cfg in dump["configs"]:
        for key in ("dynamic_active_clusters", "dynamic_warming_clusters"):
            names += [c["cluster"]["name"] for c in cfg.get(key, [])]
        names += [lst["name"] for lst in cfg.get("dynamic_listeners", [])]
        for key in ("dynamic_active_secrets", "dynamic_warming_secrets"):
            names += [s["name"] for s in cfg.get(key, [])]
    return names


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
async def test_cert_of_a_cannot_fetch_b(envoy_factory: Any, delta: bool) -> None:
    async with xds_world(envoy_factory, delta=delta) as w:
        await w.start_envoy("atlas")
        await w.wait_acked("atlas")
        await w.wait_envoy_ready("atlas")
        # It even sends a forged XFCC header naming west: 10900 replaces it (SANITIZE_SET).
        impostor = await w.start_envoy(
            "east", as_node="west", metadata=(("x-forwarded-client-cert", "Hash=0;DNS=west"),)
        )
        await wait_until_async(lambda: _denied(w) >= 1, timeout=20, what="the impostor refused")
        dump = await trio.to_thread.run_sync(impostor.config_dump)
        assert _dynamic(dump) == []
        assert not any(s.node == "west" for s in w.cache.status())
        # The honest east Envoy is served.
        await w.start_envoy("east")
        await w.wait_acked("east")


async def test_direct_caller_cannot_claim_a_downstream_node(envoy_factory: Any) -> None:
    async with xds_world(envoy_factory) as w:
        boot = helpers.atlas_bootstrap(w.ads_port)
        boot["node"] = {"id": "east", "cluster": "east"}
        envoy = start_envoy_here(w.envoy_factory, boot, "direct-east")
        await wait_until_async(lambda: _denied(w) >= 1, timeout=20, what="direct east refused")
        dump = await trio.to_thread.run_sync(envoy.config_dump)
        assert _dynamic(dump) == []


def _impostor(w: World, node: str, *, cert: model.Identity | None, tls: bool) -> dict[str, Any]:
    """A bootstrap dialling atlasd's ADS port directly as ``node`` with a forged XFCC header
    naming it: plaintext, or TLS (trusting atlasd) with ``cert`` as client certificate."""
    ident = cert if cert is not None else w.pki.identity("east")
    boot = envoy_bootstrap(
        node,
        xds_host="127.0.0.1",
        xds_port=w.ads_port,
        tls=ident if tls else None,
        ca_bundle=w.pki.trust_bundle if tls else None,
        server_san=model.ADS_SERVER_NAME,
    )
    if tls and cert is None:
        ctx = boot["static_resources"]["clusters"][0]["transport_socket"]["typed_config"]
        del ctx["common_tls_context"]["tls_certificates"]
    (svc,) = boot["dynamic_resources"]["ads_config"]["grpc_services"]
    svc["initial_metadata"] = [{"key": "x-forwarded-client-cert", "value": f"Hash=0;DNS={node}"}]
    return boot


async def test_forged_xfcc_without_the_forwarder_identity_gets_nothing(
    envoy_factory: Any,
) -> None:
    """As the chart runs it (a forwarder token is always configured): a forged XFCC header on
    a plaintext connection, or on a TLS connection without the forwarder's certificate (a
    downstream cluster's certificate, or none), gets PERMISSION_DENIED and no resource,
    while the real observability Envoy still carries the downstream Envoys' xDS."""
    async with xds_world(envoy_factory, clusters=("east", "west"), token="chart-token") as w:
        await w.start_envoy("atlas")
        await w.wait_acked("atlas")
        east = w.pki.identity("east")
        impostors = {
            "plaintext": _impostor(w, "west", cert=None, tls=False),
            "tls-east-cert": _impostor(w, "west", cert=east, tls=True),
            "tls-no-cert": _impostor(w, "west", cert=None, tls=True),
        }
        started = {
            name: start_envoy_here(w.envoy_factory, boot, f"impostor-{name}")
            for name, boot in impostors.items()
        }
        for name, envoy in started.items():
            await wait_until_async(
                lambda envoy=envoy: "closed: 7, " in envoy.log_text(),
                timeout=20,
                what=f"{name}: PERMISSION_DENIED",
            )
        assert _denied(w) >= len(started)
        for envoy in started.values():
            dump = await trio.to_thread.run_sync(envoy.config_dump)
            assert _dynamic(dump) == []
        assert not any(s.node == "west" for s in w.cache.status())
        # The observability Envoy forwards the honest downstream Envoys' xDS.
        await w.start_envoy("east")
        await w.start_envoy("west")
        await w.wait_acked("east")
        await w.wait_acked("west")


def _tls_exchange(
    port: int, ca: bytes, tmp: Path, cert: model.CertKey | None, host: str = "x"
) -> bytes:
    """TLS to 127.0.0.1:port (optionally with a client cert), send a request, return what
    came back; b"" or an SSL error means the server refused."""
    ctx = ssl.create_default_context(cadata=ca.decode())
    ctx.check_hostname = False
    if cert is not None:
        c, k = tmp / "c.pem", tmp / "k.pem"
        c.write_bytes(cert.cert_pem)
        k.write_bytes(cert.key_pem)
        ctx.load_cert_chain(c, k)
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
            ctx.wrap_socket(raw, server_hostname="atlas") as s,
        ):
            s.sendall(f"GET /-/ready HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            return s.recv(64)
    except (ssl.SSLError, ConnectionResetError, BrokenPipeError):
        return b""


async def test_tls_listeners_refuse_clients_without_certificate(
    envoy_factory: Any, alertmanager_factory: Any, tmp_path: Path
) -> None:
    am = await trio.to_thread.run_sync(
        alertmanager_factory, 'route:\n  receiver: "null"\nreceivers:\n  - name: "null"\n'
    )
    local = [model.LocalAlertmanager("am0", "monitoring", am.port)]
    async with xds_world(envoy_factory, alertmanagers=local, clusters=("east",)) as w:
        for n in ("atlas", "east"):
            await w.start_envoy(n)
        for n in ("atlas", "east"):
            await w.wait_acked(n)
            await w.wait_envoy_ready(n)
        obs = w.plan.observability
        east = w.plan.ports_for("east")
        ca = w.pki.trust_bundle
        atlas_id = w.pki.identity("atlas")
        east_id = w.pki.identity("east")
        assert atlas_id is not None and east_id is not None

        async def exchange(port: int, cert: model.CertKey | None, host: str = "x") -> bytes:
            return await trio.to_thread.run_sync(_tls_exchange, port, ca, tmp_path, cert, host)

        am0 = "alertmanager0.monitoring.svc.cluster.local"
        for port in (obs.xds, obs.alertmanager, east.thanos, east.prometheus):
            assert await exchange(port, None) == b"", (
                f"port {port} accepted a client without a cert"
            )
        # Positive controls: the right certificate gets through.
        assert (await exchange(obs.alertmanager, east_id.client, am0)).startswith(b"HTTP/1.1 200")
        assert (await exchange(east.prometheus, atlas_id.client)).startswith(b"HTTP/")
        # A CA-signed certificate of the wrong node is refused: by the SAN check on
        # 11904, by RBAC (403) on 10903 (only current clusters may send alerts).
        assert await exchange(east.prometheus, east_id.client) == b""
        assert (await exchange(obs.alertmanager, atlas_id.client, am0)).startswith(b"HTTP/1.1 403")
        # Removing the cluster revokes its certificate at 10903 at once.
        w.remove_cluster("east")
        w.publish()
        await w.wait_acked("atlas")
        assert (await exchange(obs.alertmanager, east_id.client, am0)).startswith(b"HTTP/1.1 403")


async def test_forwarder_token(envoy_factory: Any) -> None:
    """With a token, the observability Envoy's own stream and the streams it forwards are
    served; a plaintext caller is served as ``atlas`` with the token (the fallback) and
    refused without it."""
    async with xds_world(envoy_factory, clusters=("east",), token="tok-123") as w:
        await w.start_envoy("atlas")
        await w.start_envoy("east")
        for n in ("atlas", "east"):
            await w.wait_acked(n)
        boot = helpers.atlas_bootstrap(w.ads_port)  # plaintext, no token
        envoy = start_envoy_here(w.envoy_factory, boot, "atlas-without-token")
        await wait_until_async(lambda: _denied(w) >= 1, timeout=20, what="tokenless atlas refused")
        dump = await trio.to_thread.run_sync(envoy.config_dump)
        assert _dynamic(dump) == []
        boot = helpers.atlas_bootstrap(w.ads_port, token="tok-123")  # plaintext, token
        start_envoy_here(w.envoy_factory, boot, "atlas-plaintext-token")
        await wait_until_async(
            lambda: sum(s.node == "atlas" for s in w.cache.status()) == 2,
            timeout=20,
            what="the plaintext stream with the token served",
        )
