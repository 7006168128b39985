"""The ADS server in this Trio process, driven by a grpcio client on loopback."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
import trio
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3.discovery_pb2 import DiscoveryRequest, DiscoveryResponse

from atlasd.xds import server
from atlasd.xds.authz import Authorizer
from atlasd.xds.cache import SnapshotCache
from atlasd.xds.server import SOTW_METHOD, run_ads_server
from atlasd.xds.snapshot import CLUSTER, Snapshot
from tests.harness.wait import wait_until_async
from tests.unit.xds.test_snapshot import good


class Client:
    """A SotW ADS stream from a thread: ``send`` requests, read ``responses``/``error``."""

    def __init__(self, port: int, metadata: tuple[tuple[str, str], ...] = ()) -> None:
        self._q: queue.Queue[Any] = queue.Queue()
        self.responses: list[Any] = []
        self.error: grpc.RpcError | None = None
        self.done = threading.Event()
        self._channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        call = self._channel.stream_stream(
            SOTW_METHOD,
            request_serializer=DiscoveryRequest.SerializeToString,
            response_deserializer=DiscoveryResponse.FromString,
        )
        self._stream = call(self._requests(), metadata=metadata)
        threading.Thread(target=self._read, daemon=True).start()

    def _requests(self) -> Iterator[Any]:
        while (item := self._q.get()) is not None:
            yield item

    def _read(self) -> None:
        try:
            for r in self._stream:
                self.responses.append(r)
        except grpc.RpcError as exc:
            self.error = exc
        finally:
            self.done.set()

    def send(self, r: Any) -> None:
        self._q.put(r)

    def close(self) -> None:
        self._q.put(None)
        self._channel.close()


def _req(node: str, nonce: str = "", version: str = "") -> Any:
    return DiscoveryRequest(
        node=base_pb2.Node(id=node), type_url=CLUSTER, response_nonce=nonce, version_info=version
    )


async def test_serves_acks_and_closes_on_removal() -> None:
    cache = SnapshotCache()
    cache.set_snapshot("atlas", Snapshot.create("atlas", good()))
    async with trio.open_nursery() as nursery:
        port = await nursery.start(
            lambda task_status: run_ads_server(
                cache=cache,
                host="127.0.0.1",
                port=0,
                authorizer=Authorizer(),
                task_status=task_status,
            )
        )
        c = Client(port)
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
        nursery.cancel_scope.cancel()


async def test_refuses_a_direct_downstream_node() -> None:
    cache = SnapshotCache()
    cache.set_snapshot("east", Snapshot.create("east", good()))
    async with trio.open_nursery() as nursery:
        port = await nursery.start(
            lambda task_status: run_ads_server(
                cache=cache,
                host="127.0.0.1",
                port=0,
                authorizer=Authorizer(),
                task_status=task_status,
            )
        )
        c = Client(port)
        c.send(_req("east"))
        await wait_until_async(c.done.is_set, timeout=10, what="refusal")
        assert c.error is not None and c.error.code() == grpc.StatusCode.PERMISSION_DENIED
        assert c.responses == []
        # Forwarded with east's certificate: allowed.
        c2 = Client(port, metadata=(("x-forwarded-client-cert", "Hash=1;DNS=east"),))
        c2.send(_req("east"))
        await wait_until_async(lambda: len(c2.responses) == 1, timeout=10, what="allowed")
        c.close()
        c2.close()
        nursery.cancel_scope.cancel()


async def test_a_silent_caller_is_dropped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(server, "FIRST_REQUEST_TIMEOUT", 0.2)
    cache = SnapshotCache()
    async with trio.open_nursery() as nursery:
        port = await nursery.start(
            lambda task_status: run_ads_server(
                cache=cache,
                host="127.0.0.1",
                port=0,
                authorizer=Authorizer(),
                task_status=task_status,
            )
        )
        c = Client(port)  # never sends a request
        await wait_until_async(c.done.is_set, timeout=10, what="the silent stream dropped")
        assert c.error is not None and c.error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        c.close()
        nursery.cancel_scope.cancel()
