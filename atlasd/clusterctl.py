"""What ``atlasd cluster add|list|remove|values|revoke`` do, against Kubernetes or a store
(and ``client_identity``: a cluster's certificate, for ``atlasd probe --alertmanager-via``).

The Service built here is the one of docs/interface.md: a Service in atlasd's namespace
labeled ``goatlas.io/cluster: "true"`` with ``spec.externalIPs`` (the first one is the
downstream Envoy atlasd dials; the others are stored, validated and not used, as the
daemon does) and named ports. Before anything is written it is checked with the daemon's
own validator *together with every cluster Service already there*, so the CLI refuses
what the daemon would reject, fleet-wide rules included (an external IP another cluster
holds), naming the field.

What each command says about a Service that is not a served cluster: ``list`` shows the
Services labelled ``goatlas.io/cluster`` with another value than ``"true"`` too, with that
as their problem; ``values`` of a rejected cluster prints the problem, never the values
kept from before it was rejected; ``add`` never turns a Service without the cluster label
(someone else's) into a cluster, even with ``--overwrite``.

Its shape: a ``ClusterIP`` Service with an allocated cluster IP, labeled
``service.kubernetes.io/service-proxy-name: atlasd``. The original made it headless
(``clusterIP: None``), which the API server answers with the warning
``spec.externalIPs is ignored for headless services`` on every write; a Service with a
cluster IP draws no warning, and the service-proxy-name label makes kube-proxy (and the
service proxies that honour it) leave it alone, so, like the headless one, it routes
nothing: it is only a declaration. Existing Services keep their shape (``clusterIP`` is
immutable, and ``--overwrite`` never sends it); the daemon accepts both.

``revoke`` adds the cluster's current server and client certificates to the Secret
``atlas-revocations`` (``atlasd.revocation``; read, merged, written back with its
resourceVersion, again on a conflict), and with ``wait`` polls ``<c>-atlas-identity`` until
the leader has re-issued them.

Errors::

    ClusterError   a request that cannot be carried out; the message says why and what to do
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import trio

from atlasd import labels, revocation
from atlasd.certpolicy import load_cert
from atlasd.enroll import store as enroll_store
from atlasd.enroll import token as enroll_tokens
from atlasd.fleet.trust import CA_CERT_KEY
from atlasd.fleet.validate import cluster_label_problem, is_cluster_service, validate_all
from atlasd.kube import bodies
from atlasd.kube.api import KubeApi
from atlasd.kube.client import KubeClient
from atlasd.kube.errors import ApiError, Conflict, NotFound
from atlasd.kube.resources import NAMESPACES, SECRETS, SERVICES
from atlasd.kube.secrets import secret_data
from atlasd.model import DEFAULT_CLUSTER_PORTS, OBSERVABILITY_NODE, CertKey, Problem, Settings
from atlasd.reconcile.values_formats import Format, render

# kube-proxy skips Services carrying this label (its value names another proxy).
SERVICE_PROXY_LABEL = "service.kubernetes.io/service-proxy-name"
SERVICE_PROXY_VALUE = "atlasd"


class ClusterError(Exception):
    """A CLI request that cannot be carried out; the message says why and how to fix it."""


def cluster_service(
    *,
    name: str,
    external_ips: Sequence[str],
    replicas: int,
    namespace: str,
    ports: Sequence[tuple[str, int]] = DEFAULT_CLUSTER_PORTS,
    annotations: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The labeled Service that declares a downstream cluster (shape: module docstring)."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {
                labels.CLUSTER_LABEL: "true",
                labels.REPLICAS_LABEL: str(replicas),
                SERVICE_PROXY_LABEL: SERVICE_PROXY_VALUE,
            },
            "annotations": dict(annotations or {}),
        },
        "spec": {
            "type": "ClusterIP",
            "externalIPs": list(external_ips),
            "ports": [{"name": n, "port": p, "protocol": "TCP"} for n, p in ports],
        },
    }


@dataclass(frozen=True)
class ClusterRow:
    name: str
    external_ip: str
    replicas: str
    problem: str


def _describe(problems: Iterable[Problem]) -> str:
    return "; ".join(f"{p.field}: {p.brief()}" for p in problems)


async def namespace_missing(api: KubeApi, namespace: str) -> bool:
    """True only if the API server says the namespace does not exist (a user allowed to
    read only inside it cannot tell, nor can a standalone store: False)."""
    if not isinstance(api, KubeClient):
        return False
    try:
        await api.get(NAMESPACES, namespace)
    except NotFound:
        return True
    except ApiError:
        return False
    return False


async def _require_namespace(api: KubeApi, namespace: str) -> None:
    if await namespace_missing(api, namespace):
        raise ClusterError(f"namespace {namespace!r} does not exist")


async def _cluster_services(api: KubeApi, settings: Settings) -> list[dict[str, Any]]:
    items, _ = await api.list(
        SERVICES, namespace=settings.namespace, label_selector=f"{labels.CLUSTER_LABEL}=true"
    )
    return items


async def _labelled_services(api: KubeApi, settings: Settings) -> list[dict[str, Any]]:
    """Services carrying the cluster label with any value (``"True"`` is a mistake to show,
    not a Service to hide)."""
    items, _ = await api.list(
        SERVICES, namespace=settings.namespace, label_selector=labels.CLUSTER_LABEL
    )
    return items


async def _get_service(api: KubeApi, name: str, settings: Settings) -> dict[str, Any] | None:
    try:
        svc: dict[str, Any] = await api.get(SERVICES, name, namespace=settings.namespace)
    except NotFound:
        return None
    return svc


async def add(
    api: KubeApi,
    service: dict[str, Any],
    *,
    settings: Settings,
    overwrite: bool,
    allow_loopback: bool = False,
) -> str:
    """Create (or with ``overwrite`` replace) a cluster Service; returns "created"/"updated"."""
    name = bodies.name(service)
    existing = await _get_service(api, name, settings)
    if existing is not None:
        value = bodies.label(existing, labels.CLUSTER_LABEL)
        if value is None:
            # Someone else's Service: never turned into a cluster by --overwrite.
            raise ClusterError(
                f"a Service named {name!r} already exists in namespace {settings.namespace} "
                f"and is not a cluster (no {labels.CLUSTER_LABEL} label); pick another name"
            )
        if not overwrite:
            what = (
                f"cluster {name!r} already exists"
                if value == "true"
                else f"Service {name!r} already exists with {labels.CLUSTER_LABEL}={value!r} "
                '(not "true", so not served)'
            )
            raise ClusterError(f"{what}; pass --overwrite to replace its settings")
    candidate = service
    if existing is not None:
        # Judge it with the age (and uid) it has: the older of two clusters keeps a
        # contested external IP.
        meta = dict(bodies.meta(service))
        kept = (
            ("creationTimestamp", bodies.creation_timestamp(existing)),
            ("uid", bodies.uid(existing)),
        )
        meta.update((key, value) for key, value in kept if value)
        candidate = {**service, "metadata": meta}
    others = [s for s in await _cluster_services(api, settings) if bodies.name(s) != name]
    _, problems = validate_all([*others, candidate], settings, allow_loopback=allow_loopback)
    mine = [p for p in problems if p.source.name == name]
    if mine:
        raise ClusterError(_describe(mine))
    try:
        await api.apply(service)
    except NotFound:
        await _require_namespace(api, settings.namespace)
        raise
    return "updated" if existing is not None else "created"


async def list_clusters(
    api: KubeApi, *, settings: Settings, allow_loopback: bool = False
) -> list[ClusterRow]:
    items = await _labelled_services(api, settings)
    if not items:
        await _require_namespace(api, settings.namespace)
    _, problems = validate_all(items, settings, allow_loopback=allow_loopback)
    label_problems = [p for s in items if (p := cluster_label_problem(s, settings)) is not None]
    by_name: dict[str, list[Problem]] = {}
    for p in (*problems, *label_problems):
        by_name.setdefault(p.source.name, []).append(p)
    rows = []
    for svc in sorted(items, key=bodies.name):
        name = bodies.name(svc)
        ips = bodies.spec(svc).get("externalIPs") or []
        replicas = bodies.label(svc, labels.REPLICAS_LABEL)
        rows.append(
            ClusterRow(
                name=name,
                external_ip=str(ips[0]) if ips else "",
                replicas="1" if replicas is None else replicas,
                problem=_describe(by_name.get(name, [])),
            )
        )
    return rows


def _not_a_cluster(svc: Mapping[str, Any], name: str) -> ClusterError:
    value = bodies.labels(svc).get(labels.CLUSTER_LABEL)
    why = (
        f"it has no {labels.CLUSTER_LABEL} label"
        if value is None
        else f"its {labels.CLUSTER_LABEL} label is {value!r}"
    )
    return ClusterError(
        f"Service {name!r} is not a cluster: {why} (atlasd serves Services labeled "
        f"{labels.CLUSTER_LABEL}=true)"
    )


async def _missing_cluster(api: KubeApi, name: str, settings: Settings) -> ClusterError:
    await _require_namespace(api, settings.namespace)
    return ClusterError(f"no cluster named {name!r} in namespace {settings.namespace}")


@dataclass(frozen=True)
class RemoveOutcome:
    """What ``remove`` did beyond deleting the Service: the enrolled certificates it
    revoked and the enrollment Secrets (join tokens, ``<c>-atlas-enrolled``) it deleted."""

    revoked: tuple[revocation.Revoked, ...] = ()
    forgotten: int = 0


async def remove(
    api: KubeApi, name: str, *, settings: Settings, now: dt.datetime | None = None
) -> RemoveOutcome:
    """Delete cluster ``name``'s Service (atlasd then deletes what it made for it), first
    revoking the certificates the enrollment endpoint signed for it that are still valid,
    then deleting its enrollment Secrets (join tokens, used or not, and the record of its
    renewals): a cluster re-added under the name later does not take them back, and no
    unused token of it can enroll the new one. Entries of enrolled certificates expire with
    them (a day by default), so removals never pile up in ``atlas-revocations``. A
    compatible cluster's certificates are not revoked here (365 days each): ``revoke``
    first if its values leaked (docs/security.md)."""
    svc = await _get_service(api, name, settings)
    if svc is None:
        raise await _missing_cluster(api, name, settings)
    if not is_cluster_service(svc):
        raise _not_a_cluster(svc, name)
    when = now or dt.datetime.now(dt.UTC)
    enrolled = await _enrolled_certs(api, name, settings, when)
    revoked = (
        await _store_revocations(api, enrolled, settings=settings, now=when) if enrolled else []
    )
    await api.delete(SERVICES, name, namespace=settings.namespace)
    forgotten = await enroll_store.forget(api, name, namespace=settings.namespace)
    return RemoveOutcome(revoked=tuple(revoked), forgotten=forgotten)


async def values(
    api: KubeApi, name: str, *, settings: Settings, fmt: Format, allow_loopback: bool = False
) -> str:
    """The Envoy chart values of cluster ``name`` (``atlas``: the observability Envoy's)."""
    if name != OBSERVABILITY_NODE:
        # A rejected cluster may still have values from before it was rejected (atlasd
        # keeps its objects until it is fixed or deleted) but is served nothing: say why
        # instead of printing values that would start an Envoy with no configuration.
        await _require_valid_cluster(api, name, settings, allow_loopback)
    secret_name = (
        labels.OBS_VALUES_SECRET if name == OBSERVABILITY_NODE else labels.values_secret_name(name)
    )
    try:
        secret = await api.get(SECRETS, secret_name, namespace=settings.namespace)
    except NotFound:
        later = (
            f"its values are not written yet (Secret {secret_name} not found): the leading "
            "atlasd writes them within seconds; `atlasd status` shows whether atlasd runs "
            "and leads"
        )
        if name == OBSERVABILITY_NODE:
            await _require_namespace(api, settings.namespace)
            raise ClusterError(f"the observability Envoy's values: {later}") from None
        raise ClusterError(f"cluster {name!r} is valid, but {later}") from None
    values = secret_data(secret).get("values.yaml")
    if not values:
        raise ClusterError(f"Secret {secret_name} has no values.yaml")
    return render(fmt, values.decode(), namespace=settings.namespace)


async def client_identity(api: KubeApi, name: str, *, settings: Settings) -> tuple[CertKey, bytes]:
    """Cluster ``name``'s client certificate and key and the CA bundle it trusts, from
    Secret ``<name>-atlas-identity``: what its downstream Envoy presents and trusts."""
    secret_name, data = await _identity_data(
        api,
        name,
        settings,
        why="is it a cluster atlasd serves (atlasd cluster list)?",
    )
    missing = [k for k in ("client.crt", "client.key", "ca.crt") if not data.get(k)]
    if missing:
        raise ClusterError(f"Secret {secret_name} lacks {', '.join(missing)}")
    return CertKey(data["client.crt"], data["client.key"]), data["ca.crt"]


async def _identity_data(
    api: KubeApi, name: str, settings: Settings, *, why: str
) -> tuple[str, dict[str, bytes]]:
    """Secret ``<name>-atlas-identity``'s name and data; a ClusterError ending in ``why``
    when it does not exist."""
    secret_name = labels.identity_secret_name(name)
    try:
        secret = await api.get(SECRETS, secret_name, namespace=settings.namespace)
    except NotFound:
        svc = await _get_service(api, name, settings)
        if svc is not None and bodies.annotations(svc).get(labels.ENROLLMENT_ANNOTATION) == "true":
            raise ClusterError(
                f'cluster {name!r} enrolls ({labels.ENROLLMENT_ANNOTATION}: "true"): atlasd '
                "holds none of its keys, its agent does, and it has enrolled no "
                "certificate atlasd knows of yet"
            ) from None
        raise ClusterError(
            f"cluster {name!r} has no certificates yet (Secret {secret_name} not found in "
            f"{settings.namespace!r}): {why}"
        ) from None
    return secret_name, secret_data(secret)


async def _require_valid_cluster(
    api: KubeApi, name: str, settings: Settings, allow_loopback: bool
) -> None:
    """Raise the ClusterError that says why ``name`` is not a served cluster, if it is not:
    no such Service (or namespace), not labelled a cluster, or rejected by the daemon's
    rules over the whole fleet."""
    svc = await _get_service(api, name, settings)
    if svc is None:
        raise await _missing_cluster(api, name, settings)
    if not is_cluster_service(svc):
        raise _not_a_cluster(svc, name)
    _, problems = validate_all(
        await _cluster_services(api, settings), settings, allow_loopback=allow_loopback
    )
    mine = [p for p in problems if p.source.name == name]
    if mine:
        raise ClusterError(
            f"cluster {name!r} is rejected, so atlasd serves it nothing and keeps no "
            f"current values for it: {_describe(mine)} (also posted as an Event on "
            f"Service {name})"
        )


@dataclass(frozen=True)
class RevokeOutcome:
    """What ``revoke`` did: the entries it added (empty: they were revoked already) and the
    cluster's certificates it found (the added ones, or those revoked before)."""

    added: tuple[revocation.Revoked, ...]
    found: tuple[revocation.Revoked, ...]
    reissued: bool | None = None  # with ``wait``: whether atlasd re-issued in time


async def _identity_certs(
    api: KubeApi, name: str, settings: Settings, now: dt.datetime, *, required: bool = True
) -> tuple[revocation.Revoked, ...]:
    """The certificates atlasd issued the cluster (``<c>-atlas-identity``); none when the
    Secret is missing and not ``required``."""
    try:
        secret_name, data = await _identity_data(api, name, settings, why="nothing to revoke")
    except ClusterError:
        if required:
            raise
        return ()
    out = []
    for kind in revocation.KINDS:
        pem = data.get(f"{kind}.crt")
        try:
            out.append(revocation.revoke(name, kind, pem or b"", now=now))
        except ValueError:
            raise ClusterError(f"Secret {secret_name}: {kind}.crt is not a certificate") from None
    return tuple(out)


async def _enrolled_certs(
    api: KubeApi, name: str, settings: Settings, now: dt.datetime
) -> tuple[revocation.Revoked, ...]:
    """The certificates the enrollment endpoint signed for the cluster and that are still
    valid (its used tokens' records, every renewal's in ``<c>-atlas-enrolled``)."""
    out = []
    for kind, pem in await enroll_store.issued(api, name, namespace=settings.namespace):
        if kind not in revocation.KINDS:
            continue
        with contextlib.suppress(ValueError):  # not a certificate: it authenticates nothing
            entry = revocation.revoke(name, kind, pem, now=now)
            if entry.in_force(now) and entry not in out:
                out.append(entry)
    return tuple(out)


def revocations_secret(
    entries: Iterable[revocation.Revoked], *, settings: Settings, resource_version: str = ""
) -> dict[str, Any]:
    """The ``atlas-revocations`` Secret holding ``entries`` (``resource_version``: of the
    object read, so a concurrent writer gets a Conflict instead of losing an entry)."""
    meta: dict[str, Any] = {
        "name": labels.REVOCATIONS_SECRET,
        "namespace": settings.namespace,
        "labels": {labels.MANAGED_BY_LABEL: labels.MANAGED_BY_VALUE},
    }
    if resource_version:
        meta["resourceVersion"] = resource_version
    body = base64.b64encode(revocation.dump(entries)).decode()
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": meta,
        "type": "Opaque",
        "data": {revocation.REVOCATIONS_KEY: body},
    }


