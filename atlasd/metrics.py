"""atlasd's own Prometheus metrics (served on ``/metrics``), in one place.

Registered once per process on the default registry. The xDS server's metrics live with it
(``atlasd.xds.streams.XdsMetrics``: they take a registry so its tests stay isolated).
Names are an interface: the chart's alert rules and dashboard query them.

The families with a series per cluster (the certificate timestamps: four series per cluster,
20,000 at 5,000 clusters) are ``KeyedGauge``s, kept apart from the registry: each keeps its
exposition text line by line as clusters change, so a scrape joins kept bytes instead of
formatting every series (prometheus_client's ``generate_latest`` took ~0.2-0.5 s of CPU for
them at 5,000 clusters, holding the event loop or, in a worker thread, the GIL).
``exposition`` serves the registry and these together (``/metrics``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence

from prometheus_client import Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

# prometheus_client's own float spelling (``+Inf``, ``1e+10``), so a series reads as its
# registry would serve it (the function is not annotated upstream).
_go_float: Callable[[float], str] = floatToGoString


def _escape_label(value: str) -> str:
    # The text format's escapes for a label value (backslash, double quote, line feed).
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class KeyedGauge(Collector):
    """A gauge family with one label whose series are owned by keys (a cluster's series are
    replaced together), kept as exposition text: a change of one key renders that key's
    lines, a scrape joins the kept lines (the family's text is kept too until the next
    change). Invariants: ``_lines[value]`` is the rendered line of the series labelled
    ``value`` and ``_owner[value]`` the key that set it last; ``_keys[key]`` the label values
    ``key`` set; ``_text`` is None or the family's text for the current ``_lines``.

    A ``Collector`` too (``collect``), for readers of samples; it is not registered on the
    default registry (``exposition`` serves its text)."""

    def __init__(self, name: str, documentation: str, label: str) -> None:
        self.name = name
        self.documentation = documentation
        self.label = label
        self._head = generate_latest(_Families(GaugeMetricFamily(name, documentation)))
        self._lines: dict[str, bytes] = {}
        self._values: dict[str, float] = {}
        self._owner: dict[str, str] = {}
        self._keys: dict[str, tuple[str, ...]] = {}
        self._text: bytes | None = None

    def set_key(self, key: str, series: Mapping[str, float]) -> None:
        """Replace ``key``'s series with ``series`` (label value -> value; empty: none)."""
        old = self._keys.pop(key, ())
        if not old and not series:
            return
        for value in old:
            if value not in series and self._owner.get(value) == key:
                del self._lines[value], self._values[value], self._owner[value]
        for value, number in series.items():
            if self._values.get(value) != number or value not in self._lines:
                self._lines[value] = (
                    f'{self.name}{{{self.label}="{_escape_label(value)}"}} {_go_float(number)}\n'
                ).encode()
                self._values[value] = number
            self._owner[value] = key
        if series:
            self._keys[key] = tuple(series)
        self._text = None

    def text(self) -> bytes:
        """The family in the text exposition format (``# HELP``, ``# TYPE``, every series)."""
        if self._text is None:
            self._text = self._head + b"".join(self._lines.values())
        return self._text

    def samples(self) -> dict[str, float]:
        """Label value -> value, every series."""
        return dict(self._values)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(self.name, self.documentation, labels=[self.label])
        for value, number in self._values.items():
            family.add_metric([value], number)
        yield family


class _Families(Collector):
    def __init__(self, *families: GaugeMetricFamily) -> None:
        self._families = families

    def collect(self) -> Iterator[GaugeMetricFamily]:
        yield from self._families


def exposition(registry: Collector, keyed: Sequence[KeyedGauge]) -> bytes:
    """``/metrics``: the registry's families, then the keyed ones' kept text."""
    return b"".join((generate_latest(registry), *(family.text() for family in keyed)))


