"""In-process checks of one pass's outputs, run on every example (cheap), beside the
sampled checks by the real tools (``external``).

- desired Kubernetes objects: one per name (nothing silently overwritten), names and
  labels the API server would take, values.yaml that parses, bootstrap node ids;
- the zone: parses (dnspython), SOA + NS + exactly the SRV records of the clusters;
- the snapshots: one per accepted cluster plus ``atlas``, each resource decodes, the
  upstream of every cluster dials its external IP, virtual-host domains are unique in
  each route configuration and scope keys unique per node (Envoy refuses duplicates).
"""

from __future__ import annotations

import base64
import re
from collections.abc import Sequence
from typing import Any

import dns.rdatatype
import dns.rdtypes.IN.SRV
import dns.zone
import yaml
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2, scoped_route_pb2
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2

from tests.property.pipeline import (
    CLUSTER,
    ENDPOINT,
    LISTENER,
    OBSERVABILITY_NODE,
    ROUTE,
    SCOPED_ROUTE,
    SECRET,
    DownstreamCluster,
    Outputs,
)

_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_LABEL_NAME = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_DECODERS = {
    CLUSTER: cluster_pb2.Cluster,
    ENDPOINT: endpoint_pb2.ClusterLoadAssignment,
    LISTENER: listener_pb2.Listener,
    ROUTE: route_pb2.RouteConfiguration,
    SCOPED_ROUTE: scoped_route_pb2.ScopedRouteConfiguration,
    SECRET: secret_pb2.Secret,
}


def _k8s_name(name: Any) -> None:
    assert isinstance(name, str) and len(name) <= 63 and _DNS_LABEL.fullmatch(name), name


def _k8s_label_key(key: str) -> None:
    prefix, _, name = key.rpartition("/")
    assert not prefix or (len(prefix) <= 253 and _SUBDOMAIN.fullmatch(prefix)), key
    assert len(name) <= 63 and _LABEL_NAME.fullmatch(name), key


def _k8s_label_value(value: Any) -> None:
    assert isinstance(value, str) and len(value) <= 63, value
    assert value == "" or _LABEL_NAME.fullmatch(value), value


def _k8s_labels(mapping: Any) -> None:
    assert isinstance(mapping, dict)
    for k, v in mapping.items():
        _k8s_label_key(k)
        _k8s_label_value(v)


def check_desired(out: Outputs, clusters: Sequence[DownstreamCluster]) -> None:
    d = out.desired
    want_services = {svc for c in clusters for svc in c.sidecar_services()}
    assert set(d.services) == want_services
    assert len(want_services) == sum(c.replicas for c in clusters)  # no name shared
    # 4 TLS Secrets (atlasd-ads included) + atlas-envoy-values + (values, identity) per
    # cluster; an enrolled cluster has no identity.
    enrolled = sum(1 for c in clusters if c.enrolled)
    assert len(d.secrets) == 5 + 2 * len(clusters) - enrolled, sorted(d.secrets)
    by_name = {c.name: c for c in clusters}
    for name, svc in d.services.items():
        meta = svc["metadata"]
        assert meta["name"] == name
        _k8s_name(name)
        _k8s_labels(meta["labels"])
        _k8s_labels(svc["spec"]["selector"])
        owner = by_name[meta["labels"]["goatlas.io/owner-cluster"]]
        assert [(p["name"], p["port"]) for p in svc["spec"]["ports"]] == [
            (p.name, p.port) for p in owner.ports
        ]
    for name, secret in d.secrets.items():
        assert secret["metadata"]["name"] == name
        _k8s_name(name)
        _k8s_labels(secret["metadata"]["labels"])
    for c in clusters:
        values = yaml.load(
            base64.b64decode(d.secrets[f"{c.name}-envoy-values"]["data"]["values.yaml"]),
            Loader=_LOADER,
        )
        boot = yaml.load(values["files"]["envoy.yaml"], Loader=_LOADER)
        assert boot["node"]["id"] == c.name
        if c.enrolled:  # its keys stay home: none in its values, none stored
            assert set(values["files"]) == {"envoy.yaml"} and values["agent"]["cluster"] == c.name
            assert f"{c.name}-atlas-identity" not in d.secrets
            assert c.name not in d.fleet.identities


