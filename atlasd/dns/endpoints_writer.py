"""The endpoint-configuration writer: fleets in, Thanos Query's endpoint files out.

What it owns:

- **The files** (``path`` is a directory: ``all.yaml``, ``group-<g>.yaml``,
  ``ungrouped.yaml``; ``atlasd.dns.endpoints``), each replaced atomically
  (``write_atomic``: temporary file, fsync, rename, fsync of the directory) and only when
  its text changed; a group's file is removed when the group empties. Files of this
  shape left in the directory by an earlier run and no longer current are removed at the
  first write, equal ones are kept as they are (same inode).
- **The ConfigMaps** (``Settings.thanos_endpoints_configmap_name`` with ``all.yaml``;
  the same name + ``-groups`` with the group files), server-side applied by a second
  task so a slow API server delays only them, at most once a second, each only when its
  data changed. One larger than a ConfigMap holds (``MAX_CONFIGMAP_BYTES``) is not
  applied: logged once per stretch and exported as
  ``atlasd_thanos_endpoints_configmap_too_large``. ``kube=None``: no ConfigMaps
  (standalone mode, replicas that are not the leader).
- **The SRV answer sizes** of the zone's names (``atlasd.dns.answers``), exported after
  every pass as ``atlasd_dns_srv_answer_*``; a name whose answer does not fit one DNS
  message is logged as an error when it starts not to fit.

Fleets arrive like the zone writer's (``Fleet`` or ``ZoneUpdate`` with the changed keys)
and are coalesced the same way: a burst is one pass, and a pass costs the changed
clusters plus the concatenation of the changed files.

Errors: a fleet that does not render (``ZoneError``) is logged and skipped, the last
good files stay. ``OSError`` from the file system propagates. ConfigMap writes retry
``KubeError.retriable`` with backoff; other ``KubeError`` (403, 422) propagate.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import trio

from atlasd.dns.discovery_metrics import CONFIGMAP_TOO_LARGE, DiscoveryGauges
from atlasd.dns.endpoints import (
    MAX_CONFIGMAP_BYTES,
    EndpointState,
    configmaps,
    data_bytes,
    is_endpoints_key,
)
from atlasd.dns.writer import ZoneUpdate, write_atomic
from atlasd.dns.zone import ZoneError
from atlasd.kube.api import KubeApi
from atlasd.kube.errors import KubeError
from atlasd.model import Fleet, Settings
from atlasd.watch.backoff import Backoff

log = logging.getLogger(__name__)

_T = TypeVar("_T")

APPLY_INTERVAL = 1.0


def read_files(directory: Path) -> dict[str, str]:
    """The endpoint files found in ``directory`` (created if missing)."""
    directory.mkdir(parents=True, exist_ok=True)
    found: dict[str, str] = {}
    for entry in directory.iterdir():
        if is_endpoints_key(entry.name) and entry.is_file():
            found[entry.name] = entry.read_text(encoding="utf-8")
    return found


def apply_files(directory: Path, write: Mapping[str, str], remove: set[str]) -> None:
    """Write each of ``write`` atomically, then remove ``remove`` (blocking; a thread)."""
    for key, text in write.items():
        write_atomic(directory / key, text)
    for key in remove:
        (directory / key).unlink(missing_ok=True)


async def _retrying(what: str, call: Callable[[], Awaitable[_T]]) -> _T:
    backoff = Backoff(initial=0.5, reset_after=float("inf"))
    while True:
        try:
            return await call()
        except KubeError as exc:
            if not exc.retriable:
                raise
            log.warning("%s: %s; retrying", what, exc)
            await backoff.sleep(at_least=exc.retry_after or 0.0)


class _Newest:
    """A one-slot mailbox: ``put`` replaces what ``get`` has not taken yet."""

    def __init__(self) -> None:
        self._files: Mapping[str, str] | None = None
        # Set while ``_files`` holds a value not taken yet, or after ``close``.
        self._ready = trio.Event()
        self._closed = False

    def put(self, files: Mapping[str, str]) -> None:
        self._files = files
        self._ready.set()

    def close(self) -> None:
        self._closed = True
        self._ready.set()

    async def get(self) -> Mapping[str, str]:
        while self._files is None:
            if self._closed:
                raise trio.EndOfChannel
            await self._ready.wait()
            self._ready = trio.Event()
        files, self._files = self._files, None
        return files


async def _apply_configmaps(kube: KubeApi, settings: Settings, newest: _Newest) -> None:
    """Apply the newest files' ConfigMaps, each when its data changed and it fits."""
    applied: dict[str, dict[str, str]] = {}
    too_large: set[str] = set()
    while True:
        try:
            files = await newest.get()
        except trio.EndOfChannel:
            return
        for name, body in configmaps(settings, files).items():
            data: dict[str, str] = body["data"]
            if applied.get(name) == data:
                continue
            size = data_bytes(data)
            if size > MAX_CONFIGMAP_BYTES:
                if name not in too_large:
                    log.error(
                        "endpoint configuration ConfigMap %s would be %d bytes, more "
                        "than a ConfigMap holds; not updated while it is this large "
                        "(docs/dns.md: split the fleet into DNS groups)",
                        name,
                        size,
                    )
                    too_large.add(name)
                    CONFIGMAP_TOO_LARGE.labels(name).set(1)
                continue
            if name in too_large:
                too_large.discard(name)
                CONFIGMAP_TOO_LARGE.labels(name).set(0)
            apply: Callable[[], Awaitable[Any]] = functools.partial(kube.apply, body)
            await _retrying(f"applying ConfigMap {name}", apply)
            applied[name] = data
            log.info("ConfigMap %s updated (%d bytes)", name, size)
        # A burst of changes is one update a second (Thanos re-reads on a timer).
        await trio.sleep(APPLY_INTERVAL)


