"""The ADS gRPC server: grpclib (asyncio) run inside the Trio process via trio-asyncio.

This module is the thin asyncio shell: it receives requests, wakes on snapshot changes,
and sends what the pure machines in ``protocol`` decide.

One port, two ways in: Trio accepts each connection and peeks at its first byte. A TLS
handshake (0x16) is completed with the current context of ``tls.ServerTls`` (its verified
client certificate then identifies the caller); anything else is served as plaintext h2c
(the fallback, trusted only with the forwarder token). The connection is then handed to
grpclib on the asyncio loop (``connect_accepted_socket``). Per stream:

1. the first request must name a node; ``Authorizer`` checks the caller may fetch it
   (else PERMISSION_DENIED);
2. the node is fixed for the stream's life (a later request naming another node is
   refused);
3. every request and every change of the node's snapshot goes through the machine;
   ACKs and NACKs update the status board and metrics;
4. when the node's snapshot is removed, the stream ends;
5. a downstream node's stream ends (status OK) once it is ``max_stream_age`` old (±10 %,
   so a fleet that connected at once does not reconnect at once): the Envoy opens a new one
   after its retry back-off (under a second the first time), and the observability Envoy, which forwards it, balances it over every replica
   again. Without it a rolling restart leaves every downstream stream on the replica
   restarted first (gRPC's MAX_CONNECTION_AGE, which Istio's istiod uses for the same
   reason, at stream level: the observability Envoy's connections carry many streams).
   Node ``atlas`` (one stream per observability Envoy, the fleet's whole configuration on
   every new stream) is left alone.

Errors::

    grpclib GRPCError(INVALID_ARGUMENT)   first request without a node id / node changed
    grpclib GRPCError(DEADLINE_EXCEEDED)  no first request within FIRST_REQUEST_TIMEOUT
    grpclib GRPCError(PERMISSION_DENIED)  authz.Denied
    connection closed, WARNING logged     the client broke HTTP/2 (e.g. a 101st stream at
                                          once; the observability Envoy is held to 100)
"""

from __future__ import annotations

import asyncio
import contextvars
import errno
import hashlib
import logging
import random
import socket
import ssl
import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import grpclib.config
import grpclib.const
import grpclib.encoding.proto
import grpclib.exceptions
import grpclib.server
import h2.exceptions
import trio
import trio_asyncio

from atlasd import logs
from atlasd.model import OBSERVABILITY_NODE
from atlasd.xds.authz import Authorizer, Denied, presented
from atlasd.xds.cache import SnapshotCache
from atlasd.xds.protocol import (
    DeltaDiscoveryRequest,
    DeltaDiscoveryResponse,
    DeltaStream,
    DiscoveryRequest,
    DiscoveryResponse,
    EncodedResponse,
    SotwStream,
    Step,
)
from atlasd.xds.snapshot import SHORT_NAMES
from atlasd.xds.tls import ServerTls, peer_names

log = logging.getLogger(__name__)

_SERVICE = "/envoy.service.discovery.v3.AggregatedDiscoveryService"
SOTW_METHOD = f"{_SERVICE}/StreamAggregatedResources"
DELTA_METHOD = f"{_SERVICE}/DeltaAggregatedResources"

# A stream must name its node this soon (an Envoy sends its first request at once);
# otherwise an idle caller could hold streams without ever being authorized.
FIRST_REQUEST_TIMEOUT = 30.0

KEEPALIVE_SECONDS = 60.0

# A connection must show what it speaks (its first byte) and finish a TLS handshake this
# soon, or it is closed.
FIRST_BYTE_TIMEOUT = 10.0
HANDSHAKE_TIMEOUT = 10.0
TLS_RECORD_HANDSHAKE = 0x16

# accept() failures that mean "out of resources for now": wait and accept again (as
# trio.serve_listeners does); any other error is a bug and propagates.
_ACCEPT_RETRY = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}

# Errors that mean "the peer went away"; anything else is a bug and propagates.
_GONE = (
    grpclib.exceptions.StreamTerminatedError,
    grpclib.exceptions.ProtocolError,
    h2.exceptions.ProtocolError,
    ConnectionError,
)


