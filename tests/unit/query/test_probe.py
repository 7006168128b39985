"""The hop a probe's answer stopped at (atlasd.query.probe.classify): pure, from what the
real Envoys answer (tests/integration/test_query_probe.py shows each against them)."""

from __future__ import annotations

import ssl
import struct

import httpx2
import pytest

from atlasd.labels import UPSTREAM_FAILURE_HEADER
from atlasd.model import CertKey
from atlasd.query.peer import tls_refusal
from atlasd.query.probe import (
    HOPS,
    Finding,
    classify,
    classify_alertmanager,
    classify_prometheus,
    info_request_body,
    known_alertmanagers,
    probe_alertmanager,
    transport_failure,
)
from atlasd.thanospb.thanos import Label, ZLabelSet
from atlasd.thanospb.thanos.info import InfoResponse
from tests.unit.xds import helpers

UNREACHABLE = (
    "upstream connect error or disconnect/reset before headers. reset reason: remote "
    "connection failure"
)
# The observability Envoy's (1.40) transport failure reasons, as its replies carry them
# (labels.UPSTREAM_FAILURE_HEADER), each taken from a real handshake: a downstream with a
# certificate of another CA, one whose certificate names another cluster, one refusing
# the observability Envoy's certificate, and no listener at all.
OTHER_CA = (
    "TLS_error:|268435581:SSL_routines:OPENSSL_internal:CERTIFICATE_VERIFY_FAILED:"
    "verify_cert_failed:_X509_verify_cert:_certificate_verification_error_at_depth_0:"
    "_unable_to_get_local_issuer_certificate:TLS_error_end"
)
OTHER_NAME = (
    "TLS_error:|268435581:SSL_routines:OPENSSL_internal:CERTIFICATE_VERIFY_FAILED:"
    "verify_cert_failed:_SAN_matcher,_certificate_SANs_are_[west,_west.monitoring.atlas]:"
    "TLS_error_end"
)
# The format above with BoringSSL's text for X509_V_ERR_CERT_REVOKED (a certificate
# listed in the cluster's CRL after ``atlasd cluster revoke``).
REVOKED = (
    "TLS_error:|268435581:SSL_routines:OPENSSL_internal:CERTIFICATE_VERIFY_FAILED:"
    "verify_cert_failed:_X509_verify_cert:_certificate_verification_error_at_depth_0:"
    "_certificate_revoked:TLS_error_end"
)
REFUSED_OURS = (
    "TLS_error:|268436504:SSL_routines:OPENSSL_internal:TLSV1_ALERT_UNKNOWN_CA:TLS_error_end"
)
CONNECTION_REFUSED = "delayed_connect_error:_Connection_refused"


