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
replies included, so the two Envoys' replies are told apart:

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
``tls-refused``        the TLS handshake with the downstream Envoy failed (which side
                       refused, and why, is in the detail: a certificate of another
                       CA, a name that is not the cluster's)
``upstream-down``      the downstream Envoy answered, but its sidecar did not
``timeout``            nothing at all within ``timeout`` seconds
``error``              anything else (the detail says what)
=====================  ==============================================================

Uses Thanos's own Info protobuf (``atlasd.thanospb``, generated from ``proto/`` with
betterproto); the HTTP/2 exchange goes through ``httpx`` (cleartext, prior knowledge), as
it gives the response headers a classification needs.
"""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass, field

import httpx

from atlasd.labels import CLUSTER_HEADER
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
    "upstream-down": "the downstream Envoy is up; its Thanos sidecar is not answering",
    "timeout": "nothing answered in time: a firewall dropping packets on the path?",
    "error": "",
}


@dataclass(frozen=True)
class Finding:
    """What one probe found."""

    cluster: str
    hop: str
    detail: str = ""
    seconds: float = 0.0
    labels: tuple[dict[str, str], ...] = field(default=())

    @property
    def ok(self) -> bool:
        return self.hop == "ok"

    @property
    def fix(self) -> str:
        return _FIX.get(self.hop, "")


def classify(
    cluster: str,
    *,
    status: int,
    headers: httpx.Headers,
    body: bytes,
    seconds: float,
    slow_after: float,
) -> Finding:
    """The hop a completed HTTP exchange stopped at (pure)."""
    grpc_status = headers.get("grpc-status")
    message = headers.get("grpc-message", "")
    # The downstream Envoy names itself on every answer (labels.CLUSTER_HEADER), its own
    # replies included; Envoy's upstream service time is not always passed on with them.
    answered_by = headers.get(CLUSTER_HEADER)
    from_downstream = answered_by is not None or "x-envoy-upstream-service-time" in headers
    if answered_by is not None and answered_by != cluster:
        return Finding(
            cluster, "error", f"answered by cluster {answered_by!r}'s Envoy: misrouted", seconds
        )
    if status == 200 and grpc_status in (None, "0") and len(body) >= 5:
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
    text = message or body.decode("utf-8", "replace").strip()[:300]
    low = text.lower()
    said = f"HTTP {status}" + (f", grpc-status {grpc_status}" if grpc_status else "")
    detail = f"{said}: {text}" if text else said
    no_route = status == 404 or (grpc_status == "12" and not from_downstream)
    if no_route or "route not found" in low or "no route" in low:
        # An Envoy without the route answers 404; to a gRPC caller, UNIMPLEMENTED (12).
        return Finding(cluster, "no-route", detail, seconds)
    if "tls" in low or "ssl" in low or "certificate" in low or "handshake" in low:
        return Finding(cluster, "tls-refused", detail, seconds)
    unavailable = status == 503 or grpc_status == "14"
    if "upstream connect error" in low or "no healthy upstream" in low or unavailable:
        # The observability Envoy's own reply: it could not reach the downstream Envoy.
        # Passed through from further down: the downstream Envoy could not reach its
        # sidecar.
        hop = "upstream-down" if from_downstream else "cluster-unreachable"
        return Finding(cluster, hop, detail, seconds)
    if status == 504 or grpc_status == "4" or "timeout" in low:
        hop = "upstream-down" if from_downstream else "cluster-unreachable"
        return Finding(cluster, hop, detail, seconds)
    return Finding(cluster, "error", detail, seconds)


def info_request_body() -> bytes:
    """One gRPC message frame: not compressed, length, the encoded InfoRequest."""
    payload = bytes(InfoRequest())
    return struct.pack(">BI", 0, len(payload)) + payload


async def probe(
    cluster: str,
    *,
    address: str,
    authority: str,
    within: float = 10.0,
    slow_after: float = 2.0,
    client: httpx.AsyncClient | None = None,
) -> Finding:
    """Call Info at ``address`` (host:port of the observability Envoy's Thanos listener, or
    the sidecar Service Thanos Query dials) with ``authority``; classify what happens."""
    own = client is None
    http = client or httpx.AsyncClient(http1=False, http2=True)
    started = time.perf_counter()
    try:
        resp = await http.post(
            f"http://{address}{INFO_PATH}",
            content=info_request_body(),
            headers={
                "host": authority,
                "content-type": "application/grpc",
                "te": "trailers",
                "grpc-timeout": f"{max(1, int(within * 1000))}m",
            },
            timeout=within,
        )
    except httpx.ConnectError as exc:
        took = time.perf_counter() - started
        return Finding(cluster, "envoy-unreachable", f"{address}: {exc}", took)
    except httpx.TimeoutException:
        took = time.perf_counter() - started
        return Finding(cluster, "timeout", f"no answer within {within:g} s", took)
    except httpx.HTTPError as exc:
        took = time.perf_counter() - started
        return Finding(cluster, "error", f"{type(exc).__name__}: {exc}", took)
    finally:
        if own:
            await http.aclose()
    took = time.perf_counter() - started
    return classify(
        cluster,
        status=resp.status_code,
        headers=resp.headers,
        body=resp.content,
        seconds=took,
        slow_after=slow_after,
    )
