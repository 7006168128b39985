"""The async Kubernetes API client: the only code that speaks HTTP to the API server.

``KubeClient`` wraps one ``httpx2.AsyncClient`` (httpx2 runs under trio through anyio):
watches go through the client, every other request straight to its transport (``_Http``).
It knows the verbs atlasd needs — get, list (paginated), server-side apply, create,
replace, delete, watch — and nothing else: no discovery, no caching (see
``atlasd.watch.informer`` for that).

Every failure is translated here, in ``_send``/``_raise_for``, into the tree of
``atlasd.kube.errors`` (``ApiError`` subclasses from the API's ``Status``;
``TransportError`` from httpx2). A 401 makes the client refresh a refreshable
credential (tokenFile, exec plugin) and retry the request once.

``watch`` yields the decoded ``{type, object}`` events of one watch request; an ``ERROR``
event is raised as the ``ApiError`` of its Status (so a 410 arrives as ``Gone`` whether
it came as an HTTP status or as an event). Consume it with ``contextlib.aclosing``.
"""

from __future__ import annotations

import builtins
import logging
from collections.abc import AsyncGenerator, Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self
from urllib.parse import quote, urlencode

import httpx2
import msgspec

from atlasd.kube import bodies
from atlasd.kube.api import JSON
from atlasd.kube.config import Credential, Credentials, KubeConfig, ssl_context
from atlasd.kube.errors import ApiError, Gone, NotFound, TransportError, api_error
from atlasd.kube.resources import EVENTS, ApiResource, resource_for
from atlasd.kube.transport import OneWriteTransport
from atlasd.labels import FIELD_MANAGER
from atlasd.metrics import KUBE_REQUESTS

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 30.0
LIST_PAGE_SIZE = 500
# Extra read time on top of a watch's timeoutSeconds before the client gives up.
WATCH_READ_GRACE = 30.0

# A LIST answered with only each item's metadata (meta.k8s.io PartialObjectMetadataList).
_METADATA_LIST = "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1"
# A write answered with only the stored object's metadata (meta.k8s.io PartialObjectMetadata):
# the API server transforms a write's response as it does a GET's. A Secret of atlasd's is
# answered in ~430 bytes instead of ~12 KB, which neither side then encodes nor parses.
_METADATA_OBJECT = "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1"


def _retry_after(resp: httpx2.Response) -> float | None:
    value = resp.headers.get("Retry-After")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


def _decode(content: bytes | str) -> object:
    """JSON as plain Python values (maps, lists, strings, numbers)."""
    return msgspec.json.decode(content)


def _body(resp: httpx2.Response) -> object:
    try:
        return _decode(resp.content)
    except msgspec.DecodeError:  # a ValueError; invalid UTF-8 too
        return None


# A metadata-only LIST page as what its readers use of it (the full pass compares versions
# by key): name, namespace, labels, resourceVersion. Decoded into these types, the rest of
# each item's metadata (managedFields, owner references, annotations, times, uid) is skipped
# by the parser, never made into Python objects. The full pass over 10,000 clusters lists
# ~40,000 items: decoding them took 25 of its 63 samples, now 4 of 26, and the RSS peak
# it left fell by ~130 MiB (bench/README.md, issue 25).
class _ItemMeta(msgspec.Struct):
    name: str = ""
    namespace: str = ""
    resourceVersion: str = ""
    labels: dict[str, str] | None = None


class _Item(msgspec.Struct):
    metadata: _ItemMeta


class _PageMeta(msgspec.Struct):
    resourceVersion: str = ""
    continue_: str = msgspec.field(name="continue", default="")


class _MetadataPage(msgspec.Struct):
    metadata: _PageMeta
    items: list[_Item] | None = None  # the API server sends null for none


_METADATA_PAGE = msgspec.json.Decoder(_MetadataPage)


def _metadata_page(content: bytes) -> object:
    """A metadata-only LIST page in the shape of the API's (``{metadata, items}``), each
    item's metadata reduced to ``_ItemMeta``."""
    page = _METADATA_PAGE.decode(content)
    return {
        "metadata": {
            "resourceVersion": page.metadata.resourceVersion,
            "continue": page.metadata.continue_,
        },
        "items": [
            {
                "metadata": {
                    "name": i.metadata.name,
                    "namespace": i.metadata.namespace,
                    "resourceVersion": i.metadata.resourceVersion,
                    "labels": i.metadata.labels or {},
                }
            }
            for i in page.items or ()
        ],
    }


