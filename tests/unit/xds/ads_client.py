"""A SotW ADS client (grpcio, from a thread) for tests that talk to atlasd's ADS port
directly: plaintext or TLS, with any metadata (forged headers included)."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3.discovery_pb2 import DiscoveryRequest, DiscoveryResponse

from atlasd import model
from atlasd.xds.server import SOTW_METHOD
from atlasd.xds.snapshot import CLUSTER
from tests.harness.certs import Pair
from tests.harness.wait import wait_until

ADS_NAME = model.ADS_SERVER_NAME


class Client:
    """A SotW ADS stream from a thread: ``send`` requests, read ``responses``/``error``.
    ``tls``: (trusted CA PEM, client certificate or None) for a TLS connection."""

    def __init__(
        self,
        port: int,
        metadata: tuple[tuple[str, str], ...] = (),
        *,
        tls: tuple[bytes, Pair | None] | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        self._q: queue.Queue[Any] = queue.Queue()
        self.responses: list[Any] = []
        self.error: grpc.RpcError | None = None
        self.done = threading.Event()
        if tls is None:
            self._channel = grpc.insecure_channel(f"{host}:{port}")
        else:
            trust, cert = tls
            creds = grpc.ssl_channel_credentials(
                trust, cert.key_pem if cert else None, cert.cert_pem if cert else None
            )
            self._channel = grpc.secure_channel(
                f"{host}:{port}", creds, options=[("grpc.ssl_target_name_override", ADS_NAME)]
            )
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

    def code(self) -> grpc.StatusCode | None:
        return self.error.code() if self.error is not None else None

    def outcome(self, timeout: float = 10) -> grpc.StatusCode | int:
        """Block until the stream answers or fails: its error code, or the number of
        responses; then close it."""
        wait_until(
            lambda: self.done.is_set() or bool(self.responses),
            timeout=timeout,
            what="an answer or an error",
        )
        code = self.code()
        outcome = code if code is not None else len(self.responses)
        self.close()
        return outcome


def request(node: str, nonce: str = "", version: str = "") -> Any:
    return DiscoveryRequest(
        node=base_pb2.Node(id=node), type_url=CLUSTER, response_nonce=nonce, version_info=version
    )
