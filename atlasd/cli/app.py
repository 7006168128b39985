"""The root ``atlasd`` group (log level, --version) and ``atlasd version``."""

from __future__ import annotations

import click

from atlasd import __version__
from atlasd.cli.options import LOG_LEVELS, configure_logging


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
