"""The one in-memory Kubernetes API of the unit tests (``atlasd.kube.api.KubeApi``).

The real API server is exercised in tests/integration; this stand-in lets the shells
(the applier, the zone mirror, leader election, the legacy-lock gate, informers) be driven
under ``MockClock``:

- objects by (plural, name) in one namespace, a resourceVersion from one counter,
  ``create`` refusing an existing object (AlreadyExists) and ``replace`` a stale
  resourceVersion (Conflict), as the API server does; every call is a checkpoint;
- faults: ``down`` (every call raises TransportError), ``forbidden`` (kinds whose GET
  answers 403), ``fail[(verb, name)]`` (raised by every such call), ``fail_next``
  (raised by the next writes, in order);
- records: ``writes`` ((verb, name) of each write), ``applied`` (each applied object),
  ``log`` ((trio time, verb, stored object) of each write), ``gets`` ("Kind/name"),
  ``calls`` ((verb, plural, namespace, name) of every call), ``events`` (``post_event``);
- scripted reads for informers: ``lists`` (answers to LIST in order: (items, rv) or an
  exception) and ``watches`` (one script per WATCH: events, exceptions, ``HANG``; an
  exhausted script ends the stream, no script left hangs). Without ``lists``, LIST
  answers from the objects;
- ``live=True``: with no script left, a WATCH streams every change of the objects after
  its resourceVersion, as the API server does (a change that moves an object out of the
  label selector is a DELETED), and LIST answers at the current resourceVersion: the
  informers of the daemon's reconcile path see their own writes (``tests.harness.reconcile``).
"""

from __future__ import annotations

import copy
from collections.abc import AsyncGenerator, Mapping
from typing import Any

import trio

from atlasd.kube.errors import (
    AlreadyExists,
    ApiError,
    Conflict,
    Forbidden,
    NotFound,
    TransportError,
)
from atlasd.kube.resources import ApiResource, resource_for
from atlasd.kube.selectors import object_matches
from atlasd.model import ObjectRef

HANG = object()

Key = tuple[str, str]


def api_error(cls: type[ApiError], verb: str, key: Key) -> ApiError:
    """An ApiError as the client raises it for ``key`` ((plural, name))."""
    status = {
        NotFound: 404,
        Conflict: 409,
        AlreadyExists: 409,
        Forbidden: 403,
    }.get(cls, 500)
    return cls(
        status=status, reason=cls.__name__, message="", verb=verb, resource=key[0], name=key[1]
    )


