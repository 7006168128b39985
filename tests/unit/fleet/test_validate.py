"""validate: the defaults of docs/interface.md, the accepted variants and the malformed-Service matrix."""

from __future__ import annotations

from typing import Any

import pytest

from atlasd import labels
from atlasd.fleet.validate import (
    MAX_REPLICAS,
    enrollment_mode,
    parse_selector,
    select_alertmanagers,
    validate_all,
    validate_cluster,
)
from atlasd.model import (
    DownstreamCluster,
    LocalAlertmanager,
    Problem,
    ServicePort,
    Settings,
    Upstream,
)
from tests.unit.reconcile.builders import cluster_service

S = Settings()


def _ok(svc: dict[str, Any], **kw: Any) -> DownstreamCluster:
    result = validate_cluster(svc, S, **kw)
    assert isinstance(result, DownstreamCluster), result
    return result


def _problems(svc: dict[str, Any], **kw: Any) -> list[Problem]:
    result = validate_cluster(svc, S, **kw)
    assert isinstance(result, list), f"expected problems, got {result}"
    assert result
    return result


def test_spec_defaults() -> None:
    c = _ok(cluster_service("east", uid="u-1"))
    assert c.name == "east"
    assert c.external_ip == "203.0.113.10"
    assert c.replicas == 1
    assert c.envoy_selectors == (("app", "envoy"), ("release", "atlas"))
    assert c.thanos == Upstream("prometheus-operated.monitoring.svc.cluster.local", 10901)
    assert c.prometheus == Upstream("prometheus-operated.monitoring.svc.cluster.local", 9090)
    assert c.alertmanager == Upstream("alertmanager-operated.monitoring.svc.cluster.local", 9093)
    assert c.ports == (
        ServicePort("prometheus", 9090),
        ServicePort("thanos", 10901),
        ServicePort("alertmanager", 9093),
    )
    assert c.dns_group is None and c.replica_host_template is None
    assert c.source is not None and (c.source.name, c.source.uid) == ("east", "u-1")
    assert c.sidecar_services() == ("east-thanos-sidecar0",)


def test_default_selectors_come_from_settings() -> None:
    settings = Settings(default_envoy_selectors=(("app", "gw"),))
    c = validate_cluster(cluster_service("east"), settings)
    assert isinstance(c, DownstreamCluster) and c.envoy_selectors == (("app", "gw"),)


H = "prometheus-k8s-{replica}.prometheus-operated.monitoring.svc.cluster.local"


@pytest.mark.parametrize(
    ("kwargs", "check"),
    [
        ({"replicas": "3"}, lambda c: c.replicas == 3),
        ({"replicas": str(MAX_REPLICAS)}, lambda c: c.replicas == MAX_REPLICAS),
        (
            {"annotations": {labels.ENVOY_SELECTORS_ANNOTATION: "app=proxy, tier=edge"}},
            lambda c: c.envoy_selectors == (("app", "proxy"), ("tier", "edge")),
        ),
        (
            {"annotations": {labels.ENVOY_SELECTORS_ANNOTATION: "example.com/app=x"}},
            lambda c: c.envoy_selectors == (("example.com/app", "x"),),
        ),
        (
            {
                "annotations": {
                    labels.THANOS_SERVICE_ANNOTATION: "thanos.obs.svc",
                    labels.THANOS_SERVICE_PORT_ANNOTATION: "10911",
                    labels.PROMETHEUS_SERVICE_ANNOTATION: "prom.local",
                    labels.PROMETHEUS_SERVICE_PORT_ANNOTATION: "9091",
                    labels.ALERTMANAGER_SERVICE_ANNOTATION: "am.local",
                    labels.ALERTMANAGER_SERVICE_PORT_ANNOTATION: "9094",
                }
            },
            lambda c: (
                (c.thanos, c.prometheus, c.alertmanager)
                == (
                    Upstream("thanos.obs.svc", 10911),
                    Upstream("prom.local", 9091),
                    Upstream("am.local", 9094),
                )
            ),
        ),
        (
            {"annotations": {labels.DNS_GROUP_ANNOTATION: "team-a"}},
            lambda c: c.dns_group == "team-a",
        ),
        (
            {"replicas": "2", "annotations": {labels.REPLICA_HOST_TEMPLATE_ANNOTATION: H}},
            lambda c: (
                c.thanos_upstream(1).host
                == "prometheus-k8s-1.prometheus-operated.monitoring.svc.cluster.local"
            ),
        ),
        ({"ip": "2001:db8::1"}, lambda c: c.external_ip == "2001:db8::1"),
        ({"ip": "2001:DB8:0::1"}, lambda c: c.external_ip == "2001:db8::1"),
        ({"ip": "10.1.2.3"}, lambda c: c.external_ip == "10.1.2.3"),
    ],
)
def test_accepted_variants(kwargs: dict[str, Any], check: Any) -> None:
    ip = kwargs.pop("ip", "203.0.113.10")
    assert check(_ok(cluster_service("east", ip, **kwargs)))


