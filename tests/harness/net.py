"""Loopback ports for test processes."""

from __future__ import annotations

import socket


def free_port(*, udp_too: bool = False) -> int:
    """A TCP port on 127.0.0.1 that is free now (and, with ``udp_too``, free for UDP)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if not udp_too:
            return port
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                u.bind(("127.0.0.1", port))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port found on 127.0.0.1")
