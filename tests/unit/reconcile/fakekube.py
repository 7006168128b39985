"""An in-memory stand-in for ``KubeClient`` (the ``KubeApi`` subset) with fault injection,
for the applier's shell logic; the real API server is exercised in tests/integration."""

from __future__ import annotations

import copy
import itertools
from collections.abc import Mapping
from typing import Any

from atlasd.kube.errors import AlreadyExists, ApiError, Conflict, NotFound
from atlasd.kube.resources import ApiResource, resource_for
from atlasd.kube.selectors import object_matches
from atlasd.model import ObjectRef


class FakeKube:
    def __init__(self) -> None:
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}
        self.writes: list[tuple[str, str]] = []
        self.fail: dict[tuple[str, str], ApiError] = {}
        self.events: list[tuple[ObjectRef, str, str]] = []
        self._rv = itertools.count(1)

    # -- helpers --
    @staticmethod
    def _key(obj: Mapping[str, Any]) -> tuple[str, str]:
        res = resource_for(str(obj["apiVersion"]), str(obj["kind"]))
        return res.plural, str(obj["metadata"]["name"])

    def _err(self, cls: type[ApiError], verb: str, key: tuple[str, str], status: int) -> ApiError:
        return cls(
            status=status, reason=cls.__name__, message="", verb=verb, resource=key[0], name=key[1]
        )

    def _store(self, key: tuple[str, str], obj: Mapping[str, Any]) -> dict[str, Any]:
        stored = copy.deepcopy(dict(obj))
        meta = stored.setdefault("metadata", {})
        meta["resourceVersion"] = str(next(self._rv))
        meta.setdefault("uid", f"uid-{key[1]}")
        self.objects[key] = stored
        return copy.deepcopy(stored)

    def _check_fail(self, verb: str, key: tuple[str, str]) -> None:
        err = self.fail.get((verb, key[1]))
        if err is not None:
            raise err

    # -- KubeApi --
    async def get(
        self, res: ApiResource, name: str, *, namespace: str | None = None
    ) -> dict[str, Any]:
        obj = self.objects.get((res.plural, name))
        if obj is None:
            raise self._err(NotFound, "get", (res.plural, name), 404)
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
        out = []
        for (plural, _), obj in sorted(self.objects.items()):
            if plural == res.plural and object_matches(obj, label_selector):
                out.append(copy.deepcopy(obj))
        return out, "1"

    async def apply(self, obj: Mapping[str, Any], *, force: bool = True) -> dict[str, Any]:
        key = self._key(obj)
        self._check_fail("apply", key)
        self.writes.append(("apply", key[1]))
        return self._store(key, obj)

    async def create(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        key = self._key(obj)
        self._check_fail("create", key)
        if key in self.objects:
            raise self._err(AlreadyExists, "create", key, 409)
        self.writes.append(("create", key[1]))
        return self._store(key, obj)

    async def replace(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        key = self._key(obj)
        self._check_fail("replace", key)
        current = self.objects.get(key)
        if current is None:
            raise self._err(NotFound, "update", key, 404)
        if obj["metadata"].get("resourceVersion") != current["metadata"]["resourceVersion"]:
            raise self._err(Conflict, "update", key, 409)
        self.writes.append(("replace", key[1]))
        return self._store(key, obj)

    async def delete(self, res: ApiResource, name: str, *, namespace: str | None = None) -> None:
        key = (res.plural, name)
        self._check_fail("delete", key)
        if key not in self.objects:
            raise self._err(NotFound, "delete", key, 404)
        self.writes.append(("delete", name))
        del self.objects[key]

    async def post_event(
        self, kube: Any, *, ref: ObjectRef, reason: str, message: str, type: str = "Warning"
    ) -> None:
        self.events.append((ref, reason, message))
