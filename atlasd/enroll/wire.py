"""The enrollment protocol on the wire: one JSON request and one JSON answer per
connection, HTTP/1.1 (h11, sans-I/O) over a Trio TLS stream. Both the endpoint and the
agent use it, so the two cannot drift.

Paths: ``GET /v1/ca`` (the trust bundle; anyone may read it, the agent checks it against
its token's pin), ``POST /v1/enroll`` (token + CSRs), ``POST /v1/renew`` (CSRs, over
mTLS with the current client certificate).

Errors::

    Exception
     └── WireError   (the peer broke the protocol: too large, malformed, closed early)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import h11
import trio

MAX_BODY = 32 * 1024
MAX_HEAD = 8 * 1024
CA_PATH = "/v1/ca"
ENROLL_PATH = "/v1/enroll"
RENEW_PATH = "/v1/renew"


class WireError(Exception):
    """The peer did not speak the protocol (message safe to log)."""


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    body: bytes


async def _next_event(conn: h11.Connection, stream: trio.abc.Stream) -> Any:
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            raise WireError(f"malformed HTTP: {exc}") from exc
        if event is h11.NEED_DATA:
            data = await stream.receive_some(16384)
            conn.receive_data(bytes(data))
            continue
        return event


async def _body(conn: h11.Connection, stream: trio.abc.Stream, length: int | None) -> bytes:
    if length is not None and length > MAX_BODY:
        raise WireError(f"body larger than {MAX_BODY} bytes")
    chunks: list[bytes] = []
    size = 0
    while True:
        event = await _next_event(conn, stream)
        if isinstance(event, h11.Data):
            size += len(event.data)
            if size > MAX_BODY:
                raise WireError(f"body larger than {MAX_BODY} bytes")
            chunks.append(bytes(event.data))
        elif isinstance(event, h11.EndOfMessage):
            return b"".join(chunks)
        else:
            raise WireError("connection closed in the middle of a message")


def _length(headers: list[tuple[bytes, bytes]]) -> int | None:
    for k, v in headers:
        if k.lower() == b"content-length":
            return int(v)
    return None


def server_connection() -> h11.Connection:
    return h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)


async def read_request(conn: h11.Connection, stream: trio.abc.Stream) -> Request:
    """The request on ``conn`` (``server_connection()``); ``WireError`` if it breaks the
    protocol or its limits (the caller may still answer on ``conn`` if
    ``conn.our_state`` is ``h11.SEND_RESPONSE``)."""
    event = await _next_event(conn, stream)
    if not isinstance(event, h11.Request):
        raise WireError("expected a request")
    body = await _body(conn, stream, _length(list(event.headers)))
    return Request(event.method.decode(), event.target.decode("ascii", "replace"), body)


async def respond(
    conn: h11.Connection, stream: trio.abc.Stream, status: int, doc: dict[str, Any]
) -> None:
    body = json.dumps(doc).encode()
    headers = [
        ("content-type", "application/json"),
        ("content-length", str(len(body))),
        ("connection", "close"),
    ]
    await stream.send_all(conn.send(h11.Response(status_code=status, headers=headers)) or b"")
    await stream.send_all(conn.send(h11.Data(data=body)) or b"")
    await stream.send_all(conn.send(h11.EndOfMessage()) or b"")


async def call(
    stream: trio.abc.Stream, method: str, path: str, doc: dict[str, Any] | None, *, host: str
) -> tuple[int, dict[str, Any]]:
    """One request, its answer (status, JSON object)."""
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD)
    body = json.dumps(doc).encode() if doc is not None else b""
    headers = [("host", host), ("content-length", str(len(body))), ("connection", "close")]
    if doc is not None:
        headers.append(("content-type", "application/json"))
    await stream.send_all(
        conn.send(h11.Request(method=method, target=path, headers=headers)) or b""
    )
    if body:
        await stream.send_all(conn.send(h11.Data(data=body)) or b"")
    await stream.send_all(conn.send(h11.EndOfMessage()) or b"")
    event = await _next_event(conn, stream)
    if not isinstance(event, h11.Response):
        raise WireError("expected a response")
    data = await _body(conn, stream, _length(list(event.headers)))
    try:
        answer = json.loads(data)
    except ValueError as exc:
        raise WireError("the answer is not JSON") from exc
    if not isinstance(answer, dict):
        raise WireError("the answer is not a JSON object")
    return event.status_code, answer