async def _store_revocations(
    api: KubeApi, found: Sequence[revocation.Revoked], *, settings: Settings, now: dt.datetime
) -> list[revocation.Revoked]:
    """Merge ``found`` into ``atlas-revocations`` (written with the resourceVersion read,
    read again on a conflict); the entries that were not there yet."""
    added: list[revocation.Revoked] = []
    for _attempt in range(10):
        stored, rv = await stored_revocations(api, settings)
        entries, added = revocation.merge(stored, found, now=now)
        if not added:
            return added
        obj = revocations_secret(entries, settings=settings, resource_version=rv or "")
        try:
            await (api.replace(obj) if rv is not None else api.create(obj))
        except Conflict:  # another writer (AlreadyExists included): read again
            continue
        return added
    raise ClusterError(f"Secret {labels.REVOCATIONS_SECRET} kept changing; try again")


async def stored_revocations(
    api: KubeApi, settings: Settings
) -> tuple[list[revocation.Revoked], str | None]:
    """The entries stored and the Secret's resourceVersion (None: no Secret)."""
    try:
        secret = await api.get(SECRETS, labels.REVOCATIONS_SECRET, namespace=settings.namespace)
    except NotFound:
        return [], None
    entries, problems = revocation.parse(secret_data(secret).get(revocation.REVOCATIONS_KEY))
    if problems:
        # Rewriting would drop what does not parse: an operator looks first.
        raise ClusterError(f"Secret {labels.REVOCATIONS_SECRET}: {problems[0]}")
    return entries, bodies.resource_version(secret)


