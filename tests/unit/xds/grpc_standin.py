"""A tiny gRPC server standing in for a Thanos sidecar, and a client for it.

Server: ``python -m tests.unit.xds.grpc_standin IDENT HOST PORT`` serves
``/atlas.test.Who/Name`` (StringValue -> StringValue "<IDENT>"), so a test sees
which replica answered. Client: ``who(...)`` (grpcio,
blocking; call it from a thread) dials with a chosen ``:authority``.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

METHOD = "/atlas.test.Who/Name"


class _Who:
    def __init__(self, ident: str) -> None:
        self.ident = ident

    async def name(self, stream: Any) -> None:
        from google.protobuf.wrappers_pb2 import StringValue

        await stream.recv_message()
        await stream.send_message(StringValue(value=self.ident))

    def __mapping__(self) -> dict[str, Any]:
        import grpclib.const
        from google.protobuf.wrappers_pb2 import StringValue

        return {
            METHOD: grpclib.const.Handler(
                self.name, grpclib.const.Cardinality.UNARY_UNARY, StringValue, StringValue
            )
        }


async def _serve(ident: str, host: str, port: int) -> None:
    import grpclib.server

    server = grpclib.server.Server([_Who(ident)])
    await server.start(host, port)
    print(f"serving {ident} on {port}", flush=True)
    await server.wait_closed()


def who(port: int, authority: str, *, timeout: float = 5) -> str:
    import grpc
    from google.protobuf.wrappers_pb2 import StringValue

    with grpc.insecure_channel(
        f"127.0.0.1:{port}", options=[("grpc.default_authority", authority)]
    ) as ch:
        fn = ch.unary_unary(
            METHOD,
            request_serializer=StringValue.SerializeToString,
            response_deserializer=StringValue.FromString,
        )
        reply = fn(StringValue(value="hi"), timeout=timeout)
        return str(reply.value)


if __name__ == "__main__":
    asyncio.run(_serve(sys.argv[1], sys.argv[2], int(sys.argv[3])))
