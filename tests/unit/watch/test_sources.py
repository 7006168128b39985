"""The informers' transform (``atlasd.watch.sources.Compactor``): what a cached object keeps
of its managedFields, that the reconcile decisions read the same from it, and that what
recurs is stored once."""

from __future__ import annotations

import base64
import copy
import json
from typing import Any

from atlasd.kube.apply import managed_keys, needs_apply
from atlasd.kube.secrets import DataDigest
from atlasd.watch.sources import Compactor


def b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


def entry(manager: str, operation: str, fields: dict[str, Any]) -> dict[str, Any]:
    return {
        "manager": manager,
        "operation": operation,
        "apiVersion": "v1",
        "time": "2026-12-03T16:45:11Z",
        "fieldsType": "FieldsV1",
        "fieldsV1": fields,
    }


def values_secret(cluster: str, uid: str) -> dict[str, Any]:
    """A values Secret as the API server returns it after atlasd applied it and someone
    else (kubectl) added a label."""
    own = {
        "f:data": {"f:values.yaml": {}},
        "f:metadata": {
            "f:labels": {"f:app.kubernetes.io/managed-by": {}, "f:goatlas.io/owner-cluster": {}},
            "f:ownerReferences": {f'k:{{"uid":"{uid}"}}': {}},
        },
        "f:type": {},
    }
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {
            "name": f"{cluster}-envoy-values",
            "namespace": "monitoring",
            "uid": f"secret-{uid}",
            "resourceVersion": "212",
            "labels": {
                "app.kubernetes.io/managed-by": "atlasd",
                "goatlas.io/owner-cluster": cluster,
                "team": "x",
            },
            "ownerReferences": [
                {"apiVersion": "v1", "kind": "Service", "name": cluster, "uid": uid}
            ],
            "managedFields": [
                entry("atlasd", "Apply", own),
                entry("atlasd", "Update", {"f:metadata": {"f:annotations": {"f:a": {}}}}),
                entry("kubectl", "Update", {"f:metadata": {"f:labels": {"f:team": {}}}}),
            ],
        },
        "data": {"values.yaml": b64(f"cluster: {cluster}\n"), "old.yaml": b64("x")},
    }


def test_only_atlasds_apply_entry_is_kept_and_only_the_keys_it_is_read_for() -> None:
    obj = Compactor()(values_secret("east", "u1"))
    assert obj["metadata"]["managedFields"] == [
        {
            "manager": "atlasd",
            "operation": "Apply",
            "fieldsV1": {
                "f:metadata": {
                    "f:labels": {
                        "f:app.kubernetes.io/managed-by": {},
                        "f:goatlas.io/owner-cluster": {},
                    }
                },
                "f:data": {"f:values.yaml": {}},
            },
        }
    ]
    # Everything else of the object is as it was.
    want = values_secret("east", "u1")
    del want["metadata"]["managedFields"]
    del obj["metadata"]["managedFields"]
    assert obj == want


def test_an_object_with_no_entry_of_atlasd_keeps_no_managed_fields() -> None:
    svc = values_secret("east", "u1")
    svc["metadata"]["managedFields"] = [entry("kubectl", "Apply", {"f:spec": {}})]
    assert "managedFields" not in Compactor()(svc)["metadata"]


def test_the_object_handed_in_is_not_changed() -> None:
    obj = values_secret("east", "u1")
    before = copy.deepcopy(obj)
    Compactor()(obj)
    assert obj == before


def test_the_reconcile_decisions_read_the_same_from_a_compacted_object() -> None:
    """needs_apply (labels and data keys atlasd stopped sending) and managed_keys agree on the
    object as listed and as cached."""
    listed = values_secret("east", "u1")
    cached = Compactor()(copy.deepcopy(listed))
    for path in (("metadata", "labels"), ("metadata", "annotations"), ("data",), ("spec",)):
        assert managed_keys(cached, *path) == managed_keys(listed, *path)
    assert managed_keys(cached, "metadata", "labels") == {
        "app.kubernetes.io/managed-by",
        "goatlas.io/owner-cluster",
    }
    desired: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": "east-envoy-values",
            "namespace": "monitoring",
            "labels": {
                "app.kubernetes.io/managed-by": "atlasd",
                "goatlas.io/owner-cluster": "east",
            },
        },
        "type": "Opaque",
        "data": {"values.yaml": b64("cluster: east\n")},
    }
    cases = [desired]
    dropped_label = copy.deepcopy(desired)
    del dropped_label["metadata"]["labels"]["goatlas.io/owner-cluster"]
    cases.append(dropped_label)
    other_data = copy.deepcopy(desired)
    other_data["data"] = {"other.yaml": b64("y")}
    cases.append(other_data)
    verdicts = [needs_apply(d, cached) for d in cases]
    assert verdicts == [needs_apply(d, listed) for d in cases]
    # The first is in sync; the other two each drop a key atlasd applied.
    assert verdicts == [False, True, True]


