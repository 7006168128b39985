"""Which hop is broken: a Thanos StoreAPI ``Info`` call along the path Thanos Query uses.

::

    atlasd probe ──h2c, authority <c>-thanos-sidecar<i>.<ns>.svc.<domain>──> observability
      Envoy (Thanos listener, scoped by authority) ──mTLS──> downstream Envoy (external IP)
      ──> Thanos sidecar

The call is made as Thanos Query makes it (gRPC over cleartext HTTP/2 to the sidecar
Service's address, which selects the observability Envoy), and what comes back says
where it stopped. Envoy answers a request it cannot route or forward itself with a
"local reply" (a ``grpc-status`` and a ``grpc-message`` naming the reason); every answer
that passed through the downstream Envoy carries ``x-atlas-cluster: <cluster>``
(``labels.CLUSTER_HEADER``, set by atlasd's configuration of that Envoy), its own local
replies included, so the two Envoys' replies are told apart. The observability Envoy's
own reply to a call whose connection to the downstream Envoy failed carries the
transport's failure reason (``labels.UPSTREAM_FAILURE_HEADER``; Envoy leaves it out of
the reply's text): a refused TCP connection and a refused TLS handshake, and which side
refused it, are told apart by it, with no connection of the probe's own to the cluster:

=====================  ==============================================================
hop                    seen as
=====================  ==============================================================
``ok``                 ``Info`` answered (its external labels are reported)
``slow``               answered, but after ``slow_after`` seconds
``envoy-unreachable``  no TCP connection to the observability Envoy's Thanos listener
``no-route``           the observability Envoy has no route for the authority (404 /
                       ``route not found``): atlasd does not serve the cluster, or the
                       Envoy has not applied its configuration
``cluster-unreachable`` the observability Envoy could not connect to the cluster's
                       external IP (refused, reset, or no answer within its 5 s)
``tls-refused``        the TLS handshake with the downstream Envoy failed; the detail
                       says which side refused which certificate: the observability
                       Envoy refused the downstream's (another CA; names that are not
                       the cluster's, listed; expired), or the downstream refused the
                       observability Envoy's (the TLS alert it sent, e.g. unknown ca)
``upstream-down``      the downstream Envoy answered, but its sidecar did not
``timeout``            nothing at all within ``timeout`` seconds
``error``              anything else (the detail says what)
=====================  ==============================================================

``probe_prometheus`` does the same for the Prometheus path (``GET /prom/<c>/-/ready`` on
the observability Envoy's 10904, as Grafana reaches the cluster's Prometheus), with the
same hops.

``probe_alertmanager`` follows the Alertmanager route the other way, as the cluster's
alerts take it: the downstream Envoy relays its Prometheus's alerts over mTLS to the
observability Envoy's 10903, whose route ``alertmanager`` sends authority
``alertmanager<i>.<ns>.svc.<domain>`` to the i-th local Alertmanager, for callers whose
certificate names a cluster atlasd serves now (RBAC). The probe calls 10903 as that
downstream Envoy does: the cluster's client certificate, the observability Envoy's
verified against atlasd's CA and its name ``atlas``, TLS 1.2 at most (Envoy's upstream
default, so a refused client certificate fails the handshake itself), ``GET /-/ready`` by
that authority. Its hops: ``envoy-unreachable`` (no TCP to 10903), ``tls-refused``
(which side refused which certificate), ``no-route`` (403: the cluster is not one the
route takes alerts from, or there is no such Alertmanager: ``known_alertmanagers`` tells
which when another Alertmanager let the cluster in), ``upstream-down`` (the observability
Envoy could not reach the Alertmanager, or it is not ready), ``ok``/``slow``.

Uses Thanos's own Info protobuf (``atlasd.thanospb``, generated from ``proto/`` with
betterproto); the HTTP/2 exchange goes through ``httpx2`` (cleartext, prior knowledge), as
it gives the response headers a classification needs.
"""

