"""The ``atlasd`` command line (click).

click rather than argparse: nested command groups, an environment variable for every
option (``show_envvar``), and in-process testing with ``CliRunner``. Environment names
keep the original chart's where they exist (``ATLAS_ENVOY_ADS_ADDRESS``, ...).

Drop-in compatibility with the original Atlas (docs/migration.md): its container
commands ``controller`` and ``envoy-ads`` (with its flags and environment: ``METRICS_PORT``,
``GRPC_PORT``, ``LOCKNAME``, ``LOGLEVEL`` ...) and its CLI spellings ``cluster-add --name``
and ``cluster-values --name`` are accepted.

Every mistake a person can make on the command line ends in one line on stderr naming
the option or object, never a traceback. Exit codes: 0 success; 1 the request failed (the
message says why); 2 bad usage (click).
"""

from __future__ import annotations

import datetime as dt
import errno
import json
import logging
import os
import signal
import socket
import sys
import tempfile
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar, cast

import click
import trio
import yaml

from atlasd import __version__, model
from atlasd.model import Settings

if TYPE_CHECKING:
    from atlasd.kube.client import KubeClient
    from atlasd.standalone import FileStore

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])

# Python's level names, and logrus's (the original's logger: its LOGLEVEL may say `trace`,
# `warn`, `fatal` or `panic`), each mapped onto the nearest Python level.
_LEVELS = {
    "trace": "DEBUG",
    "debug": "DEBUG",
    "info": "INFO",
    "warn": "WARNING",
    "warning": "WARNING",
    "error": "ERROR",
    "fatal": "CRITICAL",
    "panic": "CRITICAL",
}
LOG_LEVELS = tuple(_LEVELS)
# The original's defaults: its controller's lock, and the Service its chart puts in front
# of its `envoy-ads` pods (release "atlas" of chart "atlas").
ORIGINAL_CONTROLLER_LOCK = "atlas"
ORIGINAL_ADS_SERVICE = "atlas-atlas-envoy-ads.{namespace}.svc.{domain}"


def configure_logging(level: str) -> None:
    """Log to stderr at ``level`` (one of ``LOG_LEVELS``, any case)."""
    logging.basicConfig(
        level=getattr(logging, _LEVELS[level.lower()]),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )
    # Per-request lines from the HTTP client are noise at info level.
    logging.getLogger("httpx").setLevel(logging.WARNING)


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


def _namespace(ctx: click.Context, param: click.Parameter, value: str) -> str:
    from atlasd.fleet.validate import is_dns_label

    if not is_dns_label(value):
        raise click.BadParameter(
            f"{value!r} is not a namespace name (a DNS-1123 label: lowercase letters, "
            "digits and '-', at most 63 characters)",
            ctx=ctx,
            param=param,
        )
    return value


def _lock_names(ctx: click.Context, param: click.Parameter, value: str) -> tuple[str, ...]:
    from atlasd.fleet.validate import is_dns_label

    names = tuple(n.strip() for n in value.split(",") if n.strip())
    for n in names:
        if not is_dns_label(n) and not all(is_dns_label(part) for part in n.split(".")):
            raise click.BadParameter(f"{n!r} is not an object name", ctx=ctx, param=param)
    return names


def _external_ips(
    ctx: click.Context, param: click.Parameter, value: tuple[str, ...]
) -> tuple[str, ...]:
    # Repeatable, and comma-separated as the original's flag also took it.
    ips = tuple(ip.strip() for item in value for ip in item.split(",") if ip.strip())
    if value and not ips:
        raise click.BadParameter("no address given", ctx=ctx, param=param)
    return ips


Decorator = Callable[[Any], Any]


class _EmptyEnvIsAValue(click.Option):
    """An option whose environment variable counts when it is set but empty (click takes
    an empty variable for an unset one): ``ATLAS_LEGACY_LOCKS=""`` means "no locks", as
    ``--legacy-locks ''`` does, not the default."""

    def resolve_envvar_value(self, ctx: click.Context) -> str | None:
        names = [self.envvar] if isinstance(self.envvar, str) else list(self.envvar or ())
        for name in names:
            if name in os.environ:
                return os.environ[name]
        return super().resolve_envvar_value(ctx)


