"""Strict validation of cluster Services: raw Service dicts -> ``DownstreamCluster`` or ``Problem``s.

This module is pure (no I/O). It owns the parsing rules of every label and annotation of
docs/interface.md ("Rules for the rest of the Service", "Annotations"), so that bad input
never reaches a builder and never stops the daemon: a Service that fails any rule is
skipped and described by one ``Problem`` per failing field (the field path, e.g.
``metadata.labels["goatlas.io/replicas"]``, and what is wrong); every other cluster keeps
working.

Rules (a Service is a cluster when its label ``goatlas.io/cluster`` is exactly ``"true"``):

- ``metadata``, ``spec``, ``metadata.labels``/``annotations`` are objects; the value
  of every label and annotation below is a string (a standalone store's YAML can
  hold a number or a boolean there: that is a Problem, never silently ignored; keys
  atlasd does not read are not looked at).
- ``metadata.name``: a DNS-1123 label; not ``atlas`` (the observability node id); not of the
  form ``<x>-thanos-sidecar<i>`` (it would collide with the sidecar Service of cluster
  ``<x>``); every derived name — ``<name>-thanos-sidecar<replicas-1>``,
  ``<name>-envoy-values``, ``<name>-atlas-identity`` — must fit a DNS label (63 chars).
- ``spec.externalIPs``: present, non-empty; every entry an address ``atlasd.addresses``
  accepts as remote: not loopback (unless ``allow_loopback``; the standalone demo runs
  Envoys on loopback), link-local (the metadata service), multicast, unspecified or
  reserved — judged on the IPv4 address inside IPv4-mapped, 6to4, NAT64, ... forms. Only
  ``externalIPs[0]`` is used; an IPv4-mapped one is written as the IPv4 address.
- ``spec.ports``: non-empty; each has a ``name`` (DNS-1123 label of at most 62 characters,
  so that the SRV label ``_<name>`` fits; required, unique), an integer ``port`` in
  1..65535 and protocol TCP (the Envoys proxy TCP only).
- label ``goatlas.io/replicas``: decimal digits without sign or leading zero, 1..``MAX_REPLICAS``
  (64: far above any real Thanos HA setup, and it bounds the objects one Service can create).
- annotation ``goatlas.io/envoy-selectors``: ``k=v[,k=v...]`` as ``atlasd.kube.selectors``
  parses it: whitespace (spaces, tabs, newlines) around an entry is tolerated, each key a
  qualified label key, each value a non-empty label value, no key twice.
- annotations ``goatlas.io/{thanos,prometheus,alertmanager}-service``: DNS names (letters,
  digits, ``-`` and ``.``; labels of 1..63 chars; at most 253 chars) — so no spaces, quotes,
  newlines or ``;`` can reach the Envoy configuration or the zone.
- annotations ``...-service-port``: decimal 1..65535.
- annotation ``goatlas.io/dns-group``: a DNS-1123 label.
- annotation ``goatlas.io/replica-host-template``: contains ``{replica}``, no other
  replacement field, and with every replica index substituted is a DNS name.
- annotation ``goatlas.io/enrollment``: exactly ``"true"`` (the cluster enrolls) or
  ``"false"`` (the compatible mode). Anything else (``"True"``, ``"yes"``) rejects the
  Service like any bad annotation: guessing either mode could pull the keys out from under
  a running Envoy or store keys the operator meant to keep home, so nothing of the cluster
  changes until it is fixed. Without it, ``enrollment_mode`` decides.

Duplicates: two clusters with the same ``externalIPs[0]`` would both dial one Envoy whose
certificate names only one of them, so only the first (oldest ``creationTimestamp``, then
name) is accepted; later ones get a Problem naming the cluster that holds the address.
Duplicate names cannot happen in one Kubernetes namespace, but a caller's list can hold
them: the same rule keeps the oldest, and later ones get a Problem at ``metadata.name``.

Local Alertmanagers (``select_alertmanagers``, docs/interface.md "The Envoy configuration
served over ADS"): the original design keeps Services "that select one pod";
atlasd does not watch pods (no Endpoints without a controller-manager either), so it keeps
every Service whose labels match the selector and that has a ``spec.selector`` (it selects
pods at all) and at least one port, ordered by name for a stable ``alertmanager<i>``
numbering. The port used is the one named ``http``/``web`` if present, else the first.
"""

from __future__ import annotations

import re
import string
from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import Any

from atlasd import labels
from atlasd.addresses import check_remote_address
from atlasd.kube import bodies
from atlasd.kube.selectors import pairs_match

