"""The operator kit of charts/atlasd: ServiceMonitor, PrometheusRule, Grafana dashboard.

What a user of kube-prometheus-stack would see: the alert rules pass ``promtool check
rules`` and their unit tests (a firing and a quiet case for every alert); the chart with
every switch on is accepted by the real kube-apiserver (server-side dry-run) with the
prometheus-operator CRDs installed; the dashboard decodes into Grafana's own dashboard
types and every query of every panel returns data from a real Prometheus scraping a
real ``atlasd run`` (real API server, clusters, a real observability Envoy on ADS), which
also evaluates every alert rule without error.
"""

from __future__ import annotations

import base64
import copy
import enum
import json
import math
import socket
import subprocess
import sys
import time
import types
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest
import yaml
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.cog.plugins import register_default_plugins
from grafana_foundation_sdk.cog.runtime import UnknownDataquery
from grafana_foundation_sdk.models.dashboard import Dashboard

from tests.harness import components, objects
from tests.harness.envoy import Envoy
from tests.harness.kube import ApiServer
from tests.harness.prom import WebProc
from tests.harness.thanos import start_query
from tests.harness.wait import wait_until
from tests.integration.daemon_helpers import Atlasd
from tests.integration.test_charts import (
    ATLASD_CHART,
    ATLASD_CUSTOM,
    ROOT,
    Doc,
    Helm,
    of_kind,
    only,
    render,
    server_dry_run,
    write_values,
)

pytestmark = pytest.mark.integration

RULES_SOURCE = ATLASD_CHART / "files" / "prometheus-rules.yaml"
DASHBOARD_SOURCE = ATLASD_CHART / "files" / "atlasd-dashboard.json"
RULES_TESTS = ROOT / "tests" / "charts" / "atlasd-rules.test.yaml"

EVERY_SWITCH = [
    "serviceMonitor.enabled=true",
    "prometheusRule.enabled=true",
    "grafanaDashboard.enabled=true",
]


def promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(components.apt("promtool")), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def rendered_rules(helm: Helm, *sets: str) -> Doc:
    docs = render(helm, ATLASD_CHART, sets=["prometheusRule.enabled=true", *sets])
    rule: Doc = only(docs, "PrometheusRule")
    return rule


def rules_file(tmp_path: Path, rule: Doc) -> Path:
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}, sort_keys=False))
    return path


def alert_names(groups: list[Doc]) -> list[str]:
    return [r["alert"] for g in groups for r in g["rules"] if "alert" in r]


# ---------------------------------------------------------------- alert rules


def test_chart_rules_are_the_promtool_tested_file(helm: Helm) -> None:
    """The PrometheusRule holds exactly files/prometheus-rules.yaml (what promtool tests)."""
    source = yaml.safe_load(RULES_SOURCE.read_text())
    assert rendered_rules(helm)["spec"]["groups"] == source["groups"]


