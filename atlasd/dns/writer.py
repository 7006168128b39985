"""The zone writer: turns fleets into the zone file CoreDNS serves, and its ConfigMap mirror.

What it owns:

- **The zone file** (``path``), read by CoreDNS's ``file`` plugin with ``reload``. It is
  replaced atomically — a temporary file in the same directory, written, fsynced,
  renamed over the old one, then the directory fsynced — so a reader sees the old
  zone or the new one, never a part. It is rewritten only when the SRV records change
  (``atlasd.dns.zone.records``); the serial grows only then, so CoreDNS (which reloads
  only on a larger serial) and every cache see a new serial exactly when there is
  something new.
- **The ConfigMap mirror** (``settings.dns_configmap_name``, key ``atlas.zone``) for
  installs that mount the zone from a ConfigMap, applied server-side by a second task
  so a slow or unreachable API server never delays the file. Pass ``kube=None`` to
  skip it (replicas that are not the leader, standalone mode).
- **The serial across restarts**: before it reports started, the writer reads the
  serial of the existing file and of the ConfigMap and continues above the larger one
  (``atlasd.dns.zone.next_serial``). If the existing file already holds exactly what
  the first fleet renders to, nothing is rewritten and the serial stays.

Fleets arrive on a ``trio.MemoryReceiveChannel`` (plain ``Fleet``s, or ``ZoneUpdate``s
that also say which keys changed, so only those clusters' records are re-rendered);
whatever is queued when the writer gets to it is coalesced into one pass (the newest
fleet, the union of the changed keys), so a burst of a thousand changes is one write. When the channel is closed the writer finishes the
last write (and the last mirror attempt) and returns.

Errors: a fleet that does not render (``atlasd.dns.zone.ZoneError``: a name that
must not reach the zone; the validator should have rejected it) is logged and
skipped — the last good zone stays served and the next fleet is tried. OSError from
the file system propagates (a zone that cannot be written is not something to hide).
The mirror retries the retriable errors (``KubeError.retriable``: transport failures,
conflicts, 429 and 5xx) with backoff (``atlasd.watch.backoff``); other
``KubeError`` (403 from missing RBAC, 422) propagate.
"""

from __future__ import annotations

import bisect
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Generic, TypeVar

import trio

from atlasd.dns.answer import Answer, AnswerSizes
from atlasd.dns.zone import (
    Block,
    SrvRecord,
    ZoneError,
    cluster_block,
    name_server,
    next_serial,
    parse_serial,
    render_blocks,
    zone_inputs,
)
from atlasd.files import write_atomic
from atlasd.kube import bodies
from atlasd.kube.api import KubeApi
from atlasd.kube.errors import KubeError, NotFound
from atlasd.kube.resources import CONFIGMAPS
from atlasd.labels import MANAGED_BY_LABEL, MANAGED_BY_VALUE
from atlasd.model import Fleet, Settings
from atlasd.pacing import burst_pause, cpu_timed
from atlasd.watch.backoff import Backoff

log = logging.getLogger(__name__)

_T = TypeVar("_T")

ZONE_KEY = "atlas.zone"
# A ConfigMap holds at most 1 MiB; leave room for metadata. A zone larger than this
# (about 8,700 SRV records of ~115 bytes: ~2,900 single-replica clusters with 3 ports and
# no group, fewer with replicas and groups) is written to the file only; the mirror logs
# why it is stale.
MAX_CONFIGMAP_ZONE_BYTES = 1_000_000
MIRROR_INTERVAL = 1.0


# -- the file ------------------------------------------------------------------------------


def read_zone_file(path: Path) -> str | None:
    """The current zone text, or ``None`` if there is no file yet."""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None


# -- deciding what to write -----------------------------------------------------------------


@dataclass(frozen=True)
class ZoneUpdate:
    """A fleet and the keys that changed since the previous one (None: any)."""

    fleet: Fleet
    changed: frozenset[str] | None = None


@dataclass(frozen=True, eq=False)
class Zone:
    """One rendered zone: its per-cluster blocks, serial and text."""

    blocks: Mapping[str, Block]
    serial: int
    text: str
    # How many SRV records (kept by ZoneState as blocks come and go: counting walks them).
    count: int
    # Each SRV name's answer (atlasd.dns.answer), largest first.
    answers: tuple[Answer, ...] = ()

    @property
    def too_large(self) -> tuple[Answer, ...]:
        """The names whose answer no longer fits in one DNS message."""
        return tuple(a for a in self.answers if a.too_large)

    @property
    def records(self) -> tuple[SrvRecord, ...]:
        return tuple(r for name in sorted(self.blocks) for r in self.blocks[name].records)


