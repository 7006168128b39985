"""Kubernetes Events (core/v1) about the objects atlasd reads and writes.

Owns: turning "this Service is malformed" into an Event on that Service that
``kubectl describe`` shows. Posting is best effort: a failure is logged and swallowed
(an Event must never stop a reconcile). Repeats of the same (object, reason, message)
update the earlier Event's ``count`` and ``lastTimestamp`` instead of creating a new one,
as client-go's EventCorrelator does -- and, unlike client-go's, across restarts: the first
Event a process posts in a namespace reads the Events atlasd posted there before (one LIST,
``source=atlasd``; the API server keeps Events for an hour by default), so a restart that
finds the same 24 invalid Services counts 24 repeats instead of posting 24 new Events. A
Role without ``list`` on events only loses that (logged once).
"""

from __future__ import annotations

import datetime as dt
import logging
import time
import weakref
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import trio

from atlasd.kube import bodies
from atlasd.kube.errors import KubeError, NotFound
from atlasd.kube.resources import EVENTS
from atlasd.model import ObjectRef
from atlasd.times import parse_rfc3339, rfc3339

if TYPE_CHECKING:
    from atlasd.kube.api import KubeApi

log = logging.getLogger(__name__)

COMPONENT = "atlasd"
MAX_MESSAGE = 1024
# Distinct (object, reason, message, type) remembered: more than a large fleet's invalid
# Services (each entry is a few hundred bytes).
_CACHE_SIZE = 20_000


def event_name(obj_name: str, *, now_ns: int | None = None) -> str:
    """``<object>.<hex unixnano>``, as client-go names Events."""
    ns = time.time_ns() if now_ns is None else now_ns
    return f"{obj_name}.{ns:x}"


def _parse_timestamp(value: object) -> dt.datetime | None:
    try:
        return parse_rfc3339(value)
    except ValueError:
        return None


_Key = tuple[ObjectRef, str, str, str]
_Seen = tuple[str, dt.datetime, int]


def posted_before(event: dict[str, Any]) -> tuple[_Key, _Seen, dt.datetime] | None:
    """An Event as listed -> (its correlation key, (name, first time, count), last time);
    None for one that is not an Event this module could have posted (pure)."""
    inv = event.get("involvedObject")
    if not isinstance(inv, dict):
        return None
    name, count = bodies.name(event), event.get("count")
    first = _parse_timestamp(event.get("firstTimestamp"))
    last = _parse_timestamp(event.get("lastTimestamp"))
    fields = (inv.get("kind"), inv.get("name"), inv.get("namespace"), event.get("reason"))
    message, type_ = event.get("message"), event.get("type")
    if not all(isinstance(f, str) and f for f in (name, *fields, message, type_)):
        return None
    if not isinstance(count, int) or first is None or last is None:
        return None
    ref = ObjectRef(
        kind=str(inv["kind"]),
        name=str(inv["name"]),
        namespace=str(inv["namespace"]),
        uid=str(inv.get("uid") or ""),
        api_version=str(inv.get("apiVersion") or "v1"),
    )
    key = (ref, str(event["reason"]), str(message), str(type_))
    return key, (str(name), first, count), last


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
        "firstTimestamp": rfc3339(first or now),
        "lastTimestamp": rfc3339(now),
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
        self._recent: OrderedDict[_Key, _Seen] = OrderedDict()
        # Namespaces whose earlier Events have been read (set once the read is done, so
        # that concurrent first posts wait for it instead of each listing).
        self._primed: dict[str, trio.Event] = {}

    async def _prime(self, namespace: str) -> None:
        """Remember the Events this component posted in ``namespace`` before this process
        (the newest of each key), once per namespace."""
        done = self._primed.get(namespace)
        if done is not None:
            await done.wait()
            return
        done = self._primed[namespace] = trio.Event()
        try:
            items, _ = await self.kube.list(
                EVENTS, namespace=namespace, field_selector=f"source={self.component}"
            )
        except KubeError as exc:
            log.info(
                "cannot read earlier Events in namespace %s (%s): repeats of Events posted "
                "before this start are posted anew",
                namespace,
                exc,
            )
            items = []
        finally:
            done.set()
        newest: dict[_Key, tuple[_Seen, dt.datetime]] = {}
        for item in items:
            found = posted_before(item)
            if found is None:
                continue
            key, seen, last = found
            if key not in newest or newest[key][1] < last:
                newest[key] = (seen, last)
        for key, (seen, _) in sorted(newest.items(), key=lambda kv: kv[1][1]):
            if key not in self._recent:
                self._remember(key, seen)

    async def post(self, *, ref: ObjectRef, reason: str, message: str, type: str) -> bool:
        """Post (or count again) the Event; whether the API server took it."""
        key = (ref, reason, truncate_message(message), type)
        now = dt.datetime.now(dt.UTC)
        try:
            await self._prime(ref.namespace)
            seen = self._recent.get(key)
            if seen is not None:
                # A repeat: the Event posted before counts it (its other fields are as then).
                name, first, count = seen
                try:
                    await self.kube.patch_merge(
                        EVENTS,
                        name,
                        {"count": count + 1, "lastTimestamp": rfc3339(now)},
                        namespace=ref.namespace,
                    )
                    self._remember(key, (name, first, count + 1))
                    return True
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
            return True
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
            return False

    def _remember(self, key: _Key, value: _Seen) -> None:
        self._recent[key] = value
        self._recent.move_to_end(key)
        while len(self._recent) > _CACHE_SIZE:
            self._recent.popitem(last=False)


_recorders: weakref.WeakKeyDictionary[KubeApi, EventRecorder] = weakref.WeakKeyDictionary()


async def post_event(
    kube: KubeApi, *, ref: ObjectRef, reason: str, message: str, type: str = "Warning"
) -> bool:
    """Post an Event about ``ref``; never raises (failures are logged): whether it was
    posted, so a caller can try again later."""
    recorder = _recorders.get(kube)
    if recorder is None:
        recorder = _recorders[kube] = EventRecorder(kube)
    return await recorder.post(ref=ref, reason=reason, message=message, type=type)
