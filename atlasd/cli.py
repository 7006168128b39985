"""The ``atlasd`` command line (click).

click is used rather than argparse for nested command groups, environment-variable
defaults for every option and testable invocation (``CliRunner``).
"""

from __future__ import annotations

import click

from atlasd import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """atlasd: PKI, Envoy xDS and DNS discovery for Thanos across many clusters."""


@cli.command()
def version() -> None:
    """Print atlasd's version."""
    click.echo(f"atlasd {__version__}")


def main() -> None:
    cli(prog_name="atlasd")