@pytest.mark.parametrize(
    ("annotation", "default", "stored", "enrolled"),
    [
        # Annotated: the annotation decides, whatever the default or a stored identity.
        ("true", False, False, True),
        ("true", False, True, True),
        ("false", True, False, False),
        # Not annotated: the default, but a stored identity keeps the compatible mode.
        (None, True, False, True),
        (None, True, True, False),
        (None, False, False, False),
    ],
)
def test_enrollment_mode(
    annotation: str | None, default: bool, stored: bool, enrolled: bool
) -> None:
    settings = Settings(enrollment_default=default)
    anns = {labels.ENROLLMENT_ANNOTATION: annotation} if annotation is not None else None
    c = validate_cluster(cluster_service("east", annotations=anns), settings)
    assert isinstance(c, DownstreamCluster)
    assert c.enrollment_annotation == (None if annotation is None else annotation == "true")
    settled = enrollment_mode(c, settings, identity_stored=stored)
    assert settled.enrolled is enrolled
    # Settling is idempotent and keeps the object when nothing changes.
    assert enrollment_mode(settled, settings, identity_stored=stored) is settled


def test_a_bad_enrollment_annotation_is_named_beside_the_other_problems() -> None:
    svc = cluster_service(
        "east", annotations={labels.ENROLLMENT_ANNOTATION: "1", labels.DNS_GROUP_ANNOTATION: "A"}
    )
    fields = {p.field for p in _problems(svc)}
    assert fields == {
        f'metadata.annotations["{labels.ENROLLMENT_ANNOTATION}"]',
        f'metadata.annotations["{labels.DNS_GROUP_ANNOTATION}"]',
    }


def test_loopback_only_when_allowed() -> None:
    svc = cluster_service("east", "127.0.0.2")
    assert _problems(svc)[0].field == "spec.externalIPs[0]"
    assert _ok(svc, allow_loopback=True).external_ip == "127.0.0.2"


def _svc_without_ports_names() -> dict[str, Any]:
    return cluster_service("east", ports=[{"port": 9090}])


def _svc(mut: Any) -> dict[str, Any]:
    svc = cluster_service("east")
    mut(svc)
    return svc


R = f'metadata.labels["{labels.REPLICAS_LABEL}"]'
SEL = f'metadata.annotations["{labels.ENVOY_SELECTORS_ANNOTATION}"]'
TH = f'metadata.annotations["{labels.THANOS_SERVICE_ANNOTATION}"]'
THP = f'metadata.annotations["{labels.THANOS_SERVICE_PORT_ANNOTATION}"]'
PR = f'metadata.annotations["{labels.PROMETHEUS_SERVICE_ANNOTATION}"]'
AM = f'metadata.annotations["{labels.ALERTMANAGER_SERVICE_ANNOTATION}"]'
DG = f'metadata.annotations["{labels.DNS_GROUP_ANNOTATION}"]'
TPL = f'metadata.annotations["{labels.REPLICA_HOST_TEMPLATE_ANNOTATION}"]'


def _ann(key: str, value: str, **kw: Any) -> dict[str, Any]:
    return cluster_service("east", annotations={key: value}, **kw)


