"""Soak: clusters churn (added, updated, removed) while real Envoys stay connected and the
world misbehaves — the API server restarted twice, etcd compacted, atlasd SIGKILLed and
restarted, the CA rotated — and at the end everything equals what the final Services imply.

Scale: ``ATLASD_SOAK_SCALE=short`` (default, CI: 80 live clusters, 10 adds + 10 updates +
10 removes per churn step, 3 steady steps at the end; ~1 min on 2 cores, 3 under load) or ``long``
(200 live clusters, 75 + 75 + 75 per step, 10 steady steps; ``bench/soak.py`` runs it).

What runs (all real programs on loopback):

- atlasd as its own process (so it can be SIGKILLed): ``python -m tests.integration.test_soak
  CONFIG`` builds ``atlasd.daemon.Daemon`` exactly as ``atlasd run`` does (leader election on
  a Lease, Kubernetes informers, ADS, zone writer), plus what ``atlasd run`` has no flag for
  and a loopback test needs: a ``ListenPlan`` giving every downstream Envoy its own loopback
  address and ports (several Envoys on one host), and a 3 s upstream connection lifetime so
  the CA rotation is crossed by fresh TLS handshakes, not only by pooled connections;
- the observability Envoy (node ``atlas``) bootstrapped from Secret ``atlas-envoy-values``,
  dialling atlasd's ADS directly over mTLS with the ``atlas`` client certificate;
- ``anchor-<k>`` downstream Envoys bootstrapped from ``anchor-<k>-envoy-values``: their xDS
  goes through the observability Envoy's TLS listener (10900), with the client certificate
  in those values; ``anchor-0`` fronts a real Prometheus;
- the last anchor is **enrolled** (``goatlas.io/enrollment: "true"``): atlasd stores no key
  of it; ``atlasd agent`` (a process of its own, enrolled with a join token from ``atlasd
  cluster token``) makes its keys and renews its 60-second certificates through every fault
  (at 2/3 of their life, and at once after the CA rotation), and its Envoy, bootstrapped
  from values that hold no key, reads them from the agent's files (SDS, no restart); every
  convergence asks its Prometheus through the chain (``/prom/<it>/``), so a renewal lost
  to an outage (an expired certificate cannot renew) fails the soak;
- a real CoreDNS serving atlasd's zone file;
- a traffic loop through the chain (client -> observability Envoy ``/prom/anchor-0/`` ->
  mTLS -> ``anchor-0`` Envoy -> Prometheus) for the whole soak; no request may fail.

Churn clusters (``c-<n>``) have no Envoy (their external IPs are unroutable test addresses);
anchors are the clusters whose Envoys run. Anchors 1 and 2 are updated along the way
(replicas, DNS group, ports, Prometheus port annotation), so their Envoys must follow.

The CA rotation needs no operator step: after it, ``anchor-1`` is restarted from the values
rendered *before* the rotation (its bootstrap trusts only the old CA, its client
certificate is the old one) and must come up configured and serving, while the traffic
loop through ``anchor-0`` goes on. It connects because atlasd links the new CA to the old
one (the new CA cross-signed by the old key, served after every leaf) and keeps trusting
the old CA until it expires.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2
import pytest
import yaml
from cryptography import x509
from cryptography.exceptions import InvalidSignature

from tests.harness.coredns import CoreDNS
from tests.harness.envoy import Envoy
from tests.harness.kube import ApiServer
from tests.harness.net import free_port
from tests.harness.procs import Proc
from tests.harness.prom import WebProc
from tests.harness.wait import wait_until
from tests.integration.daemon_helpers import (
    ATLASD,
    answers_through_chain,
    join_token,
    pem_serial,
    served_serials,
    values_of,
)

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
MIB = 1024 * 1024


@dataclass(frozen=True)
class Scale:
    live: int  # churn clusters alive at the start (anchors come on top)
    rounds: int  # churn rounds per step (each adds, updates and removes ``per_round``)
    per_round: int
    anchors: int  # downstream Envoys
    steady_steps: int  # churn steps without faults at the end (RSS must stay flat)
    converge_seconds: float


SCALES = {
    "short": Scale(live=80, rounds=1, per_round=10, anchors=4, steady_steps=3, converge_seconds=90),
    "long": Scale(
        live=200, rounds=3, per_round=25, anchors=5, steady_steps=10, converge_seconds=180
    ),
}
# The enrolled anchor's certificate lifetime: its agent renews at 2/3 (40 s), so the soak
# sees renewals, and the 20 s left outlast any of its outages (retried every <= 1/4 of it).
ENROLLED_CERT_SECONDS = 60


def scale() -> Scale:
    name = os.environ.get("ATLASD_SOAK_SCALE", "short")
    if name not in SCALES:
        raise ValueError(f"ATLASD_SOAK_SCALE={name!r}: use one of {sorted(SCALES)}")
    return SCALES[name]


# -- the atlasd process -------------------------------------------------------------------


def _daemon_main(config_path: str) -> None:
    """Entry point of the atlasd process (``python -m tests.integration.test_soak CONFIG``)."""
    import datetime as dt
    import signal

    import trio

    from atlasd.daemon import Daemon, DaemonOptions
    from atlasd.model import DownstreamCluster, Settings
    from atlasd.xds.builders import SnapshotBuilder
    from atlasd.xds.plan import ListenPlan, NodePorts, ObservabilityPorts

    cfg = json.loads(Path(config_path).read_text())
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("httpx2").setLevel(logging.WARNING)
    obs = cfg["obs"]
    settings = Settings(
        namespace=cfg["namespace"],
        atlasd_ads_host="127.0.0.1",
        atlasd_ads_port=cfg["ads_port"],
        envoy_ads_address="127.0.0.1",
        envoy_ads_port=obs["xds"],
        envoy_address="127.0.0.1",
        envoy_alertmanager_port=obs["alertmanager"],
        enroll_address=f"127.0.0.1:{cfg['enroll_port']}",
        agent_cert_dir=cfg["cert_dir"],
    )
    plan = ListenPlan(
        observability=ObservabilityPorts(address="127.0.0.1", **obs),
        downstream=tuple((name, NodePorts(**ports)) for name, ports in cfg["downstream"].items()),
        local_service_host="127.0.0.1",
    )
    options = DaemonOptions(
        settings=settings,
        kubeconfig=cfg["kubeconfig"],
        zone_file=Path(cfg["zone_file"]),
        ads_host="127.0.0.1",
        ads_port=cfg["ads_port"],
        http_host="127.0.0.1",
        http_port=cfg["http_port"],
        leader_election=True,
        identity="soak-atlasd-0",  # a StatefulSet pod: the same name after a restart
        allow_loopback=True,
        listen_plan=plan,
        enroll_host="127.0.0.1",
        enroll_port=cfg["enroll_port"],
        enroll_lifetime=dt.timedelta(seconds=cfg["cert_seconds"]),
    )

    nat: dict[str, str] = cfg["nat"]

    class NattedBuilder(SnapshotBuilder):
        """The loopback stand-in for a routed network: the API server refuses loopback
        external IPs, so anchors get TEST-NET addresses that this shim maps to the
        loopback address their Envoy listens on, for the xDS configuration only."""

        def upstream_host(self, cluster: DownstreamCluster) -> str:
            return nat.get(cluster.external_ip, cluster.external_ip)

    async def main() -> None:
        daemon = Daemon(
            options,
            builder=NattedBuilder(
                plan, forwarder_token=settings.forwarder_token, upstream_connection_seconds=3
            ),
        )
        async with trio.open_nursery() as nursery:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:

                async def stop_on_signal() -> None:
                    async for _ in signals:
                        nursery.cancel_scope.cancel()

                nursery.start_soon(stop_on_signal)
                await daemon.run()

    trio.run(main)


@dataclass
class SoakAtlasd:
    """The atlasd process. ``start()`` again (after a kill) starts a new one on the same ADS
    port, zone file and Lease identity; ``generation`` counts the processes."""

    workdir: Path
    config: dict[str, Any]
    generation: int = 0
    proc: Proc | None = None
    logs: list[Proc] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.config['http_port']}"

    def start(self) -> SoakAtlasd:
        self.generation += 1
        self.config["http_port"] = free_port()
        path = self.workdir / f"atlasd-{self.generation}.json"
        path.write_text(json.dumps(self.config))
        self.proc = Proc(
            f"atlasd-{self.generation}",
            [sys.executable, "-m", "tests.integration.test_soak", str(path)],
            log_dir=self.workdir,
            cwd=ROOT,
        ).start()
        self.logs.append(self.proc)

        proc = self.proc

        def ready() -> bool:
            if not proc.running():
                return True  # fail at once, below, with the log
            return httpx2.get(f"{self.url}/readyz", timeout=2).status_code == 200

        wait_until(ready, timeout=60, what="atlasd /readyz")
        proc.check_running()
        return self

    def status(self) -> dict[str, Any]:
        doc: dict[str, Any] = httpx2.get(f"{self.url}/status", timeout=5).json()
        return doc

    def rss(self) -> int:
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def log_text(self) -> str:
        return "".join(p.log_text() for p in self.logs)


def _public_ip(anchor: int) -> str:
    """The external IP of anchor ``anchor`` (TEST-NET-2, mapped to its loopback address)."""
    return f"198.51.100.{11 + anchor}"


# -- the clusters ---------------------------------------------------------------------------


@dataclass
class ClusterSpec:
    """What the test declared for one cluster Service (the expectation is derived from it)."""

    name: str
    ip: str
    replicas: int = 1
    group: str | None = None
    extra_port: bool = False
    prom_host: str | None = None
    prom_port: int | None = None
    enrolled: bool = False  # goatlas.io/enrollment: "true" (its agent makes its keys)

    def ports(self) -> list[dict[str, Any]]:
        ports = [{"name": "thanos", "port": 10901}, {"name": "prometheus", "port": 9090}]
        if self.extra_port:
            ports.append({"name": "alertmanager", "port": 9093})
        return ports

    def manifest(self) -> dict[str, Any]:
        annotations: dict[str, str] = {}
        if self.group:
            annotations["goatlas.io/dns-group"] = self.group
        if self.prom_host:
            annotations["goatlas.io/prometheus-service"] = self.prom_host
        if self.prom_port:
            annotations["goatlas.io/prometheus-service-port"] = str(self.prom_port)
        if self.enrolled:
            annotations["goatlas.io/enrollment"] = "true"
        return {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {
                "name": self.name,
                "labels": {"goatlas.io/cluster": "true", "goatlas.io/replicas": str(self.replicas)},
                "annotations": annotations,
            },
            "spec": {"clusterIP": "None", "externalIPs": [self.ip], "ports": self.ports()},
        }

    def sidecars(self) -> list[str]:
        return [f"{self.name}-thanos-sidecar{i}" for i in range(self.replicas)]


class ClusterServices:
    """The cluster Services the test wrote, and the writes themselves."""

    def __init__(self, apiserver: ApiServer, namespace: str) -> None:
        self.api = apiserver
        self.ns = namespace
        self.specs: dict[str, ClusterSpec] = {}
        self._next = 0
        self._ip = 0
        self.ops = {"add": 0, "update": 0, "remove": 0}

    def fresh_ip(self) -> str:
        self._ip += 1
        return f"10.77.{self._ip // 250}.{self._ip % 250 + 1}"

    def _path(self, name: str = "") -> str:
        base = f"/api/v1/namespaces/{self.ns}/services"
        return f"{base}/{name}" if name else base

    def put(self, spec: ClusterSpec) -> None:
        """Create or update (merge patch of labels/annotations, replace of spec fields)."""
        manifest = spec.manifest()
        with self.api.admin() as c:
            if spec.name not in self.specs:
                r = c.post(self._path(), json=manifest)
                assert r.status_code == 201, r.text
                self.ops["add"] += 1
            else:
                old = self.specs[spec.name].manifest()["metadata"]["annotations"]
                anns: dict[str, str | None] = {k: None for k in old}
                anns.update(manifest["metadata"]["annotations"])
                patch = {
                    "metadata": {"labels": manifest["metadata"]["labels"], "annotations": anns},
                    "spec": {
                        "externalIPs": manifest["spec"]["externalIPs"],
                        "ports": manifest["spec"]["ports"],
                    },
                }
                r = c.patch(
                    self._path(spec.name),
                    content=json.dumps(patch),
                    headers={"content-type": "application/merge-patch+json"},
                )
                assert r.status_code == 200, r.text
                self.ops["update"] += 1
        self.specs[spec.name] = spec

    def add(self) -> None:
        self._next += 1
        self.put(ClusterSpec(f"c-{self._next:04d}", self.fresh_ip()))

    def remove(self, name: str) -> None:
        with self.api.admin() as c:
            r = c.delete(self._path(name))
            assert r.status_code == 200, r.text
        del self.specs[name]
        self.ops["remove"] += 1

    def update(self, name: str, variant: int) -> None:
        s = self.specs[name]
        new = dataclasses.replace(s)
        kind = variant % 4
        if kind == 0:
            new.replicas = 3 - s.replicas if s.replicas <= 2 else 1
        elif kind == 1:
            new.ip = self.fresh_ip()
        elif kind == 2:
            new.group = None if s.group else f"g{variant % 3}"
        else:
            new.extra_port = not s.extra_port
        self.put(new)

    def churn_round(self, n: int, round_no: int) -> None:
        """Add ``n``, update ``n``, remove ``n`` churn clusters (interleaved)."""
        churn = sorted(k for k in self.specs if k.startswith("c-"))
        to_remove = churn[round_no % 3 :: 3][:n]
        to_update = [k for k in churn if k not in to_remove][round_no % 2 :: 2][:n]
        for i in range(n):
            self.add()
            if i < len(to_update):
                self.update(to_update[i], variant=round_no + i)
            if i < len(to_remove):
                self.remove(to_remove[i])


# -- reading the state back -----------------------------------------------------------------


def _b64(s: str) -> bytes:
    return base64.b64decode(s)


def _secrets(api: ApiServer, ns: str) -> dict[str, dict[str, Any]]:
    with api.admin() as c:
        items = c.get(f"/api/v1/namespaces/{ns}/secrets").json()["items"]
    return {i["metadata"]["name"]: i for i in items}


def _values_bootstrap(secret: dict[str, Any]) -> dict[str, Any]:
    values = yaml.safe_load(_b64(secret["data"]["values.yaml"]))
    boot: dict[str, Any] = yaml.safe_load(values["files"]["envoy.yaml"])
    return boot


def _current_ca(secrets: dict[str, dict[str, Any]]) -> x509.Certificate:
    return x509.load_pem_x509_certificate(_b64(secrets["atlas-ca"]["data"]["ca.pem"]))


def _signed_by(pem: bytes, ca: x509.Certificate) -> bool:
    try:
        x509.load_pem_x509_certificate(pem).verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def check_kube_state(api: ApiServer, ns: str, specs: dict[str, ClusterSpec]) -> None:
    """Secrets and sidecar Services equal what ``specs`` implies (raises with the diff)."""
    secrets = _secrets(api, ns)
    tls_secrets = ("atlas-server", "atlas-client", "atlas-tls", "atlasd-ads")
    want = {"atlas-ca", "atlas-envoy-values", *tls_secrets}
    enrolled = {name for name, spec in specs.items() if spec.enrolled}
    for name in specs:
        want.add(f"{name}-envoy-values")
        if name not in enrolled:
            want.add(f"{name}-atlas-identity")
    # An enrolled cluster's join tokens (hashes; the used one records the certificates it
    # got) and the record of its renewals (from its first renewal on): only of clusters
    # that enroll.
    tokens = {
        n: s["metadata"]["labels"].get("goatlas.io/join-token-cluster")
        for n, s in secrets.items()
        if n.startswith("atlas-join-")
    }
    assert set(tokens.values()) <= enrolled, f"join tokens of {set(tokens.values()) - enrolled}"
    got = set(secrets) - set(tokens) - {f"{name}-atlas-enrolled" for name in enrolled}
    assert got == want, f"Secrets: missing {sorted(want - got)[:5]}, extra {sorted(got - want)[:5]}"
    ca_meta = secrets["atlas-ca"]["metadata"]
    assert "goatlas.io/ca-rotate" not in (ca_meta.get("annotations") or {})
    ca = _current_ca(secrets)
    serial = str(ca.serial_number)
    for tls in tls_secrets:
        # Locals only in asserts that touch Secrets: a failure must not print key material.
        signed_label = secrets[tls]["metadata"]["labels"]["goatlas.io/ca-signed"]
        assert signed_label == serial, tls
        signed = _signed_by(_b64(secrets[tls]["data"]["tls.crt"]), ca)
        assert signed, f"{tls} is not signed by the current CA"
    for name in enrolled:  # no key, no certificate: the agent's settings
        values = yaml.safe_load(_b64(secrets[f"{name}-envoy-values"]["data"]["values.yaml"]))
        assert values["agent"]["cluster"] == name and "-----BEGIN" not in json.dumps(values)
    for name, spec in specs.items():
        boot = _values_bootstrap(secrets[f"{name}-envoy-values"])
        node_id = boot["node"]["id"]
        assert node_id == spec.name, f"{name}-envoy-values names node {node_id}"
        if name in enrolled:
            continue
        ident = secrets[f"{name}-atlas-identity"]["data"]
        for key in ("server.crt", "client.crt"):
            leaf = _b64(ident[key])
            signed = _signed_by(leaf, ca)
            assert signed, f"{name} {key} is not signed by the current CA"
            sans = x509.load_pem_x509_certificate(leaf).extensions.get_extension_for_class(
                x509.SubjectAlternativeName
            )
            assert name in sans.value.get_values_for_type(x509.DNSName)
    with api.admin() as c:
        items = c.get(f"/api/v1/namespaces/{ns}/services").json()["items"]
    services = {i["metadata"]["name"]: i for i in items}
    want_svc = set(specs) | {s for spec in specs.values() for s in spec.sidecars()}
    got_svc = set(services)
    assert got_svc == want_svc, (
        f"Services: missing {sorted(want_svc - got_svc)[:5]}, extra {sorted(got_svc - want_svc)[:5]}"
    )
    for spec in specs.values():
        for sidecar in spec.sidecars():
            ports = [(p["name"], p["port"]) for p in services[sidecar]["spec"]["ports"]]
            assert ports == [(p["name"], p["port"]) for p in spec.ports()], sidecar


def expected_srv(ns: str, specs: dict[str, ClusterSpec]) -> dict[str, set[str]]:
    """SRV owner name -> set of "port target" the zone must hold."""
    out: dict[str, set[str]] = {}
    for spec in specs.values():
        for p in spec.ports():
            owners = [f"_{p['name']}._tcp.sidecars.thanos.atlas."]
            if spec.group:
                owners.append(f"_{p['name']}._tcp.{spec.group}.sidecars.thanos.atlas.")
            for owner in owners:
                for sidecar in spec.sidecars():
                    target = f"{sidecar}.{ns}.svc.cluster.local."
                    out.setdefault(owner, set()).add(f"{p['port']} {target}")
    return out


def check_dns(dns: CoreDNS, ns: str, specs: dict[str, ClusterSpec]) -> None:
    for owner, want in expected_srv(ns, specs).items():
        # "10 100 <port> <target>" -> "<port> <target>"
        got = {r.split(" ", 2)[2] for r in dns.query(owner, "SRV", tcp=True)}
        assert got == want, (
            f"{owner}: missing {sorted(want - got)[:3]}, extra {sorted(got - want)[:3]}"
        )
    for group in ("g0", "g1", "g2"):
        owner = f"_thanos._tcp.{group}.sidecars.thanos.atlas."
        if owner not in expected_srv(ns, specs):
            assert dns.query(owner, "SRV", tcp=True) == [], f"{owner} should be empty"


def _soa_serial(dns: CoreDNS) -> int:
    (soa,) = dns.query("atlas.", "SOA")
    return int(soa.split()[2])


def _dump_part(dump: dict[str, Any], kind: str) -> dict[str, Any]:
    for part in dump["configs"]:
        if part["@type"].endswith(f".{kind}"):
            result: dict[str, Any] = part
            return result
    return {}


def envoy_view(envoy: Envoy) -> dict[str, Any]:
    """Dynamic clusters, route virtual hosts and secrets of one Envoy's config dump."""
    dump = envoy.config_dump(include_eds=True)
    clusters = {
        c["cluster"]["name"]: c["cluster"]
        for c in _dump_part(dump, "ClustersConfigDump").get("dynamic_active_clusters", [])
    }
    # Where each cluster sends: its assignment from EDS, or inline.
    assignments = {
        e["endpoint_config"]["cluster_name"]: e["endpoint_config"]
        for e in _dump_part(dump, "EndpointsConfigDump").get("dynamic_endpoint_configs", [])
    }
    assignments.update(
        {n: c["load_assignment"] for n, c in clusters.items() if "load_assignment" in c}
    )
    endpoints = {
        n: {
            e["endpoint"]["address"]["socket_address"]["address"]
            for le in cla.get("endpoints", [])
            for e in le.get("lb_endpoints", [])
        }
        for n, cla in assignments.items()
    }
    routes = {
        r["route_config"]["name"]: r["route_config"]
        for r in _dump_part(dump, "RoutesConfigDump").get("dynamic_route_configs", [])
    }
    # Routing scopes (node atlas's 10901 and 10904): each carries its route configuration.
    # Every SRDS subscription of the Envoy holds every scope; they are told apart by key.
    scopes = {
        sc["name"]: sc
        for part in _dump_part(dump, "ScopedRoutesConfigDump").get(
            "dynamic_scoped_route_configs", []
        )
        for sc in part.get("scoped_route_configs", [])
    }
    routes.update({n: sc["route_configuration"] for n, sc in scopes.items()})
    scope_keys = {tuple(f["string_key"] for f in sc["key"]["fragments"]) for sc in scopes.values()}
    secrets = {
        s["name"]: s
        for s in _dump_part(dump, "SecretsConfigDump").get("dynamic_active_secrets", [])
    }
    warming = _dump_part(dump, "ClustersConfigDump").get("dynamic_warming_clusters", [])
    return {
        "clusters": clusters,
        "routes": routes,
        "scope_keys": scope_keys,
        "endpoints": endpoints,
        "secrets": secrets,
        "warming": warming,
    }


