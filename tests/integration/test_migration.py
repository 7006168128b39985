"""docs/migration.md, run: from the objects the original Atlas wrote to atlasd leading,
with real Envoys serving a request loop through the chain.

1. The original's world: its Secrets (an RSA-4096 PKCS#1 CA, one shared server and one
   shared client certificate for every cluster), its headless cluster Service, its
   values, and its controller's ConfigMap lock, renewed every 2 s by a live holder. A
   downstream Envoy runs from the original's values, with the listener the original's
   ADS served it (Envoy keeps what it was served when its xDS server goes away).
2. atlasd starts beside it: it serves, but does not lead (``/status`` and the log say
   why) and writes nothing.
3. The original stops renewing (crashed): one lease duration after the last renewal
   atlasd observed, atlasd leads: it keeps the CA and re-issues the leaves.
4. The observability Envoy, started from the original chart's bootstrap (plaintext, no
   token), is refused by atlasd (PERMISSION_DENIED: it cannot show it is the forwarder);
   redeployed from ``atlas-envoy-values`` it dials atlasd over mTLS and takes atlasd's
   configuration. The downstream Envoy still presents the shared certificate, which
   names no cluster: the observability Envoy refuses it (this is the window the guide
   tells you to keep short), while the downstream Envoy itself keeps serving.
5. The downstream Envoy is redeployed from atlasd's values: the request loop through
   observability Envoy -> downstream Envoy -> Prometheus succeeds every time.

The API server refuses a loopback external IP, so the downstream side (its Envoy and
its Prometheus) runs in a network namespace this test makes, joined to the host by a
veth pair on TEST-NET-2 addresses: no packet leaves the machine.
"""

from __future__ import annotations

import base64
import datetime as dt
import functools
import json
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from atlasd.kube.legacy_lock import LEADER_ANNOTATION
from tests.harness.envoy import Envoy
from tests.harness.kube import ApiServer
from tests.harness.netns import DownstreamHost, downstream_host
from tests.harness.wait import wait_until
from tests.integration.daemon_helpers import Atlasd, cli
from tests.unit.reconcile.pkitools import original_ca

pytestmark = pytest.mark.integration

NOW = dt.datetime.now(dt.UTC)
HOST_IP = "198.51.100.1"  # the observability side (this host's end of the veth pair)
DOWNSTREAM_IP = "198.51.100.2"  # the downstream cluster (inside the namespace)
# A wrangler original started with CATTLE_ELECTION_LEASE_DURATION=10s (the default is
# 45 s): the same rule, a shorter test.
LEASE_SECONDS = 10


@functools.cache
def _leaf_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=4096)


def _original_leaf(ca_cert: bytes, ca_key: bytes, cn: str, usage: x509.ObjectIdentifier) -> bytes:
    """A leaf as the original's generateCert made it: RSA-4096, a CN and no SAN."""
    ca = x509.load_pem_x509_certificate(ca_cert)
    signer = serialization.load_pem_private_key(ca_key, password=None)
    assert isinstance(signer, rsa.RSAPrivateKey)
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "ekristen.github.io"),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "Atlas"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca.subject)
        .public_key(_leaf_key().public_key())
        .serial_number(int(NOW.timestamp()))
        .not_valid_before(NOW - dt.timedelta(days=1))
        .not_valid_after(NOW + dt.timedelta(days=3650))
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .sign(signer, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem() -> bytes:
    return _leaf_key().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )


def _b64(data: bytes | str) -> str:
    raw = data.encode() if isinstance(data, str) else data
    return base64.b64encode(raw).decode()


def _secret(name: str, namespace: str, data: dict[str, bytes | str], **extra: Any) -> Any:
    meta = {"name": name, "namespace": namespace, **extra.pop("meta", {})}
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": meta,
        "data": {k: _b64(v) for k, v in data.items()},
        **extra,
    }


def _indent(text: bytes | str, n: int) -> str:
    s = text.decode() if isinstance(text, bytes) else text
    return "\n".join(" " * n + line for line in s.strip().splitlines())


