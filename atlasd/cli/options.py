"""What the commands share: logging, option callbacks, the environment-aware option,
the options that shape Settings, the backend (Kubernetes or a store) and the one-line
failure."""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, NoReturn, TypeVar, cast

import click
import trio

from atlasd import model
from atlasd.backend import BackendSpec

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
    logging.getLogger("httpx2").setLevel(logging.WARNING)


def selector_param(
    ctx: click.Context, param: click.Parameter, value: str
) -> tuple[tuple[str, str], ...]:
    from atlasd.fleet.validate import parse_selector

    try:
        return parse_selector(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx=ctx, param=param) from None


def hostport_param(ctx: click.Context, param: click.Parameter, value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise click.BadParameter(f"{value!r} is not HOST:PORT", ctx=ctx, param=param)
    return host.strip("[]") or "0.0.0.0", int(port)


def optional_hostport_param(
    ctx: click.Context, param: click.Parameter, value: str | None
) -> tuple[str, int] | None:
    """``hostport_param``, or None for an empty value (off)."""
    return hostport_param(ctx, param, value) if value else None


def namespace_param(ctx: click.Context, param: click.Parameter, value: str) -> str:
    from atlasd.fleet.validate import is_dns_label

    if not is_dns_label(value):
        raise click.BadParameter(
            f"{value!r} is not a namespace name (a DNS-1123 label: lowercase letters, "
            "digits and '-', at most 63 characters)",
            ctx=ctx,
            param=param,
        )
    return value


def lock_names_param(ctx: click.Context, param: click.Parameter, value: str) -> tuple[str, ...]:
    from atlasd.fleet.validate import is_dns_label

    names = tuple(n.strip() for n in value.split(",") if n.strip())
    for n in names:
        if not is_dns_label(n) and not all(is_dns_label(part) for part in n.split(".")):
            raise click.BadParameter(f"{n!r} is not an object name", ctx=ctx, param=param)
    return names


def external_ips_param(
    ctx: click.Context, param: click.Parameter, value: tuple[str, ...]
) -> tuple[str, ...]:
    # Repeatable, and comma-separated as the original's flag also took it.
    ips = tuple(ip.strip() for item in value for ip in item.split(",") if ip.strip())
    if value and not ips:
        raise click.BadParameter("no address given", ctx=ctx, param=param)
    return ips


Decorator = Callable[[Any], Any]


class EmptyEnvIsAValue(click.Option):
    """An option whose environment variable counts when it is set but empty (click takes
    an empty variable for an unset one): ``ATLAS_LEGACY_LOCKS=""`` means "no locks", as
    ``--legacy-locks ''`` does, not the default."""

    def resolve_envvar_value(self, ctx: click.Context) -> str | None:
        names = [self.envvar] if isinstance(self.envvar, str) else list(self.envvar or ())
        for name in names:
            if name in os.environ:
                return os.environ[name]
        return super().resolve_envvar_value(ctx)


def env_option(*decls: str, env: str | list[str], **kwargs: Any) -> Decorator:
    """A click option read from ``env`` too, with its default and variable in --help."""
    kwargs.setdefault("show_default", True)
    return click.option(*decls, envvar=env, show_envvar=True, **kwargs)


def apply_options(f: F, opts: list[Decorator]) -> F:
    out: Any = f
    for opt in reversed(opts):
        out = opt(out)
    return cast(F, out)


def common_settings(f: F) -> F:
    """Options that shape Settings, shared by ``run`` and the cluster commands."""
    return apply_options(
        f,
        [
            env_option(
                "--namespace",
                "-n",
                env="NAMESPACE",
                default=model.DEFAULT_NAMESPACE,
                callback=namespace_param,
                help="atlasd's namespace (where cluster Services live).",
            ),
            env_option(
                "--kubeconfig",
                env="ATLAS_KUBECONFIG",
                default=None,
                help="kubeconfig file (default: $KUBECONFIG, ~/.kube/config, then in-cluster).",
            ),
            click.option("--context", default=None, help="kubeconfig context to use."),
            env_option(
                "--store",
                type=click.Path(file_okay=False, path_type=Path),
                env="ATLAS_STORE",
                default=None,
                help="Standalone mode: no Kubernetes; clusters and state in this directory.",
            ),
        ],
    )


def run_trio(fn: Callable[[], Awaitable[T]]) -> T:
    return trio.run(fn)


def backend_options(f: F) -> F:
    """``common_settings`` for a command that only needs its ``BackendSpec``: the command gets
    ``backend=`` instead of the four options."""

    @functools.wraps(f)
    def wrapper(
        *,
        namespace: str,
        kubeconfig: str | None,
        context: str | None,
        store: Path | None,
        **kw: Any,
    ) -> Any:
        return f(backend=BackendSpec(namespace, kubeconfig, context, store), **kw)

    return common_settings(cast(F, wrapper))


def dial_param(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """An optional ``host:port`` to dial: ``hostport_param``'s rules, with a host and a
    port that are not left for the system to choose."""
    if value is None:
        return None
    _, port = hostport_param(ctx, param, value)
    if not value.rpartition(":")[0].strip("[]") or port == 0:
        raise click.BadParameter(f"{value!r} is not HOST:PORT to dial", ctx=ctx, param=param)
    return value


def fail(message: str) -> NoReturn:
    click.secho(f"error: {message}", fg="red", err=True)
    sys.exit(1)


# -- options more than one command takes (declared once) -------------------------------------

# Where a running atlasd answers /status (`status`, `check`).
status_url_option = env_option(
    "--url",
    env="ATLAS_STATUS_URL",
    default=f"http://127.0.0.1:{model.METRICS_PORT}",
    help="atlasd's metrics/status address.",
)

EXTERNAL_IP_HELP = (
    "The downstream Envoy's reachable address; repeatable or comma-separated (all are "
    "validated and stored; the first is the one atlasd dials)."
)
VALUES_FORMAT = click.Choice(["raw", "helm-chart", "helm-release"])

external_ip_option = click.option(
    "--external-ip",
    "external_ips",
    required=True,
    multiple=True,
    callback=external_ips_param,
    help=EXTERNAL_IP_HELP,
)
replicas_option = click.option(
    "--replicas",
    default=1,
    show_default=True,
    type=click.IntRange(1, 64),
    help="Thanos/Prometheus replicas on that cluster.",
)
overwrite_option = click.option(
    "--overwrite", is_flag=True, help="Replace an existing cluster's settings."
)
values_format_option = click.option(
    "--format", "fmt", type=VALUES_FORMAT, default="raw", show_default=True
)
output_option = click.option(
    "-o",
    "--output",
    type=click.Choice(["table", "json", "yaml"]),
    default="table",
    show_default=True,
)


def compat_logging_options() -> list[Decorator]:
    """The original's ``-l/--log-level`` (LOGLEVEL) and its ignored ``--config``."""
    return [
        env_option(
            "-l",
            "--log-level",
            "compat_log_level",
            env="LOGLEVEL",
            default=None,
            type=click.Choice(LOG_LEVELS, case_sensitive=False),
        ),
        click.option("--config", "compat_config", default=None, hidden=True),
    ]