# Re-exported for the modules that import them from here (identity_secret_name:
# atlasd.fleet.state, atlasd.reconcile.applier; parse_selector: atlasd.cli.options); their
# owners are atlasd.labels and atlasd.kube.selectors.
from atlasd.kube.selectors import parse_selector as parse_selector
from atlasd.labels import identity_secret_name as identity_secret_name
from atlasd.model import (
    OBSERVABILITY_NODE,
    DownstreamCluster,
    LocalAlertmanager,
    ObjectRef,
    Problem,
    ServicePort,
    Settings,
    Upstream,
)

MAX_REPLICAS = 64
DNS_LABEL_MAX = 63
DNS_NAME_MAX = 253
SIDECAR_INFIX = "-thanos-sidecar"
# The labels and annotations validation reads (their values must be strings).
READ_KEYS = frozenset(
    {
        labels.REPLICAS_LABEL,
        labels.ENVOY_SELECTORS_ANNOTATION,
        labels.THANOS_SERVICE_ANNOTATION,
        labels.THANOS_SERVICE_PORT_ANNOTATION,
        labels.PROMETHEUS_SERVICE_ANNOTATION,
        labels.PROMETHEUS_SERVICE_PORT_ANNOTATION,
        labels.ALERTMANAGER_SERVICE_ANNOTATION,
        labels.ALERTMANAGER_SERVICE_PORT_ANNOTATION,
        labels.DNS_GROUP_ANNOTATION,
        labels.REPLICA_HOST_TEMPLATE_ANNOTATION,
        labels.ENROLLMENT_ANNOTATION,
    }
)
# A port name becomes the SRV owner label "_<name>", which must fit in 63 characters.
PORT_NAME_MAX = DNS_LABEL_MAX - 1

_DNS1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_HOST_LABEL = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9]*[A-Za-z0-9])?")
_REPLICAS = re.compile(r"[1-9][0-9]*")
_PORT = re.compile(r"[1-9][0-9]{0,4}")
_SIDECAR_NAME = re.compile(r".+-thanos-sidecar[0-9]+")


# --- small predicates and parsers (each raises ValueError with a user-facing message) ---


def is_dns_label(value: str) -> bool:
    return len(value) <= DNS_LABEL_MAX and _DNS1123_LABEL.fullmatch(value) is not None


def check_dns_name(value: str) -> str:
    """A host name: dot-separated labels of letters, digits and '-'; no trailing dot."""
    if not value:
        raise ValueError("must not be empty")
    if len(value) > DNS_NAME_MAX:
        raise ValueError(f"must be at most {DNS_NAME_MAX} characters")
    for part in value.split("."):
        if len(part) > DNS_LABEL_MAX or _HOST_LABEL.fullmatch(part) is None:
            raise ValueError(
                f"{value!r} is not a DNS name (labels of letters, digits and '-', "
                f"1..{DNS_LABEL_MAX} characters, separated by '.')"
            )
    return value


def parse_port(value: str) -> int:
    if _PORT.fullmatch(value) is None or not 1 <= int(value) <= 65535:
        raise ValueError(f"{value!r} is not a port number (1..65535)")
    return int(value)


def parse_replicas(value: str) -> int:
    if _REPLICAS.fullmatch(value) is None:
        raise ValueError(f"{value!r} is not a positive decimal integer")
    n = int(value)
    if n > MAX_REPLICAS:
        raise ValueError(f"{n} is above the maximum of {MAX_REPLICAS}")
    return n


def parse_enrollment(value: str) -> bool:
    if value not in ("true", "false"):
        raise ValueError(
            f'{value!r} is neither "true" (the cluster enrolls: its keys stay home) nor '
            '"false" (the compatible mode: atlasd makes its keys); nothing of this cluster '
            "changes until it is one of them"
        )
    return value == "true"


def enrollment_mode(
    cluster: DownstreamCluster, settings: Settings, *, identity_stored: bool
) -> DownstreamCluster:
    """``cluster`` in the mode it is served in: its annotation's, else
    ``settings.enrollment_default`` unless its identity Secret (``<c>-atlas-identity``)
    exists, which keeps an unannotated cluster compatible (a chart upgrade that turns the
    default on never pulls the keys out from under running downstream Envoys). The same
    object when its mode is already that one."""
    if cluster.enrollment_annotation is not None:
        enrolled = cluster.enrollment_annotation
    else:
        enrolled = settings.enrollment_default and not identity_stored
    if enrolled == cluster.enrolled:
        return cluster
    return replace(cluster, enrolled=enrolled)


