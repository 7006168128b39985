"""The typed reads of object fields: values as stored, and each field's default when it is
absent or malformed (a hand-written standalone file can hold anything)."""

from __future__ import annotations

from collections.abc import Callable
from types import MappingProxyType
from typing import Any

import pytest

from atlasd.kube import bodies

SERVICE: dict[str, Any] = {
    "apiVersion": "v1",
    "kind": "Service",
    "metadata": {
        "name": "east",
        "namespace": "monitoring",
        "uid": "u-1",
        "resourceVersion": "42",
        "creationTimestamp": "2026-01-01T00:00:00Z",
        "labels": {"goatlas.io/cluster": "true", "goatlas.io/replicas": 2},
        "annotations": {"a": "b"},
        "managedFields": [
            {"manager": "atlasd", "operation": "Apply", "fieldsV1": {"f:spec": {}}},
            {"manager": "atlasd", "operation": "Update", "fieldsV1": {}},
            {"manager": "kubectl", "operation": "Apply", "fieldsV1": {}},
            "not an entry",
        ],
    },
    "spec": {"clusterIP": "None"},
}


def test_fields_as_stored() -> None:
    assert bodies.name(SERVICE) == "east"
    assert bodies.namespace(SERVICE) == "monitoring"
    assert bodies.uid(SERVICE) == "u-1"
    assert bodies.resource_version(SERVICE) == "42"
    assert bodies.creation_timestamp(SERVICE) == "2026-01-01T00:00:00Z"
    assert bodies.labels(SERVICE)["goatlas.io/cluster"] == "true"
    assert bodies.annotations(SERVICE) == {"a": "b"}
    assert bodies.spec(SERVICE) == {"clusterIP": "None"}
    assert [e["fieldsV1"] for e in bodies.applied_fields(SERVICE, "atlasd")] == [{"f:spec": {}}]
    assert bodies.list_continue({"metadata": {"continue": "tok"}}) == "tok"
    secret = {"data": {"k": "dg=="}, "stringData": {"s": "t"}}
    assert (bodies.data(secret), bodies.string_data(secret)) == ({"k": "dg=="}, {"s": "t"})


def test_a_label_reads_as_text_or_none() -> None:
    assert bodies.label(SERVICE, "goatlas.io/cluster") == "true"
    assert bodies.label(SERVICE, "goatlas.io/replicas") == "2"  # a YAML number in a file
    assert bodies.label(SERVICE, "missing") is None


def test_views_are_the_stored_maps_not_copies() -> None:
    assert bodies.meta(SERVICE) is SERVICE["metadata"]
    assert bodies.labels(SERVICE) is SERVICE["metadata"]["labels"]
    proxy = {"metadata": MappingProxyType({"name": "x", "labels": MappingProxyType({})})}
    assert bodies.name(proxy) == "x" and bodies.labels(proxy) == {}


READS: list[tuple[Callable[[Any], object], object]] = [
    (bodies.meta, {}),
    (bodies.name, ""),
    (bodies.namespace, ""),
    (bodies.uid, ""),
    (bodies.resource_version, ""),
    (bodies.creation_timestamp, ""),
    (bodies.list_continue, ""),
    (bodies.labels, {}),
    (bodies.annotations, {}),
    (lambda o: bodies.label(o, "k"), None),
    (lambda o: bodies.applied_fields(o, "atlasd"), []),
    (bodies.spec, {}),
    (bodies.data, {}),
    (bodies.string_data, {}),
]

MALFORMED: list[object] = [
    None,
    {},
    {"metadata": None, "spec": None, "data": None, "stringData": None},
    {"metadata": "a string", "spec": [], "data": 3, "stringData": "x"},
]


@pytest.mark.parametrize("read,default", READS)
@pytest.mark.parametrize("obj", MALFORMED)
def test_absent_or_malformed_reads_as_the_default(
    read: Callable[[Any], object], default: object, obj: object
) -> None:
    assert read(obj) == default


def test_malformed_maps_in_metadata_read_as_empty() -> None:
    obj = {"metadata": {"labels": ["k"], "annotations": "x", "managedFields": {"a": 1}}}
    assert bodies.labels(obj) == {} and bodies.annotations(obj) == {}
    assert bodies.label(obj, "k") is None
    assert bodies.applied_fields(obj, "atlasd") == []
