"""The standalone FileStore answers the Kubernetes verbs over a directory."""

from __future__ import annotations

import base64
import logging
import stat
from pathlib import Path

import pytest
import yaml

from atlasd.kube.errors import AlreadyExists, Gone, Invalid, NotFound, ServerError
from atlasd.kube.resources import CONFIGMAPS, SECRETS, SERVICES
from atlasd.standalone import FileStore

CLUSTER = """\
apiVersion: v1
kind: Service
metadata:
  name: east
  labels: {goatlas.io/cluster: "true"}
spec:
  externalIPs: [192.0.2.10]
  ports: [{name: thanos, port: 10901}]
---
apiVersion: v1
kind: Service
metadata:
  name: west
  labels: {goatlas.io/cluster: "true"}
spec:
  externalIPs: [192.0.2.11]
  ports: [{name: thanos, port: 10901}]
"""


async def test_declared_clusters_are_listed_with_stable_uids(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "s")
    (store.clusters_dir / "fleet.yaml").write_text(CLUSTER)
    items, _ = await store.list(SERVICES, label_selector="goatlas.io/cluster=true")
    assert [i["metadata"]["name"] for i in items] == ["east", "west"]
    uid = items[0]["metadata"]["uid"]
    again = await FileStore(tmp_path / "s").get(SERVICES, "east")
    assert again["metadata"]["uid"] == uid and uid
    assert again["metadata"]["namespace"] == "monitoring"


async def test_secrets_are_private_and_values_exported(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "s")
    await store.apply(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "east-envoy-values", "labels": {"a": "b"}},
            "stringData": {"values.yaml": "files: {}\n"},
        }
    )
    got = await store.get(SECRETS, "east-envoy-values")
    assert base64.b64decode(got["data"]["values.yaml"]) == b"files: {}\n"
    secret_file = store.objects_dir / "secrets" / "east-envoy-values.yaml"
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    values = store.values_dir / "east.yaml"
    assert values.read_text() == "files: {}\n"
    assert stat.S_IMODE(values.stat().st_mode) == 0o600
    await store.delete(SECRETS, "east-envoy-values")
    assert not values.exists()
    with pytest.raises(NotFound):
        await store.get(SECRETS, "east-envoy-values")


async def test_selector_create_merge_patch_and_cluster_removal(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "s")
    cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "z", "labels": {"x": "1"}}}
    await store.create(cm)
    with pytest.raises(AlreadyExists):
        await store.create(cm)
    assert (await store.list(CONFIGMAPS, label_selector="x=1"))[0]
    assert not (await store.list(CONFIGMAPS, label_selector="x=2"))[0]
    patched = await store.patch_merge(CONFIGMAPS, "z", {"metadata": {"labels": {"x": None}}})
    assert patched["metadata"].get("labels") == {}
    await store.apply(yaml.safe_load(CLUSTER.split("---")[0]))
    assert (store.clusters_dir / "east.yaml").exists()
    await store.delete(SERVICES, "east")
    assert not (store.clusters_dir / "east.yaml").exists()


async def test_a_bad_file_is_one_problem_and_every_other_file_keeps_flowing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    told: list[tuple[str, str | None]] = []
    store = FileStore(tmp_path, on_problem=lambda f, m: told.append((f, m)))
    (store.clusters_dir / "c.yaml").write_text(CLUSTER)
    (store.clusters_dir / "bad.yaml").write_text("kind: Service\nmetadata: [1]\n")
    (store.clusters_dir / "worse.yaml").write_text("kind: Service\nmetadata: [\n")
    with caplog.at_level(logging.WARNING, logger="atlasd.standalone"):
        for _ in range(3):  # every poll lists: each problem is told and logged once
            items, _ = await store.list(SERVICES)
            assert {i["metadata"]["name"] for i in items} == {"east", "west"}
    assert told == [
        ("clusters/bad.yaml", "clusters/bad.yaml: document 1: metadata is not a mapping"),
        (
            "clusters/worse.yaml",
            "clusters/worse.yaml: not valid YAML at line 3, column 1: "
            "did not find expected node content",
        ),
    ]
    assert caplog.text.count("bad.yaml") == 1 and caplog.text.count("worse.yaml") == 1
    assert set(store.problems()) == {"clusters/bad.yaml", "clusters/worse.yaml"}
    # Another cluster can still be added and read back.
    added = await store.apply(
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "north",
         "labels": {"goatlas.io/cluster": "true"}}}
    )  # fmt: skip
    assert (await store.get(SERVICES, "north"))["metadata"]["uid"] == added["metadata"]["uid"]
    # Fixed or removed: the problem clears.
    (store.clusters_dir / "bad.yaml").write_text("kind: Service\nmetadata: {name: south}\n")
    (store.clusters_dir / "worse.yaml").unlink()
    items, _ = await store.list(SERVICES)
    assert {i["metadata"]["name"] for i in items} == {"east", "west", "north", "south"}
    assert told[2:] == [("clusters/worse.yaml", None), ("clusters/bad.yaml", None)]
    assert store.problems() == {}