def _original_downstream_values(
    cluster: str, *, ca: bytes, server: bytes, client: bytes, key: bytes
) -> str:
    """``<cluster>-envoy-values`` as the original's envoy-downstream template wrote it."""
    envoy_yaml = f"""\
node:
  id: "{cluster}"
  cluster: "{cluster}"
dynamic_resources:
  ads_config:
    api_type: GRPC
    transport_api_version: V3
    set_node_on_first_message_only: true
    grpc_services:
      - envoy_grpc:
          cluster_name: xds_cluster
  lds_config:
    resource_api_version: V3
    ads: {{}}
  cds_config:
    resource_api_version: V3
    ads: {{}}
static_resources:
  clusters:
    - connect_timeout: 1s
      http2_protocol_options: {{}}
      name: xds_cluster
      type: STRICT_DNS
      load_assignment:
        cluster_name: xds_cluster
        endpoints:
          - lb_endpoints:
              - endpoint:
                  address:
                    socket_address:
                      address: {HOST_IP}
                      port_value: 10900
      transport_socket:
        name: "envoy.transport_sockets.tls"
        typed_config:
          "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
          common_tls_context:
            tls_certificate_sds_secret_configs:
              - name: client
            validation_context_sds_secret_config:
              name: validation
  secrets:
    - name: server
      tls_certificate:
        certificate_chain:
          filename: /config/server.pem
        private_key:
          filename: /config/server-key.pem
    - name: client
      tls_certificate:
        certificate_chain:
          filename: /config/client.pem
        private_key:
          filename: /config/client-key.pem
    - name: validation
      validation_context:
        trusted_ca:
          filename: /config/ca.pem
"""
    return f"""\
atlas:
  alertmanagerCount: 0
replicaCount: 1
files:
  ca.pem: |
{_indent(ca, 4)}
  server.pem: |
{_indent(server, 4)}
  server-key.pem: |
{_indent(key, 4)}
  client.pem: |
{_indent(client, 4)}
  client-key.pem: |
{_indent(key, 4)}
  envoy.yaml: |
{_indent(envoy_yaml, 4)}
"""


def _endpoints(cluster: str, host: str, port: int) -> dict[str, Any]:
    address = {"socket_address": {"address": host, "port_value": port}}
    return {
        "cluster_name": cluster,
        "endpoints": [{"lb_endpoints": [{"endpoint": {"address": address}}]}],
    }


def _served_by_the_original(prom_port: int) -> dict[str, Any]:
    """The downstream listener the original's ADS served (TLS with the static ``server``
    and ``validation`` secrets, a client certificate required), and its local cluster."""
    tls = {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
            "require_client_certificate": True,
            "common_tls_context": {
                "tls_certificate_sds_secret_configs": [{"name": "server"}],
                "validation_context_sds_secret_config": {"name": "validation"},
            },
        },
    }
    hcm = {
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": "prometheus",
            "codec_type": "AUTO",
            "route_config": {
                "virtual_hosts": [
                    {
                        "name": "all",
                        "domains": ["*"],
                        "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "prometheus"}}],
                    }
                ]
            },
            "http_filters": [
                {
                    "name": "envoy.filters.http.router",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                    },
                }
            ],
        },
    }
    return {
        "listener": {
            "name": "prometheus",
            "address": {"socket_address": {"address": "0.0.0.0", "port_value": 11904}},
            "filter_chains": [{"transport_socket": tls, "filters": [hcm]}],
        },
        "cluster": {
            "name": "prometheus",
            "type": "STATIC",
            "connect_timeout": "1s",
            "load_assignment": _endpoints("prometheus", "127.0.0.1", prom_port),
        },
    }


def _observability_bootstrap(ads_port: int) -> dict[str, Any]:
    """The original chart's observability Envoy (charts/atlas values ``envoy.templates``),
    its ADS Service now answered by atlasd."""
    return {
        "node": {"id": "atlas", "cluster": "atlas"},
        "dynamic_resources": {
            "ads_config": {
                "api_type": "GRPC",
                "transport_api_version": "V3",
                "set_node_on_first_message_only": True,
                "grpc_services": [{"envoy_grpc": {"cluster_name": "xds_cluster"}}],
            },
            "lds_config": {"resource_api_version": "V3", "ads": {}},
            "cds_config": {"resource_api_version": "V3", "ads": {}},
        },
        "static_resources": {
            "clusters": [
                {
                    "connect_timeout": "1s",
                    "typed_extension_protocol_options": {
                        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                            "explicit_http_config": {"http2_protocol_options": {}},
                        }
                    },
                    "name": "xds_cluster",
                    "type": "STRICT_DNS",
                    "load_assignment": _endpoints("xds_cluster", "127.0.0.1", ads_port),
                }
            ]
        },
    }


