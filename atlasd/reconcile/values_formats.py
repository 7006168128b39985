"""The three ways the CLI prints a cluster's Helm values (pure; YAML text in, YAML text out).

- ``raw``: the ``values.yaml`` of ``<cluster>-envoy-values`` as stored;
- ``helm-chart``: a k3s ``helm.cattle.io/v1`` ``HelmChart`` carrying the values in
  ``spec.valuesContent`` (k3s's helm-controller installs it into ``target_namespace``);
- ``helm-release``: a Flux ``source.toolkit.fluxcd.io/v1`` ``HelmRepository`` plus a
  ``helm.toolkit.fluxcd.io/v2`` ``HelmRelease`` with the values under ``spec.values``.

Defaults name the original's chart repository and release so existing GitOps setups keep
working; every one can be overridden.

Errors::

    ValueError   the values text is not a YAML mapping
"""

from __future__ import annotations

from typing import Any, Literal

import yaml

from atlasd.model import DEFAULT_NAMESPACE
from atlasd.reconcile.desired import dump_yaml

Format = Literal["raw", "helm-chart", "helm-release"]
FORMATS: tuple[Format, ...] = ("raw", "helm-chart", "helm-release")

DEFAULT_REPO_URL = "https://charts.goatlas.io"
DEFAULT_CHART = "envoy"
DEFAULT_RELEASE = "atlas-envoy"


def _load(values_yaml: str) -> dict[str, Any]:
    data = yaml.safe_load(values_yaml) if values_yaml.strip() else {}
    if not isinstance(data, dict):
        raise ValueError("values must be a YAML mapping")
    return data


def raw(values_yaml: str) -> str:
    """The values exactly as stored (validated to be a YAML mapping)."""
    _load(values_yaml)
    return values_yaml


def helm_chart(
    values_yaml: str,
    *,
    name: str = DEFAULT_RELEASE,
    namespace: str = "kube-system",
    target_namespace: str = DEFAULT_NAMESPACE,
    repo_url: str = DEFAULT_REPO_URL,
    chart: str = DEFAULT_CHART,
    version: str | None = None,
) -> str:
    """A k3s HelmChart manifest."""
    _load(values_yaml)
    spec: dict[str, Any] = {"chart": chart, "repo": repo_url}
    if version:
        spec["version"] = version
    spec["targetNamespace"] = target_namespace
    spec["valuesContent"] = values_yaml
    doc = {
        "apiVersion": "helm.cattle.io/v1",
        "kind": "HelmChart",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }
    return dump_yaml(doc)


def helm_release(
    values_yaml: str,
    *,
    name: str = DEFAULT_RELEASE,
    namespace: str = DEFAULT_NAMESPACE,
    repository: str = "atlas",
    repo_url: str = DEFAULT_REPO_URL,
    chart: str = DEFAULT_CHART,
    version: str | None = None,
    interval: str = "10m",
) -> str:
    """A Flux HelmRepository + HelmRelease, as one two-document YAML stream."""
    values = _load(values_yaml)
    repo = {
        "apiVersion": "source.toolkit.fluxcd.io/v1",
        "kind": "HelmRepository",
        "metadata": {"name": repository, "namespace": namespace},
        "spec": {"url": repo_url, "interval": "24h"},
    }
    chart_spec: dict[str, Any] = {"chart": chart}
    if version:
        chart_spec["version"] = version
    chart_spec["sourceRef"] = {"kind": "HelmRepository", "name": repository}
    release = {
        "apiVersion": "helm.toolkit.fluxcd.io/v2",
        "kind": "HelmRelease",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "releaseName": name,
            "interval": interval,
            "chart": {"spec": chart_spec},
            "values": values,
        },
    }
    return "---\n" + dump_yaml(repo) + "---\n" + dump_yaml(release)


def render(fmt: Format, values_yaml: str, *, namespace: str = DEFAULT_NAMESPACE) -> str:
    """Dispatch by format name (what ``atlasd values --format`` calls)."""
    if fmt == "raw":
        return raw(values_yaml)
    if fmt == "helm-chart":
        return helm_chart(values_yaml, target_namespace=namespace)
    if fmt == "helm-release":
        return helm_release(values_yaml, namespace=namespace)
    raise ValueError(f"unknown format {fmt!r}; one of {', '.join(FORMATS)}")