# (id, Service, field the Problem must name, words the message must contain)
MALFORMED: list[tuple[str, dict[str, Any], str, str]] = [
    ("no-external-ips", cluster_service("east", None), "spec.externalIPs", "required"),
    (
        "empty-external-ips",
        _svc(lambda s: s["spec"].update(externalIPs=[])),
        "spec.externalIPs",
        "required",
    ),
    ("invalid-ip", cluster_service("east", "300.1.1.1"), "spec.externalIPs[0]", "not an IP"),
    (
        "hostname-ip",
        cluster_service("east", "envoy.example.com"),
        "spec.externalIPs[0]",
        "not an IP",
    ),
    ("loopback-ip", cluster_service("east", "127.0.0.1"), "spec.externalIPs[0]", "loopback"),
    ("loopback-ipv6", cluster_service("east", "::1"), "spec.externalIPs[0]", "loopback"),
    ("link-local-ip", cluster_service("east", "169.254.1.1"), "spec.externalIPs[0]", "link-local"),
    ("multicast-ip", cluster_service("east", "224.0.0.5"), "spec.externalIPs[0]", "multicast"),
    ("unspecified-ip", cluster_service("east", "0.0.0.0"), "spec.externalIPs[0]", "unspecified"),
    ("bad-second-ip", cluster_service("east", extra_ips=["x"]), "spec.externalIPs[1]", "not an IP"),
    ("replicas-abc", cluster_service("east", replicas="abc"), R, "positive decimal"),
    ("replicas-minus-one", cluster_service("east", replicas="-1"), R, "positive decimal"),
    ("replicas-zero", cluster_service("east", replicas="0"), R, "positive decimal"),
    ("replicas-huge", cluster_service("east", replicas="1000000"), R, "maximum"),
    ("replicas-65", cluster_service("east", replicas=str(MAX_REPLICAS + 1)), R, "maximum"),
    ("replicas-space", cluster_service("east", replicas=" 2"), R, "positive decimal"),
    ("replicas-float", cluster_service("east", replicas="1.5"), R, "positive decimal"),
    ("selector-no-equals", _ann(labels.ENVOY_SELECTORS_ANNOTATION, "app"), SEL, "key=value"),
    ("selector-empty", _ann(labels.ENVOY_SELECTORS_ANNOTATION, ""), SEL, "empty"),
    ("selector-empty-value", _ann(labels.ENVOY_SELECTORS_ANNOTATION, "app="), SEL, "label value"),
    (
        "selector-newline",
        _ann(labels.ENVOY_SELECTORS_ANNOTATION, "app=envoy\nx=y"),
        SEL,
        "label value",
    ),
    ("selector-dup-key", _ann(labels.ENVOY_SELECTORS_ANNOTATION, "a=b,a=c"), SEL, "twice"),
    ("selector-trailing-comma", _ann(labels.ENVOY_SELECTORS_ANNOTATION, "a=b,"), SEL, "key=value"),
    ("selector-bad-key", _ann(labels.ENVOY_SELECTORS_ANNOTATION, "-a=b"), SEL, "label key"),
    ("selector-quote", _ann(labels.ENVOY_SELECTORS_ANNOTATION, 'a="b"'), SEL, "label value"),
    ("host-newline", _ann(labels.THANOS_SERVICE_ANNOTATION, "a.svc\nb"), TH, "DNS name"),
    ("host-space", _ann(labels.THANOS_SERVICE_ANNOTATION, "a svc"), TH, "DNS name"),
    ("host-quote", _ann(labels.PROMETHEUS_SERVICE_ANNOTATION, 'a"b.svc'), PR, "DNS name"),
    ("host-semicolon", _ann(labels.ALERTMANAGER_SERVICE_ANNOTATION, "a.svc;rm"), AM, "DNS name"),
    ("host-empty", _ann(labels.ALERTMANAGER_SERVICE_ANNOTATION, ""), AM, "empty"),
    ("host-trailing-dot-label", _ann(labels.THANOS_SERVICE_ANNOTATION, "a..b"), TH, "DNS name"),
    ("host-too-long", _ann(labels.THANOS_SERVICE_ANNOTATION, "a" * 64 + ".svc"), TH, "DNS name"),
    ("port-annotation-abc", _ann(labels.THANOS_SERVICE_PORT_ANNOTATION, "abc"), THP, "port number"),
    ("port-annotation-zero", _ann(labels.THANOS_SERVICE_PORT_ANNOTATION, "0"), THP, "port number"),
    (
        "port-annotation-big",
        _ann(labels.THANOS_SERVICE_PORT_ANNOTATION, "65536"),
        THP,
        "port number",
    ),
    ("dns-group-upper", _ann(labels.DNS_GROUP_ANNOTATION, "Team"), DG, "DNS-1123"),
    ("dns-group-dot", _ann(labels.DNS_GROUP_ANNOTATION, "a.b"), DG, "DNS-1123"),
    (
        "template-no-replica",
        _ann(labels.REPLICA_HOST_TEMPLATE_ANNOTATION, "a.svc"),
        TPL,
        "{replica}",
    ),
    (
        "template-other-field",
        _ann(labels.REPLICA_HOST_TEMPLATE_ANNOTATION, "{replica}.{x}"),
        TPL,
        "other",
    ),
    (
        "template-space",
        _ann(labels.REPLICA_HOST_TEMPLATE_ANNOTATION, "p-{replica} .svc"),
        TPL,
        "DNS name",
    ),
    (
        "template-format-spec",
        _ann(labels.REPLICA_HOST_TEMPLATE_ANNOTATION, "p{replica:>3}.s"),
        TPL,
        "format",
    ),
    (
        "template-unbalanced",
        _ann(labels.REPLICA_HOST_TEMPLATE_ANNOTATION, "p{replica.s"),
        TPL,
        "{replica}",
    ),
    (
        "missing-port-name",
        cluster_service("east", ports=[{"port": 9090}]),
        "spec.ports[0].name",
        "required",
    ),
    (
        "one-of-two-port-names-missing",
        cluster_service("east", ports=[{"name": "a", "port": 1}, {"port": 2}]),
        "spec.ports[1].name",
        "required",
    ),
    (
        "bad-port-name",
        cluster_service("east", ports=[{"name": "Thanos_1", "port": 1}]),
        "spec.ports[0].name",
        "DNS-1123",
    ),
    (
        "dup-port-name",
        cluster_service("east", ports=[{"name": "a", "port": 1}, {"name": "a", "port": 2}]),
        "spec.ports[1].name",
        "another port",
    ),
    (
        "port-zero",
        cluster_service("east", ports=[{"name": "a", "port": 0}]),
        "spec.ports[0].port",
        "port number",
    ),
    (
        "port-string",
        cluster_service("east", ports=[{"name": "a", "port": "80"}]),
        "spec.ports[0].port",
        "port number",
    ),
    (
        "port-udp",
        cluster_service("east", ports=[{"name": "a", "port": 53, "protocol": "UDP"}]),
        "spec.ports[0].protocol",
        "TCP",
    ),
    ("no-ports", cluster_service("east", ports=[]), "spec.ports", "required"),
    ("name-atlas", cluster_service("atlas"), "metadata.name", "reserved"),
    ("name-63-chars", cluster_service("a" * 63), "metadata.name", "DNS label"),
    ("name-48-chars", cluster_service("a" * 48), "metadata.name", "derived name"),
    (
        "name-long-with-replicas",
        cluster_service("a" * 47, replicas="11"),
        "metadata.name",
        "derived name",
    ),
    (
        "name-collides-with-sidecar",
        cluster_service("east-thanos-sidecar0"),
        "metadata.name",
        "collides",
    ),
    ("name-upper", cluster_service("East"), "metadata.name", "DNS-1123"),
    (
        "enrollment-True",
        _ann(labels.ENROLLMENT_ANNOTATION, "True"),
        f'metadata.annotations["{labels.ENROLLMENT_ANNOTATION}"]',
        'neither "true"',
    ),
    (
        "enrollment-yes",
        _ann(labels.ENROLLMENT_ANNOTATION, "yes"),
        f'metadata.annotations["{labels.ENROLLMENT_ANNOTATION}"]',
        "until it is one of them",
    ),
]