class _Changed:
    """Queue marker: the node's snapshot changed."""


class _Expired:
    """Queue marker: the stream reached its maximum age."""


_EXPIRED = _Expired()


@dataclass(frozen=True)
class _Ended:
    error: BaseException | None


_CHANGED = _Changed()


class AdsService:
    """The AggregatedDiscoveryService, SotW and Delta, for grpclib."""

    def __init__(
        self,
        cache: SnapshotCache,
        authorizer: Authorizer,
        *,
        max_stream_age: float | None = None,
        ageless: frozenset[str] = frozenset({OBSERVABILITY_NODE}),
    ) -> None:
        """``max_stream_age`` (seconds; None: for ever): a stream of a node not in
        ``ageless`` ends once that old (see the module docstring)."""
        self.cache = cache
        self.authorizer = authorizer
        self.max_stream_age = max_stream_age
        self.ageless = ageless

    def __mapping__(self) -> dict[str, grpclib.const.Handler]:
        return {
            SOTW_METHOD: grpclib.const.Handler(
                self.sotw,
                grpclib.const.Cardinality.STREAM_STREAM,
                DiscoveryRequest,
                DiscoveryResponse,
            ),
            DELTA_METHOD: grpclib.const.Handler(
                self.delta,
                grpclib.const.Cardinality.STREAM_STREAM,
                DeltaDiscoveryRequest,
                DeltaDiscoveryResponse,
            ),
        }

    async def sotw(self, stream: Any) -> None:
        await self._serve(stream, SotwStream)

    async def delta(self, stream: Any) -> None:
        await self._serve(stream, DeltaStream)

    async def _serve(self, stream: Any, machine_cls: Callable[[str], Any]) -> None:
        try:
            first = await asyncio.wait_for(stream.recv_message(), FIRST_REQUEST_TIMEOUT)
        except TimeoutError:
            raise grpclib.exceptions.GRPCError(
                grpclib.const.Status.DEADLINE_EXCEEDED, "no first request"
            ) from None
        if first is None:
            return
        node: str = first.node.id
        if not node:
            raise grpclib.exceptions.GRPCError(
                grpclib.const.Status.INVALID_ARGUMENT, "the first request must carry node.id"
            )
        peer = _peer(stream)
        # This stream's lines carry its node (each grpclib stream is its own asyncio task,
        # with its own context).
        logs.bind(key=node)
        headers = list(stream.metadata.items())
        peer_hash = _peer_hash(stream)
        # The certificate this stream stands on: a revocation after it opened ends it.
        held = presented(headers, peer_hash)
        try:
            who = self.authorizer.authorize(
                node, headers, peer_names(_peer_cert(stream)), peer_hash
            )
        except Denied as exc:
            self.cache.metrics.denied.inc()
            log.warning("xds: refused node %r from %s: %s", node, peer, exc)
            raise grpclib.exceptions.GRPCError(
                grpclib.const.Status.PERMISSION_DENIED, str(exc)
            ) from None
        machine = machine_cls(node)
        kind: str = machine.kind
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        wake_pending = False
        # Whether this stream counts in the push backlog (the leader's writes wait for it):
        # from a wake until what it sent is answered.
        backlog = self.cache.backlog
        counted = False

        def track(active: bool) -> None:
            nonlocal counted
            if active != counted:
                counted = active
                if active:
                    backlog.enter()
                else:
                    backlog.leave()

        def settle() -> None:
            """After the stream did something: it counts while a wake or an answer is due."""
            track(wake_pending or machine.in_flight(time.monotonic()))

        # What changed since the stream last looked (None: unknown, compare everything).
        hint: dict[str, set[str]] | None = {}

        def on_change(diff: Mapping[str, frozenset[str]] | None) -> None:
            nonlocal wake_pending, hint
            if diff is None or hint is None:
                hint = None
            else:
                for t, names in diff.items():
                    hint.setdefault(t, set()).update(names)
            if not wake_pending:
                wake_pending = True
                track(True)
                loop.call_soon_threadsafe(queue.put_nowait, _CHANGED)

        async def reader() -> None:
            try:
                while True:
                    msg = await stream.recv_message()
                    if msg is None:
                        break
                    queue.put_nowait(msg)
            except Exception as exc:  # handed to the stream loop, which re-raises
                queue.put_nowait(_Ended(exc))  # anything but a departed peer
            else:
                queue.put_nowait(_Ended(None))

        cancel_watch = self.cache.watch(node, on_change)
        sid = self.cache.board.open(node=node, kind=kind, peer=f"{peer} ({who})")
        self.cache.metrics.connected.labels(kind).inc()
        reading = asyncio.ensure_future(reader())
        expiry = (
            loop.call_later(
                self.max_stream_age * random.uniform(0.9, 1.1), queue.put_nowait, _EXPIRED
            )
            if self.max_stream_age and node not in self.ageless
            else None
        )
        had_snapshot = self.cache.get(node) is not None
        log.info("xds: %s stream %d opened for node %r from %s (%s)", kind, sid, node, peer, who)
        try:
            await self._apply(
                stream, sid, node, machine.on_request(first, *self._state(node, asked=True))
            )
            settle()
            while True:
                item = await queue.get()
                if isinstance(item, _Ended):
                    if item.error is not None and not isinstance(item.error, _GONE):
                        raise item.error
                    return
                if held is not None and held in self.authorizer.revoked:
                    self.cache.metrics.denied.inc()
                    log.warning("xds: node %r: client certificate revoked; closing stream", node)
                    raise grpclib.exceptions.GRPCError(
                        grpclib.const.Status.PERMISSION_DENIED, "client certificate revoked"
                    )
                if item is _EXPIRED:
                    self.cache.metrics.aged.inc()
                    log.info(
                        "xds: %s stream %d of node %r reached its maximum age; ending it "
                        "(the Envoy reconnects, perhaps to another replica)",
                        kind,
                        sid,
                        node,
                    )
                    return
                if item is _CHANGED:
                    wake_pending = False
                    seen, hint = hint, {}
                    snap, stamp = self._state(node)
                    if snap is None:
                        if had_snapshot:
                            log.info("xds: node %r removed; closing stream %d", node, sid)
                            return
                        settle()
                        continue
                    had_snapshot = True
                    step = machine.on_snapshot(snap, stamp, seen)
                else:
                    if item.HasField("node") and item.node.id and item.node.id != node:
                        raise grpclib.exceptions.GRPCError(
                            grpclib.const.Status.INVALID_ARGUMENT, "node id changed on the stream"
                        )
                    step = machine.on_request(item, *self._state(node, asked=True))
                await self._apply(stream, sid, node, step)
                settle()
        except _GONE:
            return
        finally:
            cancel_watch()
            track(False)
            reading.cancel()
            if expiry is not None:
                expiry.cancel()
            self.cache.board.close(sid)
            self.cache.metrics.connected.labels(kind).dec()
            log.info("xds: %s stream %d for node %r closed", kind, sid, node)

    def _state(self, node: str, *, asked: bool = False) -> tuple[Any, float]:
        """The node's snapshot and the push-latency start: when it was published, or,
        for an answer to a request (a new stream, a new subscription), now."""
        snap = self.cache.get(node)
        stamp = self.cache.published_at(node)
        now = time.monotonic()
        if stamp is None or asked:
            return snap, now
        return snap, stamp

    async def _apply(self, stream: Any, sid: int, node: str, step: Step) -> None:
        m = self.cache.metrics
        now = time.monotonic()
        for ack in step.acks:
            self.cache.board.acked(sid, ack.type_url, ack.version)
            if not ack.pushed:
                continue
            m.push_latency.labels(SHORT_NAMES.get(ack.type_url, ack.type_url)).observe(
                max(0.0, now - ack.stamp)
            )
        for nack in step.nacks:
            short = SHORT_NAMES.get(nack.type_url, nack.type_url)
            self.cache.board.nacked(sid, nack.type_url, nack.version, nack.message)
            m.nacks.labels(node, short).inc()
            log.warning(
                "xds: node %r rejected %s version %s: %s (parked; not re-sent)",
                node,
                short,
                nack.version,
                nack.message,
            )
        for resp in step.responses:
            await stream.send_message(resp)
            m.pushes.labels(SHORT_NAMES.get(resp.type_url, resp.type_url)).inc()