from __future__ import annotations

import dataclasses
import functools
import ssl
import struct
import time
from dataclasses import dataclass, field
from typing import Protocol

import httpx2

from atlasd.labels import CLUSTER_HEADER, UPSTREAM_FAILURE_HEADER
from atlasd.model import OBSERVABILITY_NODE, CertKey
from atlasd.query.peer import DOWNSTREAM, OBSERVABILITY, client_tls, tls_refusal
from atlasd.thanospb.thanos.info import InfoRequest, InfoResponse

INFO_PATH = "/thanos.info.Info/Info"
HOPS = (
    "ok",
    "slow",
    "envoy-unreachable",
    "no-route",
    "cluster-unreachable",
    "tls-refused",
    "upstream-down",
    "timeout",
    "error",
)
_FIX = {
    "ok": "",
    "slow": "the cluster answers, slowly: its sidecar or Prometheus is loaded, or the link is",
    "envoy-unreachable": "is the observability Envoy running, and its Thanos listener "
    "(10901) reachable at that address?",
    "no-route": "atlasd status: is the cluster served, and has the observability Envoy ACKed "
    "the current configuration?",
    "cluster-unreachable": "the observability Envoy cannot reach the cluster's external IP: "
    "is its downstream Envoy running, and the IP (Service externalIPs) right and routable?",
    "tls-refused": "the downstream Envoy's certificates: install the cluster's current values "
    "(atlasd cluster values <c>) so both ends share atlasd's CA",
    "upstream-down": "the downstream Envoy is up; its upstream (the Thanos sidecar, or "
    "Prometheus for the prometheus path) is not answering",
    "timeout": "nothing answered in time: a firewall dropping packets on the path?",
    "error": "",
}


THANOS = "thanos"  # StoreAPI Info by the sidecar's authority (Thanos Query's path)
PROMETHEUS = "prometheus"  # /prom/<c>/-/ready on the observability Envoy's 10904
ALERTMANAGER = "alertmanager"  # alertmanager<i>'s /-/ready on 10903, as <c>'s alerts go
# What to do, where it differs on the Alertmanager route (the cluster calls in).
_FIX_ALERTMANAGER = {
    "envoy-unreachable": "is the observability Envoy running, and its Alertmanager listener "
    "(10903) reachable at that address (the downstream Envoys dial ATLAS_ENVOY_ADDRESS)?",
    "no-route": "the observability Envoy takes alerts only from clusters atlasd serves now "
    "(atlasd status), to the local Alertmanagers it selects (ATLAS_ALERTMANAGER_SELECTOR)",
    "tls-refused": "the cluster's and the observability Envoy's certificates must share "
    "atlasd's CA: install the current values (atlasd cluster values <c>, and atlas)",
    "upstream-down": "the observability Envoy is up; the Alertmanager it routes to is not "
    "answering (or not ready)",
}


@dataclass(frozen=True)
class Finding:
    """What one probe found (``via``: which path was probed)."""

    cluster: str
    hop: str
    detail: str = ""
    seconds: float = 0.0
    labels: tuple[dict[str, str], ...] = field(default=())
    via: str = THANOS
    # Whose certificate a refused handshake refused: DOWNSTREAM (the observability Envoy
    # refused the downstream Envoy's) or OBSERVABILITY (the downstream refused the
    # observability Envoy's); "" when no side is known.
    refused: str = ""

    @property
    def ok(self) -> bool:
        return self.hop == "ok"

    @property
    def path(self) -> str:
        """The path probed: ``thanos``, ``prometheus`` or ``alertmanager`` (``via`` also
        numbers the Alertmanager: ``alertmanager1``)."""
        return ALERTMANAGER if self.via.startswith(ALERTMANAGER) else self.via

    @property
    def fix(self) -> str:
        if self.path == ALERTMANAGER and self.hop in _FIX_ALERTMANAGER:
            return _FIX_ALERTMANAGER[self.hop]
        return _FIX.get(self.hop, "")


