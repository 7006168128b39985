"""The ``atlasd`` command line (click).

click rather than argparse: nested command groups, an environment variable for every
option (``show_envvar``), and in-process testing with ``CliRunner``. Environment names
keep the original chart's where they exist (``ATLAS_ENVOY_ADS_ADDRESS``, ...).

Exit codes: 0 success; 1 the request failed (the message says why); 2 bad usage (click).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar, cast

import click
import trio
import yaml

from atlasd import __version__
from atlasd.model import Settings

T = TypeVar("T")


def _selector(
    ctx: click.Context, param: click.Parameter, value: str
) -> tuple[tuple[str, str], ...]:
    from atlasd.fleet.validate import parse_selector

    try:
        return parse_selector(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx=ctx, param=param) from None


def _hostport(ctx: click.Context, param: click.Parameter, value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise click.BadParameter(f"{value!r} is not HOST:PORT", ctx=ctx, param=param)
    return host.strip("[]") or "0.0.0.0", int(port)


def _env_option(*decls: str, env: str, **kwargs: Any) -> Callable[[Any], Any]:
    """A click option read from ``env`` too, with its default and variable in --help."""
    return click.option(*decls, envvar=env, show_envvar=True, show_default=True, **kwargs)


def _common_settings(f: Callable[..., Any]) -> Callable[..., Any]:
    """Options that shape Settings, shared by ``run`` and the cluster commands."""
    opts = [
        _env_option(
            "--namespace",
            "-n",
            env="NAMESPACE",
            default="monitoring",
            help="atlasd's namespace (where cluster Services live).",
        ),
        _env_option(
            "--kubeconfig",
            env="ATLAS_KUBECONFIG",
            default=None,
            help="kubeconfig file (default: $KUBECONFIG, ~/.kube/config, then in-cluster).",
        ),
        click.option("--context", default=None, help="kubeconfig context to use."),
        _env_option(
            "--store",
            type=click.Path(file_okay=False, path_type=Path),
            env="ATLAS_STORE",
            default=None,
            help="Standalone mode: no Kubernetes; clusters and state in this directory.",
        ),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def _run_trio(fn: Callable[[], Awaitable[T]]) -> T:
    return trio.run(fn)


def _api(kubeconfig: str | None, context: str | None, store: Path | None, namespace: str) -> Any:
    if store is not None:
        from atlasd.standalone import FileStore

        return FileStore(store, namespace=namespace)
    from atlasd.kube.client import KubeClient
    from atlasd.kube.config import load_config

    return KubeClient(load_config(kubeconfig, context))


def _fail(message: str) -> None:
    click.secho(f"error: {message}", fg="red", err=True)
    sys.exit(1)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option(
    "--log-level",
    envvar="ATLAS_LOG_LEVEL",
    default="info",
    show_default=True,
    type=click.Choice(["debug", "info", "warning", "error"]),
)
def cli(log_level: str) -> None:
    """atlasd: PKI, Envoy xDS and DNS discovery for Thanos across many clusters."""
    logging.basicConfig(
        level=getattr(logging, log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # Per-request lines from the HTTP client are noise at info level.
    logging.getLogger("httpx").setLevel(logging.WARNING)


@cli.command()
def version() -> None:
    """Print atlasd's version."""
    click.echo(f"atlasd {__version__}")


# -- run --------------------------------------------------------------------------------


