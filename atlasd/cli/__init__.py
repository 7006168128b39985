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

Commands by group, one module each: ``run``, ``demo``, ``cluster``, ``status``, ``check`` and
``compat`` (the original's spellings), on the root group of ``app``; what they share
(the click options, the backend, logging) is declared once in ``options``, and how a
command runs its Trio main in ``process``.
"""

from __future__ import annotations

# Importing a command module registers its commands on the root group.
from atlasd.cli import agent, check, cluster, compat, demo, probe, run, status  # noqa: F401
from atlasd.cli.app import cli

__all__ = ["cli", "main"]


def main() -> None:
    cli(prog_name="atlasd")