def _env_option(*decls: str, env: str | list[str], **kwargs: Any) -> Decorator:
    """A click option read from ``env`` too, with its default and variable in --help."""
    return click.option(*decls, envvar=env, show_envvar=True, show_default=True, **kwargs)


def _apply(f: F, opts: list[Decorator]) -> F:
    out: Any = f
    for opt in reversed(opts):
        out = opt(out)
    return cast(F, out)


def _common_settings(f: F) -> F:
    """Options that shape Settings, shared by ``run`` and the cluster commands."""
    return _apply(
        f,
        [
            _env_option(
                "--namespace",
                "-n",
                env="NAMESPACE",
                default=model.DEFAULT_NAMESPACE,
                callback=_namespace,
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
        ],
    )


def _run_trio(fn: Callable[[], Awaitable[T]]) -> T:
    return trio.run(fn)


def _api(
    kubeconfig: str | None, context: str | None, store: Path | None, namespace: str
) -> KubeClient | FileStore:
    """The backend of a CLI command: both satisfy ``atlasd.kube.api.KubeApi``."""
    if store is not None:
        from atlasd.standalone import FileStore

        return FileStore(store, namespace=namespace)
    from atlasd.kube.client import KubeClient
    from atlasd.kube.config import load_config

    return KubeClient(load_config(kubeconfig, context))


def _fail(message: str) -> NoReturn:
    click.secho(f"error: {message}", fg="red", err=True)
    sys.exit(1)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "--version", prog_name="atlasd", message="%(prog)s %(version)s")
@click.option(
    "--log-level",
    envvar=["ATLAS_LOG_LEVEL", "LOGLEVEL"],
    show_envvar=True,
    default="info",
    show_default=True,
    type=click.Choice(LOG_LEVELS, case_sensitive=False),
)
def cli(log_level: str) -> None:
    """atlasd: PKI, Envoy xDS and DNS discovery for Thanos across many clusters."""
    configure_logging(log_level)


@cli.command()
def version() -> None:
    """Print atlasd's version."""
    click.echo(f"atlasd {__version__}")


# -- run (and the original's controller / envoy-ads) -------------------------------------