class OriginalLock:
    """The original controller's ConfigMap lock, renewed every 2 s while ``running``."""

    def __init__(self, apiserver: ApiServer, namespace: str, holder: str) -> None:
        self.apiserver = apiserver
        self.path = f"/api/v1/namespaces/{namespace}/configmaps/atlas"
        self.holder = holder
        self.renewals = 0
        self.last_renewal = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        record = self._record()
        with apiserver.admin() as c:
            r = c.post(
                f"/api/v1/namespaces/{namespace}/configmaps",
                json={
                    "apiVersion": "v1",
                    "kind": "ConfigMap",
                    "metadata": {"name": "atlas", "annotations": {LEADER_ANNOTATION: record}},
                },
            )
            assert r.status_code == 201, r.text
        self.last_renewal = time.monotonic()

    def _record(self) -> str:
        stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        return json.dumps(
            {
                "holderIdentity": self.holder,
                "leaseDurationSeconds": LEASE_SECONDS,
                "acquireTime": "2021-06-01T00:00:00Z",
                "renewTime": stamp,
                "leaderTransitions": self.renewals,  # changes the record on each renewal
            }
        )

    def _run(self) -> None:
        with self.apiserver.admin() as c:
            while not self._stop.wait(2.0):
                self.renewals += 1
                patch = {"metadata": {"annotations": {LEADER_ANNOTATION: self._record()}}}
                r = c.patch(
                    self.path,
                    content=json.dumps(patch),
                    headers={"Content-Type": "application/merge-patch+json"},
                )
                assert r.status_code == 200, r.text
                self.last_renewal = time.monotonic()

    def start(self) -> OriginalLock:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def _secrets(apiserver: ApiServer, namespace: str) -> dict[str, dict[str, Any]]:
    with apiserver.admin() as c:
        items = c.get(f"/api/v1/namespaces/{namespace}/secrets").json()["items"]
    return {i["metadata"]["name"]: i for i in items}


def _data(secret: dict[str, Any], key: str) -> bytes:
    return base64.b64decode(secret["data"][key])


def _mtls(tmp: Path, ca: bytes, cert: bytes, key: bytes) -> ssl.SSLContext:
    """The original observability Envoy's view: the shared client certificate, trust the
    CA, no name check (the original's certificates name no host)."""
    (tmp / "c.pem").write_bytes(cert)
    (tmp / "k.pem").write_bytes(key)
    (tmp / "ca.pem").write_bytes(ca)
    ctx = ssl.create_default_context(cafile=str(tmp / "ca.pem"))
    ctx.check_hostname = False
    ctx.load_cert_chain(str(tmp / "c.pem"), str(tmp / "k.pem"))
    return ctx


def _stat(envoy: Envoy, name: str) -> int:
    return envoy.stats(name).get(name, 0)


@pytest.fixture
def downstream() -> Iterator[DownstreamHost]:
    with downstream_host(host_ip=HOST_IP, ns_ip=DOWNSTREAM_IP) as host:
        yield host


@pytest.fixture
def lock_holder() -> Iterator[list[OriginalLock]]:
    held: list[OriginalLock] = []
    try:
        yield held
    finally:
        for lock in held:
            lock.stop()


def test_atlasd_takes_over_from_the_original_and_every_envoy_keeps_serving(
    apiserver: ApiServer,
    namespace: str,
    tmp_path: Path,
    envoy_factory: Callable[[dict[str, Any], str], Envoy],
    downstream: DownstreamHost,
    lock_holder: list[OriginalLock],
) -> None:
    started: list[Any] = []
    try:
        _migrate(apiserver, namespace, tmp_path, envoy_factory, downstream, lock_holder, started)
    finally:
        for proc in reversed(started):
            proc.stop()


