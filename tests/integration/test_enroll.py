"""Enrollment end to end: a real API server, ``atlasd run`` with its enrollment endpoint,
a real observability Envoy from ``atlas-envoy-values``, and a downstream cluster (a network
namespace with a real Prometheus) whose Envoy reads only what ``atlasd agent`` wrote:

- cluster east, added in the compatible mode (atlasd stores its keys), is switched to
  enrollment by its annotation: ``<c>-atlas-identity`` is deleted and ``east-envoy-values``
  hold no key, only the agent's settings and a bootstrap reading the agent's files;
- ``atlasd cluster token east`` mints a token; ``atlasd agent --once``, started as the
  values say, enrolls with it (keys made on the downstream side); a real Envoy started from
  the values' own bootstrap gets its listeners over ADS through the observability Envoy's
  10900 (mTLS with the agent's client certificate), serves 11904 with the agent's server
  certificate through SDS from the files (``watched_directory``), and a query through the
  observability Envoy's ``/prom/east/`` answers (the mTLS chain: atlasd's CA, east's SAN);
- the agent left running renews the 30-second certificates over mTLS and the same Envoy
  process serves the new one (no restart), the chain still answering;
- the token replayed, or used for another cluster, is refused and changes nothing;
- none of the downstream key's bytes is in any Secret or ConfigMap of the API server, nor
  in atlasd's log, its Events, ``/status`` or ``/metrics``; no ``east-atlas-identity``
  exists and east's values hold no PEM block at all.
"""

from __future__ import annotations

import base64
import contextlib
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx2
import pytest
import yaml
from cryptography import x509
from cryptography.exceptions import InvalidSignature

from atlasd.enroll import agent
from tests.harness.envoy import Envoy
from tests.harness.kube import ApiServer
from tests.harness.net import free_port
from tests.harness.netns import downstream_host
from tests.harness.procs import Proc
from tests.harness.wait import wait_until
from tests.integration.daemon_helpers import (
    ATLASD,
    Atlasd,
    answers_through_chain,
    cli,
    join_token,
    pem_serial,
    served_serials,
    values_bootstrap,
    values_of,
)

pytestmark = pytest.mark.integration

# A /30 of TEST-NET-2 of its own (the revoke test uses .8/30 and .12/30).
HOST_IP, NS_IP = "198.51.100.17", "198.51.100.18"


def _secret(apiserver: ApiServer, namespace: str, name: str) -> bool:
    with apiserver.admin() as c:
        return c.get(f"/api/v1/namespaces/{namespace}/secrets/{name}").status_code == 200


def _listeners(envoy: Envoy) -> set[str]:
    """The names of the listeners the Envoy runs (admin /listeners)."""
    doc = httpx2.get(f"{envoy.admin_url}/listeners?format=json", timeout=5).json()
    return {str(s.get("name")) for s in doc.get("listener_statuses", [])}


def _everything_stored(apiserver: ApiServer) -> bytes:
    out = []
    with apiserver.admin() as c:
        for kind in ("secrets", "configmaps", "events"):
            out.append(c.get(f"/api/v1/{kind}").content)
    return b"\n".join(out)


