"""Snapshots: content versions and the consistency check; the cache's change rules."""

from __future__ import annotations

import pytest

from atlasd.xds.cache import SnapshotCache
from atlasd.xds.snapshot import (
    CLUSTER,
    LISTENER,
    ROUTE,
    SECRET,
    InconsistentSnapshot,
    Resource,
    Snapshot,
)


def lst(name: str = "l", route: str = "r", secrets: tuple[str, ...] = ("server",)) -> Resource:
    refs = {(ROUTE, route)} | {(SECRET, s) for s in secrets}
    return Resource.of(LISTENER, name, f"listener {name} {route}".encode(), refs)


def route(name: str = "r", cluster: str = "c", body: str = "") -> Resource:
    return Resource.of(ROUTE, name, f"route {name} {cluster} {body}".encode(), {(CLUSTER, cluster)})


def cluster(name: str = "c", body: str = "") -> Resource:
    return Resource.of(CLUSTER, name, f"cluster {name} {body}".encode())


def secret(name: str = "server") -> Resource:
    return Resource.of(SECRET, name, f"secret {name}".encode())


def good() -> list[Resource]:
    return [lst(), route(), cluster(), secret()]


def test_versions_follow_content_per_type() -> None:
    a = Snapshot.create("n", good())
    b = Snapshot.create("n", list(reversed(good())))
    assert a.versions == b.versions  # order does not matter
    c = Snapshot.create("n", [lst(), route(), cluster(body="changed"), secret()])
    assert c.version(CLUSTER) != a.version(CLUSTER)
    for t in (LISTENER, ROUTE, SECRET):
        assert c.version(t) == a.version(t)
    assert c.get(CLUSTER, "c") is not None
    assert c.get(LISTENER, "l") == a.get(LISTENER, "l")


@pytest.mark.parametrize(
    ("why", "resources", "match"),
    [
        (
            "listener names a missing route",
            [lst(route="nope"), route(), cluster(), secret()],
            "missing rds 'nope'",
        ),
        (
            "route names a missing cluster",
            [lst(), route(cluster="nope"), cluster(), secret()],
            "missing cds 'nope'",
        ),
        (
            "listener names a missing secret",
            [lst(secrets=("x",)), route(), cluster()],
            "missing sds 'x'",
        ),
        ("unreferenced secret", [*good(), secret("extra")], "unreferenced secrets"),
        ("duplicate", [*good(), cluster()], "duplicate"),
    ],
)
def test_inconsistent_snapshots_are_refused(
    why: str, resources: list[Resource], match: str
) -> None:
    with pytest.raises(InconsistentSnapshot, match=match):
        Snapshot.create("n", resources)


def test_snapshot_is_immutable() -> None:
    s = Snapshot.create("n", good())
    with pytest.raises(TypeError):
        s.resources[CLUSTER]["x"] = cluster("x")  # type: ignore[index]


def test_cache_sends_nothing_for_an_equal_snapshot() -> None:
    cache = SnapshotCache()
    calls: list[str] = []
    cache.watch("n", lambda diff: calls.append("n"))
    assert cache.set_snapshot("n", Snapshot.create("n", good()))
    assert not cache.set_snapshot("n", Snapshot.create("n", good()))
    assert calls == ["n"]
    assert cache.set_snapshot(
        "n", Snapshot.create("n", [lst(), route(), cluster(body="2"), secret()])
    )
    assert calls == ["n", "n"]


def test_publish_drops_missing_nodes_and_notifies_them() -> None:
    cache = SnapshotCache()
    seen: list[str] = []
    for n in ("a", "b"):
        cache.watch(n, lambda diff, n=n: seen.append(n))
    cache.publish({"a": Snapshot.create("a", good()), "b": Snapshot.create("b", good())})
    seen.clear()
    assert cache.publish({"a": Snapshot.create("a", good())}) == {"b"}
    assert seen == ["b"]
    assert cache.get("b") is None and cache.nodes() == ["a"]


def test_watch_cancel() -> None:
    cache = SnapshotCache()
    seen: list[int] = []
    cancel = cache.watch("a", lambda diff: seen.append(1))
    cancel()
    cache.set_snapshot("a", Snapshot.create("a", good()))
    assert seen == []


def test_snapshot_node_must_match() -> None:
    with pytest.raises(ValueError, match="published as"):
        SnapshotCache().set_snapshot("a", Snapshot.create("b", good()))


def test_status_board_json_shape() -> None:
    cache = SnapshotCache()
    sid = cache.board.open(node="east", kind="delta", peer="1.2.3.4:5")
    cache.board.acked(sid, CLUSTER, "v1")
    cache.board.nacked(sid, LISTENER, "v2", "bad listener")
    [d] = [s.as_dict() for s in cache.status()]
    assert d["node"] == "east" and d["kind"] == "delta"
    assert d["acked"] == {"cds": "v1"}
    assert d["last_nack"] is not None
    assert (d["last_nack"]["type"], d["last_nack"]["message"]) == ("lds", "bad listener")
    assert d["nacks"] == 1
    cache.board.close(sid)
    assert cache.status() == []