@cli.command()
@_common_settings
@_env_option(
    "--zone-file",
    type=click.Path(dir_okay=False, path_type=Path),
    env="ATLAS_ZONE_FILE",
    default="atlas.zone",
    help="Where the DNS zone is written (CoreDNS reads it).",
)
@_env_option(
    "--ads-listen",
    env="ATLAS_ADS_LISTEN",
    default="0.0.0.0:6305",
    callback=_hostport,
    help="The ADS gRPC server's address.",
)
@_env_option(
    "--http-listen",
    env="ATLAS_HTTP_LISTEN",
    default="0.0.0.0:6309",
    callback=_hostport,
    help="Metrics, health and status address.",
)
@_env_option(
    "--envoy-ads-address",
    env="ATLAS_ENVOY_ADS_ADDRESS",
    default="127.0.0.1",
    help="Address downstream Envoys reach xDS at (the observability Envoy).",
)
@_env_option(
    "--envoy-ads-port",
    env="ATLAS_ENVOY_ADS_PORT",
    default=10900,
    type=click.IntRange(1, 65535),
)
@_env_option(
    "--envoy-address",
    env="ATLAS_ENVOY_ADDRESS",
    default="127.0.0.1",
    help="Address downstream Envoys forward alerts to (observability Envoy :10903).",
)
@_env_option(
    "--atlasd-ads-host",
    env="ATLAS_ADS_SERVICE",
    default="atlasd.monitoring.svc.cluster.local",
    help="Where the observability Envoy reaches this ADS server.",
)
@_env_option(
    "--atlasd-ads-port",
    env="ATLAS_ADS_SERVICE_PORT",
    default=6305,
    type=click.IntRange(1, 65535),
)
@_env_option(
    "--dns-configmap",
    env="ATLAS_DNS_CM_NAME",
    default="atlas-coredns",
    help="ConfigMap mirroring the zone.",
)
@_env_option(
    "--alertmanager-selector",
    env="ATLAS_ALERTMANAGER_SELECTOR",
    default="app=kube-prometheus-stack-alertmanager",
    callback=_selector,
    help="Label selector of the local Alertmanager Services.",
)
@_env_option(
    "--cluster-domain",
    env="ATLAS_CLUSTER_DOMAIN",
    default="cluster.local",
)
@_env_option(
    "--leaf-days",
    env="ATLAS_LEAF_DAYS",
    default=365,
    type=click.IntRange(1, 3650),
    help="Lifetime of leaf certificates; renewed after 2/3 of it.",
)
@_env_option(
    "--leader-election/--no-leader-election",
    env="ATLAS_LEADER_ELECTION",
    default=True,
)
@_env_option("--lease-name", env="ATLAS_LEASE_NAME", default="atlasd")
@_env_option(
    "--identity",
    env="POD_NAME",
    default=None,
    help="Leader election identity (default: host name).",
)
@_env_option(
    "--allow-loopback",
    is_flag=True,
    env="ATLAS_ALLOW_LOOPBACK",
    help="Accept loopback external IPs (local demos and tests).",
)
@_env_option(
    "--forwarder-token-file",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    env="ATLAS_FORWARDER_TOKEN_FILE",
    default=None,
    help="Shared secret the observability Envoy adds to forwarded xDS streams.",
)
@_env_option(
    "--shutdown-grace",
    env="ATLAS_SHUTDOWN_GRACE",
    default=10.0,
    type=click.FloatRange(1, 300),
    help="Seconds allowed for a clean stop after SIGTERM.",
)
def run(
    namespace: str,
    kubeconfig: str | None,
    context: str | None,
    store: Path | None,
    zone_file: Path,
    ads_listen: tuple[str, int],
    http_listen: tuple[str, int],
    envoy_ads_address: str,
    envoy_ads_port: int,
    envoy_address: str,
    atlasd_ads_host: str,
    atlasd_ads_port: int,
    dns_configmap: str,
    alertmanager_selector: tuple[tuple[str, str], ...],
    cluster_domain: str,
    leaf_days: int,
    leader_election: bool,
    lease_name: str,
    identity: str | None,
    allow_loopback: bool,
    forwarder_token_file: Path | None,
    shutdown_grace: float,
) -> None:
    """Run the daemon: watch, reconcile (leader), serve xDS, write the zone."""
    from atlasd.daemon import Daemon, DaemonOptions

    settings = Settings(
        namespace=namespace,
        cluster_domain=cluster_domain,
        atlasd_ads_host=atlasd_ads_host,
        atlasd_ads_port=atlasd_ads_port,
        envoy_ads_address=envoy_ads_address,
        envoy_ads_port=envoy_ads_port,
        envoy_address=envoy_address,
        dns_configmap_name=dns_configmap,
        alertmanager_selector=alertmanager_selector,
        leaf_lifetime=dt.timedelta(days=leaf_days),
        forwarder_token=forwarder_token_file.read_text().strip() if forwarder_token_file else None,
    )
    options = DaemonOptions(
        settings=settings,
        kubeconfig=kubeconfig,
        context=context,
        store=store,
        zone_file=zone_file,
        ads_host=ads_listen[0],
        ads_port=ads_listen[1],
        http_host=http_listen[0],
        http_port=http_listen[1],
        leader_election=leader_election,
        lease_name=lease_name,
        allow_loopback=allow_loopback,
        identity=identity or socket.gethostname(),
    )
    serve_until_signalled(lambda: Daemon(options).run(), grace=shutdown_grace)


