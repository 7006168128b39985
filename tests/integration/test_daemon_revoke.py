"""``atlasd cluster revoke`` end to end: a real API server, ``atlasd run``, a real
observability Envoy from ``atlas-envoy-values`` and two downstream clusters, each a network
namespace with a real Envoy from its ``<c>-envoy-values`` and a real Prometheus.

After ``revoke east``: the observability Envoy refuses east's certificate in the handshake
(its CRL) while every request to west answers; atlasd refuses east's Envoy on xDS (its
bootstrap client certificate is revoked too), re-issues east's certificates into
``east-envoy-values`` (west's values do not change), posts a ``CertificatesRevoked`` Event
and counts it; a restarted atlasd still holds the revocation (Secret atlas-revocations).
East's Envoy redeployed from the new values answers again."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx2
import pytest

from atlasd import revocation
from tests.harness.envoy import Envoy
from tests.harness.kube import ApiServer
from tests.harness.netns import DownstreamHost, downstream_host
from tests.harness.wait import wait_until
from tests.integration.daemon_helpers import (
    Atlasd,
    answers_through_chain,
    cli,
    stored_secret_data,
    values_bootstrap,
    values_of,
)

pytestmark = pytest.mark.integration

# Two /30s of TEST-NET-2 (the migration test uses 198.51.100.0/30).
HOSTS = {"east": ("198.51.100.9", "198.51.100.10"), "west": ("198.51.100.13", "198.51.100.14")}
OBS_IP = HOSTS["east"][0]  # where downstream Envoys reach the observability Envoy


def _metric(daemon: Atlasd, name: str) -> float | None:
    for line in httpx2.get(f"{daemon.url}/metrics", timeout=5).text.splitlines():
        if line.split(" ")[0] == name:
            return float(line.split(" ")[1])
    return None


def test_revoke_refuses_the_cluster_reissues_and_redeploy_restores(
    apiserver: ApiServer,
    namespace: str,
    tmp_path: Path,
    envoy_factory: Callable[[dict[str, Any], str], Envoy],
) -> None:
    kube = (f"--kubeconfig={apiserver.admin_kubeconfig}", f"--namespace={namespace}")
    with contextlib.ExitStack() as stack:
        hosts: dict[str, DownstreamHost] = {
            c: stack.enter_context(downstream_host(host_ip=h, ns_ip=n, reach=[OBS_IP]))
            for c, (h, n) in HOSTS.items()
        }
        daemon_args = (*kube, "--no-leader-election", f"--envoy-ads-address={OBS_IP}",
                       f"--envoy-address={OBS_IP}")  # fmt: skip
        atlasd = Atlasd(tmp_path / "atlasd", *daemon_args).start()
        stack.callback(lambda: atlasd.proc.stop())
        envoys: dict[str, Envoy] = {}
        for c, host in hosts.items():
            prom = host.prometheus(tmp_path / c)
            stack.callback(prom.stop)
            prom.start()
            cli("cluster", "add", c, "--external-ip", host.ns_ip,
                "--annotation", "goatlas.io/prometheus-service=localhost",
                "--annotation", f"goatlas.io/prometheus-service-port={prom.port}", *kube)  # fmt: skip
        obs_values = wait_until(
            lambda: values_of(apiserver, namespace, "atlas-envoy-values"), timeout=60, what="values"
        )
        obs = envoy_factory(values_bootstrap(obs_values), "atlas")
        obs.wait_ready(timeout=60)
        before: dict[str, bytes] = {}
        for c, host in hosts.items():
            before[c] = wait_until(
                lambda c=c: values_of(apiserver, namespace, f"{c}-envoy-values"),
                timeout=60,
                what=f"{c}'s values",
            )
            envoys[c] = host.envoy(values_bootstrap(before[c]), c, tmp_path / c)
            stack.callback(envoys[c].stop)
            envoys[c].start().wait_ready(timeout=60)
        for c in hosts:
            wait_until(
                lambda c=c: answers_through_chain(c),
                timeout=60,
                what=f"{c} answers through the chain",
            )

        stop = threading.Event()
        west: list[bool] = []

        def loop() -> None:
            while not stop.is_set():
                west.append(answers_through_chain("west"))

        thread = threading.Thread(target=loop, daemon=True)
        thread.start()
        stack.callback(thread.join)
        stack.callback(stop.set)

        identity = stored_secret_data(apiserver, namespace, "east-atlas-identity")
        assert identity is not None
        old = {
            kind: revocation.pem_fingerprint(identity[f"{kind}.crt"]) for kind in revocation.KINDS
        }
        out = cli("cluster", "revoke", "east", *kube).stdout
        written = time.monotonic()
        assert "cluster east: revoked its server certificate serial" in out
        assert f"Secret {namespace}/east-envoy-values" in out
        wait_until(
            lambda: not answers_through_chain("east"),
            timeout=10,
            interval=0.05,
            what="the observability Envoy refuses east's revoked certificate",
        )
        print(f"revoke written -> refused: {time.monotonic() - written:.2f} s")
        assert (
            obs.stats("cluster.east-prom.ssl.fail_verify_error").get(
                "cluster.east-prom.ssl.fail_verify_error", 0
            )
            > 0
        )
        # The entries are stored, as the CLI wrote them.
        stored = stored_secret_data(apiserver, namespace, "atlas-revocations")
        assert stored is not None
        entries, problems = revocation.parse(stored[revocation.REVOCATIONS_KEY])
        assert problems == [] and {e.sha256 for e in entries} == set(old.values())

        # /status says it per cluster (and `atlasd status` beside the expiry).
        def revoked_in_status() -> dict[str, int]:
            return {c["name"]: c["revoked_certificates"] for c in atlasd.status()["clusters"]}

        wait_until(
            lambda: revoked_in_status().get("east") == len(old),
            timeout=30,
            what="/status counting east's revoked certificates",
        )
        assert revoked_in_status().get("west") == 0

        # atlasd re-issues into east's values only, says so, counts it.
        new_values = wait_until(
            lambda: (
                (v := values_of(apiserver, namespace, "east-envoy-values")) != before["east"] and v
            ),
            timeout=30,
            what="east's values re-issued",
        )
        assert values_of(apiserver, namespace, "west-envoy-values") == before["west"]
        fresh = stored_secret_data(apiserver, namespace, "east-atlas-identity")
        assert fresh is not None
        assert not set(old.values()) & {
            revocation.pem_fingerprint(fresh[f"{k}.crt"]) for k in revocation.KINDS
        }

        def event() -> dict[str, Any] | None:
            with apiserver.admin() as c:
                items = c.get(f"/api/v1/namespaces/{namespace}/events").json()["items"]
            found = [e for e in items if e["reason"] == "CertificatesRevoked"]
            return found[0] if found else None

        ev = wait_until(event, timeout=30, what="a CertificatesRevoked Event")
        assert ev["involvedObject"]["name"] == "east"
        assert "east-envoy-values" in ev["message"] and "BEGIN" not in ev["message"]
        assert _metric(atlasd, "atlasd_revoked_certificates") == 2
        assert _metric(atlasd, "atlasd_revoked_reissued_total") == 2
        # East's Envoy (its bootstrap certificate revoked) is refused on xDS.
        wait_until(
            lambda: (
                "client certificate" in envoys["east"].log_text()
                and "revoked" in envoys["east"].log_text()
            ),
            timeout=30,
            what="east's Envoy refused on xDS",
        )
        assert not any(e["node"] == "east" for e in atlasd.status().get("envoys") or [])

        # A restarted atlasd holds the revocation: the state is in the API server.
        atlasd.proc.stop()
        atlasd = Atlasd(tmp_path / "atlasd2", *daemon_args, ads_port=atlasd.ads_port).start()
        wait_until(
            lambda: _metric(atlasd, "atlasd_revoked_certificates") == 2,
            timeout=30,
            what="the revocation read back after a restart",
        )
        assert not answers_through_chain("east")

        # Redeploy east from its new values: it answers again.
        envoys["east"].stop()
        assert isinstance(new_values, bytes)
        redeployed = hosts["east"].envoy(
            values_bootstrap(new_values), "east-redeployed", tmp_path / "east"
        )
        stack.callback(redeployed.stop)
        redeployed.start().wait_ready(timeout=60)
        wait_until(
            lambda: answers_through_chain("east"),
            timeout=60,
            what="east answers after the redeploy",
        )
        stop.set()
        thread.join()
        assert len(west) > 10
        assert all(west), f"{west.count(False)} of {len(west)} requests to west failed"
        # Errors are one line naming what is wrong.
        nope = cli("cluster", "revoke", "nope", *kube, check=False)
        assert nope.returncode == 1
        assert nope.stderr.strip() == f"error: no cluster named 'nope' in namespace {namespace}"