def test_matrix_is_large_enough() -> None:
    assert len(MALFORMED) >= 20
    assert len({m[0] for m in MALFORMED}) == len(MALFORMED)


@pytest.mark.parametrize(
    ("svc", "field", "words"), [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED]
)
def test_malformed_service_is_rejected_with_the_field(
    svc: dict[str, Any], field: str, words: str
) -> None:
    problems = _problems(svc)
    matching = [p for p in problems if p.field == field]
    assert matching, [str(p) for p in problems]
    assert any(words in p.message for p in matching), [p.message for p in matching]
    assert all(p.reason == "InvalidCluster" and p.source.kind == "Service" for p in problems)


def test_longest_accepted_name() -> None:
    # 47 + len("-thanos-sidecar0") == 63
    assert _ok(cluster_service("a" * 47)).name == "a" * 47


def test_validate_all_skips_bad_keeps_good_and_ignores_unlabeled() -> None:
    bad = cluster_service("bad", None)
    unlabeled = cluster_service("plain")
    unlabeled["metadata"]["labels"] = {"app": "x"}
    false_label = cluster_service("nope")
    false_label["metadata"]["labels"][labels.CLUSTER_LABEL] = "false"
    good_b = cluster_service("b", "203.0.113.2")
    good_a = cluster_service("a", "203.0.113.1")
    clusters, problems = validate_all([bad, unlabeled, false_label, good_b, good_a], S)
    assert [c.name for c in clusters] == ["a", "b"]
    assert [p.source.name for p in problems] == ["bad"]