def _answered_by(cluster: str, headers: httpx2.Headers) -> tuple[bool, Finding | None]:
    """Whether an answer passed through the downstream Envoy (it names itself on every
    answer, labels.CLUSTER_HEADER, its own replies included; Envoy's upstream service time
    is not always passed on with them), and a Finding when another cluster's Envoy did."""
    by = headers.get(CLUSTER_HEADER)
    if by is not None and by != cluster:
        return True, Finding(cluster, "error", f"answered by cluster {by!r}'s Envoy: misrouted")
    return by is not None or "x-envoy-upstream-service-time" in headers, None


def transport_failure(cluster: str, reason: str) -> tuple[str, str, str]:
    """The hop, what happened and whose certificate was refused (``Finding.refused``),
    from the observability Envoy's transport failure reason for its connection to
    ``cluster``'s Envoy (pure; Envoy writes ``_`` for spaces):

    - ``CERTIFICATE_VERIFY_FAILED``: the observability Envoy refused the downstream's
      certificate (its ``verify_cert_failed:`` part says why: a SAN matcher that did not
      match, with the certificate's SANs; no local issuer: another CA);
    - a TLS alert (``TLSV1_ALERT_UNKNOWN_CA``, ``SSLV3_ALERT_BAD_CERTIFICATE``, ...): the
      downstream refused the observability Envoy's certificate and said so;
    - any other TLS error: a failed handshake; anything else: no connection.
    """
    said = reason.replace("_", " ").strip()
    if "TLS_error" not in reason:
        return "cluster-unreachable", said, ""
    why = said.removesuffix(":TLS error end")
    why = why.partition("OPENSSL internal:")[2] or why.removeprefix("TLS error:").strip(" |")
    if "CERTIFICATE_VERIFY_FAILED" in reason:
        verify = said.partition("verify cert failed:")[2].removesuffix(":TLS error end").strip()
        if "SAN matcher" in verify:
            names = verify.partition("certificate SANs are")[2].strip(" []")
            what = (
                f"presents a certificate that does not name {cluster!r} (it names: "
                f"{names or 'nothing'})"
            )
        elif "local issuer" in verify or "self signed" in verify or "self-signed" in verify:
            what = "presents a certificate of another CA (not in atlasd's trust bundle)"
        elif "expired" in verify:
            what = "presents an expired certificate"
        elif "revoked" in verify:
            what = (
                "presents a revoked certificate (atlasd cluster revoke): deploy the cluster's "
                "re-issued values"
            )
        else:
            what = f"presents a certificate that does not verify ({verify or why})"
        return (
            "tls-refused",
            f"the downstream Envoy {what}: the observability Envoy refused it [{why}]",
            DOWNSTREAM,
        )
    alert = next((w for w in reason.split(":") if "_ALERT_" in w), None)
    if alert is not None:
        name = alert.partition("_ALERT_")[2].replace("_", " ").lower()
        return (
            "tls-refused",
            f"the downstream Envoy refused the observability Envoy's certificate "
            f"(TLS alert {name!r}) [{why}]",
            OBSERVABILITY,
        )
    return "tls-refused", f"the TLS handshake with the downstream Envoy failed [{why}]", ""