class _Codec(grpclib.encoding.proto.ProtoCodec):
    """grpclib's protobuf codec, sending a response already in wire form (``EncodedResponse``:
    a large SotW response assembled from cached pieces) as is."""

    def encode(self, message: Any, message_type: Any) -> bytes:
        if isinstance(message, EncodedResponse):
            return message.data
        return bytes(super().encode(message, message_type))


class _Server(grpclib.server.Server):
    """grpclib's Server, remembering its connections so that shutdown closes them.

    ``Server.close()`` cancels the request handlers and stops listening but leaves the
    HTTP/2 connections open; with the event loop gone, an Envoy would keep a dead
    stream and never reconnect.
    """

    def __init__(self, handlers: list[Any]) -> None:
        # HTTP/2 pings on quiet ADS streams, so a peer that vanished without a FIN is
        # noticed (its stream closes, status and the connected gauge stay true).
        config = grpclib.config.Configuration(
            _keepalive_time=KEEPALIVE_SECONDS,
            _keepalive_timeout=20.0,
            _http2_max_pings_without_data=0,
            _http2_min_sent_ping_interval_without_data=KEEPALIVE_SECONDS,
        )
        super().__init__(handlers, config=config, codec=_Codec())
        self._protocols: weakref.WeakSet[Any] = weakref.WeakSet()

    def _protocol_factory(self) -> Any:
        proto = super()._protocol_factory()
        self._protocols.add(proto)
        return proto

    def close_connections(self) -> None:
        for proto in list(self._protocols):
            conn = getattr(proto, "connection", None)
            if conn is not None:
                conn.close()

    # Connections come from ``_accept_loop``, not from an asyncio server of grpclib's own:
    # closing cancels the request handlers.
    def close(self) -> None:
        for handler in self._handlers:
            handler.close()

    async def wait_closed(self) -> None:
        if self._handlers:
            await asyncio.wait({asyncio.ensure_future(h.wait_closed()) for h in self._handlers})