_OWNER = re.compile(r"_[a-z0-9-]{1,62}\._tcp\.(?:[a-z0-9-]{1,63}\.)?sidecars\.thanos\.atlas\.")


_SRV_LINE = re.compile(r"(\S+) 60 IN SRV 10 100 (\d+) (\S+)")
DNSPYTHON_MAX_LINES = 40  # larger zones are read line by line (dnspython: ~1 ms a record)


def _srv_records(text: str) -> set[tuple[str, str, int]]:
    """The SRV records of a zone, read by dnspython (small zones) or line by line; any
    other record below the apex fails."""
    srv: set[tuple[str, str, int]] = set()
    if text.count("\n") <= DNSPYTHON_MAX_LINES:
        zone = dns.zone.from_text(text, origin="atlas.", relativize=False, check_origin=True)
        for name, node in zone.nodes.items():
            owner = name.to_text()
            for rdataset in node.rdatasets:
                kind = dns.rdatatype.to_text(rdataset.rdtype)
                if owner == "atlas.":
                    assert kind in ("SOA", "NS"), (owner, kind)
                    continue
                assert kind == "SRV", (owner, kind)
                for rd in rdataset:
                    assert isinstance(rd, dns.rdtypes.IN.SRV.SRV)
                    srv.add((owner, rd.target.to_text(), rd.port))
        return srv
    lines = text.splitlines()
    assert lines[2:4] == ["$ORIGIN atlas.", "$TTL 60"], lines[:6]
    assert " IN SOA " in lines[4] and " IN NS " in lines[5], lines[:6]
    for line in lines[6:]:
        m = _SRV_LINE.fullmatch(line)
        assert m, line
        srv.add((m[1], m[3], int(m[2])))
    return srv


def check_zone(out: Outputs, clusters: Sequence[DownstreamCluster]) -> None:
    s = out.desired.fleet.settings
    srv = _srv_records(out.zone)
    for owner, _, _ in srv:
        assert _OWNER.fullmatch(owner), owner
    want = set()
    for c in clusters:
        groups = [""] + ([f"{c.dns_group}."] if c.dns_group else [])
        for p in c.ports:
            for g in groups:
                for svc in c.sidecar_services():
                    target = f"{svc}.{s.namespace}.svc.{s.cluster_domain}."
                    want.add((f"_{p.name}._tcp.{g}sidecars.thanos.atlas.", target, p.port))
    assert srv == want


def check_snapshots(out: Outputs, clusters: Sequence[DownstreamCluster]) -> None:
    assert out.xds_problems == (), out.xds_problems
    assert set(out.snapshots) == {OBSERVABILITY_NODE, *(c.name for c in clusters)}
    decoded: dict[tuple[str, str, str], Any] = {}
    for node, snap in out.snapshots.items():
        keys = [
            tuple(f.string_key for f in _DECODERS[SCOPED_ROUTE].FromString(r.body).key.fragments)
            for r in snap.of_type(SCOPED_ROUTE).values()
        ]
        assert len(keys) == len(set(keys)), node
        for type_url, resources in snap.resources.items():
            for name, r in resources.items():
                msg = _DECODERS[type_url].FromString(r.body)
                assert (msg.cluster_name if type_url == ENDPOINT else msg.name) == name
                decoded[(node, type_url, name)] = msg
                if type_url == ROUTE:
                    domains = [dm for vh in msg.virtual_hosts for dm in vh.domains]
                    assert len(domains) == len(set(domains)), (node, name)
                    vhosts = [vh.name for vh in msg.virtual_hosts]
                    assert len(vhosts) == len(set(vhosts)), (node, name)
    for c in clusters:
        for kind in ("thanos", "prom"):
            up = decoded[(OBSERVABILITY_NODE, ENDPOINT, f"{c.name}-{kind}")]
            [ep] = up.endpoints[0].lb_endpoints
            assert ep.endpoint.address.socket_address.address == c.external_ip