class ZoneState:
    """What the writer last wrote, and how to get from a fleet to the next zone.

    Records are kept per cluster (``Block``): a change re-renders the changed clusters'
    blocks only, and the zone text is their concatenation in name order. Plain (non-async).
    """

    def __init__(
        self,
        *,
        previous_text: str | None,
        previous_serial: int | None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        # Text of the file as found at start; consulted once, for the first fleet.
        self._found_text = previous_text
        # Largest serial seen so far (file, ConfigMap, our own writes); None = none yet.
        self.serial = previous_serial
        self._clock = clock
        # The zone as last written (or adopted); None until the first fleet.
        self.current: Zone | None = None
        # Blocks of the last fleet seen, and its clusters' names sorted.
        self._blocks: dict[str, Block] = {}
        self._names: list[str] = []
        # The blocks' texts in ``_names`` order (the zone's body), and their record count:
        # kept as keys change, so a change does not walk every cluster.
        self._texts: list[str] = []
        self._count = 0
        self._sizes = AnswerSizes()
        self._inputs: dict[str, Hashable] = {}
        # The blocks hold changes not yet on disk (a write failed, or is under way).
        self._uncommitted = False
        self._settings: Settings | None = None

    def next_zone(self, fleet: Fleet, changed: Iterable[str] | None = None) -> Zone | None:
        """The zone to write for ``fleet``, or ``None`` if no record changed. ``changed``:
        the keys that may differ from the previous fleet (None: any).

        Raises ``ZoneError`` if the fleet does not render (nothing changes then).
        """
        if changed is None or fleet.settings != self._settings:
            keys: set[str] = set(fleet.clusters) | set(self._blocks)
        else:
            keys = set(changed)
        # Render first (a ZoneError leaves everything as it was), then adopt.
        updates: dict[str, tuple[Block, Hashable] | None] = {}
        for key in keys:
            c = fleet.clusters.get(key)
            if c is None:
                if key in self._blocks:
                    updates[key] = None
                continue
            inputs: Hashable = zone_inputs(c)
            if self._inputs.get(key) == inputs and fleet.settings == self._settings:
                continue
            block = cluster_block(c, fleet.settings)
            old = self._blocks.get(key)
            updates[key] = (block if old is None or old.text != block.text else old, inputs)
        dirty = self.current is None or self._uncommitted
        for key, update in updates.items():
            if update is None:
                gone = self._blocks.pop(key).records
                self._count -= len(gone)
                self._sizes.remove(gone)
                del self._inputs[key]
                at = bisect.bisect_left(self._names, key)
                del self._names[at]
                del self._texts[at]
                dirty = True
                continue
            block, key_inputs = update
            old = self._blocks.get(key)
            if old is not block:
                at = bisect.bisect_left(self._names, key)
                if old is None:
                    self._names.insert(at, key)
                    self._texts.insert(at, block.text)
                else:
                    self._count -= len(old.records)
                    self._sizes.remove(old.records)
                    self._texts[at] = block.text
                self._count += len(block.records)
                self._sizes.add(block.records)
                dirty = True
            self._blocks[key] = block
            self._inputs[key] = key_inputs
        self._settings = fleet.settings
        self._uncommitted = dirty
        if not dirty:
            return None
        body = self._texts
        frozen = MappingProxyType(dict(self._blocks))
        if self.current is None and self._found_text is not None and self.serial is not None:
            # First fleet after a restart: if the file already says exactly this (and no
            # mirror remembers a larger serial), keep it as it is.
            found = parse_serial(self._found_text)
            if found is not None and found >= self.serial:
                same = render_blocks(body, settings=fleet.settings, serial=found)
                if same == self._found_text:
                    answers = self._sizes.answers(name_server=name_server(fleet.settings))
                    self.current = Zone(frozen, found, same, self._count, answers)
                    self._found_text = None
                    self._uncommitted = False
                    return None
        serial = next_serial(self.serial, now=self._clock())
        text = render_blocks(body, settings=fleet.settings, serial=serial)
        answers = self._sizes.answers(name_server=name_server(fleet.settings))
        return Zone(frozen, serial, text, self._count, answers)

    def committed(self, zone: Zone) -> None:
        """``zone`` is now on disk."""
        self.current = zone
        self.serial = zone.serial
        self._found_text = None
        self._uncommitted = False


def configmap(settings: Settings, text: str) -> dict[str, Any]:
    """The ConfigMap mirror object (server-side apply body)."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": settings.dns_configmap_name,
            "namespace": settings.namespace,
            "labels": {MANAGED_BY_LABEL: MANAGED_BY_VALUE},
        },
        "data": {ZONE_KEY: text},
    }


# -- the tasks ------------------------------------------------------------------------------


class Latest(Generic[_T]):
    """A single-slot mailbox: ``put`` overwrites, ``wait`` returns the newest value once
    (the zone's mirror and the endpoint configuration's ConfigMaps take only the newest)."""

    def __init__(self) -> None:
        self._value: _T | None = None
        # Set when ``_value`` holds something ``wait`` has not returned yet.
        self._event = trio.Event()
        # No more values will come; ``wait`` raises EndOfChannel once drained.
        self._closed = False

    def put(self, value: _T) -> None:
        self._value = value
        self._event.set()

    def close(self) -> None:
        self._closed = True
        self._event.set()

    async def wait(self) -> _T:
        while True:
            if self._value is not None:
                value, self._value = self._value, None
                return value
            if self._closed:
                raise trio.EndOfChannel
            await self._event.wait()
            self._event = trio.Event()


def _backoff() -> Backoff:
    # Starts over for every read and every new zone text, not after a quiet while.
    return Backoff(initial=0.5, reset_after=float("inf"))


async def retrying(what: str, call: Callable[[], Awaitable[_T]]) -> _T:
    """``call()`` until it succeeds, retrying the retriable errors with backoff."""
    backoff = _backoff()
    while True:
        try:
            return await call()
        except KubeError as exc:
            if not exc.retriable:
                raise
            log.warning("%s: %s; retrying", what, exc)
            await backoff.sleep(at_least=exc.retry_after or 0.0)


async def _read_configmap_text(kube: KubeApi, settings: Settings) -> str | None:
    name = settings.dns_configmap_name
    try:
        obj = await retrying(
            f"reading ConfigMap {name}",
            lambda: kube.get(CONFIGMAPS, name, namespace=settings.namespace),
        )
    except NotFound:
        return None
    text = bodies.data(obj if isinstance(obj, dict) else None).get(ZONE_KEY)
    return text if isinstance(text, str) else None


async def _mirror(
    kube: KubeApi, settings: Settings, latest: Latest[str], applied: str | None
) -> None:
    """Apply the newest zone text to the ConfigMap whenever it differs from what is there."""
    name = settings.dns_configmap_name
    # The last text found too large, so that the writer's every fleet (it hands over the
    # current text even when the zone did not change) neither measures it again nor
    # logs again: once per stretch of too-large zones is enough.
    too_large: str | None = None
    while True:
        try:
            text = await latest.wait()
        except trio.EndOfChannel:
            return
        if text == applied:
            too_large = None  # the ConfigMap holds the zone again: a stretch ended
            continue
        if text is too_large:
            continue
        size = len(text.encode("utf-8"))
        if size > MAX_CONFIGMAP_ZONE_BYTES:
            if too_large is None:
                log.error(
                    "zone is %d bytes, more than a ConfigMap holds; ConfigMap %s not updated "
                    "while it is this large (the zone file is)",
                    size,
                    name,
                )
            too_large = text
            continue
        too_large = None
        apply = functools.partial(kube.apply, configmap(settings, text))
        await retrying(f"applying ConfigMap {name}", apply)
        applied = text
        log.info("ConfigMap %s updated", name)
        # At most one apply a second: a burst of zone changes is one ConfigMap update
        # (its consumers reload on a timer anyway).
        await trio.sleep(MIRROR_INTERVAL)


def as_update(item: Fleet | ZoneUpdate) -> ZoneUpdate:
    return item if isinstance(item, ZoneUpdate) else ZoneUpdate(item, None)


def _merge(a: ZoneUpdate, b: ZoneUpdate) -> ZoneUpdate:
    """``b`` (newer) with the keys changed since ``a``'s predecessor."""
    if a.changed is None or b.changed is None:
        return ZoneUpdate(b.fleet, None)
    return ZoneUpdate(b.fleet, a.changed | b.changed)


def coalesce(
    fleets: trio.MemoryReceiveChannel[Fleet | ZoneUpdate], update: ZoneUpdate
) -> tuple[ZoneUpdate, bool]:
    """``update`` merged with everything queued behind it, and whether the channel closed."""
    while True:
        try:
            update = _merge(update, as_update(fleets.receive_nowait()))
        except trio.WouldBlock:
            return update, False
        except trio.EndOfChannel:
            return update, True


BURST_INTERVAL = 1.0
"""While changes keep coming, the zone and the endpoint files are rewritten at most this
often (seconds): each pass rewrites the whole file, and their readers look on a timer."""


async def pace(fleets: trio.MemoryReceiveChannel[Any], *, started: float, cpu: float) -> None:
    """After a pass of a file writer that began at ``started`` (``trio.current_time()``)
    and took ``cpu`` seconds of CPU: its share's pause (``atlasd.pacing``: a tenth of the
    process, at most 1 s); then, if changes already wait in ``fleets`` (a burst), on until
    ``BURST_INTERVAL`` after the pass began. The CPU share alone let the 1.6 MB zone be
    rewritten ~20 times a second while 5,000 clusters were onboarded (2,646 passes, each
    fsynced), though CoreDNS reads it once a second. A change that finds nothing queued
    behind it is followed by the share's pause alone, however soon it came."""
    await trio.sleep(burst_pause(cpu, share=0.1, cap=1.0))
    if fleets.statistics().current_buffer_used:
        await trio.sleep_until(started + BURST_INTERVAL)


async def coalesced(
    fleets: trio.MemoryReceiveChannel[Fleet | ZoneUpdate],
) -> AsyncIterator[ZoneUpdate]:
    """Each update as it comes, merged with whatever queued behind it (a burst is one);
    ends when ``fleets`` is closed (after the last)."""
    while True:
        try:
            item = await fleets.receive()
        except trio.EndOfChannel:
            return
        update, closed = coalesce(fleets, as_update(item))
        yield update
        if closed:
            return


async def render_update(update: ZoneUpdate, render: Callable[[], _T]) -> tuple[_T, float]:
    """``render()`` and its CPU time; in a worker thread when many clusters changed (a
    start, a CA rotation), so the event loop keeps serving meanwhile."""
    if update.changed is None or len(update.changed) > 100:
        return await trio.to_thread.run_sync(cpu_timed, render)
    return cpu_timed(render)


async def run_zone_writer(
    *,
    fleets: trio.MemoryReceiveChannel[Fleet | ZoneUpdate],
    path: Path,
    kube: KubeApi | None,
    settings: Settings,
    clock: Callable[[], float] = time.time,
    on_zone: Callable[[Zone], None] | None = None,
    task_status: trio.TaskStatus[ZoneState] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Write the zone for every (coalesced) fleet until ``fleets`` is closed.

    Reports started — with the ``ZoneState``, for status and tests — once the previous
    serial has been read back from the file and (with ``kube``) the ConfigMap.
    ``on_zone`` is called after each write with what was written (and once with the zone
    found on disk, if the first fleet needs no write).
    """
    previous_text = await trio.to_thread.run_sync(read_zone_file, path)
    serials = [parse_serial(previous_text)] if previous_text is not None else []
    mirrored: str | None = None
    if kube is not None:
        mirrored = await _read_configmap_text(kube, settings)
        if mirrored is not None:
            serials.append(parse_serial(mirrored))
    known = [s for s in serials if s is not None]
    state = ZoneState(
        previous_text=previous_text, previous_serial=max(known) if known else None, clock=clock
    )
    latest = Latest[str]()
    async with trio.open_nursery() as nursery:
        if kube is not None:
            nursery.start_soon(_mirror, kube, settings, latest, mirrored)
        task_status.started(state)
        # Whether on_zone has been told a zone yet.
        reported = False
        async for update in coalesced(fleets):
            started = trio.current_time()
            render = functools.partial(state.next_zone, update.fleet, update.changed)
            try:
                zone, cpu = await render_update(update, render)
            except ZoneError as exc:
                log.error("zone not rendered, keeping serial %s: %s", state.serial, exc)
                continue
            if zone is None:
                if state.current is not None:
                    latest.put(state.current.text)
                    if not reported and on_zone is not None:
                        # The file already held this zone (a restart): report it once.
                        on_zone(state.current)
                    reported = True
                continue
            _, spent = await trio.to_thread.run_sync(
                # World-readable: CoreDNS may run as another user (a sidecar container).
                cpu_timed,
                functools.partial(write_atomic, path, zone.text, mode=0o644),
            )
            state.committed(zone)
            log.info("zone written: serial %d, %d SRV records", zone.serial, zone.count)
            latest.put(zone.text)
            if on_zone is not None:
                on_zone(zone)
            reported = True
            # A burst of changes is written in batches (``pace``): the zone takes at most a
            # tenth of the process (onboarding 5,000 clusters it took a third), and while
            # changes keep coming a pass a second (CoreDNS re-reads once a second).
            await pace(fleets, started=started, cpu=cpu + spent)
        latest.close()
