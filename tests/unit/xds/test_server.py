"""The ADS server in this Trio process, driven by a grpcio client on loopback: plaintext
and TLS on one port, who may fetch what, the certificate renewed without a restart."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import grpc
import pytest
import trio
from prometheus_client import CollectorRegistry

from atlasd import model
from atlasd.reconcile.certs import CA
from atlasd.xds import server
from atlasd.xds.authz import TOKEN_HEADER, XFCC_HEADER, Authorizer
from atlasd.xds.cache import SnapshotCache
from atlasd.xds.server import run_ads_server
from atlasd.xds.snapshot import CLUSTER, Snapshot
from atlasd.xds.streams import XdsMetrics
from atlasd.xds.tls import ServerTls, TlsMaterial
from tests.harness.wait import wait_until_async
from tests.unit.xds import helpers
from tests.unit.xds.ads_client import Client
from tests.unit.xds.ads_client import request as _req
from tests.unit.xds.test_snapshot import cluster, good, lst, route, secret


@dataclass
class Pki:
    """Certificates as atlasd issues them (``tests.unit.xds.helpers``)."""

    ca: CA
    server: model.CertKey  # atlasd's ADS server certificate
    atlas: model.CertKey  # the forwarder's client certificate
    east: model.CertKey  # a downstream client certificate

    @classmethod
    def make(cls, name: str = "test-ca") -> Pki:
        ca = helpers.make_ca(name)
        return cls(
            ca=ca,
            server=helpers.ads_server_cert(ca),
            atlas=helpers.identity(ca, "atlas").client,
            east=helpers.identity(ca, "east").client,
        )

    @property
    def trust(self) -> bytes:
        return self.ca.bundle

    def material(self) -> TlsMaterial:
        return TlsMaterial(cert=self.server, chain=b"", trust=self.trust)


@asynccontextmanager
async def ads(
    cache: SnapshotCache,
    *,
    authorizer: Authorizer | None = None,
    tls: ServerTls | None = None,
    max_stream_age: float | None = None,
) -> AsyncIterator[int]:
    async with trio.open_nursery() as nursery:
        port = await nursery.start(
            lambda task_status: run_ads_server(
                cache=cache,
                host="127.0.0.1",
                port=0,
                authorizer=authorizer or Authorizer(),
                tls=tls,
                max_stream_age=max_stream_age,
                task_status=task_status,
            )
        )
        yield port
        nursery.cancel_scope.cancel()


def _cache(*nodes: str) -> SnapshotCache:
    cache = SnapshotCache()
    for n in nodes:
        cache.set_snapshot(n, Snapshot.create(n, good()))
    return cache


async def _outcome(c: Client) -> grpc.StatusCode | int:
    """PERMISSION_DENIED and friends, or the number of responses once one arrived."""
    return await trio.to_thread.run_sync(c.outcome)


async def test_serves_acks_and_closes_on_removal() -> None:
    cache = _cache("atlas")
    async with ads(cache, authorizer=Authorizer(forwarder_token="t")) as port:
        c = Client(port, metadata=((TOKEN_HEADER, "t"),))
        c.send(_req("atlas"))
        await wait_until_async(lambda: len(c.responses) == 1, timeout=10, what="first response")
        r = c.responses[0]
        c.send(_req("atlas", r.nonce, r.version_info))
        await wait_until_async(
            lambda: [s.acked_version(CLUSTER) for s in cache.status()] == [r.version_info],
            timeout=10,
            what="the ACK in status",
        )
        [st] = cache.status()
        assert (st.node, st.kind) == ("atlas", "sotw")
        cache.clear("atlas")
        await wait_until_async(c.done.is_set, timeout=10, what="stream closed on removal")
        await wait_until_async(lambda: cache.status() == [], timeout=10, what="status cleared")
        c.close()


async def test_a_downstream_stream_ends_at_its_maximum_age_and_atlas_does_not() -> None:
    """Streams spread over the replicas again: a downstream node's stream ends (status OK)
    once ``max_stream_age`` old, node ``atlas``'s (the whole fleet on every new stream)
    stays open."""
    registry = CollectorRegistry()
    cache = SnapshotCache(metrics=XdsMetrics(registry))
    for n in ("atlas", "east"):
        cache.set_snapshot(n, Snapshot.create(n, good()))
    token = ((TOKEN_HEADER, "t"),)
    east_md = (*token, (XFCC_HEADER, "Hash=1;DNS=east"))

    def aged() -> float:
        return registry.get_sample_value("atlasd_xds_aged_streams_total") or 0.0

    async with ads(cache, authorizer=Authorizer(forwarder_token="t"), max_stream_age=0.5) as port:
        atlas = Client(port, metadata=token)
        atlas.send(_req("atlas"))
        await wait_until_async(lambda: len(atlas.responses) == 1, timeout=10, what="atlas")
        # Two east streams one after the other, each ended at its age (at least 0.45 s):
        # together longer than atlas's stream would have lived if it aged too (0.55 s).
        for i in (1, 2):
            east = Client(port, metadata=east_md)
            east.send(_req("east"))
            await wait_until_async(east.done.is_set, timeout=10, what=f"east's stream {i} ended")
            assert east.code() is None and len(east.responses) == 1  # status OK
            assert aged() == i
            east.close()
        assert not atlas.done.is_set()
        assert [st.node for st in cache.status()] == ["atlas"]
        atlas.close()


async def test_plaintext_callers_without_the_token_get_nothing() -> None:
    """Secure by default: no certificate and no token, no configuration — neither as
    ``atlas`` nor with a forged XFCC header."""
    cache = _cache("atlas", "east")
    pki = Pki.make()
    tls = ServerTls()
    tls.update(pki.material())
    async with ads(cache, tls=tls) as port:
        for node, md in (("atlas", ()), ("east", ((XFCC_HEADER, "Hash=1;DNS=east"),))):
            c = Client(port, metadata=md)
            c.send(_req(node))
            assert await _outcome(c) == grpc.StatusCode.PERMISSION_DENIED, node
            assert c.responses == []


async def test_tls_callers_are_known_by_their_certificate() -> None:
    cache = _cache("atlas", "east", "west")
    pki = Pki.make()
    tls = ServerTls()
    tls.update(pki.material())
    trust = pki.trust
    forged = ((XFCC_HEADER, "Hash=1;DNS=west"),)
    async with ads(cache, tls=tls) as port:
        cases = [
            # (certificate, node, metadata, outcome)
            (pki.atlas, "atlas", (), 1),
            (pki.atlas, "east", ((XFCC_HEADER, "Hash=1;DNS=east"),), 1),
            (
                pki.atlas,
                "west",
                ((XFCC_HEADER, "Hash=1;DNS=east"),),
                grpc.StatusCode.PERMISSION_DENIED,
            ),
            (pki.east, "west", forged, grpc.StatusCode.PERMISSION_DENIED),
            (pki.east, "atlas", (), grpc.StatusCode.PERMISSION_DENIED),
            (None, "west", forged, grpc.StatusCode.PERMISSION_DENIED),
            (None, "atlas", (), grpc.StatusCode.PERMISSION_DENIED),
        ]
        for cert, node, md, want in cases:
            c = Client(port, metadata=md, tls=(trust, cert))
            c.send(_req(node))
            got = await _outcome(c)
            assert got == want, (cert and cert.cert_pem[:0], node, md, c.error)
        # A server certificate is not a client certificate: refused in the handshake.
        c = Client(port, tls=(trust, pki.server))
        c.send(_req("atlas"))
        assert await _outcome(c) == grpc.StatusCode.UNAVAILABLE
        # A certificate of another CA: refused in the handshake.
        stranger = Pki.make("other-ca").atlas
        c = Client(port, tls=(trust, stranger))
        c.send(_req("atlas"))
        assert await _outcome(c) == grpc.StatusCode.UNAVAILABLE


async def test_a_new_certificate_serves_new_connections_without_a_restart() -> None:
    cache = _cache("atlas")
    first, second = Pki.make("ca-1"), Pki.make("ca-2")
    tls = ServerTls()
    async with ads(cache, tls=tls) as port:
        # No certificate yet: TLS is refused (plaintext still answers, with its refusal).
        c = Client(port, tls=(first.trust, first.atlas))
        c.send(_req("atlas"))
        assert await _outcome(c) == grpc.StatusCode.UNAVAILABLE
        assert tls.update(first.material()) is True
        assert tls.update(first.material()) is False, "unchanged material: same context"
        kept = Client(port, tls=(first.trust, first.atlas))
        kept.send(_req("atlas"))
        await wait_until_async(lambda: len(kept.responses) == 1, timeout=10, what="served")
        tls.update(second.material())
        c = Client(port, tls=(second.trust, second.atlas))
        c.send(_req("atlas"))
        assert await _outcome(c) == 1
        c = Client(port, tls=(first.trust, first.atlas))
        c.send(_req("atlas"))
        assert await _outcome(c) == grpc.StatusCode.UNAVAILABLE
        # The stream opened under the first certificate lives on.
        assert not kept.done.is_set() and [s.node for s in cache.status()] == ["atlas"]
        kept.close()


def test_unusable_material_keeps_the_previous_context(caplog: pytest.LogCaptureFixture) -> None:
    pki = Pki.make()
    tls = ServerTls()
    tls.update(pki.material())
    before = tls.context
    other = Pki.make("other")
    mismatched = TlsMaterial(
        cert=model.CertKey(pki.server.cert_pem, other.server.key_pem),
        chain=b"",
        trust=pki.trust,
    )
    assert tls.update(mismatched) is False
    assert tls.context is before
    assert "PRIVATE KEY" not in caplog.text and "cannot serve TLS" in caplog.text


async def test_a_silent_caller_is_dropped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(server, "FIRST_REQUEST_TIMEOUT", 0.2)
    async with ads(SnapshotCache()) as port:
        c = Client(port)  # never sends a request
        await wait_until_async(c.done.is_set, timeout=10, what="the silent stream dropped")
        assert c.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        c.close()


async def test_a_stream_counts_in_the_push_backlog_until_its_envoy_answers() -> None:
    """The leader's writes wait while ``cache.backlog`` is busy (``test_backlog``): a
    stream counts in it from the moment a change is published until its Envoy has ACKed
    what the stream sent; for a removal, until the stream has looked and closed."""
    cache = _cache("atlas")
    async with ads(cache, authorizer=Authorizer(forwarder_token="t")) as port:
        c = Client(port, metadata=((TOKEN_HEADER, "t"),))
        c.send(_req("atlas"))
        await wait_until_async(lambda: len(c.responses) == 1, timeout=10, what="first response")
        assert cache.backlog.active == 1  # the first response is unanswered
        r = c.responses[0]
        c.send(_req("atlas", r.nonce, r.version_info))
        await wait_until_async(
            lambda: cache.backlog.active == 0, timeout=10, what="the ACK ends the push"
        )
        changed = [lst(), route(), cluster(body="changed"), secret()]
        cache.set_snapshot("atlas", Snapshot.create("atlas", changed))
        assert cache.backlog.active == 1
        await wait_until_async(lambda: len(c.responses) == 2, timeout=10, what="the change sent")
        assert cache.backlog.active == 1  # sent, not yet answered
        r = c.responses[1]
        c.send(_req("atlas", r.nonce, r.version_info))
        await wait_until_async(lambda: cache.backlog.active == 0, timeout=10, what="ACKed")
        cache.clear("atlas")
        assert cache.backlog.active == 1
        await wait_until_async(c.done.is_set, timeout=10, what="stream closed on removal")
        await wait_until_async(
            lambda: cache.backlog.active == 0, timeout=10, what="the removal looked at"
        )
        c.close()


async def test_a_client_breaking_http2_is_named_at_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A client that opens more concurrent streams than the 100 it was allowed loses its
    connection (grpclib's doing); the operator is told which peer and why, at WARNING, in
    one line without a traceback (grpclib says it only at DEBUG)."""
    import h2.config
    import h2.connection

    async with ads(_cache("atlas")) as port:
        sock = trio.socket.socket()
        await sock.connect(("127.0.0.1", port))
        host, local_port = sock.getsockname()[:2]
        local = f"{host}:{local_port}"
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        headers = [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", server.SOTW_METHOD),
            (":authority", f"127.0.0.1:{port}"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ]
        # Sent before the server's SETTINGS are read: h2 does not hold the client to them.
        for i in range(101):
            conn.send_headers(1 + 2 * i, headers)
        await sock.send(conn.data_to_send())
        with trio.fail_after(10):
            while await sock.recv(65536):
                pass  # until the server closes the connection
        sock.close()
    warnings = [r for r in caplog.records if r.name == "grpclib.protocol"]
    assert [r.levelname for r in warnings] == ["WARNING"]
    message = warnings[0].getMessage()
    assert local in message and "TooManyStreamsError" in message, message
    assert warnings[0].exc_info is None