def check_external_ip(value: object, *, allow_loopback: bool) -> str:
    """A downstream Envoy's address, judged by ``atlasd.addresses`` (IPv4 carried inside an
    IPv6 form is judged as that IPv4); returns its canonical text."""
    return check_remote_address(value, allow_loopback=allow_loopback)


def check_host_template(template: str, replicas: int) -> str:
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise ValueError(f"is not a template with {{replica}}: {e}") from None
    fields = [f for _, f, _, _ in parsed if f is not None]
    if "replica" not in fields:
        raise ValueError("must contain {replica}")
    if any(f != "replica" for f in fields):
        raise ValueError("may contain no replacement field other than {replica}")
    if any(f is not None and (spec or conv) for _, f, spec, conv in parsed):
        raise ValueError("{replica} takes no format spec or conversion")
    for i in range(replicas):
        check_dns_name(template.format(replica=i))
    return template


# --- one Service ---


def _ann(name: str) -> str:
    return f'metadata.annotations["{name}"]'


def _lbl(name: str) -> str:
    return f'metadata.labels["{name}"]'


def source_ref(service: Mapping[str, Any], settings: Settings) -> ObjectRef:
    return ObjectRef(
        kind="Service",
        name=bodies.name(service),
        namespace=bodies.namespace(service) or settings.namespace,
        uid=bodies.uid(service),
    )


def is_cluster_service(service: Mapping[str, Any]) -> bool:
    return bodies.labels(service).get(labels.CLUSTER_LABEL) == "true"


def cluster_label_problem(service: Mapping[str, Any], settings: Settings) -> Problem | None:
    """The Problem of a Service that carries the cluster label with a value other than
    exactly ``"true"`` (``"True"``, ``"false"``, ...): it is not a cluster, and if it was
    one, what atlasd made for it is removed. None for a cluster Service or an unlabelled
    one."""
    lbls = bodies.labels(service)
    if labels.CLUSTER_LABEL not in lbls:
        return None
    value = lbls[labels.CLUSTER_LABEL]
    if value == "true":
        return None
    return Problem(
        source=source_ref(service, settings),
        field=f'metadata.labels["{labels.CLUSTER_LABEL}"]',
        message=(
            f'is {value!r}; a cluster Service is labelled exactly "true" '
            "(this Service is not served and what atlasd made for it is removed)"
        ),
        reason="InvalidClusterLabel",
    )


def _str_map(obj: Mapping[str, Any], key: str, add: Any) -> dict[str, str]:
    """The string entries of ``metadata.<key>``. An entry validation reads that is not a
    string (a YAML number or boolean in a standalone store) is a Problem, not ignored."""
    raw = obj.get(key)
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        add(f"metadata.{key}", "must be an object")
        return {}
    out: dict[str, str] = {}
    for k, v in raw.items():
        if isinstance(v, str):
            out[str(k)] = v
        elif k in READ_KEYS:
            add(f'metadata.{key}["{k}"]', f"must be a string, not {type(v).__name__}")
    return out


def _parse_ports(spec: Mapping[str, Any], add: Any) -> tuple[ServicePort, ...]:
    raw = spec.get("ports")
    if raw is not None and not isinstance(raw, list):
        add("spec.ports", f"must be a list of ports, not {type(raw).__name__}")
        return ()
    if not raw:
        add("spec.ports", "at least one named port is required")
        return ()
    ports: list[ServicePort] = []
    names: set[str] = set()
    for i, p in enumerate(raw):
        where = f"spec.ports[{i}]"
        if not isinstance(p, Mapping):
            add(where, "must be an object")
            continue
        name = p.get("name")
        number = p.get("port")
        protocol = p.get("protocol", "TCP")
        ok = True
        if not isinstance(name, str) or not name:
            add(f"{where}.name", "is required (it names the SRV record and the Envoy route)")
            ok = False
        elif not is_dns_label(name):
            add(f"{where}.name", f"{name!r} is not a DNS-1123 label")
            ok = False
        elif len(name) > PORT_NAME_MAX:
            add(
                f"{where}.name",
                f"{name!r} is {len(name)} characters; the SRV record's label _<name> "
                f"leaves room for {PORT_NAME_MAX}",
            )
            ok = False
        elif name in names:
            add(f"{where}.name", f"{name!r} is used by another port")
            ok = False
        if isinstance(number, bool) or not isinstance(number, int) or not 1 <= number <= 65535:
            add(f"{where}.port", f"{number!r} is not a port number (1..65535)")
            ok = False
        if protocol != "TCP":
            add(f"{where}.protocol", f"{protocol!r} is not supported (TCP only)")
            ok = False
        if ok:
            assert isinstance(name, str) and isinstance(number, int)
            names.add(name)
            ports.append(ServicePort(name=name, port=number, protocol="TCP"))
    return tuple(ports)


