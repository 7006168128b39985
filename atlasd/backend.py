"""Where atlasd keeps its state: a Kubernetes API server, or a directory (standalone).

Both are a ``KubeApi`` (``atlasd.kube.api``); what differs is said once, here, as what the
backend can do, and everything above asks that instead of "are we standalone?":

=====================  ============================  ==================================
                       Kubernetes (``KubeClient``)   a directory (``FileStore``)
=====================  ============================  ==================================
leases                 yes: Lease election           no: its one process always leads
zone mirror            the ``atlas-coredns`` map     no: the zone file only
namespace check        yes (readiness says so)       no: the directory is the namespace
store problems         no                            a bad file, reported per file
=====================  ============================  ==================================

``BackendSpec`` is what a command line names (namespace, kubeconfig and context, or a
store directory); ``open_backend`` opens it, for the daemon and every CLI command alike.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from atlasd.kube.api import KubeApi
from atlasd.model import Settings

# (file relative to the store, what is wrong with it or None once it is fine again)
StoreProblem = Callable[[str, str | None], None]


@dataclass(frozen=True)
class BackendSpec:
    """Where a command works: Kubernetes (kubeconfig, context) or a store, in a namespace."""

    namespace: str
    kubeconfig: str | None = None
    context: str | None = None
    store: Path | None = None
    store_poll_seconds: float = 0.5

    @property
    def settings(self) -> Settings:
        return Settings(namespace=self.namespace)

    def problem(self) -> str | None:
        """What is wrong with this spec before anything starts (one line), or None."""
        if self.store is not None:
            return None  # created as needed
        from atlasd.kube.config import load_config
        from atlasd.kube.errors import ConfigError

        try:
            load_config(self.kubeconfig, self.context)
        except ConfigError as exc:
            return str(exc)
        return None

    def open(
        self, *, on_store_problem: StoreProblem | None = None
    ) -> AbstractAsyncContextManager[Backend]:
        return open_backend(self, on_store_problem=on_store_problem)


@dataclass(frozen=True)
class Backend:
    """An open backend and what it can do."""

    api: KubeApi
    kind: str  # "kubernetes" or "directory": for messages
    # Leader election over a Lease (else this process always leads).
    leases: bool
    # ConfigMaps for what is also written to files: the zone's mirror, the endpoint
    # configuration (the directory backend has only the files).
    configmaps: bool
    # Whether the namespace exists (None: nothing to check).
    namespace_exists: Callable[[str], Awaitable[bool]] | None


@asynccontextmanager
async def open_backend(
    spec: BackendSpec, *, on_store_problem: StoreProblem | None = None
) -> AsyncIterator[Backend]:
    """Open ``spec``'s backend for the duration of the block."""
    if spec.store is not None:
        from atlasd.standalone import FileStore

        store = FileStore(
            spec.store,
            namespace=spec.namespace,
            poll_seconds=spec.store_poll_seconds,
            on_problem=on_store_problem,
        )
        async with store:
            yield Backend(
                api=store, kind="directory", leases=False, configmaps=False, namespace_exists=None
            )
        return
    from atlasd.kube.client import KubeClient
    from atlasd.kube.config import load_config

    async with KubeClient(load_config(spec.kubeconfig, spec.context)) as client:
        yield Backend(
            api=client,
            kind="kubernetes",
            leases=True,
            configmaps=True,
            namespace_exists=client.namespace_exists,
        )