@dataclass(frozen=True)
class _Http:
    """The HTTP client of one client certificate: ``client`` for watches (streamed), and
    the ``transport`` beneath it, which every other request is handed to directly.

    A request that is sent and read whole needs none of what ``httpx2.AsyncClient`` adds
    above its transport (URL merging, auth and redirect handling, event hooks, cookies):
    3,000 server-side applies of atlasd's bodies at 16 in flight, three rounds in one
    run, 0.89-1.21 -> 0.69-0.82 ms of atlasd's CPU per apply (bench/README.md, issue
    25). The transport still maps httpcore2's errors to httpx2's and decodes the body."""

    client: httpx2.AsyncClient
    transport: httpx2.AsyncBaseTransport


class KubeClient:
    """An async client for one API server; use as ``async with KubeClient(cfg) as kube``."""

    def __init__(
        self,
        config: KubeConfig,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        field_manager: str = FIELD_MANAGER,
        user_agent: str = "atlasd",
        transport: httpx2.AsyncBaseTransport | None = None,
    ) -> None:
        self.config = config
        self.credentials = Credentials(config)
        self.field_manager = field_manager
        self._timeout = timeout
        # Tests substitute an in-memory transport; None = real TLS connections.
        self._transport = transport
        # The HTTP client for the current client certificate; replaced (old ones kept
        # open until close, since watches may still be reading them) when an exec
        # plugin hands out a different certificate.
        self._http: _Http | None = None
        self._http_identity: tuple[bytes | None, bytes | None] | None = None
        self._retired: list[_Http] = []
        self._extensions: dict[str, Any] = {}
        if config.tls_server_name:
            self._extensions["sni_hostname"] = config.tls_server_name
        # What ``_send`` builds each request from (``_Http``): the server's URL, whose path
        # (a proxy's prefix, if any) every request's path is appended to, the headers every
        # request carries, and the timeouts as httpcore2 takes them.
        self._base = httpx2.URL(config.server)
        self._prefix = self._base.raw_path.decode("ascii").rstrip("/")
        self._headers = {
            "User-Agent": user_agent,
            "Accept": "application/json",
            "Accept-Encoding": "gzip",
        }
        self._send_extensions = {
            **self._extensions,
            "timeout": httpx2.Timeout(timeout).as_dict(),
        }

    @property
    def namespace(self) -> str:
        """The default namespace (kubeconfig context or the service account's)."""
        return self.config.namespace

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        clients = [*self._retired, *([self._http] if self._http else [])]
        self._http = None
        self._retired = []
        for c in clients:
            await c.client.aclose()

    # -- transport ----------------------------------------------------------------------

    def _client_for(self, cred: Credential) -> _Http:
        identity = (cred.client_cert, cred.client_key)
        if self._http is not None and self._http_identity == identity:
            return self._http
        ctx = ssl_context(self.config, cred)
        if self._http is not None:
            self._retired.append(self._http)
        limits = httpx2.Limits(max_connections=200, max_keepalive_connections=50)
        transport = self._transport
        if transport is None and self.config.proxy_url:
            # The kubeconfig's proxy-url, for every request (as client-go: the
            # environment's proxy variables do not apply then).
            transport = httpx2.AsyncHTTPTransport(
                verify=ctx, limits=limits, proxy=self.config.proxy_url
            )
        elif transport is None:
            # Each request's head and body in one TLS record (atlasd.kube.transport).
            transport = OneWriteTransport(verify=ctx, limits=limits)
        client = httpx2.AsyncClient(
            base_url=self.config.server,
            verify=ctx,
            timeout=self._timeout,
            headers=self._headers,
            limits=limits,
            transport=transport,
        )
        self._http = _Http(client, transport)
        self._http_identity = identity
        return self._http

    @staticmethod
    def _auth(cred: Credential) -> dict[str, str]:
        return {"Authorization": f"Bearer {cred.token}"} if cred.token else {}

    async def _send(
        self,
        method: str,
        path: str,
        *,
        verb: str,
        res: ApiResource,
        name: str | None,
        namespace: str | None,
        params: Mapping[str, str] | None = None,
        body: bytes | None = None,
        content_type: str | None = None,
        accept: str | None = None,
        decode: Callable[[bytes], object] = _decode,
    ) -> object:
        """One request with 401-refresh-retry; returns the JSON body, decoded by ``decode``
        (an error's body always as plain values)."""
        target = self._prefix + path
        if params:
            target += "?" + urlencode(params, quote_via=quote)
        url = self._base.copy_with(raw_path=target.encode("ascii"))
        for attempt in (0, 1):
            cred = await self.credentials.get()
            transport = self._client_for(cred).transport
            headers = self._headers | self._auth(cred)
            if content_type:
                headers["Content-Type"] = content_type
            if accept:
                headers["Accept"] = accept
            request = httpx2.Request(
                method, url, headers=headers, content=body, extensions=self._send_extensions
            )
            try:
                resp = await transport.handle_async_request(request)
                try:
                    await resp.aread()
                finally:
                    await resp.aclose()
            except httpx2.HTTPError as exc:
                KUBE_REQUESTS.labels(verb, res.plural, "error").inc()
                raise TransportError(
                    f"{verb} {res}{' ' + name if name else ''}: {type(exc).__name__}: {exc}"
                ) from exc
            KUBE_REQUESTS.labels(verb, res.plural, str(resp.status_code)).inc()
            if resp.status_code == 401 and attempt == 0 and await self.credentials.refresh(cred):
                log.info("401 from the API server; credentials refreshed, retrying %s", verb)
                continue
            if resp.status_code >= 400:
                raise api_error(
                    status_code=resp.status_code,
                    body=_body(resp),
                    verb=verb,
                    resource=str(res),
                    name=name,
                    namespace=namespace,
                    retry_after=_retry_after(resp),
                )
            try:
                return decode(resp.content)
            except msgspec.DecodeError as exc:  # not JSON, or not of the shape asked for
                # msgspec names where (``$.items[0].metadata``) and what it expected, never
                # a value.
                raise TransportError(
                    f"{verb} {res}{' ' + name if name else ''}: the API server's answer "
                    f"does not decode: {exc}"
                ) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def _ns(self, res: ApiResource, namespace: str | None) -> str | None:
        if not res.namespaced:
            return None
        return namespace or self.config.namespace

    @staticmethod
    def _object(res: ApiResource, body: object) -> JSON:
        if not isinstance(body, dict):
            raise TransportError(f"{res}: the API server sent no object")
        body.setdefault("apiVersion", res.api_version)
        body.setdefault("kind", res.kind)
        return body

    # -- verbs --------------------------------------------------------------------------

    async def get(self, res: ApiResource, name: str, *, namespace: str | None = None) -> JSON:
        ns = self._ns(res, namespace)
        body = await self._send(
            "GET", res.path(namespace=ns, name=name), verb="get", res=res, name=name, namespace=ns
        )
        return self._object(res, body)

    async def list(
        self,
        res: ApiResource,
        *,
        namespace: str | None = None,
        label_selector: str | None = None,
        field_selector: str | None = None,
        metadata_only: bool = False,
    ) -> tuple[list[JSON], str]:
        """All items (kind/apiVersion filled in) and the list's resourceVersion.

        Pages of ``LIST_PAGE_SIZE``; if a continue token expires mid-way (410) the list
        is redone in one request, as client-go's pager does. ``metadata_only``: the items
        are ``PartialObjectMetadata`` (metadata, no spec or data: a fraction of the bytes),
        their metadata only ``name``, ``namespace``, ``labels`` and ``resourceVersion``.
        """
        ns = self._ns(res, namespace)
        path = res.path(namespace=ns)
        base: dict[str, str] = {}
        if label_selector:
            base["labelSelector"] = label_selector
        if field_selector:
            base["fieldSelector"] = field_selector
        accept = _METADATA_LIST if metadata_only else None

        async def page(params: Mapping[str, str]) -> tuple[builtins.list[JSON], Mapping[str, Any]]:
            body = await self._send(
                "GET",
                path,
                verb="list",
                res=res,
                name=None,
                namespace=ns,
                params=params,
                accept=accept,
                decode=_metadata_page if metadata_only else _decode,
            )
            return self._list_body(res, body)

        items: list[JSON] = []
        rv = ""
        cont = ""
        try:
            while True:
                params = {**base, "limit": str(LIST_PAGE_SIZE)}
                if cont:
                    params["continue"] = cont
                page_items, body = await page(params)
                items.extend(page_items)
                if not rv:
                    rv = bodies.resource_version(body)
                cont = bodies.list_continue(body)
                if not cont:
                    break
        except Gone:
            if not cont:
                raise
            items, body = await page(base)
            rv = bodies.resource_version(body)
        return items, rv

    def _list_body(
        self, res: ApiResource, body: object
    ) -> tuple[builtins.list[JSON], Mapping[str, Any]]:
        if not isinstance(body, dict):
            raise TransportError(f"list {res}: the API server sent no list")
        raw = body.get("items") or []
        items = [self._object(res, i) for i in raw if isinstance(i, dict)]
        return items, body

    def _target(
        self, obj: Mapping[str, Any], *, need_name: bool = True
    ) -> tuple[ApiResource, str, str | None]:
        res = resource_for(str(obj.get("apiVersion") or ""), str(obj.get("kind") or ""))
        name = bodies.name(obj)
        if not name and need_name:
            raise ValueError(f"{res}: the object has no metadata.name")
        ns = self._ns(res, bodies.namespace(obj))
        return res, name, ns

    async def _write(
        self,
        method: str,
        verb: str,
        res: ApiResource,
        name: str | None,
        ns: str | None,
        payload: Mapping[str, Any],
        content_type: str,
        params: Mapping[str, str] | None = None,
        *,
        collection: bool = False,
        metadata_only: bool = False,
    ) -> JSON:
        """One write as atlasd's field manager: ``payload`` to the object ``name`` (to the
        collection with ``collection``, ``name`` then only naming it in errors); returns
        the stored object (with ``metadata_only``, only its metadata)."""
        body = await self._send(
            method,
            res.path(namespace=ns, name=None if collection else name),
            verb=verb,
            res=res,
            name=name,
            namespace=ns,
            params={"fieldManager": self.field_manager, **(params or {})},
            body=msgspec.json.encode(payload),
            content_type=content_type,
            accept=_METADATA_OBJECT if metadata_only else None,
        )
        return self._object(res, body)

    async def apply(
        self, obj: Mapping[str, Any], *, force: bool = True, metadata_only: bool = False
    ) -> JSON:
        """Server-side apply ``obj`` (creates it if missing); returns the stored object, or
        with ``metadata_only`` its metadata only (a ``PartialObjectMetadata``)."""
        res, name, ns = self._target(obj)
        meta = {k: v for k, v in bodies.meta(obj).items() if k != "managedFields"}
        if ns is not None:
            meta["namespace"] = ns
        payload = {**obj, "metadata": meta}
        return await self._write(
            "PATCH",
            "apply",
            res,
            name,
            ns,
            payload,
            "application/apply-patch+yaml",
            {"force": "true"} if force else None,
            metadata_only=metadata_only,
        )

    async def create(self, obj: Mapping[str, Any]) -> JSON:
        """POST ``obj`` (it may use generateName, or be nameless like a review)."""
        res, name, ns = self._target(obj, need_name=False)
        return await self._write(
            "POST", "create", res, name or None, ns, obj, "application/json", collection=True
        )

    async def namespace_exists(self, namespace: str) -> bool:
        """Whether ``namespace`` exists, asked with only namespaced rights: a dry-run create of
        an Event there (nothing is stored) answers NotFound for a missing namespace."""
        probe = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": "atlasd-probe-", "namespace": namespace},
            "involvedObject": {
                "apiVersion": "v1",
                "kind": "ServiceAccount",
                "name": "atlasd",
                "namespace": namespace,
            },
            "reason": "Probe",
            "message": "namespace existence check (dry run, never stored)",
            "type": "Normal",
        }
        try:
            await self._write(
                "POST",
                "create",
                EVENTS,
                None,
                namespace,
                probe,
                "application/json",
                {"dryRun": "All"},
                collection=True,
            )
        except NotFound:
            return False
        except ApiError as exc:
            # Any other answer (Forbidden to create Events, say) comes from a namespace that
            # is there: only a missing one answers NotFound.
            log.debug("namespace probe of %s: %s", namespace, exc)
        return True

    async def replace(self, obj: Mapping[str, Any]) -> JSON:
        """PUT ``obj``; it must carry metadata.resourceVersion (stale -> Conflict)."""
        res, name, ns = self._target(obj)
        return await self._write("PUT", "update", res, name, ns, obj, "application/json")

    async def patch_merge(
        self, res: ApiResource, name: str, patch: Mapping[str, Any], *, namespace: str | None = None
    ) -> JSON:
        """A JSON merge patch (e.g. to remove one annotation without owning the field)."""
        ns = self._ns(res, namespace)
        return await self._write(
            "PATCH", "patch", res, name, ns, patch, "application/merge-patch+json"
        )

    async def delete(
        self,
        res: ApiResource,
        name: str,
        *,
        namespace: str | None = None,
        resource_version: str | None = None,
    ) -> None:
        """Delete one object (raises NotFound if it is not there)."""
        ns = self._ns(res, namespace)
        opts: dict[str, Any] = {"kind": "DeleteOptions", "apiVersion": "v1"}
        if resource_version:
            opts["preconditions"] = {"resourceVersion": resource_version}
        await self._send(
            "DELETE",
            res.path(namespace=ns, name=name),
            verb="delete",
            res=res,
            name=name,
            namespace=ns,
            body=msgspec.json.encode(opts),
            content_type="application/json",
        )

    async def watch(
        self,
        res: ApiResource,
        *,
        namespace: str | None = None,
        resource_version: str,
        label_selector: str | None = None,
        timeout_seconds: int = 300,
        allow_bookmarks: bool = True,
        send_initial_events: bool = False,
    ) -> AsyncGenerator[JSON, None]:
        """Yield the ``{type, object}`` events of one watch request from ``resource_version``.

        ``send_initial_events`` makes it a streaming list (``resource_version`` "" = the
        most recent state). Ends when the server ends the stream (timeoutSeconds). Raises
        ``Gone`` on a 410
        (HTTP or ERROR event), other ``ApiError``s on failure Statuses, ``TransportError``
        when the connection breaks.
        """
        ns = self._ns(res, namespace)
        params = {
            "watch": "1",
            "resourceVersion": resource_version,
            "timeoutSeconds": str(int(timeout_seconds)),
        }
        if allow_bookmarks:
            params["allowWatchBookmarks"] = "true"
        if send_initial_events:
            # Streaming list: ADDED for every object, then a BOOKMARK annotated
            # k8s.io/initial-events-end (needs bookmarks and NotOlderThan).
            params["sendInitialEvents"] = "true"
            params["allowWatchBookmarks"] = "true"
            params["resourceVersionMatch"] = "NotOlderThan"
        if label_selector:
            params["labelSelector"] = label_selector
        path = res.path(namespace=ns)
        timeout = httpx2.Timeout(self._timeout, read=timeout_seconds + WATCH_READ_GRACE)
        for attempt in (0, 1):
            cred = await self.credentials.get()
            client = self._client_for(cred).client
            request = client.build_request(
                "GET",
                path,
                params=params,
                headers=self._auth(cred),
                timeout=timeout,
                extensions=self._extensions,
            )
            try:
                resp = await client.send(request, stream=True)
            except httpx2.HTTPError as exc:
                KUBE_REQUESTS.labels("watch", res.plural, "error").inc()
                raise TransportError(f"watch {res}: {type(exc).__name__}: {exc}") from exc
            KUBE_REQUESTS.labels("watch", res.plural, str(resp.status_code)).inc()
            try:
                if (
                    resp.status_code == 401
                    and attempt == 0
                    and await self.credentials.refresh(cred)
                ):
                    continue
                if resp.status_code >= 400:
                    await resp.aread()
                    raise api_error(
                        status_code=resp.status_code,
                        body=_body(resp),
                        verb="watch",
                        resource=str(res),
                        namespace=ns,
                        retry_after=_retry_after(resp),
                    )
                async for line in resp.aiter_lines():
                    if not line.strip():
                        continue
                    yield self._event(res, ns, line)
                return
            except httpx2.HTTPError as exc:
                raise TransportError(f"watch {res}: {type(exc).__name__}: {exc}") from exc
            finally:
                await resp.aclose()

    def _event(self, res: ApiResource, ns: str | None, line: str) -> JSON:
        try:
            event = _decode(line)
        except msgspec.DecodeError as exc:
            raise TransportError(f"watch {res}: a line of the stream is not JSON") from exc
        if not isinstance(event, dict) or not isinstance(event.get("object"), dict):
            raise TransportError(f"watch {res}: an event without an object")
        if event.get("type") == "ERROR":
            status = event["object"]
            raise api_error(
                status_code=int(status.get("code") or 500),
                body=status,
                verb="watch",
                resource=str(res),
                namespace=ns,
            )
        obj = event["object"]
        obj.setdefault("apiVersion", res.api_version)
        obj.setdefault("kind", res.kind)
        return event


__all__ = ["KubeClient"]
