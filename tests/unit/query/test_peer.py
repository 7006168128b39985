"""What a presented certificate is, against atlasd's trust (atlasd.query.peer.describe):
pure, from certificates made as atlasd makes them (tests/integration/test_query_probe.py
reads one from a real Envoy)."""

from __future__ import annotations

import datetime as dt

from cryptography import x509

from atlasd.query.peer import describe
from tests.unit.xds import helpers


def cert(pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem)


def test_a_certificate_of_atlasds_ca_is_named_as_such() -> None:
    ours = helpers.make_ca("atlas-test-ca")
    east = cert(helpers.identity(ours, "east").server.cert_pem)
    said = describe(east, trust_bundle=ours.bundle, now=dt.datetime.now(dt.UTC))
    assert said.startswith("issuer CN=atlas-test-ca, subject ")
    assert "names east, east.monitoring.atlas, valid until " in said
    assert said.endswith("; signed by atlasd's CA")


def test_a_certificate_of_another_ca_names_both_cas() -> None:
    ours, other = helpers.make_ca("atlas-test-ca"), helpers.make_ca("another-ca")
    alien = cert(helpers.identity(other, "east").server.cert_pem)
    said = describe(alien, trust_bundle=ours.bundle, now=dt.datetime.now(dt.UTC))
    assert said.startswith("issuer CN=another-ca, ")
    assert said.endswith("; not signed by atlasd's CA (CN=atlas-test-ca)")
    # Same issuer name, another key: still not atlasd's CA.
    twin = helpers.make_ca("atlas-test-ca")
    forged = cert(helpers.identity(twin, "east").server.cert_pem)
    said = describe(forged, trust_bundle=ours.bundle, now=dt.datetime.now(dt.UTC))
    assert said.startswith("issuer CN=atlas-test-ca, ") and "not signed by atlasd's CA" in said
    # Any CA of the bundle counts (an earlier one, kept through a rotation).
    both = describe(alien, trust_bundle=ours.bundle + other.bundle, now=dt.datetime.now(dt.UTC))
    assert both.endswith("; signed by atlasd's CA")


def test_an_expired_certificate_says_since_when() -> None:
    ours = helpers.make_ca()
    east = cert(helpers.identity(ours, "east").server.cert_pem)
    later = east.not_valid_after_utc + dt.timedelta(days=1)
    said = describe(east, trust_bundle=ours.bundle, now=later)
    assert f"expired {east.not_valid_after_utc:%Y-%m-%d %H:%M} UTC" in said
    assert "key" not in said.lower()  # public fields only
