"""Token records in the API (the in-memory one): minted with only a hash stored, used
once (a concurrent second use loses), refusals change nothing, old records pruned."""

from __future__ import annotations

import datetime as dt

import pytest
import trio

from atlasd.enroll import store
from atlasd.enroll import token as tokens
from atlasd.enroll.token import Refused
from atlasd.kube.errors import Conflict
from atlasd.kube.secrets import secret_data
from atlasd.reconcile import enrolled
from tests.unit.fakekube import FakeKube, api_error
from tests.unit.xds import helpers

CA = helpers.make_ca()
NS = "monitoring"
NOW = dt.datetime(2026, 12, 5, 12, 0, tzinfo=dt.UTC)


def _mint(kube: FakeKube, cluster: str = "east", now: dt.datetime = NOW) -> tokens.JoinToken:
    async def go() -> tokens.JoinToken:
        token, _ = await store.mint(kube, cluster, namespace=NS, ca_cert=CA.cert, now=now)
        return token

    return trio.run(go)


def _consume(
    kube: FakeKube,
    token: tokens.JoinToken,
    cluster: str = "east",
    now: dt.datetime = NOW,
    certs: dict[str, bytes] | None = None,
) -> dict[str, bytes]:
    async def go() -> dict[str, bytes]:
        return await store.consume(
            kube, token, cluster=cluster, namespace=NS, now=now, sign=lambda: certs or {}
        )

    return trio.run(go)


def _records(kube: FakeKube) -> dict[str, dict[str, bytes]]:
    return {
        name: secret_data(obj)
        for (plural, name), obj in kube.objects.items()
        if plural == "secrets" and name.startswith(tokens.SECRET_PREFIX)
    }


def test_a_minted_token_is_stored_as_a_hash_and_used_once() -> None:
    kube = FakeKube()
    token = _mint(kube)
    [(name, data)] = _records(kube).items()
    assert name == f"atlas-join-{token.id}"
    assert token.secret.encode() not in data[tokens.RECORD_KEY]
    _consume(kube, token)
    with pytest.raises(Refused, match="already used"):
        _consume(kube, token)


def test_refused_uses_change_nothing() -> None:
    kube = FakeKube()
    token = _mint(kube)
    before = _records(kube)
    wrong_secret = tokens.JoinToken(token.id, "a" * 32, token.pin)
    for tok, cluster, now in (
        (wrong_secret, "east", NOW),
        (token, "west", NOW),
        (token, "east", NOW + dt.timedelta(hours=2)),
        (tokens.mint(CA.cert), "east", NOW),  # unknown id
    ):
        with pytest.raises(Refused):
            _consume(kube, tok, cluster, now)
    assert _records(kube) == before
    _consume(kube, token)  # still good


def test_of_two_concurrent_uses_one_wins() -> None:
    kube = FakeKube()
    token = _mint(kube)
    # Another request marked it used between this one's read and its write.
    kube.fail_next.append(api_error(Conflict, "replace", ("secrets", f"atlas-join-{token.id}")))
    with pytest.raises(Refused, match="already used") as info:
        _consume(kube, token)
    assert info.value.status == 409


def test_the_use_records_the_certificates_and_minting_prunes_what_is_spent() -> None:
    kube = FakeKube()
    ident = helpers.identity(CA, "east")  # valid for a year
    certs = {"server": ident.server.cert_pem, "client": ident.client.cert_pem}
    holding, used, expired, live = (
        _mint(kube),
        _mint(kube),
        _mint(kube, now=NOW - dt.timedelta(hours=2)),
        _mint(kube),
    )
    other = _mint(kube, "west", NOW - dt.timedelta(hours=2))
    assert _consume(kube, holding, certs=certs) == certs
    _consume(kube, used)  # its certificates (none here) have expired
    newest = _mint(kube)
    names = set(_records(kube))
    # Kept: the unused and live, the used whose certificates are still valid (revoke reads
    # them), another cluster's; gone: the expired unused, the spent used.
    assert names == {f"atlas-join-{t.id}" for t in (holding, live, other, newest)}
    assert f"atlas-join-{expired.id}" not in names
    issued = trio.run(lambda: store.issued(kube, "east", namespace=NS))
    assert sorted(issued) == sorted(certs.items())


def test_rate_limit_allows_a_burst_then_the_rate() -> None:
    from atlasd.enroll.endpoint import RateLimit

    now = [0.0]
    limit = RateLimit(rate=2.0, burst=3.0, clock=lambda: now[0])
    assert [limit.allow("a") for _ in range(4)] == [True, True, True, False]
    assert limit.allow("b")  # per address
    now[0] = 0.5  # one more after half a second at 2/s
    assert limit.allow("a") and not limit.allow("a")