def serve_until_signalled(
    main: Callable[[], Awaitable[None]],
    *,
    grace: float,
    on_started: Callable[[], None] | None = None,
) -> None:
    """Run ``main`` until SIGTERM/SIGINT, then cancel it; a stop taking longer than
    ``grace`` seconds ends the process hard (exit 1) rather than hang half alive."""

    async def supervised() -> None:
        # The receiver must outlive the task reading it: open it around the nursery.
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as nursery:

                async def wait_signal() -> None:
                    async for sig in signals:
                        logging.getLogger("atlasd").info(
                            "%s: stopping (grace %.0fs)", signal.Signals(sig).name, grace
                        )
                        _arm_watchdog(grace)
                        nursery.cancel_scope.cancel()
                        return

                nursery.start_soon(wait_signal)
                await main()
                nursery.cancel_scope.cancel()

    trio.run(supervised)


def _arm_watchdog(grace: float) -> None:
    def expire() -> None:
        sys.stderr.write(f"atlasd: did not stop within {grace:.0f}s; exiting\n")
        sys.stderr.flush()
        os._exit(1)

    timer = threading.Timer(grace, expire)
    timer.daemon = True
    timer.start()


# -- demo ---------------------------------------------------------------------------------


def _loopback_block(ctx: click.Context, param: click.Parameter, value: str) -> str:
    parts = value.split(".")
    if len(parts) != 3 or parts[0] != "127" or not all(p.isdigit() and int(p) < 256 for p in parts):
        raise click.BadParameter(
            f"{value!r} is not a loopback /24 like 127.0.0", ctx=ctx, param=param
        )
    return value


@cli.command()
@click.option(
    "--dir",
    "workdir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Keep the demo's state here (default: a temporary directory, removed at exit).",
)
@click.option("--ads-port", default=6305, show_default=True, type=click.IntRange(1, 65535))
@click.option("--http-port", default=6309, show_default=True, type=click.IntRange(1, 65535))
@click.option("--check", is_flag=True, help="Start, verify traffic through the Envoy chain, stop.")
@click.option(
    "--loopback",
    default="127.0.0",
    show_default=True,
    callback=_loopback_block,
    help="The /24 of loopback to use: observability on .1, clusters on .2 and .3.",
)
def demo(workdir: Path | None, ads_port: int, http_port: int, check: bool, loopback: str) -> None:
    """Run the whole design locally on loopback: atlasd, real Envoys, real Prometheus."""
    from atlasd.demo import DemoError, DemoOptions, run_demo

    options = DemoOptions(
        workdir=workdir, ads_port=ads_port, http_port=http_port, check=check, loopback=loopback
    )
    try:
        serve_until_signalled(lambda: _discard(run_demo(options)), grace=20)
    except DemoError as exc:
        _fail(str(exc))


async def _discard(coro: Awaitable[Any]) -> None:
    await coro


# -- cluster ------------------------------------------------------------------------------


@cli.group()
def cluster() -> None:
    """Add, list, remove downstream clusters and print their Helm values."""


def _port_pair(
    ctx: click.Context, param: click.Parameter, value: tuple[str, ...]
) -> tuple[tuple[str, int], ...]:
    from atlasd.clusterctl import DEFAULT_PORTS

    if not value:
        return DEFAULT_PORTS
    out = []
    for item in value:
        name, eq, port = item.partition("=")
        if not eq or not port.isdigit() or not 1 <= int(port) <= 65535 or not name:
            raise click.BadParameter(
                f"{item!r} is not NAME=PORT (e.g. thanos=10901)", ctx=ctx, param=param
            )
        out.append((name, int(port)))
    return tuple(out)


