"""observed: the fleet every replica serves is what the leader's plan stored."""

from __future__ import annotations

import datetime as dt
from typing import Any

from atlasd import labels
from atlasd.model import Settings
from atlasd.reconcile.observed import observed_fleet
from atlasd.reconcile.pki import PKIPlan, plan_pki
from atlasd.reconcile.validate import validate_all
from tests.unit.reconcile.builders import cluster_service
from tests.unit.reconcile.pkitools import CountingKeys, plan_secrets, with_annotation

NOW = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
S = Settings()
SERVICES = [
    cluster_service("east", "203.0.113.1"),
    cluster_service("west", "203.0.113.2"),
    cluster_service("bad", None),
]


def _stored(services: list[dict[str, Any]] = SERVICES) -> tuple[PKIPlan, dict[str, Any]]:
    clusters, _ = validate_all(services, S)
    plan = plan_pki(secrets={}, clusters=clusters, settings=S, now=NOW, keys=CountingKeys())
    return plan, dict(plan_secrets(plan))


def test_observed_pki_equals_the_stored_plan() -> None:
    plan, secrets = _stored()
    obs = observed_fleet(services=SERVICES, secrets=secrets, settings=S, now=NOW)
    assert obs.fleet.pki == plan.pki
    assert [c.name for c in obs.fleet.clusters] == ["east", "west"]
    assert obs.pending == ()
    assert [p.source.name for p in obs.problems] == ["bad"]


def test_cluster_without_identity_is_pending() -> None:
    _, secrets = _stored()
    del secrets["west-atlas-identity"]
    obs = observed_fleet(services=SERVICES, secrets=secrets, settings=S, now=NOW)
    assert [c.name for c in obs.fleet.clusters] == ["east"]
    assert obs.pending == ("west",)
    assert obs.fleet.pki is not None and obs.fleet.pki.identity("west") is None


def test_no_ca_means_no_pki_and_no_clusters() -> None:
    obs = observed_fleet(services=SERVICES, secrets={}, settings=S, now=NOW)
    assert obs.fleet.pki is None and obs.fleet.clusters == ()


def test_leaves_of_the_previous_ca_are_still_served_during_rotation() -> None:
    plan, secrets = _stored()
    secrets["atlas-ca"] = with_annotation(plan.ca_secret, labels.CA_ROTATE_ANNOTATION, "x")
    clusters, _ = validate_all(SERVICES, S)
    rotated = plan_pki(
        secrets=secrets, clusters=clusters, settings=S, now=NOW, keys=CountingKeys(start=7000)
    )
    # Only the CA Secret has been written so far; the leaves are still the old ones.
    secrets["atlas-ca"] = rotated.ca_secret
    obs = observed_fleet(services=SERVICES, secrets=secrets, settings=S, now=NOW)
    assert [c.name for c in obs.fleet.clusters] == ["east", "west"]
    assert obs.fleet.pki is not None
    assert obs.fleet.pki.trust_bundle == rotated.pki.trust_bundle
    assert obs.fleet.pki.identity("east") == plan.pki.identity("east")
