"""The API server transport: a request's head and body leave in one write."""

from __future__ import annotations

import functools
import gc
import ssl
import typing
import weakref
from pathlib import Path

import httpcore2
import httpx2
import pytest
import trio

from atlasd.kube.client import KubeClient
from atlasd.kube.config import KubeConfig
from atlasd.kube.transport import OneWriteBackend, OneWriteStream, OneWriteTransport
from tests.harness.certs import CA

RESPONSE = [
    b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\n",
    b"Content-Length: 2\r\n\r\n{}",
]


class RecordingStream(httpcore2.AsyncMockStream):
    """httpcore2's mock stream (it answers ``buffer``), recording every write."""

    def __init__(self, buffer: list[bytes], writes: list[bytes]) -> None:
        super().__init__(buffer)
        self.writes = writes

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:  # noqa: ASYNC109
        if buffer:  # an empty write sends nothing (httpcore2's Trio stream skips it too)
            self.writes.append(buffer)


class RecordingBackend(httpcore2.AsyncMockBackend):
    def __init__(self, writes: list[bytes]) -> None:
        super().__init__(RESPONSE)
        self.writes = writes

    async def connect_tcp(self, *args: typing.Any, **kwargs: typing.Any) -> RecordingStream:
        return RecordingStream(list(self._buffer), self.writes)


async def _post(backend: httpcore2.AsyncNetworkBackend) -> httpcore2.Response:
    async with httpcore2.AsyncConnectionPool(network_backend=backend) as pool:
        return await pool.request(
            "PATCH",
            "http://api.test/api/v1/namespaces/m/secrets/s",
            headers={"Content-Type": "application/apply-patch+yaml"},
            content=b'{"kind": "Secret"}',
        )


async def test_head_and_body_leave_in_one_write() -> None:
    plain: list[bytes] = []
    assert (await _post(RecordingBackend(plain))).status == 201
    # httpcore2 alone writes the head and the body apart: two TLS records, two sends.
    assert len(plain) == 2
    one: list[bytes] = []
    assert (await _post(OneWriteBackend(RecordingBackend(one)))).status == 201
    assert one == [b"".join(plain)]


class FailingStream(RecordingStream):
    async def write(self, buffer: bytes, timeout: float | None = None) -> None:  # noqa: ASYNC109
        raise httpcore2.WriteError("connection reset")


async def test_a_failed_write_surfaces_at_the_read_that_sends_it() -> None:
    stream = OneWriteStream(FailingStream([], []))
    await stream.write(b"head")  # held, nothing sent yet
    with pytest.raises(httpcore2.WriteError):
        await stream.read(100)


async def test_tls_start_sends_what_was_written_first() -> None:
    writes: list[bytes] = []
    inner = RecordingStream([], writes)
    stream = OneWriteStream(inner)
    await stream.write(b"CONNECT api.test:443 HTTP/1.1\r\n\r\n")
    tls = await stream.start_tls(ssl_context=None)  # type: ignore[arg-type]  # the mock ignores it
    assert writes == [b"CONNECT api.test:443 HTTP/1.1\r\n\r\n"]
    assert isinstance(tls, OneWriteStream)


@pytest.mark.parametrize(("proxy", "ours"), [(None, True), ("http://proxy.test:3128", False)])
async def test_the_client_uses_it_for_direct_connections(proxy: str | None, ours: bool) -> None:
    config = KubeConfig(server="https://api.test:6443", namespace="m", proxy_url=proxy)
    async with KubeClient(config) as kube:
        http = kube._client_for(await kube.credentials.get())
        transport = http.transport
        # Watches go through the same transport (one pool of connections).
        assert http.client._transport_for_url(httpx2.URL("https://api.test:6443/api")) is transport
        assert isinstance(transport, OneWriteTransport) is ours
        if ours:
            assert isinstance(transport._pool, httpcore2.AsyncConnectionPool)
            assert isinstance(transport._pool._network_backend, OneWriteBackend)


async def test_a_closed_tls_connection_is_freed_without_the_cycle_collector(
    tmp_path: Path,
) -> None:
    """A real TLS connection on loopback, closed and dropped while the collector is off:
    nothing keeps trio's SSLStream (and its OpenSSL state) alive."""
    ca = CA("transport-test-ca")
    server = ca.issue("localhost", dns=("localhost",), server=True)
    cert, key = server.write(tmp_path, "server")
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    client_ctx = ssl.create_default_context(cadata=ca.cert_pem.decode())

    async def answer(stream: trio.SSLStream[trio.SocketStream]) -> None:
        await stream.send_all(b"pong")
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        serve = functools.partial(trio.serve_ssl_over_tcp, host="127.0.0.1")
        listeners = await nursery.start(serve, answer, 0, server_ctx)
        port = listeners[0].transport_listener.socket.getsockname()[1]
        plain = await OneWriteBackend().connect_tcp("127.0.0.1", port)
        tls = await plain.start_tls(client_ctx, server_hostname="localhost")
        assert await tls.read(4) == b"pong"
        inner = typing.cast(typing.Any, tls)._inner._stream
        assert isinstance(inner, trio.SSLStream)
        alive = weakref.ref(inner)
        gc.disable()
        try:
            await tls.aclose()
            del inner, tls, plain
            assert alive() is None
        finally:
            gc.enable()
        nursery.cancel_scope.cancel()