def _peer_cert(stream: Any) -> dict[str, Any] | None:
    try:
        cert: dict[str, Any] | None = stream.peer.cert()
    except (AttributeError, ValueError):
        return None
    return cert


def _peer_hash(stream: Any) -> str | None:
    """SHA-256 (hex) of the connection's verified client certificate (None: none)."""
    try:
        # grpclib's Peer exposes the certificate only as a dict; the DER is the SSL object's.
        ssl_object = stream.peer._transport.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    except (AttributeError, ValueError):
        return None
    return hashlib.sha256(der).hexdigest() if der else None


def _peer(stream: Any) -> str:
    try:
        addr = stream.peer.addr()
    except (AttributeError, OSError):
        return "?"
    if not addr:
        return "?"
    return f"{addr[0]}:{addr[1]}"


# The peer of the connection grpclib is reading from (``_Named``), for ``_ProtocolErrors``.
_READING_FROM: contextvars.ContextVar[str] = contextvars.ContextVar("ads_peer", default="?")


class _Named(asyncio.Protocol):
    """grpclib's protocol for one connection, its peer named while it reads."""

    def __init__(self, inner: asyncio.Protocol, peer: str) -> None:
        self._inner = inner
        self._peer = peer

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        token = _READING_FROM.set(self._peer)
        try:
            self._inner.data_received(data)
        finally:
            _READING_FROM.reset(token)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()