def _route_prefixes(routes: dict[str, Any]) -> set[str]:
    return {
        r["match"]["prefix"]
        for rc in routes.values()
        for vh in rc.get("virtual_hosts", [])
        for r in vh.get("routes", [])
        if r.get("match", {}).get("prefix")
    }


def check_observability_envoy(
    envoy: Envoy,
    ns: str,
    specs: dict[str, ClusterSpec],
    fixed_clusters: set[str],
    nat: dict[str, str],
) -> None:
    view = envoy_view(envoy)
    assert not view["warming"], f"clusters still warming: {len(view['warming'])}"
    want = set(fixed_clusters)
    for name in specs:
        want |= {f"{name}-thanos", f"{name}-prom"}
    got = set(view["clusters"])
    assert got == want, (
        f"atlas clusters: missing {sorted(want - got)[:5]}, extra {sorted(got - want)[:5]}"
    )
    for name, spec in specs.items():
        addrs = view["endpoints"].get(f"{name}-prom", set())
        want_ip = nat.get(spec.ip, spec.ip)
        assert addrs == {want_ip}, f"{name}-prom dials {addrs}, want {want_ip}"
    prefixes = _route_prefixes(view["routes"])
    want_prefixes = {f"/prom/{name}/" for name in specs}
    got_prefixes = {p for p in prefixes if p.startswith("/prom/")}
    assert got_prefixes == want_prefixes, (
        f"/prom routes: missing {sorted(want_prefixes - got_prefixes)[:5]}, "
        f"extra {sorted(got_prefixes - want_prefixes)[:5]}"
    )
    suffix = f".{ns}.svc.cluster.local"
    want_hosts = {f"{s}{suffix}" for spec in specs.values() for s in spec.sidecars()}
    got_hosts = {k[0] for k in view["scope_keys"] if len(k) == 1}
    assert got_hosts == want_hosts, (
        f"10901 authorities: missing {sorted(want_hosts - got_hosts)[:5]}, "
        f"extra {sorted(got_hosts - want_hosts)[:5]}"
    )