def _parse_external_ips(spec: Mapping[str, Any], add: Any, *, allow_loopback: bool) -> str:
    """``spec.externalIPs``: every entry checked; the first is the downstream Envoy's."""
    ips = spec.get("externalIPs")
    if ips is not None and not isinstance(ips, list):
        add("spec.externalIPs", f"must be a list of addresses, not {type(ips).__name__}")
        return ""
    if not ips:
        add("spec.externalIPs", "at least one external IP (the downstream Envoy) is required")
        return ""
    first = ""
    for i, ip in enumerate(ips):
        try:
            checked = check_external_ip(ip, allow_loopback=allow_loopback)
        except ValueError as e:
            add(f"spec.externalIPs[{i}]", str(e))
        else:
            if i == 0:
                first = checked
    return first


def validate_cluster(
    service: Mapping[str, Any], settings: Settings, *, allow_loopback: bool = False
) -> DownstreamCluster | list[Problem]:
    """Validate one cluster Service; returns the cluster or every problem found."""
    ref = source_ref(service, settings)
    problems: list[Problem] = []

    def add(field: str, message: str) -> None:
        problems.append(Problem(source=ref, field=field, message=message))

    # Raw: "absent" and "not an object" are reported here, not read as empty.
    meta = service.get("metadata")
    spec = service.get("spec")
    if not isinstance(meta, Mapping):
        add("metadata", "must be an object")
        return problems
    if spec is not None and not isinstance(spec, Mapping):
        # Nothing in it can be read; the metadata is still checked below.
        add("spec", "must be an object")
    lbls = _str_map(meta, "labels", add)
    anns = _str_map(meta, "annotations", add)

    # replicas first: the derived-name length check depends on it.
    replicas = 1
    if labels.REPLICAS_LABEL in lbls:
        try:
            replicas = parse_replicas(lbls[labels.REPLICAS_LABEL])
        except ValueError as e:
            add(_lbl(labels.REPLICAS_LABEL), str(e))

    name = ref.name
    raw_name = meta.get("name")
    if raw_name is None:
        add("metadata.name", "is required")
    elif not isinstance(raw_name, str):
        add("metadata.name", f"must be a string, not {type(raw_name).__name__}")
    elif not is_dns_label(name):
        add("metadata.name", f"{name!r} is not a DNS-1123 label")
    elif name == OBSERVABILITY_NODE:
        add("metadata.name", f"{name!r} is reserved for the observability Envoy")
    elif _SIDECAR_NAME.fullmatch(name):
        add("metadata.name", f"{name!r} collides with the name of a thanos-sidecar Service")
    else:
        derived = (
            f"{name}{SIDECAR_INFIX}{max(replicas - 1, 0)}",
            labels.values_secret_name(name),
            labels.identity_secret_name(name),
        )
        for d in derived:
            if len(d) > DNS_LABEL_MAX:
                add(
                    "metadata.name",
                    f"derived name {d!r} is {len(d)} characters, above the DNS label "
                    f"limit of {DNS_LABEL_MAX}",
                )
                break

    external_ip = ""
    ports: tuple[ServicePort, ...] = ()
    if spec is None or isinstance(spec, Mapping):  # else: reported above
        external_ip = _parse_external_ips(spec or {}, add, allow_loopback=allow_loopback)
        ports = _parse_ports(spec or {}, add)

    selectors = settings.default_envoy_selectors
    if labels.ENVOY_SELECTORS_ANNOTATION in anns:
        try:
            selectors = parse_selector(anns[labels.ENVOY_SELECTORS_ANNOTATION])
        except ValueError as e:
            add(_ann(labels.ENVOY_SELECTORS_ANNOTATION), str(e))

    defaults = DownstreamCluster(name="", external_ip="", ports=())

    def upstream(host_key: str, port_key: str, default: Upstream) -> Upstream:
        host, port = default.host, default.port
        if host_key in anns:
            try:
                host = check_dns_name(anns[host_key])
            except ValueError as e:
                add(_ann(host_key), str(e))
        if port_key in anns:
            try:
                port = parse_port(anns[port_key])
            except ValueError as e:
                add(_ann(port_key), str(e))
        return Upstream(host, port)

    thanos = upstream(
        labels.THANOS_SERVICE_ANNOTATION, labels.THANOS_SERVICE_PORT_ANNOTATION, defaults.thanos
    )
    prometheus = upstream(
        labels.PROMETHEUS_SERVICE_ANNOTATION,
        labels.PROMETHEUS_SERVICE_PORT_ANNOTATION,
        defaults.prometheus,
    )
    alertmanager = upstream(
        labels.ALERTMANAGER_SERVICE_ANNOTATION,
        labels.ALERTMANAGER_SERVICE_PORT_ANNOTATION,
        defaults.alertmanager,
    )

    dns_group: str | None = None
    if labels.DNS_GROUP_ANNOTATION in anns:
        group = anns[labels.DNS_GROUP_ANNOTATION]
        if is_dns_label(group):
            dns_group = group
        else:
            add(_ann(labels.DNS_GROUP_ANNOTATION), f"{group!r} is not a DNS-1123 label")

    template: str | None = None
    if labels.REPLICA_HOST_TEMPLATE_ANNOTATION in anns:
        try:
            template = check_host_template(anns[labels.REPLICA_HOST_TEMPLATE_ANNOTATION], replicas)
        except ValueError as e:
            add(_ann(labels.REPLICA_HOST_TEMPLATE_ANNOTATION), str(e))

    enrollment: bool | None = None
    if labels.ENROLLMENT_ANNOTATION in anns:
        try:
            enrollment = parse_enrollment(anns[labels.ENROLLMENT_ANNOTATION])
        except ValueError as e:
            add(_ann(labels.ENROLLMENT_ANNOTATION), str(e))

    if problems:
        return problems
    return DownstreamCluster(
        name=name,
        external_ip=external_ip,
        ports=ports,
        replicas=replicas,
        envoy_selectors=selectors,
        thanos=thanos,
        prometheus=prometheus,
        alertmanager=alertmanager,
        dns_group=dns_group,
        replica_host_template=template,
        # The fleet settles an unannotated one by its stored identity (enrollment_mode).
        enrolled=settings.enrollment_default if enrollment is None else enrollment,
        enrollment_annotation=enrollment,
        source=ref,
    )


