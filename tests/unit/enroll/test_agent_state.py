"""The agent's credentials saved in, and restored from, a Secret of its own cluster
(``--state-secret``; the in-memory API): a new pod with an empty directory restores and
renews without a token, a second replica whose token the first one spent restores the
first one's save, a new token (after ``revoke --rekey``) enrolls instead, and a save that
fails is done again."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from atlasd.enroll import agent
from atlasd.enroll import token as tokens
from atlasd.enroll.agent import AgentError, AgentOptions, Credentials, Server
from atlasd.enroll.state import Saved, StateSecret
from atlasd.kube.errors import Conflict, Forbidden
from atlasd.kube.secrets import secret_data
from atlasd.model import Settings
from tests.harness.certs import CA
from tests.harness.wait import wait_until_async
from tests.unit.fakekube import FakeKube, api_error

NS = "edge"
NAME = "atlas-envoy-agent-state"
SETTINGS = Settings(namespace="monitoring")
CA_ = CA("unit-ca")
TOKEN = tokens.JoinToken(id="abc123", secret="s" * 32, pin="p" * 64)
NEW_TOKEN = tokens.JoinToken(id="def456", secret="t" * 32, pin="p" * 64)


def _creds(*, expired: bool = False) -> Credentials:
    files: dict[str, bytes] = {"ca.pem": CA_.cert_pem}
    for kind in ("server", "client"):
        pair = CA_.issue("east", dns=("east",), server=kind == "server", client=kind == "client")
        cert = pair.cert_pem
        if expired:
            cert = _expired(pair.key_pem)
        files[f"{kind}.pem"] = cert
        files[f"{kind}-key.pem"] = pair.key_pem
    return Credentials(files)


def _expired(key_pem: bytes) -> bytes:
    key = serialization.load_pem_private_key(key_pem, None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "east")])
    then = dt.datetime.now(dt.UTC) - dt.timedelta(days=2)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(CA_.name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(then)
        .not_valid_after(then + dt.timedelta(days=1))
        .sign(CA_.key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def _options(
    tmp_path: Path, kube: FakeKube, *, token: tokens.JoinToken | None, once: bool = True
) -> AgentOptions:
    return AgentOptions(
        server=Server("192.0.2.1", 6307),
        cluster="east",
        directory=tmp_path / "certs",
        settings=SETTINGS,
        token=token,
        once=once,
        state=StateSecret(kube, NAME, NS),
    )


def _stored(kube: FakeKube) -> dict[str, bytes]:
    obj = kube.get_stored("secrets", NAME)
    assert obj is not None
    return secret_data(obj)


class Calls:
    """Stand-ins for the network half (``enroll``, ``renew``): what they were asked."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.enrolled: list[str] = []
        self.renewed = 0
        self.enroll_error: AgentError | None = None
        monkeypatch.setattr(agent, "enroll", self.enroll)
        monkeypatch.setattr(agent, "renew", self.renew)
        monkeypatch.setattr(agent, "fetch_bundle", self.fetch_bundle)
        self.last: Credentials | None = None
        self.bundle_reads = 0

    async def enroll(self, server: Server, token: tokens.JoinToken, **kw: Any) -> Credentials:
        await trio.lowlevel.checkpoint()
        self.enrolled.append(token.id)
        if self.enroll_error is not None:
            raise self.enroll_error
        self.last = _creds()
        return self.last

    async def renew(self, server: Server, directory: Path, **kw: Any) -> Credentials:
        await trio.lowlevel.checkpoint()
        self.renewed += 1
        self.last = _creds()
        return self.last

    async def fetch_bundle(self, server: Server, *, pin: str | None, bundle: bytes | None) -> bytes:
        """A sidecar's periodic read of the bundle (unchanged): it got past its start."""
        await trio.lowlevel.checkpoint()
        self.bundle_reads += 1
        assert bundle is not None
        return bundle


