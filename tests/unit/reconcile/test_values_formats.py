"""values_formats: raw, k3s HelmChart and Flux HelmRepository + HelmRelease."""

from __future__ import annotations

import pytest
import yaml

from atlasd.reconcile.values_formats import FORMATS, helm_chart, helm_release, raw, render

VALUES = """atlas:
  alertmanagerCount: 1
files:
  ca.pem: |
    -----BEGIN CERTIFICATE-----
    AAAA
    -----END CERTIFICATE-----
"""


def test_raw_is_the_stored_text() -> None:
    assert raw(VALUES) == VALUES
    assert render("raw", VALUES) == VALUES


def test_helm_chart() -> None:
    doc = yaml.safe_load(helm_chart(VALUES, version="1.2.1"))
    assert doc["apiVersion"] == "helm.cattle.io/v1" and doc["kind"] == "HelmChart"
    assert doc["metadata"] == {"name": "atlas-envoy", "namespace": "kube-system"}
    spec = doc["spec"]
    assert (spec["chart"], spec["repo"], spec["version"]) == (
        "envoy",
        "https://charts.goatlas.io",
        "1.2.1",
    )
    assert spec["targetNamespace"] == "monitoring"
    assert spec["valuesContent"] == VALUES
    assert (
        yaml.safe_load(render("helm-chart", VALUES, namespace="obs"))["spec"]["targetNamespace"]
        == "obs"
    )


def test_helm_release() -> None:
    repo, release = yaml.safe_load_all(helm_release(VALUES, namespace="obs"))
    assert (repo["apiVersion"], repo["kind"]) == ("source.toolkit.fluxcd.io/v1", "HelmRepository")
    assert repo["metadata"] == {"name": "atlas", "namespace": "obs"}
    assert repo["spec"]["url"] == "https://charts.goatlas.io"
    assert (release["apiVersion"], release["kind"]) == ("helm.toolkit.fluxcd.io/v2", "HelmRelease")
    chart = release["spec"]["chart"]["spec"]
    assert chart["chart"] == "envoy"
    assert chart["sourceRef"] == {"kind": "HelmRepository", "name": "atlas"}
    assert release["spec"]["values"] == yaml.safe_load(VALUES)
    assert release["spec"]["releaseName"] == "atlas-envoy"


@pytest.mark.parametrize("fmt", FORMATS)
def test_non_mapping_values_are_rejected(fmt: str) -> None:
    with pytest.raises(ValueError, match="mapping"):
        render(fmt, "- a\n- b\n")  # type: ignore[arg-type]


def test_unknown_format() -> None:
    with pytest.raises(ValueError, match="unknown format"):
        render("json", VALUES)  # type: ignore[arg-type]
