"""Reconcile one key: decide (pure), write only what differs, expect the echo, report.

``Reconciler.reconcile_key(api, version, key, now=...)`` works from a ``FleetVersion``
(``atlasd.fleet``: the watch cache, validated per key):

- a cluster key: ``plan_identity`` (kept or issued leaves; none for an enrolled cluster,
  whose stored identity, if any, is deleted) -> ``cluster_objects`` ->
  ``plan_key_writes`` against the key's observed objects; server-side apply what differs,
  delete what is no longer wanted (the cluster is gone: ``absent``); a cluster Service that
  is present but invalid is *protected*: nothing of it is written or deleted (a typo in an
  annotation must not revoke a working cluster's identity);
- the fleet-wide key: ``decide_ca`` (create, adopt, keep or rotate) -> ``atlas-ca`` written
  first and alone (created, or replaced with the observed resourceVersion so that two
  writers cannot both rotate: ``Conflict`` propagates, the caller runs a full pass) ->
  ``atlas-server``/``atlas-client``/``atlas-tls``/``atlasd-ads`` and ``atlas-envoy-values``. Fixed-name
  Secrets missing from the cache are read by name (first start, or an installation of the
  original whose Secrets atlasd does not own yet).

After writing, the key's ``Expectations`` hold what the cache must come to show; until it
does (or a deadline passes) the key is not acted on again. Once a key is in sync, the
Reconciler remembers at which resourceVersions and for which inputs: the next change of the
key whose inputs and objects are the same costs a comparison, not a re-plan (an external IP
change writes nothing). Problems (validation, a clash, an object the API server refused)
become Warning Events, each once while it lasts.

The keys are handed in by ``atlasd.reconcile.loop`` (from the daemon's watch; tests and
benchmarks run that same loop). What one reconcile, or several summed, decided and did is a
``ReconcileResult``.

Errors::

    Conflict / AlreadyExists   atlas-ca changed under us: run a full pass
    KubeError (others)         propagate (transport, auth): the caller backs off and retries
    Invalid / BadRequest on one object   a Problem on its cluster; the key's other objects
                                         are still written
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import trio

from atlasd import labels, metrics
from atlasd.fleet.keys import FIXED_SECRETS, FLEET_KEY, ObjectId
from atlasd.fleet.state import FleetVersion, Member
from atlasd.fleet.validate import identity_secret_name
from atlasd.kube import bodies
from atlasd.kube.api import KubeApi
from atlasd.kube.errors import BadRequest, Invalid, NotFound
from atlasd.kube.resources import SECRETS, ApiResource
from atlasd.kube.secrets import secret_data
from atlasd.model import Identity, ObjectRef, Problem, Settings
from atlasd.reconcile import enrolled
from atlasd.reconcile.certs import CA
from atlasd.reconcile.desired import cluster_objects, objects_inputs, observability_values_secret
from atlasd.reconcile.diff import KeyWrites, ca_write, plan_key_writes
from atlasd.reconcile.expectations import Expectations
from atlasd.reconcile.objects import SecretObject
from atlasd.reconcile.pki import (
    KeySource,
    PKIError,
    RandomKeys,
    ca_deadline,
    ca_secret,
    check_settings,
    decide_ca,
    plan_identity,
    plan_observability,
    signing_ca,
)

__all__ = ["EventPoster", "ReconcileResult", "Reconciler", "log_event"]

log = logging.getLogger(__name__)

# Concurrent writes: beyond ~8 the HTTP client's own cost per request grows (its pool is
# scanned per request) and the API server answers no faster (bench/README.md).
DEFAULT_CONCURRENCY = 8


class EventPoster(Protocol):
    """``atlasd.kube.events.post_event``: posts a Warning Event, never raises; whether it
    was posted."""

    async def __call__(
        self, kube: KubeApi, *, ref: ObjectRef, reason: str, message: str, type: str = "Warning"
    ) -> bool: ...


async def log_event(
    kube: KubeApi, *, ref: ObjectRef, reason: str, message: str, type: str = "Warning"
) -> bool:
    """The fallback ``EventPoster`` (no Events, just a log line)."""
    log.warning("%s %s %s/%s: %s", reason, ref.kind, ref.namespace, ref.name, message)
    return True


@dataclass
class ReconcileResult:
    """What reconciling one key decided and did, or several summed (``combine``)."""

    key: str
    created: int = 0
    replaced: int = 0
    applied: int = 0
    deleted: int = 0
    events: int = 0
    # Events that could not be posted (the API server unreachable): the key is tried again.
    events_failed: int = 0
    issued: tuple[str, ...] = ()
    ca_action: str = ""
    problems: tuple[Problem, ...] = ()
    write_errors: tuple[str, ...] = ()
    # Look at the key again by then at the latest (renewal, an earlier CA expiring).
    next_renewal: dt.datetime | None = None
    # Not acted on: its previous writes are not in the cache yet (monotonic deadline).
    waiting_until: float | None = None
    # Nothing was planned: the key's inputs and objects are as when last in sync.
    in_sync: bool = False

    @property
    def writes(self) -> int:
        """Object writes (Events not counted)."""
        return self.created + self.replaced + self.applied + self.deleted

    @classmethod
    def combine(cls, results: Iterable[ReconcileResult]) -> ReconcileResult:
        """The sum of ``results`` (in the order they were made), as one result with no
        key: what was done adds up (writes, Events, certificates issued, write errors);
        the problems are those each key's latest look found (a result that only waited
        did not look), since a problem is a state, not a deed."""
        results = list(results)
        latest: dict[str, ReconcileResult] = {}
        for r in results:
            if r.waiting_until is None:
                latest[r.key] = r
        renewals = [r.next_renewal for r in results if r.next_renewal is not None]
        return cls(
            key="",
            created=sum(r.created for r in results),
            replaced=sum(r.replaced for r in results),
            applied=sum(r.applied for r in results),
            deleted=sum(r.deleted for r in results),
            events=sum(r.events for r in results),
            events_failed=sum(r.events_failed for r in results),
            issued=tuple(i for r in results for i in r.issued),
            ca_action=next((r.ca_action for r in results if r.ca_action), ""),
            problems=tuple(p for r in latest.values() for p in r.problems),
            write_errors=tuple(e for r in results for e in r.write_errors),
            next_renewal=min(renewals) if renewals else None,
        )


@dataclass(frozen=True)
class _Synced:
    """A key found (or made) in sync: for these inputs, at these resourceVersions."""

    inputs: Hashable
    versions: Mapping[ObjectId, str]
    valid_until: dt.datetime | None

    def holds(self, inputs: Hashable, versions: Mapping[ObjectId, str], now: dt.datetime) -> bool:
        """Still in sync: the same inputs, the same objects, and not due for renewal."""
        return (
            self.inputs == inputs
            and self.versions == versions
            and (self.valid_until is None or now < self.valid_until)
        )


def _versions(
    objects: Iterable[tuple[str, Mapping[str, Mapping[str, Any]]]],
) -> dict[ObjectId, str]:
    return {
        (kind, name): bodies.resource_version(obj)
        for kind, by_name in objects
        for name, obj in by_name.items()
    }


def _member_versions(m: Member) -> dict[ObjectId, str]:
    return _versions((("Service", m.services), ("Secret", m.secrets)))


class Reconciler:
    """Reconciles keys; remembers expectations, keys in sync and Problems reported.

    Invariants: ``_synced[key]`` describes the last outcome of ``key`` that needed no
    further write; ``_reported[key]`` the Problems of ``key`` already posted as Events
    (replaced each time the key is reconciled, so a recurring problem is posted again).
    """

    def __init__(
        self,
        *,
        settings: Settings,
        keys: KeySource | None = None,
        concurrency: int = DEFAULT_CONCURRENCY,
        post_event: EventPoster = log_event,
        clock: Callable[[], float] = trio.current_time,
        expectations: Expectations | None = None,
    ) -> None:
        check_settings(settings)
        self.settings = settings
        self.keys: KeySource = keys or RandomKeys()
        self.post_event = post_event
        # Shared with the fleet (its relists meet them) when the daemon hands them in.
        self.expectations = expectations if expectations is not None else Expectations()
        self._clock = clock
        self._limiter = trio.CapacityLimiter(concurrency)
        self._synced: dict[str, _Synced] = {}
        self._reported: dict[str, set[tuple[str, str, str, str, str]]] = {}
        # The parsed signing CA, by the bytes it was parsed from.
        self._ca: tuple[tuple[bytes, bytes, bytes], CA] | None = None

    def is_synced(self, key: str, versions: Mapping[ObjectId, str]) -> bool:
        rec = self._synced.get(key)
        return rec is not None and rec.versions == versions

    # -- one key -------------------------------------------------------------------------

    async def reconcile_key(
        self, api: KubeApi, version: FleetVersion, key: str, *, now: dt.datetime
    ) -> ReconcileResult:
        cached = version.object_versions(key)
        waiting = self.expectations.pending(
            key, lambda oid: cached.get(oid) or None, now=self._clock()
        )
        if waiting is not None:
            return ReconcileResult(key=key, waiting_until=waiting)
        if key == FLEET_KEY:
            return await self._fleetwide(api, version, now)
        return await self._cluster(api, version, key, now)

    async def _cluster(
        self, api: KubeApi, version: FleetVersion, key: str, now: dt.datetime
    ) -> ReconcileResult:
        m = version.members.get(key)
        result = ReconcileResult(key=key)
        if m is None:
            self._synced.pop(key, None)
            self._reported.pop(key, None)
            return result
        problems = list(m.problems)
        observed = _member_versions(m)
        replaced: tuple[tuple[str, int], ...] = ()
        if m.state == "absent":
            inputs: Hashable = ("absent",)
            writes = plan_key_writes(
                services={},
                secrets={},
                observed_services=m.services,
                observed_secrets=m.secrets,
            )
            next_renewal = None
        elif m.state == "invalid" or m.cluster is None:
            # Protected: its objects stay until it is fixed or deleted.
            self._synced[key] = _Synced(("invalid", m.problems), observed, None)
            result.problems = tuple(problems)
            await self._report(api, key, problems, result)
            result.in_sync = True
            return result
        else:
            ca = self._signing_ca(version, now)
            if ca is None:
                return result  # no usable CA yet: the fleet-wide key comes first
            if m.cluster.enrolled:
                problems += self._enrollment_problems(m)
            rev = version.fleetwide.revocations.get(key)
            revoked = rev.hashes if rev is not None else frozenset()
            # An enrolled cluster's objects hold nothing of the CA's and nothing revocable.
            signed = () if m.cluster.enrolled else (ca.serial, ca.bundle, ca.chain, revoked)
            inputs = (objects_inputs(m.cluster), len(version.fleetwide.alertmanagers), *signed)
            rec = self._synced.get(key)
            if rec is not None and rec.holds(inputs, observed, now):
                result.in_sync = True
                result.next_renewal = rec.valid_until
                result.problems = tuple(problems)
                await self._report(api, key, problems, result)
                return result
            identity: Identity | None = None
            identity_secret: SecretObject | None = None
            next_renewal = None
            if not m.cluster.enrolled:  # else its agent makes its keys; a stored one goes
                plan = plan_identity(
                    m.cluster,
                    m.secrets.get(identity_secret_name(key)),
                    ca=ca,
                    settings=self.settings,
                    now=now,
                    keys=self.keys,
                    revoked=revoked,
                )
                identity, identity_secret = plan.identity, plan.secrets[0]
                result.issued = plan.issued
                replaced = plan.revoked
                next_renewal = plan.next_renewal
            objs = cluster_objects(
                m.cluster,
                identity=identity,
                identity_secret=identity_secret,
                ca_bundle=ca.bundle,
                chain=ca.chain,
                ca_serial=ca.serial,
                settings=self.settings,
                alertmanager_count=len(version.fleetwide.alertmanagers),
            )
            writes = plan_key_writes(
                services=objs.services,
                secrets=objs.secrets,
                observed_services=m.services,
                observed_secrets=m.secrets,
                is_cluster_service=lambda name: _is_cluster_service(version, name),
            )
            for obj in writes.clashes:
                problems.append(
                    Problem(
                        source=m.cluster.source or _ref(m),
                        field=f"Service {bodies.name(obj)}",
                        message="a cluster Service already has this name; not overwritten",
                        reason="NameClash",
                    )
                )
        dropped = _dropped_identity(m, writes)
        if dropped:
            # Before the keys go: their certificates (public) join the cluster's enrolled
            # record, so `atlasd cluster revoke` still reaches them (copies of the old
            # values may hold the keys). Not written: no delete yet, the key is retried.
            await enrolled.record_issued(
                api, key, _stored_certificates(m), namespace=self.settings.namespace, now=now
            )
        versions = await self._write(api, key, writes, result, problems, m)
        said = 0
        if dropped and ("Secret", identity_secret_name(key)) in versions:
            said += await self._identity_dropped(api, key, m)
        for oid, rv in versions.items():
            if rv is None:
                observed.pop(oid, None)
            else:
                observed[oid] = rv
        if not result.write_errors:
            self._synced[key] = _Synced(inputs, observed, next_renewal)
        if replaced and not result.write_errors:
            said += await self._revoked(api, key, m, replaced)
        result.next_renewal = next_renewal
        result.problems = tuple(problems)
        result.events = said
        await self._report(api, key, problems, result)
        return result

    async def _revoked(
        self, api: KubeApi, key: str, m: Member, replaced: tuple[tuple[str, int], ...]
    ) -> int:
        """Say that revoked leaves of ``key`` were re-issued, and what the operator does now
        (an Event on the cluster Service, a log line, the counter)."""
        metrics.REVOKED_REISSUED.inc(len(replaced))
        old = ", ".join(f"{name} (serial {serial})" for name, serial in replaced)
        values = labels.values_secret_name(key)
        message = (
            f"revoked certificates re-issued: {old}. The observability Envoy refuses the old "
            f"ones; redeploy the downstream Envoy with the new values of Secret {values} "
            f"(atlasd cluster values {key})"
        )
        log.warning("cluster %s: %s", key, message, extra={"key": key})
        ref = m.cluster.source if m.cluster is not None and m.cluster.source else _ref(m)
        await self.post_event(api, ref=ref, reason="CertificatesRevoked", message=message)
        return 1

    def _enrollment_problems(self, m: Member) -> list[Problem]:
        """An enrolled cluster whose values cannot tell its agent where to enroll."""
        if self.settings.enroll_address:
            return []
        return [
            Problem(
                source=(m.cluster.source if m.cluster is not None else None) or _ref(m),
                field=f"Secret {labels.values_secret_name(m.name)}",
                message=(
                    "the cluster enrolls, but atlasd runs without --enroll-address "
                    "(ATLAS_ENROLL_ADDRESS, chart value enrollment.address): its values' "
                    "agent.server is empty; set it, or give the agent --server at install"
                ),
                reason="EnrollAddressMissing",
            )
        ]

    async def _identity_dropped(self, api: KubeApi, key: str, m: Member) -> int:
        """Say that a cluster switched to enrollment lost its stored keys, and what is
        left of them (a Normal Event on the cluster Service and a log line)."""
        message = (
            f"the cluster enrolls: its stored keys (Secret {identity_secret_name(key)}) were "
            "deleted and its values carry none; its downstream Envoy needs the agent and a "
            f"join token (atlasd cluster token {key}). Certificates issued to the deleted "
            "keys stay valid until they expire or atlasd cluster revoke "
            f"{key} (docs/security.md, 'Enrollment mode')"
        )
        log.warning("cluster %s: %s", key, message, extra={"key": key})
        ref = m.cluster.source if m.cluster is not None and m.cluster.source else _ref(m)
        await self.post_event(api, ref=ref, reason="KeysDeleted", message=message, type="Normal")
        return 1

    def _signing_ca(self, version: FleetVersion, now: dt.datetime) -> CA | None:
        stored = version.fleetwide.ca
        if stored is None:
            return None
        ident = (stored.material.cert_pem, stored.material.key_pem, stored.bundle + stored.chain)
        if self._ca is not None and self._ca[0] == ident:
            return self._ca[1]
        try:
            ca = signing_ca(stored)
        except PKIError:
            return None
        self._ca = (ident, ca)
        return ca

    async def _fleetwide(
        self, api: KubeApi, version: FleetVersion, now: dt.datetime
    ) -> ReconcileResult:
        ns = self.settings.namespace
        fw = version.fleetwide
        result = ReconcileResult(key=FLEET_KEY)
        observed: dict[str, Mapping[str, Any]] = dict(fw.secrets)
        if fw.ca_secret is not None:
            observed[labels.CA_SECRET] = fw.ca_secret
        for name in FIXED_SECRETS:
            if name not in observed:
                # Not watched until atlasd owns it (first start; adopting the original's).
                with contextlib.suppress(NotFound):
                    observed[name] = await api.get(SECRETS, name, namespace=ns)
        versions = {("Secret", n): bodies.resource_version(o) for n, o in observed.items()}
        inputs = (len(fw.alertmanagers),)
        rec = self._synced.get(FLEET_KEY)
        if rec is not None and rec.holds(inputs, versions, now):
            result.in_sync = True
            result.next_renewal = rec.valid_until
            return result
        problems: list[Problem] = []
        try:
            ca, action = decide_ca(
                observed.get(labels.CA_SECRET), settings=self.settings, now=now, keys=self.keys
            )
        except PKIError as e:
            ref = ObjectRef(kind="Secret", name=labels.CA_SECRET, namespace=ns)
            problems.append(Problem(source=ref, field="data", message=str(e), reason="InvalidCA"))
            self._synced.pop(FLEET_KEY, None)
            result.problems = tuple(problems)
            await self._report(api, FLEET_KEY, problems, result)
            return result
        result.ca_action = action
        written: dict[ObjectId, str | None] = {}
        step = ca_write(
            ca_secret(ca, observed.get(labels.CA_SECRET), self.settings),
            observed.get(labels.CA_SECRET),
        )
        if step is not None:
            verb, body = step
            stored = await (api.create(body) if verb == "create" else api.replace(body))
            if verb == "create":
                result.created += 1
            else:
                result.replaced += 1
            written[("Secret", labels.CA_SECRET)] = bodies.resource_version(stored)
            if action == "rotated":
                log.info("CA rotated: serial %s, revision %d", ca.serial, ca.revision)
        obs = plan_observability(
            observed,
            ca=ca,
            settings=self.settings,
            now=now,
            keys=self.keys,
            force=action == "rotated",
        )
        result.issued = obs.issued
        values = observability_values_secret(self.settings, identity=obs.identity, pki=ca.pki)
        writes = plan_key_writes(
            services={},
            secrets={
                **{bodies.name(s): s for s in obs.secrets},
                labels.OBS_VALUES_SECRET: values,
            },
            observed_services={},
            observed_secrets={n: o for n, o in observed.items() if n != labels.CA_SECRET},
            prune=False,
        )
        self.expectations.expect(FLEET_KEY, written, now=self._clock())
        versions.update({k: v for k, v in written.items() if v is not None})
        after = await self._write(api, FLEET_KEY, writes, result, problems, None)
        versions.update({k: v for k, v in after.items() if v is not None})
        next_renewal = min(obs.next_renewal, ca_deadline(ca, self.settings))
        if not result.write_errors:
            self._synced[FLEET_KEY] = _Synced(inputs, versions, next_renewal)
        result.next_renewal = next_renewal
        result.problems = tuple(problems)
        await self._report(api, FLEET_KEY, problems, result)
        return result

    async def _write(
        self,
        api: KubeApi,
        key: str,
        writes: KeyWrites,
        result: ReconcileResult,
        problems: list[Problem],
        member: Member | None,
    ) -> dict[ObjectId, str | None]:
        """Apply and delete (bounded concurrency); the resulting versions are expected."""
        versions: dict[ObjectId, str | None] = {}
        errors: list[str] = []

        async def apply_one(obj: Mapping[str, Any]) -> None:
            kind, name = str(obj.get("kind")), bodies.name(obj)
            async with self._limiter:
                try:
                    stored = await api.apply(obj, metadata_only=True)
                except (Invalid, BadRequest) as e:
                    errors.append(f"{kind} {name}: {e.reason}")
                    if member is not None and member.cluster is not None:
                        problems.append(
                            Problem(
                                source=member.cluster.source or _ref(member),
                                field=f"{kind} {name}",
                                message=f"the API server rejected it: {e.reason}",
                                reason="ApplyFailed",
                            )
                        )
                    else:
                        log.error("apply of %s %s rejected: %s", kind, name, e.reason)
                    return
            versions[(kind, name)] = bodies.resource_version(stored)
            result.applied += 1

        async def delete_one(res: ApiResource, name: str) -> None:
            async with self._limiter:
                try:
                    await api.delete(res, name, namespace=self.settings.namespace)
                except NotFound:
                    versions[(res.kind, name)] = None
                    return
            versions[(res.kind, name)] = None
            result.deleted += 1

        if writes:
            async with trio.open_nursery() as nursery:
                for obj in writes.apply:
                    nursery.start_soon(apply_one, obj)
                for res, name in writes.delete:
                    nursery.start_soon(delete_one, res, name)
        result.write_errors = (*result.write_errors, *errors)
        self.expectations.expect(key, versions, now=self._clock())
        return versions

    async def _report(
        self, api: KubeApi, key: str, problems: Sequence[Problem], result: ReconcileResult
    ) -> None:
        """Post an Event for each of ``key``'s problems not reported yet (counted in
        ``result``). One that could not be posted is not taken as reported: the key is
        not kept in sync and is tried again (``events_failed``)."""
        reported: set[tuple[str, str, str, str, str]] = set()
        before = self._reported.get(key, set())
        for p in problems:
            pk = (p.source.namespace, p.source.name, p.source.uid, p.field, p.message)
            if pk in before:
                reported.add(pk)
                continue
            posted = await self.post_event(
                api, ref=p.source, reason=p.reason, message=f"{p.field}: {p.message}"
            )
            if posted:
                reported.add(pk)
                result.events += 1
            else:
                result.events_failed += 1
        if reported:
            self._reported[key] = reported
        else:
            self._reported.pop(key, None)
        if result.events_failed:
            self._synced.pop(key, None)


def _ref(m: Member) -> ObjectRef:
    return ObjectRef(
        kind="Service",
        name=m.name,
        namespace=bodies.namespace(m.service),
        uid=bodies.uid(m.service),
    )


def _stored_certificates(m: Member) -> dict[str, bytes]:
    """The certificates (no key) of a cluster's stored identity, by kind."""
    data = secret_data(m.secrets.get(identity_secret_name(m.name)))
    return {kind: data[f"{kind}.crt"] for kind in ("server", "client") if data.get(f"{kind}.crt")}


def _dropped_identity(m: Member, writes: KeyWrites) -> bool:
    """Whether ``writes`` delete the stored identity of a cluster that is still one (it
    enrolls now; a cluster that goes takes its identity with it, unremarked)."""
    name = identity_secret_name(m.name)
    return (
        m.cluster is not None
        and m.cluster.enrolled
        and any(res.kind == "Secret" and n == name for res, n in writes.delete)
    )


def _is_cluster_service(version: FleetVersion, name: str) -> bool:
    m = version.members.get(name)
    return m is not None and m.service is not None
