"""``atlasd cluster add|list|remove|values|revoke``: downstream clusters in Kubernetes or
a store."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any, cast

import click
import yaml

from atlasd import labels, model
from atlasd.backend import BackendSpec
from atlasd.cli.app import cli
from atlasd.cli.options import (
    T,
    backend_options,
    external_ip_option,
    fail,
    output_option,
    overwrite_option,
    replicas_option,
    run_trio,
    values_format_option,
)
from atlasd.cli.status import print_table

# -- cluster ------------------------------------------------------------------------------


@cli.group()
def cluster() -> None:
    """Add, list, remove downstream clusters and print their Helm values."""


def _port_pair(
    ctx: click.Context, param: click.Parameter, value: tuple[str, ...]
) -> tuple[tuple[str, int], ...]:

    if not value:
        return model.DEFAULT_CLUSTER_PORTS
    out = []
    for item in value:
        name, eq, port = item.partition("=")
        if not eq or not port.isdigit() or not 1 <= int(port) <= 65535 or not name:
            raise click.BadParameter(
                f"{item!r} is not NAME=PORT (e.g. thanos=10901)", ctx=ctx, param=param
            )
        out.append((name, int(port)))
    return tuple(out)


def _cluster_call(fn: Callable[[Any], Awaitable[T]], backend: BackendSpec) -> T:
    """Run ``fn(api)`` against Kubernetes or the store; any failure is one line, exit 1."""
    from atlasd.clusterctl import ClusterError
    from atlasd.kube.errors import KubeError

    async def go() -> T:
        async with backend.open() as opened:
            return await fn(opened.api)

    try:
        return run_trio(go)
    except (ClusterError, KubeError, ValueError) as exc:
        fail(str(exc))


def add_cluster(
    *,
    backend: BackendSpec,
    name: str,
    external_ips: tuple[str, ...],
    replicas: int,
    ports: tuple[tuple[str, int], ...],
    annotations: dict[str, str],
    overwrite: bool,
    allow_loopback: bool,
    quiet: bool = False,
) -> None:
    from atlasd import clusterctl

    service = clusterctl.cluster_service(
        name=name,
        external_ips=external_ips,
        replicas=replicas,
        namespace=backend.namespace,
        ports=ports,
        annotations=annotations,
    )
    outcome = _cluster_call(
        lambda api: clusterctl.add(
            api,
            service,
            settings=backend.settings,
            overwrite=overwrite,
            allow_loopback=allow_loopback,
        ),
        backend,
    )
    click.echo(f"cluster {name} {outcome}", err=quiet)


def print_cluster_values(
    *, backend: BackendSpec, name: str, fmt: str, allow_loopback: bool = False
) -> None:
    from atlasd import clusterctl
    from atlasd.reconcile.values_formats import Format

    text = _cluster_call(
        lambda api: clusterctl.values(
            api,
            name,
            settings=backend.settings,
            fmt=cast(Format, fmt),
            allow_loopback=allow_loopback,
        ),
        backend,
    )
    click.echo(text, nl=not text.endswith("\n"))


@cluster.command("add")
@backend_options
@click.argument("name")
@external_ip_option
@replicas_option
@click.option(
    "--port",
    "ports",
    multiple=True,
    callback=_port_pair,
    help="NAME=PORT, repeatable (default "
    + ", ".join(f"{n}={p}" for n, p in model.DEFAULT_CLUSTER_PORTS)
    + ").",
)
@click.option(
    "--annotation",
    "annotations",
    multiple=True,
    help="KEY=VALUE annotation for the cluster Service (goatlas.io/...), repeatable.",
)
@overwrite_option
@click.option(
    "--enroll",
    is_flag=True,
    help="The cluster enrolls (annotation goatlas.io/enrollment=true: atlasd stores none "
    "of its keys) and a one-time join token for its agent is minted (printed on stdout "
    "alone; atlasd agent; needs atlasd running: the token pins its CA).",
)
@click.option("--allow-loopback", is_flag=True, hidden=True)
def cluster_add(
    backend: BackendSpec,
    name: str,
    external_ips: tuple[str, ...],
    replicas: int,
    ports: tuple[tuple[str, int], ...],
    annotations: tuple[str, ...],
    overwrite: bool,
    enroll: bool,
    allow_loopback: bool,
) -> None:
    """Add (or with --overwrite update) the cluster NAME."""
    ann: dict[str, str] = {}
    for item in annotations:
        key, eq, val = item.partition("=")
        if not eq:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="--annotation")
        ann[key] = val
    if enroll:
        if ann.get(labels.ENROLLMENT_ANNOTATION, "true") != "true":
            raise click.BadParameter(
                f"--enroll and {labels.ENROLLMENT_ANNOTATION}="
                f"{ann[labels.ENROLLMENT_ANNOTATION]} contradict each other",
                param_hint="--annotation",
            )
        # The cluster enrolls whatever atlasd's default: atlasd stores none of its keys.
        ann[labels.ENROLLMENT_ANNOTATION] = "true"
    add_cluster(
        backend=backend,
        name=name,
        external_ips=external_ips,
        replicas=replicas,
        ports=ports,
        annotations=ann,
        overwrite=overwrite,
        allow_loopback=allow_loopback,
        quiet=enroll,
    )
    if enroll:
        _print_token(backend, name, ttl_minutes=60, allow_loopback=allow_loopback)


@cluster.command("list")
@backend_options
@output_option
@click.option("--allow-loopback", is_flag=True, hidden=True)
def cluster_list(backend: BackendSpec, output: str, allow_loopback: bool) -> None:
    """List the clusters (and what is wrong with any that are rejected)."""
    from dataclasses import asdict

    from atlasd import clusterctl

    rows = _cluster_call(
        lambda api: clusterctl.list_clusters(
            api, settings=backend.settings, allow_loopback=allow_loopback
        ),
        backend,
    )
    if output == "json":
        click.echo(json.dumps([asdict(r) for r in rows], indent=2))
    elif output == "yaml":
        click.echo(yaml.safe_dump([asdict(r) for r in rows], sort_keys=False), nl=False)
    else:
        print_table(
            ["NAME", "EXTERNAL-IP", "REPLICAS", "PROBLEM"],
            [[r.name, r.external_ip, r.replicas, r.problem or "-"] for r in rows],
        )


@cluster.command("remove")
@backend_options
@click.argument("name")
def cluster_remove(backend: BackendSpec, name: str) -> None:
    """Remove the cluster NAME (atlasd then removes everything it made for it)."""
    from atlasd import clusterctl

    out = _cluster_call(
        lambda api: clusterctl.remove(api, name, settings=backend.settings), backend
    )
    if out.revoked:
        serials = ", ".join(f"{e.kind} (serial {e.serial})" for e in out.revoked)
        click.echo(f"cluster {name}: revoked its enrolled certificates: {serials}", err=True)
    if out.forgotten:
        click.echo(
            f"cluster {name}: deleted {out.forgotten} enrollment Secret(s) (join tokens, "
            "the record of its renewals)",
            err=True,
        )
    click.echo(f"cluster {name} removed")


@cluster.command("values")
@backend_options
@click.argument("name")
@values_format_option
@click.option("--allow-loopback", is_flag=True, hidden=True)
def cluster_values(backend: BackendSpec, name: str, fmt: str, allow_loopback: bool) -> None:
    """Print the Envoy chart values for the cluster NAME (they hold its private keys;
    NAME `atlas`: the observability Envoy's)."""
    print_cluster_values(backend=backend, name=name, fmt=fmt, allow_loopback=allow_loopback)


@cluster.command("revoke")
@backend_options
@click.argument("name")
@click.option(
    "--wait",
    "wait",
    type=click.FloatRange(min=0),
    default=0,
    show_default=True,
    help="Seconds to wait until atlasd has re-issued the certificates (0: do not wait).",
)
@click.option(
    "--rekey",
    is_flag=True,
    help="Also mint a one-time join token (printed on stdout) so the cluster's agent can "
    "enroll again with fresh keys (enrollment: atlasd agent).",
)
def cluster_revoke(backend: BackendSpec, name: str, wait: float, rekey: bool) -> None:
    """Revoke the current certificates of the cluster NAME (a leaked key): the
    observability Envoy and atlasd refuse them within seconds, atlasd re-issues them,
    and the downstream Envoy must be redeployed with the new values."""
    import datetime as dt

    from atlasd import clusterctl

    now = dt.datetime.now(dt.UTC)
    outcome = _cluster_call(
        lambda api: clusterctl.revoke(api, name, settings=backend.settings, now=now, wait=wait),
        backend,
    )
    certs = ", ".join(
        f"{e.kind} certificate serial {e.serial} (valid until {e.not_after:%Y-%m-%d})"
        for e in outcome.found
    )
    if outcome.added:
        click.echo(f"cluster {name}: revoked its {certs}", err=rekey)
    else:
        click.echo(f"cluster {name}: already revoked: {certs}", err=rekey)
    values = labels.values_secret_name(name)
    ns = backend.settings.namespace
    if outcome.reissued is False:
        fail(
            f"atlasd has not re-issued the certificates of cluster {name!r} within {wait:g} s: "
            "is a leader running? (atlasd status)"
        )
    said = "re-issued" if outcome.reissued else "re-issues"
    click.echo(
        f"The observability Envoy refuses them once atlasd pushes its configuration "
        f"(seconds), and a revoked certificate cannot renew. In compatible mode atlasd "
        f"{said} them into Secret {ns}/{values}: redeploy the downstream Envoy's Helm "
        f"release with those values (atlasd cluster values {name}); an enrolled cluster "
        f"enrolls again with a fresh join token (--rekey). Until then cluster {name} is "
        f"not reachable.",
        err=rekey,  # with --rekey, stdout is the token alone
    )
    if rekey:  # restart the cluster's agent with it, its certificate directory emptied
        _print_token(backend, name, ttl_minutes=60)


@cluster.command("token")
@backend_options
@click.argument("name")
@click.option(
    "--ttl",
    "ttl_minutes",
    type=click.IntRange(1, 7 * 24 * 60),
    default=60,
    show_default=True,
    help="Minutes the token may be used in (once).",
)
@click.option("--allow-loopback", is_flag=True, hidden=True)
def cluster_token(backend: BackendSpec, name: str, ttl_minutes: int, allow_loopback: bool) -> None:
    """Mint a one-time join token for the cluster NAME: `atlasd agent` enrolls with it
    (keys made on the downstream cluster, never sent). Printed once; atlasd stores only
    its hash."""
    _print_token(backend, name, ttl_minutes=ttl_minutes, allow_loopback=allow_loopback)


def _print_token(
    backend: BackendSpec, name: str, *, ttl_minutes: int, allow_loopback: bool = False
) -> None:
    """Mint a join token for ``name``: the token alone on stdout, what it is on stderr."""
    import datetime as dt

    from atlasd import clusterctl

    now = dt.datetime.now(dt.UTC)
    token, record = _cluster_call(
        lambda api: clusterctl.mint_token(
            api,
            name,
            settings=backend.settings,
            now=now,
            ttl=dt.timedelta(minutes=ttl_minutes),
            allow_loopback=allow_loopback,
        ),
        backend,
    )
    click.echo(str(token))
    click.echo(
        f"one-time join token for cluster {name}, valid until {record.expires:%Y-%m-%d %H:%M:%S} "
        "UTC: atlasd agent --token-file ... (docs/security.md, 'Enrollment')",
        err=True,
    )
