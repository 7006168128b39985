"""The one interface of a Kubernetes API, as atlasd uses it.

``atlasd.kube.client.KubeClient`` (a real API server) and ``atlasd.standalone.FileStore``
(a directory) both satisfy it; every layer above takes a ``KubeApi`` and never imports the
HTTP client, so the import contracts hold and mypy checks both implementations.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Mapping
from typing import Any, Protocol

from atlasd.kube.resources import ApiResource

# The one home of these aliases: an object as decoded from the API (or a file), and a
# read-only view of one (what the pure decisions take).
JSON = dict[str, Any]
Obj = Mapping[str, Any]


class KubeApi(Protocol):
    """The verbs atlasd needs (see ``KubeClient`` for their semantics)."""

    async def get(self, res: ApiResource, name: str, *, namespace: str | None = None) -> JSON: ...

    async def list(
        self,
        res: ApiResource,
        *,
        namespace: str | None = None,
        label_selector: str | None = None,
        field_selector: str | None = None,
        metadata_only: bool = False,
    ) -> tuple[list[JSON], str]: ...

    def watch(
        self,
        res: ApiResource,
        *,
        namespace: str | None = None,
        resource_version: str,
        label_selector: str | None = None,
        timeout_seconds: int = 300,
        allow_bookmarks: bool = True,
        send_initial_events: bool = False,
    ) -> AsyncGenerator[JSON, None]: ...

    async def apply(
        self, obj: Mapping[str, Any], *, force: bool = True, metadata_only: bool = False
    ) -> JSON:
        """Server-side apply; the stored object, or with ``metadata_only`` at least its
        metadata (what a caller that only needs the resourceVersion asks for)."""
        ...

    async def create(self, obj: Mapping[str, Any]) -> JSON: ...

    async def replace(self, obj: Mapping[str, Any]) -> JSON: ...

    async def patch_merge(
        self, res: ApiResource, name: str, patch: Mapping[str, Any], *, namespace: str | None = None
    ) -> JSON: ...

    async def delete(
        self,
        res: ApiResource,
        name: str,
        *,
        namespace: str | None = None,
        resource_version: str | None = None,
    ) -> None: ...
