"""Which Kubernetes resources atlasd speaks to, and the URL paths that reach them.

An ``ApiResource`` names one API resource (group/version, kind, plural) the way a REST
mapper would (``atlasd.xds.snapshot.Resource`` is an Envoy resource); atlasd uses a
fixed, small set of them, so there is no discovery: ``resource_for`` maps an object's ``apiVersion``/``kind`` to one of the constants
below (or derives the plural the way Kubernetes names its built-in types).
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import quote


@dataclass(frozen=True)
class ApiResource:
    """One API resource, e.g. ``ApiResource("v1", "Service", "services")``."""

    api_version: str
    kind: str
    plural: str
    namespaced: bool = True

    @property
    def group(self) -> str:
        """The API group ("" for the core group)."""
        return self.api_version.rpartition("/")[0]

    @property
    def version(self) -> str:
        return self.api_version.rpartition("/")[2]

    def path(self, *, namespace: str | None = None, name: str | None = None) -> str:
        """The URL path of the collection (no name) or of one object."""
        base = "/api/v1" if self.api_version == "v1" else f"/apis/{self.api_version}"
        parts = [base]
        if self.namespaced:
            if not namespace:
                raise ValueError(f"{self.plural} is namespaced: a namespace is required")
            parts.append(f"namespaces/{quote(namespace, safe='')}")
        parts.append(self.plural)
        if name is not None:
            if not name:
                raise ValueError(f"an empty name for {self.plural}")
            parts.append(quote(name, safe=""))
        return "/".join(parts)

    def __str__(self) -> str:
        return self.plural if not self.group else f"{self.plural}.{self.group}"


SERVICES = ApiResource("v1", "Service", "services")
SECRETS = ApiResource("v1", "Secret", "secrets")
CONFIGMAPS = ApiResource("v1", "ConfigMap", "configmaps")
EVENTS = ApiResource("v1", "Event", "events")
PODS = ApiResource("v1", "Pod", "pods")
ENDPOINTS = ApiResource("v1", "Endpoints", "endpoints")
NAMESPACES = ApiResource("v1", "Namespace", "namespaces", namespaced=False)
SERVICEACCOUNTS = ApiResource("v1", "ServiceAccount", "serviceaccounts")
LEASES = ApiResource("coordination.k8s.io/v1", "Lease", "leases")
ROLES = ApiResource("rbac.authorization.k8s.io/v1", "Role", "roles")
ROLEBINDINGS = ApiResource("rbac.authorization.k8s.io/v1", "RoleBinding", "rolebindings")
CLUSTERROLES = ApiResource("rbac.authorization.k8s.io/v1", "ClusterRole", "clusterroles", False)
CLUSTERROLEBINDINGS = ApiResource(
    "rbac.authorization.k8s.io/v1", "ClusterRoleBinding", "clusterrolebindings", False
)
ENDPOINTSLICES = ApiResource("discovery.k8s.io/v1", "EndpointSlice", "endpointslices")
DEPLOYMENTS = ApiResource("apps/v1", "Deployment", "deployments")
SELFSUBJECTREVIEWS = ApiResource(
    "authentication.k8s.io/v1", "SelfSubjectReview", "selfsubjectreviews", False
)

KNOWN: tuple[ApiResource, ...] = (
    SERVICES,
    SECRETS,
    CONFIGMAPS,
    EVENTS,
    PODS,
    ENDPOINTS,
    NAMESPACES,
    SERVICEACCOUNTS,
    LEASES,
    ROLES,
    ROLEBINDINGS,
    CLUSTERROLES,
    CLUSTERROLEBINDINGS,
    ENDPOINTSLICES,
    DEPLOYMENTS,
    SELFSUBJECTREVIEWS,
)
_BY_KIND: dict[tuple[str, str], ApiResource] = {(r.api_version, r.kind): r for r in KNOWN}


def _plural(kind: str) -> str:
    lower = kind.lower()
    if lower.endswith(("s", "x", "z", "ch", "sh")):
        return lower + "es"
    if lower.endswith("y") and len(lower) > 1 and lower[-2] not in "aeiou":
        return lower[:-1] + "ies"
    return lower + "s"


def resource_for(api_version: str, kind: str) -> ApiResource:
    """The resource of an object with this ``apiVersion`` and ``kind``.

    Known resources come from the table above; any other kind is assumed namespaced,
    with the plural Kubernetes would give it (``HelmChart`` -> ``helmcharts``).
    """
    if not api_version or not kind:
        raise ValueError("an object needs apiVersion and kind")
    found = _BY_KIND.get((api_version, kind))
    if found is not None:
        return found
    return ApiResource(api_version, kind, _plural(kind))


# What atlasd itself calls in its own namespace, as (apiGroup, resource, verb): the
# chart's Role should grant exactly these. Writes are server-side apply (patch), create,
# update (PUT with a resourceVersion) and delete; Events are created, then patched to
# bump ``count``; the Lease is read, created and updated (never listed or watched).
_OBJECT_VERBS = ("get", "list", "watch", "create", "update", "patch", "delete")
REQUIRED_PERMISSIONS: frozenset[tuple[str, str, str]] = frozenset(
    {("", r.plural, v) for r in (SERVICES, SECRETS, CONFIGMAPS) for v in _OBJECT_VERBS}
    | {("", EVENTS.plural, v) for v in ("create", "patch", "list")}
    | {(LEASES.group, LEASES.plural, v) for v in ("get", "create", "update")}
)
