"""needs_apply: a pass with nothing to change writes nothing; Secret data round trip;
ownership labels and references (``atlasd.reconcile.objects``)."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from atlasd.kube.apply import managed_keys, needs_apply
from atlasd.kube.secrets import encode_secret_data, secret_data
from atlasd.model import DownstreamCluster, ObjectRef
from atlasd.reconcile.objects import managed_labels, owner_references


def b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


def managed(fields: dict[str, Any], manager: str = "atlasd") -> list[dict[str, Any]]:
    return [
        {"manager": manager, "operation": "Apply", "fieldsType": "FieldsV1", "fieldsV1": fields}
    ]


SVC_OBSERVED: dict[str, Any] = {
    "apiVersion": "v1",
    "kind": "Service",
    "metadata": {
        "name": "east-thanos-sidecar0",
        "namespace": "m",
        "uid": "1",
        "resourceVersion": "9",
        "labels": {"goatlas.io/thanos-sidecar": "0", "other": "kept"},
        "annotations": {"x": "y"},
        "managedFields": managed({"f:metadata": {"f:labels": {"f:goatlas.io/thanos-sidecar": {}}}}),
    },
    "spec": {
        "clusterIP": "None",
        "clusterIPs": ["None"],
        "ports": [{"name": "thanos", "port": 10901, "protocol": "TCP", "targetPort": 10901}],
        "selector": {"app": "envoy"},
        "type": "ClusterIP",
        "sessionAffinity": "None",
    },
}

SVC_DESIRED: dict[str, Any] = {
    "apiVersion": "v1",
    "kind": "Service",
    "metadata": {
        "name": "east-thanos-sidecar0",
        "namespace": "m",
        "labels": {"goatlas.io/thanos-sidecar": "0"},
    },
    "spec": {
        "clusterIP": "None",
        "ports": [{"name": "thanos", "port": 10901}],
        "selector": {"app": "envoy"},
    },
}


def _with(base: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    import copy

    out = copy.deepcopy(base)
    node = out
    *parents, last = path.split(":")
    for p in parents:
        node = node[int(p)] if isinstance(node, list) else node[p]
    if value is KeyError:
        del node[last]
    elif isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return out


@pytest.mark.parametrize(
    ("desired", "observed", "expected"),
    [
        (SVC_DESIRED, None, True),
        (SVC_DESIRED, SVC_OBSERVED, False),  # server defaults are not differences
        (_with(SVC_DESIRED, "spec:ports:0:port", 10902), SVC_OBSERVED, True),
        (_with(SVC_DESIRED, "spec:selector", {"app": "envoy", "r": "a"}), SVC_OBSERVED, True),
        (_with(SVC_DESIRED, "spec:ports", []), SVC_OBSERVED, True),
        (_with(SVC_DESIRED, "metadata:labels:goatlas.io/thanos-sidecar", "1"), SVC_OBSERVED, True),
        (_with(SVC_DESIRED, "metadata:annotations", {"x": "y"}), SVC_OBSERVED, False),
        (_with(SVC_DESIRED, "metadata:annotations", {"x": "z"}), SVC_OBSERVED, True),
        # A label atlasd applied before but stopped sending: applying removes it.
        (_with(SVC_DESIRED, "metadata:labels", {}), SVC_OBSERVED, True),
        # A label someone else set is not atlasd's business.
        (SVC_DESIRED, _with(SVC_OBSERVED, "metadata:labels:extra", "v"), False),
    ],
)
def test_service(desired: dict[str, Any], observed: dict[str, Any] | None, expected: bool) -> None:
    assert needs_apply(desired, observed) is expected


SECRET_OBSERVED: dict[str, Any] = {
    "apiVersion": "v1",
    "kind": "Secret",
    "type": "Opaque",
    "metadata": {
        "name": "east-envoy-values",
        "namespace": "m",
        "managedFields": managed({"f:data": {"f:values.yaml": {}}, "f:type": {}}),
    },
    "data": {"values.yaml": b64("a: 1\n"), "foreign": b64("someone else's")},
}


@pytest.mark.parametrize(
    ("desired", "expected"),
    [
        ({"data": {"values.yaml": b64("a: 1\n")}}, False),
        ({"stringData": {"values.yaml": "a: 1\n"}}, False),  # write-only stringData
        ({"stringData": {"values.yaml": "a: 2\n"}}, True),
        ({"data": {"values.yaml": b64("a: 1\n")}, "type": "Opaque"}, False),
        ({"data": {"values.yaml": b64("a: 1\n")}, "type": "kubernetes.io/tls"}, True),
        ({"data": {"values.yaml": b64("a: 1\n"), "new": b64("n")}}, True),
        ({"data": {"values.yaml": "not base64!"}}, True),
        # values.yaml is atlasd's and no longer sent: a write removes it.
        ({"data": {"foreign": b64("someone else's")}}, True),
    ],
)
def test_secret_compares_decoded_data(desired: dict[str, Any], expected: bool) -> None:
    full = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "east-envoy-values", "namespace": "m"},
        **desired,
    }
    assert needs_apply(full, SECRET_OBSERVED) is expected


def test_configmap_data_keys_atlasd_stopped_sending() -> None:
    observed = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "z", "managedFields": managed({"f:data": {"f:a": {}, "f:b": {}}})},
        "data": {"a": "1", "b": "2"},
    }
    desired = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "z"},
        "data": {"a": "1", "b": "2"},
    }
    assert not needs_apply(desired, observed)
    assert needs_apply({**desired, "data": {"a": "1"}}, observed)
    # Keys owned by another manager do not count.
    other = {
        **observed,
        "metadata": {
            "name": "z",
            "managedFields": managed({"f:data": {"f:a": {}, "f:b": {}}}, manager="kubectl"),
        },
    }
    assert not needs_apply({**desired, "data": {"a": "1"}}, other)


def test_managed_keys_ignores_update_operations() -> None:
    obs = {
        "metadata": {
            "managedFields": [
                {
                    "manager": "atlasd",
                    "operation": "Update",
                    "fieldsV1": {"f:metadata": {"f:labels": {"f:a": {}}}},
                },
                {
                    "manager": "atlasd",
                    "operation": "Apply",
                    "fieldsV1": {"f:metadata": {"f:labels": {"f:b": {}, ".": {}}}},
                },
            ]
        }
    }
    assert managed_keys(obs, "metadata", "labels") == {"b"}


def test_secret_data_round_trip() -> None:
    data = encode_secret_data({"a": b"\x00\x01", "b": "text"})
    assert secret_data({"data": data}) == {"a": b"\x00\x01", "b": b"text"}
    both = secret_data({"data": {"k": b64("old")}, "stringData": {"k": "new"}})
    assert both == {"k": b"new"}


def test_secret_data_leaves_out_what_is_not_base64() -> None:
    assert secret_data({"data": {"ok": b64("v"), "bad": "not base64!", "n": 1}}) == {"ok": b"v"}
    assert secret_data(None) == {}


def test_ownership() -> None:
    assert managed_labels() == {"app.kubernetes.io/managed-by": "atlasd"}
    assert managed_labels("east")["goatlas.io/owner-cluster"] == "east"
    east = DownstreamCluster(
        name="east",
        external_ip="203.0.113.1",
        ports=(),
        source=ObjectRef("Service", "east", "m", uid="u-1"),
    )
    assert owner_references(east) == [
        {
            "apiVersion": "v1",
            "kind": "Service",
            "name": "east",
            "uid": "u-1",
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]
    # No uid yet: no ownerReference (the next pass adds it).
    assert owner_references(DownstreamCluster("x", "203.0.113.2", ())) == []