class _ProtocolErrors(logging.Filter):
    """grpclib closes a connection that breaks HTTP/2 -- a client opening a 101st
    concurrent stream, above the SETTINGS_MAX_CONCURRENT_STREAMS of 100 it was sent, loses
    all its streams -- and says so only at DEBUG, with a traceback. This says it at WARNING,
    in one line naming the peer and h2's reason; grpclib's other records pass as they did
    (the level set for ``grpclib`` or, without one, the root's)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg != "Protocol error":
            # As without this filter: the level grpclib's log inherits (its own, or the root's).
            return logging.getLogger("grpclib").isEnabledFor(record.levelno)
        exc = record.exc_info[1] if record.exc_info else None
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        record.msg = "xds: %s broke HTTP/2 (%s); its connection and every stream on it closed"
        record.args = (_READING_FROM.get(), f"{type(exc).__name__}: {exc}" if exc else "?")
        record.exc_info, record.exc_text = None, None
        return True


def _report_protocol_errors() -> None:
    """Install ``_ProtocolErrors`` on grpclib's protocol logger (once)."""
    logger = logging.getLogger("grpclib.protocol")
    if not any(isinstance(f, _ProtocolErrors) for f in logger.filters):
        logger.addFilter(_ProtocolErrors())
        logger.setLevel(logging.DEBUG)  # its records reach the filter, which decides


async def run_ads_server(
    *,
    cache: SnapshotCache,
    host: str,
    port: int,
    authorizer: Authorizer,
    tls: ServerTls | None = None,
    max_stream_age: float | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ADS on ``host:port`` until cancelled; ``started()`` with the bound port.
    ``max_stream_age``: see ``AdsService``.

    TLS connections are served with ``tls``'s current context (refused while it has none,
    or when ``tls`` is None); plaintext ones as h2c.
    """
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    with sock:  # closed on every exit
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(1024)
        bound = int(sock.getsockname()[1])
        listener = trio.socket.from_stdlib_socket(sock)
        async with trio_asyncio.open_loop() as loop:
            _report_protocol_errors()
            server = _Server([AdsService(cache, authorizer, max_stream_age=max_stream_age)])
            log.info("xds: ADS server listening on %s:%d (TLS and plaintext)", host, bound)
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_accept_loop, listener, server, loop, tls, nursery)
                    task_status.started(bound)
                    await trio.sleep_forever()
            finally:
                server.close()
                server.close_connections()
                with trio.move_on_after(5) as scope:
                    scope.shield = True
                    await trio_asyncio.aio_as_trio(server.wait_closed)()


async def _accept_loop(
    listener: trio.socket.SocketType,
    server: _Server,
    loop: asyncio.AbstractEventLoop,
    tls: ServerTls | None,
    nursery: trio.Nursery,
) -> None:
    while True:
        try:
            conn, _ = await listener.accept()
        except OSError as exc:
            if exc.errno not in _ACCEPT_RETRY:
                raise
            log.warning("xds: accept failed (%s); retrying in 0.1s", exc.strerror)
            await trio.sleep(0.1)
            continue
        nursery.start_soon(_hand_over, conn, server, loop, tls)


async def _hand_over(
    conn: trio.socket.SocketType,
    server: _Server,
    loop: asyncio.AbstractEventLoop,
    tls: ServerTls | None,
) -> None:
    """Peek at the connection's first byte, then give it to grpclib: over TLS (with the
    context current now) or as plaintext h2c."""
    peer = "?"
    try:
        addr = conn.getpeername()
        peer = f"{addr[0]}:{addr[1]}"
        first = b""
        with trio.move_on_after(FIRST_BYTE_TIMEOUT):
            first = await conn.recv(1, socket.MSG_PEEK)
    except OSError:
        conn.close()
        return
    if not first:
        conn.close()
        return
    context: ssl.SSLContext | None = None
    if first[0] == TLS_RECORD_HANDSHAKE:
        context = tls.context if tls is not None else None
        if context is None:
            log.warning("xds: TLS connection from %s refused: no ADS server certificate yet", peer)
            conn.close()
            return
    raw = socket.socket(fileno=conn.detach())
    try:
        await trio_asyncio.aio_as_trio(loop.connect_accepted_socket)(
            lambda: _Named(server._protocol_factory(), peer),
            sock=raw,
            ssl=context,
            ssl_handshake_timeout=HANDSHAKE_TIMEOUT if context is not None else None,
        )
    except (ssl.SSLError, OSError) as exc:
        # A client that does not trust us, or presents a certificate we do not trust.
        log.warning("xds: TLS handshake with %s failed: %s", peer, _reason(exc))
        raw.close()


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
        return f"{exc.reason}: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return exc.reason or str(exc)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return type(exc).__name__