class FakeKube:
    def __init__(
        self,
        *,
        lists: list[Any] | None = None,
        watches: list[list[Any]] | None = None,
        live: bool = False,
    ) -> None:
        self.objects: dict[Key, dict[str, Any]] = {}
        self.down = False
        self.forbidden: set[str] = set()
        self.fail: dict[tuple[str, str], ApiError] = {}
        self.fail_next: list[Exception] = []
        self.writes: list[tuple[str, str]] = []
        self.applied: list[dict[str, Any]] = []
        self.log: list[tuple[float, str, dict[str, Any]]] = []
        self.gets: list[str] = []
        self.calls: list[tuple[str, str, str | None, str | None]] = []
        self.events: list[tuple[ObjectRef, str, str]] = []
        self.events_down = False
        self.events_failed = 0
        self.lists = lists
        self.watches = watches if watches is not None else []
        self.list_calls = 0
        self.watch_calls: list[tuple[str, int, float]] = []
        self.live = live
        self._rv = 0
        # Every change, in resourceVersion order: (rv, plural, before, after); None: absent.
        self._history: list[tuple[int, str, dict[str, Any] | None, dict[str, Any] | None]] = []
        self._changed = trio.lowlevel.ParkingLot()

    # -- for tests --

    @staticmethod
    def key_of(obj: Mapping[str, Any]) -> Key:
        res = resource_for(str(obj["apiVersion"]), str(obj["kind"]))
        return res.plural, str(obj["metadata"]["name"])

    def put(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        """Store ``obj`` as someone else wrote it (no write is recorded)."""
        return self._store(self.key_of(obj), obj)

    def get_stored(self, plural: str, name: str) -> dict[str, Any] | None:
        return self.objects.get((plural, name))

    def only(self, plural: str) -> dict[str, Any] | None:
        """The one stored object of ``plural`` (None when there is none)."""
        found = [o for (p, _), o in self.objects.items() if p == plural]
        assert len(found) <= 1, f"{len(found)} {plural}"
        return found[0] if found else None

    # -- internals --

    def _next_rv(self) -> int:
        self._rv += 1
        return self._rv

    def _record(
        self, rv: int, plural: str, before: dict[str, Any] | None, after: dict[str, Any] | None
    ) -> None:
        if self.live:
            self._history.append((rv, plural, copy.deepcopy(before), copy.deepcopy(after)))
            self._changed.unpark_all()

    def _store(self, key: Key, obj: Mapping[str, Any]) -> dict[str, Any]:
        stored = copy.deepcopy(dict(obj))
        meta = stored.setdefault("metadata", {})
        rv = self._next_rv()
        meta["resourceVersion"] = str(rv)
        meta.setdefault("uid", f"uid-{key[1]}")
        before = self.objects.get(key)
        self.objects[key] = stored
        self._record(rv, key[0], before, stored)
        return copy.deepcopy(stored)

    def _wrote(self, verb: str, key: Key, stored: dict[str, Any]) -> dict[str, Any]:
        self.writes.append((verb, key[1]))
        self.log.append((trio.current_time(), verb, copy.deepcopy(stored)))
        return stored

    async def _call(self, verb: str, plural: str, namespace: str | None, name: str | None) -> None:
        await trio.lowlevel.checkpoint()
        self.calls.append((verb, plural, namespace, name))
        if self.down:
            raise TransportError("connection refused")
        if name is not None:
            err = self.fail.get((verb, name))
            if err is not None:
                raise err
        if verb != "get" and verb != "list" and self.fail_next:
            raise self.fail_next.pop(0)

    # -- KubeApi --

    async def get(
        self, res: ApiResource, name: str, *, namespace: str | None = None
    ) -> dict[str, Any]:
        self.gets.append(f"{res.kind}/{name}")
        await self._call("get", res.plural, namespace, name)
        if res.kind in self.forbidden:
            raise api_error(Forbidden, "get", (res.plural, name))
        obj = self.objects.get((res.plural, name))
        if obj is None:
            raise api_error(NotFound, "get", (res.plural, name))
        return copy.deepcopy(obj)

    async def list(
        self,
        res: ApiResource,
        *,
        namespace: str | None = None,
        label_selector: str | None = None,
        field_selector: str | None = None,
        metadata_only: bool = False,
    ) -> tuple[list[dict[str, Any]], str]:
        self.list_calls += 1
        await self._call("list", res.plural, namespace, None)
        if self.lists is not None:
            answer = self.lists.pop(0)
            if isinstance(answer, BaseException):
                raise answer
            return answer  # type: ignore[no-any-return]
        out = [
            copy.deepcopy(obj)
            for (plural, _), obj in sorted(self.objects.items())
            if plural == res.plural and object_matches(obj, label_selector)
        ]
        return out, str(self._rv) if self.live else "1"

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
    ) -> AsyncGenerator[dict[str, Any], None]:
        self.watch_calls.append((resource_version, timeout_seconds, trio.current_time()))
        if self.live and not self.watches:
            async for event in self._live_watch(res, int(resource_version or 0), label_selector):
                yield event
            return
        script = self.watches.pop(0) if self.watches else [HANG]
        for item in script:
            await trio.lowlevel.checkpoint()
            if item is HANG:
                await trio.sleep_forever()
            if isinstance(item, BaseException):
                raise item
            yield item

    async def _live_watch(
        self, res: ApiResource, after: int, label_selector: str | None
    ) -> AsyncGenerator[dict[str, Any], None]:
        i = next((n for n, h in enumerate(self._history) if h[0] > after), len(self._history))
        while True:
            await trio.lowlevel.checkpoint()
            while i < len(self._history):
                _, plural, before, now = self._history[i]
                i += 1
                if plural != res.plural:
                    continue
                was = before is not None and object_matches(before, label_selector)
                is_ = now is not None and object_matches(now, label_selector)
                if is_:
                    yield {"type": "MODIFIED" if was else "ADDED", "object": copy.deepcopy(now)}
                elif was:
                    gone = now if now is not None else before
                    yield {"type": "DELETED", "object": copy.deepcopy(gone)}
            await self._changed.park()

    async def apply(
        self, obj: Mapping[str, Any], *, force: bool = True, metadata_only: bool = False
    ) -> dict[str, Any]:
        key = self.key_of(obj)
        await self._call("apply", key[0], obj["metadata"].get("namespace"), key[1])
        self.applied.append(copy.deepcopy(dict(obj)))
        return self._wrote("apply", key, self._store(key, obj))

    async def create(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        key = self.key_of(obj)
        await self._call("create", key[0], obj["metadata"].get("namespace"), key[1])
        if key in self.objects:
            raise api_error(AlreadyExists, "create", key)
        return self._wrote("create", key, self._store(key, obj))

    async def replace(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        key = self.key_of(obj)
        await self._call("replace", key[0], obj["metadata"].get("namespace"), key[1])
        current = self.objects.get(key)
        if current is None:
            raise api_error(NotFound, "update", key)
        if obj["metadata"].get("resourceVersion") != current["metadata"]["resourceVersion"]:
            raise api_error(Conflict, "update", key)
        return self._wrote("replace", key, self._store(key, obj))

    async def patch_merge(
        self,
        res: ApiResource,
        name: str,
        patch: Mapping[str, Any],
        *,
        namespace: str | None = None,
    ) -> dict[str, Any]:
        raise NotImplementedError("no unit test patches")

    async def delete(
        self,
        res: ApiResource,
        name: str,
        *,
        namespace: str | None = None,
        resource_version: str | None = None,
    ) -> None:
        key = (res.plural, name)
        await self._call("delete", res.plural, namespace, name)
        if key not in self.objects:
            raise api_error(NotFound, "delete", key)
        self.writes.append(("delete", name))
        gone = self.objects.pop(key)
        rv = self._next_rv()
        gone["metadata"]["resourceVersion"] = str(rv)
        self._record(rv, res.plural, gone, None)

    async def post_event(
        self, kube: Any, *, ref: ObjectRef, reason: str, message: str, type: str = "Warning"
    ) -> bool:
        """An ``EventPoster`` that records instead of posting (fails, as the real one does
        when the API server is unreachable, while ``events_down``)."""
        if self.events_down:
            self.events_failed += 1
            return False
        self.events.append((ref, reason, message))
        return True


async def live_with(*objects: dict[str, object]) -> FakeKube:
    """A live ``FakeKube`` already holding ``objects``, its write log empty (what a test
    then makes atlasd write is all it logs)."""
    kube = FakeKube(live=True)
    for obj in objects:
        await kube.create(obj)
    kube.writes.clear()
    return kube
