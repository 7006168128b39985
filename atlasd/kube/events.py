"""Kubernetes Events (core/v1) about the objects atlasd reads and writes.

Owns: turning "this Service is malformed" into an Event on that Service that
``kubectl describe`` shows. Posting is best effort: a failure is logged and swallowed
(an Event must never stop a reconcile). Repeats of the same (object, reason, message)
from this process update the earlier Event's ``count`` and ``lastTimestamp`` instead of
creating a new one, as client-go's recorder does.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
import weakref
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from atlasd.kube.errors import KubeError, NotFound
from atlasd.kube.resources import EVENTS
from atlasd.model import ObjectRef

if TYPE_CHECKING:
    from atlasd.kube.api import KubeApi

log = logging.getLogger(__name__)

COMPONENT = "atlasd"
MAX_MESSAGE = 1024
_CACHE_SIZE = 512


def event_name(obj_name: str, *, now_ns: int | None = None) -> str:
    """``<object>.<hex unixnano>``, as client-go names Events."""
    ns = time.time_ns() if now_ns is None else now_ns
    return f"{obj_name}.{ns:x}"


def _timestamp(now: dt.datetime) -> str:
    return now.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def truncate_message(message: str) -> str:
    if len(message) <= MAX_MESSAGE:
        return message
    return message[: MAX_MESSAGE - 3] + "..."


def build_event(
    *,
    ref: ObjectRef,
    reason: str,
    message: str,
    type: str,
    name: str,
    now: dt.datetime,
    component: str = COMPONENT,
    count: int = 1,
    first: dt.datetime | None = None,
) -> dict[str, Any]:
    """The core/v1 Event body (pure)."""
    if type not in ("Normal", "Warning"):
        raise ValueError(f"event type must be Normal or Warning, not {type!r}")
    involved: dict[str, Any] = {
        "apiVersion": ref.api_version,
        "kind": ref.kind,
        "name": ref.name,
        "namespace": ref.namespace,
    }
    if ref.uid:
        involved["uid"] = ref.uid
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": name, "namespace": ref.namespace},
        "involvedObject": involved,
        "reason": reason,
        "message": truncate_message(message),
        "type": type,
        "source": {"component": component},
        "reportingComponent": component,
        "firstTimestamp": _timestamp(first or now),
        "lastTimestamp": _timestamp(now),
        "count": count,
    }


class EventRecorder:
    """Posts Events for one client, aggregating repeats into ``count``.

    ``_recent`` maps (ref, reason, message, type) to (event name, first time, count)
    for the last ``_CACHE_SIZE`` distinct events this process posted.
    """

    def __init__(self, kube: KubeApi, *, component: str = COMPONENT) -> None:
        self.kube = kube
        self.component = component
        self._recent: OrderedDict[tuple[ObjectRef, str, str, str], tuple[str, dt.datetime, int]]
        self._recent = OrderedDict()

    async def post(self, *, ref: ObjectRef, reason: str, message: str, type: str) -> None:
        key = (ref, reason, truncate_message(message), type)
        now = dt.datetime.now(dt.UTC)
        try:
            seen = self._recent.get(key)
            if seen is not None:
                # A repeat: the Event posted before counts it (its other fields are as then).
                name, first, count = seen
                try:
                    await self.kube.patch_merge(
                        EVENTS,
                        name,
                        {"count": count + 1, "lastTimestamp": _timestamp(now)},
                        namespace=ref.namespace,
                    )
                    self._remember(key, (name, first, count + 1))
                    return
                except NotFound:
                    pass
            name = event_name(ref.name)
            body = build_event(
                ref=ref,
                reason=reason,
                message=message,
                type=type,
                name=name,
                now=now,
                component=self.component,
            )
            await self.kube.create(body)
            self._remember(key, (name, now, 1))
        except (KubeError, ValueError) as exc:
            log.warning(
                "could not post %s event %s on %s %s/%s: %s",
                type,
                reason,
                ref.kind,
                ref.namespace,
                ref.name,
                exc,
            )

    def _remember(
        self, key: tuple[ObjectRef, str, str, str], value: tuple[str, dt.datetime, int]
    ) -> None:
        self._recent[key] = value
        self._recent.move_to_end(key)
        while len(self._recent) > _CACHE_SIZE:
            self._recent.popitem(last=False)


_recorders: weakref.WeakKeyDictionary[KubeApi, EventRecorder] = weakref.WeakKeyDictionary()


async def post_event(
    kube: KubeApi, *, ref: ObjectRef, reason: str, message: str, type: str = "Warning"
) -> None:
    """Post an Event about ``ref``; never raises (failures are logged)."""
    recorder = _recorders.get(kube)
    if recorder is None:
        recorder = _recorders[kube] = EventRecorder(kube)
    await recorder.post(ref=ref, reason=reason, message=message, type=type)
