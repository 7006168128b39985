"""Which hop is broken: ``atlasd.query.probe`` against real Envoys configured by atlasd's
xDS server, a real Thanos sidecar, and each failure injected for real.

    probe -> observability Envoy (Thanos listener, by authority) -> mTLS -> downstream
    Envoy -> Thanos sidecar (east) | a closed port (west) | an Envoy holding every call
    4 s (south)

north has no downstream Envoy at all; ghost is not served. Where the downstream Envoys
of alien, picky and misnamed would be, real Envoys terminate TLS with the wrong
material: alien's certificate (and trust) are of another CA; picky presents its own
certificate of atlasd's CA but trusts only another CA, so it refuses the observability
Envoy's; misnamed presents a certificate of atlasd's CA naming another cluster.

The Alertmanager route is probed as a cluster's alerts take it: into the observability
Envoy's 10903 with the cluster's certificate, to a real Alertmanager (alertmanager0) and
to a closed port (alertmanager1).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from atlasd import labels
from atlasd.model import CertKey, DownstreamCluster, LocalAlertmanager
from atlasd.query.observer import probe_unseen
from atlasd.query.probe import Finding, probe, probe_alertmanager, probe_prometheus
from atlasd.query.view import ClusterSight, QueryView
from atlasd.reconcile.objects import secret_object
from atlasd.standalone import FileStore
from tests.harness.envoy import typed
from tests.harness.net import free_port
from tests.harness.prom import WebProc
from tests.integration.daemon_helpers import cli as run_cli
from tests.integration.test_dns_thanos import Rig
from tests.integration.test_query_bounds import fault_envoy
from tests.integration.test_xds_traffic import AM_CONFIG

pytestmark = pytest.mark.integration


def tls_envoy(ports: tuple[int, ...], cert: CertKey, trust: bytes) -> dict[str, Any]:
    """An Envoy listening on ``ports`` as a downstream Envoy does (TLS, ``cert``, a client
    certificate signed by a CA of ``trust`` required), answering every request 200."""
    hcm = typed(
        "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        stat_prefix="tls",
        codec_type="AUTO",
        route_config={
            "virtual_hosts": [
                {
                    "name": "all",
                    "domains": ["*"],
                    "routes": [{"match": {"prefix": "/"}, "direct_response": {"status": 200}}],
                }
            ]
        },
        http_filters=[
            {
                "name": "envoy.filters.http.router",
                "typed_config": typed("envoy.extensions.filters.http.router.v3.Router"),
            }
        ],
    )

    def inline(pem: bytes) -> dict[str, str]:
        return {"inline_bytes": base64.b64encode(pem).decode()}

    tls = typed(
        "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
        require_client_certificate=True,
        common_tls_context={
            "alpn_protocols": ["h2", "http/1.1"],
            "tls_certificates": [
                {"certificate_chain": inline(cert.cert_pem), "private_key": inline(cert.key_pem)}
            ],
            "validation_context": {"trusted_ca": inline(trust)},
        },
    )
    chain = {
        "filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}],
        "transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": tls},
    }
    return {
        "static_resources": {
            "listeners": [
                {
                    "name": f"tls{port}",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
                    "filter_chains": [chain],
                }
                for port in ports
            ]
        }
    }


async def test_each_broken_hop_is_named(
    tmp_path: Path,
    prometheus_factory: Callable[[str], WebProc],
    envoy_factory: Any,
    request: pytest.FixtureRequest,
) -> None:
    from tests.unit.xds import helpers as xds_helpers
    from tests.unit.xds.world import start_envoy_here, xds_world

    rig = Rig(tmp_path, prometheus_factory, request)  # its sidecars only
    await rig.start_sidecars("east")
    held = free_port()
    boot = fault_envoy(held, rig.sidecars["east"].grpc_port, delay=4, path=None)
    start_envoy_here(envoy_factory, boot, "held")
    upstream = {"east": rig.sidecars["east"].grpc_port, "west": free_port(), "south": held}

    def downstream(name: str) -> DownstreamCluster:
        # east's Prometheus is real; the others' Prometheus ports are closed.
        prom = rig.proms["east"].port if name == "east" else free_port()
        return xds_helpers.cluster(
            name, thanos_port=upstream.get(name, free_port()), prom_port=prom
        )

    names = ("east", "west", "north", "south", "alien", "picky", "misnamed")
    async with xds_world(envoy_factory, clusters=names, cluster_factory=downstream) as w:
        await w.start_ready("atlas", "east", "west", "south")
        other = xds_helpers.make_ca("another-ca")
        picky = w.pki.identity("picky")
        assert picky is not None
        wrong = {
            "alien": (xds_helpers.identity(other, "alien").server, other.bundle),
            "picky": (picky.server, other.bundle),
            "misnamed": (xds_helpers.identity(w.ca, "west").server, w.pki.trust_bundle),
        }
        for c, (cert, trust) in wrong.items():
            ports = w.plan.ports_for(c)
            boot = tls_envoy((ports.thanos, ports.prometheus), cert, trust)
            await trio.to_thread.run_sync(start_envoy_here(envoy_factory, boot, c).wait_ready, 30)
        address = f"127.0.0.1:{w.plan.observability.thanos}"
        s = w.settings

        async def look(c: str, **kw: Any) -> Finding:
            host = f"{c}-thanos-sidecar0.{s.namespace}.svc.{s.cluster_domain}"
            return await probe(c, address=kw.pop("address", address), authority=host, **kw)

        ok = await look("east")
        assert ok.hop == "ok", ok
        assert {"cluster": "east"} in [dict(ls) for ls in ok.labels], ok.labels
        # Every time (Envoy's own upstream-time header is not always passed on).
        assert {(await look("west")).hop for _ in range(12)} == {"upstream-down"}
        west = await look("west")
        assert west.hop == "upstream-down", west
        assert (await look("north")).hop == "cluster-unreachable"
        ghost = await look("ghost")
        assert ghost.hop == "no-route", ghost
        assert (await look("south", slow_after=2)).hop == "slow"
        assert (await look("south", within=1)).hop == "timeout"
        closed = f"127.0.0.1:{free_port()}"
        assert (await look("east", address=closed)).hop == "envoy-unreachable"

        # A refused handshake: which side refused which certificate, on both paths.
        prom_via = f"127.0.0.1:{w.plan.observability.prometheus}"
        said = {
            "alien": "the downstream Envoy presents a certificate of another CA (not in "
            "atlasd's trust bundle): the observability Envoy refused it",
            "picky": "the downstream Envoy refused the observability Envoy's certificate "
            "(TLS alert 'unknown ca')",
            "misnamed": "the downstream Envoy presents a certificate that does not name "
            f"'misnamed' (it names: west, west.{s.namespace}.atlas)",
        }
        for c, says in said.items():
            for f in (await look(c), await probe_prometheus(c, address=prom_via)):
                assert f.hop == "tls-refused", f
                assert says in f.detail, f.detail
        north = await look("north")
        assert "Connection refused" in north.detail, north  # not a handshake: no listener

        # The observer names the certificate the observability Envoy refused: it reads it
        # itself from the address that Envoy dials (only where that Envoy refused it).
        probes: dict[str, tuple[Finding, float]] = {}
        unseen = QueryView({c: ClusterSight(seen=False, since=0) for c in wrong})
        await probe_unseen(
            w.fleet(), unseen, probes, via=address, now=0,
            downstream_port=lambda c: w.plan.ports_for(c).thanos,
        )  # fmt: skip
        alien = probes["alien"][0]
        assert said["alien"] in alien.detail, alien
        assert "; it presents: issuer CN=another-ca" in alien.detail, alien.detail
        assert "subject CN=alien" in alien.detail and "names alien, alien." in alien.detail
        assert "not signed by atlasd's CA (CN=atlas-test-ca)" in alien.detail, alien.detail
        assert "names west, " in probes["misnamed"][0].detail
        assert "signed by atlasd's CA" in probes["misnamed"][0].detail
        assert "it presents" not in probes["picky"][0].detail  # picky refused ours

        # The Prometheus path: /prom/<c>/-/ready through the observability Envoy's 10904.
        hops = {
            c: (await probe_prometheus(c, address=prom_via)).hop
            for c in ("east", "west", "north", "ghost")
        }
        assert hops == {
            "east": "ok",
            "west": "upstream-down",
            "north": "cluster-unreachable",
            "ghost": "no-route",
        }

        # The CLI: one line per cluster, exit 1 when a hop is broken, -o json.
        s_ns = f"--namespace={s.namespace}"
        good = await trio.to_thread.run_sync(
            lambda: run_cli(
                "probe",
                "east",
                f"--via={address}",
                f"--prometheus-via={prom_via}",
                s_ns,
                check=False,
            )
        )
        assert good.returncode == 0, good.stderr
        assert good.stdout.startswith("east: ok"), good.stdout
        assert "east (prometheus): ok (ready in" in good.stdout, good.stdout
        bad = await trio.to_thread.run_sync(
            lambda: run_cli(
                "probe", "west", "north", "picky", f"--via={address}", s_ns, "-o", "json",
                check=False,
            )
        )  # fmt: skip
        assert bad.returncode == 1, bad.stderr
        doc = json.loads(bad.stdout)
        assert [(f["cluster"], f["hop"]) for f in doc] == [
            ("west", "upstream-down"),
            ("north", "cluster-unreachable"),
            ("picky", "tls-refused"),
        ]
        assert said["picky"] in doc[2]["detail"]
        assert all(f["fix"] for f in doc)


async def test_the_alertmanager_route_names_its_hops(
    tmp_path: Path, alertmanager_factory: Callable[[str], WebProc], envoy_factory: Any
) -> None:
    from tests.unit.xds import helpers as xds_helpers
    from tests.unit.xds.world import xds_world

    am = await trio.to_thread.run_sync(alertmanager_factory, AM_CONFIG)
    local = [
        LocalAlertmanager("am0", "monitoring", am.port),
        LocalAlertmanager("am1", "monitoring", free_port()),
    ]
    async with xds_world(envoy_factory, clusters=("east",), alertmanagers=local) as w:
        await w.start_ready("atlas")
        s = w.settings
        address = f"127.0.0.1:{w.plan.observability.alertmanager}"
        east = w.pki.identity("east")
        assert east is not None
        other = xds_helpers.make_ca("another-ca")

        async def look(
            index: int = 0, *, cert: CertKey = east.client, trust: bytes = w.pki.trust_bundle,
            at: str = address,
        ) -> Finding:  # fmt: skip
            return await probe_alertmanager(
                "east", address=at, index=index, namespace=s.namespace,
                domain=s.cluster_domain, identity=cert, trust=trust,
            )  # fmt: skip

        ok = await look(0)
        assert (ok.hop, ok.via) == ("ok", "alertmanager0"), ok
        down = await look(1)
        assert down.hop == "upstream-down", down
        assert "could not reach the Alertmanager" in down.detail
        missing = await look(2)
        assert missing.hop == "no-route" and "or has no alertmanager2" in missing.detail
        # A certificate of atlasd's CA naming no cluster it serves: the route's RBAC says no.
        ghost = await look(cert=xds_helpers.identity(w.ca, "ghost").client)
        assert ghost.hop == "no-route" and "does not take alerts from" in ghost.detail, ghost
        # The observability Envoy refuses a client certificate of another CA...
        alien = await look(cert=xds_helpers.identity(other, "east").client)
        assert alien.hop == "tls-refused", alien
        assert "refused the certificate presented to it (TLS alert 'unknown ca')" in alien.detail
        # ...and a cluster trusting another CA refuses the observability Envoy's.
        distrust = await look(trust=other.bundle)
        assert distrust.hop == "tls-refused", distrust
        assert "presents a certificate that does not verify" in distrust.detail, distrust
        closed = await look(at=f"127.0.0.1:{free_port()}")
        assert closed.hop == "envoy-unreachable", closed

        # The CLI reads the cluster's certificate where atlasd keeps it (here: a store).
        store = tmp_path / "store"
        identity = secret_object(
            name=labels.identity_secret_name("east"),
            namespace=s.namespace,
            data={
                "ca.crt": w.pki.trust_bundle,
                "client.crt": east.client.cert_pem,
                "client.key": east.client.key_pem,
            },
            obj_labels={},
        )
        async with FileStore(store, namespace=s.namespace) as files:
            await files.create(identity)
        run = await trio.to_thread.run_sync(
            lambda: run_cli(
                "probe", "east", f"--via=127.0.0.1:{w.plan.observability.thanos}",
                f"--alertmanager-via={address}", "--alertmanagers=3", f"--store={store}",
                f"--namespace={s.namespace}", check=False,
            )
        )  # fmt: skip
        assert run.returncode == 1, run.stderr  # east has no downstream Envoy here
        assert "east (alertmanager0): ok (ready in" in run.stdout, run.stdout
        assert "east (alertmanager1): upstream-down after" in run.stdout, run.stdout
        # The Envoy let east in to the others: alertmanager2 is missing, not east refused.
        assert "east (alertmanager2): no-route after" in run.stdout, run.stdout
        assert "the observability Envoy has no alertmanager2 (HTTP 403" in run.stdout
        assert "BEGIN" not in run.stdout + run.stderr  # no key, no certificate printed
        nothing = await trio.to_thread.run_sync(
            lambda: run_cli(
                "probe", "west", f"--alertmanager-via={address}", f"--store={store}",
                f"--namespace={s.namespace}", check=False,
            )
        )  # fmt: skip
        assert nothing.returncode == 1
        assert "west-atlas-identity not found" in nothing.stderr, nothing.stderr
