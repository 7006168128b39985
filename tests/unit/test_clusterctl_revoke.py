"""``atlasd cluster revoke`` (``clusterctl.revoke``) against the in-memory API: what it
stores, a concurrent writer (Conflict: read again, nothing lost), a second revoke of the
same certificates, and the one-line refusals."""

from __future__ import annotations

import base64
import datetime as dt
from typing import Any

import pytest
import trio

from atlasd import clusterctl, labels, revocation
from atlasd.clusterctl import ClusterError
from atlasd.kube.errors import Conflict
from atlasd.kube.secrets import secret_data
from atlasd.model import Settings
from tests.unit.fakekube import FakeKube, api_error
from tests.unit.reconcile.builders import cluster_service
from tests.unit.xds import helpers

S = Settings()
NOW = dt.datetime.now(dt.UTC)
CA = helpers.make_ca()


def _identity(name: str) -> dict[str, Any]:
    ident = helpers.identity(CA, name)
    data = {"server.crt": ident.server.cert_pem, "client.crt": ident.client.cert_pem}
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": labels.identity_secret_name(name), "namespace": S.namespace},
        "data": {k: base64.b64encode(v).decode() for k, v in data.items()},
    }


def _kube(*names: str) -> FakeKube:
    kube = FakeKube()
    for i, n in enumerate(names):
        kube.put(cluster_service(n, f"203.0.113.{i + 1}"))
        kube.put(_identity(n))
    return kube


def _stored(kube: FakeKube) -> list[revocation.Revoked]:
    secret = kube.get_stored("secrets", labels.REVOCATIONS_SECRET)
    assert secret is not None
    assert secret["metadata"]["labels"] == {labels.MANAGED_BY_LABEL: labels.MANAGED_BY_VALUE}
    entries, problems = revocation.parse(secret_data(secret)[revocation.REVOCATIONS_KEY])
    assert problems == []
    return entries


def _revoke(kube: FakeKube, name: str) -> clusterctl.RevokeOutcome:
    async def go() -> clusterctl.RevokeOutcome:
        return await clusterctl.revoke(kube, name, settings=S, now=NOW)

    return trio.run(go)


def test_revoke_stores_both_certificates_and_a_second_revoke_adds_nothing() -> None:
    kube = _kube("east", "west")
    out = _revoke(kube, "east")
    assert [e.kind for e in out.added] == ["server", "client"]
    assert {e.sha256 for e in _stored(kube)} == {e.sha256 for e in out.found}
    again = _revoke(kube, "east")
    assert again.added == () and again.found == out.found
    _revoke(kube, "west")
    assert {e.cluster for e in _stored(kube)} == {"east", "west"}


def test_a_concurrent_writer_is_read_again_and_nothing_is_lost() -> None:
    kube = _kube("east", "west")
    _revoke(kube, "west")
    kube.fail_next.append(api_error(Conflict, "update", ("secrets", "atlas-revocations")))
    _revoke(kube, "east")
    assert {e.cluster for e in _stored(kube)} == {"east", "west"}
    assert kube.writes.count(("replace", labels.REVOCATIONS_SECRET)) == 1


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("no service", "no cluster named 'east' in namespace monitoring"),
        ("no identity", "cluster 'east' has no certificates yet"),
        ("enrolls, none yet", "cluster 'east' enrolls (goatlas.io/enrollment"),
        ("not a cluster", "Service 'east' is not a cluster"),
        ("bad entry", "Secret atlas-revocations: revocations.json revoked[0]"),
    ],
)
def test_refusals_are_one_line_naming_what_is_wrong(setup: str, message: str) -> None:
    kube = FakeKube()
    svc = cluster_service("east", "203.0.113.1")
    if setup == "enrolls, none yet":
        svc["metadata"]["annotations"] = {labels.ENROLLMENT_ANNOTATION: "true"}
        setup = "no identity"
    if setup == "not a cluster":
        del svc["metadata"]["labels"][labels.CLUSTER_LABEL]
    if setup != "no service":
        kube.put(svc)
    if setup != "no identity":
        kube.put(_identity("east"))
    if setup == "bad entry":
        kube.put(
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": labels.REVOCATIONS_SECRET, "namespace": S.namespace},
                "data": {
                    revocation.REVOCATIONS_KEY: base64.b64encode(b'{"revoked": [1]}').decode()
                },
            }
        )
    with pytest.raises(ClusterError) as exc:
        _revoke(kube, "east")
    assert str(exc.value).startswith(message)
    assert "\n" not in str(exc.value) and "BEGIN" not in str(exc.value)


def _enrolled(kube: FakeKube, name: str) -> dict[str, bytes]:
    """What the enrollment endpoint records after signing an agent's requests."""
    from atlasd.reconcile import enrolled

    ident = helpers.identity(CA, name)  # stands for the agent's certificates
    certs = {"server": ident.server.cert_pem, "client": ident.client.cert_pem}
    trio.run(lambda: enrolled.record_issued(kube, name, certs, namespace=S.namespace))
    return certs


def test_an_enrolled_clusters_certificates_are_revoked_too() -> None:
    kube = _kube("east")
    enrolled = _enrolled(kube, "east")
    out = _revoke(kube, "east")
    assert len(out.added) == 4  # atlasd's two (compatible mode) and the agent's two
    want = {revocation.pem_fingerprint(pem) for pem in enrolled.values()}
    assert want <= {e.sha256 for e in _stored(kube)}


def test_an_enrolled_only_cluster_is_revoked_without_an_identity_secret() -> None:
    kube = FakeKube()
    kube.put(cluster_service("east", "203.0.113.1"))
    enrolled = _enrolled(kube, "east")
    out = _revoke(kube, "east")
    assert {e.sha256 for e in out.added} == {
        revocation.pem_fingerprint(pem) for pem in enrolled.values()
    }


def test_remove_revokes_what_was_enrolled_and_deletes_the_enrollment_secrets() -> None:
    """``cluster remove`` of an enrolled cluster: its enrolled certificates revoked first
    (a cluster re-added under the name does not take them back), then the Service, its
    join tokens (used or not) and the record of its renewals deleted; another cluster's
    tokens stay. A compatible cluster's removal revokes nothing (its 365-day certificates
    would pile up in atlas-revocations)."""
    from atlasd.enroll import store

    kube = _kube("west")
    kube.put(cluster_service("east", "203.0.113.9"))
    enrolled = _enrolled(kube, "east")

    async def tokens() -> None:
        for cluster in ("east", "west"):
            await store.mint(kube, cluster, namespace=S.namespace, ca_cert=CA.cert, now=NOW)

    trio.run(tokens)

    async def remove(name: str) -> clusterctl.RemoveOutcome:
        return await clusterctl.remove(kube, name, settings=S, now=NOW)

    out = trio.run(remove, "east")
    assert {e.sha256 for e in out.revoked} == {
        revocation.pem_fingerprint(pem) for pem in enrolled.values()
    }
    assert {e.sha256 for e in _stored(kube)} == {e.sha256 for e in out.revoked}
    assert out.forgotten == 2  # the token and east-atlas-enrolled
    assert kube.get_stored("services", "east") is None
    left = [n for (kind, n) in kube.objects if kind == "secrets"]
    assert not [n for n in left if n.startswith("east-atlas-enrolled")]
    joins = [n for n in left if n.startswith("atlas-join-")]
    assert len(joins) == 1  # west's
    assert trio.run(remove, "west") == clusterctl.RemoveOutcome(revoked=(), forgotten=1)
    assert len(_stored(kube)) == 2  # nothing of west's compatible certificates