def _run_options(*, compat: bool) -> Callable[[F], F]:
    """The options of ``run``; with ``compat`` also the original's flags and variables
    (``controller`` and ``envoy-ads``), which take precedence where both are given."""
    opts: list[Decorator] = [
        _env_option(
            "--zone-file",
            type=click.Path(dir_okay=False, path_type=Path),
            env="ATLAS_ZONE_FILE",
            # The original chart gives its pods no writable working directory.
            default=(Path(tempfile.gettempdir()) / "atlas.zone") if compat else Path("atlas.zone"),
            help="Where the DNS zone is written (CoreDNS reads it).",
        ),
        _env_option(
            "--ads-listen",
            env="ATLAS_ADS_LISTEN",
            default=f"0.0.0.0:{model.ADS_GRPC_PORT}",
            callback=_hostport,
            help="The ADS gRPC server's address (TLS and plaintext on one port).",
        ),
        _env_option(
            "--http-listen",
            env="ATLAS_HTTP_LISTEN",
            default=f"0.0.0.0:{model.METRICS_PORT}",
            callback=_hostport,
            help="Metrics, health and status address.",
        ),
        _env_option(
            "--envoy-ads-address",
            env="ATLAS_ENVOY_ADS_ADDRESS",
            default="127.0.0.1",
            help="Address downstream Envoys reach xDS at (the observability Envoy).",
        ),
        _env_option(
            "--envoy-ads-port",
            env="ATLAS_ENVOY_ADS_PORT",
            default=model.OBS_XDS_PORT,
            type=click.IntRange(1, 65535),
        ),
        _env_option(
            "--envoy-address",
            env="ATLAS_ENVOY_ADDRESS",
            default="127.0.0.1",
            help="Address downstream Envoys forward alerts to (observability Envoy :10903).",
        ),
        _env_option(
            "--atlasd-ads-host",
            env="ATLAS_ADS_SERVICE",
            default=None,
            help="Where the observability Envoy reaches this ADS server [default: "
            + (
                "the original chart's Service, " + ORIGINAL_ADS_SERVICE
                if compat
                else "atlasd.{namespace}.svc.{domain}"
            )
            + "].",
        ),
        _env_option(
            "--atlasd-ads-port",
            env="ATLAS_ADS_SERVICE_PORT",
            default=model.ADS_GRPC_PORT,
            type=click.IntRange(1, 65535),
        ),
        _env_option(
            "--dns-configmap",
            *(["--dns-config-map-name"] if compat else []),
            env="ATLAS_DNS_CM_NAME",
            default="atlas-coredns",
            help="ConfigMap mirroring the zone.",
        ),
        _env_option(
            "--alertmanager-selector",
            env=["ATLAS_ALERTMANAGER_SELECTOR", "ALERTMANAGER_SELECTOR"]
            if compat
            else "ATLAS_ALERTMANAGER_SELECTOR",
            default="app=kube-prometheus-stack-alertmanager",
            callback=_selector,
            help="Label selector of the local Alertmanager Services.",
        ),
        _env_option("--cluster-domain", env="ATLAS_CLUSTER_DOMAIN", default=model.CLUSTER_DOMAIN),
        _env_option(
            "--leaf-days",
            env="ATLAS_LEAF_DAYS",
            default=365,
            type=click.IntRange(1, 3650),
            help="Lifetime of leaf certificates; renewed after 2/3 of it.",
        ),
        _env_option(
            "--leader-election/--no-leader-election",
            env="ATLAS_LEADER_ELECTION",
            default=True,
        ),
        _env_option("--lease-name", env="ATLAS_LEASE_NAME", default="atlasd"),
        _env_option(
            "--legacy-locks",
            cls=_EmptyEnvIsAValue,
            env="ATLAS_LEGACY_LOCKS",
            default=ORIGINAL_CONTROLLER_LOCK,
            callback=_lock_names,
            help="Comma-separated leader-election locks of the original Atlas (ConfigMap or "
            "Lease names in the namespace): atlasd does not lead while one is held by a live "
            "holder. '' (also an empty ATLAS_LEGACY_LOCKS) turns the check off.",
        ),
        _env_option(
            "--identity",
            env="POD_NAME",
            default=None,
            help="Leader election identity (default: host name).",
        ),
        _env_option(
            "--allow-loopback",
            is_flag=True,
            env="ATLAS_ALLOW_LOOPBACK",
            help="Accept loopback external IPs (local demos and tests).",
        ),
        _env_option(
            "--forwarder-token-file",
            type=click.Path(dir_okay=False, exists=True, path_type=Path),
            env="ATLAS_FORWARDER_TOKEN_FILE",
            default=None,
            help="The forwarder token: authenticates the observability Envoy on a plaintext "
            "ADS connection, the fallback to its client certificate over TLS (without it, "
            "plaintext callers get nothing).",
        ),
        _env_option(
            "--shutdown-grace",
            env="ATLAS_SHUTDOWN_GRACE",
            default=10.0,
            type=click.FloatRange(1, 300),
            help="Seconds allowed for a clean stop after SIGTERM.",
        ),
    ]
    if compat:
        opts += [
            _env_option(
                "--metrics-port",
                env=["METRICS_PORT", "CONTROLLER_METRICS_PORT", "ENVOY_ADS_METRICS_PORT"],
                default=None,
                type=click.IntRange(0, 65535),
                help="The original's name: the port of --http-listen.",
            ),
            _env_option(
                "--grpc-port",
                env=["GRPC_PORT", "ENVOY_ADS_GRPC_PORT", "ATLAS_ENVOY_ADS_GRPC_PORT"],
                default=None,
                type=click.IntRange(0, 65535),
                help="The original's name: the port of --ads-listen.",
            ),
            _env_option(
                "--lockname",
                env="LOCKNAME",
                default=None,
                help="The original's leader-election lock name: atlasd (a Lease of its own) "
                "does not lead while the original holds it (`controller`; see --legacy-locks).",
            ),
            _env_option(
                "--node-id",
                env=["NODE_ID", "ENVOY_ADS_NODE_ID"],
                default=None,
                type=click.IntRange(1, 1024),
                help="Accepted for the original's `envoy-ads` (its snapshot-version generator "
                "id); atlasd versions snapshots by content and needs none.",
            ),
            _env_option(
                "-l",
                "--log-level",
                "compat_log_level",
                env="LOGLEVEL",
                default=None,
                type=click.Choice(LOG_LEVELS, case_sensitive=False),
            ),
            click.option("--config", "compat_config", default=None, hidden=True),
            click.option("--debug-envoy", is_flag=True, hidden=True),
        ]

    def decorate(f: F) -> F:
        return _common_settings(_apply(f, opts))

    return decorate


