"""The original Atlas's leader-election locks, and the gate that keeps atlasd from leading
while one of them is held by a live holder.

Owns: reading those locks and deciding "may this replica lead now?" for
``atlasd.kube.lease.run_leader_election`` (its ``gate``).

What the original writes (rancher/wrangler's ``leader`` package on client-go
``tools/leaderelection``): its ``controller`` command elects on the lock ``LOCKNAME``
(default ``atlas``) in ``NAMESPACE`` (default ``monitoring``), its ``envoy-ads`` command on
``atlas-envoy-ads``. The wrangler it was built with uses a *ConfigMap* lock: ConfigMap
``<LOCKNAME>`` whose annotation ``control-plane.alpha.kubernetes.io/leader`` holds a JSON
``LeaderElectionRecord`` ``{holderIdentity, leaseDurationSeconds, acquireTime, renewTime,
leaderTransitions}`` (lease 45 s, renewed every 2 s). Later wrangler versions elect on a
``coordination.k8s.io`` Lease of the same name (or on both); both shapes are checked.

Only the controller's lock guards writes (the original's ``envoy-ads`` only reads), so
that is the one atlasd waits for by default (``atlasd run --legacy-locks``).

Liveness is client-go's rule: a record is held by a live holder while ``holderIdentity``
is non-empty and *our local time when we last saw the raw record change* plus its
``leaseDurationSeconds`` has not passed; ``renewTime`` is never compared with our clock
(clocks skew). Consequences: a lock the original released on a clean stop (empty holder)
blocks nothing; one left behind by a crashed original blocks for one lease duration
(45 s) after atlasd first sees it. A holder whose identity is atlasd's own (the same pod
name, so not a live original) does not block.

Errors: a lock that cannot be read because of RBAC (401/403) blocks, with a reason saying
so (leading beside an original we cannot see is what this module prevents); a passing
failure (transport, 429, 5xx) keeps the last verdict for that lock (blocked if there is
none yet); a malformed record is not a live holder (the original always writes valid JSON)
and is logged once.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import trio

from atlasd.kube import bodies
from atlasd.kube.api import KubeApi
from atlasd.kube.errors import Forbidden, KubeError, NotFound, Unauthorized
from atlasd.kube.resources import CONFIGMAPS, LEASES, ApiResource

log = logging.getLogger(__name__)

LEADER_ANNOTATION = "control-plane.alpha.kubernetes.io/leader"
ORIGINAL_CONTROLLER_LOCK = "atlas"
ORIGINAL_ENVOY_ADS_LOCK = "atlas-envoy-ads"


@dataclass(frozen=True)
class LockRecord:
    """The fields of a LeaderElectionRecord liveness depends on."""

    holder: str
    lease_duration_seconds: int


def configmap_record(configmap: Mapping[str, Any]) -> tuple[str, LockRecord] | None:
    """(raw annotation, record) of a ConfigMap lock; None if it carries no record.

    Raises ValueError if the annotation is not a LeaderElectionRecord.
    """
    raw = bodies.annotations(configmap).get(LEADER_ANNOTATION)
    if raw is None:
        return None
    try:
        doc = json.loads(raw)
    except ValueError:
        raise ValueError("its leader annotation is not JSON") from None
    if not isinstance(doc, Mapping):
        raise ValueError("its leader annotation is not a JSON object")
    return str(raw), _record(doc.get("holderIdentity"), doc.get("leaseDurationSeconds"))


def lease_record(lease: Mapping[str, Any]) -> tuple[str, LockRecord]:
    """(raw spec, record) of a Lease lock."""
    spec = lease.get("spec") or {}
    if not isinstance(spec, Mapping):
        raise ValueError("its spec is not an object")
    raw = json.dumps(spec, sort_keys=True)
    return raw, _record(spec.get("holderIdentity"), spec.get("leaseDurationSeconds"))


def _record(holder: object, duration: object) -> LockRecord:
    if holder is not None and not isinstance(holder, str):
        raise ValueError("holderIdentity is not a string")
    if duration is not None and (isinstance(duration, bool) or not isinstance(duration, int)):
        raise ValueError("leaseDurationSeconds is not an integer")
    return LockRecord(holder=holder or "", lease_duration_seconds=duration or 0)


@dataclass(frozen=True)
class Blocker:
    """Why this replica may not lead now (one line each, safe to log and to show)."""

    lock: str
    holder: str
    reason: str

    def doc(self) -> dict[str, str]:
        return {"blocked_by": self.lock, "holder": self.holder, "reason": self.reason}


NOT_BLOCKED: dict[str, None] = {"blocked_by": None, "holder": None, "reason": None}


class _Observed:
    """One lock object as last seen. Invariant: ``at`` is the local trio time at which
    ``raw`` last *changed* (the basis of expiry, as in client-go)."""

    def __init__(self) -> None:
        self.raw: str | None = None
        self.at = 0.0
        self.verdict: Blocker | None = None
        self.known = False

    def see(self, raw: str | None) -> None:
        if raw != self.raw or not self.known:
            self.raw = raw
            self.at = trio.current_time()


class LeadershipGate:
    """``await gate()`` returns a reason not to lead now, or None.

    ``serve_only`` (the ``envoy-ads`` compatibility command): never lead, never touch a
    lock. ``on_change`` receives the ``leadership`` part of ``/status`` each time the
    verdict changes (and on the first check); each change is logged once.
    """

    def __init__(
        self,
        kube: KubeApi,
        *,
        namespace: str,
        identity: str,
        legacy_locks: Sequence[str] = (ORIGINAL_CONTROLLER_LOCK,),
        own_lease: str | None = None,
        serve_only: bool = False,
        on_change: Callable[[Mapping[str, str | None]], None] | None = None,
    ) -> None:
        self.kube = kube
        self.namespace = namespace
        self.identity = identity
        self.locks = tuple(dict.fromkeys(n for n in legacy_locks if n))
        self.own_lease = own_lease
        self.serve_only = serve_only
        self.on_change = on_change
        self._seen: dict[tuple[str, str], _Observed] = {}
        self._malformed_logged: set[tuple[str, str]] = set()
        self._last: Blocker | None = None
        self._reported = False

    def _targets(self) -> list[tuple[ApiResource, str]]:
        out: list[tuple[ApiResource, str]] = []
        for name in self.locks:
            out.append((CONFIGMAPS, name))
            if name != self.own_lease:
                out.append((LEASES, name))
        return out

    async def __call__(self) -> str | None:
        blocker = await self.check()
        return blocker.reason if blocker else None

    async def check(self) -> Blocker | None:
        if self.serve_only:
            blocker: Blocker | None = Blocker(
                lock="serve-only",
                holder="",
                reason="started as `envoy-ads`: this replica serves xDS and never writes "
                "(run `atlasd controller` or `atlasd run` to reconcile)",
            )
        else:
            blocker = None
            for res, name in self._targets():
                found = await self._check_one(res, name)
                if found is not None and blocker is None:
                    blocker = found
        self._report(blocker)
        return blocker

    async def _check_one(self, res: ApiResource, name: str) -> Blocker | None:
        key = (res.kind, name)
        seen = self._seen.setdefault(key, _Observed())
        where = f"{res.kind} {self.namespace}/{name}"
        try:
            obj = await self.kube.get(res, name, namespace=self.namespace)
        except NotFound:
            seen.see(None)
            seen.known, seen.verdict = True, None
            return None
        except (Forbidden, Unauthorized) as exc:
            seen.known = True
            seen.verdict = Blocker(
                lock=where,
                holder="",
                reason=f"cannot read {where} (the original Atlas's lock): {exc.reason}; "
                f"grant get on {res.plural}, or pass --legacy-locks '' if the original "
                "no longer runs",
            )
            return seen.verdict
        except KubeError as exc:
            if not seen.known:
                return Blocker(lock=where, holder="", reason=f"cannot read {where} yet: {exc}")
            return seen.verdict
        try:
            parsed = configmap_record(obj) if res is CONFIGMAPS else lease_record(obj)
        except ValueError as exc:
            if key not in self._malformed_logged:
                self._malformed_logged.add(key)
                log.warning("%s is not a leader-election lock (%s): ignored", where, exc)
            seen.see(None)
            seen.known, seen.verdict = True, None
            return None
        if parsed is None:
            seen.see(None)
            seen.known, seen.verdict = True, None
            return None
        raw, record = parsed
        seen.see(raw)
        seen.known = True
        live = (
            record.holder != ""
            and record.holder != self.identity
            and trio.current_time() < seen.at + record.lease_duration_seconds
        )
        seen.verdict = (
            Blocker(
                lock=where,
                holder=record.holder,
                reason=f"the original Atlas holds {where} ({record.holder!r} renews it); "
                "atlasd leads once it stops or releases it",
            )
            if live
            else None
        )
        return seen.verdict

    def _report(self, blocker: Blocker | None) -> None:
        if self._reported and blocker == self._last:
            return
        first = not self._reported
        self._reported = True
        self._last = blocker
        if blocker is not None:
            log.warning("not leading: %s", blocker.reason)
        elif not first:
            log.info("no longer blocked from leading")
        if self.on_change is not None:
            self.on_change(blocker.doc() if blocker else dict(NOT_BLOCKED))