def check_downstream_envoy(envoy: Envoy, spec: ClusterSpec, everyone: set[str]) -> None:
    view = envoy_view(envoy)
    assert not view["warming"]
    text = json.dumps(view["clusters"]) + json.dumps(view["routes"])
    strangers = {n for n in everyone - {spec.name} if re.search(rf'"{re.escape(n)}[-"]', text)}
    assert not strangers, f"{spec.name}'s Envoy holds configuration of {sorted(strangers)[:5]}"
    ports = {
        e["endpoint"]["address"]["socket_address"].get("port_value")
        for c in view["clusters"].values()
        for le in c.get("load_assignment", {}).get("endpoints", [])
        for e in le["lb_endpoints"]
    }
    if spec.prom_port:
        assert spec.prom_port in ports, f"{spec.name}: no upstream on {spec.prom_port}: {ports}"


def _tls_chain(secret: dict[str, Any]) -> bytes | None:
    """The certificate chain of a TLS-certificate secret in a config dump (None if none)."""
    chain = secret.get("secret", {}).get("tls_certificate", {}).get("certificate_chain", {})
    if "inline_bytes" in chain:
        return base64.b64decode(chain["inline_bytes"])
    if "inline_string" in chain:
        return str(chain["inline_string"]).encode()
    return None


