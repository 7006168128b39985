"""Informers: a local cache of one resource kept current by list + watch.

The algorithm is client-go's reflector (``tools/cache/reflector.go``):

1. LIST (paginated); the cache is *replaced* by the result: cached objects missing from
   it become DELETED changes, new ones ADDED, changed ones (different resourceVersion)
   MODIFIED. ``run`` reports ``started()`` after the first LIST.
2. WATCH from the list's resourceVersion with ``allowWatchBookmarks`` and a random
   ``timeoutSeconds`` (5-10 min). BOOKMARKs only advance the resourceVersion.
3. A clean end of the stream re-watches from the last resourceVersion (no relist); one
   that ends in under a second without events counts as a failure (backoff).
4. 410 Gone/Expired (HTTP status or ERROR event, both raised as ``Gone``) -> relist.
5. Any other ``KubeError`` (connection refused during an API server restart, 5xx, 429,
   a read that exceeds the inactivity deadline) -> back off (0.8 s doubling to 30 s,
   jitter, at least Retry-After; from 0.8 s again once a watch was healthy: it delivered
   an event or stayed open ``HEALTHY_WATCH_SECONDS``, or 2 min passed without a failure)
   and re-watch from the last resourceVersion.

Optionally (``streaming_list=True``) step 1 is a streaming list: a watch with
``sendInitialEvents`` whose ADDED events up to the BOOKMARK annotated
``k8s.io/initial-events-end`` replace the cache; the same stream then continues as the
watch of step 2. A server that refuses it (400/422) gets plain LISTs from then on.

Change feed: ``subscribe(handler)`` registers a synchronous callback that gets a
``Change`` for every cache mutation, after the cache holds the new state (the sources,
``atlasd.watch.sources``, hand each to the fleet). ``run_informers`` starts a set of them
and reports started once every one has listed.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, Literal

import trio

from atlasd.kube import bodies
from atlasd.kube.api import JSON, KubeApi
from atlasd.kube.errors import (
    BadRequest,
    Gone,
    Invalid,
    KubeError,
    TooManyRequests,
    TransportError,
)
from atlasd.kube.resources import ApiResource
from atlasd.watch.backoff import Backoff

log = logging.getLogger(__name__)

ChangeType = Literal["ADDED", "MODIFIED", "DELETED"]

# client-go: a watch that ends this fast with no events is treated as a failure.
MIN_WATCH_SECONDS = 1.0
# A watch that delivered an event or stayed open this long ends an outage: the failure that
# ends it backs off from the start again. Without it the backoff was reset only after 2 min
# without any failure, so API server restarts a minute apart (the soak at scale, 20 minutes
# without a replica restart) left each informer 30-60 s blind after every later restart.
HEALTHY_WATCH_SECONDS = 10.0
# The BOOKMARK annotation that ends a streaming list's initial events.
INITIAL_EVENTS_END = "k8s.io/initial-events-end"
# Items a relist transforms between two checkpoints (~15 ms of compacting Secrets).
REPLACE_CHUNK = 200


@dataclass(frozen=True)
class Change:
    """One cache mutation. ``obj`` is the new object (the last known one for DELETED)."""

    type: ChangeType
    key: str
    obj: JSON
    old: JSON | None = None


Handler = Callable[[Change], None]


class Informer:
    """Caches every ``res`` object in ``namespace`` matching ``label_selector``.

    Invariants: ``_cache`` maps key -> the newest object seen (key = name, or
    ``namespace/name`` for an all-namespaces informer); ``_rv`` is the resourceVersion
    the cache is current to (last list, event or bookmark); ``_synced`` is set once the
    first LIST filled the cache and never cleared.
    """

    def __init__(
        self,
        kube: KubeApi,
        res: ApiResource,
        *,
        namespace: str | None,
        label_selector: str | None = None,
        watch_timeout: tuple[float, float] = (300.0, 600.0),
        inactivity_grace: float = 60.0,
        backoff: Backoff | None = None,
        transform: Callable[[JSON], JSON] | None = None,
        streaming_list: bool = False,
    ) -> None:
        self.kube = kube
        self.res = res
        self.namespace = namespace if res.namespaced else None
        self.label_selector = label_selector
        self.watch_timeout = watch_timeout
        self.inactivity_grace = inactivity_grace
        self.backoff = backoff if backoff is not None else Backoff()
        # Applied to every object before it is cached (client-go SetTransform), e.g.
        # ``atlasd.watch.sources.Compactor`` to save memory.
        self.transform = transform
        # Fill the cache with a streaming list (watch + sendInitialEvents) instead of a
        # LIST; falls back to LIST for good if the server refuses it (400/422).
        self.streaming_list = streaming_list
        self._cache: dict[str, JSON] = {}
        self._rv = ""
        # The resourceVersion of the last LIST (a watch from it that is Gone at once backs
        # off before listing again).
        self._listed_rv = ""
        self._synced = trio.Event()
        self._handlers: list[Handler] = []
        self._relist_handlers: list[Callable[[], None]] = []
        # Told of each failed LIST (the error) and of the next good one (None): readiness.
        self.on_error: Callable[[Exception | None], None] | None = None
        self._failing = False
        # Counters for status pages and tests.
        self.lists = 0
        self.watches = 0
        self.errors = 0

    # -- cache ---------------------------------------------------------------------------

    def items(self) -> dict[str, JSON]:
        """A snapshot (shallow copy) of the cache: key -> object."""
        return dict(self._cache)

    def get(self, key: str) -> JSON | None:
        return self._cache.get(key)

    def __len__(self) -> int:
        return len(self._cache)

    @property
    def resource_version(self) -> str:
        return self._rv

    @property
    def has_synced(self) -> bool:
        return self._synced.is_set()

    async def wait_synced(self) -> None:
        await self._synced.wait()

    def key(self, obj: JSON) -> str:
        name = bodies.name(obj)
        if self.res.namespaced and self.namespace is None:
            return f"{bodies.namespace(obj)}/{name}"
        return name

    # -- change feed ---------------------------------------------------------------------

    def subscribe(self, handler: Handler) -> Callable[[], None]:
        """Call ``handler`` on every change; returns a function that unsubscribes."""
        self._handlers.append(handler)

        def unsubscribe() -> None:
            if handler in self._handlers:
                self._handlers.remove(handler)

        return unsubscribe

    def subscribe_relists(self, handler: Callable[[], None]) -> None:
        """Call ``handler`` after every LIST that replaced the cache (its changes were
        emitted first): the cache is then at least as new as any write that completed
        before the LIST began."""
        self._relist_handlers.append(handler)

    def _report(self, exc: Exception | None) -> None:
        self._failing = exc is not None
        if self.on_error is not None:
            self.on_error(exc)

    def _emit(self, change: Change) -> None:
        for handler in list(self._handlers):
            handler(change)

    # -- list + watch ----------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """List and watch forever; ``started()`` once the cache was first filled."""
        started = False

        def synced() -> None:
            nonlocal started
            if not started:
                started = True
                task_status.started()

        while True:
            try:
                if self.streaming_list:
                    if await self._stream_list(on_synced=synced):
                        continue  # its watch part expired (410): list again
                else:
                    await self._relist()
            except (BadRequest, Invalid) as exc:
                if not self.streaming_list:
                    raise
                log.warning("streaming list of %s refused (%s); using LIST", self.res, exc)
                self.streaming_list = False
                continue
            except (KubeError, trio.TooSlowError) as exc:
                self.errors += 1
                self._report(exc)
                retry_after = exc.retry_after if isinstance(exc, TooManyRequests) else None
                delay = await self.backoff.sleep(at_least=retry_after or 0.0)
                log.warning("list %s failed (%s); retried after %.1fs", self.res, exc, delay)
                continue
            self._report(None)
            synced()
            await self._watch_until_gone()

    async def _relist(self) -> None:
        items, rv = await self.kube.list(
            self.res, namespace=self.namespace, label_selector=self.label_selector
        )
        self.lists += 1
        await self._replace(items, rv)

    async def _stream_list(self, *, on_synced: Callable[[], None]) -> bool:
        """Fill the cache from a streaming list (watch with sendInitialEvents), then keep
        applying that stream's events until it ends; the caller re-watches from ``_rv``.
        True when the stream went Gone after the cache was filled (relist at once);
        a failure before that raises (the caller backs off)."""
        timeout = int(random.uniform(*self.watch_timeout))
        initial: list[JSON] = []
        synced = False
        stream = self.kube.watch(
            self.res,
            namespace=self.namespace,
            resource_version="",
            label_selector=self.label_selector,
            timeout_seconds=timeout,
            send_initial_events=True,
        )
        self.watches += 1
        async with aclosing(stream) as watch:
            while True:
                try:
                    with trio.fail_after(timeout + self.inactivity_grace):
                        event = await anext(watch)
                except StopAsyncIteration:
                    break
                except (KubeError, trio.TooSlowError) as exc:
                    if not synced:
                        raise
                    if isinstance(exc, Gone):
                        return True
                    # Filled already: carry on as a plain watch from the last RV.
                    self.errors += 1
                    log.warning("watch %s failed (%s); re-watching", self.res, exc)
                    return False
                if synced:
                    self._apply(event)
                    continue
                obj: JSON = event["object"]
                if event.get("type") == "ADDED":
                    initial.append(obj)
                elif (
                    event.get("type") == "BOOKMARK"
                    and bodies.annotations(obj).get(INITIAL_EVENTS_END) == "true"
                ):
                    self.lists += 1
                    await self._replace(initial, bodies.resource_version(obj))
                    synced = True
                    on_synced()
        if not synced:
            raise TransportError(f"streaming list of {self.res} ended before its initial events")
        return False

    async def _replace(self, items: list[JSON], rv: str) -> None:
        """Make ``items`` the cache (a full list at ``rv``), emitting the differences.

        The items are transformed (compacted) ``REPLACE_CHUNK`` at a time with a checkpoint
        between chunks: at 5,000 Secrets one go held the event loop ~0.35 s (a relist also
        comes after a watch expired, while everything else runs). The cache is swapped
        in one step."""
        if self.transform is not None:
            done: list[JSON] = []
            for start in range(0, len(items), REPLACE_CHUNK):
                done += [self.transform(obj) for obj in items[start : start + REPLACE_CHUNK]]
                await trio.lowlevel.checkpoint()
            items = done
        fresh = {self.key(obj): obj for obj in items}
        old = self._cache
        self._cache = fresh
        self._rv = self._listed_rv = rv
        self._synced.set()
        for key, obj in old.items():
            if key not in fresh:
                self._emit(Change("DELETED", key, obj, obj))
        for key, obj in fresh.items():
            before = old.get(key)
            if before is None:
                self._emit(Change("ADDED", key, obj))
            elif bodies.resource_version(before) != bodies.resource_version(obj):
                self._emit(Change("MODIFIED", key, obj, before))
        for handler in list(self._relist_handlers):
            handler()

    async def _watch_until_gone(self) -> None:
        """Watch from ``_rv`` until the server says it is too old (410)."""
        while True:
            timeout = int(random.uniform(*self.watch_timeout))
            began = trio.current_time()
            events = 0
            try:
                self.watches += 1
                stream = self.kube.watch(
                    self.res,
                    namespace=self.namespace,
                    resource_version=self._rv,
                    label_selector=self.label_selector,
                    timeout_seconds=timeout,
                )
                async with aclosing(stream) as watch:
                    while True:
                        # Inactivity deadline: the server ends the stream at `timeout`;
                        # silence well past that means a dead connection.
                        with trio.fail_after(timeout + self.inactivity_grace):
                            try:
                                event = await anext(watch)
                            except StopAsyncIteration:
                                break
                        events += 1
                        self._apply(event)
                        if self._failing:
                            self._report(None)
            except Gone as exc:
                log.info("watch %s from %s: %s; relisting", self.res, self._rv, exc.reason)
                if self._rv == self._listed_rv and not events and self._short(began):
                    # Gone straight after a fresh list: do not spin list/watch in a loop.
                    # (Gone from a resourceVersion watched to since, as after an etcd
                    # compaction during an outage, relists at once.)
                    self.errors += 1
                    await self.backoff.sleep()
                return
            except (KubeError, trio.TooSlowError) as exc:
                self.errors += 1
                self._report(exc)
                self._healthy(events, began)
                retry_after = exc.retry_after if isinstance(exc, TooManyRequests) else None
                delay = await self.backoff.sleep(at_least=retry_after or 0.0)
                log.warning("watch %s failed (%s); retried after %.1fs", self.res, exc, delay)
                continue
            if not events and self._short(began):
                self.errors += 1
                await self.backoff.sleep()
            else:
                self._healthy(events, began)

    def _short(self, began: float) -> bool:
        return trio.current_time() - began < MIN_WATCH_SECONDS

    def _healthy(self, events: int, began: float) -> None:
        """A watch that delivered an event or stayed open ``HEALTHY_WATCH_SECONDS`` ends an
        outage (however it ended): the next failure backs off from the start."""
        if events or trio.current_time() - began >= HEALTHY_WATCH_SECONDS:
            self.backoff.reset()

    def _apply(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        obj: JSON = event["object"]
        rv = bodies.resource_version(obj)
        if kind == "BOOKMARK":
            if rv:
                self._rv = rv
            return
        if self.transform is not None:
            obj = self.transform(obj)
        key = self.key(obj)
        if kind in ("ADDED", "MODIFIED"):
            before = self._cache.get(key)
            self._cache[key] = obj
            if rv:
                self._rv = rv
            self._emit(Change("ADDED" if before is None else "MODIFIED", key, obj, before))
        elif kind == "DELETED":
            before = self._cache.pop(key, None)
            if rv:
                self._rv = rv
            if before is not None:
                self._emit(Change("DELETED", key, obj, before))
        else:
            log.warning("watch %s: ignoring an event of type %r", self.res, kind)


def all_synced(informers: Sequence[Informer]) -> bool:
    """Readiness: every informer has listed at least once."""
    return all(i.has_synced for i in informers)


async def run_informers(
    informers: Sequence[Informer], *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Run informers side by side; ``started()`` once every one has listed."""
    async with trio.open_nursery() as nursery:
        for informer in informers:
            nursery.start_soon(informer.run)
        for informer in informers:
            await informer.wait_synced()
        task_status.started()
