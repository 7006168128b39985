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

Fleets arrive like the zone writer's (``Fleet`` or ``ZoneUpdate`` with the changed keys)
and are coalesced by the same code (``atlasd.dns.writer.coalesce``; the ConfigMaps take the
newest files through its ``Latest`` and retry with its ``retrying``): a burst is one pass, and a pass costs the changed
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
from typing import Any

import trio

from atlasd import metrics
from atlasd.dns.endpoints import (
    MAX_CONFIGMAP_BYTES,
    EndpointState,
    configmaps,
    data_bytes,
    is_endpoints_key,
)
from atlasd.dns.writer import Latest, ZoneUpdate, coalesced, pace, render_update, retrying
from atlasd.dns.zone import ZoneError
from atlasd.files import write_atomic
from atlasd.kube.api import KubeApi
from atlasd.model import Fleet, Settings
from atlasd.pacing import cpu_timed

log = logging.getLogger(__name__)

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


async def _apply_configmaps(
    kube: KubeApi, settings: Settings, newest: Latest[Mapping[str, str]]
) -> None:
    """Apply the newest files' ConfigMaps, each when its data changed and it fits."""
    applied: dict[str, dict[str, str]] = {}
    too_large: set[str] = set()
    while True:
        try:
            files = await newest.wait()
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
                    metrics.ENDPOINTS_CONFIGMAP_TOO_LARGE.labels(name).set(1)
                continue
            if name in too_large:
                too_large.discard(name)
                metrics.ENDPOINTS_CONFIGMAP_TOO_LARGE.labels(name).set(0)
            apply: Callable[[], Awaitable[Any]] = functools.partial(kube.apply, body)
            await retrying(f"applying ConfigMap {name}", apply)
            applied[name] = data
            log.info("ConfigMap %s updated (%d bytes)", name, size)
        # A burst of changes is one update a second (Thanos re-reads on a timer).
        await trio.sleep(APPLY_INTERVAL)


def _plan(
    state: EndpointState, dirty: set[str], written: Mapping[str, str]
) -> tuple[dict[str, str], set[str]]:
    """Of the ``dirty`` files, those to write (their new text) and those to remove."""
    write: dict[str, str] = {}
    remove: set[str] = set()
    for key in dirty:
        text = state.text(key)
        if text is None:
            if key in written:
                remove.add(key)
        elif written.get(key) != text:
            write[key] = text
    return write, remove


def _export_counts(counts: Mapping[str, int], exported: set[str]) -> set[str]:
    """Set ``atlasd_thanos_endpoints{file}``; a file gone (an emptied group) loses its series."""
    for gone in exported - counts.keys():
        metrics.THANOS_ENDPOINTS.remove(gone)
    for key, count in counts.items():
        metrics.THANOS_ENDPOINTS.labels(key).set(count)
    return set(counts)


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
    counted: set[str] = set()
    newest = Latest[Mapping[str, str]]()
    async with trio.open_nursery() as nursery:
        if kube is not None:
            nursery.start_soon(_apply_configmaps, kube, settings, newest)
        task_status.started(state)
        try:
            first = True
            async for update in coalesced(fleets):
                started = trio.current_time()
                # The pause below counts all of a pass's CPU, in whichever thread: the
                # render, the files' text, the writes, the counts and the ConfigMaps' copy
                # (counting only the render and the writes, a pass at 5,000 clusters took
                # several times the CPU its pause allowed).
                render = functools.partial(state.update, update.fleet, update.changed)
                try:
                    dirty, cpu = await render_update(update, render)
                except ZoneError as exc:
                    log.error("endpoint configuration not rendered, keeping the last: %s", exc)
                    continue
                publish = first  # the ConfigMaps once at start, even if no file changes
                if first:
                    dirty |= set(written)
                    first = False
                (write, remove), spent = cpu_timed(functools.partial(_plan, state, dirty, written))
                cpu += spent
                if write or remove:
                    _, spent = await trio.to_thread.run_sync(
                        cpu_timed, functools.partial(apply_files, path, write, remove)
                    )
                    cpu += spent
                    written.update(write)
                    for key in remove:
                        del written[key]
                    counted = _export_counts(state.endpoint_counts(), counted)
                    log.info(
                        "endpoint configuration: wrote %s, removed %s",
                        ", ".join(sorted(write)) or "nothing",
                        ", ".join(sorted(remove)) or "nothing",
                    )
                elif not publish:
                    continue
                if kube is not None or on_files is not None:
                    files, spent = cpu_timed(state.files)
                    cpu += spent
                    if kube is not None:
                        newest.put(files)
                    if on_files is not None:
                        on_files(files)
                # Like the zone: a burst of changes is written in batches (``pace``), the
                # files taking at most a tenth of the process, and while changes keep coming
                # a pass a second (Thanos re-reads on a timer anyway).
                await pace(fleets, started=started, cpu=cpu)
        finally:
            newest.close()