@cluster.command("add")
@_common_settings
@click.argument("name")
@click.option("--external-ip", required=True, help="The downstream Envoy's reachable address.")
@click.option(
    "--replicas",
    default=1,
    show_default=True,
    type=click.IntRange(1, 64),
    help="Thanos/Prometheus replicas on that cluster.",
)
@click.option(
    "--port",
    "ports",
    multiple=True,
    callback=_port_pair,
    help="NAME=PORT, repeatable (default prometheus=9090, thanos=10901, alertmanager=9093).",
)
@click.option(
    "--annotation",
    "annotations",
    multiple=True,
    help="KEY=VALUE annotation for the cluster Service (goatlas.io/...), repeatable.",
)
@click.option("--overwrite", is_flag=True, help="Replace an existing cluster's settings.")
@click.option("--allow-loopback", is_flag=True, hidden=True)
def cluster_add(
    namespace: str,
    kubeconfig: str | None,
    context: str | None,
    store: Path | None,
    name: str,
    external_ip: str,
    replicas: int,
    ports: tuple[tuple[str, int], ...],
    annotations: tuple[str, ...],
    overwrite: bool,
    allow_loopback: bool,
) -> None:
    """Add (or with --overwrite update) the cluster NAME."""
    from atlasd import clusterctl
    from atlasd.kube.errors import KubeError

    ann: dict[str, str] = {}
    for item in annotations:
        key, eq, val = item.partition("=")
        if not eq:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="--annotation")
        ann[key] = val
    settings = Settings(namespace=namespace)
    service = clusterctl.cluster_service(
        name=name,
        external_ip=external_ip,
        replicas=replicas,
        namespace=namespace,
        ports=ports,
        annotations=ann,
    )

    async def go() -> str:
        async with _api(kubeconfig, context, store, namespace) as api:
            return await clusterctl.add(
                api, service, settings=settings, overwrite=overwrite, allow_loopback=allow_loopback
            )

    try:
        outcome = _run_trio(go)
    except (clusterctl.ClusterError, KubeError) as exc:
        _fail(str(exc))
    click.echo(f"cluster {name} {outcome}")


@cluster.command("list")
@_common_settings
@click.option(
    "-o",
    "--output",
    type=click.Choice(["table", "json", "yaml"]),
    default="table",
    show_default=True,
)
def cluster_list(
    namespace: str, kubeconfig: str | None, context: str | None, store: Path | None, output: str
) -> None:
    """List the clusters (and what is wrong with any that are rejected)."""
    from dataclasses import asdict

    from atlasd import clusterctl
    from atlasd.kube.errors import KubeError

    async def go() -> list[clusterctl.ClusterRow]:
        async with _api(kubeconfig, context, store, namespace) as api:
            return await clusterctl.list_clusters(
                api, settings=Settings(namespace=namespace), allow_loopback=store is not None
            )

    try:
        rows = _run_trio(go)
    except KubeError as exc:
        _fail(str(exc))
    if output == "json":
        click.echo(json.dumps([asdict(r) for r in rows], indent=2))
    elif output == "yaml":
        click.echo(yaml.safe_dump([asdict(r) for r in rows], sort_keys=False), nl=False)
    else:
        _table(
            ["NAME", "EXTERNAL-IP", "REPLICAS", "PROBLEM"],
            [[r.name, r.external_ip, r.replicas, r.problem or "-"] for r in rows],
        )


@cluster.command("remove")
@_common_settings
@click.argument("name")
def cluster_remove(
    namespace: str, kubeconfig: str | None, context: str | None, store: Path | None, name: str
) -> None:
    """Remove the cluster NAME (atlasd then removes everything it made for it)."""
    from atlasd import clusterctl
    from atlasd.kube.errors import KubeError

    async def go() -> None:
        async with _api(kubeconfig, context, store, namespace) as api:
            await clusterctl.remove(api, name, settings=Settings(namespace=namespace))

    try:
        _run_trio(go)
    except (clusterctl.ClusterError, KubeError) as exc:
        _fail(str(exc))
    click.echo(f"cluster {name} removed")


@cluster.command("values")
@_common_settings
@click.argument("name")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["raw", "helm-chart", "helm-release"]),
    default="raw",
    show_default=True,
)
def cluster_values(
    namespace: str,
    kubeconfig: str | None,
    context: str | None,
    store: Path | None,
    name: str,
    fmt: str,
) -> None:
    """Print the Envoy chart values for the cluster NAME (they hold its private keys)."""
    from atlasd import clusterctl
    from atlasd.kube.errors import KubeError
    from atlasd.reconcile.values_formats import Format

    async def go() -> str:
        async with _api(kubeconfig, context, store, namespace) as api:
            return await clusterctl.values(
                api, name, settings=Settings(namespace=namespace), fmt=cast(Format, fmt)
            )

    try:
        text = _run_trio(go)
    except (clusterctl.ClusterError, KubeError) as exc:
        _fail(str(exc))
    click.echo(text, nl=not text.endswith("\n"))


# -- status -------------------------------------------------------------------------------