@cli.command()
@_run_options(compat=False)
def run(**params: Any) -> None:
    """Run the daemon: watch, reconcile (leader), serve xDS, write the zone."""
    _run_daemon(params, mode="run")


@cli.command("controller")
@_run_options(compat=True)
def controller(**params: Any) -> None:
    """The original Atlas's `controller` command: runs the whole daemon (it leads and
    writes; it also serves xDS). Takes the original's flags and environment."""
    _run_daemon(params, mode="controller")


@cli.command("envoy-ads")
@_run_options(compat=True)
def envoy_ads(**params: Any) -> None:
    """The original Atlas's `envoy-ads` command: serves xDS from the watch cache and never
    writes (another atlasd leads). Takes the original's flags and environment."""
    _run_daemon(params, mode="envoy-ads")


def _run_daemon(p: dict[str, Any], *, mode: str) -> None:
    from atlasd.daemon import Daemon, DaemonOptions
    from atlasd.kube.legacy_lock import ORIGINAL_ENVOY_ADS_LOCK

    log = logging.getLogger("atlasd")
    if p.get("compat_log_level"):
        configure_logging(p["compat_log_level"])
    http_host, http_port = p["http_listen"]
    ads_host, ads_port = p["ads_listen"]
    if p.get("metrics_port") is not None:
        http_port = p["metrics_port"]
    if p.get("grpc_port") is not None:
        ads_port = p["grpc_port"]
    legacy: tuple[str, ...] = p["legacy_locks"]
    lockname = p.get("lockname")
    if mode == "controller" and lockname and lockname not in legacy:
        legacy = (lockname, *legacy)
    if mode == "envoy-ads" and lockname and lockname != ORIGINAL_ENVOY_ADS_LOCK:
        log.info("LOCKNAME=%s ignored: `envoy-ads` serves on every replica, no lock", lockname)
    serve_only = mode == "envoy-ads"
    store: Path | None = p["store"]
    if serve_only and store is not None:
        _fail("envoy-ads serves from Kubernetes; --store needs `atlasd run`")
    namespace: str = p["namespace"]
    domain: str = p["cluster_domain"]
    ads_service = p["atlasd_ads_host"] or (
        ORIGINAL_ADS_SERVICE if mode != "run" else "atlasd.{namespace}.svc.{domain}"
    ).format(namespace=namespace, domain=domain)

    token = _preflight(
        store=store,
        kubeconfig=p["kubeconfig"],
        context=p["context"],
        zone_file=p["zone_file"],
        listen=[("--http-listen", http_host, http_port), ("--ads-listen", ads_host, ads_port)],
        token_file=p["forwarder_token_file"],
    )
    settings = Settings(
        namespace=namespace,
        cluster_domain=domain,
        atlasd_ads_host=ads_service,
        atlasd_ads_port=p["atlasd_ads_port"],
        envoy_ads_address=p["envoy_ads_address"],
        envoy_ads_port=p["envoy_ads_port"],
        envoy_address=p["envoy_address"],
        dns_configmap_name=p["dns_configmap"],
        alertmanager_selector=p["alertmanager_selector"],
        leaf_lifetime=dt.timedelta(days=p["leaf_days"]),
        forwarder_token=token,
    )
    options = DaemonOptions(
        settings=settings,
        kubeconfig=p["kubeconfig"],
        context=p["context"],
        store=store,
        zone_file=p["zone_file"],
        ads_host=ads_host,
        ads_port=ads_port,
        http_host=http_host,
        http_port=http_port,
        leader_election=True if serve_only else p["leader_election"],
        lease_name=p["lease_name"],
        legacy_locks=legacy,
        serve_only=serve_only,
        allow_loopback=p["allow_loopback"],
        identity=p["identity"] or socket.gethostname(),
    )
    if mode != "run":
        log.info("started as the original's `%s` command (docs/migration.md)", mode)
    try:
        serve_until_signalled(lambda: Daemon(options).run(), grace=p["shutdown_grace"])
    except (OSError, BaseExceptionGroup) as exc:
        _fail(_startup_error(exc))