async def revoke(
    api: KubeApi,
    name: str,
    *,
    settings: Settings,
    now: dt.datetime,
    wait: float = 0,
    poll: float = 0.2,
) -> RevokeOutcome:
    """Revoke cluster ``name``'s current certificates; with ``wait`` (seconds), wait until
    atlasd has re-issued them (``reissued`` says whether it did in time)."""
    svc = await _get_service(api, name, settings)
    if svc is None:
        raise await _missing_cluster(api, name, settings)
    if bodies.label(svc, labels.CLUSTER_LABEL) is None:
        raise _not_a_cluster(svc, name)
    enrolled = await _enrolled_certs(api, name, settings, now)
    issued = await _identity_certs(api, name, settings, now, required=not enrolled)
    found = issued + enrolled
    added = await _store_revocations(api, found, settings=settings, now=now)
    if wait <= 0 or not issued:  # enrolled certificates are renewed by the agent only
        return RevokeOutcome(added=tuple(added), found=found)
    revoked = {e.sha256 for e in issued}
    with trio.move_on_after(wait):
        while True:
            current = await _identity_certs(api, name, settings, now)
            if not revoked & {e.sha256 for e in current}:
                return RevokeOutcome(added=tuple(added), found=found, reissued=True)
            await trio.sleep(poll)
    return RevokeOutcome(added=tuple(added), found=found, reissued=False)


async def mint_token(
    api: KubeApi,
    name: str,
    *,
    settings: Settings,
    now: dt.datetime,
    ttl: dt.timedelta = enroll_tokens.DEFAULT_TTL,
    allow_loopback: bool = False,
) -> tuple[enroll_tokens.JoinToken, enroll_tokens.Record]:
    """A one-time join token for cluster ``name`` (``atlasd.enroll``): the cluster must be
    a valid cluster Service and atlasd must have made its CA (the token pins it)."""
    await _require_valid_cluster(api, name, settings, allow_loopback)
    try:
        ca_secret = await api.get(SECRETS, labels.CA_SECRET, namespace=settings.namespace)
    except NotFound:
        ca_secret = None
    ca = load_cert(secret_data(ca_secret or {}).get(CA_CERT_KEY, b""))
    if ca is None:
        raise ClusterError(
            f"Secret {labels.CA_SECRET} holds no CA yet: is atlasd running? (atlasd status)"
        )
    return await enroll_store.mint(
        api, name, namespace=settings.namespace, ca_cert=ca, now=now, ttl=ttl
    )
