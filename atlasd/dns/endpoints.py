"""Thanos Query's endpoint configuration: which files exist, what each lists, their text.

Thanos Query v0.39 reads ``--endpoint.sd-config-file`` (``cmd/thanos/endpointset.go`` at
tag v0.39.2, commit c107866068401bc6d13f36673b75aea6477f0f11: ``EndpointConfig`` is a YAML
map with one key ``endpoints``, a list of ``{address, group, strict}``; a plain
``host:port`` address is dialled as is; the file is re-read every
``--endpoint.sd-config-reload-interval``, default 5m, and swapped in when its SHA-256
changes). No DNS is involved, so there is no 65,535-byte ceiling (``atlasd.dns.answer``).

Files (keys of the ConfigMaps, names of the files in standalone mode):

- ``all.yaml``: every served sidecar endpoint of the fleet — for every cluster, every
  replica ``i``, the SRV target and port the zone publishes under
  ``_<port>._tcp.sidecars.thanos.atlas.`` for the StoreAPI port (``Settings.
  thanos_endpoints_port_name``, default ``thanos``): ``<cluster>-thanos-sidecar<i>.
  <ns>.svc.<cluster-domain>:<port>``, i.e. exactly the zone's records without DNS;
- ``group-<g>.yaml``: the clusters of DNS group ``g`` (``goatlas.io/dns-group``), what
  ``_thanos._tcp.<g>.sidecars.thanos.atlas.`` answers;
- ``ungrouped.yaml`` (only while some group exists): the clusters of no group, so the
  group files and it together list every cluster exactly once (hierarchical querying:
  one Query per file, a top-level Query over those Queries).

Addresses are sorted by cluster name, then as the zone sorts them; equal fleets give
equal bytes. Every name is validated by ``atlasd.dns.zone.cluster_block`` (the same
checks as the zone; ``ZoneError`` on anything that must not reach a file), and a YAML
plain scalar made of DNS labels, dots, a colon and digits needs no quoting.

Incremental: ``EndpointState`` keeps each cluster's lines and, per file, the lines in
cluster-name order, so a change re-renders the changed clusters only and reports which
files changed; a file's text is its header plus the concatenation of its clusters'
lines.

ConfigMaps (``configmaps``): ``<name>`` holds ``all.yaml``; ``<name>-groups`` holds the
group files and ``ungrouped.yaml``. Each cluster is in each ConfigMap once, so each is
as large as the fleet's list: about 100 bytes per sidecar with a 37-character cluster
name, i.e. 10,000 single-replica clusters in 1,000,000 bytes (``MAX_CONFIGMAP_BYTES``).
"""

from __future__ import annotations

import bisect
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from atlasd.dns.zone import (
    SIDECARS_DOMAIN,
    ZoneError,
    cluster_block,
    zone_inputs,
)
from atlasd.labels import MANAGED_BY_LABEL, MANAGED_BY_VALUE
from atlasd.model import DownstreamCluster, Fleet, Settings

ALL_KEY = "all.yaml"
UNGROUPED_KEY = "ungrouped.yaml"
GROUP_PREFIX = "group-"
GROUPS_CONFIGMAP_SUFFIX = "-groups"
# A ConfigMap holds at most 1 MiB (data plus metadata); leave room for the metadata.
MAX_CONFIGMAP_BYTES = 1_000_000

HEADER = (
    "# Thanos Query endpoint configuration (--endpoint.sd-config-file), written by atlasd\n"
    "# from the clusters it serves; rewritten atomically on every change, do not edit.\n"
)


def group_key(group: str) -> str:
    return f"{GROUP_PREFIX}{group}.yaml"


def is_endpoints_key(key: str) -> bool:
    """A file name this module produces (for removing stale files in a directory)."""
    return key in (ALL_KEY, UNGROUPED_KEY) or (
        key.startswith(GROUP_PREFIX) and key.endswith(".yaml")
    )