async def test_a_file_that_turns_bad_keeps_its_clusters(tmp_path: Path) -> None:
    """A typo in a file that declared clusters removes none of them (it would revoke them)."""
    store = FileStore(tmp_path)
    (store.clusters_dir / "c.yaml").write_text(CLUSTER)
    items, _ = await store.list(SERVICES)
    assert {i["metadata"]["name"] for i in items} == {"east", "west"}
    (store.clusters_dir / "c.yaml").write_text(CLUSTER + "\n  : [oops\n")
    items, _ = await store.list(SERVICES)
    assert {i["metadata"]["name"] for i in items} == {"east", "west"}
    assert list(store.problems()) == ["clusters/c.yaml"]


async def test_file_system_failures_are_retriable_kube_errors(tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    (store.objects_dir / "secrets").mkdir()
    (store.objects_dir / "secrets" / "x.yaml").mkdir()  # a directory where a file should be
    with pytest.raises(ServerError) as err:
        await store.get(SECRETS, "x")
    assert err.value.retriable
    with pytest.raises(Invalid, match=r"no metadata\.name"):
        await store.apply({"apiVersion": "v1", "kind": "Secret", "metadata": {}})
    for name in ("../../escape", ".hidden"):
        with pytest.raises(Invalid, match="not a valid object name"):
            await store.apply({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name}})
    assert not (tmp_path.parent / "escape.yaml").exists()


async def test_the_watch_reports_changes_since_the_list_it_starts_from(tmp_path: Path) -> None:
    store = FileStore(tmp_path, poll_seconds=0.01)
    (store.clusters_dir / "c.yaml").write_text(CLUSTER)
    items, rv = await store.list(SERVICES)
    assert {i["metadata"]["name"] for i in items} == {"east", "west"}
    # A change made after the list and before the watch starts is not lost.
    (store.clusters_dir / "c.yaml").write_text(CLUSTER.split("---")[0])
    events = []
    async for event in store.watch(SERVICES, resource_version=rv, timeout_seconds=5):
        events.append((event["type"], event["object"]["metadata"].get("name")))
        if event["type"] == "BOOKMARK":
            break
    assert ("DELETED", "west") in events and ("MODIFIED", "east") in events
    with pytest.raises(Gone):
        async for _ in store.watch(SERVICES, resource_version="unknown", timeout_seconds=1):
            pass


async def test_a_change_costs_the_files_it_touched(tmp_path: Path) -> None:
    """Each file is parsed once per version: a list after a write hands out the same
    objects for the files that did not change, a new one for the file that did, and
    forgets files that are gone."""
    store = FileStore(tmp_path / "s")
    for name in ("a", "b", "c"):
        await store.apply(
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": name, "labels": {"x": "y"}},
                "data": {"k": base64.b64encode(name.encode()).decode()},
            }
        )
    first, _ = await store.list(SECRETS, label_selector="x=y")
    again, _ = await store.list(SECRETS, label_selector="x=y")
    assert [o["metadata"]["name"] for o in again] == ["a", "b", "c"]
    assert all(x is y for x, y in zip(first, again, strict=True))
    await store.apply(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "b", "labels": {"x": "y"}},
            "data": {"k": base64.b64encode(b"changed").decode()},
        }
    )
    await store.delete(SECRETS, "c")
    after, _ = await store.list(SECRETS, label_selector="x=y")
    assert [o["metadata"]["name"] for o in after] == ["a", "b"]
    assert after[0] is first[0]
    assert after[1] is not first[1]
    assert base64.b64decode(after[1]["data"]["k"]) == b"changed"
    assert after[1]["metadata"]["resourceVersion"] != first[1]["metadata"]["resourceVersion"]
    assert len(store._parsed) == 2
    # get hands out a copy: the caller may change it.
    got = await store.get(SECRETS, "a")
    got["data"]["k"] = "eA=="
    assert (await store.get(SECRETS, "a"))["data"]["k"] == first[0]["data"]["k"] != "eA=="


async def test_a_declared_service_without_a_kind_is_not_a_cluster(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "s")
    (store.clusters_dir / "odd.yaml").write_text(
        "metadata: {name: nokind, labels: {goatlas.io/cluster: 'true'}}\n---\n" + CLUSTER
    )
    items, _ = await store.list(SERVICES, label_selector="goatlas.io/cluster=true")
    assert [i["metadata"]["name"] for i in items] == ["east", "west"]
    (store.clusters_dir / "odd.yaml").write_text("kind: Service\nmetadata: [1]\n")
    items, _ = await store.list(SERVICES)  # the file's last good clusters, and its problem
    assert [i["metadata"]["name"] for i in items] == ["east", "west"]
    assert store.problems() == {
        "clusters/odd.yaml": "clusters/odd.yaml: document 1: metadata is not a mapping"
    }
