"""``atlasd run``: the daemon, its options (``compat``: also the original's flags and
variables) and the checks made before it starts."""

from __future__ import annotations

import datetime as dt
import errno
import logging
import os
import socket
import tempfile
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from atlasd import logs, model
from atlasd.cli import process
from atlasd.cli.app import cli
from atlasd.cli.options import (
    ORIGINAL_ADS_SERVICE,
    ORIGINAL_CONTROLLER_LOCK,
    Decorator,
    EmptyEnvIsAValue,
    F,
    apply_options,
    common_settings,
    compat_logging_options,
    configure_logging,
    dial_param,
    env_option,
    fail,
    hostport_param,
    lock_names_param,
    optional_hostport_param,
    selector_param,
)
from atlasd.cli.process import reason, startup_error
from atlasd.model import Settings

# -- run (and the original's controller / envoy-ads) -------------------------------------

# The options' defaults are Settings' (one source: atlasd.model).
DEFAULTS = Settings()


def _query_url(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is None or value == "":
        return None
    parsed = urllib.parse.urlsplit(value)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise click.BadParameter(f"{value!r} is not an http(s) URL", ctx, param)
    return value


def _enroll_address(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """``host:port`` as an agent dials it (``dial_param``'s rules), or empty."""
    if not value:
        return ""
    dial_param(ctx, param, value)
    return value


def _cert_dir(ctx: click.Context, param: click.Parameter, value: str) -> str:
    if not value.startswith("/") or any(c.isspace() for c in value) or value != value.rstrip("/"):
        raise click.BadParameter(
            f"{value!r} is not an absolute directory path (no spaces, no trailing /)", ctx, param
        )
    return value


def run_options(*, compat: bool) -> Callable[[F], F]:
    """The options of ``run``; with ``compat`` also the original's flags and variables
    (``controller`` and ``envoy-ads``), which take precedence where both are given."""
    opts: list[Decorator] = [
        env_option(
            "--zone-file",
            type=click.Path(dir_okay=False, path_type=Path),
            env="ATLAS_ZONE_FILE",
            # The original chart gives its pods no writable working directory. Looked up
            # when used, not at import: gettempdir() fails where no temporary directory is
            # writable (a read-only root, e.g. the envoy chart's agent), and every atlasd
            # command builds these options.
            default=(lambda: Path(tempfile.gettempdir()) / "atlas.zone")
            if compat
            else Path("atlas.zone"),
            show_default="the temporary directory's atlas.zone" if compat else True,
            help="Where the DNS zone is written (CoreDNS reads it).",
        ),
        env_option(
            "--ads-listen",
            env="ATLAS_ADS_LISTEN",
            default=f"0.0.0.0:{model.ADS_GRPC_PORT}",
            callback=hostport_param,
            help="The ADS gRPC server's address (TLS and plaintext on one port).",
        ),
        env_option(
            "--http-listen",
            env="ATLAS_HTTP_LISTEN",
            default=f"0.0.0.0:{model.METRICS_PORT}",
            callback=hostport_param,
            help="Metrics, health and status address.",
        ),
        env_option(
            "--envoy-ads-address",
            env="ATLAS_ENVOY_ADS_ADDRESS",
            default=DEFAULTS.envoy_ads_address,
            help="Address downstream Envoys reach xDS at (the observability Envoy).",
        ),
        env_option(
            "--envoy-ads-port",
            env="ATLAS_ENVOY_ADS_PORT",
            default=DEFAULTS.envoy_ads_port,
            type=click.IntRange(1, 65535),
        ),
        env_option(
            "--envoy-address",
            env="ATLAS_ENVOY_ADDRESS",
            default=DEFAULTS.envoy_address,
            help="Address downstream Envoys forward alerts to (observability Envoy :10903).",
        ),
        env_option(
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
        env_option(
            "--atlasd-ads-port",
            env="ATLAS_ADS_SERVICE_PORT",
            default=DEFAULTS.atlasd_ads_port,
            type=click.IntRange(1, 65535),
        ),
        env_option(
            "--dns-configmap",
            *(["--dns-config-map-name"] if compat else []),
            env="ATLAS_DNS_CM_NAME",
            default=DEFAULTS.dns_configmap_name,
            help="ConfigMap mirroring the zone.",
        ),
        env_option(
            "--endpoints-dir",
            type=click.Path(file_okay=False, path_type=Path),
            env="ATLAS_ENDPOINTS_DIR",
            default=None,
            help="Where Thanos Query's endpoint configuration files are written "
            "(--endpoint.sd-config-file; default: thanos-endpoints beside the zone file).",
        ),
        env_option(
            "--thanos-query-url",
            env="ATLAS_THANOS_QUERY_URL",
            default=None,
            callback=_query_url,
            help="Thanos Query's HTTP address (http://host:10902): atlasd reads its stores "
            "and reports which clusters it sees (default: off).",
        ),
        env_option(
            "--thanos-query-interval",
            env="ATLAS_THANOS_QUERY_INTERVAL",
            default=30.0,
            type=click.FloatRange(1, 3600),
            help="Seconds between two reads of Thanos Query's stores.",
        ),
        env_option(
            "--probe-via",
            env="ATLAS_PROBE_VIA",
            default=None,
            callback=dial_param,
            help="host:port of the observability Envoy's Thanos listener, where clusters "
            "Thanos Query does not see are probed (default: each cluster's sidecar Service, "
            "as Thanos Query dials it).",
        ),
        env_option(
            "--thanos-idle-timeout",
            env="ATLAS_THANOS_IDLE_TIMEOUT",
            default=DEFAULTS.thanos_idle_seconds,
            type=click.IntRange(0, 3600),
            help="Seconds a Thanos StoreAPI call through the observability Envoy may carry no "
            "bytes before the Envoy resets it, so one stalled cluster cannot hold a query "
            "longer (0: never).",
        ),
        env_option(
            "--endpoints-configmap",
            env="ATLAS_ENDPOINTS_CM_NAME",
            default=DEFAULTS.thanos_endpoints_configmap_name,
            help="ConfigMap holding the endpoint configuration (all.yaml; the DNS groups' "
            "files go to <name>-groups).",
        ),
        env_option(
            "--alertmanager-selector",
            env=["ATLAS_ALERTMANAGER_SELECTOR", "ALERTMANAGER_SELECTOR"]
            if compat
            else "ATLAS_ALERTMANAGER_SELECTOR",
            default=",".join(f"{k}={v}" for k, v in DEFAULTS.alertmanager_selector),
            callback=selector_param,
            help="Label selector of the local Alertmanager Services.",
        ),
        env_option("--cluster-domain", env="ATLAS_CLUSTER_DOMAIN", default=DEFAULTS.cluster_domain),
        env_option(
            "--leaf-days",
            env="ATLAS_LEAF_DAYS",
            default=DEFAULTS.leaf_lifetime.days,
            type=click.IntRange(1, 3650),
            help="Lifetime of leaf certificates; renewed after 2/3 of it.",
        ),
        env_option(
            "--enroll-listen",
            env="ATLAS_ENROLL_LISTEN",
            default=None,
            callback=optional_hostport_param,
            help="The enrollment endpoint's address (atlasd agent; docs/security.md, "
            "'Enrollment'); empty: off.",
        ),
        env_option(
            "--ads-max-stream-age",
            env="ATLAS_ADS_MAX_STREAM_AGE",
            default=1800,
            type=click.IntRange(0, 7 * 24 * 3600),
            help="Seconds after which a downstream Envoy's ADS stream is ended (±10%; it "
            "reconnects within a second), so streams spread over the replicas again after a "
            "restart; 0: never.",
        ),
        env_option(
            "--enroll-cert-seconds",
            env="ATLAS_ENROLL_CERT_SECONDS",
            default=24 * 3600,
            type=click.IntRange(30, 365 * 24 * 3600),
            help="Lifetime of the certificates the enrollment endpoint signs; agents renew "
            "them after 2/3 of it.",
        ),
        env_option(
            "--enrollment-default/--no-enrollment-default",
            env="ATLAS_ENROLLMENT_DEFAULT",
            default=DEFAULTS.enrollment_default,
            help="The mode of a cluster Service without the goatlas.io/enrollment "
            "annotation: enrollment (its keys stay home) or the compatible mode; a cluster "
            "whose <c>-atlas-identity exists stays compatible unless annotated "
            "(docs/security.md, 'Enrollment mode').",
        ),
        env_option(
            "--enroll-address",
            env="ATLAS_ENROLL_ADDRESS",
            default=DEFAULTS.enroll_address,
            callback=_enroll_address,
            help="host:port of the enrollment endpoint as downstream clusters reach it "
            "(into enrolled clusters' values, agent.server); empty: not known (a Warning "
            "Event on each enrolled cluster).",
        ),
        env_option(
            "--enroll-cert-dir",
            env="ATLAS_ENROLL_CERT_DIR",
            default=DEFAULTS.agent_cert_dir,
            callback=_cert_dir,
            help="Where a downstream pod's agent writes its certificates and its Envoy reads "
            "them (values agent.certDir; the paths an enrolled node's xDS names).",
        ),
        env_option(
            "--leader-election/--no-leader-election",
            env="ATLAS_LEADER_ELECTION",
            default=True,
        ),
        env_option("--lease-name", env="ATLAS_LEASE_NAME", default="atlasd"),
        env_option(
            "--legacy-locks",
            cls=EmptyEnvIsAValue,
            env="ATLAS_LEGACY_LOCKS",
            default=ORIGINAL_CONTROLLER_LOCK,
            callback=lock_names_param,
            help="Comma-separated leader-election locks of the original Atlas (ConfigMap or "
            "Lease names in the namespace): atlasd does not lead while one is held by a live "
            "holder. '' (also an empty ATLAS_LEGACY_LOCKS) turns the check off.",
        ),
        env_option(
            "--identity",
            env="POD_NAME",
            default=None,
            help="Leader election identity (default: host name).",
        ),
        env_option(
            "--allow-loopback",
            is_flag=True,
            env="ATLAS_ALLOW_LOOPBACK",
            help="Accept loopback external IPs (local demos and tests).",
        ),
        env_option(
            "--forwarder-token-file",
            type=click.Path(dir_okay=False, exists=True, path_type=Path),
            env="ATLAS_FORWARDER_TOKEN_FILE",
            default=None,
            help="The forwarder token: authenticates the observability Envoy on a plaintext "
            "ADS connection, the fallback to its client certificate over TLS (without it, "
            "plaintext callers get nothing).",
        ),
        env_option(
            "--stall-threshold",
            env="ATLAS_STALL_THRESHOLD",
            default=None,
            type=click.FloatRange(0, 60),
            help="Seconds the event loop may run ready tasks without looking at I/O before it "
            "counts as a stall (default: a tenth): logged at WARNING with the code that held "
            "it, atlasd_event_loop_stalls_total, status 'loop'. 0 turns the watchdog off.",
        ),
        env_option(
            "--shutdown-grace",
            env="ATLAS_SHUTDOWN_GRACE",
            default=10.0,
            type=click.FloatRange(1, 300),
            help="Seconds allowed for a clean stop after SIGTERM.",
        ),
        env_option(
            "--log-format",
            env="ATLAS_LOG_FORMAT",
            default="text",
            type=click.Choice(logs.LOG_FORMATS),
            help="text, or json: one object per line (time, level, logger, message, key).",
        ),
    ]
    if compat:
        opts += [
            env_option(
                "--metrics-port",
                env=["METRICS_PORT", "CONTROLLER_METRICS_PORT", "ENVOY_ADS_METRICS_PORT"],
                default=None,
                type=click.IntRange(0, 65535),
                help="The original's name: the port of --http-listen.",
            ),
            env_option(
                "--grpc-port",
                env=["GRPC_PORT", "ENVOY_ADS_GRPC_PORT", "ATLAS_ENVOY_ADS_GRPC_PORT"],
                default=None,
                type=click.IntRange(0, 65535),
                help="The original's name: the port of --ads-listen.",
            ),
            env_option(
                "--lockname",
                env="LOCKNAME",
                default=None,
                help="The original's leader-election lock name: atlasd (a Lease of its own) "
                "does not lead while the original holds it (`controller`; see --legacy-locks).",
            ),
            env_option(
                "--node-id",
                env=["NODE_ID", "ENVOY_ADS_NODE_ID"],
                default=None,
                type=click.IntRange(1, 1024),
                help="Accepted for the original's `envoy-ads` (its snapshot-version generator "
                "id); atlasd versions snapshots by content and needs none.",
            ),
            *compat_logging_options(),
            click.option("--debug-envoy", is_flag=True, hidden=True),
        ]

    def decorate(f: F) -> F:
        return common_settings(apply_options(f, opts))

    return decorate


@cli.command()
@run_options(compat=False)
def run(**params: Any) -> None:
    """Run the daemon: watch, reconcile (leader), serve xDS, write the zone."""
    run_daemon(params, mode="run")


def run_daemon(p: dict[str, Any], *, mode: str) -> None:
    from atlasd.daemon import Daemon, DaemonOptions
    from atlasd.kube.legacy_lock import ORIGINAL_ENVOY_ADS_LOCK
    from atlasd.watchdog import DEFAULT_THRESHOLD as DEFAULT_STALL_THRESHOLD

    log = logging.getLogger("atlasd")
    if p.get("compat_log_level"):
        configure_logging(p["compat_log_level"])
    logs.use_format(p["log_format"])
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
        fail("envoy-ads serves from Kubernetes; --store needs `atlasd run`")
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
        endpoints_dir=p["endpoints_dir"],
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
        thanos_endpoints_configmap_name=p["endpoints_configmap"],
        thanos_idle_seconds=p["thanos_idle_timeout"],
        alertmanager_selector=p["alertmanager_selector"],
        leaf_lifetime=dt.timedelta(days=p["leaf_days"]),
        forwarder_token=token,
        enrollment_default=p["enrollment_default"],
        enroll_address=p["enroll_address"],
        agent_cert_dir=p["enroll_cert_dir"],
    )
    options = DaemonOptions(
        settings=settings,
        kubeconfig=p["kubeconfig"],
        context=p["context"],
        store=store,
        zone_file=p["zone_file"],
        endpoints_dir=p["endpoints_dir"],
        thanos_query_url=p["thanos_query_url"],
        thanos_query_interval=p["thanos_query_interval"],
        probe_via=p["probe_via"],
        ads_host=ads_host,
        ads_port=ads_port,
        ads_max_stream_age=float(p["ads_max_stream_age"]) or None,
        http_host=http_host,
        http_port=http_port,
        leader_election=True if serve_only else p["leader_election"],
        lease_name=p["lease_name"],
        legacy_locks=legacy,
        serve_only=serve_only,
        allow_loopback=p["allow_loopback"],
        identity=p["identity"] or socket.gethostname(),
        # This process is atlasd's alone: keep its collector's pauses short (atlasd.heap).
        settle_heap=True,
        stall_threshold=DEFAULT_STALL_THRESHOLD
        if p["stall_threshold"] is None
        else (p["stall_threshold"] or None),
        enroll_host=p["enroll_listen"][0] if p["enroll_listen"] else "0.0.0.0",
        enroll_port=p["enroll_listen"][1] if p["enroll_listen"] else None,
        enroll_lifetime=dt.timedelta(seconds=p["enroll_cert_seconds"]),
    )
    if mode != "run":
        log.info("started as the original's `%s` command (docs/migration.md)", mode)
    try:
        process.serve_until_signalled(lambda: Daemon(options).run(), grace=p["shutdown_grace"])
    except (OSError, BaseExceptionGroup) as exc:
        fail(startup_error(exc))


def _preflight(
    *,
    store: Path | None,
    kubeconfig: str | None,
    context: str | None,
    zone_file: Path,
    endpoints_dir: Path | None,
    listen: list[tuple[str, str, int]],
    token_file: Path | None,
) -> str | None:
    """Check what a person may have got wrong before anything starts (each failure is one
    line naming the option); returns the forwarder token."""
    from atlasd.backend import BackendSpec

    problem = BackendSpec("", kubeconfig, context, store).problem()
    if problem is not None:
        fail(problem)
    token: str | None = None
    if token_file is not None:
        try:
            token = token_file.read_text().strip()
        except (OSError, UnicodeDecodeError) as exc:
            fail(f"--forwarder-token-file {token_file}: cannot read it ({reason(exc)})")
        if not token:
            fail(f"--forwarder-token-file {token_file} is empty")
    parent = zone_file.parent if str(zone_file.parent) else Path(".")
    if not parent.is_dir():
        fail(f"--zone-file {zone_file}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK) or (zone_file.exists() and not os.access(zone_file, os.W_OK)):
        fail(f"--zone-file {zone_file}: not writable by this user")
    if endpoints_dir is not None:
        base = endpoints_dir if endpoints_dir.exists() else endpoints_dir.parent
        if endpoints_dir.exists() and not endpoints_dir.is_dir():
            fail(f"--endpoints-dir {endpoints_dir}: not a directory")
        if not base.is_dir():
            fail(f"--endpoints-dir {endpoints_dir}: directory {base} does not exist")
        if not os.access(base, os.W_OK):
            fail(f"--endpoints-dir {endpoints_dir}: not writable by this user")
    seen: dict[tuple[str, int], str] = {}
    for flag, host, port in listen:
        if port and (host, port) in seen:
            fail(f"{flag} {host}:{port} is also {seen[(host, port)]}: pick another port")
        seen[(host, port)] = flag
        if port:
            problem = _bind_problem(host, port)
            if problem:
                fail(f"{flag} {host}:{port}: cannot listen ({problem})")
    return token


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
            return reason(exc)
    return None
