"""The agent's certificate directory: what ``atlasd agent`` writes there and how an Envoy
names it (secrets by SDS from files).

One layout, three users: the agent writes it (``atlasd.enroll.agent``), the bootstrap in an
enrolled cluster's ``<c>-envoy-values`` reads its ``client`` and ``validation`` from it
(``atlasd.reconcile.desired``), and the downstream node's xDS names ``server``, ``client``
and ``validation`` through it (``atlasd.xds.messages``). Those sit in layers that do not
import each other, so the layout lives down here: pure, the standard library and PyYAML.

In the directory: ``server.pem``/``server-key.pem``, ``client.pem``/``client-key.pem``
(each leaf followed by its chain) and ``ca.pem`` (the trust bundle), each a symlink through
``..data`` (swapped by one rename, as the kubelet updates a Secret volume), and one SDS
document per secret, ``sds-<name>.yaml``. An Envoy watching the directory
(``watched_directory``) reloads all of them at the rename, with no restart.
"""

from __future__ import annotations

from pathlib import PurePath, PurePosixPath
from typing import Any

import yaml

DEFAULT_CERT_DIR = "/etc/atlas/certs"
"""Where the envoy chart mounts the agent's directory (values ``agent.certDir``)."""

LEAVES = ("server", "client")
VALIDATION = "validation"
SECRETS = (*LEAVES, VALIDATION)
"""The secret names, as atlasd's xDS names them (``server``, ``client``, ``validation``)."""

SECRET_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"


def sds_path(directory: str | PurePath, name: str) -> str:
    """The SDS document of secret ``name`` in ``directory``."""
    return str(PurePosixPath(directory) / f"sds-{name}.yaml")


def sds_config(directory: str | PurePath, name: str) -> dict[str, Any]:
    """The ``sds_config`` an Envoy config names secret ``name`` of the agent's with."""
    return {
        "path_config_source": {
            "path": sds_path(directory, name),
            "watched_directory": {"path": str(PurePosixPath(directory))},
        }
    }


def sds_files(directory: str | PurePath) -> dict[str, str]:
    """The SDS-from-files documents (``sds-<name>.yaml`` -> YAML) for ``directory``."""
    d = PurePosixPath(directory)

    def doc(secret: dict[str, Any]) -> str:
        return yaml.safe_dump({"resources": [{"@type": SECRET_TYPE, **secret}]}, sort_keys=False)

    out = {
        f"sds-{kind}.yaml": doc(
            {
                "name": kind,
                "tls_certificate": {
                    "certificate_chain": {"filename": str(d / f"{kind}.pem")},
                    "private_key": {"filename": str(d / f"{kind}-key.pem")},
                },
            }
        )
        for kind in LEAVES
    }
    out[f"sds-{VALIDATION}.yaml"] = doc(
        {"name": VALIDATION, "validation_context": {"trusted_ca": {"filename": str(d / "ca.pem")}}}
    )
    return out