def test_promtool_check_rules(helm: Helm, tmp_path: Path) -> None:
    path = rules_file(tmp_path, rendered_rules(helm))
    proc = promtool("check", "rules", str(path), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    count = len(alert_names(yaml.safe_load(path.read_text())["groups"]))
    assert f"SUCCESS: {count} rules found" in proc.stdout, proc.stdout


def test_promtool_unit_tests_cover_every_alert_both_ways(helm: Helm, tmp_path: Path) -> None:
    """Each alert has a case where it fires and one where it stays quiet, and they pass
    against the rules as the chart renders them."""
    tests = yaml.safe_load(RULES_TESTS.read_text())
    fires: set[str] = set()
    quiet: set[str] = set()
    for case in tests["tests"]:
        for check in case.get("alert_rule_test") or []:
            (fires if check.get("exp_alerts") else quiet).add(check["alertname"])
    alerts = set(alert_names(yaml.safe_load(RULES_SOURCE.read_text())["groups"]))
    assert alerts - fires == set(), "alerts without a firing case"
    assert alerts - quiet == set(), "alerts without a quiet case"
    assert (fires | quiet) - alerts == set(), "cases for alerts that do not exist"

    # As committed (a user can run it by hand) ...
    proc = promtool("test", "rules", str(RULES_TESTS), cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # ... and against the rules the chart renders.
    rendered = rules_file(tmp_path, rendered_rules(helm))
    tests["rule_files"] = [str(rendered)]
    test_file = tmp_path / "rules.test.yaml"
    test_file.write_text(yaml.safe_dump(tests, sort_keys=False))
    proc = promtool("test", "rules", str(test_file), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_promtool_unit_tests_catch_a_broken_rule(tmp_path: Path) -> None:
    """The unit tests can fail: a rule that pages on any NACK count at all is caught."""
    broken = RULES_SOURCE.read_text().replace(
        "(atlasd_xds_nacked_nodes) > 0", "(atlasd_xds_nacked_nodes) >= 0"
    )
    assert broken != RULES_SOURCE.read_text()
    (tmp_path / "rules.yaml").write_text(broken)
    tests = yaml.safe_load(RULES_TESTS.read_text())
    tests["rule_files"] = ["rules.yaml"]
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(tests))
    proc = promtool("test", "rules", "t.yaml", cwd=tmp_path)
    assert proc.returncode != 0
    assert "AtlasdEnvoyNacking" in proc.stdout + proc.stderr


def test_prometheus_rule_values(helm: Helm) -> None:
    rule = rendered_rules(
        helm,
        "prometheusRule.disabled.AtlasdCAExpiresSoon=true",
        "prometheusRule.additionalAlertLabels.team=sre",
        "prometheusRule.additionalAlertLabels.severity=info",
        "prometheusRule.labels.release=kube-prometheus-stack",
        "prometheusRule.namespace=observability",
    )
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["metadata"]["namespace"] == "observability"
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    groups = rule["spec"]["groups"]
    source = yaml.safe_load(RULES_SOURCE.read_text())["groups"]
    assert alert_names(groups) == [a for a in alert_names(source) if a != "AtlasdCAExpiresSoon"]
    by_name = {r["alert"]: r for g in source for r in g["rules"]}
    for r in (r for g in groups for r in g["rules"]):
        # Added to every alert; the alert's own severity wins.
        assert r["labels"] == {**by_name[r["alert"]]["labels"], "team": "sre"} | {
            "severity": by_name[r["alert"]]["labels"]["severity"]
        }
        assert {k: v for k, v in r.items() if k != "labels"} == {
            k: v for k, v in by_name[r["alert"]].items() if k != "labels"
        }


# ---------------------------------------------------------------- ServiceMonitor


def test_service_monitor_scrapes_the_metrics_service(helm: Helm) -> None:
    docs = render(
        helm,
        ATLASD_CHART,
        release="obs",
        namespace="observability",
        sets=[
            "serviceMonitor.enabled=true",
            "serviceMonitor.labels.release=kube-prometheus-stack",
            "serviceMonitor.interval=15s",
            "metrics.port=7309",
        ],
    )
    monitor = only(docs, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    spec = monitor["spec"]
    assert spec["namespaceSelector"] == {"matchNames": ["observability"]}
    [endpoint] = spec["endpoints"]
    assert endpoint["path"] == "/metrics" and endpoint["interval"] == "15s"
    assert {"action": "replace", "targetLabel": "job", "replacement": "atlasd"} in endpoint[
        "relabelings"
    ]
    # Exactly one of the chart's Services is selected *and* has the named port: the
    # metrics Service, whose port reaches the pod's metrics port.
    selected = [
        s
        for s in docs
        if s["kind"] == "Service"
        and spec["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()
        and any(p["name"] == endpoint["port"] for p in s["spec"]["ports"])
    ]
    assert [s["metadata"]["name"] for s in selected] == ["obs-atlasd-metrics"]
    [port] = selected[0]["spec"]["ports"]
    assert port["port"] == 7309 and port["targetPort"] == "metrics"


def test_service_monitor_needs_the_metrics_service(helm: Helm) -> None:
    with pytest.raises(RuntimeError, match=r"serviceMonitor\.enabled needs metrics\.enabled"):
        render(helm, ATLASD_CHART, sets=["serviceMonitor.enabled=true", "metrics.enabled=false"])


def test_operator_parts_default_off_where_the_crds_may_be_missing(helm: Helm) -> None:
    docs = render(helm, ATLASD_CHART)
    assert not [d for d in docs if d["apiVersion"].startswith("monitoring.coreos.com/")]
    assert len(of_kind(docs, "ConfigMap", "atlas-atlasd-dashboard")) == 1
    docs = render(helm, ATLASD_CHART, sets=["grafanaDashboard.enabled=false"])
    assert not of_kind(docs, "ConfigMap", "atlas-atlasd-dashboard")


@pytest.mark.parametrize(
    ("bad", "where"),
    [
        ("serviceMonitor.interval=soon", "/serviceMonitor/interval"),
        ("prometheusRule.disabled.AtlasdDown=yes", "/prometheusRule/disabled/AtlasdDown"),
        ("grafanaDashboard.label=", "/grafanaDashboard/label"),
    ],
)
def test_values_schema_rejects_wrong_operator_values(helm: Helm, bad: str, where: str) -> None:
    with pytest.raises(RuntimeError, match="schema") as err:
        render(helm, ATLASD_CHART, sets=[bad])
    assert where in str(err.value)


# ---------------------------------------------------------------- dry-run with the CRDs


def _established(apiserver: ApiServer, crd: str) -> bool:
    doc = json.loads(apiserver.kubectl("get", f"crd/{crd}", "-o", "json"))
    conditions = (doc.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Established" and c.get("status") == "True" for c in conditions)


def install_operator_crds(apiserver: ApiServer) -> None:
    crds = components.prometheus_operator_crds()
    for plural in components.PROMETHEUS_OPERATOR_CRDS:
        apiserver.kubectl(
            "apply",
            "--server-side",
            "--field-manager=atlasd-tests",
            "-f",
            str(crds / f"monitoring.coreos.com_{plural}.yaml"),
        )
        # Polled here, not with `kubectl wait --for=condition=Established`: that fails at
        # once ("accessor error: <nil>") when it reads the CRD before it has any status.
        wait_until(
            lambda plural=plural: _established(apiserver, f"{plural}.monitoring.coreos.com"),
            timeout=60,
            what=f"CRD {plural} established",
        )
    # Established comes a moment before the group is in discovery (what kubectl maps
    # kinds with): wait until the resources can be listed.
    wait_until(
        lambda: (
            apiserver.kubectl("get", "servicemonitors,prometheusrules", "-A", "-o", "name")
            is not None
        ),
        timeout=30,
        what="the monitoring.coreos.com resources in discovery",
    )


@pytest.mark.parametrize("custom", [False, True], ids=["switches", "switches+custom"])
def test_every_switch_on_passes_server_side_dry_run(
    helm: Helm, apiserver: ApiServer, namespace: str, custom: bool, tmp_path: Path
) -> None:
    install_operator_crds(apiserver)
    values = [write_values(tmp_path, "custom.yaml", ATLASD_CUSTOM)] if custom else []
    sets = [*EVERY_SWITCH]
    if custom:
        sets += [
            "serviceMonitor.labels.release=kube-prometheus-stack",
            "serviceMonitor.scrapeTimeout=10s",
            "serviceMonitor.metricRelabelings[0].action=drop",
            "serviceMonitor.metricRelabelings[0].sourceLabels[0]=__name__",
            "serviceMonitor.metricRelabelings[0].regex=atlasd_kube_requests_total",
            "prometheusRule.additionalAlertLabels.team=sre",
            "prometheusRule.disabled.AtlasdCAExpiresSoon=true",
            "grafanaDashboard.annotations.grafana_folder=atlasd",
        ]
    docs = render(helm, ATLASD_CHART, namespace=namespace, values=values, sets=sets)
    kinds = {d["kind"] for d in docs}
    assert {"ServiceMonitor", "PrometheusRule"} <= kinds
    out = server_dry_run(apiserver, namespace, docs)
    assert out.count("serverside-applied (server dry run)") == len(docs), out
    assert (
        apiserver.kubectl(
            "get", "servicemonitors,prometheusrules,configmaps", "-n", namespace, "-o", "name"
        )
        == ""
    )


def test_dry_run_rejects_a_wrong_service_monitor_field(
    helm: Helm, apiserver: ApiServer, namespace: str
) -> None:
    """The dry-run checks against the CRD's schema: a misspelled field is refused."""
    install_operator_crds(apiserver)
    docs = render(helm, ATLASD_CHART, namespace=namespace, sets=EVERY_SWITCH)
    bad = copy.deepcopy(only(docs, "ServiceMonitor"))
    bad["spec"]["endpoints"][0]["intervall"] = "30s"
    with pytest.raises(RuntimeError, match="intervall"):
        server_dry_run(apiserver, namespace, [bad])


# ---------------------------------------------------------------- dashboard


def dashboard_configmap(helm: Helm, *sets: str) -> Doc:
    docs = render(helm, ATLASD_CHART, sets=list(sets))
    [cm] = of_kind(docs, "ConfigMap", "atlas-atlasd-dashboard")
    return cm


def test_dashboard_configmap_carries_the_sidecar_label(helm: Helm) -> None:
    cm = dashboard_configmap(helm)
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cm["data"]["atlasd.json"]) == json.loads(DASHBOARD_SOURCE.read_text())
    cm = dashboard_configmap(
        helm,
        "grafanaDashboard.label=dashboards",
        "grafanaDashboard.labelValue=atlas",
        "grafanaDashboard.namespace=grafana",
        "grafanaDashboard.annotations.grafana_folder=Atlas",
    )
    assert cm["metadata"]["labels"]["dashboards"] == "atlas"
    assert "grafana_dashboard" not in cm["metadata"]["labels"]
    assert cm["metadata"]["namespace"] == "grafana"
    assert cm["metadata"]["annotations"] == {"grafana_folder": "Atlas"}


def _type_problems(value: Any, hint: Any, where: str) -> list[str]:
    """Where ``value`` (decoded by grafana-foundation-sdk) breaks the SDK's type hints:
    the generated models keep raw JSON values, so enums, literals and types are checked
    here against their annotations."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if (
        hasattr(value, "to_json")
        and not isinstance(value, enum.Enum)
        and (hint in (typing.Any, object) or (isinstance(hint, type) and isinstance(value, hint)))
    ):
        return _model_problems(value, where)
    if hint in (typing.Any, object):
        return []
    if origin in (typing.Union, types.UnionType):
        found = [
            _type_problems(value, a, where) for a in args if (value is None) == (a is type(None))
        ]
        if not found:
            return [f"{where}: {value!r} is not {hint}"]
        return [] if any(not f for f in found) else min(found, key=len)
    if hint is type(None):
        return [] if value is None else [f"{where}: {value!r} is not null"]
    if origin is typing.Literal:
        return [] if value in args else [f"{where}: {value!r} is not one of {args}"]
    if origin is list:
        if not isinstance(value, list):
            return [f"{where}: {value!r} is not a list"]
        return [p for i, v in enumerate(value) for p in _type_problems(v, args[0], f"{where}[{i}]")]
    if origin is dict:
        if not isinstance(value, dict):
            return [f"{where}: {value!r} is not an object"]
        return [p for k, v in value.items() for p in _type_problems(v, args[1], f"{where}.{k}")]
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        allowed = [m.value for m in hint]
        return [] if value in allowed else [f"{where}: {value!r} is not one of {allowed}"]
    if hint is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        return [] if ok else [f"{where}: {value!r} is not a number"]
    if hint in (int, str, bool):
        return [] if type(value) is hint else [f"{where}: {value!r} is not {hint.__name__}"]
    if isinstance(hint, type) and hasattr(hint, "from_json") and isinstance(value, dict):
        return _model_problems(hint.from_json(value), where)
    if isinstance(hint, type) and hasattr(hint, "to_json"):
        return [f"{where}: {value!r} is not {hint.__name__}"]
    raise AssertionError(f"{where}: no check for {hint!r}")


def _model_problems(value: Any, where: str) -> list[str]:
    if isinstance(value, UnknownDataquery):
        return [f"{where}: a query of no data source type the SDK knows"]
    cls = type(value)
    hints = typing.get_type_hints(cls, vars(sys.modules[cls.__module__]))
    return [
        p for n, h in hints.items() for p in _type_problems(getattr(value, n), h, f"{where}.{n}")
    ]


def _lost(original: Any, decoded: Any, where: str = "$") -> list[str]:
    """Keys or values of ``original`` that did not survive decoding and encoding."""
    if isinstance(original, dict):
        if not isinstance(decoded, dict):
            return [where]
        return [
            p
            for k, v in original.items()
            for p in (
                [f"{where}.{k}"] if k not in decoded else _lost(v, decoded[k], f"{where}.{k}")
            )
        ]
    if isinstance(original, list):
        if not isinstance(decoded, list) or len(original) != len(decoded):
            return [where]
        return [
            p
            for i, (a, b) in enumerate(zip(original, decoded, strict=True))
            for p in _lost(a, b, f"{where}[{i}]")
        ]
    return [] if original == decoded else [f"{where}: {original!r} became {decoded!r}"]


def dashboard_problems(doc: Doc) -> list[str]:
    register_default_plugins()
    decoded = Dashboard.from_json(doc)
    again = json.loads(JSONEncoder().encode(decoded))
    return [f"unknown to Grafana's schema: {p}" for p in _lost(doc, again)] + _type_problems(
        decoded, Dashboard, "dashboard"
    )


def test_dashboard_matches_grafanas_schema() -> None:
    doc = json.loads(DASHBOARD_SOURCE.read_text())
    assert dashboard_problems(doc) == []
    # The check can fail: an unknown key, a wrong enum value, a wrong type.
    for path, value, expect in [
        (("panels", 1, "legendFormatt"), "x", "legendFormatt"),
        (("panels", 1, "options", "colorMode"), "bg", "color_mode"),
        (("graphTooltip",), "shared", "graph_tooltip"),
        (("panels", 1, "gridPos", "w"), "24", "grid_pos.w"),
    ]:
        bad = copy.deepcopy(doc)
        node: Any = bad
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
        assert any(expect in p for p in dashboard_problems(bad)), (path, expect)


def panels_of(doc: Doc) -> list[Doc]:
    out: list[Doc] = []
    for p in doc["panels"]:
        out.append(p)
        out.extend(p.get("panels") or [])
    return out


def test_dashboard_layout_and_references() -> None:
    doc = json.loads(DASHBOARD_SOURCE.read_text())
    panels = panels_of(doc)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    cells: set[tuple[int, int]] = set()
    for p in panels:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, p["title"]
        mine = {
            (x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])
        }
        assert not mine & cells, f"{p['title']} overlaps another panel"
        cells |= mine
    variables = {v["name"] for v in doc["templating"]["list"]}
    assert variables == {"datasource", "namespace"}
    for p in panels:
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"], p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            assert t["datasource"] == p["datasource"], p["title"]
            assert 'namespace="$namespace"' in t["expr"], (p["title"], t["expr"])


# ---------------------------------------------------------------- against a real atlasd

RATE_INTERVAL = "30s"  # what Grafana's $__rate_interval is at a 1 s scrape interval


def substitute(expr: str, namespace: str) -> str:
    out = expr.replace("$__rate_interval", RATE_INTERVAL).replace("$namespace", namespace)
    assert "$" not in out, f"a variable the test does not know: {expr}"
    return out


def cluster_service(name: str, ip: str) -> Doc:
    return objects.cluster_service(name, ip, ports=objects.THANOS_PROMETHEUS)


class Prom:
    def __init__(self, proc: WebProc) -> None:
        self.url = proc.url

    def api(self, path: str, **params: Any) -> Any:
        r = httpx2.get(f"{self.url}/api/v1/{path}", params=params, timeout=10)
        r.raise_for_status()
        body = r.json()
        assert body["status"] == "success", body
        return body["data"]

    def has_data(self, expr: str, start: float) -> bool:
        data = self.api("query_range", query=expr, start=start, end=time.time(), step=1)
        return any(
            math.isfinite(float(v)) for series in data["result"] for _, v in series["values"]
        )


def _port_blocker(port: int) -> socket.socket:
    """Hold a port the observability Envoy is told to listen on: it NACKs that listener."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind(("0.0.0.0", port))
    except OSError as e:
        s.close()
        raise AssertionError(
            f"port {port} is taken by another process: `atlasd run` has its observability"
            " Envoy bind the design's listener ports on 0.0.0.0 (stop the other Envoy)"
        ) from e
    s.listen(1)
    return s


@pytest.fixture
def atlasd(apiserver: ApiServer, namespace: str, tmp_path: Path) -> Iterator[Atlasd]:
    """A real ``atlasd run`` (leader election on) against the harness API server,
    observing a real Thanos Query (with no stores: the clusters count as unseen)."""
    query, query_url = start_query(tmp_path)
    daemon = Atlasd(
        tmp_path / "atlasd",
        f"--kubeconfig={apiserver.admin_kubeconfig}",
        f"--namespace={namespace}",
        "--identity=atlasd-0",
        f"--thanos-query-url={query_url}",
        "--thanos-query-interval=1",
    )
    try:
        yield daemon.start()
    finally:
        daemon.proc.stop()
        query.stop()


def test_every_dashboard_query_returns_data_from_a_real_atlasd(
    helm: Helm,
    apiserver: ApiServer,
    namespace: str,
    atlasd: Atlasd,
    tmp_path: Path,
    envoy_factory: Callable[[dict[str, Any], str], Envoy],
    prometheus_factory: Callable[[str], WebProc],
) -> None:
    rules = rules_file(tmp_path, rendered_rules(helm))
    # What the chart's ServiceMonitor gives a target: job="atlasd" and its namespace.
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(rules)],
        "scrape_configs": [
            {
                "job_name": "atlasd",
                "static_configs": [
                    {
                        "targets": [f"127.0.0.1:{atlasd.http_port}"],
                        "labels": {"namespace": namespace, "pod": "atlasd-0"},
                    }
                ],
            }
        ],
    }
    prom = Prom(prometheus_factory(yaml.safe_dump(config)))
    start = time.time()
    wait_until(
        lambda: prom.has_data(f'up{{job="atlasd", namespace="{namespace}"}} == 1', start),
        timeout=30,
        what="Prometheus scrapes atlasd",
    )

    # Two clusters (no downstream Envoy: they count as disconnected), one invalid one.
    with apiserver.admin() as c:
        path = f"/api/v1/namespaces/{namespace}/services"
        for name, ip in (("east", "192.0.2.10"), ("west", "192.0.2.11")):
            c.post(path, json=cluster_service(name, ip)).raise_for_status()
        broken = cluster_service("broken", "192.0.2.12")
        del broken["spec"]["externalIPs"]
        c.post(path, json=broken).raise_for_status()

    def secrets() -> dict[str, Any]:
        with apiserver.admin() as c:
            items = c.get(f"/api/v1/namespaces/{namespace}/secrets").json()["items"]
        return {i["metadata"]["name"]: i for i in items}

    wait_until(
        lambda: (
            {"east-envoy-values", "west-envoy-values", "atlas-envoy-values"} <= secrets().keys()
        ),
        timeout=60,
        what="values Secrets",
    )
    values = yaml.safe_load(
        base64.b64decode(secrets()["atlas-envoy-values"]["data"]["values.yaml"])
    )
    bootstrap = yaml.safe_load(values["files"]["envoy.yaml"])

    # The observability Envoy on ADS, NACKing its Prometheus listener (port taken) ...
    blocker = _port_blocker(10904)
    try:
        envoy = envoy_factory(bootstrap, "atlas")

        def nacked() -> bool:
            return any(
                e["node"] == "atlas" and e.get("last_nack")
                for e in atlasd.status().get("envoys") or []
            )

        wait_until(nacked, timeout=60, what="the observability Envoy NACKs its listeners")
    finally:
        blocker.close()
    # ... then ACKing the next version's clusters (a third cluster), once Prometheus has
    # the first ACKs: the push-latency panels show rates, i.e. ACKs after the first.
    wait_until(
        lambda: prom.has_data(
            f'atlasd_xds_push_latency_seconds_count{{type="cds", namespace="{namespace}"}}',
            start,
        ),
        timeout=30,
        what="Prometheus has the first ACKs",
    )
    with apiserver.admin() as c:
        c.post(
            f"/api/v1/namespaces/{namespace}/services", json=cluster_service("north", "192.0.2.13")
        ).raise_for_status()

    # The Envoy applies the clusters of the new version (its listeners stay NACKed:
    # they did not change, so nothing re-sends them).
    wait_until(
        lambda: '"north-prom"' in json.dumps(envoy.config_dump()),
        timeout=60,
        what="the observability Envoy has north's cluster",
    )

    doc = json.loads(DASHBOARD_SOURCE.read_text())
    queries = {
        f"{p['title']} [{t['refId']}]": substitute(t["expr"], namespace)
        for p in panels_of(doc)
        if p["type"] != "row"
        for t in p["targets"]
    }
    missing: list[str] = []

    def all_have_data() -> bool:
        missing[:] = [name for name, expr in queries.items() if not prom.has_data(expr, start)]
        return not missing

    try:
        wait_until(all_have_data, timeout=90, what="data for every dashboard query", interval=1)
    except AssertionError as e:
        exposed = [
            line
            for line in httpx2.get(f"{atlasd.url}/metrics", timeout=10).text.splitlines()
            if line.startswith("atlasd_") and "_bucket" not in line
        ]
        lines = "\n".join(exposed)
        raise AssertionError(f"panels without data: {missing}\natlasd exposes:\n{lines}") from e

    # The namespace variable lists this namespace.
    [variable] = [v for v in doc["templating"]["list"] if v["name"] == "namespace"]
    metric = variable["query"]["query"].removeprefix("label_values(").split(",")[0]
    assert namespace in prom.api("label/namespace/values", **{"match[]": metric})

    # Every alert rule evaluates against the real series without error.
    def evaluated() -> list[Doc]:
        found = [r for g in prom.api("rules")["groups"] for r in g["rules"]]
        ok = all(r.get("lastEvaluation", "").startswith("20") for r in found)
        return found if found and ok else []

    evaluated_rules = wait_until(evaluated, timeout=30, what="every rule evaluated")
    assert {r["name"] for r in evaluated_rules} == set(
        alert_names(yaml.safe_load(rules.read_text())["groups"])
    )
    assert [(r["name"], r.get("lastError")) for r in evaluated_rules if r["health"] != "ok"] == []


def test_notes_name_the_monitoring_objects(
    helm: Helm, apiserver: ApiServer, namespace: str
) -> None:
    install_operator_crds(apiserver)  # helm refuses kinds the API server does not serve
    args = ["install", "obs", str(ATLASD_CHART), "--namespace", namespace, "--dry-run=client"]
    notes = helm(*args, *(a for s in EVERY_SWITCH for a in ("--set", s))).split("NOTES:", 1)[1]
    assert "ServiceMonitor obs-atlasd:" in notes and 'job="atlasd"' in notes
    assert "PrometheusRule obs-atlasd:" in notes
    assert 'ConfigMap obs-atlasd-dashboard (grafana_dashboard: "1")' in notes
    # Without the selector labels, say why Prometheus may not pick them up.
    assert notes.count("release: kube-prometheus-stack") == 2
    labelled = [
        "--set",
        "serviceMonitor.labels.release=kps",
        "--set",
        "prometheusRule.labels.release=kps",
    ]
    notes = helm(*args, *(a for s in EVERY_SWITCH for a in ("--set", s)), *labelled)
    assert "release: kube-prometheus-stack" not in notes.split("NOTES:", 1)[1]