def _failure(
    cluster: str, *, status: int, headers: httpx2.Headers, body: bytes, seconds: float, via: str,
    from_downstream: bool,
) -> Finding:  # fmt: skip
    """The hop an answer that is not a success stopped at (pure)."""
    grpc_status = headers.get("grpc-status")
    text = headers.get("grpc-message", "") or body.decode("utf-8", "replace").strip()[:300]
    low = text.lower()
    said = f"HTTP {status}" + (f", grpc-status {grpc_status}" if grpc_status else "")
    detail = f"{said}: {text}" if text else said

    def found(hop: str) -> Finding:
        return Finding(cluster, hop, detail, seconds, via=via)

    reason = headers.get(UPSTREAM_FAILURE_HEADER)
    if reason and not from_downstream:
        # The observability Envoy's connection to the downstream Envoy failed, and why.
        hop, what, refused = transport_failure(cluster, reason)
        return Finding(cluster, hop, f"{what} ({detail})", seconds, via=via, refused=refused)

    if not from_downstream and (
        status == 404 or grpc_status == "12" or "route not found" in low or "no route" in low
    ):
        # An Envoy without the route answers 404; to a gRPC caller, UNIMPLEMENTED (12).
        return found("no-route")
    if "tls" in low or "ssl" in low or "certificate" in low or "handshake" in low:
        return found("tls-refused")
    unavailable = status in (502, 503) or grpc_status == "14"
    timed_out = status == 504 or grpc_status == "4" or "timeout" in low
    if "upstream connect error" in low or "no healthy upstream" in low or unavailable or timed_out:
        # The observability Envoy's own reply: it could not reach the downstream Envoy.
        # Passed on from further down: the downstream Envoy could not reach its upstream.
        return found("upstream-down" if from_downstream else "cluster-unreachable")
    return found("error")


def classify(
    cluster: str,
    *,
    status: int,
    headers: httpx2.Headers,
    body: bytes,
    seconds: float,
    slow_after: float,
) -> Finding:
    """The hop a StoreAPI Info exchange stopped at (pure)."""
    from_downstream, misrouted = _answered_by(cluster, headers)
    if misrouted is not None:
        return dataclasses.replace(misrouted, seconds=seconds)
    if status == 200 and headers.get("grpc-status") in (None, "0") and len(body) >= 5:
        (length,) = struct.unpack(">I", body[1:5])
        if body[0] != 0 or len(body) < 5 + length:
            return Finding(cluster, "error", "Info answer not understood: a broken frame", seconds)
        try:
            info = InfoResponse().parse(body[5 : 5 + length])
        except Exception as exc:  # betterproto raises several kinds on bad input
            return Finding(cluster, "error", f"Info answer not understood: {exc}", seconds)
        labels = tuple(
            {lb.name: lb.value for lb in ls.labels} for ls in info.label_sets if ls.labels
        )
        hop = "slow" if seconds > slow_after else "ok"
        return Finding(cluster, hop, "", seconds, labels)
    return _failure(
        cluster, status=status, headers=headers, body=body, seconds=seconds, via=THANOS,
        from_downstream=from_downstream,
    )  # fmt: skip


def classify_prometheus(
    cluster: str, *, status: int, headers: httpx2.Headers, body: bytes, seconds: float,
    slow_after: float,
) -> Finding:  # fmt: skip
    """The hop a GET of ``/prom/<c>/-/ready`` through the observability Envoy stopped at."""
    from_downstream, misrouted = _answered_by(cluster, headers)
    if misrouted is not None:
        return dataclasses.replace(misrouted, seconds=seconds, via=PROMETHEUS)
    if status == 200 and from_downstream:
        hop = "slow" if seconds > slow_after else "ok"
        return Finding(cluster, hop, "", seconds, via=PROMETHEUS)
    return _failure(
        cluster, status=status, headers=headers, body=body, seconds=seconds, via=PROMETHEUS,
        from_downstream=from_downstream,
    )  # fmt: skip


