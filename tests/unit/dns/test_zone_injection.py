"""Hostile values built straight into the model: rendering raises and emits nothing.

The model is supposed to be validated before it reaches ``atlasd.dns``; these cases
bypass validation on purpose (frozen dataclasses accept anything) to prove the zone
renderer is a second wall, not a formatter that trusts its input.
"""

from __future__ import annotations

import dataclasses

import pytest

from atlasd.dns.zone import InvalidZoneInput, ZoneError, records, render_zone
from atlasd.model import DownstreamCluster, Fleet, ServicePort, Settings

GOOD = DownstreamCluster(
    name="east", external_ip="192.0.2.10", ports=(ServicePort("thanos", 10901),)
)

HOSTILE_LABELS = [
    "",
    "east\nevil 60 IN A 192.0.2.66",
    "east\r\nevil",
    "east.evil",
    "east evil",
    "east\tevil",
    "east;comment",
    "east(",
    "east)",
    '"east"',
    "$INCLUDE",
    "@",
    "*",
    "-east",
    "east-",
    "East",
    "east\\046evil",
    "e\x00st",
    "ea\u0455t",  # Cyrillic dze: looks like "east"
    "east/../evil",
    "a" * 64,
    "_thanos",
]


def fleet(c: DownstreamCluster, settings: Settings | None = None) -> Fleet:
    return Fleet.of(settings or Settings(), (c,))


def _cases() -> list[tuple[str, Fleet]]:
    out: list[tuple[str, Fleet]] = []
    for bad in HOSTILE_LABELS:
        out.append((f"name={bad!r}", fleet(dataclasses.replace(GOOD, name=bad))))
        out.append((f"group={bad!r}", fleet(dataclasses.replace(GOOD, dns_group=bad))))
        out.append(
            (
                f"port name={bad!r}",
                fleet(dataclasses.replace(GOOD, ports=(ServicePort(bad, 10901),))),
            )
        )
        out.append((f"namespace={bad!r}", fleet(GOOD, Settings(namespace=bad))))
    for bad_domain in ["", "cluster.local.", ".cluster.local", "cluster..local",
                       "cluster.local\nevil 60 IN A 192.0.2.66", "cluster.local;x",
                       "a" * 64 + ".local", ".".join(["abc"] * 80)]:  # fmt: skip
        out.append(
            (f"cluster_domain={bad_domain!r}", fleet(GOOD, Settings(cluster_domain=bad_domain)))
        )
    for bad_port in [0, -1, 65536, True, "10901", "10901 evil", 10901.0, None]:
        out.append(
            (
                f"port={bad_port!r}",
                fleet(dataclasses.replace(GOOD, ports=(ServicePort("thanos", bad_port),))),  # type: ignore[arg-type]
            )
        )
    for bad_proto in ["tcp", "TCP\nevil", "HTTP", ""]:
        out.append(
            (
                f"protocol={bad_proto!r}",
                fleet(dataclasses.replace(GOOD, ports=(ServicePort("thanos", 1, bad_proto),))),
            )
        )
    for bad_replicas in [-1, True, "2", 1.5, None]:
        out.append(
            (f"replicas={bad_replicas!r}", fleet(dataclasses.replace(GOOD, replicas=bad_replicas)))  # type: ignore[arg-type]
        )
    for odd in (["thanos"], None, 7):
        out.append(
            (
                f"port name of type {type(odd).__name__}",
                fleet(dataclasses.replace(GOOD, ports=(ServicePort(odd, 10901),))),  # type: ignore[arg-type]
            )
        )
        out.append(
            (
                f"protocol of type {type(odd).__name__}",
                fleet(dataclasses.replace(GOOD, ports=(ServicePort("thanos", 1, odd),))),  # type: ignore[arg-type]
            )
        )
    # A name that is a label by itself but whose sidecar Service name is too long.
    out.append(("sidecar name too long", fleet(dataclasses.replace(GOOD, name="a" * 60))))
    out.append(("port not a ServicePort", fleet(dataclasses.replace(GOOD, ports=("thanos",)))))  # type: ignore[arg-type]
    out.append(("ports not a tuple", fleet(dataclasses.replace(GOOD, ports="thanos"))))  # type: ignore[arg-type]
    return out


CASES = _cases()


@pytest.mark.parametrize("fl", [c[1] for c in CASES], ids=[c[0] for c in CASES])
def test_hostile_input_raises(fl: Fleet) -> None:
    with pytest.raises(InvalidZoneInput):
        render_zone(fl, serial=1)
    with pytest.raises(InvalidZoneInput):
        records(fl)


def test_one_bad_cluster_fails_the_whole_render() -> None:
    # The renderer does not silently drop: skipping is the validator's job (with an
    # Event); a bad value this deep means a bug, and no zone beats a wrong zone.
    bad = dataclasses.replace(GOOD, name="evil\n@ 60 IN A 192.0.2.66")
    fl = Fleet.of(Settings(), (GOOD, bad))
    with pytest.raises(ZoneError):
        render_zone(fl, serial=1)


def test_good_values_still_render() -> None:
    assert "east-thanos-sidecar0" in render_zone(fleet(GOOD), serial=1)


def test_errors_are_value_errors() -> None:
    assert issubclass(InvalidZoneInput, ValueError)
