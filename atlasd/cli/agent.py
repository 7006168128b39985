"""``atlasd agent``: enroll a downstream cluster with a join token and keep its
certificates current (``atlasd.enroll.agent``)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import click

from atlasd import logs, model
from atlasd.cli.app import cli
from atlasd.cli.options import dial_param, env_option, fail, namespace_param

# Seconds a stop (SIGTERM) may take before the process ends hard.
STOP_GRACE = 10.0


@cli.command()
@env_option(
    "--server",
    env="ATLAS_ENROLL_SERVER",
    required=True,
    callback=dial_param,
    help="HOST:PORT of atlasd's enrollment endpoint.",
)
@env_option(
    "--server-name",
    env="ATLAS_ENROLL_SERVER_NAME",
    default=model.ADS_SERVER_NAME,
    help="The name atlasd's certificate is checked for.",
)
@click.option("--cluster", envvar="ATLAS_CLUSTER", show_envvar=True, required=True)
@env_option(
    "--namespace",
    "-n",
    env="NAMESPACE",
    default=model.DEFAULT_NAMESPACE,
    callback=namespace_param,
    help="atlasd's namespace (part of the names in the certificates).",
)
@click.option(
    "--token-file",
    envvar="ATLAS_JOIN_TOKEN_FILE",
    show_envvar=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="File holding the join token (atlasd cluster token); or ATLAS_JOIN_TOKEN.",
)
@env_option(
    "--dir",
    "directory",
    env="ATLAS_CERT_DIR",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Where keys, certificates and the SDS files for Envoy are written.",
)
@click.option("--once", is_flag=True, help="Enroll (unless already) and exit: an init container.")
@env_option(
    "--bundle-interval",
    env="ATLAS_BUNDLE_INTERVAL",
    type=click.FloatRange(min=1),
    default=60.0,
    help="Seconds between checks of the trust bundle (CA rotations).",
)
@env_option(
    "--state-secret",
    env="ATLAS_STATE_SECRET",
    default=None,
    help="Keep the credentials in this Secret of the agent's own cluster too, and restore "
    "them from it into an empty --dir (a replaced pod needs no new token).",
)
@env_option(
    "--state-namespace",
    env="ATLAS_STATE_NAMESPACE",
    default=None,
    help="The --state-secret's namespace (default: the kubeconfig's, in a pod its own).",
)
@env_option(
    "--kubeconfig",
    env="ATLAS_KUBECONFIG",
    default=None,
    help="For --state-secret: kubeconfig file (default: $KUBECONFIG, then in-cluster).",
)
@env_option(
    "--log-format", env="ATLAS_LOG_FORMAT", type=click.Choice(["text", "json"]), default="text"
)
def agent(
    server: str,
    server_name: str,
    cluster: str,
    namespace: str,
    token_file: Path | None,
    directory: Path,
    once: bool,
    bundle_interval: float,
    state_secret: str | None,
    state_namespace: str | None,
    kubeconfig: str | None,
    log_format: Literal["text", "json"],
) -> None:
    """Enroll this downstream cluster with a one-time join token and keep its certificates
    current; the private keys are made here and never sent."""
    import os

    from atlasd.enroll.agent import AgentError, AgentOptions, Server, run_agent
    from atlasd.enroll.token import Refused, parse

    logs.use_format(log_format)
    text = os.environ.get("ATLAS_JOIN_TOKEN", "")
    if token_file is not None:
        try:
            text = token_file.read_text()
        except OSError as exc:
            fail(f"cannot read --token-file: {exc.strerror}")
    try:
        token = parse(text) if text.strip() else None
    except Refused as exc:
        fail(str(exc))
    host, _, port = server.rpartition(":")
    options = AgentOptions(
        server=Server(host.strip("[]"), int(port), server_name),
        cluster=cluster,
        directory=directory,
        settings=model.Settings(namespace=namespace),
        token=token,
        once=once,
        bundle_interval=bundle_interval,
    )

    async def main() -> None:
        if not state_secret:
            await run_agent(options)
            return
        from dataclasses import replace

        from atlasd.enroll.state import StateSecret
        from atlasd.kube.client import KubeClient
        from atlasd.kube.config import load_config

        config = load_config(kubeconfig)
        async with KubeClient(config, user_agent="atlasd-agent") as kube:
            state = StateSecret(kube, state_secret, state_namespace or config.namespace)
            await run_agent(replace(options, state=state))

    from atlasd.cli.process import serve_until_signalled, startup_error
    from atlasd.kube.errors import ConfigError

    # Until SIGTERM (the kubelet stopping the pod): as a container's PID 1 the agent would
    # otherwise ignore it and hold the pod for its whole grace period.
    try:
        serve_until_signalled(main, grace=STOP_GRACE)
    except (AgentError, ConfigError, ExceptionGroup) as exc:
        fail(startup_error(exc, AgentError))