def test_duplicate_external_ip_first_by_age_wins() -> None:
    young = cluster_service("aaa", "203.0.113.9")
    young["metadata"]["creationTimestamp"] = "2026-02-01T00:00:00Z"
    old = cluster_service("zzz", "203.0.113.9")
    old["metadata"]["creationTimestamp"] = "2026-01-01T00:00:00Z"
    clusters, problems = validate_all([young, old], S)
    assert [c.name for c in clusters] == ["zzz"]
    (p,) = problems
    assert (p.source.name, p.field) == ("aaa", "spec.externalIPs[0]")
    assert "zzz" in p.message


def test_problem_str_names_object_and_field() -> None:
    (p,) = _problems(cluster_service("east", replicas="abc"))
    assert str(p) == f"Service monitoring/east: {R}: 'abc' is not a positive decimal integer"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("app=envoy,release=atlas", (("app", "envoy"), ("release", "atlas"))),
        (" app=envoy ", (("app", "envoy"),)),
        ("\tapp=envoy,\nrelease=atlas\t", (("app", "envoy"), ("release", "atlas"))),
        ("a.b/c-d=e_f.g", (("a.b/c-d", "e_f.g"),)),
    ],
)
def test_parse_selector(text: str, expected: tuple[tuple[str, str], ...]) -> None:
    assert parse_selector(text) == expected


def _am(name: str, **kw: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "selector": {"app": "alertmanager"},
        "ports": [{"name": "web", "port": 9093}],
    }
    spec.update(kw.pop("spec", {}))
    lbls = kw.pop("labels", {"app": "kube-prometheus-stack-alertmanager"})
    return {"metadata": {"name": name, "namespace": "monitoring", "labels": lbls}, "spec": spec}


def test_select_alertmanagers() -> None:
    services = [
        _am("am-b"),
        _am(
            "am-a", spec={"ports": [{"name": "mesh", "port": 9094}, {"name": "http", "port": 9095}]}
        ),
        _am("no-selector", spec={"selector": None}),
        _am("no-ports", spec={"ports": []}),
        _am("other", labels={"app": "grafana"}),
    ]
    assert select_alertmanagers(services, S.alertmanager_selector) == (
        LocalAlertmanager("am-a", "monitoring", 9095),
        LocalAlertmanager("am-b", "monitoring", 9093),
    )
    assert select_alertmanagers(services, ()) == ()
