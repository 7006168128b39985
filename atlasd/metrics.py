"""atlasd's own Prometheus metrics (served on ``/metrics``), in one place.

Registered once per process on the default registry. The xDS server's metrics live with it
(``atlasd.xds.status.XdsMetrics``: they take a registry so its tests stay isolated).
Names are an interface: the chart's alert rules and dashboard query them.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

KUBE_REQUESTS = Counter(
    "atlasd_kube_requests",
    "Requests to the Kubernetes API, by verb, resource and HTTP status code.",
    ["verb", "resource", "code"],
)
RECONCILE_SECONDS = Histogram(
    "atlasd_reconcile_duration_seconds",
    "Duration of reconciling one key (leader); kind=key for a watch-driven key, "
    "kind=full for a full pass (start, resync, after a conflict).",
    ["kind"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
RECONCILE_WRITES = Counter("atlasd_reconcile_writes", "Object writes made by reconcile.")
RECONCILE_ERRORS = Counter(
    "atlasd_reconcile_errors",
    "Reconcile failures: a key whose writes the API server refused, or a conflict.",
)
INVALID = Gauge(
    "atlasd_invalid_clusters",
    "Cluster Services rejected (validation, a duplicate external IP, a label value that "
    'is not exactly "true").',
)
CLUSTERS = Gauge("atlasd_clusters", "Downstream clusters being served.")
PENDING = Gauge(
    "atlasd_pending_clusters", "Valid cluster Services whose certificates are not stored yet."
)
LEADER = Gauge("atlasd_leader", "1 while this replica holds the Lease.")
CERT_EXPIRY = Gauge(
    "atlasd_certificate_expiry_timestamp_seconds",
    "notAfter of each certificate atlasd serves (unix time).",
    ["name"],
)
CERT_RENEWAL = Gauge(
    "atlasd_certificate_renewal_timestamp_seconds",
    "When atlasd renews each certificate it serves (unix time; renew_fraction of its life).",
    ["name"],
)
FLEET_SECONDS = Histogram(
    "atlasd_fleet_publish_duration_seconds",
    "Deriving one fleet version from watch changes (validation, trust checks).",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
