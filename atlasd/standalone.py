"""Standalone mode: atlasd with no Kubernetes at all, its state in a directory.

``FileStore`` answers the same verbs as :class:`atlasd.kube.client.KubeClient`
(``atlasd.kube.api.KubeApi``: ``get``, ``list``, ``watch``, ``apply``, ``create``,
``replace``, ``patch_merge``, ``delete``) over a directory, so the informers, the reconcile
applier, the zone writer's ConfigMap mirror and the Events code run unchanged (``watch``
polls the directory)::

    DIR/clusters/*.yaml          cluster Services declared by the operator (input;
                                 one or more YAML documents per file, same labels and
                                 annotations as in Kubernetes)
    DIR/objects/<plural>/<name>.yaml
                                 everything atlasd writes (Secrets with mode 0600)
    DIR/values/<cluster>.yaml    each ``<cluster>-envoy-values`` values.yaml, ready for
                                 ``helm install -f`` (mode 0600: it holds private keys)
    DIR/events.log               Events, one JSON document per line

Objects declared in ``clusters/`` are read-only to atlasd except through
``apply``/``delete`` of a cluster Service (what ``atlasd cluster add/remove`` does),
which write or remove ``clusters/<name>.yaml``.

A declared file that does not parse is one problem of that file, never of the store: it is
reported once per version of it (``on_problem``, ``problems()``; the daemon shows it as
``store_problems`` in ``/status``) and, while it stays bad, what it declared when it last
parsed keeps being served (a typo must not remove, and so revoke, a cluster); every other
file keeps flowing. Every verb speaks the ``KubeError`` tree (a file system failure is a
retriable ``ServerError``) and does its file work in a worker thread, one at a time.

``resourceVersion`` is derived from a file's modification time and size; ``uid`` from
the object's kind and name (stable across restarts), so ownerReferences hold.

A change costs the files it touched: each file is parsed once per version of it (inode,
modification time, size; atlasd's writes replace the file, so each is a new inode), lists
and watches hand out those parsed objects (shared, as an informer's cache shares the API
server's; never mutate them) and a watch parses only the files that changed. Only the
directory listing and a ``stat`` per file are repeated on every poll.
"""

from __future__ import annotations

import builtins
import copy
import json
import logging
import time
import uuid
from collections.abc import AsyncGenerator, Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import trio
import yaml

from atlasd.files import write_atomic
from atlasd.kube import bodies
from atlasd.kube.api import JSON
from atlasd.kube.errors import AlreadyExists, Gone, Invalid, KubeError, NotFound, ServerError
from atlasd.kube.resources import SECRETS, SERVICES, ApiResource, resource_for
from atlasd.kube.secrets import encode_secret_data, secret_data
from atlasd.kube.selectors import matches
from atlasd.labels import CLUSTER_LABEL, VALUES_SECRET_SUFFIX
from atlasd.model import DEFAULT_NAMESPACE

log = logging.getLogger(__name__)
_T = TypeVar("_T")

try:  # libyaml's parser and emitter are ~10x faster than PyYAML's own
    from yaml import CSafeDumper as _Dumper
    from yaml import CSafeLoader as _Loader
except ImportError:  # pragma: no cover - PyYAML built without libyaml
    from yaml import SafeDumper as _Dumper  # type: ignore[assignment]
    from yaml import SafeLoader as _Loader  # type: ignore[assignment]

# A file's version: (inode, mtime_ns, size).
_Version = tuple[int, int, int]
_UID_NAMESPACE = uuid.UUID("5b0b8a4e-8f0e-4f7e-9a55-2f1d7f0a7c11")


def _rv(path: Path) -> str:
    st = path.stat()
    return f"{st.st_mtime_ns}-{st.st_size}"


