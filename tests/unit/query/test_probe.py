"""The hop a probe's answer stopped at (atlasd.query.probe.classify): pure, from what the
real Envoys answer (tests/integration/test_query_probe.py shows each against them)."""

from __future__ import annotations

import struct

import httpx
import pytest

from atlasd.query.probe import HOPS, Finding, classify, classify_prometheus, info_request_body
from atlasd.thanospb.thanos import Label, ZLabelSet
from atlasd.thanospb.thanos.info import InfoResponse

UNREACHABLE = (
    "upstream connect error or disconnect/reset before headers. reset reason: remote "
    "connection failure"
)
TLS = (
    "upstream connect error or disconnect/reset before headers. reset reason: connection "
    "failure, transport failure reason: TLS_error:|268435581:SSL routines:"
    "OPENSSL_internal:CERTIFICATE_VERIFY_FAILED:TLS_error_end"
)


def answer(headers: dict[str, str], body: bytes = b"", *, seconds: float = 0.01) -> Finding:
    return classify(
        "east",
        status=200,
        headers=httpx.Headers({"content-type": "application/grpc", **headers}),
        body=body,
        seconds=seconds,
        slow_after=2,
    )


def info_frame(cluster: str) -> bytes:
    msg = bytes(InfoResponse(label_sets=[ZLabelSet(labels=[Label("cluster", cluster)])]))
    return struct.pack(">BI", 0, len(msg)) + msg


def test_an_answer_is_ok_with_its_labels_or_slow() -> None:
    ok = answer({"x-atlas-cluster": "east"}, info_frame("east"))
    assert (ok.hop, ok.labels, ok.ok, ok.fix) == ("ok", ({"cluster": "east"},), True, "")
    assert answer({}, info_frame("east"), seconds=3).hop == "slow"


@pytest.mark.parametrize(
    ("headers", "hop"),
    [
        # The observability Envoy's own replies (no x-atlas-cluster).
        ({"grpc-status": "12"}, "no-route"),
        ({"grpc-status": "14", "grpc-message": UNREACHABLE}, "cluster-unreachable"),
        ({"grpc-status": "14", "grpc-message": TLS}, "tls-refused"),
        ({"grpc-status": "4", "grpc-message": "upstream request timeout"}, "cluster-unreachable"),
        # Passed on from the downstream Envoy: its sidecar is the broken hop.
        ({"grpc-status": "14", "grpc-message": UNREACHABLE, "x-atlas-cluster": "east"}, "upstream-down"),
        ({"grpc-status": "14", "grpc-message": UNREACHABLE, "x-envoy-upstream-service-time": "1"}, "upstream-down"),
        # Another cluster's Envoy answered: misrouted, whatever it said.
        ({"x-atlas-cluster": "west"}, "error"),
        ({"grpc-status": "13", "grpc-message": "boom"}, "error"),
    ],
)  # fmt: skip
def test_each_failure_names_its_hop_and_says_what_to_do(headers: dict[str, str], hop: str) -> None:
    f = answer(headers)
    assert f.hop == hop, f
    assert f.hop in HOPS
    assert not f.ok
    if hop != "error":
        assert f.fix
    if "grpc-message" in headers:
        assert headers["grpc-message"][:40] in f.detail


def test_an_http_404_is_no_route_and_an_unparsable_answer_is_an_error() -> None:
    f = classify("east", status=404, headers=httpx.Headers(), body=b"", seconds=0, slow_after=2)
    assert f.hop == "no-route"
    bad = answer({}, struct.pack(">BI", 0, 30) + b"\x0a\x02")  # cut short
    assert bad.hop == "error" and "not understood" in bad.detail


def test_the_request_is_one_uncompressed_grpc_frame() -> None:
    body = info_request_body()
    assert body[0] == 0 and struct.unpack(">I", body[1:5])[0] == len(body) - 5


def prom(status: int, headers: dict[str, str], body: bytes = b"") -> Finding:
    return classify_prometheus(
        "east", status=status, headers=httpx.Headers(headers), body=body, seconds=0.01,
        slow_after=2,
    )  # fmt: skip


def test_the_prometheus_path_names_its_hops() -> None:
    ok = prom(200, {"x-atlas-cluster": "east"}, b"Prometheus Server is Ready.")
    assert (ok.hop, ok.via) == ("ok", "prometheus")
    assert prom(404, {}, b"").hop == "no-route"  # the observability Envoy has no /prom/east/
    # Prometheus itself answering 404 came through the chain: not a missing route.
    assert prom(404, {"x-atlas-cluster": "east"}, b"404 page not found").hop == "error"
    assert prom(503, {}, UNREACHABLE.encode()).hop == "cluster-unreachable"
    assert prom(503, {"x-atlas-cluster": "east"}, UNREACHABLE.encode()).hop == "upstream-down"
    assert prom(200, {"x-atlas-cluster": "west"}).hop == "error"  # misrouted
