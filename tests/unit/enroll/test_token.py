"""Join tokens: their text, what is stored of them, and every refusal of a use."""

from __future__ import annotations

import datetime as dt

import pytest

from atlasd.enroll import token as tokens
from atlasd.enroll.token import Record, Refused
from tests.unit.xds import helpers

CA = helpers.make_ca()
OTHER_CA = helpers.make_ca("other")
NOW = dt.datetime(2026, 12, 5, 12, 0, tzinfo=dt.UTC)


def test_a_token_reads_back_and_never_shows_its_secret() -> None:
    token = tokens.mint(CA.cert)
    assert tokens.parse(f"  {token}\n") == token
    assert token.secret not in repr(token)
    assert len(token.secret) == 32 and len(token.id) == 6
    assert tokens.mint(CA.cert).secret != token.secret


def test_the_pin_names_the_ca_and_a_bundle_holding_it() -> None:
    token = tokens.mint(CA.cert)
    assert token.pin == tokens.ca_pin(CA.cert) != tokens.ca_pin(OTHER_CA.cert)
    assert tokens.bundle_matches(CA.material.cert_pem, token.pin)
    assert tokens.bundle_matches(OTHER_CA.material.cert_pem + CA.material.cert_pem, token.pin)
    assert not tokens.bundle_matches(OTHER_CA.material.cert_pem, token.pin)
    assert not tokens.bundle_matches(b"garbage", token.pin)


@pytest.mark.parametrize(
    "text",
    ["", "abc", "abcdef.short.pin", "ABCDEF." + "a" * 32 + "." + "0" * 64, "a.b.c.d"],
)
def test_malformed_tokens_are_refused_without_echoing_them(text: str) -> None:
    with pytest.raises(Refused) as info:
        tokens.parse(text)
    assert info.value.status == 401
    assert str(info.value) == "malformed join token"


def test_only_the_hash_is_stored() -> None:
    token = tokens.mint(CA.cert)
    record = tokens.new_record(token, "east", now=NOW, ttl=tokens.DEFAULT_TTL)
    stored = record.dump()
    assert token.secret.encode() not in stored
    assert Record.load(stored) == record
    assert record.expires == NOW + dt.timedelta(hours=1)


def test_a_use_is_checked_for_secret_binding_expiry_and_reuse() -> None:
    token = tokens.mint(CA.cert)
    record = tokens.new_record(token, "east", now=NOW, ttl=dt.timedelta(minutes=10))
    tokens.check(record, token, cluster="east", now=NOW)  # accepted
    cases = [
        (tokens.mint(CA.cert), "east", NOW, 401, "unknown join token"),
        (token, "west", NOW, 403, "not for cluster 'west'"),
        (token, "east", NOW + dt.timedelta(minutes=10), 401, "expired"),
    ]
    for tok, cluster, now, status, said in cases:
        with pytest.raises(Refused, match=said) as info:
            tokens.check(record, tok, cluster=cluster, now=now)
        assert info.value.status == status
    used = Record(record.cluster, record.digest, record.expires, used=NOW)
    with pytest.raises(Refused, match="already used") as info:
        tokens.check(used, token, cluster="east", now=NOW)
    assert info.value.status == 409


def test_a_record_that_does_not_parse_is_an_unknown_token() -> None:
    for data in (None, b"", b"{}", b"[1]", b'{"cluster": "e", "sha256": "x", "expires": 3}'):
        with pytest.raises(Refused, match="unknown join token"):
            Record.load(data)


def test_a_lifetime_out_of_range_is_refused() -> None:
    token = tokens.mint(CA.cert)
    for ttl in (dt.timedelta(0), tokens.MAX_TTL + dt.timedelta(seconds=1)):
        with pytest.raises(ValueError):
            tokens.new_record(token, "east", now=NOW, ttl=ttl)