def _as_update(item: Fleet | ZoneUpdate) -> ZoneUpdate:
    return item if isinstance(item, ZoneUpdate) else ZoneUpdate(item, None)


def _coalesce(
    fleets: trio.MemoryReceiveChannel[Fleet | ZoneUpdate], update: ZoneUpdate
) -> tuple[ZoneUpdate, bool]:
    """``update`` merged with everything queued behind it, and whether the channel closed."""
    while True:
        try:
            newer = _as_update(fleets.receive_nowait())
        except trio.WouldBlock:
            return update, False
        except trio.EndOfChannel:
            return update, True
        if update.changed is None or newer.changed is None:
            update = ZoneUpdate(newer.fleet, None)
        else:
            update = ZoneUpdate(newer.fleet, update.changed | newer.changed)


async def run_endpoints_writer(
    *,
    fleets: trio.MemoryReceiveChannel[Fleet | ZoneUpdate],
    path: Path,
    kube: KubeApi | None,
    settings: Settings,
    on_files: Callable[[Mapping[str, str]], None] | None = None,
    task_status: trio.TaskStatus[EndpointState] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Write the endpoint files for every (coalesced) fleet until ``fleets`` is closed.

    Reports started (with the ``EndpointState``, for status and tests) once the
    directory exists and its current files are read. ``on_files`` is called after each
    pass that changed a file, with every current file.
    """
    written = await trio.to_thread.run_sync(read_files, path)
    state = EndpointState()
    gauges = DiscoveryGauges()
    truncated: set[str] = set()
    newest = _Newest()
    async with trio.open_nursery() as nursery:
        if kube is not None:
            nursery.start_soon(_apply_configmaps, kube, settings, newest)
        task_status.started(state)
        try:
            first = True
            closed = False
            while not closed:
                try:
                    item = await fleets.receive()
                except trio.EndOfChannel:
                    break
                update, closed = _coalesce(fleets, _as_update(item))
                render = functools.partial(state.update, update.fleet, update.changed)
                try:
                    if update.changed is None or len(update.changed) > 100:
                        # Many clusters (a start, a settings change): off the Trio thread.
                        dirty = await trio.to_thread.run_sync(render)
                    else:
                        dirty = render()
                except ZoneError as exc:
                    log.error("endpoint configuration not rendered, keeping the last: %s", exc)
                    continue
                publish = first  # the ConfigMaps once at start, even if no file changes
                if first:
                    dirty |= set(written)
                    first = False
                write: dict[str, str] = {}
                remove: set[str] = set()
                for key in dirty:
                    text = state.text(key)
                    if text is None:
                        if key in written:
                            remove.add(key)
                    elif written.get(key) != text:
                        write[key] = text
                sizes = state.answer_sizes()
                gauges.answers(sizes)
                now_truncated = {n for n, s in sizes.items() if s.truncated}
                for name in sorted(now_truncated - truncated):
                    log.error(
                        "the SRV answer for %s is %d bytes (%d records), more than one DNS "
                        "message: Thanos Query pointed at it fails every lookup; use the "
                        "endpoint configuration (docs/dns.md)",
                        name,
                        sizes[name].bytes,
                        sizes[name].records,
                    )
                truncated = now_truncated
                if write or remove:
                    await trio.to_thread.run_sync(apply_files, path, write, remove)
                    written.update(write)
                    for key in remove:
                        del written[key]
                    gauges.endpoints(state.endpoint_counts())
                    log.info(
                        "endpoint configuration: wrote %s, removed %s",
                        ", ".join(sorted(write)) or "nothing",
                        ", ".join(sorted(remove)) or "nothing",
                    )
                elif not publish:
                    continue
                if kube is not None or on_files is not None:
                    files = state.files()
                    if kube is not None:
                        newest.put(files)
                    if on_files is not None:
                        on_files(files)
        finally:
            newest.close()
