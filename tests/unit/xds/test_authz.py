"""Authorization rules, table-driven (docs/xds-authorization.md)."""

from __future__ import annotations

import pytest

from atlasd.xds.authz import TOKEN_HEADER, XFCC_HEADER, Authorizer, Denied, parse_xfcc

XFCC_EAST = 'By=spiffe://atlas;Hash=abc;Subject="CN=east,O=x";URI=;DNS=east'


def test_parse_xfcc_quoted_and_multiple() -> None:
    parsed = parse_xfcc('Hash=1;Subject="CN=a,O=b;c";DNS=a;DNS=b,Hash=2;DNS=c')
    assert parsed == [
        [("hash", "1"), ("subject", "CN=a,O=b;c"), ("dns", "a"), ("dns", "b")],
        [("hash", "2"), ("dns", "c")],
    ]


@pytest.mark.parametrize(
    ("case", "authz", "node", "headers", "allowed"),
    [
        ("atlas direct", Authorizer(), "atlas", [], True),
        ("downstream direct", Authorizer(), "east", [], False),
        ("forwarded own node", Authorizer(), "east", [(XFCC_HEADER, XFCC_EAST)], True),
        ("forwarded other node", Authorizer(), "west", [(XFCC_HEADER, XFCC_EAST)], False),
        (
            "subject CN is not a SAN",
            Authorizer(),
            "east",
            [(XFCC_HEADER, 'Subject="CN=east"')],
            False,
        ),
        (
            "two forwarded certs",
            Authorizer(),
            "east",
            [(XFCC_HEADER, XFCC_EAST + ",DNS=east")],
            False,
        ),
        ("token required, missing", Authorizer(forwarder_token="t"), "atlas", [], False),
        (
            "token required, wrong",
            Authorizer(forwarder_token="t"),
            "atlas",
            [(TOKEN_HEADER, "u")],
            False,
        ),
        ("token ok, atlas", Authorizer(forwarder_token="t"), "atlas", [(TOKEN_HEADER, "t")], True),
        (
            "token ok, forwarded",
            Authorizer(forwarder_token="t"),
            "east",
            [(TOKEN_HEADER, "t"), (XFCC_HEADER, XFCC_EAST)],
            True,
        ),
        (
            "token twice",
            Authorizer(forwarder_token="t"),
            "atlas",
            [(TOKEN_HEADER, "t"), (TOKEN_HEADER, "t")],
            False,
        ),
    ],
)
def test_rules(
    case: str, authz: Authorizer, node: str, headers: list[tuple[str, str]], allowed: bool
) -> None:
    if allowed:
        authz.authorize(node, headers)
    else:
        with pytest.raises(Denied):
            authz.authorize(node, headers)


def test_repr_hides_token() -> None:
    assert "s3cret" not in repr(Authorizer(forwarder_token="s3cret"))


def test_builders_and_authorizer_agree_on_header_names() -> None:
    from atlasd.xds import builders

    assert builders.FORWARDER_TOKEN_HEADER == TOKEN_HEADER
    assert builders.XFCC_HEADER == XFCC_HEADER
