"""The observer's probes of unseen clusters: each on a connection of its own."""

from __future__ import annotations

from functools import partial

import h2.config
import h2.connection
import h2.events
import trio

from atlasd.query.observer import probe_unseen
from atlasd.query.probe import Finding
from atlasd.query.view import ClusterSight, QueryView
from tests.unit.query.test_view import fleet


async def test_each_probe_of_a_round_has_a_connection_of_its_own() -> None:
    # Concurrent calls sharing one HTTP/2 connection fail at random when Envoy replies to
    # one before its request body is sent (httpcore2: "LocalProtocolError: 3"); a
    # connection per probe means every request is stream 1 of its connection.
    streams: list[list[int]] = []

    async def envoy(conn: trio.SocketStream) -> None:
        h2c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        h2c.initiate_connection()
        seen: list[int] = []
        streams.append(seen)
        await conn.send_all(h2c.data_to_send())
        while data := await conn.receive_some(65536):
            for ev in h2c.receive_data(data):
                if isinstance(ev, h2.events.RequestReceived):
                    seen.append(ev.stream_id)
                    # A local reply: trailers only, as Envoy's when no upstream answered.
                    reply = [(":status", "200"), ("content-type", "application/grpc"),
                             ("grpc-status", "14"), ("grpc-message", "no healthy upstream")]  # fmt: skip
                    h2c.send_headers(ev.stream_id, reply, end_stream=True)
            await conn.send_all(h2c.data_to_send())

    names = ("a", "b", "c", "d", "e", "f")
    probes: dict[str, tuple[Finding, float]] = {}
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, envoy, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        view = QueryView({n: ClusterSight(seen=False, since=0) for n in names})
        with trio.fail_after(10):
            await probe_unseen(fleet(*names), view, probes, via=f"127.0.0.1:{port}", now=1)
        nursery.cancel_scope.cancel()
    assert sorted(probes) == list(names)
    assert all(f.hop not in ("error", "timeout") for f, _ in probes.values()), probes
    assert streams == [[1]] * len(names), streams
