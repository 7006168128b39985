"""What an operator sees of rejected cluster Services, from the fleet versions: the
``atlasd_invalid_clusters`` gauge counts Services (not Problems), /status lists every
Problem, and the log says each Problem once, when it appears."""

from __future__ import annotations

import copy
import datetime as dt
import itertools
import logging
from typing import Any

import pytest
from prometheus_client import REGISTRY

from atlasd import labels
from atlasd.fleet.feed import FleetFeed
from atlasd.fleet.run import _log_new_problems
from atlasd.fleet.state import FleetState
from atlasd.hub import StatusHub
from atlasd.model import Settings
from atlasd.report import FleetReport
from tests.unit.reconcile.builders import cluster_service

NOW = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
_rv = itertools.count(1)


def stored(obj: dict[str, Any], *, created: str) -> dict[str, Any]:
    out = copy.deepcopy(obj)
    out["metadata"].update(
        resourceVersion=str(next(_rv)), creationTimestamp=created, uid=out["metadata"]["name"]
    )
    return out


class Fleet:
    """FleetState -> FleetFeed -> FleetReport and the problem log, as ``run_fleet`` and
    ``run_status`` wire them."""

    def __init__(self) -> None:
        self.state = FleetState(Settings())
        self.feed = FleetFeed()
        self.hub = StatusHub()
        self.report = FleetReport(self.hub)

    def observe(self, name: str, svc: dict[str, Any] | None) -> None:
        keys = self.state.observe("cluster-services", name, svc)
        update = self.state.derive(keys, now=NOW)
        before = self.feed.latest
        self.feed.publish(update)
        _log_new_problems(before, update)
        self.report.update(update.version, update.changed)

    def problems(self) -> list[tuple[str, str]]:
        return sorted((p["object"], p["field"]) for p in self.hub.snapshot()["problems"])


def invalid() -> float | None:
    return REGISTRY.get_sample_value("atlasd_invalid_clusters")


def test_the_invalid_gauge_counts_services_and_status_lists_every_problem() -> None:
    fleet = Fleet()
    # Two Problems on one Service.
    two = cluster_service("two", "192.0.2.1", replicas="many")
    two["spec"]["ports"] = [{"name": "Thanos", "port": 10901}]
    fleet.observe("two", stored(two, created="2026-01-01T00:00:00Z"))
    # One valid cluster, and a younger one wanting its address.
    fleet.observe(
        "east", stored(cluster_service("east", "192.0.2.2"), created="2026-01-01T00:00:00Z")
    )
    fleet.observe(
        "west", stored(cluster_service("west", "192.0.2.2"), created="2026-01-02T00:00:00Z")
    )
    # A cluster label that is not exactly "true".
    typo = cluster_service("typo", "192.0.2.3")
    typo["metadata"]["labels"][labels.CLUSTER_LABEL] = "True"
    fleet.observe("typo", stored(typo, created="2026-01-01T00:00:00Z"))

    assert fleet.problems() == [
        ("Service/two", 'metadata.labels["goatlas.io/replicas"]'),
        ("Service/two", "spec.ports[0].name"),
        ("Service/typo", 'metadata.labels["goatlas.io/cluster"]'),
        ("Service/west", "spec.externalIPs[0]"),
    ]
    assert invalid() == 3  # two, west, typo: Services, not the 4 Problems
    help_text = next(
        m.documentation for m in REGISTRY.collect() if m.name == "atlasd_invalid_clusters"
    )
    assert help_text.startswith("Cluster Services rejected")

    # Fixed, deleted: each Service leaves the count once.
    fleet.observe(
        "two", stored(cluster_service("two", "192.0.2.1"), created="2026-01-01T00:00:00Z")
    )
    assert invalid() == 2
    fleet.observe("east", None)  # west gets the address
    assert invalid() == 1
    fleet.observe("typo", None)
    assert invalid() == 0 and fleet.problems() == []


def test_each_problem_is_logged_once_when_it_appears(caplog: pytest.LogCaptureFixture) -> None:
    fleet = Fleet()
    bad = cluster_service("east", "192.0.2.1", replicas="many")

    def logged() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.getMessage().startswith("rejected: ")]

    with caplog.at_level(logging.WARNING, logger="atlasd.fleet.run"):
        fleet.observe("east", stored(bad, created="2026-01-01T00:00:00Z"))
        [line] = logged()
        assert "Service" in line and "east" in line and "goatlas.io/replicas" in line
        # The key the line concerns is a field of its own (--log-format json shows it).
        assert [getattr(r, "key", None) for r in caplog.records] == ["east"]
        assert "'many'" in line and "(InvalidCluster)" in line
        # The same Service written again (new resourceVersion, same problem), and other
        # clusters coming and going: nothing new to say.
        fleet.observe("east", stored(bad, created="2026-01-01T00:00:00Z"))
        fleet.observe(
            "west", stored(cluster_service("west", "192.0.2.9"), created="2026-01-01T00:00:00Z")
        )
        fleet.observe("west", None)
        assert len(logged()) == 1
        # A second problem appears: that one is logged (and the first not again).
        worse = copy.deepcopy(bad)
        worse["spec"]["ports"] = [{"name": "Thanos", "port": 10901}]
        fleet.observe("east", stored(worse, created="2026-01-01T00:00:00Z"))
        assert len(logged()) == 2 and "spec.ports[0].name" in logged()[1]
        # Fixed, then broken again: it is news again.
        fleet.observe(
            "east", stored(cluster_service("east", "192.0.2.1"), created="2026-01-01T00:00:00Z")
        )
        fleet.observe("east", stored(bad, created="2026-01-01T00:00:00Z"))
        assert len(logged()) == 3
        # A cluster label that is not exactly "true" is logged too.
        typo = cluster_service("typo", "192.0.2.3")
        typo["metadata"]["labels"][labels.CLUSTER_LABEL] = "false"
        fleet.observe("typo", stored(typo, created="2026-01-01T00:00:00Z"))
        assert len(logged()) == 4 and "InvalidClusterLabel" in logged()[3]


def test_stream_documents_are_made_again_only_for_streams_that_changed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``EnvoyDocs``: an ACK replaces one stream's status; only that stream's document is
    made again (the others are the same objects), and a call with nothing changed says so."""
    from atlasd import report
    from atlasd.xds.streams import EnvoyStatus, StatusBoard

    made: list[int] = []
    real = EnvoyStatus.as_dict

    def counting(st: EnvoyStatus) -> Any:
        made.append(st.stream_id)
        return real(st)

    monkeypatch.setattr(EnvoyStatus, "as_dict", counting)
    board = StatusBoard()
    sids = [board.open(node=f"c{i}", kind="delta", peer="192.0.2.1:1") for i in range(3)]
    docs = report.EnvoyDocs()
    first, changed = docs(board.all())
    assert changed and sorted(made) == sids
    again, changed = docs(board.all())
    assert not changed and all(a is b for a, b in zip(first, again, strict=True))
    made.clear()
    board.acked(sids[1], "type.googleapis.com/envoy.config.cluster.v3.Cluster", "v2")
    after, changed = docs(board.all())
    assert changed and made == [sids[1]]
    assert after[1]["acked"] == {"cds": "v2"} and after[0] is first[0]
    board.close(sids[2])
    gone, changed = docs(board.all())
    assert changed and len(gone) == 2 and made == [sids[1]]