def test_an_agent_enrolls_renews_and_its_key_stays_home(
    apiserver: ApiServer,
    namespace: str,
    tmp_path: Path,
    envoy_factory: Callable[[dict[str, Any], str], Envoy],
) -> None:
    kube = (f"--kubeconfig={apiserver.admin_kubeconfig}", f"--namespace={namespace}")
    enroll_port = free_port()
    server = f"127.0.0.1:{enroll_port}"
    certs = tmp_path / "east-certs"
    with contextlib.ExitStack() as stack:
        host = stack.enter_context(downstream_host(host_ip=HOST_IP, ns_ip=NS_IP, reach=[HOST_IP]))
        atlasd = Atlasd(
            tmp_path / "atlasd", *kube, "--no-leader-election", f"--envoy-ads-address={HOST_IP}",
            f"--envoy-address={HOST_IP}", f"--enroll-listen={server}", "--enroll-cert-seconds=30",
            f"--enroll-address={server}", f"--enroll-cert-dir={certs}",
        ).start()  # fmt: skip
        stack.callback(atlasd.proc.stop)
        prom = host.prometheus(tmp_path / "prom")
        stack.callback(prom.stop)
        prom.start()
        # East starts in the compatible mode (the CLI's default): atlasd makes its keys.
        cli("cluster", "add", "east", "--external-ip", NS_IP,
            "--annotation", "goatlas.io/prometheus-service=localhost",
            "--annotation", f"goatlas.io/prometheus-service-port={prom.port}", *kube)  # fmt: skip
        cli("cluster", "add", "west", "--external-ip", "198.51.100.30", *kube)
        obs_values = wait_until(
            lambda: values_of(apiserver, namespace, "atlas-envoy-values"), timeout=60, what="values"
        )
        obs = envoy_factory(values_bootstrap(obs_values), "atlas")
        obs.wait_ready(timeout=60)
        wait_until(lambda: _secret(apiserver, namespace, "east-atlas-identity"), timeout=60,
                   what="east's stored identity (compatible mode)")  # fmt: skip
        assert b"PRIVATE KEY" in (values_of(apiserver, namespace, "east-envoy-values") or b"")
        with apiserver.admin() as c:
            stored = c.get(f"/api/v1/namespaces/{namespace}/secrets/east-atlas-identity").json()
        # The compatible certificate, whose key copies of the old values still hold:
        # revoke must reach it after the switch too (checked at the end).
        compatible_serial = format(
            x509.load_pem_x509_certificate(
                base64.b64decode(stored["data"]["server.crt"])
            ).serial_number,
            "x",
        )

        # Switched to enrollment by its annotation: the stored keys go, the values carry
        # none (no PEM block at all), only the agent's settings and a file-SDS bootstrap.
        apiserver.kubectl("-n", namespace, "annotate", "service", "east",
                          "goatlas.io/enrollment=true")  # fmt: skip
        wait_until(lambda: not _secret(apiserver, namespace, "east-atlas-identity"), timeout=60,
                   what="east's stored identity deleted")  # fmt: skip
        values_raw = wait_until(
            lambda: (
                (v := values_of(apiserver, namespace, "east-envoy-values")) and b"agent" in v and v
            ),
            timeout=60,
            what="east's enrollment values",
        )
        assert isinstance(values_raw, bytes) and b"-----BEGIN" not in values_raw
        values = yaml.safe_load(values_raw)
        assert set(values["files"]) == {"envoy.yaml"}
        assert values["agent"] == {"enabled": True, "cluster": "east", "namespace": namespace,
                                   "server": server, "certDir": str(certs)}  # fmt: skip
        assert _secret(apiserver, namespace, "west-atlas-identity")  # west stays compatible

        token = join_token(kube, "east")
        # The agent as the envoy chart starts it: from the values' agent settings.
        wanted = values["agent"]
        agent_args = ("agent", f"--server={wanted['server']}", f"--cluster={wanted['cluster']}",
                      f"--namespace={wanted['namespace']}")  # fmt: skip
        assert wanted["certDir"] == str(certs)
        cli(*agent_args, f"--dir={certs}", "--once", env={"ATLAS_JOIN_TOKEN": token})
        key_pems = {k: (certs / f"{k}-key.pem").read_bytes() for k in ("server", "client")}
        assert all(b"PRIVATE KEY" in pem for pem in key_pems.values())

        # Replayed, or for another cluster: refused, nothing written.
        replay = cli(*agent_args, f"--dir={tmp_path / 'replay'}", "--once", check=False,
                     env={"ATLAS_JOIN_TOKEN": token})  # fmt: skip
        assert replay.returncode == 1 and "already used" in replay.stderr
        assert not (tmp_path / "replay" / "client.pem").exists()
        west_token = cli("cluster", "token", "west", *kube).stdout.strip()
        other = cli(*agent_args, f"--dir={tmp_path / 'other'}", "--once", check=False,
                    env={"ATLAS_JOIN_TOKEN": west_token})  # fmt: skip
        assert other.returncode == 1 and "not for cluster 'east'" in other.stderr
        assert token not in other.stderr + replay.stderr

        # A real Envoy from the values' own bootstrap: its listeners over ADS through the
        # observability Envoy's 10900 (the agent's client certificate), 11904 served with
        # the agent's server certificate from the files; the chain answers.
        downstream = host.envoy(yaml.safe_load(values["files"]["envoy.yaml"]), "east",
                                tmp_path / "east")  # fmt: skip
        stack.callback(downstream.stop)
        downstream.start().wait_ready(timeout=60)
        wait_until(
            lambda: answers_through_chain("east"), timeout=60, what="east answers through the chain"
        )
        assert _listeners(downstream) >= {"thanos", "prometheus"}  # from xDS, not the bootstrap
        (east_status,) = [c for c in atlasd.status()["clusters"] if c["name"] == "east"]
        assert east_status["mode"] == "enrollment"
        first = pem_serial(certs / "server.pem")
        assert first in served_serials(downstream.admin_url, "east")
        pid = downstream.proc.pid

        # The agent stays: it renews (30 s certificates, at 2/3) over mTLS; the same Envoy
        # serves the new certificate and the chain keeps answering.
        follower = Proc("agent-east", [*ATLASD, *agent_args, f"--dir={certs}", "--bundle-interval=2"],
                        log_dir=tmp_path, env={"ATLAS_JOIN_TOKEN": ""})  # fmt: skip
        stack.callback(follower.stop)
        follower.start()
        wait_until(lambda: pem_serial(certs / "server.pem") != first, timeout=60,
                   what="the agent renewed")  # fmt: skip
        second = pem_serial(certs / "server.pem")
        wait_until(lambda: second in served_serials(downstream.admin_url, "east"), timeout=30,
                   what="the Envoy serves the renewed certificate")  # fmt: skip
        downstream.proc.check_running()
        assert downstream.proc.pid == pid  # the same process: no restart
        wait_until(
            lambda: answers_through_chain("east"),
            timeout=30,
            what="the chain answers after renewal",
        )
        # A CA rotation: the agent sees the new bundle, renews with the new CA at once, and
        # the same Envoy serves the new certificate; the chain keeps answering.
        bundle_before = (certs / "ca.pem").read_bytes()
        before_rotation = pem_serial(certs / "server.pem")
        apiserver.kubectl("-n", namespace, "annotate", "secret", "atlas-ca",
                          "goatlas.io/ca-rotate=enroll-test")  # fmt: skip
        wait_until(lambda: (certs / "ca.pem").read_bytes() != bundle_before, timeout=60,
                   what="the agent wrote the rotated bundle")  # fmt: skip
        with apiserver.admin() as c:
            ca_doc = c.get(f"/api/v1/namespaces/{namespace}/secrets/atlas-ca").json()
        new_ca = x509.load_pem_x509_certificate(base64.b64decode(ca_doc["data"]["ca.pem"]))

        def signed_by_new_ca() -> bool:
            leaf = x509.load_pem_x509_certificate((certs / "server.pem").read_bytes())
            try:
                leaf.verify_directly_issued_by(new_ca)
            except (ValueError, TypeError, InvalidSignature):
                return False
            return True

        wait_until(signed_by_new_ca, timeout=60, what="renewed with the new CA")
        rotated = pem_serial(certs / "server.pem")
        assert rotated not in (before_rotation, first)
        wait_until(lambda: rotated in served_serials(downstream.admin_url, "east"), timeout=30,
                   what="the Envoy serves the certificate of the new CA")  # fmt: skip
        assert downstream.proc.pid == pid
        wait_until(
            lambda: answers_through_chain("east"),
            timeout=60,
            what="the chain answers after the rotation",
        )
        key_pems.update(
            {f"renewed-{k}": (certs / f"{k}-key.pem").read_bytes() for k in ("server", "client")}
        )
        assert "renewed" in follower.log_text() and token not in follower.log_text()

        # None of the downstream keys' bytes anywhere on the observability side; no
        # identity of east stored, and its values hold no PEM block at all.
        assert not _secret(apiserver, namespace, "east-atlas-identity")
        assert b"-----BEGIN" not in (values_of(apiserver, namespace, "east-envoy-values") or b"-")
        stored = _everything_stored(apiserver)
        assert b"KeysDeleted" in stored  # the switch said what it did, on Service east
        sources = {
            "Secrets, ConfigMaps and Events": stored,
            "atlasd's log": atlasd.log_text().encode(),
            "/status": httpx2.get(f"{atlasd.url}/status", timeout=10).content,
            "/metrics": httpx2.get(f"{atlasd.url}/metrics", timeout=10).content,
        }
        for name, pem in key_pems.items():
            body = b"".join(pem.splitlines()[1:-1])  # the base64 of the DER key
            lines = [line for line in pem.splitlines()[1:-1] if len(line) >= 40]
            for where, data in sources.items():
                flat = data.replace(b"\\n", b"").replace(b"\n", b"")
                assert body not in flat, f"{name} key found in {where}"
                assert not any(line in data for line in lines), f"{name} key found in {where}"
                assert base64.b64encode(pem) not in data, f"{name} key found in {where}"
        for where, data in sources.items():
            assert token.split(".")[1].encode() not in data, f"the token's secret in {where}"
        assert os.stat(certs / "server-key.pem").st_mode & 0o077 in (0, 0o040)

        # Revoked (with --rekey): the observability Envoy refuses east's enrolled
        # certificate, the agent's renewal with it is refused, and the fresh token enrolls.
        serial = pem_serial(certs / "server.pem")
        revoked = cli("cluster", "revoke", "east", "--rekey", *kube)
        assert f"serial {int(serial, 16)}" in revoked.stderr
        # ... and the certificate of the keys deleted at the switch.
        assert f"serial {int(compatible_serial, 16)}" in revoked.stderr
        fresh = revoked.stdout.strip()
        assert fresh.split(".")[0] != token.split(".")[0]
        wait_until(lambda: not answers_through_chain("east"), timeout=10, interval=0.05,
                   what="east's revoked certificate refused")  # fmt: skip
        wait_until(lambda: "certificate is revoked" in follower.log_text(), timeout=60,
                   what="the agent's renewal refused")  # fmt: skip
        assert pem_serial(certs / "server.pem") == serial  # nothing was issued to it
        follower.stop()
        again = tmp_path / "east-rekeyed"
        cli(*agent_args, f"--dir={again}", "--once", env={"ATLAS_JOIN_TOKEN": fresh})
        assert pem_serial(again / "server.pem") != serial

        # Removed: what it enrolled is revoked first (re-added, it would not take it back),
        # then its enrollment Secrets go with it; west's stay.
        unused = join_token(kube, "east")
        removed = cli("cluster", "remove", "east", *kube)
        assert f"serial {int(pem_serial(again / 'server.pem'), 16)}" in removed.stderr
        assert "enrollment Secret(s)" in removed.stderr

        def secret_names() -> set[str]:
            with apiserver.admin() as c:
                left = c.get(f"/api/v1/namespaces/{namespace}/secrets").json()["items"]
            return {s["metadata"]["name"] for s in left}

        # Its values go too, deleted by atlasd once it sees the Service gone.
        wait_until(lambda: not {n for n in secret_names() if n.startswith("east-")},
                   timeout=30, what="every Secret of east gone")  # fmt: skip
        names = secret_names()
        assert f"atlas-join-{unused.split('.')[0]}" not in names
        assert f"atlas-join-{west_token.split('.')[0]}" in names