def answer(headers: dict[str, str], body: bytes = b"", *, seconds: float = 0.01) -> Finding:
    return classify(
        "east",
        status=200,
        headers=httpx2.Headers({"content-type": "application/grpc", **headers}),
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
        ({"grpc-status": "14", "grpc-message": UNREACHABLE, "x-atlas-upstream-failure": OTHER_CA}, "tls-refused"),
        ({"grpc-status": "14", "grpc-message": UNREACHABLE, "x-atlas-upstream-failure": REFUSED_OURS}, "tls-refused"),
        ({"grpc-status": "14", "grpc-message": UNREACHABLE, "x-atlas-upstream-failure": CONNECTION_REFUSED}, "cluster-unreachable"),
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


@pytest.mark.parametrize(
    ("reason", "says", "refused"),
    [
        (OTHER_CA, "the downstream Envoy presents a certificate of another CA", "downstream"),
        (REVOKED, "the downstream Envoy presents a revoked certificate", "downstream"),
        (OTHER_NAME, "presents a certificate that does not name 'east' (it names: west, "
                     "west.monitoring.atlas)", "downstream"),
        (REFUSED_OURS, "the downstream Envoy refused the observability Envoy's certificate "
                       "(TLS alert 'unknown ca')", "observability"),
        ("TLS_error:|268435703:SSL_routines:OPENSSL_internal:WRONG_VERSION_NUMBER:TLS_error_end",
         "the TLS handshake with the downstream Envoy failed [WRONG VERSION NUMBER]", ""),
    ],
)  # fmt: skip
def test_a_refused_handshake_says_which_side_refused_which_certificate(
    reason: str, says: str, refused: str
) -> None:
    for f in (
        answer({"grpc-status": "14", "grpc-message": UNREACHABLE, UPSTREAM_FAILURE_HEADER: reason}),
        prom(503, {UPSTREAM_FAILURE_HEADER: reason}, UNREACHABLE.encode()),
    ):
        assert (f.hop, f.refused) == ("tls-refused", refused), f
        assert says in f.detail, f.detail
        assert UNREACHABLE in f.detail  # what Envoy said is kept
    assert transport_failure("east", CONNECTION_REFUSED) == (
        "cluster-unreachable",
        "delayed connect error: Connection refused",
        "",
    )


def test_a_failure_reason_passed_on_from_downstream_is_not_the_observability_envoys() -> None:
    # The downstream Envoy answered (its sidecar is down): the header, whoever set it, does
    # not make the observability Envoy's connection the broken hop.
    f = answer(
        {"grpc-status": "14", "grpc-message": UNREACHABLE, "x-atlas-cluster": "east",
         UPSTREAM_FAILURE_HEADER: CONNECTION_REFUSED}
    )  # fmt: skip
    assert f.hop == "upstream-down", f


def test_an_http_404_is_no_route_and_an_unparsable_answer_is_an_error() -> None:
    f = classify("east", status=404, headers=httpx2.Headers(), body=b"", seconds=0, slow_after=2)
    assert f.hop == "no-route"
    bad = answer({}, struct.pack(">BI", 0, 30) + b"\x0a\x02")  # cut short
    assert bad.hop == "error" and "not understood" in bad.detail


def test_the_request_is_one_uncompressed_grpc_frame() -> None:
    body = info_request_body()
    assert body[0] == 0 and struct.unpack(">I", body[1:5])[0] == len(body) - 5


def prom(status: int, headers: dict[str, str], body: bytes = b"") -> Finding:
    return classify_prometheus(
        "east", status=status, headers=httpx2.Headers(headers), body=body, seconds=0.01,
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


def am(status: int, headers: dict[str, str], body: bytes = b"", seconds: float = 0.01) -> Finding:
    return classify_alertmanager(
        "east", status=status, headers=httpx2.Headers(headers), body=body, seconds=seconds,
        slow_after=2, via="alertmanager1",
    )  # fmt: skip


UPSTREAM_TIME = {"x-envoy-upstream-service-time": "1"}  # Envoy: the Alertmanager answered


@pytest.mark.parametrize(
    ("status", "headers", "body", "hop", "says"),
    [
        (200, UPSTREAM_TIME, b"OK", "ok", ""),
        (503, UPSTREAM_TIME, b"Alertmanager is not ready", "upstream-down", "answered, not ready"),
        (403, {}, b"RBAC: access denied", "no-route", "does not take alerts from 'east' (not a "
         "cluster atlasd serves now), or has no alertmanager1 (HTTP 403: RBAC: access denied)"),
        (503, {}, UNREACHABLE.encode(), "upstream-down", "could not reach the Alertmanager"),
        (500, {}, b"boom", "error", "HTTP 500: boom"),
    ],
)  # fmt: skip
def test_the_alertmanager_route_names_its_hops(
    status: int, headers: dict[str, str], body: bytes, hop: str, says: str
) -> None:
    f = am(status, headers, body)
    assert (f.hop, f.via, f.path) == (hop, "alertmanager1", "alertmanager")
    assert says in f.detail
    if hop not in ("ok", "error"):
        # Its own advice: the cluster calls in, the Alertmanager is the last hop.
        assert f.fix and f.fix != Finding("east", hop).fix
    assert am(200, UPSTREAM_TIME, b"OK", seconds=3).hop == "slow"


def test_a_refused_handshake_of_our_own_says_which_side_refused() -> None:
    verify = ssl.SSLCertVerificationError(1, "certificate verify failed")
    verify.verify_message = "unable to get local issuer certificate"
    alert = ssl.SSLError(1, "tlsv1 alert unknown ca")
    alert.reason = "TLSV1_ALERT_UNKNOWN_CA"

    def wrapped(inner: BaseException) -> httpx2.ConnectError:
        try:
            try:
                raise inner
            except ssl.SSLError as exc:
                raise httpx2.ConnectError(str(exc)) from exc
        except httpx2.ConnectError as outer:
            return outer

    theirs = tls_refusal(wrapped(verify), peer="the observability Envoy")
    assert theirs is not None and "does not verify (unable to get local issuer" in theirs[0]
    assert theirs[1] == "observability"
    ours = tls_refusal(wrapped(alert), peer="the observability Envoy")
    assert ours == (
        "the observability Envoy refused the certificate presented to it (TLS alert 'unknown ca')",
        "downstream",
    )
    assert tls_refusal(httpx2.ConnectError("[Errno 111] Connection refused"), peer="x") is None


def test_a_refusal_where_another_alertmanager_let_the_cluster_in_is_a_missing_one() -> None:
    refused = Finding(
        "east", "no-route", "... or has no alertmanager2 (HTTP 403: RBAC)", via="alertmanager2"
    )
    thanos = Finding("east", "cluster-unreachable")
    # Nothing let east in: either reason stands.
    assert known_alertmanagers([thanos, refused]) == [thanos, refused]
    up = Finding("east", "upstream-down", via="alertmanager0")
    assert [f.detail for f in known_alertmanagers([thanos, up, refused])][2] == (
        "the observability Envoy has no alertmanager2 (HTTP 403: RBAC)"
    )


async def test_an_identity_that_does_not_load_is_an_error_naming_no_key() -> None:
    secret = (
        b"-----BEGIN PRIVATE KEY-----\nc2VjcmV0LWtleS1tYXRlcmlhbA==\n-----END PRIVATE KEY-----\n"
    )
    ca = helpers.make_ca()
    f = await probe_alertmanager(
        "east", address="127.0.0.1:1", index=0, namespace="monitoring", domain="cluster.local",
        identity=CertKey(ca.bundle, secret), trust=ca.bundle,
    )  # fmt: skip
    assert (f.hop, f.via) == ("error", "alertmanager0"), f
    assert "does not load" in f.detail
    assert b"c2VjcmV0" not in f.detail.encode() and "PRIVATE" not in f.detail