def classify_alertmanager(
    cluster: str, *, status: int, headers: httpx2.Headers, body: bytes, seconds: float,
    slow_after: float, via: str = ALERTMANAGER,
) -> Finding:  # fmt: skip
    """The hop a GET of an Alertmanager's ``/-/ready`` through the observability Envoy's
    10903 stopped at (pure). Envoy marks an answer that came from the Alertmanager
    (``x-envoy-upstream-service-time``); its own replies are not marked."""
    text = body.decode("utf-8", "replace").strip()[:300]
    detail = f"HTTP {status}: {text}" if text else f"HTTP {status}"

    def found(hop: str, what: str = "") -> Finding:
        return Finding(cluster, hop, f"{what} ({detail})" if what else detail, seconds, via=via)

    if "x-envoy-upstream-service-time" in headers:
        if status == 200:
            return Finding(cluster, "slow" if seconds > slow_after else "ok", "", seconds, via=via)
        return found("upstream-down", "the Alertmanager answered, not ready")
    if status in (403, 404):
        # The route's RBAC runs first and allows nobody where no route matched: an
        # authority naming no Alertmanager gets 403 too (``known_alertmanagers`` tells).
        return found(
            "no-route",
            f"the observability Envoy does not take alerts from {cluster!r} (not a cluster "
            f"atlasd serves now), or has no {via}",
        )
    if status in (502, 503, 504) or "upstream connect error" in text:
        return found("upstream-down", "the observability Envoy could not reach the Alertmanager")
    return found("error")


def known_alertmanagers(findings: list[Finding]) -> list[Finding]:
    """One cluster's Alertmanager route findings, the refusals made precise: where the
    observability Envoy let the cluster through to some Alertmanager, a refusal of
    another (``no-route``) means it has no such Alertmanager (pure)."""
    let_in = any(f.path == ALERTMANAGER and f.hop != "no-route" for f in findings)
    if not let_in:
        return findings
    return [
        dataclasses.replace(
            f, detail=f"the observability Envoy has no {f.via} ({f.detail.rpartition('(')[2]}"
        )
        if f.path == ALERTMANAGER and f.hop == "no-route"
        else f
        for f in findings
    ]


def info_request_body() -> bytes:
    """One gRPC message frame: not compressed, length, the encoded InfoRequest."""
    payload = bytes(InfoRequest())
    return struct.pack(">BI", 0, len(payload)) + payload


class _Judge(Protocol):
    def __call__(
        self, cluster: str, *, status: int, headers: httpx2.Headers, body: bytes,
        seconds: float, slow_after: float,
    ) -> Finding: ...  # fmt: skip


@functools.cache
def _unused_tls() -> ssl.SSLContext:
    """The context a cleartext probe's client holds but never uses: httpx2 otherwise builds
    a verifying one, loading the CA store (~60 ms of CPU), for every client."""
    return ssl.create_default_context()


async def _exchange(
    cluster: str, via: str, request: httpx2.Request, *, within: float, slow_after: float,
    client: httpx2.AsyncClient | None, http2: bool, judge: _Judge,
) -> Finding:  # fmt: skip
    """Send ``request``; ``judge`` the answer, or say what stopped it from coming.

    ``client``: one to reuse, one call at a time. Over HTTP/2 never by calls running at
    once: httpcore2 shares the connection's h2 state between them, and an Envoy's early
    local reply on one stream (a refused upstream handshake, with the request body not
    yet sent) then fails that call as a ``LocalProtocolError`` naming the stream. None:
    a connection of the call's own."""
    own = client is None
    http = client or httpx2.AsyncClient(http1=not http2, http2=http2, verify=_unused_tls())
    started = time.perf_counter()
    address = request.url.netloc.decode()
    try:
        got = await http.send(request)
        return judge(
            cluster, status=got.status_code, headers=got.headers, body=got.content,
            seconds=time.perf_counter() - started, slow_after=slow_after,
        )  # fmt: skip
    except httpx2.ConnectError as exc:
        took = time.perf_counter() - started
        tls = tls_refusal(exc, peer=f"the observability Envoy at {address}")
        if tls is not None:
            return Finding(cluster, "tls-refused", tls[0], took, via=via, refused=tls[1])
        return Finding(cluster, "envoy-unreachable", f"{address}: {exc}", took, via=via)
    except httpx2.TimeoutException:
        return Finding(cluster, "timeout", f"no answer within {within:g} s",
                       time.perf_counter() - started, via=via)  # fmt: skip
    except httpx2.HTTPError as exc:
        return Finding(cluster, "error", f"{type(exc).__name__}: {exc}",
                       time.perf_counter() - started, via=via)  # fmt: skip
    finally:
        if own:
            await http.aclose()


