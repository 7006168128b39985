"""The agent's credentials kept in a Secret of its own cluster (``atlasd agent
--state-secret``), so that a replaced pod needs no new join token.

A join token is used once; the keys the agent makes live in the pod's ``emptyDir``. Without
more, a rolling upgrade, a rescheduled pod or a second replica would find an empty
directory and a spent token, and could never enroll again. So the agent saves what it
writes (keys, certificates, bundle) into one Secret of the namespace it runs in — the
downstream cluster's, never atlasd's — and a new pod restores it from there, then renews
over mTLS (fresh keys of its own). The Secret holds the PEM files by their file names
(``atlasd.enroll.agent.FILES``) and ``token-id``: the public id of the join token that
enrolled them (never its secret). A token whose id differs from it is a new one (after
``atlasd cluster revoke --rekey``): the agent then enrolls with it instead of restoring.

Access is atlasd's own Kubernetes client (``atlasd.kube``) with the pod's service account:
``get`` and ``update`` of that one Secret, ``create`` in its namespace (the envoy chart's
Role; ``create`` cannot be limited to a name).

Errors: ``KubeError`` from the client, translated by the caller (``atlasd.enroll.agent``).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from atlasd import labels
from atlasd.certpolicy import load_cert
from atlasd.kube.api import KubeApi
from atlasd.kube.conditional import write_conditionally
from atlasd.kube.errors import NotFound
from atlasd.kube.resources import SECRETS
from atlasd.kube.secrets import encode_secret_data, secret_data

TOKEN_ID_KEY = "token-id"
MANAGER = "atlasd-agent"
# Tries of a save that lost a race (another pod of the same cluster wrote in between).
SAVE_TRIES = 5


@dataclass(frozen=True)
class Saved:
    """What the Secret holds: the agent's files (PEM, by name) and the enrolling token's id."""

    files: Mapping[str, bytes] = field(repr=False)
    token_id: str


def valid(files: Mapping[str, bytes], names: tuple[str, ...], now: dt.datetime) -> bool:
    """Whether ``files`` holds every one of ``names`` and a client certificate valid now."""
    if not all(files.get(n) for n in names):
        return False
    cert = load_cert(files["client.pem"])
    return cert is not None and cert.not_valid_before_utc <= now < cert.not_valid_after_utc


@dataclass(frozen=True)
class StateSecret:
    """One Secret ``namespace/name`` holding an agent's credentials."""

    api: KubeApi
    name: str
    namespace: str

    def _body(self, saved: Saved) -> dict[str, Any]:
        meta: dict[str, Any] = {
            "name": self.name,
            "namespace": self.namespace,
            "labels": {labels.PART_OF_LABEL: "atlasd", labels.MANAGED_BY_LABEL: MANAGER},
        }
        data = {**saved.files, TOKEN_ID_KEY: saved.token_id.encode()}
        return {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": meta,
            "type": "Opaque",
            "data": encode_secret_data(data),
        }

    async def load(self) -> Saved | None:
        """The saved credentials (None when the Secret does not exist)."""
        try:
            obj = await self.api.get(SECRETS, self.name, namespace=self.namespace)
        except NotFound:
            return None
        data = secret_data(obj)
        token_id = data.pop(TOKEN_ID_KEY, b"").decode(errors="replace")
        return Saved(files=data, token_id=token_id)

    async def save(self, saved: Saved) -> None:
        """Replace the Secret's content with ``saved`` (created if missing). A write that
        races another pod's is done again on top of it: the last credentials written win,
        and any of them restores (each pod then renews with keys of its own)."""
        await write_conditionally(
            self.api,
            SECRETS,
            self.name,
            namespace=self.namespace,
            body=lambda _current: self._body(saved),
            tries=SAVE_TRIES,
        )