def _preflight(
    *,
    store: Path | None,
    kubeconfig: str | None,
    context: str | None,
    zone_file: Path,
    listen: list[tuple[str, str, int]],
    token_file: Path | None,
) -> str | None:
    """Check what a person may have got wrong before anything starts (each failure is one
    line naming the option); returns the forwarder token."""
    from atlasd.kube.config import load_config
    from atlasd.kube.errors import ConfigError

    if store is None:
        try:
            load_config(kubeconfig, context)
        except ConfigError as exc:
            _fail(str(exc))
    token: str | None = None
    if token_file is not None:
        try:
            token = token_file.read_text().strip()
        except (OSError, UnicodeDecodeError) as exc:
            _fail(f"--forwarder-token-file {token_file}: cannot read it ({_reason(exc)})")
        if not token:
            _fail(f"--forwarder-token-file {token_file} is empty")
    parent = zone_file.parent if str(zone_file.parent) else Path(".")
    if not parent.is_dir():
        _fail(f"--zone-file {zone_file}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK) or (zone_file.exists() and not os.access(zone_file, os.W_OK)):
        _fail(f"--zone-file {zone_file}: not writable by this user")
    seen: dict[tuple[str, int], str] = {}
    for flag, host, port in listen:
        if port and (host, port) in seen:
            _fail(f"{flag} {host}:{port} is also {seen[(host, port)]}: pick another port")
        seen[(host, port)] = flag
        if port:
            problem = _bind_problem(host, port)
            if problem:
                _fail(f"{flag} {host}:{port}: cannot listen ({problem})")
    return token


def _reason(exc: BaseException) -> str:
    return (exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)) or type(
        exc
    ).__name__


