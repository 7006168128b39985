"""The one door from the property tests into atlasd's pure core.

Every call the property tests make into the product goes through this module, so when
the product's entry points move or change shape, only this file changes. It runs what
the daemon runs on one pass, minus the I/O:

    raw Service dicts -> validate_all -> clusters + Problems
    clusters -> PKI plan -> desired_state (Services, Secrets, Fleet)
    Fleet -> the atlas. zone text          Fleet -> one xDS Snapshot per Envoy node

One stand-in: certificates. Issuing two leaves per cluster per example would make the
PKI dominate the run, so one plan is made per settings (for a prototype cluster) and
every cluster of an example is given the prototype's identity; its identity Secret is
the prototype's, renamed and re-owned. Nothing downstream of the plan depends on a
leaf's SAN matching its cluster (that is ``pki``'s own tests' business).
"""

from __future__ import annotations

import copy
import datetime as dt
import functools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from atlasd import labels
from atlasd.addresses import check_remote_address, parse_ip
from atlasd.dns.zone import render_zone
from atlasd.fleet.validate import identity_secret_name, validate_all, validate_cluster
from atlasd.model import (
    OBSERVABILITY_NODE,
    DownstreamCluster,
    Fleet,
    LocalAlertmanager,
    Problem,
    Settings,
)
from atlasd.reconcile.desired import DesiredState, desired_state
from atlasd.reconcile.objects import owner_references
from atlasd.reconcile.pki import PKIPlan, plan_pki
from atlasd.xds.builders import SnapshotBuilder
from atlasd.xds.messages import tls_secret, validation_secret
from atlasd.xds.snapshot import (
    CLUSTER,
    ENDPOINT,
    LISTENER,
    ROUTE,
    SCOPED_ROUTE,
    SECRET,
    Snapshot,
)
from tests.unit.reconcile.pkitools import CountingKeys

__all__ = [
    "CLUSTER",
    "ENDPOINT",
    "LISTENER",
    "OBSERVABILITY_NODE",
    "ROUTE",
    "SCOPED_ROUTE",
    "SECRET",
    "SETTINGS",
    "DownstreamCluster",
    "Outputs",
    "Problem",
    "Snapshot",
    "canonical_ip",
    "parse_ip",
    "run",
    "validate_alone",
    "validate_fleet",
]

NOW = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
SERIAL = 1_767_225_600
_PROTOTYPE = "prototype"

# The installations the examples run against: the defaults, and one with every setting
# that changes the output moved (IPv6 xDS address, other namespace and domain, a
# forwarder token, a DNS name for the alert relay; unannotated clusters enroll, with an
# enrollment address and another agent directory).
SETTINGS: tuple[Settings, ...] = (
    Settings(),
    Settings(
        namespace="obs",
        cluster_domain="corp.example",
        atlasd_ads_host="10.0.0.5",
        envoy_ads_address="2001:db8::10",
        envoy_address="atlas-envoy.obs.svc.corp.example",
        forwarder_token="s3cret-forwarder-token",
        enrollment_default=True,
        enroll_address="enroll.obs.example:443",
        agent_cert_dir="/var/run/atlas/certs",
    ),
)


def validate_fleet(
    services: Iterable[Mapping[str, Any]], settings: Settings
) -> tuple[tuple[DownstreamCluster, ...], tuple[Problem, ...]]:
    return validate_all(services, settings)


def validate_alone(
    service: Mapping[str, Any], settings: Settings
) -> DownstreamCluster | list[Problem]:
    return validate_cluster(service, settings)


def canonical_ip(text: str) -> str:
    """The address a validated external IP names, for comparing two spellings."""
    return str(parse_ip(check_remote_address(text, allow_loopback=True)))


@functools.cache
def _prototype_plan(settings: Settings) -> PKIPlan:
    proto = DownstreamCluster(name=_PROTOTYPE, external_ip="192.0.2.1", ports=())
    return plan_pki(secrets={}, clusters=[proto], settings=settings, now=NOW, keys=CountingKeys())


def pki_plan(clusters: Sequence[DownstreamCluster], settings: Settings) -> PKIPlan:
    """The prototype plan, with the prototype identity given to every cluster."""
    base = _prototype_plan(settings)
    ident = base.identities[_PROTOTYPE]
    identities = {n: i for n, i in base.identities.items() if n != _PROTOTYPE}
    secrets = {}
    compatible = [c for c in clusters if not c.enrolled]  # enrolled: no identity, as plan_pki
    for c in compatible:
        secret = copy.deepcopy(base.identity_secrets[_PROTOTYPE])
        meta = secret["metadata"]
        meta["name"] = identity_secret_name(c.name)
        meta["labels"][labels.OWNER_CLUSTER_LABEL] = c.name
        refs = owner_references(c)
        if refs:
            meta["ownerReferences"] = refs
        else:
            meta.pop("ownerReferences", None)
        secrets[c.name] = secret
    identities.update((c.name, ident) for c in compatible)
    return replace(base, identities=identities, identity_secrets=secrets)


def agent_secrets() -> list[bytes]:
    """What an enrolled node's agent files stand for, as serialized SDS secrets
    (``server``, ``client``, ``validation``; the prototype's identity): the static form of
    its file-sourced SDS, for ``envoy --mode validate``."""
    plan = _prototype_plan(Settings())
    ident = plan.identities[_PROTOTYPE]
    return [
        tls_secret("server", ident.server).body,
        tls_secret("client", ident.client).body,
        validation_secret(plan.pki.trust_bundle).body,
    ]


@dataclass(frozen=True)
class Outputs:
    """What one pass produces for a set of accepted clusters."""

    desired: DesiredState
    zone: str
    snapshots: Mapping[str, Snapshot]
    # InconsistentSnapshot messages (the builder keeps them instead of raising).
    xds_problems: tuple[str, ...]


def run(
    clusters: Sequence[DownstreamCluster],
    settings: Settings,
    *,
    alertmanagers: tuple[LocalAlertmanager, ...] = (),
    builder: SnapshotBuilder | None = None,
) -> Outputs:
    """The desired objects, the zone and the snapshots for ``clusters`` (raises as the
    product raises: a builder that throws is a finding)."""
    plan = pki_plan(clusters, settings)
    desired = desired_state(
        clusters=clusters, alertmanagers=alertmanagers, plan=plan, settings=settings
    )
    zone = render_zone(desired.fleet, serial=SERIAL)
    builder = builder or SnapshotBuilder(forwarder_token=settings.forwarder_token)
    snapshots = builder.build(desired.fleet)
    return Outputs(desired, zone, snapshots, tuple(builder.problems))


def snapshots(fleet: Fleet, builder: SnapshotBuilder) -> dict[str, Snapshot]:
    return builder.build(fleet)


def new_builder(settings: Settings) -> SnapshotBuilder:
    """A builder kept across examples (its memo sees fleets change, as the daemon's does)."""
    return SnapshotBuilder(forwarder_token=settings.forwarder_token)