async def test_save_then_load_round_trips_and_holds_no_token_secret() -> None:
    kube = FakeKube()
    secret = StateSecret(kube, NAME, NS)
    assert await secret.load() is None
    first = _creds()
    await secret.save(Saved(first.files, TOKEN.id))
    second = _creds()
    await secret.save(Saved(second.files, TOKEN.id))
    assert kube.writes == [("create", NAME), ("replace", NAME)]
    loaded = await secret.load()
    assert loaded is not None
    assert dict(loaded.files) == dict(second.files) and loaded.token_id == TOKEN.id
    stored = kube.get_stored("secrets", NAME)
    assert stored is not None
    assert stored["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "atlasd-agent"
    assert TOKEN.secret.encode() not in str(stored).encode()
    assert "files=" not in repr(loaded)  # keys never in a repr


async def test_a_save_that_races_another_replica_is_done_again_on_top() -> None:
    kube = FakeKube()
    secret = StateSecret(kube, NAME, NS)
    await secret.save(Saved(_creds().files, TOKEN.id))
    mine = _creds()
    kube.fail_next = [api_error(Conflict, "update", ("secrets", NAME))]
    await secret.save(Saved(mine.files, TOKEN.id))
    assert _stored(kube)["client.pem"] == mine.files["client.pem"]


async def test_an_empty_directory_restores_from_the_secret_without_a_token(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = Calls(monkeypatch)
    kube = FakeKube()
    saved = _creds()
    await StateSecret(kube, NAME, NS).save(Saved(saved.files, TOKEN.id))
    writes = list(kube.writes)
    await agent.run_agent(_options(tmp_path, kube, token=None))
    certs = tmp_path / "certs"
    assert agent.read(certs) == dict(saved.files)
    assert calls.enrolled == [] and calls.renewed == 0
    assert kube.writes == writes  # restoring writes nothing back
    # The same token as the one that enrolled them (the chart keeps it): restored too.
    (tmp_path / "certs").rename(tmp_path / "old")
    await agent.run_agent(_options(tmp_path, kube, token=TOKEN))
    assert agent.read(certs) == dict(saved.files) and calls.enrolled == []


async def test_the_sidecar_renews_at_once_after_a_restore_and_saves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock
) -> None:
    """A restored pod gets keys of its own at once (two pods never keep one key): the init
    container restores, the sidecar (another process, same directory) renews."""
    calls = Calls(monkeypatch)
    kube = FakeKube()
    await StateSecret(kube, NAME, NS).save(Saved(_creds().files, TOKEN.id))
    await agent.run_agent(_options(tmp_path, kube, token=None))
    assert calls.renewed == 0
    async with trio.open_nursery() as nursery:
        await nursery.start(agent.run_agent, _options(tmp_path, kube, token=None, once=False))

        def renewed_and_saved() -> bool:
            last = calls.last
            return (
                calls.renewed == 1
                and last is not None
                and _stored(kube)["client-key.pem"] == last.files["client-key.pem"]
            )

        await wait_until_async(renewed_and_saved, timeout=30, what="renewed and saved")
        nursery.cancel_scope.cancel()
    assert calls.last is not None
    assert agent.read(tmp_path / "certs") == dict(calls.last.files)
    assert _stored(kube)["token-id"] == TOKEN.id.encode()
    # Renewed keys are this pod's own: a sidecar started again does not renew at once —
    # it goes on to its first periodic read of the bundle without renewing.
    reads = calls.bundle_reads
    async with trio.open_nursery() as nursery:
        await nursery.start(agent.run_agent, _options(tmp_path, kube, token=None, once=False))
        await wait_until_async(
            lambda: calls.bundle_reads > reads, timeout=300, what="the sidecar's first round"
        )
        nursery.cancel_scope.cancel()
    assert calls.renewed == 1


async def test_enrolling_saves_and_a_failed_save_fails_the_init_container_then_heals(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = Calls(monkeypatch)
    kube = FakeKube()
    kube.fail_next = [api_error(Forbidden, "create", ("secrets", NAME))]
    with pytest.raises(AgentError, match=rf"cannot save the credentials \(Secret {NS}/{NAME}\)"):
        await agent.run_agent(_options(tmp_path, kube, token=TOKEN))
    assert calls.enrolled == [TOKEN.id] and kube.get_stored("secrets", NAME) is None
    # The init container restarted (same pod, same emptyDir): no second enrollment, saved.
    await agent.run_agent(_options(tmp_path, kube, token=TOKEN))
    assert calls.enrolled == [TOKEN.id]
    assert calls.last is not None
    assert _stored(kube)["client.pem"] == calls.last.files["client.pem"]
    assert _stored(kube)["token-id"] == TOKEN.id.encode()


async def test_a_sidecar_whose_save_fails_keeps_running_and_saves_later(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock
) -> None:
    calls = Calls(monkeypatch)
    kube = FakeKube()
    kube.fail_next = [api_error(Forbidden, "create", ("secrets", NAME))]
    async with trio.open_nursery() as nursery:
        await nursery.start(agent.run_agent, _options(tmp_path, kube, token=TOKEN, once=False))
        await wait_until_async(
            lambda: kube.get_stored("secrets", NAME) is not None, timeout=300, what="saved later"
        )
        nursery.cancel_scope.cancel()
    assert calls.enrolled == [TOKEN.id] and calls.last is not None
    assert _stored(kube)["client.pem"] == calls.last.files["client.pem"]


async def test_a_new_token_enrolls_instead_of_restoring(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After `revoke --rekey` the saved credentials are revoked; the new token (another
    id) is what the operator gave, so the agent enrolls with it."""
    calls = Calls(monkeypatch)
    kube = FakeKube()
    await StateSecret(kube, NAME, NS).save(Saved(_creds().files, TOKEN.id))
    await agent.run_agent(_options(tmp_path, kube, token=NEW_TOKEN))
    assert calls.enrolled == [NEW_TOKEN.id]
    assert _stored(kube)["token-id"] == NEW_TOKEN.id.encode()


async def test_expired_saved_credentials_need_a_token(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = Calls(monkeypatch)
    kube = FakeKube()
    await StateSecret(kube, NAME, NS).save(Saved(_creds(expired=True).files, TOKEN.id))
    with pytest.raises(AgentError, match="nor in the state Secret and no join token"):
        await agent.run_agent(_options(tmp_path, kube, token=None))
    await agent.run_agent(_options(tmp_path, kube, token=TOKEN))
    assert calls.enrolled == [TOKEN.id]


async def test_a_replica_whose_token_was_spent_restores_the_first_ones_save(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock
) -> None:
    """replicaCount 2 at install: both init containers hold the one token; atlasd signs one
    (409 for the other), which waits for the winner's save instead of failing."""
    calls = Calls(monkeypatch)
    calls.enroll_error = AgentError("atlasd refused (409): already used", status=409)
    kube = FakeKube()
    winner = _creds()

    async def first_replica_saves() -> None:
        # Once this replica was refused (it then waits for the winner's save).
        await wait_until_async(lambda: calls.enrolled == [TOKEN.id], timeout=30, what="refused")
        await StateSecret(kube, NAME, NS).save(Saved(winner.files, TOKEN.id))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(first_replica_saves)
        await agent.run_agent(_options(tmp_path, kube, token=TOKEN))
    assert agent.read(tmp_path / "certs") == dict(winner.files)
    # Without a save to wait for, the refusal stands.
    kube2 = FakeKube()
    with pytest.raises(AgentError, match="already used"):
        await agent.run_agent(_options(tmp_path / "other", kube2, token=TOKEN))


async def test_an_unreadable_state_secret_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    Calls(monkeypatch)
    kube = FakeKube()
    kube.forbidden.add("Secret")
    with pytest.raises(AgentError, match=rf"cannot read the saved credentials \(Secret {NS}/"):
        await agent.run_agent(_options(tmp_path, kube, token=TOKEN))


def test_a_failing_renewal_is_retried_before_the_certificate_expires() -> None:
    """The back-off doubles up to its cap, but never waits past a quarter of the time the
    client certificate has left (an outage near the end of a short certificate's life
    must not outlast it: an expired certificate cannot authenticate a renewal)."""
    assert agent.retry_wait(8.0, left=None) == 8.0  # no certificate yet: the back-off
    assert agent.retry_wait(8.0, left=3600.0) == 8.0
    assert agent.retry_wait(16.0, left=20.0) == 5.0
    assert agent.retry_wait(16.0, left=2.0) == 1.0  # at least a second, even at the end
    assert agent.retry_wait(16.0, left=-5.0) == 1.0