LOOP_BUSY = Histogram(
    "atlasd_event_loop_busy_seconds",
    "How long the event loop ran ready tasks between two looks at I/O (one batch; "
    "atlasd.watchdog): what a change, push or scrape that became ready meanwhile waited "
    "at most.",
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
LOOP_BUSY_MAX = Gauge(
    "atlasd_event_loop_busy_max_seconds",
    "The longest event loop batch since the process started (atlasd.watchdog).",
)
LOOP_STALLS = Counter(
    "atlasd_event_loop_stalls",
    "Event loop batches longer than the stall threshold (--stall-threshold; "
    "atlasd.watchdog); each is logged at WARNING with the code that held the loop (at most "
    "one line per 10 s).",
)
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
RECONCILE_DEFERRED = Counter(
    "atlasd_reconcile_deferred_seconds",
    "Seconds the leader's reconcile workers waited for a fleet-wide push of this replica's "
    "ADS server (xDS first: a fleet-wide change reaches the Envoys before the Secrets it "
    "rewrites).",
)
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
# One series per SRV name the zone serves: the port names (thanos, ...) times the DNS groups
# plus one; a handful, whatever the number of clusters.
DNS_ANSWER_BYTES = Gauge(
    "atlasd_dns_srv_answer_bytes",
    "Size of the DNS answer for each SRV name of the zone (at most 65535 fit in one message).",
    ["name"],
)
THANOS_ENDPOINTS = Gauge(
    "atlasd_thanos_endpoints",
    "Endpoints listed in each file of Thanos Query's endpoint configuration.",
    ["file"],
)
ENDPOINTS_CONFIGMAP_TOO_LARGE = Gauge(
    "atlasd_thanos_endpoints_configmap_too_large",
    "1 while the endpoint configuration is larger than a ConfigMap holds (the ConfigMap "
    "is not updated; the files are).",
    ["configmap"],
)
QUERY_UP = Gauge(
    "atlasd_query_up", "1 when the last read of Thanos Query's stores (--thanos-query-url) worked."
)
QUERY_CLUSTERS = Gauge(
    "atlasd_query_clusters",
    "Clusters by what Thanos Query sees: seen, unseen (served by atlasd, no healthy store "
    "in Query), unknown (stores in Query atlasd does not serve), duplicate (a cluster whose "
    "external labels another cluster's store announces too).",
    ["state"],
)
QUERY_PROBES = Gauge(
    "atlasd_query_probe_clusters",
    "Clusters Thanos Query does not see, by the hop atlasd's last probe of their path "
    "stopped at (atlasd probe's hops: a handful of series, whatever the fleet's size).",
    ["hop"],
)
# A series per certificate (two per cluster, and the fleet-wide ones): set per key by
# ``atlasd.report.FleetReport``, served by ``exposition`` (not on the registry).
CERT_EXPIRY = KeyedGauge(
    "atlasd_certificate_expiry_timestamp_seconds",
    "notAfter of each certificate atlasd serves (unix time).",
    "name",
)
CERT_RENEWAL = KeyedGauge(
    "atlasd_certificate_renewal_timestamp_seconds",
    "When atlasd renews each certificate it serves (unix time; renew_fraction of its life).",
    "name",
)
KEYED: tuple[KeyedGauge, ...] = (CERT_EXPIRY, CERT_RENEWAL)
REVOKED = Gauge(
    "atlasd_revoked_certificates",
    "Revoked certificates in force (Secret atlas-revocations, until each one's notAfter).",
)
REVOKED_REISSUED = Counter(
    "atlasd_revoked_reissued",
    "Leaf certificates the leader re-issued because they were revoked (atlasd cluster revoke).",
)
FLEET_SECONDS = Histogram(
    "atlasd_fleet_publish_duration_seconds",
    "Deriving one fleet version from watch changes (validation, trust checks).",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)

# -- work queues: client-go's workqueue metrics (k8s.io/client-go/util/workqueue/metrics.go,
# registered as k8s.io/component-base registers them), same names, meanings and buckets, so
# dashboards and alerts made for Kubernetes controllers read atlasd's queues too. Label
# ``name``: the queue (``fleet``: watch changes to fleet versions; ``reconcile``: the
# leader's writes). ``atlasd.watch.workqueue`` keeps them.
_QUEUE_BUCKETS = tuple(1e-8 * 10**i for i in range(10))  # 10 ns .. 10 s, client-go's
WORKQUEUE_DEPTH = Gauge(
    "workqueue_depth",
    "Current depth of workqueue: keys added and not yet handed to a worker (a key re-added "
    "while a worker has it counts until it is handed out again).",
    ["name"],
)
WORKQUEUE_ADDS = Counter(
    "workqueue_adds",
    "Total number of adds handled by workqueue (an add of a key already waiting coalesces "
    "and is not counted).",
    ["name"],
)
WORKQUEUE_QUEUE_SECONDS = Histogram(
    "workqueue_queue_duration_seconds",
    "How long in seconds an item stays in workqueue before being requested.",
    ["name"],
    buckets=_QUEUE_BUCKETS,
)
WORKQUEUE_WORK_SECONDS = Histogram(
    "workqueue_work_duration_seconds",
    "How long in seconds processing an item from workqueue takes.",
    ["name"],
    buckets=_QUEUE_BUCKETS,
)
WORKQUEUE_UNFINISHED_SECONDS = Gauge(
    "workqueue_unfinished_work_seconds",
    "How many seconds of work has done that is in progress and hasn't been observed by "
    "work_duration. Large values indicate stuck threads. One can deduce the number of stuck "
    "threads by observing the rate at which this increases.",
    ["name"],
)
WORKQUEUE_LONGEST_SECONDS = Gauge(
    "workqueue_longest_running_processor_seconds",
    "How many seconds has the longest running processor for workqueue been running.",
    ["name"],
)
WORKQUEUE_RETRIES = Counter(
    "workqueue_retries",
    "Total number of retries handled by workqueue: delayed adds (add_after, "
    "add_rate_limited), as client-go counts them.",
    ["name"],
)