OVERSIZED = b"<announced 64 KiB, never sent>"


def _hostile(server: str, calls: list[tuple[str, str, bytes]]) -> list[tuple[int, str]]:
    """Raw requests to the endpoint (concurrently), answered (status, error) each; 0 for
    a connection closed without an answer. A body of ``OVERSIZED`` is announced (its
    Content-Length) and never sent: the endpoint must refuse it from the header alone."""
    import json
    import ssl

    import h11
    import trio

    host, _, port = server.rpartition(":")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    out: list[tuple[int, str]] = [(0, "")] * len(calls)

    async def one(i: int, method: str, path: str, body: bytes) -> None:
        stream = trio.SSLStream(await trio.open_tcp_stream(host, int(port)), ctx)
        conn = h11.Connection(h11.CLIENT)
        length = 64 * 1024 if body is OVERSIZED else len(body)
        head = [("host", "x"), ("content-length", str(length)), ("connection", "close")]
        try:
            await stream.send_all(
                conn.send(h11.Request(method=method, target=path, headers=head)) or b""
            )
            if body is not OVERSIZED:
                await stream.send_all(conn.send(h11.Data(data=body)) or b"")
                await stream.send_all(conn.send(h11.EndOfMessage()) or b"")
            data = b""
            while chunk := await stream.receive_some(65536):
                data += chunk
        except (trio.BrokenResourceError, ssl.SSLError):
            return
        finally:
            await trio.aclose_forcefully(stream)
        if b"\r\n\r\n" in data:
            status = int(data.split(b" ", 2)[1])
            out[i] = (status, json.loads(data.split(b"\r\n\r\n", 1)[1]).get("error", ""))

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            for i, (method, path, body) in enumerate(calls):
                nursery.start_soon(one, i, method, path, body)

    trio.run(main)
    return out