class FileStore:
    """A directory that answers the Kubernetes verbs atlasd uses."""

    def __init__(
        self,
        root: Path,
        *,
        namespace: str = DEFAULT_NAMESPACE,
        poll_seconds: float = 0.5,
        on_problem: Callable[[str, str | None], None] | None = None,
    ) -> None:
        self.root = root
        # Told (file relative to ``root``, what is wrong or None once fixed) when a declared
        # file turns bad, changes how it is bad, or is fixed or removed.
        self.on_problem = on_problem
        # Declared files that do not parse: (the file's version, the one-line message).
        self._bad: dict[Path, tuple[_Version, str]] = {}
        # Each declared file's documents as last parsed well: served while it is bad.
        self._good: dict[Path, list[Any]] = {}
        # Problems found in a worker thread, told on the caller's (``_tell``).
        self._to_tell: list[tuple[str, str | None]] = []
        self._limiter = trio.CapacityLimiter(1)
        self._namespace = namespace
        # How often ``watch`` looks at the directory.
        self.poll_seconds = poll_seconds
        # What recent lists returned, by (plural, selector, rv): where a watch starts.
        self._lists: dict[
            tuple[str, str, str], tuple[dict[str, JSON], tuple[tuple[str, int, int], ...]]
        ] = {}
        # Each file's documents as last parsed, with the version of the file they are of.
        self._parsed: dict[Path, tuple[_Version, list[Any]]] = {}
        self.clusters_dir = root / "clusters"
        self.objects_dir = root / "objects"
        self.values_dir = root / "values"
        for d in (self.clusters_dir, self.objects_dir, self.values_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.values_dir.chmod(0o700)

    @property
    def namespace(self) -> str:
        return self._namespace

    async def _io(self, verb: str, res: ApiResource, fn: Callable[[], _T]) -> _T:
        """Run ``fn`` (the verb's file work) in a worker thread, one at a time (the caches
        are this store's alone), and speak the ``KubeError`` tree: a file system failure is
        retriable (``ServerError``), an unusable object is ``Invalid``. Problems found on
        the way are told afterwards, on the caller's thread."""
        try:
            return await trio.to_thread.run_sync(fn, limiter=self._limiter)
        except KubeError:
            raise
        except OSError as exc:
            raise ServerError(
                status=500,
                reason="StoreError",
                message=f"{self.root}: {exc.strerror or exc}",
                verb=verb,
                resource=str(res),
                namespace=self._namespace,
            ) from exc
        except ValueError as exc:
            raise Invalid(
                status=422,
                reason="Invalid",
                message=str(exc),
                verb=verb,
                resource=str(res),
                namespace=self._namespace,
            ) from exc
        finally:
            self._tell()

    def _tell(self) -> None:
        told, self._to_tell = self._to_tell, []
        if self.on_problem is not None:
            for rel, message in told:
                self.on_problem(rel, message)

    async def __aenter__(self) -> FileStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    async def aclose(self) -> None:
        return None

    # -- reading ----------------------------------------------------------------------
    def _load(self, path: Path, res: ApiResource) -> list[Any]:
        """The YAML documents in ``path``, parsed once per version of the file, the objects
        of kind ``res`` among them finished (``_finish``) with that version's
        resourceVersion. ``FileNotFoundError`` if it is gone; ``yaml.YAMLError`` if it does
        not parse."""
        st = path.stat()
        version = (st.st_ino, st.st_mtime_ns, st.st_size)
        hit = self._parsed.get(path)
        if hit is not None and hit[0] == version:
            return hit[1]
        docs = list(yaml.load_all(path.read_text(), Loader=_Loader))
        rv = f"{st.st_mtime_ns}-{st.st_size}"
        # A declared Service must say its kind; what atlasd stored is of ``res``.
        declared = path.parent == self.clusters_dir
        for doc in docs:
            kind = (
                doc.get("kind", None if declared else res.kind) if isinstance(doc, dict) else None
            )
            if kind == res.kind and isinstance(doc.get("metadata"), dict):
                self._finish(res, doc, rv)
        self._parsed[path] = (version, docs)
        return docs

    def _forget_missing(self, folder: Path, seen: set[Path]) -> None:
        for path in [p for p in self._parsed if p.parent == folder and p not in seen]:
            del self._parsed[path]
        for path in [p for p in self._good if p.parent == folder and p not in seen]:
            del self._good[path]
        for path in [p for p in self._bad if p.parent == folder and p not in seen]:
            del self._bad[path]
            self._to_tell.append((self._rel(path), None))

    def _object_path(self, res: ApiResource, name: str) -> Path:
        return self.objects_dir / res.plural / f"{name}.yaml"

    def _finish(self, res: ApiResource, obj: JSON, rv: str) -> JSON:
        obj.setdefault("apiVersion", res.api_version)
        obj.setdefault("kind", res.kind)
        meta = obj.setdefault("metadata", {})
        meta.setdefault("namespace", self._namespace)
        meta.setdefault("uid", str(uuid.uuid5(_UID_NAMESPACE, f"{res.kind}/{bodies.name(obj)}")))
        meta["resourceVersion"] = rv
        return obj

    def _not_found(self, verb: str, res: ApiResource, name: str) -> NotFound:
        return NotFound(
            status=404,
            reason="NotFound",
            message=f'{res} "{name}" not found',
            verb=verb,
            resource=str(res),
            name=name,
            namespace=self._namespace,
        )

    def declared_clusters(self) -> dict[str, tuple[JSON, Path]]:
        """Cluster Services declared in ``clusters/`` (name -> (object, file)).

        A file that does not parse (or whose documents are not objects) is one problem of
        that file (``problems``, ``on_problem``, logged once per version of it); meanwhile
        what it declared when it last parsed keeps being served, so a typo never removes a
        cluster, and every other file keeps flowing."""
        out: dict[str, tuple[JSON, Path]] = {}
        paths = sorted(self.clusters_dir.glob("*.y*ml"))
        self._forget_missing(self.clusters_dir, set(paths))
        for path in paths:
            try:
                docs = self._declared_docs(path)
            except FileNotFoundError:
                continue  # removed since the directory was listed
            for doc in docs:
                if isinstance(doc, dict) and doc.get("kind") == "Service":
                    name = bodies.name(doc)
                    if name:
                        out[name] = (doc, path)
        return out

    def problems(self) -> dict[str, str]:
        """The declared files that are bad now: file (relative to the store) -> why."""
        return {self._rel(p): msg for p, (_, msg) in sorted(self._bad.items())}

    def _rel(self, path: Path) -> str:
        return str(path.relative_to(self.root))

    def _declared_docs(self, path: Path) -> list[Any]:
        """``path``'s documents, or its last good ones while it is bad."""
        st = path.stat()
        version = (st.st_ino, st.st_mtime_ns, st.st_size)
        bad = self._bad.get(path)
        if bad is not None and bad[0] == version:
            return self._good.get(path, [])
        try:
            docs = self._load(path, SERVICES)
            for i, doc in enumerate(docs):
                if (
                    isinstance(doc, dict)
                    and doc.get("kind") == "Service"
                    and not isinstance(doc.get("metadata"), dict)
                ):
                    raise ValueError(f"document {i + 1}: metadata is not a mapping")
        except (yaml.YAMLError, ValueError) as exc:
            self._parsed.pop(path, None)
            self._report(path, version, _describe(exc))
            return self._good.get(path, [])
        except OSError as exc:
            if isinstance(exc, FileNotFoundError):
                raise
            self._report(path, version, f"cannot read it: {exc.strerror or exc}")
            return self._good.get(path, [])
        self._good[path] = docs
        if self._bad.pop(path, None) is not None:
            log.info("%s: fixed", self._rel(path))
            self._to_tell.append((self._rel(path), None))
        return docs

    def _report(self, path: Path, version: _Version, why: str) -> None:
        message = f"{self._rel(path)}: {why}"
        before = self._bad.get(path)
        self._bad[path] = (version, message)
        if before is not None and before[1] == message:
            return
        kept = "; its earlier clusters are kept" if path in self._good else ""
        log.warning("%s (ignored until fixed%s)", message, kept)
        self._to_tell.append((self._rel(path), message))

    async def get(self, res: ApiResource, name: str, *, namespace: str | None = None) -> JSON:
        return await self._io("get", res, lambda: self._get(res, name))

    def _get(self, res: ApiResource, name: str) -> JSON:
        if res == SERVICES:
            declared = self.declared_clusters().get(name)
            if declared is not None:
                return copy.deepcopy(declared[0])
        obj = self._object(res, self._object_path(res, name))
        if obj is None:
            raise self._not_found("get", res, name)
        return copy.deepcopy(obj)

    def _object(self, res: ApiResource, path: Path) -> JSON | None:
        """The object atlasd stored at ``path`` (parsed once per version; shared)."""
        try:
            docs = self._load(path, res)
        except FileNotFoundError:
            return None
        obj = docs[0] if docs else None
        return obj if isinstance(obj, dict) else None

    async def list(
        self,
        res: ApiResource,
        *,
        namespace: str | None = None,
        label_selector: str | None = None,
        field_selector: str | None = None,
        metadata_only: bool = False,
    ) -> tuple[list[JSON], str]:
        return await self._io("list", res, lambda: self._list(res, label_selector))

    def _list(
        self, res: ApiResource, label_selector: str | None
    ) -> tuple[builtins.list[JSON], str]:
        # Taken first: a change made while listing shows as a change to the next watch.
        fingerprint = self.fingerprint()
        items: dict[str, JSON] = {}
        folder = self.objects_dir / res.plural
        if folder.is_dir():
            paths = sorted(folder.glob("*.yaml"))
            self._forget_missing(folder, set(paths))
            for path in paths:
                obj = self._object(res, path)
                if obj is not None:
                    items[path.stem] = obj
        if res == SERVICES:
            for name, (obj, _) in self.declared_clusters().items():
                items[name] = obj
        out = [o for _, o in sorted(items.items()) if matches(bodies.labels(o), label_selector)]
        rv = str(time.time_ns())
        self._remember_list(res, label_selector, rv, out, fingerprint)
        return out, rv

    def _remember_list(
        self,
        res: ApiResource,
        selector: str | None,
        rv: str,
        items: builtins.list[JSON],
        fingerprint: tuple[tuple[str, int, int], ...],
    ) -> None:
        """Keep what a list returned, so a watch can start from its rv."""
        self._lists[(res.plural, selector or "", rv)] = (
            {bodies.name(o): o for o in items},
            fingerprint,
        )
        while len(self._lists) > 64:
            del self._lists[next(iter(self._lists))]

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
        """Watch events by polling the directory every ``poll_seconds``.

        Starts from a resourceVersion this store answered (a list, or a BOOKMARK of an
        earlier watch); any other is ``Gone``, so an informer relists. Each poll that finds
        a change yields the differences (ADDED/MODIFIED/DELETED) then a BOOKMARK.
        """
        selector = label_selector or ""
        start = self._lists.get((res.plural, selector, resource_version))
        if start is None or send_initial_events:
            raise Gone(
                status=410,
                reason="Expired",
                message=f"resourceVersion {resource_version!r} is not known to this store",
                verb="watch",
                resource=str(res),
            )
        known, fingerprint = start
        deadline = time.monotonic() + timeout_seconds
        while time.monotonic() < deadline:
            await trio.sleep(self.poll_seconds)
            current = await self._io("watch", res, self.fingerprint)
            if current == fingerprint:
                continue
            items, rv = await self.list(res, label_selector=label_selector)
            fingerprint = self._lists[(res.plural, selector, rv)][1]
            fresh = {bodies.name(o): o for o in items}
            for name, obj in known.items():
                if name not in fresh:
                    yield {"type": "DELETED", "object": obj}
            for name, obj in fresh.items():
                before = known.get(name)
                if before is None:
                    yield {"type": "ADDED", "object": obj}
                elif bodies.resource_version(before) != bodies.resource_version(obj):
                    yield {"type": "MODIFIED", "object": obj}
            known = fresh
            if allow_bookmarks:
                yield {"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": rv}}}

    # -- writing ----------------------------------------------------------------------
    def _write(self, res: ApiResource, obj: Mapping[str, Any]) -> JSON:
        body = json.loads(json.dumps(obj))
        meta = body.setdefault("metadata", {})
        name = bodies.name(body)
        if not name:
            raise ValueError(f"{res}: the object has no metadata.name")
        if "/" in name or name.startswith("."):
            # A file name under the store: never a path out of it, never a hidden file.
            raise ValueError(f"{res}: metadata.name {name!r} is not a valid object name")
        meta.pop("resourceVersion", None)
        meta.pop("managedFields", None)
        meta["namespace"] = self._namespace
        if res == SECRETS and "stringData" in body:
            data = body.setdefault("data", {})
            data.update(encode_secret_data({k: str(v) for k, v in body.pop("stringData").items()}))
        if res == SERVICES and bodies.label(body, CLUSTER_LABEL) == "true":
            path = self.clusters_dir / f"{name}.yaml"
            mode = 0o644
        else:
            path = self._object_path(res, name)
            mode = 0o600 if res == SECRETS else 0o644
        write_atomic(
            path, yaml.dump(body, Dumper=_Dumper, sort_keys=True), mode=mode, make_parents=True
        )
        values = secret_data(body).get("values.yaml") if res == SECRETS else None
        if values is not None and name.endswith(VALUES_SECRET_SUFFIX):
            cluster = name.removesuffix(VALUES_SECRET_SUFFIX)
            write_atomic(self.values_dir / f"{cluster}.yaml", values.decode(), mode=0o600)
        return self._finish(res, body, _rv(path))

    async def apply(
        self, obj: Mapping[str, Any], *, force: bool = True, metadata_only: bool = False
    ) -> JSON:
        res = resource_for(str(obj.get("apiVersion")), str(obj.get("kind")))
        return await self._io("apply", res, lambda: self._write(res, obj))

    async def replace(self, obj: Mapping[str, Any]) -> JSON:
        return await self.apply(obj)

    async def create(self, obj: Mapping[str, Any]) -> JSON:
        res = resource_for(str(obj.get("apiVersion")), str(obj.get("kind")))
        return await self._io("create", res, lambda: self._create(res, obj))

    def _create(self, res: ApiResource, obj: Mapping[str, Any]) -> JSON:
        name = bodies.name(obj)
        if res.kind == "Event":
            self._append_event(obj)
            return dict(obj)
        try:
            self._get(res, name)
        except NotFound:
            return self._write(res, obj)
        raise AlreadyExists(
            status=409,
            reason="AlreadyExists",
            message=f'{res} "{name}" already exists',
            verb="create",
            resource=str(res),
            name=name,
            namespace=self._namespace,
        )

    def _append_event(self, obj: Mapping[str, Any]) -> None:
        with open(self.root / "events.log", "a") as f:
            f.write(json.dumps(obj, sort_keys=True) + "\n")

    async def patch_merge(
        self, res: ApiResource, name: str, patch: Mapping[str, Any], *, namespace: str | None = None
    ) -> JSON:
        if res.kind == "Event":
            return await self.create({**patch, "apiVersion": "v1", "kind": "Event"})
        return await self._io(
            "patch", res, lambda: self._write(res, _merge(self._get(res, name), patch))
        )

    async def delete(
        self,
        res: ApiResource,
        name: str,
        *,
        namespace: str | None = None,
        resource_version: str | None = None,
    ) -> None:
        await self._io("delete", res, lambda: self._delete(res, name))

    def _delete(self, res: ApiResource, name: str) -> None:
        if res == SERVICES:
            declared = self.declared_clusters().get(name)
            if declared is not None:
                declared[1].unlink()
                return
        path = self._object_path(res, name)
        try:
            path.unlink()
        except FileNotFoundError:
            raise self._not_found("delete", res, name) from None
        if res == SECRETS and name.endswith(VALUES_SECRET_SUFFIX):
            cluster = name.removesuffix(VALUES_SECRET_SUFFIX)
            (self.values_dir / f"{cluster}.yaml").unlink(missing_ok=True)

    def fingerprint(self) -> tuple[tuple[str, int, int], ...]:
        """Changes to any input or state file change this (the standalone watch polls it)."""
        out = []
        for folder in (self.clusters_dir, self.objects_dir):
            for path in sorted(folder.rglob("*.y*ml")):
                try:
                    st = path.stat()
                except FileNotFoundError:
                    continue
                out.append((str(path.relative_to(self.root)), st.st_mtime_ns, st.st_size))
        return tuple(out)


def _merge(base: JSON, patch: Mapping[str, Any]) -> JSON:
    """RFC 7386 JSON merge patch."""
    out = dict(base)
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        elif isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _describe(exc: Exception) -> str:
    """One line saying what is wrong with a file, never quoting its content."""
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        what = exc.problem or exc.context or "not valid"
        return f"not valid YAML at line {mark.line + 1}, column {mark.column + 1}: {what}"
    if isinstance(exc, yaml.YAMLError):
        return "not valid YAML"
    return str(exc)