@cli.command()
@_env_option(
    "--url",
    env="ATLAS_STATUS_URL",
    default="http://127.0.0.1:6309",
    help="atlasd's metrics/status address.",
)
@click.option(
    "-o",
    "--output",
    type=click.Choice(["table", "json", "yaml"]),
    default="table",
    show_default=True,
)
@click.option(
    "--watch", "-w", is_flag=True, help="Keep printing as the status changes (WebSocket stream)."
)
def status(url: str, output: str, watch: bool) -> None:
    """Show clusters, each Envoy's sync state, certificate expiry and problems."""
    import httpx

    def show(doc: dict[str, Any]) -> None:
        if output == "json":
            click.echo(json.dumps(doc, indent=2, sort_keys=True, default=str))
        elif output == "yaml":
            click.echo(yaml.safe_dump(doc, sort_keys=True), nl=False)
        else:
            click.echo(render_status(doc))

    if not watch:
        try:
            doc = httpx.get(f"{url.rstrip('/')}/status", timeout=10).json()
        except (httpx.HTTPError, ValueError) as exc:
            _fail(f"cannot read status from {url}: {exc}")
        show(doc)
        return

    from trio_websocket import ConnectionClosed, HandshakeError, open_websocket_url

    ws_url = (
        url.rstrip("/").replace("http://", "ws://").replace("https://", "wss://") + "/status/stream"
    )

    async def stream() -> None:
        async with open_websocket_url(ws_url) as ws:
            while True:
                show(json.loads(await ws.get_message()))

    try:
        trio.run(stream)
    except (OSError, HandshakeError, ConnectionClosed) as exc:
        _fail(f"status stream {ws_url} ended: {exc}")
    except KeyboardInterrupt:
        pass


def _ago(ts: Any) -> str:
    if not isinstance(ts, int | float):
        return "-"
    days = (ts - dt.datetime.now(dt.UTC).timestamp()) / 86400
    return f"{days:.0f}d" if days >= 0 else "EXPIRED"


def _table(header: list[str], rows: list[list[str]]) -> None:
    click.echo(_table_text(header, rows))


def _table_text(header: list[str], rows: list[list[str]]) -> str:
    widths = (
        [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=False)]
        if rows
        else [len(h) for h in header]
    )
    lines = [
        "   ".join(str(v).ljust(w) for v, w in zip(r, widths, strict=False)).rstrip()
        for r in [header, *rows]
    ]
    return "\n".join(lines)


def render_status(doc: dict[str, Any]) -> str:
    """The human-readable ``atlasd status`` (tables of clusters, Envoys, problems)."""
    parts = [
        f"atlasd {doc.get('version')}  leader={doc.get('leader')}  ready={doc.get('ready')}"
        + (
            f"  (waiting for: {', '.join(doc.get('not_ready') or [])})"
            if not doc.get("ready")
            else ""
        ),
        "",
        "CLUSTERS",
    ]
    envoys = doc.get("envoys") or []
    by_node: dict[str, list[dict[str, Any]]] = {}
    for e in envoys:
        by_node.setdefault(str(e.get("node")), []).append(e)
    rows = []
    for c in doc.get("clusters") or []:
        streams = by_node.get(c["name"], [])
        sync = (
            ", ".join(f"{e['kind']}:{'NACK' if e.get('last_nack') else 'ok'}" for e in streams)
            or "not connected"
        )
        rows.append(
            [
                c["name"],
                c["external_ip"],
                str(c["replicas"]),
                c.get("dns_group") or "-",
                sync,
                _ago(c.get("certificate_expiry")),
            ]
        )
    parts.append(
        _table_text(["NAME", "EXTERNAL-IP", "REPLICAS", "DNS-GROUP", "ENVOY", "CERT-EXPIRES"], rows)
    )
    if doc.get("pending"):
        parts += ["", "PENDING (certificates not issued yet): " + ", ".join(doc["pending"])]
    parts += ["", "ENVOYS"]
    erows = []
    for e in envoys:
        acked = e.get("acked") or {}
        nack = e.get("last_nack")
        erows.append(
            [
                str(e.get("node")),
                str(e.get("kind")),
                str(e.get("peer")),
                " ".join(f"{k}={str(v)[:8]}" for k, v in sorted(acked.items())) or "-",
                (nack or {}).get("message", "-")[:60] if nack else "-",
            ]
        )
    parts.append(_table_text(["NODE", "KIND", "PEER", "ACKED", "LAST-NACK"], erows))
    problems = doc.get("problems") or []
    if problems:
        parts += ["", "PROBLEMS"]
        parts.append(
            _table_text(
                ["OBJECT", "FIELD", "MESSAGE"],
                [[p["object"], p["field"], p["message"]] for p in problems],
            )
        )
    return "\n".join(parts)


def main() -> None:
    cli(prog_name="atlasd")
