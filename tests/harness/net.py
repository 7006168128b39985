"""Loopback ports for test processes."""

from __future__ import annotations

import random
import socket

# Ports handed out below the kernel's ephemeral range (ip_local_port_range, 32768-60999 by
# default), which neither ``bind(0)`` nor an outgoing connection ever takes: a port found
# free there stays free until the test's process binds it. (A port picked by ``bind(0)`` is
# an ephemeral one, and any connection made meanwhile -- atlasd's to the API server, an
# Envoy's -- could take it: CI saw an Envoy listener fail with "Address already in use".)
# Above the fixed ports the products use (6307, 9090-9093, 10900-11904, 15000-15021).
_PORTS = (20000, 32000)
# Handed out by this process: never twice (a test binds its ports some time after asking).
_given: set[int] = set()


def _ephemeral_floor() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port(*, udp_too: bool = False) -> int:
    """A TCP port on 127.0.0.1 that is free now (and, with ``udp_too``, free for UDP),
    outside the ephemeral range, so that nothing but an explicit bind takes it."""
    high = min(_PORTS[1], _ephemeral_floor() - 1)
    for _ in range(200):
        port = random.randint(_PORTS[0], high)
        if port in _given:
            continue
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.bind(("127.0.0.1", port))
            if udp_too:
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                    u.bind(("127.0.0.1", port))
        except OSError:
            continue
        _given.add(port)
        return port
    raise RuntimeError("no free port found on 127.0.0.1")
