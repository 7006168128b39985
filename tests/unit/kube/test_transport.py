"""The API server transport: a request's head and body leave in one write."""

from __future__ import annotations

import typing

import httpcore2
import httpx2
import pytest

from atlasd.kube.client import KubeClient
from atlasd.kube.config import KubeConfig
from atlasd.kube.transport import OneWriteBackend, OneWriteStream, OneWriteTransport

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
        client = kube._client_for(await kube.credentials.get())
        transport = client._transport_for_url(httpx2.URL("https://api.test:6443/api"))
        assert isinstance(transport, OneWriteTransport) is ours
        if ours:
            assert isinstance(transport._pool, httpcore2.AsyncConnectionPool)
            assert isinstance(transport._pool._network_backend, OneWriteBackend)
