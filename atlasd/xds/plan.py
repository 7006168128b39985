"""Where each Envoy listens, and how the builders address local services.

The ports of the design (``atlasd.model``) are the defaults. Tests and the local demo
run several downstream Envoys on one loopback host, so every downstream node may get
its own ports through ``ListenPlan.downstream``; the observability Envoy's upstream
clusters use the same per-node ports, so both ends always agree.

The ports are not read from the cluster Service: its named ports are copied onto the
sidecar Services and into the DNS zone, so they describe what Thanos Query dials, not
where the downstream Envoy listens.
"""

from __future__ import annotations

from dataclasses import dataclass

from atlasd import model


@dataclass(frozen=True)
class ObservabilityPorts:
    """Listeners of the observability Envoy (node ``atlas``)."""

    xds: int = model.OBS_XDS_PORT
    thanos: int = model.OBS_THANOS_PORT
    alertmanager: int = model.OBS_ALERTMANAGER_PORT
    prometheus: int = model.OBS_PROMETHEUS_PORT
    address: str = "0.0.0.0"


@dataclass(frozen=True)
class NodePorts:
    """Listeners of one downstream Envoy (and what the observability Envoy dials)."""

    thanos: int = model.DOWNSTREAM_THANOS_PORT
    prometheus: int = model.DOWNSTREAM_PROMETHEUS_PORT
    alertmanager: int = model.DOWNSTREAM_ALERTMANAGER_PORT
    address: str = "0.0.0.0"


@dataclass(frozen=True)
class ListenPlan:
    """Ports per node plus the host template of observability-cluster Services.

    ``local_service_host`` is formatted with ``name``, ``namespace`` and ``domain`` to
    find a local Alertmanager Service (the demo sets it to ``127.0.0.1``).
    """

    observability: ObservabilityPorts = ObservabilityPorts()
    downstream_default: NodePorts = NodePorts()
    downstream: tuple[tuple[str, NodePorts], ...] = ()
    local_service_host: str = "{name}.{namespace}.svc.{domain}"

    def ports_for(self, node: str) -> NodePorts:
        for name, ports in self.downstream:
            if name == node:
                return ports
        return self.downstream_default

    def service_host(self, *, name: str, namespace: str, domain: str) -> str:
        return self.local_service_host.format(name=name, namespace=namespace, domain=domain)
