"""``atlasd probe``: which hop of a cluster's Thanos path is broken.

Calls Thanos's StoreAPI ``Info`` as Thanos Query does, through the observability Envoy by
the cluster's sidecar authority (``atlasd.query.probe``), and prints one line per cluster:
the hop it stopped at and what to do. Run it where Thanos Query runs (in the cluster:
``kubectl -n monitoring exec deploy/atlasd -- atlasd probe east``), or anywhere with
``--via`` naming the observability Envoy's Thanos listener. With ``--prometheus-via`` each
cluster's Prometheus path is probed too; with ``--alertmanager-via`` its Alertmanager
route (``alertmanager<i>``'s ``/-/ready`` through the observability Envoy's 10903, as the
cluster's downstream Envoy relays its alerts, with the cluster's certificate read from
``<c>-atlas-identity`` in Kubernetes or the store). Exit 0 when every path answers, 1
otherwise.
"""

from __future__ import annotations

import json
from dataclasses import asdict

import click
import trio

from atlasd import model
from atlasd.backend import BackendSpec
from atlasd.cli.app import cli
from atlasd.cli.options import backend_options, dial_param, env_option, fail
from atlasd.fleet.validate import is_dns_label
from atlasd.query.probe import (
    THANOS,
    Finding,
    known_alertmanagers,
    probe,
    probe_alertmanager,
    probe_prometheus,
)


async def _identities(
    backend: BackendSpec, names: tuple[str, ...]
) -> dict[str, tuple[model.CertKey, bytes]]:
    """Each cluster's client certificate and trust bundle (``<c>-atlas-identity``)."""
    from atlasd.clusterctl import client_identity

    async with backend.open() as opened:
        return {n: await client_identity(opened.api, n, settings=backend.settings) for n in names}


async def _probe_all(
    names: tuple[str, ...], *, via: str | None, prometheus_via: str | None,
    alertmanager_via: str | None, alertmanagers: int, backend: BackendSpec, domain: str,
    replica: int, within: float, slow_after: float,
) -> list[Finding]:  # fmt: skip
    """Each cluster's Thanos path, then (with ``prometheus_via``) its Prometheus path and
    (with ``alertmanager_via``) its Alertmanager route to each local Alertmanager."""
    ns = backend.namespace
    idents = await _identities(backend, names) if alertmanager_via is not None else {}
    out: list[list[Finding]] = [[] for _ in names]

    async def one(i: int, name: str) -> None:
        authority = model.service_host(f"{name}-thanos-sidecar{replica}", ns, domain)
        address = via or f"{authority}:{model.OBS_THANOS_PORT}"
        out[i].append(
            await probe(
                name, address=address, authority=authority, within=within, slow_after=slow_after
            )
        )
        if prometheus_via is not None:
            out[i].append(
                await probe_prometheus(
                    name, address=prometheus_via, within=within, slow_after=slow_after
                )
            )
        if alertmanager_via is not None:
            cert, trust = idents[name]
            for k in range(alertmanagers):
                out[i].append(
                    await probe_alertmanager(
                        name, address=alertmanager_via, index=k, namespace=ns, domain=domain,
                        identity=cert, trust=trust, within=within, slow_after=slow_after,
                    )
                )  # fmt: skip

    async with trio.open_nursery() as nursery:
        for i, name in enumerate(names):
            nursery.start_soon(one, i, name)
    return [f for found in out for f in known_alertmanagers(found)]


@cli.command("probe")
@backend_options
@click.argument("clusters", nargs=-1, required=True)
@env_option("--cluster-domain", env="ATLAS_CLUSTER_DOMAIN", default="cluster.local")
@click.option(
    "--via",
    callback=dial_param,
    default=None,
    help="host:port of the observability Envoy's Thanos listener (default: each cluster's "
    "sidecar Service, <c>-thanos-sidecar<i>.<ns>.svc.<domain>:10901, as Thanos Query dials).",
)
@click.option(
    "--prometheus-via",
    callback=dial_param,
    default=None,
    help="host:port of the observability Envoy's Prometheus listener (10904): also GET "
    "/prom/<c>/-/ready through it, the path Grafana takes to the cluster's Prometheus.",
)
@click.option(
    "--alertmanager-via",
    callback=dial_param,
    default=None,
    help="host:port of the observability Envoy's Alertmanager listener (10903, where the "
    "downstream Envoys relay alerts): also GET /-/ready of each local Alertmanager through "
    "it as the cluster's Envoy does, with the cluster's certificate (<c>-atlas-identity, "
    "read from Kubernetes or --store).",
)
@click.option(
    "--alertmanagers",
    default=1,
    show_default=True,
    type=click.IntRange(1, 64),
    help="How many local Alertmanagers to probe (alertmanager0..N-1) with --alertmanager-via.",
)
@click.option("--replica", default=0, show_default=True, type=click.IntRange(0, 63))
@click.option("--within", default=10.0, show_default=True, type=click.FloatRange(0.1, 300),
              help="Seconds to wait for an answer.")  # fmt: skip
@click.option("--slow-after", default=2.0, show_default=True, type=click.FloatRange(0, 300),
              help="An answer later than this many seconds is reported slow.")  # fmt: skip
@click.option("-o", "--output", type=click.Choice(["text", "json"]), default="text")
def probe_command(
    backend: BackendSpec, clusters: tuple[str, ...], cluster_domain: str, via: str | None,
    prometheus_via: str | None, alertmanager_via: str | None, alertmanagers: int,
    replica: int, within: float, slow_after: float, output: str,
) -> None:  # fmt: skip
    """Call each cluster's Thanos sidecar as Thanos Query does; name the hop that fails."""
    from atlasd.clusterctl import ClusterError
    from atlasd.kube.errors import KubeError

    for name in clusters:
        if not is_dns_label(name):
            fail(f"{name!r} is not a cluster name (a DNS-1123 label)")
    try:
        findings = trio.run(
            lambda: _probe_all(
                clusters, via=via, prometheus_via=prometheus_via,
                alertmanager_via=alertmanager_via, alertmanagers=alertmanagers,
                backend=backend, domain=cluster_domain, replica=replica,
                within=within, slow_after=slow_after,
            )
        )  # fmt: skip
    except (ClusterError, KubeError, ValueError) as exc:
        fail(str(exc))
    if output == "json":
        docs = [{**asdict(f), "labels": [dict(ls) for ls in f.labels], "fix": f.fix}
                for f in findings]  # fmt: skip
        click.echo(json.dumps(docs, indent=2))
    else:
        for f in findings:
            took = f"{f.seconds * 1000:.0f} ms"
            who = f.cluster if f.via == THANOS else f"{f.cluster} ({f.via})"
            if (f.ok or f.hop == "slow") and f.via == THANOS:
                labels = ", ".join(
                    "{" + ",".join(f'{k}="{v}"' for k, v in sorted(ls.items())) + "}"
                    for ls in f.labels
                )
                click.echo(f"{who}: {f.hop} (Info in {took}; labels {labels or 'none'})")
            elif f.ok or f.hop == "slow":
                click.echo(f"{who}: {f.hop} (ready in {took})")
            else:
                click.echo(f"{who}: {f.hop} after {took}: {f.detail}")
            if f.fix:
                click.echo(f"    -> {f.fix}")
    raise SystemExit(0 if all(f.ok for f in findings) else 1)