def test_hostile_enrollments_are_refused_and_change_nothing(
    apiserver: ApiServer, namespace: str, tmp_path: Path
) -> None:
    """Against `atlasd run`: garbage, an oversized body, CSRs naming another cluster or with
    another key type, a burst from one address (429): each refused with its reason, never
    echoing the token; the token stays good and then enrolls."""
    import json

    from cryptography.hazmat.primitives.asymmetric import ec

    from atlasd.enroll import csr as csrs
    from atlasd.model import Settings

    kube = (f"--kubeconfig={apiserver.admin_kubeconfig}", f"--namespace={namespace}")
    server = f"127.0.0.1:{free_port()}"
    atlasd = Atlasd(tmp_path / "atlasd", *kube, "--no-leader-election",
                    f"--enroll-listen={server}").start()  # fmt: skip
    try:
        for c, ip in (("east", "198.51.100.30"), ("west", "198.51.100.31")):
            cli("cluster", "add", c, "--external-ip", ip, *kube)
        token = join_token(kube, "east")
        settings = Settings(namespace=namespace)
        # `cluster add --enroll`: the cluster, and its token alone on stdout.
        added = cli("cluster", "add", "north", "--external-ip", "198.51.100.32", "--enroll", *kube)
        from atlasd.enroll import token as join_tokens

        assert join_tokens.parse(added.stdout).pin == join_tokens.parse(token).pin
        assert "cluster north" in added.stderr
        with apiserver.admin() as c:
            north = c.get(f"/api/v1/namespaces/{namespace}/services/north").json()
        assert north["metadata"]["annotations"]["goatlas.io/enrollment"] == "true"

        def enroll_doc(cluster_names: str, *, key: object = None) -> bytes:
            _, requests = agent.new_request(cluster_names, settings)
            if key is not None:
                from tests.unit.enroll.test_csr import make_csr

                requests["server"] = make_csr("east", ("east", f"east.{namespace}.atlas"), key=key)
            return json.dumps({"cluster": "east", "token": token, "csrs": requests}).encode()

        hostile = [
            ("POST", "/v1/enroll", b"\x00garbage"),
            ("POST", "/v1/enroll", OVERSIZED),
            ("POST", "/v1/enroll", enroll_doc("west")),
            ("POST", "/v1/enroll", enroll_doc("east", key=ec.generate_private_key(ec.SECP384R1()))),
            ("POST", "/v1/renew", enroll_doc("east")),  # no client certificate
            (
                "POST",
                "/v1/enroll",
                json.dumps({"cluster": "east", "token": "x.y.z", "csrs": {}}).encode(),
            ),
        ]
        answers = _hostile(server, hostile)
        assert [s for s, _ in answers] == [400, 400, 400, 400, 401, 401], answers
        said = [e for _, e in answers]
        assert "not JSON" in said[0] and "larger than" in said[1]
        assert "must be 'east'" in said[2] and "P-256" in said[3]
        assert "client certificate" in said[4] and "malformed join token" in said[5]
        assert all(token not in e for e in said)
        assert csrs.MAX_CSR_BYTES < 64 * 1024

        # A burst from one address: refused with 429 past the bucket, nothing else done.
        burst = _hostile(server, [("GET", "/v1/ca", b"")] * 120)
        assert any(s == 429 for s, _ in burst) and any(s == 200 for s, _ in burst)

        # Nothing changed: the token still enrolls (once).
        certs = tmp_path / "certs"
        agent_args = ("agent", f"--server={server}", "--cluster=east", f"--namespace={namespace}")
        wait_until(
            lambda: (
                cli(
                    *agent_args,
                    f"--dir={certs}",
                    "--once",
                    check=False,
                    env={"ATLAS_JOIN_TOKEN": token},
                ).returncode
                == 0
            ),
            timeout=30,
            what="the token enrolls once the burst's bucket refilled",
        )
        assert (certs / "client.pem").exists()
        log = atlasd.log_text()
        assert "refused" in log and token.split(".")[1] not in log
    finally:
        atlasd.proc.stop()