@dataclass(frozen=True)
class ClusterEndpoints:
    """One cluster's part: its endpoint lines and the files they go to."""

    lines: str
    keys: tuple[str, ...]


def _port_owner(settings: Settings) -> str:
    return f"_{settings.thanos_endpoints_port_name}._tcp.{SIDECARS_DOMAIN}"


def cluster_endpoints(cluster: DownstreamCluster, settings: Settings) -> ClusterEndpoints:
    """The endpoint lines of one cluster; raises ``ZoneError`` like the zone does."""
    recs = cluster_block(cluster, settings).records
    owner = _port_owner(settings)
    lines = "".join(f"- address: {r.target[:-1]}:{r.port}\n" for r in recs if r.owner == owner)
    group = cluster.dns_group
    keys = (ALL_KEY, UNGROUPED_KEY) if group is None else (ALL_KEY, group_key(group))
    return ClusterEndpoints(lines, keys)


def sidecar_addresses(fleet: Fleet) -> dict[str, str]:
    """Every StoreAPI address the endpoint configuration lists -> its cluster (what Thanos
    Query names its stores by). Clusters that do not render are left out."""
    owner = _port_owner(fleet.settings)
    out: dict[str, str] = {}
    for cluster in fleet.clusters.values():
        try:
            recs = cluster_block(cluster, fleet.settings).records
        except ZoneError:
            continue
        for r in recs:
            if r.owner == owner:
                out[f"{r.target[:-1]}:{r.port}"] = cluster.name
    return out


def render(pieces: Iterable[str]) -> str:
    """A file's text from its clusters' lines (in cluster-name order)."""
    body = "".join(pieces)
    return HEADER + ("endpoints:\n" + body if body else "endpoints: []\n")


def render_files(fleet: Fleet) -> dict[str, str]:
    """Every file for ``fleet`` from scratch (what ``EndpointState`` must always equal)."""
    per_key: dict[str, list[str]] = {ALL_KEY: []}
    for cluster in fleet.sorted_clusters():
        piece = cluster_endpoints(cluster, fleet.settings)
        for key in piece.keys:
            per_key.setdefault(key, []).append(piece.lines)
    if not any(k.startswith(GROUP_PREFIX) for k in per_key):
        per_key.pop(UNGROUPED_KEY, None)
    else:
        per_key.setdefault(UNGROUPED_KEY, [])
    return {key: render(lines) for key, lines in sorted(per_key.items())}


class _File:
    """One file's clusters, sorted by name, and their lines in that order.

    Invariant: ``endpoints`` is the number of endpoints ``lines`` lists (one line each),
    kept as clusters come and go: counting them anew on every pass walked the whole fleet.
    """

    def __init__(self) -> None:
        self.names: list[str] = []
        self.lines: list[str] = []
        self.endpoints = 0

    def put(self, name: str, lines: str) -> None:
        at = bisect.bisect_left(self.names, name)
        if at < len(self.names) and self.names[at] == name:
            self.endpoints -= self.lines[at].count("\n")
            self.lines[at] = lines
        else:
            self.names.insert(at, name)
            self.lines.insert(at, lines)
        self.endpoints += lines.count("\n")

    def drop(self, name: str) -> None:
        at = bisect.bisect_left(self.names, name)
        self.endpoints -= self.lines[at].count("\n")
        del self.names[at]
        del self.lines[at]


