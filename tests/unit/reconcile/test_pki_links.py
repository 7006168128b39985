"""A rotation links the new CA to the old one: peers that trust only the old CA (Envoys
restarted from values rendered before the rotation) accept what the new CA signs, checked
by OpenSSL itself; the link goes with the old CA."""

from __future__ import annotations

import datetime as dt

from cryptography import x509

from atlasd import labels
from atlasd.kube.secrets import secret_data
from atlasd.model import Settings
from atlasd.reconcile.objects import secret_object
from atlasd.reconcile.pki import PKIPlan
from tests.unit.reconcile.pkitools import (
    CountingKeys,
    openssl_verdict,
    original_ca,
    plan_secrets,
    with_annotation,
)
from tests.unit.reconcile.test_pki import NOW, _plan

DAY = dt.timedelta(days=1)


def _rotate(plan: PKIPlan, *, at: dt.datetime, start: int) -> PKIPlan:
    secrets = plan_secrets(plan)
    secrets["atlas-ca"] = with_annotation(plan.ca_secret, labels.CA_ROTATE_ANNOTATION, "")  # type: ignore[assignment]
    rotated = _plan(secrets, keys=CountingKeys(start=start), now=at)
    assert rotated.ca_action == "rotated"
    return rotated


def _served(plan: PKIPlan, node: str = "east") -> tuple[bytes, bytes]:
    """A leaf as atlasd serves it (followed by the chain) and its key."""
    ident = plan.identities[node]
    return plan.pki.with_chain(ident.server.cert_pem), ident.server.key_pem


def test_a_peer_trusting_only_the_old_ca_accepts_the_new_leaves() -> None:
    first = _plan()
    old_pem = first.pki.ca.cert_pem
    rotated = _rotate(first, at=NOW + DAY, start=7000)
    chain, key = _served(rotated)
    assert openssl_verdict(chain, key, old_pem) is None
    assert openssl_verdict(chain, key, rotated.pki.trust_bundle) is None
    assert openssl_verdict(chain, key, rotated.pki.ca.cert_pem) is None
    # Without the link the old CA cannot vouch for the new leaf.
    leaf_only = rotated.identities["east"].server.cert_pem
    assert openssl_verdict(leaf_only, key, old_pem) == "unable to get local issuer certificate"

    (link,) = x509.load_pem_x509_certificates(rotated.pki.chain)
    old, new = (x509.load_pem_x509_certificate(p) for p in (old_pem, rotated.pki.ca.cert_pem))
    assert link.subject == link.issuer == old.subject == new.subject, "self-issued link"
    assert link.public_key() == new.public_key()
    link.verify_directly_issued_by(old)
    assert link.not_valid_after_utc == min(old.not_valid_after_utc, new.not_valid_after_utc)


def test_two_rotations_chain_back_to_the_first_ca() -> None:
    first = _plan()
    second = _rotate(first, at=NOW + DAY, start=7000)
    third = _rotate(second, at=NOW + 2 * DAY, start=8000)
    assert len(x509.load_pem_x509_certificates(third.pki.chain)) == 2
    chain, key = _served(third)
    for trusted in (first.pki.ca.cert_pem, second.pki.ca.cert_pem, third.pki.trust_bundle):
        assert openssl_verdict(chain, key, trusted) is None


def test_rotating_the_originals_rsa_ca_links_it_too() -> None:
    secret, cert_pem, _ = original_ca(NOW)
    adopted = _plan({"atlas-ca": secret})
    rotated = _rotate(adopted, at=NOW + DAY, start=7000)
    new = x509.load_pem_x509_certificate(rotated.pki.ca.cert_pem)
    assert new.subject == x509.load_pem_x509_certificate(cert_pem).subject
    chain, key = _served(rotated)
    assert openssl_verdict(chain, key, cert_pem) is None


def test_the_link_goes_with_its_ca() -> None:
    """An operator retires the old CA by deleting ``ca-<serial>.pem``: its link goes too,
    and a peer that trusts only the old CA no longer accepts the new leaves."""
    first = _plan()
    rotated = _rotate(first, at=NOW + DAY, start=7000)
    secrets = plan_secrets(rotated)
    data = secret_data(rotated.ca_secret)
    del data[f"ca-{first.pki.ca_serial}.pem"]
    secrets["atlas-ca"] = secret_object(
        name="atlas-ca",
        namespace="monitoring",
        data=data,
        obj_labels=rotated.ca_secret["metadata"]["labels"],
    )
    retired = _plan(secrets, now=NOW + 2 * DAY)
    assert retired.ca_action == "kept"
    assert set(secret_data(retired.ca_secret)) == {"ca.pem", "ca-key.pem"}
    assert retired.pki.chain == b"" and retired.pki.trust_bundle == rotated.pki.ca.cert_pem
    chain, key = _served(retired)
    assert openssl_verdict(chain, key, first.pki.ca.cert_pem) is not None


def test_a_link_that_does_not_check_out_is_not_served() -> None:
    first = _plan()
    rotated = _rotate(first, at=NOW + DAY, start=7000)
    other = _rotate(_plan(keys=CountingKeys(start=9000, pool=8)), at=NOW + DAY, start=9500)
    secrets = plan_secrets(rotated)
    data = secret_data(rotated.ca_secret)
    data[f"ca-cross-{first.pki.ca_serial}.pem"] = other.pki.chain  # signed by another CA
    secrets["atlas-ca"] = secret_object(
        name="atlas-ca",
        namespace="monitoring",
        data=data,
        obj_labels=rotated.ca_secret["metadata"]["labels"],
    )
    assert _plan(secrets, now=NOW + 2 * DAY).pki.chain == b""


def test_an_expired_ca_is_replaced_without_a_link() -> None:
    short = Settings(ca_lifetime=dt.timedelta(days=30), leaf_lifetime=dt.timedelta(days=10))
    expired = _rotate(_plan(settings=short), at=NOW + dt.timedelta(days=31), start=7000)
    assert expired.pki.chain == b"" and expired.pki.trust_bundle == expired.pki.ca.cert_pem
