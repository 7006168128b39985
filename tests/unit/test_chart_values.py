"""The charts' default values name the ports and the domain atlasd's constants name.

The Envoy chart's listeners are where atlasd's snapshots tell a downstream Envoy to
listen (``atlasd.xds.plan.ListenPlan``), and the atlasd chart's ports are the daemon's
defaults (``atlasd.model``): a default changed on one side only would leave a fresh
install whose Envoys listen where nothing dials, so both are read from one place here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from atlasd import logs, model
from atlasd.xds.plan import ListenPlan

CHARTS = Path(__file__).resolve().parents[2] / "charts"


def _values(chart: str) -> Any:
    return yaml.safe_load((CHARTS / chart / "values.yaml").read_text(encoding="utf-8"))


def test_atlasd_chart_ports_are_the_daemons_defaults() -> None:
    values = _values("atlasd")
    assert values["controller"]["ports"]["grpc"] == model.ADS_GRPC_PORT
    assert values["metrics"]["port"] == model.METRICS_PORT
    assert values["controller"]["envoy"]["adsPort"] == ListenPlan().observability.xds
    assert values["atlas"]["clusterDomain"] == model.CLUSTER_DOMAIN
    settings = model.Settings()
    assert values["atlas"]["dnsConfigMapName"] == settings.dns_configmap_name
    assert values["atlas"]["thanosEndpointsConfigMapName"] == (
        settings.thanos_endpoints_configmap_name
    )
    selector = ",".join(f"{k}={v}" for k, v in settings.alertmanager_selector)
    assert values["atlas"]["alertmanagerSelector"] == selector


def test_envoy_chart_listens_where_the_snapshots_say() -> None:
    values = _values("envoy")
    downstream = ListenPlan().downstream_default
    want = {
        "thanos": downstream.thanos,
        "alertmanager": downstream.alertmanager,
        "prometheus": downstream.prometheus,
    }
    container = {n: p["containerPort"] for n, p in values["ports"].items()}
    assert container == {"admin": model.ENVOY_ADMIN_PORT, **want}
    assert {n: p["port"] for n, p in values["service"]["ports"].items()} == want
    assert values["atlas"]["alertmanagerPort"] == downstream.alertmanager
    assert values["atlas"]["clusterDomain"] == model.CLUSTER_DOMAIN
    admin = values["files"]["envoy.yaml"]
    assert yaml.safe_load(admin)["admin"]["address"]["socket_address"]["port_value"] == (
        model.ENVOY_ADMIN_PORT
    )


def test_atlasd_chart_logs_json_and_offers_the_daemons_formats() -> None:
    assert _values("atlasd")["atlas"]["logFormat"] == "json"
    schema = json.loads((CHARTS / "atlasd" / "values.schema.json").read_text(encoding="utf-8"))
    offered = schema["properties"]["atlas"]["properties"]["logFormat"]["enum"]
    assert sorted(offered) == sorted(logs.LOG_FORMATS)
