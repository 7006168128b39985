"""atlasd.revocation: the stored entries, their lifetime, and the CRL that lists them."""

from __future__ import annotations

import datetime as dt
import json

from cryptography import x509

from atlasd import revocation
from atlasd.reconcile.certs import CA
from atlasd.revocation import Revoked
from tests.unit.xds import helpers

NOW = dt.datetime.now(dt.UTC).replace(microsecond=0)


def _entries(ca: CA, cluster: str = "east") -> list[Revoked]:
    ident = helpers.identity(ca, cluster)
    return [
        revocation.revoke(cluster, "server", ident.server.cert_pem, now=NOW),
        revocation.revoke(cluster, "client", ident.client.cert_pem, now=NOW),
    ]


def test_an_entry_names_its_certificate_by_serial_and_hash() -> None:
    ca = helpers.make_ca()
    ident = helpers.identity(ca, "east")
    e = revocation.revoke("east", "server", ident.server.cert_pem, now=NOW)
    cert = x509.load_pem_x509_certificate(ident.server.cert_pem)
    assert e.serial == cert.serial_number
    assert e.not_after == cert.not_valid_after_utc
    assert e.sha256 == revocation.pem_fingerprint(ident.server.cert_pem)
    assert len(e.sha256) == 64
    assert revocation.pem_fingerprint(ident.client.cert_pem) != e.sha256


def test_stored_entries_read_back_the_same_and_the_bytes_are_stable() -> None:
    entries = _entries(helpers.make_ca())
    data = revocation.dump(entries)
    back, problems = revocation.parse(data)
    assert problems == []
    assert sorted(back) == sorted(entries)
    assert revocation.dump(reversed(back)) == data
    # No key material and no certificate body: serials, hashes and times only.
    assert b"BEGIN" not in data


def test_bad_entries_are_skipped_and_named_by_index() -> None:
    good = _entries(helpers.make_ca())[0].doc()
    doc = json.dumps({"revoked": [good, {**good, "kind": "key"}, {**good, "sha256": "zz"}, 7]})
    entries, problems = revocation.parse(doc.encode())
    assert len(entries) == 1
    assert [p.split(":")[0] for p in problems] == [
        "revocations.json revoked[1]",
        "revocations.json revoked[2]",
        "revocations.json revoked[3]",
    ]
    assert revocation.parse(b"not json") == ([], ["revocations.json is not JSON"])


def test_merge_adds_new_hashes_once_and_drops_the_expired() -> None:
    ca = helpers.make_ca()
    first = _entries(ca)
    stored, added = revocation.merge([], first, now=NOW)
    assert added == first and len(stored) == 2
    again, added = revocation.merge(stored, first, now=NOW)
    assert added == [] and again == stored
    # Past the certificates' notAfter nothing is kept (they are refused as expired).
    later = first[0].not_after + dt.timedelta(seconds=1)
    assert revocation.merge(stored, [], now=later) == ([], [])
    assert revocation.by_cluster(stored, now=later) == {}


def test_the_crl_is_signed_by_the_ca_lists_the_serials_and_is_deterministic() -> None:
    ca = helpers.make_ca()
    entries = _entries(ca)
    pem = revocation.sign_crl(
        entries, ca_cert_pem=ca.material.cert_pem, ca_key_pem=ca.material.key_pem
    )
    crl = x509.load_pem_x509_crl(pem)
    assert crl.is_signature_valid(ca.cert.public_key())  # type: ignore[arg-type]
    assert crl.issuer == ca.cert.subject
    assert {r.serial_number for r in crl} == {e.serial for e in entries}
    assert crl.next_update_utc == ca.cert.not_valid_after_utc
    again = revocation.sign_crl(
        list(reversed(entries)), ca_cert_pem=ca.material.cert_pem, ca_key_pem=ca.material.key_pem
    )
    assert again == pem  # every replica serves the same bytes


def test_revocations_per_cluster_carry_hashes_and_a_crl_of_their_own() -> None:
    ca = helpers.make_ca()
    entries = _entries(ca, "east") + _entries(ca, "west")[:1]
    out = revocation.revocations(
        entries, ca_cert_pem=ca.material.cert_pem, ca_key_pem=ca.material.key_pem, now=NOW
    )
    assert set(out) == {"east", "west"}
    assert out["east"].hashes == {e.sha256 for e in entries[:2]}
    west = x509.load_pem_x509_crl(out["west"].crl)
    assert [r.serial_number for r in west] == [entries[2].serial]
    assert revocation.changed_clusters(out, {"east": out["east"]}) == {"west"}
    # A CA that does not parse signs nothing; the hashes still hold.
    unsigned = revocation.revocations(entries, ca_cert_pem=b"", ca_key_pem=b"", now=NOW)
    assert unsigned["east"].crl == b"" and unsigned["east"].hashes == out["east"].hashes
