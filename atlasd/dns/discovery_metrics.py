"""Metrics of Thanos Query's discovery: SRV answer sizes and the endpoint configuration.

Registered once per process on the default registry, like ``atlasd.metrics`` (served on
``/metrics`` with the rest). Names are an interface: the chart's alert rule
``AtlasdSrvAnswerTruncated`` and the docs (docs/dns.md) use them.
"""

from __future__ import annotations

from collections.abc import Mapping

from prometheus_client import Gauge

from atlasd.dns.answers import MAX_MESSAGE, AnswerSize

SRV_ANSWER_BYTES = Gauge(
    "atlasd_dns_srv_answer_bytes",
    "Size of the DNS answer (TCP, as CoreDNS compresses it) for each SRV name of the atlas. "
    f"zone; more than {MAX_MESSAGE} does not fit one DNS message.",
    ["name"],
)
SRV_ANSWER_RECORDS = Gauge(
    "atlasd_dns_srv_answer_records", "SRV records under each name of the atlas. zone.", ["name"]
)
SRV_ANSWER_TRUNCATED = Gauge(
    "atlasd_dns_srv_answer_truncated",
    "1 when the SRV answer for the name exceeds one DNS message: CoreDNS truncates it and "
    "Thanos Query fails every lookup of it (use the endpoint configuration or DNS groups).",
    ["name"],
)
ENDPOINTS = Gauge(
    "atlasd_thanos_endpoints",
    "Endpoints listed in each file of Thanos Query's endpoint configuration.",
    ["file"],
)
CONFIGMAP_TOO_LARGE = Gauge(
    "atlasd_thanos_endpoints_configmap_too_large",
    "1 while the endpoint configuration is larger than a ConfigMap holds (the ConfigMap "
    "is not updated; the files are).",
    ["configmap"],
)


class DiscoveryGauges:
    """Sets the gauges to the latest sizes and counts, removing label sets that went away
    (a group that no longer exists must not keep alerting)."""

    def __init__(self) -> None:
        # Label values currently exported by each gauge family.
        self._names: set[str] = set()
        self._files: set[str] = set()

    def answers(self, sizes: Mapping[str, AnswerSize]) -> None:
        for gone in self._names - sizes.keys():
            for gauge in (SRV_ANSWER_BYTES, SRV_ANSWER_RECORDS, SRV_ANSWER_TRUNCATED):
                gauge.remove(gone)
        for name, size in sizes.items():
            SRV_ANSWER_BYTES.labels(name).set(size.bytes)
            SRV_ANSWER_RECORDS.labels(name).set(size.records)
            SRV_ANSWER_TRUNCATED.labels(name).set(1 if size.truncated else 0)
        self._names = set(sizes)

    def endpoints(self, counts: Mapping[str, int]) -> None:
        for gone in self._files - counts.keys():
            ENDPOINTS.remove(gone)
        for key, count in counts.items():
            ENDPOINTS.labels(key).set(count)
        self._files = set(counts)
