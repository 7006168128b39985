"""The enrollment endpoint: a subsystem of ``atlasd run`` on its own TLS port
(``--enroll-port``, default 6307; 0 = off), run by every replica.

TLS is the ADS server's (``atlasd.xds.tls.ServerTls``: atlasd's ``atlasd-ads``
certificate, the client certificate optional and verified against the trust bundle when
given), so renewals over mTLS and enrollments without a certificate share one port and
the certificate renews with no restart. One request per connection (``atlasd.enroll.wire``):

- ``GET /v1/ca``: the trust bundle (public; the agent checks it against its token's pin);
- ``POST /v1/enroll`` ``{"cluster", "token", "csrs": {"server", "client"}}``: the CSRs are
  checked first (``csr``: names, key type, size), the cluster must exist, then the token
  is checked and used up (``store.consume``: hash, binding, expiry, single use), then
  both are signed with the current CA;
- ``POST /v1/renew`` ``{"cluster", "csrs"}``: authenticated by the client certificate of
  the handshake, which must name the cluster and not be revoked (``RevokedCerts``).

Answer: ``{"certificates": {"server", "client"}, "chain", "ca"}`` (leaves, the
cross-signed links that follow them, the trust bundle), or ``{"error"}`` with a 4xx.
The certificates signed (never a key) are recorded with the token's use (one conditional
write) and a renewal's in ``<c>-atlas-enrolled``; ``atlasd cluster revoke`` reads both.
A refusal changes nothing: the token is used only by a request that is signed.

Rate limit: every source address has a bucket (``RateLimit``): a burst of requests beyond
it is answered 429 before anything is parsed. Logs and metrics name the cluster, the
token's public id and the reason; never the token's secret, a request or a key.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import h11
import trio
from cryptography import x509
from prometheus_client import Counter

from atlasd.certpolicy import public_der
from atlasd.enroll import csr as csrs
from atlasd.enroll import store
from atlasd.enroll import token as tokens
from atlasd.enroll.token import Refused
from atlasd.enroll.wire import (
    CA_PATH,
    ENROLL_PATH,
    MAX_BODY,
    RENEW_PATH,
    Request,
    WireError,
    read_request,
    respond,
    server_connection,
)
from atlasd.fleet.feed import FleetFeed
from atlasd.fleet.trust import StoredCA
from atlasd.heap import release_tls
from atlasd.kube.api import KubeApi
from atlasd.kube.errors import KubeError
from atlasd.model import Settings
from atlasd.reconcile import enrolled
from atlasd.reconcile.certs import CA
from atlasd.reconcile.pki import PKIError, signing_ca
from atlasd.revocation import fingerprint
from atlasd.xds.authz import RevokedCerts
from atlasd.xds.tls import ServerTls, peer_names

log = logging.getLogger(__name__)

ENROLL_PORT = 6307
# How long a client has to complete its handshake and send its request (and to take
# the answer): a slow or silent peer is dropped, a burst of 1,000 handshakes on a loaded
# machine is not.
EXCHANGE_SECONDS = 30.0
API_CONCURRENCY = 32

ENROLLMENTS = Counter(
    "atlasd_enrollments",
    "Enrollment endpoint requests by kind (enroll, renew, ca) and outcome (issued, refused).",
    ["kind", "outcome"],
)


@dataclass
class RateLimit:
    """A token bucket per source address: ``burst`` requests at once, ``rate`` per second
    after that. Owned by the endpoint's task (no other task touches it)."""

    rate: float = 20.0
    burst: float = 40.0
    clock: Callable[[], float] = trio.current_time
    _buckets: dict[str, tuple[float, float]] = field(default_factory=dict)

    def allow(self, address: str) -> bool:
        now = self.clock()
        level, last = self._buckets.get(address, (self.burst, now))
        level = min(self.burst, level + (now - last) * self.rate)
        if len(self._buckets) > 10_000:  # forget the full (idle) buckets
            self._buckets = {a: b for a, b in self._buckets.items() if b[0] < self.burst}
        if level < 1:
            self._buckets[address] = (level, now)
            return False
        self._buckets[address] = (level - 1, now)
        return True