def _bind_problem(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be listened on (as trio will: SO_REUSEADDR), or None."""
    try:
        infos = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        return f"unknown address: {exc.strerror}"
    family, kind, proto, _, addr = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(addr)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return "address already in use"
            return _reason(exc)
    return None


def _startup_error(exc: BaseException, *also: type[Exception]) -> str:
    """One line for a startup failure that is the user's (a port taken after the check, a
    credential file gone, or one of ``also``); anything else is a bug and propagates with
    its traceback."""
    from atlasd.kube.errors import ConfigError

    leaves: list[BaseException] = []

    def walk(e: BaseException) -> None:
        if isinstance(e, BaseExceptionGroup):
            for sub in e.exceptions:
                walk(sub)
        else:
            leaves.append(e)

    walk(exc)
    if not leaves or not all(
        isinstance(e, (ConfigError, *also)) or (isinstance(e, OSError) and e.errno) for e in leaves
    ):
        raise exc
    return "; ".join(str(e) for e in leaves)


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
@click.option(
    "--ads-port", default=model.ADS_GRPC_PORT, show_default=True, type=click.IntRange(1, 65535)
)
@click.option(
    "--http-port", default=model.METRICS_PORT, show_default=True, type=click.IntRange(1, 65535)
)
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
    except (DemoError, BaseExceptionGroup) as exc:
        # The nursery wraps it in a group: one line all the same.
        _fail(_startup_error(exc, DemoError))


async def _discard(coro: Awaitable[Any]) -> None:
    await coro


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


def _cluster_call(
    fn: Callable[[Any], Awaitable[T]],
    *,
    kubeconfig: str | None,
    context: str | None,
    store: Path | None,
    namespace: str,
) -> T:
    """Run ``fn(api)`` against Kubernetes or the store; any failure is one line, exit 1."""
    from atlasd.clusterctl import ClusterError
    from atlasd.kube.errors import KubeError

    async def go() -> T:
        async with _api(kubeconfig, context, store, namespace) as api:
            return await fn(api)

    try:
        return _run_trio(go)
    except (ClusterError, KubeError, ValueError) as exc:
        _fail(str(exc))


def _cluster_add(
    *,
    namespace: str,
    kubeconfig: str | None,
    context: str | None,
    store: Path | None,
    name: str,
    external_ips: tuple[str, ...],
    replicas: int,
    ports: tuple[tuple[str, int], ...],
    annotations: dict[str, str],
    overwrite: bool,
    allow_loopback: bool,
) -> None:
    from atlasd import clusterctl

    service = clusterctl.cluster_service(
        name=name,
        external_ips=external_ips,
        replicas=replicas,
        namespace=namespace,
        ports=ports,
        annotations=annotations,
    )
    outcome = _cluster_call(
        lambda api: clusterctl.add(
            api,
            service,
            settings=Settings(namespace=namespace),
            overwrite=overwrite,
            allow_loopback=allow_loopback,
        ),
        kubeconfig=kubeconfig,
        context=context,
        store=store,
        namespace=namespace,
    )
    click.echo(f"cluster {name} {outcome}")


def _cluster_values(
    *,
    namespace: str,
    kubeconfig: str | None,
    context: str | None,
    store: Path | None,
    name: str,
    fmt: str,
) -> None:
    from atlasd import clusterctl
    from atlasd.reconcile.values_formats import Format

    text = _cluster_call(
        lambda api: clusterctl.values(
            api,
            name,
            settings=Settings(namespace=namespace),
            fmt=cast(Format, fmt),
            allow_loopback=store is not None,
        ),
        kubeconfig=kubeconfig,
        context=context,
        store=store,
        namespace=namespace,
    )
    click.echo(text, nl=not text.endswith("\n"))


_EXTERNAL_IP_HELP = (
    "The downstream Envoy's reachable address; repeatable or comma-separated (all are "
    "validated and stored; the first is the one atlasd dials)."
)
_FORMAT = click.Choice(["raw", "helm-chart", "helm-release"])


@cluster.command("add")
@_common_settings
@click.argument("name")
@click.option(
    "--external-ip", "external_ips", required=True, multiple=True, callback=_external_ips,
    help=_EXTERNAL_IP_HELP,
)  # fmt: skip
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
@click.option("--overwrite", is_flag=True, help="Replace an existing cluster's settings.")
@click.option("--allow-loopback", is_flag=True, hidden=True)
def cluster_add(
    namespace: str,
    kubeconfig: str | None,
    context: str | None,
    store: Path | None,
    name: str,
    external_ips: tuple[str, ...],
    replicas: int,
    ports: tuple[tuple[str, int], ...],
    annotations: tuple[str, ...],
    overwrite: bool,
    allow_loopback: bool,
) -> None:
    """Add (or with --overwrite update) the cluster NAME."""
    ann: dict[str, str] = {}
    for item in annotations:
        key, eq, val = item.partition("=")
        if not eq:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="--annotation")
        ann[key] = val
    _cluster_add(
        namespace=namespace,
        kubeconfig=kubeconfig,
        context=context,
        store=store,
        name=name,
        external_ips=external_ips,
        replicas=replicas,
        ports=ports,
        annotations=ann,
        overwrite=overwrite,
        allow_loopback=allow_loopback,
    )


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

    rows = _cluster_call(
        lambda api: clusterctl.list_clusters(
            api, settings=Settings(namespace=namespace), allow_loopback=store is not None
        ),
        kubeconfig=kubeconfig,
        context=context,
        store=store,
        namespace=namespace,
    )
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

    _cluster_call(
        lambda api: clusterctl.remove(api, name, settings=Settings(namespace=namespace)),
        kubeconfig=kubeconfig,
        context=context,
        store=store,
        namespace=namespace,
    )
    click.echo(f"cluster {name} removed")


@cluster.command("values")
@_common_settings
@click.argument("name")
@click.option("--format", "fmt", type=_FORMAT, default="raw", show_default=True)
def cluster_values(
    namespace: str,
    kubeconfig: str | None,
    context: str | None,
    store: Path | None,
    name: str,
    fmt: str,
) -> None:
    """Print the Envoy chart values for the cluster NAME (they hold its private keys;
    NAME `atlas`: the observability Envoy's)."""
    _cluster_values(
        namespace=namespace, kubeconfig=kubeconfig, context=context, store=store, name=name, fmt=fmt
    )


# -- the original's CLI spellings ---------------------------------------------------------


def _compat_cluster_options(f: F) -> F:
    """The original's flags of ``cluster-add`` / ``cluster-values`` (and its global ones)."""
    return _apply(
        f,
        [
            click.option("--name", required=True, help="The cluster's name."),
            click.option(
                "--namespace",
                default=model.DEFAULT_NAMESPACE,
                show_default=True,
                callback=_namespace,
            ),
            click.option("--kubeconfig", default=None, help="kubeconfig file."),
            click.option("--context", default=None, help="kubeconfig context to use."),
            _env_option(
                "-l",
                "--log-level",
                "compat_log_level",
                env="LOGLEVEL",
                default=None,
                type=click.Choice(LOG_LEVELS, case_sensitive=False),
            ),
            click.option("--config", "compat_config", default=None, hidden=True),
        ],
    )


@cli.command("cluster-add")
@_compat_cluster_options
@click.option(
    "--external-ip", "external_ips", required=True, multiple=True, callback=_external_ips,
    help=_EXTERNAL_IP_HELP,
)  # fmt: skip
@click.option("--replicas", default=1, show_default=True, type=click.IntRange(1, 64))
@click.option("--overwrite", is_flag=True, help="Replace an existing cluster's settings.")
def cluster_add_compat(
    name: str,
    namespace: str,
    kubeconfig: str | None,
    context: str | None,
    compat_log_level: str | None,
    compat_config: str | None,
    external_ips: tuple[str, ...],
    replicas: int,
    overwrite: bool,
) -> None:
    """The original's spelling of `cluster add NAME` (--name NAME)."""
    if compat_log_level:
        configure_logging(compat_log_level)

    _cluster_add(
        namespace=namespace,
        kubeconfig=kubeconfig,
        context=context,
        store=None,
        name=name,
        external_ips=external_ips,
        replicas=replicas,
        ports=model.DEFAULT_CLUSTER_PORTS,
        annotations={},
        overwrite=overwrite,
        allow_loopback=False,
    )


@cli.command("cluster-values")
@_compat_cluster_options
@click.option("--format", "fmt", type=_FORMAT, default="raw", show_default=True)
def cluster_values_compat(
    name: str,
    namespace: str,
    kubeconfig: str | None,
    context: str | None,
    compat_log_level: str | None,
    compat_config: str | None,
    fmt: str,
) -> None:
    """The original's spelling of `cluster values NAME` (--name NAME)."""
    if compat_log_level:
        configure_logging(compat_log_level)
    _cluster_values(
        namespace=namespace, kubeconfig=kubeconfig, context=context, store=None, name=name, fmt=fmt
    )


# -- status -------------------------------------------------------------------------------


def fetch_status(url: str) -> dict[str, Any]:
    """GET ``<url>/status``; raises ValueError saying what answered if it is not atlasd."""
    import httpx

    target = f"{url.rstrip('/')}/status"
    try:
        resp = httpx.get(target, timeout=10)
    except httpx.HTTPError as exc:
        raise ValueError(f"cannot reach {target}: {exc}") from None
    server = resp.headers.get("server")
    who = f" (server: {server})" if server else ""
    hint = "is --url atlasd's --http-listen address?"
    if resp.status_code != 200:
        raise ValueError(f"{target} answered {resp.status_code} {resp.reason_phrase}{who}: {hint}")
    try:
        doc = resp.json()
    except ValueError:
        kind = resp.headers.get("content-type", "no content type")
        raise ValueError(f"{target} answered 200 with {kind}, not JSON{who}: {hint}") from None
    if not isinstance(doc, dict) or "clusters" not in doc:
        raise ValueError(f"{target} answered JSON that is not atlasd's status{who}: {hint}")
    return doc


@cli.command()
@_env_option(
    "--url",
    env="ATLAS_STATUS_URL",
    default=f"http://127.0.0.1:{model.METRICS_PORT}",
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

    def show(doc: dict[str, Any]) -> None:
        if output == "json":
            click.echo(json.dumps(doc, indent=2, sort_keys=True, default=str))
        elif output == "yaml":
            click.echo(yaml.safe_dump(doc, sort_keys=True), nl=False)
        else:
            click.echo(render_status(doc))

    if not watch:
        try:
            doc = fetch_status(url)
        except ValueError as exc:
            _fail(str(exc))
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
    except (OSError, HandshakeError, ConnectionClosed, ValueError) as exc:
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
    ]
    leadership = doc.get("leadership") or {}
    if leadership.get("reason"):
        parts.append(f"NOT LEADING: {leadership['reason']}")
    parts += ["", "CLUSTERS"]
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
