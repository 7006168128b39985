"""``atlasd probe``: which hop of a cluster's Thanos path is broken.

Calls Thanos's StoreAPI ``Info`` as Thanos Query does, through the observability Envoy by
the cluster's sidecar authority (``atlasd.query.probe``), and prints one line per cluster:
the hop it stopped at and what to do. Run it where Thanos Query runs (in the cluster:
``kubectl -n monitoring exec deploy/atlasd -- atlasd probe east``), or anywhere with
``--via`` naming the observability Envoy's Thanos listener. Exit 0 when every cluster
answers, 1 otherwise.
"""

from __future__ import annotations

import json
from dataclasses import asdict

import click
import trio

from atlasd import model
from atlasd.cli.app import cli
from atlasd.cli.options import dial_param, env_option, fail, namespace_param
from atlasd.fleet.validate import is_dns_label
from atlasd.query.probe import THANOS, Finding, probe, probe_prometheus


async def _probe_all(
    names: tuple[str, ...], *, via: str | None, prometheus_via: str | None, ns: str,
    domain: str, replica: int, within: float, slow_after: float,
) -> list[Finding]:  # fmt: skip
    """Each cluster's Thanos path, then (with ``prometheus_via``) its Prometheus path."""
    out: list[Finding | None] = [None] * (len(names) * 2)

    async def one(i: int, name: str) -> None:
        authority = model.service_host(f"{name}-thanos-sidecar{replica}", ns, domain)
        address = via or f"{authority}:{model.OBS_THANOS_PORT}"
        out[2 * i] = await probe(
            name, address=address, authority=authority, within=within, slow_after=slow_after
        )
        if prometheus_via is not None:
            out[2 * i + 1] = await probe_prometheus(
                name, address=prometheus_via, within=within, slow_after=slow_after
            )

    async with trio.open_nursery() as nursery:
        for i, name in enumerate(names):
            nursery.start_soon(one, i, name)
    return [f for f in out if f is not None]


@cli.command("probe")
@click.argument("clusters", nargs=-1, required=True)
@env_option(
    "--namespace", "-n", env="NAMESPACE", default=model.DEFAULT_NAMESPACE,
    callback=namespace_param, help="atlasd's namespace (the sidecar Services').",
)  # fmt: skip
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
@click.option("--replica", default=0, show_default=True, type=click.IntRange(0, 63))
@click.option("--within", default=10.0, show_default=True, type=click.FloatRange(0.1, 300),
              help="Seconds to wait for an answer.")  # fmt: skip
@click.option("--slow-after", default=2.0, show_default=True, type=click.FloatRange(0, 300),
              help="An answer later than this many seconds is reported slow.")  # fmt: skip
@click.option("-o", "--output", type=click.Choice(["text", "json"]), default="text")
def probe_command(
    clusters: tuple[str, ...], namespace: str, cluster_domain: str, via: str | None,
    prometheus_via: str | None, replica: int, within: float, slow_after: float, output: str,
) -> None:  # fmt: skip
    """Call each cluster's Thanos sidecar as Thanos Query does; name the hop that fails."""
    for name in clusters:
        if not is_dns_label(name):
            fail(f"{name!r} is not a cluster name (a DNS-1123 label)")
    findings = trio.run(
        lambda: _probe_all(
            clusters, via=via, prometheus_via=prometheus_via, ns=namespace,
            domain=cluster_domain, replica=replica,
            within=within, slow_after=slow_after,
        )
    )  # fmt: skip
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
