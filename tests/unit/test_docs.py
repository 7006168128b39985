"""What the documents and the chart's monitoring files refer to exists.

- No comment or document cites the interface spec by a file this repository does not
  have (``SPEC.md``): the interface is docs/interface.md.
- Every relative link between the Markdown documents points at a file that exists.
- Every metric the alert rules and the Grafana dashboard query is one atlasd exports
  (``atlasd/metrics.py``, ``atlasd/xds/streams.py``; ``atlasd_*`` and client-go's
  ``workqueue_*``), with the suffix its type gives it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase

import atlasd.metrics
from atlasd.xds.streams import XdsMetrics

ROOT = Path(__file__).resolve().parents[2]
CHART_FILES = ROOT / "charts" / "atlasd" / "files"
SEARCHED = ("atlasd", "tests", "docs", "charts", "bench", "scripts")


def _text_files() -> list[Path]:
    out = [ROOT / "README.md", ROOT / "Makefile", ROOT / "Dockerfile", ROOT / "pyproject.toml"]
    for top in SEARCHED:
        out += [
            p
            for p in (ROOT / top).rglob("*")
            if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
        ]
    return out


def test_nothing_cites_a_spec_file_the_repository_does_not_have() -> None:
    me = Path(__file__).resolve()
    cites = [
        f"{p.relative_to(ROOT)}:{n}"
        for p in _text_files()
        if p.resolve() != me
        for n, line in enumerate(p.read_text(errors="replace").splitlines(), 1)
        if re.search(r"\bSPEC(\.md)?\b", line)
    ]
    assert cites == [], "cite docs/interface.md instead"


def test_relative_links_between_documents_resolve() -> None:
    broken = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#:\s]+)(?:#[^)]*)?\)", doc.read_text()):
            if not (doc.parent / target).exists():
                broken.append(f"{doc.relative_to(ROOT)} -> {target}")
    assert broken == []


def _exported_series() -> set[str]:
    """Every series name atlasd's metrics give Prometheus."""
    registry = CollectorRegistry()
    XdsMetrics(registry)
    metrics = [m for m in vars(atlasd.metrics).values() if isinstance(m, MetricWrapperBase)]
    names: set[str] = set()
    families = [f for m in metrics for f in m.describe()]
    families += list(registry.collect())
    families += [f for keyed in atlasd.metrics.KEYED for f in keyed.collect()]
    for family in families:
        base = family.name
        if family.type == "counter":
            names |= {f"{base}_total", f"{base}_created"}
        elif family.type == "histogram":
            names |= {f"{base}_bucket", f"{base}_sum", f"{base}_count", f"{base}_created"}
        else:
            names.add(base)
    return names


def _queries() -> dict[str, str]:
    out: dict[str, str] = {}
    rules = yaml.safe_load((CHART_FILES / "prometheus-rules.yaml").read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            out[f"rule {rule['alert']}"] = rule["expr"]
    dashboard = json.loads((CHART_FILES / "atlasd-dashboard.json").read_text())

    def walk(node: object, where: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "expr" and isinstance(value, str):
                    out[where] = value
                elif key == "query" and isinstance(value, dict):
                    out[f"{where} variable"] = str(value.get("query", ""))
                else:
                    walk(value, f"{where} / {node.get('title', key)}")
        elif isinstance(node, list):
            for i, item in enumerate(node):
                walk(item, f"{where}[{i}]")

    walk(dashboard, "dashboard")
    return out


def test_rules_and_dashboard_query_only_metrics_atlasd_exports() -> None:
    exported = _exported_series()
    assert "atlasd_xds_push_latency_seconds_bucket" in exported  # the check can see xDS metrics
    assert "workqueue_queue_duration_seconds_bucket" in exported  # and the queues' metrics
    queries = _queries()
    assert len(queries) > 20
    unknown = {
        f"{where}: {name}"
        for where, expr in queries.items()
        for name in re.findall(r"\b(?:atlasd|workqueue)_[a-z_]+", expr)
        if name not in exported
    }
    assert unknown == set()
