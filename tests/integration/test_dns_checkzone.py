"""Every zone atlasd produces passes BIND's ``named-checkzone`` and holds only SRV records
for the valid clusters, whatever the cluster Services around them try to inject.

Inputs are Kubernetes Service objects as an operator (or an attacker with create rights on
Services) would write them; they go through reconcile's validation — which skips the bad
ones with a Problem — and the zone is rendered from what is left. The malformed matrix of
the reconcile tests is reused, plus DNS-specific attempts (zone-file syntax in names,
groups and port names).
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import dns.rdatatype
import dns.zone
import pytest

from atlasd import labels
from atlasd.dns.zone import render_zone
from atlasd.fleet.validate import validate_all
from atlasd.model import Fleet, Settings
from tests.harness import components
from tests.unit.fleet.test_validate import MALFORMED
from tests.unit.reconcile.builders import cluster_service

pytestmark = pytest.mark.integration

SETTINGS = Settings(namespace="monitoring")
INJECT = "evil 60 IN A 192.0.2.66"
GOOD = [
    cluster_service("east", "203.0.113.10"),
    cluster_service("west", "203.0.113.11", replicas="2", annotations={
        labels.DNS_GROUP_ANNOTATION: "prod"}),
]  # fmt: skip


def _grp(value: str) -> dict[str, Any]:
    return cluster_service("bad", "203.0.113.99", annotations={labels.DNS_GROUP_ANNOTATION: value})


def _port(name: str) -> dict[str, Any]:
    return cluster_service("bad", "203.0.113.99", ports=[{"name": name, "port": 10901}])


DNS_HOSTILE: list[tuple[str, dict[str, Any]]] = [
    ("group-newline-record", _grp(f"prod\n{INJECT}")),
    ("group-dollar-include", _grp("$INCLUDE /etc/passwd")),
    ("group-semicolon", _grp("prod;x")),
    ("group-dot", _grp("prod.evil")),
    ("group-at", _grp("@")),
    ("group-star", _grp("*")),
    ("group-paren", _grp("prod(")),
    ("group-space", _grp("prod evil")),
    ("group-empty", _grp("")),
    ("group-underscore", _grp("_thanos")),
    ("group-backslash", _grp("prod\\010evil")),
    ("group-unicode", _grp("pr\u043ed")),
    ("group-too-long", _grp("g" * 64)),
    ("port-name-newline", _port(f"thanos\n{INJECT}")),
    ("port-name-dot", _port("thanos.evil")),
    ("port-name-underscore", _port("_thanos")),
    ("port-name-space", _port("thanos evil")),
    ("name-newline", cluster_service(f"bad\n{INJECT}", "203.0.113.99")),
    ("name-dot", cluster_service("bad.evil", "203.0.113.99")),
    ("name-dollar", cluster_service("$ORIGIN", "203.0.113.99")),
]

CASES = [(f"reconcile-{m[0]}", m[1]) for m in MALFORMED] + DNS_HOSTILE


def checkzone(path: Path, *, integrity: str = "local") -> str:
    """Run named-checkzone; ``integrity`` "local" skips the out-of-zone address lookups.

    In the default mode ("full") it resolves every SRV target through the machine's
    resolver (they are cluster-local names, so here each lookup times out, 5 s apiece)
    and only warns when they do not resolve; every other check is the same.
    """
    binary = components.apt("named-checkzone")
    proc = subprocess.run(
        [str(binary), "-i", integrity, "atlas.", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.rstrip().endswith("OK"), proc.stdout
    return proc.stdout


def assert_only_expected_records(text: str, fleet: Fleet) -> None:
    """SOA + NS at the apex, and SRV records naming sidecars of the fleet; nothing else."""
    zone = dns.zone.from_text(text, origin="atlas.", relativize=False)
    wanted_targets = {
        f"{svc}.monitoring.svc.cluster.local."
        for c in fleet.clusters.values()
        for svc in c.sidecar_services()
    }
    owner_re = re.compile(r"_[a-z0-9-]+\._tcp\.(?:[a-z0-9-]+\.)?sidecars\.thanos\.atlas\.")
    for name, node in zone.nodes.items():
        owner = name.to_text()
        for rdataset in node.rdatasets:
            kind = dns.rdatatype.to_text(rdataset.rdtype)
            if owner == "atlas.":
                assert kind in ("SOA", "NS"), (owner, kind)
                continue
            assert kind == "SRV", (owner, kind)
            assert owner_re.fullmatch(owner), owner
            for rd in rdataset:
                assert rd.target.to_text() in wanted_targets, rd.target
    assert "evil" not in text and "192.0.2.66" not in text and "$INCLUDE" not in text


@pytest.mark.parametrize("bad", [c[1] for c in CASES], ids=[c[0] for c in CASES])
def test_zone_with_hostile_neighbour_passes_checkzone(bad: dict[str, Any], tmp_path: Path) -> None:
    clusters, problems = validate_all([*GOOD, bad], SETTINGS)
    # The hostile Service is rejected (reported as a Problem); the good clusters stay.
    assert [c.name for c in clusters] == ["east", "west"], [str(p) for p in problems]
    assert problems
    fleet = Fleet.of(SETTINGS, clusters)
    text = render_zone(fleet, serial=1_764_000_000)
    path = tmp_path / "atlas.zone"
    path.write_text(text)
    checkzone(path)
    assert_only_expected_records(text, fleet)
    assert text.count(" IN SRV ") == 3 * (1 + 2 + 2)  # 3 ports; east 1, west 2 (+ prod group)


@pytest.mark.parametrize("n", [0, 1, 250])
def test_fleets_of_every_size_pass_checkzone(n: int, tmp_path: Path) -> None:
    services = [
        cluster_service(
            f"c{i}",
            f"198.51.{i // 250}.{i % 250 + 1}",
            replicas=str(1 + i % 3),
            annotations={labels.DNS_GROUP_ANNOTATION: f"g{i % 5}"} if i % 2 else None,
        )
        for i in range(n)
    ]
    clusters, problems = validate_all(services, SETTINGS)
    assert not problems and len(clusters) == n
    fleet = Fleet.of(SETTINGS, clusters)
    path = tmp_path / "atlas.zone"
    path.write_text(render_zone(fleet, serial=4_000_000_000))
    out = checkzone(path)
    assert "loaded serial 4000000000" in out
    assert_only_expected_records(path.read_text(), fleet)


def test_default_checkzone_mode_too(tmp_path: Path) -> None:
    """``named-checkzone atlas. <file>`` as an operator would run it (full integrity)."""
    clusters, _ = validate_all([GOOD[0]], SETTINGS)
    path = tmp_path / "atlas.zone"
    path.write_text(render_zone(Fleet.of(SETTINGS, clusters), serial=7))
    out = checkzone(path, integrity="full")
    assert "loaded serial 7" in out