def test_a_used_token_asked_again_for_the_same_keys_answers_the_same_certificates() -> None:
    """An agent whose answer was lost sends the same requests again: it gets the
    certificates of the use, nothing new; other keys (a replay) are refused."""
    from atlasd.certpolicy import load_cert, public_der

    kube = FakeKube()
    token = _mint(kube)
    ident = helpers.identity(CA, "east")
    certs = {"server": ident.server.cert_pem, "client": ident.client.cert_pem}

    def keys_of(c: dict[str, bytes]) -> dict[str, bytes]:
        return {k: public_der(load_cert(v).public_key()) for k, v in c.items()}  # type: ignore[union-attr]

    async def use(keys: dict[str, bytes], *, cluster: str = "east") -> dict[str, bytes]:
        return await store.consume(
            kube, token, cluster=cluster, namespace=NS, now=NOW, sign=lambda: certs, keys=keys
        )

    assert trio.run(use, keys_of(certs)) == certs
    signed = len(kube.writes)
    assert trio.run(use, keys_of(certs)) == certs
    assert len(kube.writes) == signed  # nothing written again
    other = helpers.identity(CA, "east")
    with pytest.raises(Refused, match="already used"):
        trio.run(use, keys_of({"server": other.server.cert_pem, "client": other.client.cert_pem}))
    with pytest.raises(Refused, match="not for cluster 'west'"):
        trio.run(lambda: use(keys_of(certs), cluster="west"))


def test_an_agents_retry_racing_its_own_first_request_gets_its_certificates() -> None:
    """The first request's write lands between the retry's read and its write: the retry
    loses the write (Conflict) and is answered with the certificates of its own keys."""
    from atlasd.certpolicy import load_cert, public_der

    kube = FakeKube()
    token = _mint(kube)
    ident = helpers.identity(CA, "east")
    certs = {"server": ident.server.cert_pem, "client": ident.client.cert_pem}
    keys = {k: public_der(load_cert(v).public_key()) for k, v in certs.items()}  # type: ignore[union-attr]
    [(_, data)] = _records(kube).items()
    record = tokens.Record.load(data[tokens.RECORD_KEY])

    def sign_while_the_first_lands() -> dict[str, bytes]:
        used = tokens.Record(
            record.cluster, record.digest, record.expires, used=NOW,
            certificates=tuple(sorted((k, v.decode()) for k, v in certs.items())),
        )  # fmt: skip
        kube.put(store.record_secret(token.id, used, namespace=NS))  # a new resourceVersion
        other = helpers.identity(CA, "east")
        return {"server": other.server.cert_pem, "client": other.client.cert_pem}

    async def retry() -> dict[str, bytes]:
        return await store.consume(
            kube, token, cluster="east", namespace=NS, now=NOW,
            sign=sign_while_the_first_lands, keys=keys,
        )  # fmt: skip

    assert trio.run(retry) == certs


def _record(kube: FakeKube, certs: dict[str, bytes], now: dt.datetime = NOW) -> None:
    trio.run(lambda: enrolled.record_issued(kube, "east", certs, namespace=NS, now=now))


def _renewal() -> dict[str, bytes]:
    ident = helpers.identity(CA, "east")  # stands for one renewal's certificates
    return {"server": ident.server.cert_pem, "client": ident.client.cert_pem}


def test_every_renewal_still_valid_is_recorded_for_revoke() -> None:
    """Two pods renewing apart, or one pod renewing twice: revoke must reach every
    certificate still valid, not only the last renewal's."""
    kube = FakeKube()
    first, second = _renewal(), _renewal()
    _record(kube, first)
    # A concurrent renewal on another atlasd replica wrote in between: read again, kept.
    kube.fail_next.append(
        api_error(Conflict, "update", ("secrets", enrolled.enrolled_secret_name("east")))
    )
    _record(kube, second)
    issued = trio.run(lambda: store.issued(kube, "east", namespace=NS))
    assert sorted(issued) == sorted([*first.items(), *second.items()])
    data = secret_data(kube.get_stored("secrets", enrolled.enrolled_secret_name("east")))
    assert all(b"PRIVATE KEY" not in pem for pem in data.values())
    # Once expired (a year on), the next renewal drops them.
    third = _renewal()
    _record(kube, third, now=NOW + dt.timedelta(days=400))
    issued = trio.run(lambda: store.issued(kube, "east", namespace=NS))
    assert sorted(issued) == sorted(third.items())


def test_the_record_keeps_the_newest_when_full(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(enrolled, "RECORDED_MAX", 4)
    kube = FakeKube()
    renewals = [_renewal() for _ in range(3)]
    for certs in renewals:
        _record(kube, certs)
    data = secret_data(kube.get_stored("secrets", enrolled.enrolled_secret_name("east")))
    assert len(data) == 4
    assert set(renewals[-1].values()) <= set(data.values())  # the newest is never dropped
