"""The CoreDNS half of the atlasd pod, run for real from what the chart renders.

The chart's Corefile (charts/atlasd/files/Corefile, owned by the DNS module) is rendered
by helm, given the environment the chart gives the coredns
container (DNS_PORT, ZONE_FILE) and run by the real CoreDNS against a zone atlasd's
own renderer wrote: Thanos Query's SRV lookup must answer, and a rewritten zone must
be picked up without a restart (the emptyDir is shared, CoreDNS reloads).

The one test-only change: a `bind 127.0.0.1` line in each server block, since tests
keep network traffic on loopback.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dns.exception
import dns.message
import dns.query
import dns.rdatatype
import pytest
import yaml

from atlasd.dns.zone import render_zone
from atlasd.model import DownstreamCluster, Fleet, ServicePort, Settings
from tests.harness import components
from tests.harness.net import free_port
from tests.harness.procs import Proc
from tests.harness.wait import wait_until

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
ATLASD_CHART = ROOT / "charts" / "atlasd"
SRV_NAME = "_thanos._tcp.sidecars.thanos.atlas."
SETTINGS = Settings(namespace="monitoring")


def _fleet(*names: str) -> Fleet:
    clusters = tuple(
        DownstreamCluster(
            name=n,
            external_ip="203.0.113.1",
            ports=(ServicePort("thanos", 10901), ServicePort("prometheus", 9090)),
        )
        for n in names
    )
    return Fleet.of(SETTINGS, clusters)


def _srv(port: int, name: str, *, tcp: bool = False) -> list[str]:
    q = dns.message.make_query(name, dns.rdatatype.SRV)
    send = dns.query.tcp if tcp else dns.query.udp
    resp = send(q, "127.0.0.1", port=port, timeout=2)
    return sorted(rd.to_text() for rrset in resp.answer for rd in rrset)


def _loopback_only(corefile: str) -> str:
    """Add `bind 127.0.0.1` at the top of every server block (test-only)."""
    return re.sub(r"^(\S[^\n]*\{)[ \t]*$", r"\1\n    bind 127.0.0.1", corefile, flags=re.M)


def test_chart_corefile_serves_the_zone_atlasd_writes(
    helm: Callable[..., str], tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    docs: list[dict[str, Any]] = [
        d
        for d in yaml.safe_load_all(
            helm("template", "atlasd", str(ATLASD_CHART), "-n", "monitoring")
        )
        if d
    ]
    [deploy] = [d for d in docs if d["kind"] == "Deployment"]
    [cm] = [d for d in docs if d["kind"] == "ConfigMap" and "Corefile" in d["data"]]
    [coredns] = [
        c for c in deploy["spec"]["template"]["spec"]["containers"] if c["name"] == "coredns"
    ]
    env = {e["name"]: e["value"] for e in coredns["env"]}

    # Map the pod's paths onto the test's directory: /zone -> tmp/zone, /etc/coredns -> tmp/etc.
    zone_dir = tmp_path / "zone"
    zone_dir.mkdir()
    zone_file = zone_dir / Path(env["ZONE_FILE"]).name
    zone_file.write_text(render_zone(_fleet("east"), serial=1))
    conf_dir = tmp_path / "etc"
    conf_dir.mkdir()
    corefile = conf_dir / "Corefile"
    # A Corefile may name the zone by {$ZONE_FILE} or by its path in the pod.
    text = cm["data"]["Corefile"].replace(env["ZONE_FILE"], str(zone_file))
    corefile.write_text(_loopback_only(text))

    port = free_port(udp_too=True)
    args = [a if a != env["DNS_PORT"] else str(port) for a in coredns["args"]]
    args = [str(corefile) if a.endswith("/Corefile") else a for a in args]
    proc = Proc(
        "chart-coredns",
        [str(components.coredns()), *args],
        log_dir=tmp_path,
        env={"DNS_PORT": str(port), "ZONE_FILE": str(zone_file)},
    )
    proc.start()
    request.addfinalizer(proc.stop)

    def answers(want: int) -> bool:
        proc.check_running()
        try:
            return len(_srv(port, SRV_NAME)) == want
        except (dns.exception.Timeout, OSError):
            return False

    wait_until(lambda: answers(1), timeout=30, what="CoreDNS answering the sidecar SRV")
    assert _srv(port, SRV_NAME) == [
        "10 100 10901 east-thanos-sidecar0.monitoring.svc.cluster.local."
    ]
    assert len(_srv(port, SRV_NAME, tcp=True)) == 1, "DNS over TCP too (the Service's dns-tcp)"

    # atlasd rewrites the zone (atomic rename, larger serial): served without a restart.
    new = zone_dir / ".atlas.zone.tmp"
    new.write_text(render_zone(_fleet("east", "west"), serial=2))
    new.replace(zone_file)
    wait_until(lambda: answers(2), timeout=60, what="CoreDNS reloading the rewritten zone")
