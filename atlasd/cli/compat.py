"""The original Atlas's spellings: its container commands ``controller`` and
``envoy-ads`` (``run`` with the original's flags and environment) and its CLI's
``cluster-add --name`` and ``cluster-values --name``."""

from __future__ import annotations

import functools
from typing import Any, cast

import click

from atlasd import model
from atlasd.backend import BackendSpec
from atlasd.cli.app import cli
from atlasd.cli.cluster import add_cluster, print_cluster_values
from atlasd.cli.options import (
    F,
    apply_options,
    compat_logging_options,
    configure_logging,
    external_ip_option,
    namespace_param,
    overwrite_option,
    replicas_option,
    values_format_option,
)
from atlasd.cli.run import run_daemon, run_options


@cli.command("controller")
@run_options(compat=True)
def controller(**params: Any) -> None:
    """The original Atlas's `controller` command: runs the whole daemon (it leads and
    writes; it also serves xDS). Takes the original's flags and environment."""
    run_daemon(params, mode="controller")


@cli.command("envoy-ads")
@run_options(compat=True)
def envoy_ads(**params: Any) -> None:
    """The original Atlas's `envoy-ads` command: serves xDS from the watch cache and never
    writes (another atlasd leads). Takes the original's flags and environment."""
    run_daemon(params, mode="envoy-ads")


# -- the original's CLI spellings ---------------------------------------------------------


def _compat_cluster_options(f: F) -> F:
    """The original's flags of ``cluster-add`` / ``cluster-values`` (and its global ones);
    the command gets ``name`` and ``backend=``, the log level already applied."""

    @functools.wraps(f)
    def wrapper(
        *,
        namespace: str,
        kubeconfig: str | None,
        context: str | None,
        compat_log_level: str | None,
        compat_config: str | None,
        **kw: Any,
    ) -> Any:
        if compat_log_level:
            configure_logging(compat_log_level)
        return f(backend=BackendSpec(namespace, kubeconfig, context), **kw)

    return apply_options(
        cast(F, wrapper),
        [
            click.option("--name", required=True, help="The cluster's name."),
            click.option(
                "--namespace",
                default=model.DEFAULT_NAMESPACE,
                show_default=True,
                callback=namespace_param,
            ),
            click.option("--kubeconfig", default=None, help="kubeconfig file."),
            click.option("--context", default=None, help="kubeconfig context to use."),
            *compat_logging_options(),
        ],
    )


@cli.command("cluster-add")
@_compat_cluster_options
@external_ip_option
@replicas_option
@overwrite_option
def cluster_add_compat(
    backend: BackendSpec,
    name: str,
    external_ips: tuple[str, ...],
    replicas: int,
    overwrite: bool,
) -> None:
    """The original's spelling of `cluster add NAME` (--name NAME)."""
    add_cluster(
        backend=backend,
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
@values_format_option
def cluster_values_compat(backend: BackendSpec, name: str, fmt: str) -> None:
    """The original's spelling of `cluster values NAME` (--name NAME)."""
    print_cluster_values(backend=backend, name=name, fmt=fmt)