def test_values_cached_as_digests_decide_every_write_as_the_listed_object_does() -> None:
    """The Envoy values are cached with their data as digests (``digest_suffixes``): every
    verdict of needs_apply is the one the object as listed gives (a wrong one at fleet
    scale is a write loop, or a change never written)."""
    listed = values_secret("east", "u1")
    cached = Compactor()(copy.deepcopy(listed), digest_suffixes=("-envoy-values",))
    assert all(isinstance(v, DataDigest) for v in cached["data"].values())
    assert set(cached["data"]) == set(listed["data"])
    assert json.loads(json.dumps(cached))["data"] == cached["data"]  # still JSON
    # Other Secrets keep their data.
    other = copy.deepcopy(listed)
    other["metadata"]["name"] = "east-atlas-identity"
    assert Compactor()(other, digest_suffixes=("-envoy-values",))["data"] == listed["data"]

    meta = {
        "name": "east-envoy-values",
        "namespace": "monitoring",
        "labels": {"app.kubernetes.io/managed-by": "atlasd", "goatlas.io/owner-cluster": "east"},
    }

    def desired(data: dict[str, str]) -> dict[str, Any]:
        return {"apiVersion": "v1", "kind": "Secret", "metadata": meta, "data": data}

    cases = [
        desired({"values.yaml": b64("cluster: east\n")}),  # in sync
        desired({"values.yaml": b64("cluster: west\n")}),  # a changed value
        desired({"values.yaml": b64("cluster: east\n"), "old.yaml": b64("x")}),  # both sent
        desired({"values.yaml": b64("cluster: east\n"), "old.yaml": b64("y")}),
        desired({"values.yaml": "not base64!"}),
        desired({"values.yaml": b64("cluster: east\n"), "new.yaml": b64("z")}),  # a new key
    ]
    for whole in ((), (("data",),)):
        verdicts = [needs_apply(d, cached, whole=whole) for d in cases]
        assert verdicts == [needs_apply(d, listed, whole=whole) for d in cases], whole
    assert [needs_apply(d, cached) for d in cases] == [False, True, False, True, True, True]
    assert needs_apply(cases[0], cached, whole=(("data",),))  # old.yaml is not sent


def test_what_recurs_across_clusters_is_stored_once() -> None:
    compact = Compactor()
    a = compact(values_secret("east", "u1"))
    b = compact(values_secret("west", "u2"))
    assert a["metadata"]["managedFields"][0] is b["metadata"]["managedFields"][0]
    keys_a = {id(k) for k in a["metadata"]}
    assert keys_a == {id(k) for k in b["metadata"]}
    assert (
        a["metadata"]["labels"]["app.kubernetes.io/managed-by"]
        is (b["metadata"]["labels"]["app.kubernetes.io/managed-by"])
    )
    # Long values (certificates, values files) are not interned; equal ones are simply equal.
    long = values_secret("east", "u1")
    long["data"]["values.yaml"] = b64("x" * 200)
    other = json.loads(json.dumps(long))  # equal strings, not the same objects
    assert compact(long)["data"]["values.yaml"] is not compact(other)["data"]["values.yaml"]


def test_json_decoding_shares_nothing_the_compactor_does() -> None:
    """The saving is real: two objects decoded from the API's JSON share no key strings until
    compacted."""
    text = json.dumps(values_secret("east", "u1"))
    a, b = json.loads(text), json.loads(text)
    assert not {id(k) for k in a["metadata"]} & {id(k) for k in b["metadata"]}
    compact = Compactor()
    assert {id(k) for k in compact(a)["metadata"]} == {id(k) for k in compact(b)["metadata"]}
