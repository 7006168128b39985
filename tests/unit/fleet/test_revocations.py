"""The fleet reads Secret atlas-revocations: a revocation is a change of its cluster's key
(and the fleet-wide one), carried in the model with a CRL; a bad entry is a Problem; the
reconciler's plan re-issues exactly the revoked leaves."""

from __future__ import annotations

import base64
import datetime as dt
import json
from typing import Any

from cryptography import x509

from atlasd import labels, revocation
from atlasd.fleet.keys import FLEET_KEY
from atlasd.fleet.state import FleetState
from atlasd.fleet.validate import validate_cluster
from atlasd.kube.secrets import secret_data
from atlasd.reconcile.pki import plan_identity, signing_ca
from tests.unit.fleet.test_state import NOW, S, _observe_secrets, _pki_secrets, stored
from tests.unit.reconcile.builders import cluster_service
from tests.unit.reconcile.pkitools import CountingKeys


def _revocations_secret(entries: list[revocation.Revoked], raw: bytes | None = None) -> Any:
    data = raw if raw is not None else revocation.dump(entries)
    return stored(
        {
            "metadata": {
                "name": labels.REVOCATIONS_SECRET,
                "labels": {labels.MANAGED_BY_LABEL: labels.MANAGED_BY_VALUE},
            },
            "data": {revocation.REVOCATIONS_KEY: base64.b64encode(data).decode()},
        }
    )


def _world() -> tuple[FleetState, dict[str, Any]]:
    state = FleetState(S)
    secrets = _pki_secrets("east", "west")
    _observe_secrets(state, secrets)
    for n, ip in (("east", "203.0.113.1"), ("west", "203.0.113.2")):
        state.observe("cluster-services", n, stored(cluster_service(n, ip)))
    state.derive(state.keys(), now=NOW)
    return state, secrets


def _east_entries(secrets: dict[str, Any]) -> list[revocation.Revoked]:
    data = secret_data(secrets["east-atlas-identity"])
    return [
        revocation.revoke("east", kind, data[f"{kind}.crt"], now=NOW) for kind in revocation.KINDS
    ]


def test_a_revocation_changes_its_cluster_and_the_model_carries_its_crl() -> None:
    state, secrets = _world()
    entries = _east_entries(secrets)
    obj = _revocations_secret(entries)
    update = state.derive(state.observe("owned-secrets", labels.REVOCATIONS_SECRET, obj), now=NOW)
    assert update.changed == {FLEET_KEY, "east"}
    rev = update.version.model.revocations["east"]
    assert rev.hashes == {e.sha256 for e in entries}
    crl = x509.load_pem_x509_crl(rev.crl)
    assert {r.serial_number for r in crl} == {e.serial for e in entries}
    assert set(update.version.model.revocations) == {"east"}
    # Another fleet-wide change re-derives, signs nothing new, changes no cluster.
    again = state.derive({FLEET_KEY}, now=NOW)
    assert again.changed == {FLEET_KEY}
    assert again.version.model.revocations["east"] is rev
    # Past the certificates' notAfter the entries are gone, and so is the CRL.
    later = entries[0].not_after + dt.timedelta(seconds=1)
    gone = state.derive({FLEET_KEY}, now=later)
    assert "east" in gone.changed and dict(gone.version.model.revocations) == {}


def test_an_entry_that_does_not_parse_is_a_problem_and_the_others_hold() -> None:
    state, secrets = _world()
    good = _east_entries(secrets)[0].doc()
    raw = json.dumps({"revoked": [good, {"cluster": "west"}]}).encode()
    v = state.derive(
        state.observe("owned-secrets", labels.REVOCATIONS_SECRET, _revocations_secret([], raw)),
        now=NOW,
    ).version
    assert set(v.model.revocations) == {"east"}
    [problem] = [p for p in v.problems() if p.reason == "InvalidRevocation"]
    assert problem.source.name == labels.REVOCATIONS_SECRET
    assert problem.message.startswith("revocations.json revoked[1]")


def test_the_plan_re_issues_the_revoked_leaves_only() -> None:
    state, secrets = _world()
    v = state.derive({FLEET_KEY}, now=NOW).version
    assert v.fleetwide.ca is not None
    ca = signing_ca(v.fleetwide.ca)
    cluster = validate_cluster(cluster_service("east", "203.0.113.1"), S)
    assert not isinstance(cluster, list)
    observed = secrets["east-atlas-identity"]
    entries = _east_entries(secrets)
    kept = plan_identity(cluster, observed, ca=ca, settings=S, now=NOW, keys=CountingKeys())
    assert kept.issued == () and kept.revoked == ()
    server_only = frozenset({entries[0].sha256})
    plan = plan_identity(
        cluster, observed, ca=ca, settings=S, now=NOW, keys=CountingKeys(), revoked=server_only
    )
    assert plan.issued == ("east/server",)
    assert plan.revoked == (("east/server", entries[0].serial),)
    assert plan.identity.client == kept.identity.client
    assert revocation.pem_fingerprint(plan.identity.server.cert_pem) not in server_only
