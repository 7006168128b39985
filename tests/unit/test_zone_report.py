"""The zone in /status and the metrics: an SRV answer past one DNS message is reported
(status, metric, one log line per crossing), and stops being once it fits."""

from __future__ import annotations

import logging

import pytest
from prometheus_client import REGISTRY

from atlasd.dns.answer import Answer
from atlasd.dns.writer import Zone
from atlasd.hub import StatusHub
from atlasd.subsystems import ZoneReport

ALL = "_thanos._tcp.sidecars.thanos.atlas."
PROD = "_thanos._tcp.prod.sidecars.thanos.atlas."


def _zone(serial: int, *answers: Answer) -> Zone:
    return Zone({}, serial, "", sum(a.records for a in answers), answers)


def _bytes(name: str) -> float | None:
    return REGISTRY.get_sample_value("atlasd_dns_srv_answer_bytes", {"name": name})


def test_an_answer_too_large_is_reported_once_and_cleared(
    caplog: pytest.LogCaptureFixture,
) -> None:
    hub = StatusHub()
    report = ZoneReport(hub)
    big, small = Answer(ALL, 1000, 70_052), Answer(PROD, 10, 753)
    with caplog.at_level(logging.ERROR, logger="atlasd.subsystems"):
        report.update(_zone(1, small))
        assert hub.snapshot()["zone"]["too_large"] == []
        for serial in (2, 3):  # still too large: logged once
            report.update(_zone(serial, big, small))
    assert hub.snapshot()["zone"] == {
        "serial": 3,
        "records": 1010,
        "too_large": [{"name": ALL, "records": 1000, "bytes": 70_052}],
    }
    assert caplog.text.count("more than one DNS message") == 1
    assert (_bytes(ALL), _bytes(PROD)) == (70_052, 753)
    report.update(_zone(4, Answer(ALL, 900, 63_052)))
    assert hub.snapshot()["zone"]["too_large"] == []
    assert (_bytes(ALL), _bytes(PROD)) == (63_052, None), "a name gone drops its series"
