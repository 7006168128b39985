"""Authorization rules, table-driven (docs/xds-authorization.md)."""

from __future__ import annotations

import pytest

from atlasd.xds.authz import TOKEN_HEADER, XFCC_HEADER, Authorizer, Denied, parse_xfcc

XFCC_EAST = 'By=spiffe://atlas;Hash=abc;Subject="CN=east,O=x";URI=;DNS=east'


def test_parse_xfcc_quoted_and_multiple() -> None:
    parsed = parse_xfcc('Hash=1;Subject="CN=a,O=b;c";DNS=a;DNS=b,Hash=2;DNS=c')
    assert parsed == (
        (("hash", "1"), ("subject", "CN=a,O=b;c"), ("dns", "a"), ("dns", "b")),
        (("hash", "2"), ("dns", "c")),
    )


ATLAS = frozenset({"atlas", "atlas.monitoring.atlas"})  # the atlas client certificate
EAST = frozenset({"east", "east.monitoring.atlas"})
FWD = [(XFCC_HEADER, XFCC_EAST)]
T = Authorizer(forwarder_token="t")
NONE: frozenset[str] = frozenset()


@pytest.mark.parametrize(
    ("case", "authz", "node", "headers", "peer", "allowed"),
    [
        # Plaintext without the token: nobody.
        ("plaintext atlas", Authorizer(), "atlas", [], NONE, False),
        ("plaintext downstream", Authorizer(), "east", [], NONE, False),
        ("plaintext forged xfcc", Authorizer(), "east", FWD, NONE, False),
        (
            "plaintext, token unset, any token",
            Authorizer(),
            "atlas",
            [(TOKEN_HEADER, "t")],
            NONE,
            False,
        ),
        # The forwarder's certificate.
        ("cert atlas", Authorizer(), "atlas", [], ATLAS, True),
        ("cert atlas forwards east", Authorizer(), "east", FWD, ATLAS, True),
        ("cert atlas forwards, other node", Authorizer(), "west", FWD, ATLAS, False),
        (
            "subject CN is not a SAN",
            Authorizer(),
            "east",
            [(XFCC_HEADER, 'Subject="CN=east"')],
            ATLAS,
            False,
        ),
        (
            "two forwarded certs",
            Authorizer(),
            "east",
            [(XFCC_HEADER, XFCC_EAST + ",DNS=east")],
            ATLAS,
            False,
        ),
        ("two xfcc headers", Authorizer(), "east", [*FWD, *FWD], ATLAS, False),
        ("cert atlas, wrong token", T, "atlas", [(TOKEN_HEADER, "u")], ATLAS, False),
        ("cert atlas, no token needed", T, "east", FWD, ATLAS, True),
        # Another node's certificate: its own node only, never XFCC.
        ("cert east, own node", Authorizer(), "east", [], EAST, True),
        ("cert east, other node", Authorizer(), "west", [], EAST, False),
        ("cert east, atlas", Authorizer(), "atlas", [], EAST, False),
        ("cert east forges xfcc", Authorizer(), "west", [(XFCC_HEADER, "DNS=west")], EAST, False),
        # The token (plaintext fallback).
        ("token missing", T, "atlas", [], NONE, False),
        ("token wrong", T, "atlas", [(TOKEN_HEADER, "u")], NONE, False),
        ("token ok, atlas", T, "atlas", [(TOKEN_HEADER, "t")], NONE, True),
        ("token ok, forwarded", T, "east", [(TOKEN_HEADER, "t"), *FWD], NONE, True),
        ("token ok, downstream direct", T, "east", [(TOKEN_HEADER, "t")], NONE, False),
        ("token twice", T, "atlas", [(TOKEN_HEADER, "t"), (TOKEN_HEADER, "t")], NONE, False),
        (
            "token ok, cert east forges",
            T,
            "west",
            [(TOKEN_HEADER, "u"), (XFCC_HEADER, "DNS=west")],
            EAST,
            False,
        ),
    ],
)
def test_rules(
    case: str,
    authz: Authorizer,
    node: str,
    headers: list[tuple[str, str]],
    peer: frozenset[str],
    allowed: bool,
) -> None:
    if allowed:
        authz.authorize(node, headers, peer)
    else:
        with pytest.raises(Denied):
            authz.authorize(node, headers, peer)


def test_refusals_say_what_to_present() -> None:
    with pytest.raises(Denied, match="client certificate over TLS"):
        Authorizer().authorize("atlas", [])
    with pytest.raises(Denied, match="honoured only from the observability Envoy"):
        Authorizer().authorize("east", FWD)
    with pytest.raises(Denied, match="through the observability Envoy"):
        Authorizer().authorize("east", [])


def test_the_caller_is_described() -> None:
    assert Authorizer().authorize("east", FWD, ATLAS) == "forwarded:east (forwarder certificate)"
    assert T.authorize("east", [(TOKEN_HEADER, "t"), *FWD]) == "forwarded:east (forwarder token)"
    assert Authorizer().authorize("atlas", [], ATLAS) == "certificate:atlas"
    assert T.authorize("atlas", [(TOKEN_HEADER, "t")]) == "token:atlas"


def test_repr_hides_token() -> None:
    assert "s3cret" not in repr(Authorizer(forwarder_token="s3cret"))


def test_builders_and_authorizer_agree_on_header_names() -> None:
    from atlasd.xds import builders

    assert builders.FORWARDER_TOKEN_HEADER == TOKEN_HEADER
    assert builders.XFCC_HEADER == XFCC_HEADER
