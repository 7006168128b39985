"""Expectations a full pass sets are met by what the watch cache shows: every object of
the key, the cluster Service atlasd does not own included."""

from __future__ import annotations

import datetime as dt

from atlasd.fleet.state import fleet_of
from atlasd.model import Settings
from atlasd.reconcile.applier import Reconciler
from tests.unit.fakekube import FakeKube
from tests.unit.reconcile.builders import cluster_service
from tests.unit.reconcile.pkitools import CountingKeys

NOW = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
S = Settings()


async def test_a_listed_cluster_service_the_cache_shows_is_not_waited_for() -> None:
    # A full pass that found the cache behind its LIST expects every listed object; once
    # the cache shows them, the key is acted on, not left waiting until the deadline.
    kube = FakeKube()
    svc = await kube.create(cluster_service("east", "203.0.113.1"))
    version = fleet_of(services=[svc], secrets=[], settings=S, now=NOW)
    rec = Reconciler(settings=S, keys=CountingKeys(), clock=lambda: 0.0)
    listed = {("Service", "east"): svc["metadata"]["resourceVersion"]}
    rec.expectations.expect("east", listed, now=0.0)
    result = await rec.reconcile_key(kube, version, "east", now=NOW)
    assert result.waiting_until is None and len(rec.expectations) == 0
