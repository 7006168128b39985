"""Which key an observed object belongs to, and which objects are watched at all.

Work flows by key, as through client-go's ``util/workqueue``: a change to one object costs
the key it belongs to. The keys:

- a cluster name: the cluster Service of that name (any Service labelled
  ``goatlas.io/cluster``, whatever the value, so a value that is not exactly ``"true"`` can
  be reported), and every Service and Secret atlasd owns for it (label
  ``goatlas.io/owner-cluster: <name>``);
- ``FLEET_KEY``: ``atlas-ca``, the fixed TLS Secrets (``atlasd-ads`` included),
  ``atlas-envoy-values``, and the local
  Alertmanager Services (``Settings.alertmanager_selector``).

Objects are watched in ``WatchedSet``s, each a label selector the API server filters by, so a
Service or Secret that has nothing to do with atlasd never reaches it. Fixed-name Secrets
written by the original Atlas (no ``managed-by`` label yet) are read by name by the leader
until it has adopted them (``atlasd.reconcile``); after that they are owned and watched.

The object fields read here (name, labels) and by every other module are read through
``atlasd.kube.bodies``, which sits below the fleet so that the Kubernetes layer reads them
the same way.
"""

from __future__ import annotations

from atlasd import labels
from atlasd.kube import bodies
from atlasd.kube.api import Obj
from atlasd.kube.resources import SECRETS, SERVICES
from atlasd.model import Settings
from atlasd.watch.watched import WatchedSet

FLEET_KEY = "*fleet*"
"""The fleet-wide key (never a cluster name: not a DNS label)."""

FIXED_SECRETS = (
    labels.CA_SECRET,
    labels.SERVER_SECRET,
    labels.CLIENT_SECRET,
    labels.TLS_SECRET,
    labels.ADS_SECRET,
    labels.OBS_VALUES_SECRET,
)
"""Secrets of the fleet-wide key, read by name even before atlasd owns them."""

MANAGED_SELECTOR = f"{labels.MANAGED_BY_LABEL}={labels.MANAGED_BY_VALUE}"

# One object of a key: (kind, name).
ObjectId = tuple[str, str]

# The role names: the one place they are spelled (state, keys and the reconciler compare
# against these).
CLUSTER_SERVICES = "cluster-services"
OWNED_SERVICES = "owned-services"
OWNED_SECRETS = "owned-secrets"
ALERTMANAGER_SERVICES = "alertmanager-services"


def roles(settings: Settings) -> tuple[WatchedSet, ...]:
    """The object sets atlasd watches, in the order the informers start."""
    out = [
        WatchedSet(CLUSTER_SERVICES, SERVICES, labels.CLUSTER_LABEL),
        WatchedSet(OWNED_SERVICES, SERVICES, MANAGED_SELECTOR),
        # The Envoy values (``<c>-envoy-values``, ``atlas-envoy-values``): written, never
        # read back, so cached as digests (~7 KB less per cluster).
        WatchedSet(
            OWNED_SECRETS,
            SECRETS,
            MANAGED_SELECTOR,
            digest_suffixes=(labels.VALUES_SECRET_SUFFIX,),
        ),
    ]
    if settings.alertmanager_selector:
        am = ",".join(f"{k}={v}" for k, v in settings.alertmanager_selector)
        out.append(WatchedSet(ALERTMANAGER_SERVICES, SERVICES, am))
    return tuple(out)


def key_of(role: str, obj: Obj) -> str:
    """The key an object of ``role`` belongs to."""
    if role == CLUSTER_SERVICES:
        return bodies.name(obj)
    if role == ALERTMANAGER_SERVICES:
        return FLEET_KEY
    if role == OWNED_SECRETS and bodies.name(obj) in FIXED_SECRETS:
        return FLEET_KEY
    owner = bodies.labels(obj).get(labels.OWNER_CLUSTER_LABEL)
    return owner if isinstance(owner, str) and owner else FLEET_KEY