async def probe_alertmanager(
    cluster: str,
    *,
    address: str,
    index: int,
    namespace: str,
    domain: str,
    identity: CertKey,
    trust: bytes,
    within: float = 10.0,
    slow_after: float = 2.0,
) -> Finding:
    """GET ``/-/ready`` of the ``index``-th local Alertmanager through the observability
    Envoy's Alertmanager listener at ``address`` (host:port, 10903), as ``cluster``'s
    downstream Envoy relays its alerts: with ``identity`` (the cluster's client
    certificate), the server verified against ``trust`` and the name ``atlas``."""
    via = f"{ALERTMANAGER}{index}"
    request = httpx2.Request(
        "GET",
        f"https://{address}/-/ready",
        headers={"host": f"{via}.{namespace}.svc.{domain}"},
        extensions={
            "timeout": httpx2.Timeout(within).as_dict(),
            "sni_hostname": OBSERVABILITY_NODE,
        },
    )

    def judge(
        cluster: str, *, status: int, headers: httpx2.Headers, body: bytes, seconds: float,
        slow_after: float,
    ) -> Finding:  # fmt: skip
        return classify_alertmanager(
            cluster, status=status, headers=headers, body=body, seconds=seconds,
            slow_after=slow_after, via=via,
        )  # fmt: skip

    try:
        tls = client_tls(identity, trust)
    except (ssl.SSLError, ValueError) as exc:  # what ssl says names no key material
        what = f"the cluster's certificate, key or CA bundle does not load ({exc})"
        return Finding(cluster, "error", what, via=via)
    async with httpx2.AsyncClient(verify=tls) as client:
        return await _exchange(
            cluster, via, request, within=within, slow_after=slow_after, client=client,
            http2=False, judge=judge,
        )  # fmt: skip


async def probe(
    cluster: str,
    *,
    address: str,
    authority: str,
    within: float = 10.0,
    slow_after: float = 2.0,
    client: httpx2.AsyncClient | None = None,
) -> Finding:
    """Call Info at ``address`` (host:port of the observability Envoy's Thanos listener, or
    the sidecar Service Thanos Query dials) with ``authority``; classify what happens."""
    request = httpx2.Request(
        "POST",
        f"http://{address}{INFO_PATH}",
        content=info_request_body(),
        headers={
            "host": authority,
            "content-type": "application/grpc",
            "te": "trailers",
            "grpc-timeout": f"{max(1, int(within * 1000))}m",
        },
        extensions={"timeout": httpx2.Timeout(within).as_dict()},
    )
    return await _exchange(
        cluster, THANOS, request, within=within, slow_after=slow_after, client=client,
        http2=True, judge=classify,
    )  # fmt: skip


async def probe_prometheus(
    cluster: str,
    *,
    address: str,
    within: float = 10.0,
    slow_after: float = 2.0,
    client: httpx2.AsyncClient | None = None,
) -> Finding:
    """GET ``/prom/<cluster>/-/ready`` at ``address`` (host:port of the observability
    Envoy's Prometheus listener, 10904), as a Grafana or an operator reaches the cluster's
    Prometheus through the chain; classify what happens."""
    request = httpx2.Request(
        "GET",
        f"http://{address}/prom/{cluster}/-/ready",
        extensions={"timeout": httpx2.Timeout(within).as_dict()},
    )
    return await _exchange(
        cluster, PROMETHEUS, request, within=within, slow_after=slow_after, client=client,
        http2=False, judge=classify_prometheus,
    )  # fmt: skip
