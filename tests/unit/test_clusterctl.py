"""``atlasd cluster add|list|values|remove`` against a standalone store (the verbs a
KubeClient has, over a directory): what each says about Services that are rejected,
labelled with something other than "true", or no cluster at all. The same commands
against a real API server: tests/integration/test_cli_cluster.py."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest
import trio
import yaml

from atlasd import clusterctl, labels
from atlasd.clusterctl import ClusterError
from atlasd.kube.resources import SECRETS, SERVICES
from atlasd.model import Settings
from atlasd.standalone import FileStore
from tests.unit.reconcile.builders import cluster_service

S = Settings()


def _declare(store: Path, *services: dict[str, Any]) -> None:
    (store / "clusters").mkdir(parents=True, exist_ok=True)
    for svc in services:
        (store / "clusters" / f"{svc['metadata']['name']}.yaml").write_text(yaml.safe_dump(svc))


def _values_secret(store: Path, name: str, text: str) -> None:
    async def go() -> None:
        async with FileStore(store, namespace=S.namespace) as api:
            await api.apply(
                {
                    "apiVersion": "v1",
                    "kind": "Secret",
                    "metadata": {"name": name, "namespace": S.namespace},
                    "data": {"values.yaml": base64.b64encode(text.encode()).decode()},
                }
            )

    trio.run(go)


def _call(store: Path, fn: Any) -> Any:
    async def go() -> Any:
        async with FileStore(store, namespace=S.namespace) as api:
            return await fn(api)

    return trio.run(go)


def _labelled(name: str, ip: str, value: str) -> dict[str, Any]:
    svc = cluster_service(name, ip)
    svc["metadata"]["labels"][labels.CLUSTER_LABEL] = value
    return svc


def test_values_of_a_rejected_cluster_say_why_even_with_values_from_before(
    tmp_path: Path,
) -> None:
    """A cluster that was served, then broken: atlasd keeps its values Secret until it is
    fixed or deleted but serves it nothing. `values` says why instead of printing them."""
    _declare(tmp_path, cluster_service("east", "203.0.113.1", replicas="many"))
    _values_secret(tmp_path, "east-envoy-values", "files: {}\n")
    with pytest.raises(ClusterError) as err:
        _call(tmp_path, lambda api: clusterctl.values(api, "east", settings=S, fmt="raw"))
    message = str(err.value)
    assert "cluster 'east' is rejected" in message
    assert 'metadata.labels["goatlas.io/replicas"]' in message and "'many'" in message
    assert "Event on Service east" in message
    # Fixed: the values are printed.
    _declare(tmp_path, cluster_service("east", "203.0.113.1"))
    out = _call(tmp_path, lambda api: clusterctl.values(api, "east", settings=S, fmt="raw"))
    assert out == "files: {}\n"


def test_values_that_are_not_base64_are_reported_as_missing(tmp_path: Path) -> None:
    """The values Secret is read as every Secret is (``atlasd.kube.secrets``): a ``data``
    value that is not base64 (a hand-edited store) is absent, not a crash."""
    _declare(tmp_path, cluster_service("east", "203.0.113.1"))
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "east-envoy-values", "namespace": S.namespace},
        "data": {"values.yaml": "not base64!"},
    }
    (tmp_path / "objects" / "secrets").mkdir(parents=True)
    (tmp_path / "objects" / "secrets" / "east-envoy-values.yaml").write_text(yaml.safe_dump(secret))
    with pytest.raises(ClusterError, match=r"Secret east-envoy-values has no values\.yaml"):
        _call(tmp_path, lambda api: clusterctl.values(api, "east", settings=S, fmt="raw"))


def test_values_of_a_cluster_that_loses_its_address_to_an_older_one(tmp_path: Path) -> None:
    older = cluster_service("east", "203.0.113.1")
    older["metadata"]["creationTimestamp"] = "2026-01-01T00:00:00Z"
    younger = cluster_service("west", "203.0.113.1")
    younger["metadata"]["creationTimestamp"] = "2026-02-01T00:00:00Z"
    _declare(tmp_path, older, younger)
    _values_secret(tmp_path, "west-envoy-values", "files: {}\n")
    with pytest.raises(ClusterError, match="already used by cluster 'east'"):
        _call(tmp_path, lambda api: clusterctl.values(api, "west", settings=S, fmt="raw"))


@pytest.mark.parametrize("value", ["True", "false", "yes"])
def test_a_label_that_is_not_exactly_true(tmp_path: Path, value: str) -> None:
    _declare(
        tmp_path, cluster_service("east", "203.0.113.1"), _labelled("west", "203.0.113.2", value)
    )
    rows = _call(tmp_path, lambda api: clusterctl.list_clusters(api, settings=S))
    assert [(r.name, r.external_ip) for r in rows] == [
        ("east", "203.0.113.1"),
        ("west", "203.0.113.2"),
    ]
    assert rows[0].problem == ""
    assert rows[1].problem.startswith(f'metadata.labels["goatlas.io/cluster"]: is {value!r}')
    for fn in (
        lambda api: clusterctl.values(api, "west", settings=S, fmt="raw"),
        lambda api: clusterctl.remove(api, "west", settings=S),
    ):
        with pytest.raises(ClusterError, match=f"its goatlas.io/cluster label is {value!r}"):
            _call(tmp_path, fn)
    # add says what is there, and --overwrite makes it a cluster.
    svc = clusterctl.cluster_service(
        name="west", external_ips=["203.0.113.2"], replicas=1, namespace=S.namespace
    )
    with pytest.raises(ClusterError, match=f"goatlas.io/cluster={value!r}.*--overwrite"):
        _call(tmp_path, lambda api: clusterctl.add(api, svc, settings=S, overwrite=False))
    assert _call(tmp_path, lambda api: clusterctl.add(api, svc, settings=S, overwrite=True)) == (
        "updated"
    )
    rows = _call(tmp_path, lambda api: clusterctl.list_clusters(api, settings=S))
    assert [(r.name, r.problem) for r in rows] == [("east", ""), ("west", "")]


def test_add_never_turns_someone_elses_service_into_a_cluster(tmp_path: Path) -> None:
    async def seed(api: FileStore) -> None:
        web = cluster_service("web", "203.0.113.5")
        web["metadata"]["labels"] = {"app": "web"}
        await api.apply(web)

    _call(tmp_path, seed)
    svc = clusterctl.cluster_service(
        name="web", external_ips=["203.0.113.9"], replicas=1, namespace=S.namespace
    )
    for overwrite in (False, True):
        with pytest.raises(ClusterError) as err:
            _call(
                tmp_path,
                lambda api, o=overwrite: clusterctl.add(api, svc, settings=S, overwrite=o),
            )
        assert "a Service named 'web' already exists" in str(err.value)
        assert "is not a cluster" in str(err.value) and "pick another name" in str(err.value)
    got = _call(tmp_path, lambda api: api.get(SERVICES, "web", namespace=S.namespace))
    assert got["metadata"]["labels"] == {"app": "web"}
    assert got["spec"]["externalIPs"] == ["203.0.113.5"]
    assert _call(tmp_path, lambda api: api.list(SECRETS, namespace=S.namespace))[0] == []
