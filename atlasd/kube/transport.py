"""The HTTP/1.1 transport to the API server: each request leaves in one TLS record.

httpcore2 writes a request in pieces — its head, then its body — and over TLS each write
is a TLS record and a ``send`` of its own, each of which the API server reads, decrypts
and wakes a goroutine for. ``OneWriteTransport`` is httpx2's own transport over a
connection pool whose streams hold what is written until the next read: HTTP/1.1 reads
the response only after the whole request is written, so the head and the body of a
request go out together, with no delay. 3,000 server-side applies of atlasd's bodies at 16
in flight, five pairs in one run: atlasd 1.494 -> 1.415 ms of CPU per apply, the API
server 6.58 -> 6.17 CPU-s (medians; bench/README.md, issue 25).

Only for HTTP/1.1 (HTTP/2 reads while it writes) and direct connections: with a proxy
(``proxy-url`` in the kubeconfig) httpx2's own proxy transport is used as before. A write
that fails surfaces at the read that flushes it, as the same ``httpcore2.WriteError``
(httpx2: ``WriteError``, a ``TransportError``) the write would have raised.

A connection it closes is freed at once, not by the cycle collector (``atlasd.heap.release_tls``).
"""

# The ``timeout`` parameters are httpcore2's network interface, not ours to replace by a
# cancel scope.
# ruff: noqa: ASYNC109

from __future__ import annotations

import ssl
import typing

import httpcore2
import httpx2

from atlasd.heap import release_tls


class OneWriteStream(httpcore2.AsyncNetworkStream):
    """A stream that sends what was written, in one write, when it is next read."""

    def __init__(self, inner: httpcore2.AsyncNetworkStream) -> None:
        self._inner = inner
        # Written and not yet sent, in order; sent (joined) by the next read or TLS start.
        self._pending: list[bytes] = []

    async def _flush(self, timeout: float | None) -> None:
        if self._pending:
            data = b"".join(self._pending)
            self._pending = []
            await self._inner.write(data, timeout)

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if buffer:
            self._pending.append(buffer)

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        await self._flush(timeout)
        return await self._inner.read(max_bytes, timeout)

    async def aclose(self) -> None:
        self._pending = []
        await self._inner.aclose()
        release_tls(getattr(self._inner, "_stream", None))  # httpcore2's stream keeps trio's there

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore2.AsyncNetworkStream:
        await self._flush(timeout)
        tls = await self._inner.start_tls(ssl_context, server_hostname, timeout)
        return OneWriteStream(tls)

    def get_extra_info(self, info: str) -> typing.Any:
        return self._inner.get_extra_info(info)


class OneWriteBackend(httpcore2.AsyncNetworkBackend):
    """Trio's network backend (atlasd runs on Trio) with ``OneWriteStream`` connections."""

    def __init__(self, inner: httpcore2.AsyncNetworkBackend | None = None) -> None:
        self._inner = inner or httpcore2.TrioBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: typing.Iterable[httpcore2.SOCKET_OPTION] | None = None,
    ) -> httpcore2.AsyncNetworkStream:
        stream = await self._inner.connect_tcp(
            host, port, timeout=timeout, local_address=local_address, socket_options=socket_options
        )
        return OneWriteStream(stream)

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: typing.Iterable[httpcore2.SOCKET_OPTION] | None = None,
    ) -> httpcore2.AsyncNetworkStream:
        stream = await self._inner.connect_unix_socket(
            path, timeout=timeout, socket_options=socket_options
        )
        return OneWriteStream(stream)

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class OneWriteTransport(httpx2.AsyncHTTPTransport):
    """httpx2's transport (its request and response mapping, its error translation) over a
    pool of ``OneWriteStream`` connections, HTTP/1.1 only."""

    def __init__(self, *, verify: ssl.SSLContext, limits: httpx2.Limits) -> None:
        super().__init__(verify=verify, limits=limits)
        # httpx2 builds its pool without a way to name the network backend: the same pool,
        # built again with one. (tests/unit/kube/test_transport.py checks it is used.)
        self._pool = httpcore2.AsyncConnectionPool(
            ssl_context=verify,
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            http1=True,
            http2=False,
            network_backend=OneWriteBackend(),
        )