class EndpointState:
    """The files as of the last fleet, kept cluster by cluster. Plain (no I/O).

    Invariants: ``_pieces`` holds the piece of every cluster of the last fleet; each
    ``_files[key]`` holds exactly the clusters whose piece lists ``key`` (a group file
    with no cluster is removed).
    """

    def __init__(self) -> None:
        self._settings: Settings | None = None
        self._pieces: dict[str, ClusterEndpoints] = {}
        self._inputs: dict[str, Hashable] = {}
        self._files: dict[str, _File] = {ALL_KEY: _File(), UNGROUPED_KEY: _File()}

    def update(self, fleet: Fleet, changed: Iterable[str] | None = None) -> set[str]:
        """Adopt ``fleet`` (``changed``: the cluster names that may differ from the last
        fleet; None: any) and return the files whose text changed or that went away.

        Raises ``ZoneError`` if a cluster does not render; nothing changes then.
        """
        settings_changed = fleet.settings != self._settings
        if changed is None or settings_changed:
            names: set[str] = set(fleet.clusters) | set(self._pieces)
        else:
            names = set(changed)
        # Render first, so a ZoneError leaves the state as it was.
        updates: dict[str, tuple[ClusterEndpoints, Hashable] | None] = {}
        for name in names:
            cluster = fleet.clusters.get(name)
            if cluster is None:
                if name in self._pieces:
                    updates[name] = None
                continue
            inputs: Hashable = (zone_inputs(cluster), fleet.settings.thanos_endpoints_port_name)
            if not settings_changed and self._inputs.get(name) == inputs:
                continue
            updates[name] = (cluster_endpoints(cluster, fleet.settings), inputs)
        had_groups = self._has_groups()
        # The first fleet creates all.yaml, even an empty one.
        dirty: set[str] = {ALL_KEY} if self._settings is None else set()
        for name, update in updates.items():
            old = self._pieces.pop(name, None)
            if old is not None:
                self._inputs.pop(name)
                for key in old.keys:
                    self._files[key].drop(name)
                    dirty.add(key)
            if update is None:
                continue
            piece, inputs = update
            self._pieces[name] = piece
            self._inputs[name] = inputs
            for key in piece.keys:
                self._files.setdefault(key, _File()).put(name, piece.lines)
                dirty.add(key)
        for key in [k for k in dirty if k.startswith(GROUP_PREFIX)]:
            if not self._files[key].names:
                del self._files[key]
        if had_groups != self._has_groups():
            dirty.add(UNGROUPED_KEY)
        self._settings = fleet.settings
        return dirty

    def _has_groups(self) -> bool:
        return len(self._files) > 2

    def keys(self) -> list[str]:
        """The files that exist now, sorted."""
        return sorted(k for k in self._files if k != UNGROUPED_KEY or self._has_groups())

    def text(self, key: str) -> str | None:
        """The text of file ``key``, or None if it does not exist (any more)."""
        if key not in self._files or (key == UNGROUPED_KEY and not self._has_groups()):
            return None
        return render(self._files[key].lines)

    def files(self) -> dict[str, str]:
        return {key: render(self._files[key].lines) for key in self.keys()}

    def endpoint_counts(self) -> dict[str, int]:
        """How many endpoints each file lists."""
        return {key: self._files[key].endpoints for key in self.keys()}


def configmap_of(key: str, settings: Settings) -> str:
    """Which ConfigMap file ``key`` goes to."""
    name = settings.thanos_endpoints_configmap_name
    return name if key == ALL_KEY else name + GROUPS_CONFIGMAP_SUFFIX


def configmap_names(settings: Settings) -> tuple[str, str]:
    name = settings.thanos_endpoints_configmap_name
    return (name, name + GROUPS_CONFIGMAP_SUFFIX)


def configmaps(settings: Settings, files: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """The ConfigMaps (server-side apply bodies) holding ``files``, by name. The groups
    ConfigMap exists (possibly empty) so that a Thanos Query mounting it can start."""
    data: dict[str, dict[str, str]] = {n: {} for n in configmap_names(settings)}
    for key, text in files.items():
        data[configmap_of(key, settings)][key] = text
    return {
        name: {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {
                "name": name,
                "namespace": settings.namespace,
                "labels": {MANAGED_BY_LABEL: MANAGED_BY_VALUE},
            },
            "data": dict(sorted(entries.items())),
        }
        for name, entries in data.items()
    }


def data_bytes(data: Mapping[str, str]) -> int:
    """What a ConfigMap's ``data`` counts against its size limit (keys and values)."""
    return sum(len(k.encode()) + len(v.encode()) for k, v in data.items())