def _secret_cert_signed_by(view: dict[str, Any], name: str, ca: x509.Certificate) -> bool:
    chain = _tls_chain(view["secrets"].get(name, {}))
    return chain is not None and _signed_by(chain, ca)


# -- measuring --------------------------------------------------------------------------------


class Traffic:
    """Requests through the Envoy chain in a thread, each result tagged with the phase."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.phase = "warm-up"
        self.results: list[tuple[str, int | str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        with httpx2.Client(timeout=5) as client:
            while not self._stop.is_set():
                phase = self.phase
                try:
                    r = client.get(self.url)
                    outcome: int | str = r.status_code
                    if r.status_code != 200:
                        outcome = f"{r.status_code} {r.text[:120]!r}"
                except httpx2.HTTPError as exc:
                    outcome = repr(exc)
                self.results.append((phase, outcome))
                self._stop.wait(0.02)

    def start(self) -> Traffic:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def count(self, phase: str | None = None) -> int:
        return sum(1 for p, _ in self.results if phase is None or p == phase)

    def failures(self) -> list[tuple[str, int | str]]:
        return [(p, o) for p, o in self.results if o != 200]


class RssSampler:
    """atlasd's resident set every 0.25 s, tagged with (process generation, phase)."""

    def __init__(self, atlasd: SoakAtlasd) -> None:
        self.atlasd = atlasd
        self.phase = "start"
        self.samples: list[tuple[int, str, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(0.25):
            with contextlib.suppress(OSError, RuntimeError, AssertionError):
                self.samples.append((self.atlasd.generation, self.phase, self.atlasd.rss()))

    def start(self) -> RssSampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def by_phase(self) -> list[tuple[int, str, int]]:
        """(process generation, phase, max RSS) in the order the phases ran."""
        out: dict[tuple[int, str], int] = {}
        for g, p, r in self.samples:
            out[(g, p)] = max(r, out.get((g, p), 0))
        return [(g, p, r) for (g, p), r in out.items()]


@dataclass
class Timeline:
    t0: float = field(default_factory=time.monotonic)
    marks: list[tuple[str, float]] = field(default_factory=list)

    def mark(self, what: str) -> None:
        self.marks.append((what, time.monotonic() - self.t0))
        print(f"[soak +{self.marks[-1][1]:6.1f}s] {what}", flush=True)


# atlasd logs WARNING lines while its API server is down (watch/lease/reconcile retries):
# expected. An ERROR, a CRITICAL or a traceback is not, whatever happened.
def unexpected_log_lines(text: str) -> list[str]:
    return [
        line
        for line in text.splitlines()
        if "Traceback" in line or " ERROR " in line or " CRITICAL " in line
    ]


# -- the soak ---------------------------------------------------------------------------------


def test_soak_churn_and_faults(
    apiserver: ApiServer,
    namespace: str,
    tmp_path: Path,
    envoy_factory: Callable[[dict[str, Any], str], Envoy],
    coredns_factory: Callable[..., CoreDNS],
    prometheus_factory: Callable[[str], WebProc],
) -> None:
    started: list[SoakAtlasd] = []
    agents: list[Proc] = []
    try:
        _soak(
            apiserver,
            namespace,
            tmp_path,
            envoy_factory,
            coredns_factory,
            prometheus_factory,
            started,
            agents,
        )
    except Exception:
        for a in started:
            tail = "\n".join(a.log_text().splitlines()[-80:])
            print(f"--- atlasd log (last 80 lines)\n{tail}")
        for agent in agents:
            tail = "\n".join(agent.log_text().splitlines()[-30:])
            print(f"--- {agent.name} log (last 30 lines)\n{tail}")
        raise
    finally:
        for a in started:
            if a.proc is not None:
                a.proc.stop()
        for agent in agents:
            agent.stop()


def _soak(
    apiserver: ApiServer,
    namespace: str,
    tmp_path: Path,
    envoy_factory: Callable[[dict[str, Any], str], Envoy],
    coredns_factory: Callable[..., CoreDNS],
    prometheus_factory: Callable[[str], WebProc],
    started: list[SoakAtlasd],
    agents: list[Proc],
) -> None:
    sc = scale()
    tl = Timeline()
    ns = namespace
    kube = (f"--kubeconfig={apiserver.admin_kubeconfig}", f"--namespace={ns}")
    anchors = [f"anchor-{k}" for k in range(sc.anchors)]
    enrolled = anchors[-1]  # its agent makes its keys; atlasd stores none of them
    certs = tmp_path / f"{enrolled}-certs"
    obs_ports = {
        "xds": free_port(),
        "thanos": free_port(),
        "alertmanager": free_port(),
        "prometheus": free_port(),
    }
    downstream: dict[str, dict[str, Any]] = {
        name: {
            "address": f"127.0.0.{11 + k}",
            "thanos": free_port(),
            "prometheus": free_port(),
            "alertmanager": free_port(),
        }
        for k, name in enumerate(anchors)
    }
    zone_file = tmp_path / "atlas.zone"
    atlasd = SoakAtlasd(
        tmp_path,
        {
            "namespace": ns,
            "kubeconfig": str(apiserver.admin_kubeconfig),
            "zone_file": str(zone_file),
            "ads_port": free_port(),
            "obs": obs_ports,
            "downstream": downstream,
            "nat": {_public_ip(k): downstream[name]["address"] for k, name in enumerate(anchors)},
            "enroll_port": free_port(),
            "cert_dir": str(certs),
            "cert_seconds": ENROLLED_CERT_SECONDS,
        },
    )
    started.append(atlasd)
    atlasd.start()
    rss = RssSampler(atlasd).start()
    tl.mark("atlasd started")

    prom = prometheus_factory("global:\n  scrape_interval: 15s\n")
    fleet = ClusterServices(apiserver, ns)
    for k, name in enumerate(anchors):
        fleet.put(
            ClusterSpec(
                name,
                _public_ip(k),
                prom_host="127.0.0.1",
                prom_port=prom.port if name in ("anchor-0", enrolled) else 9090,
                enrolled=name == enrolled,
            )
        )
    for _ in range(sc.live):
        fleet.add()
    tl.mark(f"{len(fleet.specs)} cluster Services created")

    def values(node: str) -> dict[str, Any]:
        secret = f"{node}-envoy-values" if node != "atlas" else "atlas-envoy-values"
        return _values_bootstrap(_secrets(apiserver, ns)[secret])

    wait_until(
        lambda: all(f"{a}-envoy-values" in _secrets(apiserver, ns) for a in anchors),
        timeout=60,
        what="the anchors' values",
    )
    # The enrolled anchor's agent, as the envoy chart runs it (from its values' agent
    # settings): enrolls with a join token, then renews and follows the bundle.
    wanted = yaml.safe_load(values_of(apiserver, ns, f"{enrolled}-envoy-values") or b"")["agent"]
    assert wanted["certDir"] == str(certs)
    token = join_token(kube, enrolled)
    agent = Proc(
        f"agent-{enrolled}",
        [*ATLASD, "agent", f"--server={wanted['server']}", f"--cluster={wanted['cluster']}",
         f"--namespace={wanted['namespace']}", f"--dir={certs}", "--bundle-interval=2"],
        log_dir=tmp_path,
        env={"ATLAS_JOIN_TOKEN": token},
    )  # fmt: skip
    agents.append(agent)
    agent.start()
    wait_until(lambda: (certs / "server.pem").exists(), timeout=60, what="the agent enrolled")
    tl.mark(f"{enrolled} enrolled by its agent")

    obs = envoy_factory(values("atlas"), "atlas")
    envoys = {a: envoy_factory(values(a), a) for a in anchors}
    for e in (obs, *envoys.values()):
        e.wait_ready(60)
    enrolled_pid = envoys[enrolled].proc.pid
    tl.mark("Envoys ready")

    def renewals() -> int:
        return agent.log_text().count("renewed its certificates")

    def converged(check_dns_too: bool = True) -> bool:
        check_kube_state(apiserver, ns, fleet.specs)
        check_observability_envoy(obs, ns, fleet.specs, fixed, atlasd.config["nat"])
        for a in anchors:
            check_downstream_envoy(envoys[a], fleet.specs[a], set(fleet.specs))
        if check_dns_too:
            check_dns(dns, ns, fleet.specs)
        streams = atlasd.status().get("envoys") or []
        for e in streams:
            assert e["last_nack"] is None, f"{e['node']} NACKed: {e['last_nack']}"
        connected = {e["node"] for e in streams}
        assert connected >= {"atlas", *anchors}, f"connected to atlasd: {sorted(connected)}"
        # The enrolled cluster serves through the chain with the agent's certificates.
        agent.check_running()
        assert answers_through_chain(enrolled, obs_ports["prometheus"]), (
            f"/prom/{enrolled}/ does not answer through the chain"
        )
        return True

    # The observability Envoy's clusters that belong to no downstream cluster (the xDS
    # forwarding cluster and the like), learned once: everything else is per cluster.
    def fixed_clusters() -> set[str]:
        names = set(envoy_view(obs)["clusters"])
        per = {f"{n}-{s}" for n in fleet.specs for s in ("thanos", "prom")}
        assert per <= names, f"missing {sorted(per - names)[:5]}"
        return names - per

    fixed = wait_until(fixed_clusters, timeout=sc.converge_seconds, what="first fleet on atlas")
    dns = coredns_factory(zone_file)
    first_serial = _soa_serial(dns)
    wait_until(converged, timeout=sc.converge_seconds, what="initial convergence")
    tl.mark(f"converged on {len(fleet.specs)} clusters (fixed clusters: {sorted(fixed)})")

    url = f"http://127.0.0.1:{obs_ports['prometheus']}/prom/anchor-0/api/v1/status/buildinfo"
    wait_until(lambda: httpx2.get(url, timeout=5).status_code == 200, timeout=30, what="traffic")
    traffic = Traffic(url).start()

    round_no = 0

    def churn(phase: str) -> None:
        nonlocal round_no
        traffic.phase = rss.phase = phase
        for _ in range(sc.rounds):
            fleet.churn_round(sc.per_round, round_no)
            round_no += 1
        tl.mark(f"churn round {round_no} ({phase}): {len(fleet.specs)} live")

    try:
        rss.phase = "warm"
        churn("churn")
        # Anchors change too: their Envoys must follow.
        fleet.update("anchor-1", variant=0)  # replicas 1 -> 2
        fleet.update("anchor-1", variant=2)  # into a DNS group
        a2 = fleet.specs["anchor-2"]
        fleet.put(
            ClusterSpec(a2.name, a2.ip, extra_port=True, prom_host="127.0.0.1", prom_port=9191)
        )
        wait_until(
            lambda: converged(check_dns_too=False), timeout=sc.converge_seconds, what="warm-up"
        )
        tl.mark("warm-up converged")
        warm_rss_1 = atlasd.rss()

        traffic.phase = rss.phase = "apiserver restart 1"
        apiserver.restart()
        tl.mark("API server restarted (1)")
        churn("after restart 1")
        wait_until(converged, timeout=sc.converge_seconds, what="convergence before the kill")
        tl.mark("converged")
        end_rss_1 = atlasd.rss()

        traffic.phase = rss.phase = "sigkill"
        assert atlasd.proc is not None
        atlasd.proc.kill()
        tl.mark("atlasd SIGKILLed")
        churn("atlasd down")  # changes made while atlasd is dead
        atlasd.start()
        tl.mark("atlasd restarted on the same ADS port")
        wait_until(converged, timeout=sc.converge_seconds, what="convergence after the restart")
        tl.mark("converged after restart (every Envoy reconnected)")
        rss.phase = "warm 2"
        warm_rss_2 = atlasd.rss()

        # Changes the watches see, more the API server stores while it is down... then
        # etcd compacted past the watches' resourceVersion: they resume into a 410.
        churn("before compaction")
        apiserver.stop_apiserver()
        tl.mark("API server stopped (2)")
        apiserver.compact_etcd()
        tl.mark("etcd compacted")
        apiserver.start_apiserver()
        tl.mark("API server started again (2)")
        churn("after compaction")
        wait_until(converged, timeout=sc.converge_seconds, what="convergence before rotation")
        tl.mark("converged")

        # -- the CA rotation, with traffic flowing ----------------------------------------
        traffic.phase = rss.phase = "ca rotation"
        before_rotation = traffic.count("ca rotation")
        old_ca = _current_ca(_secrets(apiserver, ns))
        renewed_before_rotation = renewals()
        pre_rotation = values("anchor-1")  # what anchor-1 was deployed from
        hs = f"listener.{downstream['anchor-0']['address']}_{downstream['anchor-0']['prometheus']}.ssl.handshake"
        handshakes_before = envoys["anchor-0"].stats(hs).get(hs, 0)
        apiserver.kubectl(
            "annotate", "-n", ns, "secret", "atlas-ca", "goatlas.io/ca-rotate=soak", "--overwrite"
        )

        def rotated() -> bool:
            secrets = _secrets(apiserver, ns)
            ca = _current_ca(secrets)
            if ca.serial_number == old_ca.serial_number:
                return False
            check_kube_state(apiserver, ns, fleet.specs)
            # The enrolled anchor: its agent saw the new bundle and renewed at once, and
            # its Envoy serves the new leaf (read from the files; none over xDS).
            for leaf in ("server.pem", "client.pem"):
                assert _signed_by((certs / leaf).read_bytes(), ca), f"{enrolled} {leaf}: old CA"
            served = served_serials(envoys[enrolled].admin_url, enrolled)
            assert pem_serial(certs / "server.pem") in served, f"{enrolled} serves an old leaf"
            for node, e in (("atlas", obs), *envoys.items()):
                if node == enrolled:
                    continue
                view = envoy_view(e)
                leaves = [n for n, s in view["secrets"].items() if _tls_chain(s)]
                assert "server" in leaves, f"{node} holds no server certificate"
                for name in leaves:
                    new = _secret_cert_signed_by(view, name, ca)
                    assert new, f"{node}: {name} is not signed by the new CA"
            return True

        wait_until(rotated, timeout=sc.converge_seconds, what="the CA rotation reaches every Envoy")
        assert renewals() > renewed_before_rotation
        tl.mark("CA rotated: every Envoy holds leaves of the new CA")
        # Fresh handshakes under the new certificates (connections recycle every 3 s).
        wait_until(
            lambda: envoys["anchor-0"].stats(hs).get(hs, 0) >= handshakes_before + 2,
            timeout=30,
            what="fresh mTLS handshakes after the rotation",
        )
        wait_until(
            lambda: traffic.count("ca rotation") >= before_rotation + 50,
            timeout=30,
            what="requests during the rotation",
        )
        tl.mark(
            f"{traffic.count('ca rotation')} requests during the rotation, "
            f"{envoys['anchor-0'].stats(hs).get(hs, 0) - handshakes_before} new handshakes"
        )

        churn("final")
        # An anchor changes after the rotation: its Envoy still follows.
        a2 = fleet.specs["anchor-2"]
        fleet.put(
            ClusterSpec(a2.name, a2.ip, extra_port=True, prom_host="127.0.0.1", prom_port=9292)
        )
        traffic.phase = rss.phase = "final"
        wait_until(converged, timeout=sc.converge_seconds, what="final convergence")
        tl.mark("final state converged")
        end_rss_2 = atlasd.rss()
        # No operator step after a rotation: anchor-1 restarts from its PRE-rotation values
        # (trusting only the old CA) and dials xDS through 10900, now serving a leaf of
        # the new CA followed by its link to the old one.
        assert pre_rotation != values("anchor-1"), "the rotation rewrote anchor-1's values"
        envoys["anchor-1"].stop()
        envoys["anchor-1"] = envoy_factory(pre_rotation, "anchor-1-restarted")
        envoys["anchor-1"].wait_ready(60)
        wait_until(converged, timeout=sc.converge_seconds, what="the restarted Envoy's config")
        # ... and serves: the observability Envoy's mTLS requests reach its listener.
        a1 = downstream["anchor-1"]
        hs1 = f"listener.{a1['address']}_{a1['prometheus']}.ssl.handshake"
        a1_url = f"http://127.0.0.1:{obs_ports['prometheus']}/prom/anchor-1/-/ready"

        def anchor1_serves() -> bool:
            httpx2.get(a1_url, timeout=5)  # its upstream (port 9090) runs nothing: any answer
            return envoys["anchor-1"].stats(hs1).get(hs1, 0) >= 1

        wait_until(anchor1_serves, timeout=30, what="mTLS requests reach the restarted anchor-1")
        tl.mark("anchor-1 restarted from its pre-rotation values: configured and serving")

        # Sustained churn, no faults: RSS after each convergence must not keep growing.
        steady_rss = [atlasd.rss()]
        for step in range(sc.steady_steps):
            churn(f"steady {step + 1}")
            wait_until(converged, timeout=sc.converge_seconds, what=f"steady step {step + 1}")
            steady_rss.append(atlasd.rss())
        tl.mark(f"{sc.steady_steps} steady churn steps converged")
        # The enrolled anchor renewed on its own too (at 2/3 of its certificates' life,
        # not only for the rotation), and its Envoy took every renewal with no restart.
        wait_until(lambda: renewals() >= 2, timeout=ENROLLED_CERT_SECONDS, what="renewals")
        wait_until(converged, timeout=sc.converge_seconds, what="the last renewal served")
        assert envoys[enrolled].proc.pid == enrolled_pid
        tl.mark(f"{enrolled}: {renewals()} renewals, its Envoy never restarted")
    finally:
        traffic.stop()
        rss.stop()

    assert _soa_serial(dns) > first_serial, "the zone's serial only grows"

    # The zone file and its ConfigMap mirror agree. The mirror follows the file by design:
    # it applies at most once per MIRROR_INTERVAL (a burst is one ConfigMap update), so
    # right after the last write it may still hold the zone before it (a flake seen once:
    # serials one apart). Wait for it, with a deadline, rather than reading it once.
    def mirror_agrees() -> bool:
        with apiserver.admin() as c:
            cm = c.get(f"/api/v1/namespaces/{ns}/configmaps/atlas-coredns").json()
        return bool(cm["data"]["atlas.zone"] == zone_file.read_text())

    wait_until(
        mirror_agrees, timeout=30, interval=0.2, what="the zone's ConfigMap mirror equals the file"
    )

    failures = traffic.failures()
    print(
        f"soak: {len(fleet.specs)} live clusters at the end; ops {fleet.ops}; "
        f"{traffic.count()} requests through the chain, {len(failures)} failed; "
        f"{traffic.count('ca rotation')} during the CA rotation"
    )
    print(
        f"atlasd RSS MiB: process 1 warm {warm_rss_1 / MIB:.1f} -> {end_rss_1 / MIB:.1f}"
        f" (max {max(r for g, _, r in rss.samples if g == 1) / MIB:.1f}); "
        f"process 2 warm {warm_rss_2 / MIB:.1f} -> {end_rss_2 / MIB:.1f}"
        f" (max {max(r for g, _, r in rss.samples if g == 2) / MIB:.1f})"
    )
    print(f"atlasd RSS after each steady churn step (MiB): {[round(r / MIB) for r in steady_rss]}")
    print(
        "atlasd max RSS by phase (MiB): "
        + ", ".join(f"[{g}] {p} {r / MIB:.0f}" for g, p, r in rss.by_phase())
    )
    log = atlasd.log_text()
    relists = [line for line in log.splitlines() if "relisting" in line]
    print(f"atlasd log: {len(log.splitlines())} lines, {len(relists)} watch relists (410)")
    print("timeline:", ", ".join(f"{what} @{t:.0f}s" for what, t in tl.marks))
    assert not [f for f in failures if f[0] == "ca rotation"], failures[:5]
    assert failures == [], f"{len(failures)} requests failed: {failures[:5]}"
    assert traffic.count("ca rotation") > 50

    bad = unexpected_log_lines(log)
    assert bad == [], "unexpected lines in atlasd's log:\n" + "\n".join(bad[:20])
    secret = token.split(".")[1]
    assert secret not in log and secret not in agent.log_text(), "the join token's secret logged"

    # Flat after warm-up: each process ends within a generous bound of its warm RSS, and
    # sustained churn after the faults does not keep adding to it.
    for warm, end in ((warm_rss_1, end_rss_1), (warm_rss_2, end_rss_2)):
        assert end <= warm * 1.5 + 32 * MIB, f"RSS grew {warm / MIB:.1f} -> {end / MIB:.1f} MiB"
    assert steady_rss[-1] <= steady_rss[0] * 1.2 + 16 * MIB, (
        f"RSS kept growing under steady churn: {[round(r / MIB) for r in steady_rss]} MiB"
    )


if __name__ == "__main__":
    _daemon_main(sys.argv[1])