def age_key(service: Mapping[str, Any]) -> tuple[str, str]:
    # RFC 3339 UTC timestamps sort lexicographically; a missing one sorts last.
    return (bodies.creation_timestamp(service) or "~", bodies.name(service))


def validate_all(
    services: Iterable[Mapping[str, Any]], settings: Settings, *, allow_loopback: bool = False
) -> tuple[tuple[DownstreamCluster, ...], tuple[Problem, ...]]:
    """Validate every cluster Service (others are ignored).

    Returns the valid clusters sorted by name and the problems in input-age order.
    """
    clusters: list[DownstreamCluster] = []
    problems: list[Problem] = []
    ip_owner: dict[str, str] = {}
    names: set[str] = set()
    for svc in sorted((s for s in services if is_cluster_service(s)), key=age_key):
        result = validate_cluster(svc, settings, allow_loopback=allow_loopback)
        if isinstance(result, list):
            problems.extend(result)
            continue
        if result.name in names:
            problems.append(
                Problem(
                    source=source_ref(svc, settings),
                    field="metadata.name",
                    message=f"{result.name!r} is declared by an older cluster Service too",
                )
            )
            continue
        holder = ip_owner.get(result.external_ip)
        if holder is not None:
            problems.append(
                Problem(
                    source=source_ref(svc, settings),
                    field="spec.externalIPs[0]",
                    message=f"{result.external_ip} is already used by cluster {holder!r}",
                )
            )
            continue
        ip_owner[result.external_ip] = result.name
        names.add(result.name)
        clusters.append(result)
    clusters.sort(key=lambda c: c.name)
    return tuple(clusters), tuple(problems)


def select_alertmanagers(
    services: Iterable[Mapping[str, Any]], selector: Iterable[tuple[str, str]]
) -> tuple[LocalAlertmanager, ...]:
    """The observability cluster's Alertmanager Services, by name (see module docstring)."""
    sel = tuple(selector)
    found: list[LocalAlertmanager] = []
    for svc in services:
        spec = bodies.spec(svc)
        if not sel or not pairs_match(bodies.labels(svc), sel):
            continue
        if not spec.get("selector"):
            continue
        ports = [
            p
            for p in spec.get("ports") or []
            if isinstance(p, Mapping)
            and isinstance(p.get("port"), int)
            and not isinstance(p.get("port"), bool)
        ]
        if not ports:
            continue
        chosen = next((p for p in ports if p.get("name") in ("http", "web")), ports[0])
        name = bodies.name(svc)
        namespace = bodies.namespace(svc)
        if not is_dns_label(name) or not is_dns_label(namespace):
            continue
        found.append(LocalAlertmanager(name=name, namespace=namespace, port=int(chosen["port"])))
    found.sort(key=lambda a: (a.namespace, a.name))
    return tuple(found)
