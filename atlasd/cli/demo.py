"""``atlasd demo``: the whole design locally on loopback."""

from __future__ import annotations

from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import click

from atlasd import model
from atlasd.cli import process
from atlasd.cli.app import cli
from atlasd.cli.options import fail
from atlasd.cli.process import startup_error

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
@click.option(
    "--thanos",
    envvar="ATLAS_DEMO_THANOS",
    show_envvar=True,
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    default=None,
    help="A thanos binary: a sidecar per cluster and a Thanos Query that discovers them from "
    "atlasd's endpoint configuration, through the Envoy chain (make demo builds one).",
)
def demo(
    workdir: Path | None, ads_port: int, http_port: int, check: bool, loopback: str,
    thanos: Path | None,
) -> None:  # fmt: skip
    """Run the whole design locally on loopback: atlasd, real Envoys, real Prometheus."""
    from atlasd.demo import DemoError, DemoOptions, run_demo

    options = DemoOptions(
        workdir=workdir, ads_port=ads_port, http_port=http_port, check=check, loopback=loopback,
        thanos=thanos,
    )  # fmt: skip
    try:
        process.serve_until_signalled(lambda: _discard(run_demo(options)), grace=20)
    except (DemoError, BaseExceptionGroup) as exc:
        # The nursery wraps it in a group: one line all the same.
        fail(startup_error(exc, DemoError))


async def _discard(coro: Awaitable[Any]) -> None:
    await coro