def test_a_replaced_pod_restores_its_credentials_and_renews_without_a_token(
    apiserver: ApiServer, namespace: str, tmp_path: Path, helm: Callable[..., str]
) -> None:
    """`--state-secret` against the real API server, with the envoy chart's own Role for
    the agent's ServiceAccount (rendered by helm): the init container enrolls and saves;
    a replacement pod (an empty directory, no token) restores, and its sidecar renews over
    mTLS at once (keys of its own), saving them; the account can do nothing else."""
    kube = (f"--kubeconfig={apiserver.admin_kubeconfig}", f"--namespace={namespace}")
    server = f"127.0.0.1:{free_port()}"
    edge = f"{namespace}-edge"  # the downstream cluster's namespace (its own API server in life)
    apiserver.create_namespace(edge)
    chart = Path(__file__).resolve().parents[2] / "charts" / "envoy"
    rendered = helm(
        "template", "atlas-envoy", str(chart), "-n", edge, "--show-only", "templates/agent.yaml",
        "--set", "agent.enabled=true,agent.cluster=east", "--set", f"agent.server={server}",
    )  # fmt: skip
    [role] = [d for d in yaml.safe_load_all(rendered) if d and d["kind"] == "Role"]
    sa_kubeconfig = apiserver.service_account_kubeconfig("atlas-envoy-agent", edge, role["rules"])
    state_name = role["rules"][0]["resourceNames"][0]

    def state() -> dict[str, bytes]:
        with apiserver.admin() as c:
            r = c.get(f"/api/v1/namespaces/{edge}/secrets/{state_name}")
        r.raise_for_status()
        return {k: base64.b64decode(v) for k, v in r.json()["data"].items()}

    atlasd = Atlasd(tmp_path / "atlasd", *kube, "--no-leader-election",
                    f"--enroll-listen={server}").start()  # fmt: skip
    with contextlib.ExitStack() as stack:
        stack.callback(atlasd.proc.stop)
        cli("cluster", "add", "east", "--external-ip", "198.51.100.40", *kube)
        token = join_token(kube, "east")
        env = {"ATLAS_KUBECONFIG": str(sa_kubeconfig), "ATLAS_STATE_SECRET": state_name}
        agent_args = ("agent", f"--server={server}", "--cluster=east", f"--namespace={namespace}")

        # The first pod's init container: enrolls, saves (the token's id, never its secret).
        first = tmp_path / "pod-1"
        cli(*agent_args, f"--dir={first}", "--once", env={**env, "ATLAS_JOIN_TOKEN": token})
        saved = state()
        assert saved["token-id"].decode() == token.split(".")[0]
        assert token.split(".")[1].encode() not in b"".join(saved.values())
        assert {k: saved[k] for k in agent.FILES} == agent.read(first)

        # Its replacement: an empty directory and no token (spent). Restored, not enrolled.
        second = tmp_path / "pod-2"
        restored = cli(*agent_args, f"--dir={second}", "--once",
                       env={**env, "ATLAS_JOIN_TOKEN": ""})  # fmt: skip
        assert "restored" in restored.stderr and token not in restored.stderr
        assert agent.read(second) == agent.read(first)
        # Without the Secret's help the spent token is refused: restoring is what works.
        again = cli(*agent_args, f"--dir={tmp_path / 'no-state'}", "--once", check=False,
                    env={"ATLAS_JOIN_TOKEN": token})  # fmt: skip
        assert again.returncode == 1 and "already used" in again.stderr

        # Its sidecar renews at once over mTLS (the restored certificate authenticates it),
        # not at 2/3 of the certificate's day: keys of its own, saved for the next pod.
        shared = pem_serial(second / "client.pem")
        sidecar = Proc("agent-east-2", [*ATLASD, *agent_args, f"--dir={second}"],
                       log_dir=tmp_path, env={**env, "ATLAS_JOIN_TOKEN": ""})  # fmt: skip
        stack.callback(sidecar.stop)
        sidecar.start()
        wait_until(lambda: pem_serial(second / "client.pem") != shared, timeout=60,
                   what="the restored pod renewed")  # fmt: skip
        mine = agent.read(second)
        assert mine["client-key.pem"] != agent.read(first)["client-key.pem"]
        wait_until(lambda: state()["client.pem"] == mine["client.pem"], timeout=30,
                   what="the renewed credentials saved")  # fmt: skip
        assert state()["client-key.pem"] == mine["client-key.pem"]
        assert not (second / agent.RESTORED_MARK).exists()
        # The kubelet stops the sidecar with SIGTERM: it stops cleanly (as a container's
        # PID 1 it would otherwise ignore the signal and hold the pod for its grace period).
        sidecar.signal(signal.SIGTERM)
        wait_until(lambda: not sidecar.running(), timeout=30, what="the sidecar stopped")
        assert sidecar.popen is not None and sidecar.popen.returncode == 0
        assert "SIGTERM: stopping" in sidecar.log_text()

        # The chart's Role: its one Secret (get, update) and create; nothing else.
        sa = f"system:serviceaccount:{edge}:atlas-envoy-agent"

        def can(*what: str, ns: str = edge) -> str:
            return apiserver.kubectl("auth", "can-i", "--as", sa, *what, "-n", ns,
                                     check=False).strip()  # fmt: skip

        assert can("get", f"secrets/{state_name}") == can("update", f"secrets/{state_name}")
        assert can("get", f"secrets/{state_name}") == "yes" == can("create", "secrets")
        assert can("get", "secrets/other") == "no" == can("list", "secrets")
        assert can("delete", f"secrets/{state_name}") == "no"
        assert can("get", f"secrets/{state_name}", ns=namespace) == "no"