@dataclass
class Enroller:
    """Answers enrollment requests from the latest fleet version."""

    api: KubeApi
    feed: FleetFeed
    revoked: RevokedCerts
    settings: Settings
    lifetime: dt.timedelta
    # Requests in their API phase at once: a burst queues here, in order, rather than in
    # the API client's connection pool (where a wait past its timeout is an error).
    api_slots: trio.CapacityLimiter | None = None
    now: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC)
    _ca: tuple[StoredCA, CA] | None = None

    def _slots(self) -> trio.CapacityLimiter:
        if self.api_slots is None:
            self.api_slots = trio.CapacityLimiter(API_CONCURRENCY)
        return self.api_slots

    def _signing(self) -> CA:
        version = self.feed.latest
        stored = version.fleetwide.ca if version is not None else None
        if stored is None:
            raise Refused(503, "atlasd has no CA yet")
        if self._ca is None or self._ca[0] is not stored:
            try:
                self._ca = (stored, signing_ca(stored))
            except PKIError as exc:
                raise Refused(503, "atlasd cannot sign with its CA") from exc
        return self._ca[1]

    def _cluster_exists(self, cluster: str) -> None:
        version = self.feed.latest
        member = version.members.get(cluster) if version is not None else None
        if member is None or member.cluster is None:
            raise Refused(404, f"no valid cluster {cluster!r}")

    def _answer(self, certs: dict[str, bytes], ca: CA) -> dict[str, Any]:
        return {
            "certificates": {k: v.decode() for k, v in certs.items()},
            "chain": ca.chain.decode(),
            "ca": ca.bundle.decode(),
        }

    def bundle(self) -> dict[str, Any]:
        ca = self._signing()
        return {"ca": ca.bundle.decode()}

    async def enroll(self, doc: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        cluster, raw_token = doc.get("cluster"), doc.get("token")
        if not isinstance(cluster, str) or not isinstance(raw_token, str):
            raise Refused(400, "cluster and token must be strings")
        token = tokens.parse(raw_token)
        keys = csrs.check_request(doc.get("csrs"), cluster, self.settings)
        self._cluster_exists(cluster)
        ca = self._signing()
        async with self._slots():
            now = self.now()
            certs = await store.consume(
                self.api,
                token,
                cluster=cluster,
                namespace=self.settings.namespace,
                now=now,
                sign=lambda: csrs.issue(
                    keys, cluster, ca=ca, settings=self.settings, now=now, lifetime=self.lifetime
                ),
                keys={kind: public_der(key) for kind, key in keys.items()},
            )
        return f"cluster {cluster} enrolled with join token {token.id}", self._answer(certs, ca)

    async def renew(
        self, doc: dict[str, Any], *, names: frozenset[str], peer_hash: str | None
    ) -> tuple[str, dict[str, Any]]:
        cluster = doc.get("cluster")
        if not isinstance(cluster, str):
            raise Refused(400, "cluster must be a string")
        if not names or peer_hash is None:
            raise Refused(401, "a renewal needs the current client certificate (mTLS)")
        if cluster not in names:
            raise Refused(403, f"the client certificate does not name cluster {cluster!r}")
        if peer_hash in self.revoked:
            raise Refused(
                403,
                "the client certificate is revoked: enroll again with a fresh join token "
                "(atlasd cluster revoke --rekey)",
            )
        keys = csrs.check_request(doc.get("csrs"), cluster, self.settings)
        self._cluster_exists(cluster)
        ca = self._signing()
        certs = csrs.issue(
            keys, cluster, ca=ca, settings=self.settings, now=self.now(), lifetime=self.lifetime
        )
        async with self._slots():
            await enrolled.record_issued(
                self.api, cluster, certs, namespace=self.settings.namespace, now=self.now()
            )
        return f"cluster {cluster} renewed", self._answer(certs, ca)


def _peer_hash(der: bytes | None) -> str | None:
    return fingerprint(x509.load_der_x509_certificate(der)) if der else None


def _kind(path: str) -> str:
    return {CA_PATH: "ca", ENROLL_PATH: "enroll", RENEW_PATH: "renew"}.get(path, "other")


async def _dispatch(
    enroller: Enroller, req: Request, *, names: frozenset[str], peer_hash: str | None
) -> tuple[str, dict[str, Any]]:
    if req.path == CA_PATH and req.method == "GET":
        return "", enroller.bundle()
    if req.path not in (ENROLL_PATH, RENEW_PATH):
        raise Refused(404, "no such path")
    if req.method != "POST":
        raise Refused(405, "use POST")
    try:
        doc = json.loads(req.body)
    except ValueError as exc:
        raise Refused(400, "the request is not JSON") from exc
    if not isinstance(doc, dict):
        raise Refused(400, "the request is not a JSON object")
    if req.path == ENROLL_PATH:
        return await enroller.enroll(doc)
    return await enroller.renew(doc, names=names, peer_hash=peer_hash)


async def _exchange(
    enroller: Enroller, tls: ServerTls, limit: RateLimit, stream: trio.SocketStream
) -> None:
    context = tls.context
    try:
        address = str(stream.socket.getpeername()[0])
    except OSError:
        return
    if context is None:  # no certificate yet (a first start): nothing to serve
        return
    ssl_stream = trio.SSLStream(stream, context, server_side=True)
    kind = "other"
    try:
        # Deadlines on what the client controls (a slow or silent peer); the work between
        # is bounded by the API client's own timeouts, so a burst that queues on the API
        # server is answered late rather than dropped.
        with trio.move_on_after(EXCHANGE_SECONDS) as reading:
            try:
                await ssl_stream.do_handshake()
            except (trio.BrokenResourceError, ssl.SSLError):
                return
            allowed = limit.allow(address)
            conn = server_connection()
            try:
                req = await read_request(conn, ssl_stream)
            except WireError as exc:
                ENROLLMENTS.labels("other", "refused").inc()
                log.info("enroll: refused a request from %s: %s", address, exc)
                if conn.our_state is h11.SEND_RESPONSE:  # the request line was read
                    await respond(conn, ssl_stream, 400, {"error": str(exc)})
                return
        if reading.cancelled_caught:
            return
        kind = _kind(req.path)
        names = peer_names(ssl_stream.getpeercert())
        peer_hash = _peer_hash(ssl_stream.getpeercert(binary_form=True))
        try:
            if not allowed:
                raise Refused(429, "too many requests from this address; retry later")
            said, answer = await _dispatch(enroller, req, names=names, peer_hash=peer_hash)
        except Refused as exc:
            status, answer = exc.status, {"error": str(exc)}
            ENROLLMENTS.labels(kind, "refused").inc()
            log.warning("enroll: refused %s from %s (%d): %s", kind, address, status, exc)
        except KubeError as exc:
            status, answer = 503, {"error": "atlasd cannot reach the Kubernetes API"}
            ENROLLMENTS.labels(kind, "refused").inc()
            log.warning("enroll: %s from %s failed: %s", kind, address, exc)
        else:
            status = 200
            ENROLLMENTS.labels(kind, "issued").inc()
            if said:
                log.info("enroll: %s (from %s)", said, address)
        with trio.move_on_after(EXCHANGE_SECONDS):
            await respond(conn, ssl_stream, status, answer)
    except (trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError):
        pass
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(1):
            await ssl_stream.aclose()
        release_tls(ssl_stream)


async def run_enroll(
    *,
    api: KubeApi,
    feed: FleetFeed,
    tls: ServerTls,
    revoked: RevokedCerts,
    settings: Settings,
    host: str,
    port: int,
    lifetime: dt.timedelta,
    limit: RateLimit | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the enrollment endpoint until cancelled; ``started()`` with the bound port."""
    enroller = Enroller(api=api, feed=feed, revoked=revoked, settings=settings, lifetime=lifetime)
    limit = limit or RateLimit()
    listeners = await trio.open_tcp_listeners(port, host=host)
    bound = int(listeners[0].socket.getsockname()[1])
    log.info("enroll: listening on %s:%d", host, bound)

    async def handler(stream: trio.SocketStream) -> None:
        await _exchange(enroller, tls, limit, stream)

    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, handler, listeners)
        task_status.started(bound)


__all__ = ["ENROLL_PORT", "MAX_BODY", "RateLimit", "run_enroll"]
