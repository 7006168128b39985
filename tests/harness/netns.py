"""A network namespace standing for a downstream cluster's host, joined to this host by a
veth pair on TEST-NET addresses (no packet leaves the machine; needs root and iproute2).

The API server refuses a loopback external IP, so tests that run a downstream Envoy behind
a cluster Service run it (and its Prometheus) in one of these: the namespace's end has the
cluster's external IP, this host's end the address the observability side listens on. The
namespace routes everything through this host's end, so it also reaches this host's other
addresses (another namespace's host end: the observability Envoy listens on all of them).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.harness.envoy import Envoy
from tests.harness.prom import WebProc, prometheus


def require_namespaces(why: str) -> None:
    """Skip the calling test unless this process may make namespaces (root and unshare(1)):
    the test needs ``why``. The only skip of the suite's namespace tests; CI runs as root."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip(f"needs root and unshare(1): {why}")


class DownstreamHost:
    """One namespace: ``ns_ip`` inside, ``host_ip`` on this host's end (one /30)."""

    def __init__(self, *, host_ip: str, ns_ip: str, reach: Sequence[str] = ()) -> None:
        self.host_ip, self.ns_ip = host_ip, ns_ip
        tag = uuid.uuid4().hex[:6]
        self.ns = f"atlasd-ds-{tag}"
        host_if, ns_if = f"atd{tag}h", f"atd{tag}n"
        for cmd in (
            ["ip", "netns", "add", self.ns],
            ["ip", "-n", self.ns, "link", "set", "lo", "up"],
            ["ip", "link", "add", host_if, "type", "veth", "peer", "name", ns_if, "netns", self.ns],
            ["ip", "addr", "add", f"{host_ip}/30", "dev", host_if],
            ["ip", "link", "set", host_if, "up"],
            ["ip", "-n", self.ns, "addr", "add", f"{ns_ip}/30", "dev", ns_if],
            ["ip", "-n", self.ns, "link", "set", ns_if, "up"],
            *(["ip", "-n", self.ns, "route", "add", addr, "via", host_ip] for addr in reach),
        ):
            subprocess.run(cmd, check=True, capture_output=True)

    def inside(self, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.ns, *argv]

    def envoy(self, bootstrap: dict[str, Any], name: str, workdir: Path) -> Envoy:
        envoy = Envoy(bootstrap, name, workdir=workdir)
        # Its admin listener where the test can reach it, in the namespace.
        envoy.bootstrap["admin"] = {
            "address": {"socket_address": {"address": self.ns_ip, "port_value": 0}}
        }
        envoy.config_path.write_text(yaml.safe_dump(envoy.bootstrap))
        envoy.proc.argv = self.inside(envoy.proc.argv)
        return envoy

    def prometheus(self, workdir: Path) -> WebProc:
        prom = prometheus("global:\n  scrape_interval: 15s\n", workdir=workdir)
        prom.proc.argv = self.inside(
            [a.replace("--web.listen-address=127.0.0.1:", "--web.listen-address=0.0.0.0:")
             for a in prom.proc.argv]
        )  # fmt: skip
        prom.url = f"http://{self.ns_ip}:{prom.port}"
        return prom

    def remove(self) -> None:
        subprocess.run(["ip", "netns", "del", self.ns], check=False, capture_output=True)


@contextlib.contextmanager
def downstream_host(
    *, host_ip: str, ns_ip: str, reach: Sequence[str] = ()
) -> Iterator[DownstreamHost]:
    """A ``DownstreamHost``, removed on exit."""
    if subprocess.run(["ip", "netns", "list"], capture_output=True).returncode != 0:
        raise RuntimeError("this test needs root and iproute2 (ip netns)")
    host = DownstreamHost(host_ip=host_ip, ns_ip=ns_ip, reach=reach)
    try:
        yield host
    finally:
        host.remove()