def _migrate(
    apiserver: ApiServer,
    namespace: str,
    tmp_path: Path,
    envoy_factory: Callable[[dict[str, Any], str], Envoy],
    downstream: DownstreamHost,
    lock_holder: list[OriginalLock],
    started: list[Any],
) -> None:
    prom = downstream.prometheus(tmp_path)
    started.append(prom)
    prom.start()
    # -- 1. the original's world -----------------------------------------------------
    ca_secret, ca_cert, ca_key = original_ca(NOW, namespace=namespace)
    server = _original_leaf(ca_cert, ca_key, "server.atlas", ExtendedKeyUsageOID.SERVER_AUTH)
    client = _original_leaf(ca_cert, ca_key, "client.atlas", ExtendedKeyUsageOID.CLIENT_AUTH)
    key = _key_pem()
    cert_labels = {"goatlas.io/cert": "true", "goatlas.io/ca-signed": "1"}
    original_values = _original_downstream_values(
        "east", ca=ca_cert, server=server, client=client, key=key
    )
    objects: list[tuple[str, dict[str, Any]]] = [
        ("secrets", dict(ca_secret)),
        *[
            (
                "secrets",
                _secret(
                    name,
                    namespace,
                    {"ca.crt": ca_cert, "tls.crt": cert, "tls.key": key},
                    type="kubernetes.io/tls",
                    meta={"labels": cert_labels},
                ),
            )
            for name, cert in (
                ("atlas-server", server),
                ("atlas-client", client),
                ("atlas-tls", server),
            )
        ],
        ("secrets", _secret("east-envoy-values", namespace, {"values.yaml": original_values})),
        (
            "services",
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {
                    "name": "east",
                    "labels": {"goatlas.io/cluster": "true", "goatlas.io/replicas": "1"},
                    "annotations": {
                        "goatlas.io/prometheus-service": "localhost",
                        "goatlas.io/prometheus-service-port": str(prom.port),
                    },
                },
                "spec": {
                    "clusterIP": "None",
                    "externalIPs": [DOWNSTREAM_IP],
                    "ports": [
                        {"name": "prometheus", "port": 9090, "protocol": "TCP"},
                        {"name": "thanos", "port": 10901, "protocol": "TCP"},
                    ],
                },
            },
        ),
    ]
    with apiserver.admin() as c:
        for plural, obj in objects:
            r = c.post(f"/api/v1/namespaces/{namespace}/{plural}", json=obj)
            assert r.status_code == 201, r.text
    lock = OriginalLock(apiserver, namespace, "atlas-controller-7d9f8").start()
    lock_holder.append(lock)

    # The downstream Envoy, deployed from the original's values (the chart mounts
    # `files` at /config) and holding the listener the original's ADS served it.
    values = yaml.safe_load(original_values)
    config_dir = tmp_path / "east-config"
    config_dir.mkdir()
    for name, text in values["files"].items():
        (config_dir / name).write_text(text)
    boot = yaml.safe_load(values["files"]["envoy.yaml"].replace("/config/", f"{config_dir}/"))
    served = _served_by_the_original(prom.port)
    boot["static_resources"]["listeners"] = [served["listener"]]
    boot["static_resources"]["clusters"].append(served["cluster"])
    # It has long been running (not waiting 2 x 15 s for a first answer from xDS).
    for kind in ("cds_config", "lds_config"):
        boot["dynamic_resources"][kind]["initial_fetch_timeout"] = "1s"
    old_east = downstream.envoy(boot, "east-original", tmp_path)
    started.append(old_east)
    old_east.start().wait_ready(timeout=30)
    direct = f"https://{DOWNSTREAM_IP}:11904/api/v1/status/buildinfo"
    ctx = _mtls(tmp_path, ca_cert, client, key)

    def downstream_serves() -> bool:
        return httpx2.get(direct, verify=ctx, timeout=5).status_code == 200

    wait_until(downstream_serves, timeout=30, what="the original-style downstream serves")

    # -- 2. atlasd beside it: serves, does not lead, writes nothing ----------------------
    before = {
        n: s["metadata"]["resourceVersion"] for n, s in _secrets(apiserver, namespace).items()
    }
    atlasd = Atlasd(
        tmp_path / "atlasd",
        f"--kubeconfig={apiserver.admin_kubeconfig}",
        f"--namespace={namespace}",
        "--identity=atlasd-0",
        f"--envoy-ads-address={HOST_IP}",
        f"--envoy-address={HOST_IP}",
    ).start()
    try:
        blocked = wait_until(
            lambda: (atlasd.status().get("leadership") or {}).get("blocked_by"),
            timeout=30,
            what="atlasd reports it is blocked",
        )
        assert blocked == f"ConfigMap {namespace}/atlas"
        renewals = lock.renewals
        wait_until(lambda: lock.renewals >= renewals + 3, timeout=30, what="3 more renewals")
        doc = atlasd.status()
        assert doc["leader"] is False
        assert doc["leadership"]["holder"] == "atlas-controller-7d9f8"
        after = {
            n: s["metadata"]["resourceVersion"] for n, s in _secrets(apiserver, namespace).items()
        }
        assert after == before, "atlasd wrote while the original held its lock"
        with apiserver.admin() as c:
            own = c.get(f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases/atlasd")
        assert own.status_code == 404, "atlasd contended while the original held its lock"
        log = atlasd.log_text()
        assert log.count(f"not leading: the original Atlas holds ConfigMap {namespace}/atlas") == 1
        table = cli("status", "--url", atlasd.url).stdout
        assert "NOT LEADING: the original Atlas holds" in table

        # -- 3. the original stops renewing: atlasd leads after one lease duration -------
        lock.stop()
        stopped_at = lock.last_renewal
        wait_until(lambda: atlasd.status()["leader"], timeout=60, what="atlasd leads", interval=0.1)
        waited = time.monotonic() - stopped_at
        assert waited >= LEASE_SECONDS - 1, f"led {waited:.1f}s after the last renewal"
        assert atlasd.status()["leadership"]["blocked_by"] is None
        assert "no longer blocked from leading" in atlasd.log_text()

        originals = {"atlas-server": server, "atlas-client": client, "atlas-tls": server}

        def issued() -> dict[str, dict[str, Any]] | None:
            # East's identity and the shared leaves are written by different keys of the
            # reconcile, in no set order: wait for both.
            s = _secrets(apiserver, namespace)
            reissued = all(_data(s[n], "tls.crt") != cert for n, cert in originals.items())
            return s if "east-atlas-identity" in s and reissued else None

        secrets = wait_until(
            issued, timeout=60, what="atlasd issues east's identity and re-issues the leaves"
        )
        # Locals, not expressions over the Secrets: a failure must not print key material.
        kept = _data(secrets["atlas-ca"], "ca.pem") == ca_cert
        kept_key = _data(secrets["atlas-ca"], "ca-key.pem") == ca_key
        assert kept, "the CA was not kept"
        assert kept_key, "the CA's key was not kept"
        with apiserver.admin() as c:
            cm = c.get(f"/api/v1/namespaces/{namespace}/configmaps/atlas").json()
        assert json.loads(cm["metadata"]["annotations"][LEADER_ANNOTATION])["holderIdentity"] == (
            "atlas-controller-7d9f8"
        ), "atlasd must never write the original's lock"

        def new_values() -> str | None:
            raw = _data(_secrets(apiserver, namespace)["east-envoy-values"], "values.yaml")
            return raw.decode() if raw.decode() != original_values else None

        east_values = wait_until(new_values, timeout=60, what="atlasd rewrites east's values")

        # -- 4. the observability Envoy: refused on the original's bootstrap, served ----
        # once redeployed from atlas-envoy-values.
        original_obs = envoy_factory(_observability_bootstrap(atlasd.ads_port), "atlas-original")
        wait_until(
            lambda: (
                "closed: 7, node 'atlas' must present its client certificate"
                in original_obs.log_text()
            ),
            timeout=30,
            what="the original's plaintext observability bootstrap refused",
        )
        original_obs.stop()
        obs_values = yaml.safe_load(
            _data(_secrets(apiserver, namespace)["atlas-envoy-values"], "values.yaml")
        )
        obs = envoy_factory(yaml.safe_load(obs_values["files"]["envoy.yaml"]), "atlas")
        obs.wait_ready(timeout=60)
        chain = "http://127.0.0.1:10904/prom/east/api/v1/status/buildinfo"
        wait_until(
            lambda: (
                _stat(obs, "cluster.east-prom.ssl.fail_verify_san") > 0
                or httpx2.get(chain, timeout=5).status_code == 503
            ),
            timeout=30,
            what="the shared certificate refused by the observability Envoy",
        )
        assert httpx2.get(chain, timeout=5).status_code != 200
        # ... while the old downstream keeps serving what it was served.
        assert downstream_serves()
        assert old_east.proc.running()

        # -- 5. redeploy the downstream from atlasd's values -----------------------------
        old_east.stop()
        new_boot = yaml.safe_load(yaml.safe_load(east_values)["files"]["envoy.yaml"])
        new_east = downstream.envoy(new_boot, "east", tmp_path)
        started.append(new_east)
        new_east.start().wait_ready(timeout=60)
        wait_until(
            lambda: httpx2.get(chain, timeout=5).status_code == 200,
            timeout=60,
            what="the chain serves again",
        )
        codes = [httpx2.get(chain, timeout=5).status_code for _ in range(50)]
        assert codes == [200] * 50
        assert httpx2.get(chain, timeout=5).json()["status"] == "success"
    finally:
        atlasd.proc.stop()
