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

``resourceVersion`` is derived from a file's modification time and size; ``uid`` from
the object's kind and name (stable across restarts), so ownerReferences hold.

A change costs the files it touched: each file is parsed once per version of it (inode,
modification time, size; atlasd's writes replace the file, so each is a new inode), lists
and watches hand out those parsed objects (shared, as an informer's cache shares the API
server's; never mutate them) and a watch parses only the files that changed. Only the
directory listing and a ``stat`` per file are repeated on every poll.
"""

from __future__ import annotations

import base64
import builtins
import copy
import json
import os
import tempfile
import time
import uuid
from collections.abc import AsyncGenerator, Mapping
from pathlib import Path
from typing import Any

import trio
import yaml

from atlasd.kube.errors import AlreadyExists, Gone, Invalid, NotFound
from atlasd.kube.resources import SECRETS, SERVICES, ApiResource, resource_for
from atlasd.kube.selectors import matches
from atlasd.labels import CLUSTER_LABEL
from atlasd.model import DEFAULT_NAMESPACE

JSON = dict[str, Any]

try:  # libyaml's parser and emitter are ~10x faster than PyYAML's own
    from yaml import CSafeDumper as _Dumper
    from yaml import CSafeLoader as _Loader
except ImportError:  # pragma: no cover - PyYAML built without libyaml
    from yaml import SafeDumper as _Dumper  # type: ignore[assignment]
    from yaml import SafeLoader as _Loader  # type: ignore[assignment]

# A file's version: (inode, mtime_ns, size).
_Version = tuple[int, int, int]
_UID_NAMESPACE = uuid.UUID("5b0b8a4e-8f0e-4f7e-9a55-2f1d7f0a7c11")


def _atomic_write(path: Path, text: str, *, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _rv(path: Path) -> str:
    st = path.stat()
    return f"{st.st_mtime_ns}-{st.st_size}"


class FileStore:
    """A directory that answers the Kubernetes verbs atlasd uses."""

    def __init__(
        self, root: Path, *, namespace: str = DEFAULT_NAMESPACE, poll_seconds: float = 0.5
    ) -> None:
        self.root = root
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

    def _object_path(self, res: ApiResource, name: str) -> Path:
        return self.objects_dir / res.plural / f"{name}.yaml"

    def _finish(self, res: ApiResource, obj: JSON, rv: str) -> JSON:
        obj.setdefault("apiVersion", res.api_version)
        obj.setdefault("kind", res.kind)
        meta = obj.setdefault("metadata", {})
        meta.setdefault("namespace", self._namespace)
        meta.setdefault("uid", str(uuid.uuid5(_UID_NAMESPACE, f"{res.kind}/{meta.get('name')}")))
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
        """Cluster Services declared in ``clusters/`` (name -> (object, file))."""
        out: dict[str, tuple[JSON, Path]] = {}
        paths = sorted(self.clusters_dir.glob("*.y*ml"))
        self._forget_missing(self.clusters_dir, set(paths))
        for path in paths:
            try:
                docs = self._load(path, SERVICES)
            except FileNotFoundError:
                continue  # removed since the directory was listed
            except (OSError, yaml.YAMLError) as exc:
                raise Invalid(
                    status=422,
                    reason="Invalid",
                    message=f"{path.name}: not valid YAML: {exc}",
                    verb="list",
                    resource="services",
                ) from exc
            for doc in docs:
                if not isinstance(doc, dict) or doc.get("kind") != "Service":
                    continue
                meta = doc.get("metadata")
                if not isinstance(meta, dict):
                    raise Invalid(
                        status=422,
                        reason="Invalid",
                        message=f"{path.name}: metadata is not a mapping",
                        verb="list",
                        resource="services",
                    )
                name = str(meta.get("name") or "")
                if name:
                    out[name] = (doc, path)
        return out

    async def get(self, res: ApiResource, name: str, *, namespace: str | None = None) -> JSON:
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
        out = [
            o
            for _, o in sorted(items.items())
            if matches((o.get("metadata") or {}).get("labels") or {}, label_selector)
        ]
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
            {str(o["metadata"]["name"]): o for o in items},
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
            current = self.fingerprint()
            if current == fingerprint:
                continue
            items, rv = await self.list(res, label_selector=label_selector)
            fingerprint = self._lists[(res.plural, selector, rv)][1]
            fresh = {str(o["metadata"]["name"]): o for o in items}
            for name, obj in known.items():
                if name not in fresh:
                    yield {"type": "DELETED", "object": obj}
            for name, obj in fresh.items():
                before = known.get(name)
                if before is None:
                    yield {"type": "ADDED", "object": obj}
                elif before["metadata"].get("resourceVersion") != obj["metadata"].get(
                    "resourceVersion"
                ):
                    yield {"type": "MODIFIED", "object": obj}
            known = fresh
            if allow_bookmarks:
                yield {"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": rv}}}

    # -- writing ----------------------------------------------------------------------
    def _write(self, res: ApiResource, obj: Mapping[str, Any]) -> JSON:
        body = json.loads(json.dumps(obj))
        meta = body.setdefault("metadata", {})
        name = str(meta.get("name") or "")
        if not name:
            raise ValueError(f"{res}: the object has no metadata.name")
        meta.pop("resourceVersion", None)
        meta.pop("managedFields", None)
        meta["namespace"] = self._namespace
        if res == SECRETS and "stringData" in body:
            data = body.setdefault("data", {})
            for k, v in body.pop("stringData").items():
                data[k] = base64.b64encode(str(v).encode()).decode()
        labels = meta.get("labels") or {}
        if res == SERVICES and labels.get(CLUSTER_LABEL) == "true":
            path = self.clusters_dir / f"{name}.yaml"
            mode = 0o644
        else:
            path = self._object_path(res, name)
            mode = 0o600 if res == SECRETS else 0o644
        _atomic_write(path, yaml.dump(body, Dumper=_Dumper, sort_keys=True), mode=mode)
        if (
            res == SECRETS
            and name.endswith("-envoy-values")
            and "values.yaml" in body.get("data", {})
        ):
            values = base64.b64decode(body["data"]["values.yaml"]).decode()
            cluster = name.removesuffix("-envoy-values")
            _atomic_write(self.values_dir / f"{cluster}.yaml", values, mode=0o600)
        return self._finish(res, body, _rv(path))

    async def apply(self, obj: Mapping[str, Any], *, force: bool = True) -> JSON:
        res = resource_for(str(obj.get("apiVersion")), str(obj.get("kind")))
        return self._write(res, obj)

    async def replace(self, obj: Mapping[str, Any]) -> JSON:
        return await self.apply(obj)

    async def create(self, obj: Mapping[str, Any]) -> JSON:
        res = resource_for(str(obj.get("apiVersion")), str(obj.get("kind")))
        name = str((obj.get("metadata") or {}).get("name") or "")
        if res.kind == "Event":
            self._append_event(obj)
            return dict(obj)
        try:
            await self.get(res, name)
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
        # Local files are small; blocking I/O here is bounded and brief (as for reads).
        with open(self.root / "events.log", "a") as f:
            f.write(json.dumps(obj, sort_keys=True) + "\n")

    async def patch_merge(
        self, res: ApiResource, name: str, patch: Mapping[str, Any], *, namespace: str | None = None
    ) -> JSON:
        if res.kind == "Event":
            return await self.create({**patch, "apiVersion": "v1", "kind": "Event"})
        current = await self.get(res, name)
        return self._write(res, _merge(current, patch))

    async def delete(
        self,
        res: ApiResource,
        name: str,
        *,
        namespace: str | None = None,
        resource_version: str | None = None,
    ) -> None:
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
        if res == SECRETS and name.endswith("-envoy-values"):
            (self.values_dir / f"{name.removesuffix('-envoy-values')}.yaml").unlink(missing_ok=True)

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
