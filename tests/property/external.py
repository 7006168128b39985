"""The real judges of a sample of each run's outputs: BIND's named-checkzone, Envoy.

Generated examples produce many zones and Envoy configurations; running a process for
each would dominate the run. ``ExternalChecks`` keeps the distinct ones (by content),
picks a sample — the first of each *bucket* (a coarse shape the caller names: IPv6 or
not, replicas, template, ...), the rest by a seeded reservoir — and runs the checks on
two worker threads while the examples go on. ``finish`` waits and reports every
rejection with the input that produced it.

An Envoy snapshot is checked as a static bootstrap (``static_bootstrap``): its
listeners, clusters and secrets inline, each HTTP connection manager's RDS reference
replaced by the route configuration it names (its SRDS subscription by the static list of
its scopes, ``<name>/...``), each EDS cluster made static with its endpoint assignment
inline, and every SDS reference pointed at the static secret of that name (an enrolled
node's, which come from its agent's files, stood for by ``agent_secrets``).
``envoy --mode validate`` then builds the whole server
(listeners, clusters, TLS contexts from the PEM material) without opening a socket.

The zone check is ``named-checkzone -k fail -i local atlas. FILE``: ``-k fail`` makes a
name that is not a valid host name an error; ``-i local`` keeps every integrity check
but the out-of-zone address lookups of SRV targets (cluster-local names that cannot
resolve here; each lookup would wait out a resolver timeout).
"""

from __future__ import annotations

import hashlib
import json
import random
import subprocess
import threading
from collections.abc import Callable, Hashable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from envoy.config.bootstrap.v3 import bootstrap_pb2
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2, scoped_route_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from google.protobuf import descriptor_pool, message, message_factory

from tests.harness import components
from tests.harness.envoy import envoy_binary
from tests.property.pipeline import (
    CLUSTER,
    ENDPOINT,
    LISTENER,
    ROUTE,
    SCOPED_ROUTE,
    SECRET,
    Snapshot,
    agent_secrets,
)

_SDS = secret_pb2.SdsSecretConfig.DESCRIPTOR.full_name
_HCM = hcm_pb2.HttpConnectionManager.DESCRIPTOR.full_name
_ANY = "google.protobuf.Any"


def _is_repeated(fd: Any) -> bool:
    flag = getattr(fd, "is_repeated", None)
    return bool(flag) if flag is not None else bool(fd.label == fd.LABEL_REPEATED)


Scopes = Mapping[str, scoped_route_pb2.ScopedRouteConfiguration]


def _rewrite(
    msg: message.Message, routes: Mapping[str, route_pb2.RouteConfiguration], scopes: Scopes
) -> None:
    """Inline RDS and SRDS and point SDS at static secrets, everywhere inside ``msg``."""
    name = msg.DESCRIPTOR.full_name
    if name == _HCM and msg.HasField("rds"):  # type: ignore[attr-defined]
        rc = routes[msg.rds.route_config_name]  # type: ignore[attr-defined]
        msg.route_config.CopyFrom(rc)  # type: ignore[attr-defined]
    if name == _HCM and msg.HasField("scoped_routes"):  # type: ignore[attr-defined]
        sr = msg.scoped_routes  # type: ignore[attr-defined]
        mine = [s for n, s in sorted(scopes.items()) if n.startswith(f"{sr.name}/")]
        if mine:
            sr.ClearField("scoped_rds")
            sr.scoped_route_configurations_list.scoped_route_configurations.extend(mine)
        else:
            # No scope yet (no cluster): over SRDS every request finds none and gets a
            # 404. A static list must hold at least one scope, so the static form of
            # that is a route configuration with no virtual host.
            msg.route_config.name = sr.name  # type: ignore[attr-defined]
    if name == _SDS:
        # Over ADS, or from an enrolled node's agent files: the static secret of that name
        # (``static_bootstrap`` adds what the files would hold).
        msg.ClearField("sds_config")
        return
    for fd, value in msg.ListFields():
        if fd.message_type is None:
            continue
        if fd.message_type.GetOptions().map_entry:
            vd = fd.message_type.fields_by_name["value"]
            items = list(value.values()) if vd.message_type is not None else []
        elif _is_repeated(fd):
            items = list(value)
        else:
            items = [value]
        for item in items:
            if item.DESCRIPTOR.full_name == _ANY:
                type_name = item.type_url.rsplit("/", 1)[-1]
                desc = descriptor_pool.Default().FindMessageTypeByName(type_name)
                inner = message_factory.GetMessageClass(desc)()
                item.Unpack(inner)
                _rewrite(inner, routes, scopes)
                item.Pack(inner)
            else:
                _rewrite(item, routes, scopes)


def static_bootstrap(snapshot: Snapshot) -> bytes:
    """A binary ``Bootstrap`` holding ``snapshot``'s resources statically."""
    routes = {
        name: route_pb2.RouteConfiguration.FromString(r.body)
        for name, r in snapshot.of_type(ROUTE).items()
    }
    scopes = {
        name: scoped_route_pb2.ScopedRouteConfiguration.FromString(r.body)
        for name, r in snapshot.of_type(SCOPED_ROUTE).items()
    }
    boot = bootstrap_pb2.Bootstrap()
    boot.node.id = snapshot.node
    boot.node.cluster = "atlas"
    for r in snapshot.of_type(LISTENER).values():
        lst = listener_pb2.Listener.FromString(r.body)
        _rewrite(lst, routes, scopes)
        boot.static_resources.listeners.append(lst)
    for r in snapshot.of_type(CLUSTER).values():
        cl = cluster_pb2.Cluster.FromString(r.body)
        _rewrite(cl, routes, scopes)
        if cl.type == cluster_pb2.Cluster.EDS:
            eds = snapshot.of_type(ENDPOINT)[cl.name]
            cl.ClearField("eds_cluster_config")
            cl.type = cluster_pb2.Cluster.STATIC
            cl.load_assignment.ParseFromString(eds.body)
        boot.static_resources.clusters.append(cl)
    for r in snapshot.of_type(SECRET).values():
        boot.static_resources.secrets.append(secret_pb2.Secret.FromString(r.body))
    if snapshot.node != "atlas" and not snapshot.of_type(SECRET):
        # An enrolled node: its secrets come from its agent's files, not from atlasd.
        for body in agent_secrets():
            boot.static_resources.secrets.append(secret_pb2.Secret.FromString(body))
    return bytes(boot.SerializeToString(deterministic=True))


def envoy_validate(path: Path) -> str | None:
    """None when Envoy accepts the bootstrap at ``path``, else what it said."""
    proc = subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(path), "-l", "error"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if proc.returncode == 0 and " OK" in proc.stdout:
        return None
    return (proc.stdout + proc.stderr)[-3000:]


def checkzone(path: Path) -> str | None:
    """None when named-checkzone accepts the zone at ``path``, else what it said."""
    proc = subprocess.run(
        [str(components.apt("named-checkzone")), "-k", "fail", "-i", "local", "atlas.", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if proc.returncode == 0 and proc.stdout.rstrip().endswith("OK"):
        return None
    return (proc.stdout + proc.stderr)[-3000:]


@dataclass
class _Kind:
    """One kind of output (zones, Envoy configs) and its sampling state."""

    what: str
    check: Callable[[Path], str | None]
    suffix: str
    limit: int | None  # None: check every distinct output
    seen: set[str] = field(default_factory=set)
    buckets: set[Hashable] = field(default_factory=set)
    reservoir: list[tuple[str, Callable[[], bytes], str]] = field(default_factory=list)
    offered: int = 0
    submitted: int = 0


@dataclass(frozen=True)
class Rejection:
    what: str
    output: Path
    origin: Path
    said: str

    def __str__(self) -> str:
        return f"{self.what} rejected {self.output} (input: {self.origin}):\n{self.said}"


class ExternalChecks:
    """Distinct outputs in, a sample checked by the real tools, rejections out."""

    def __init__(
        self,
        workdir: Path,
        *,
        zones: int | None,
        envoys: int | None,
        seed: int = 0,
        workers: int = 2,
    ) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self._rng = random.Random(seed)
        self._pool = ThreadPoolExecutor(max_workers=workers)
        self._lock = threading.Lock()
        self._futures: list[Future[Rejection | None]] = []
        self.kinds = {
            "zone": _Kind("named-checkzone", checkzone, ".zone", zones),
            "envoy": _Kind("envoy --mode validate", envoy_validate, ".pb", envoys),
        }
        self._n = 0

    def offer_zone(self, text: str, *, bucket: Hashable, origin: Any) -> None:
        self._offer("zone", text.encode(), lambda: text.encode(), bucket, origin)

    def offer_snapshot(self, snap: Snapshot, *, bucket: Hashable, origin: Any) -> None:
        key = json.dumps([snap.node, sorted(snap.versions.items())]).encode()
        self._offer(
            "envoy", key, lambda: static_bootstrap(snap), (snap.node == "atlas", bucket), origin
        )

    def _offer(
        self, kind: str, key: bytes, make: Callable[[], bytes], bucket: Hashable, origin: Any
    ) -> None:
        k = self.kinds[kind]
        digest = hashlib.blake2b(key, digest_size=12).hexdigest()
        if digest in k.seen:
            return
        k.seen.add(digest)
        k.offered += 1
        origin_text = json.dumps(origin, default=repr, indent=1)
        if k.limit is None or (bucket not in k.buckets and len(k.buckets) < k.limit // 2):
            k.buckets.add(bucket)
            self._submit(k, make(), origin_text)
            return
        # Reservoir sampling over the rest (the buckets' half is already spent).
        room = k.limit - len(k.buckets)
        if len(k.reservoir) < room:
            k.reservoir.append((digest, make, origin_text))
        else:
            j = self._rng.randrange(k.offered)
            if j < room:
                k.reservoir[j] = (digest, make, origin_text)

    def _submit(self, k: _Kind, body: bytes, origin_text: str) -> None:
        with self._lock:
            self._n += 1
            n = self._n
        out = self.workdir / f"{n:06d}{k.suffix}"
        out.write_bytes(body)
        origin = self.workdir / f"{n:06d}.input.json"
        origin.write_text(origin_text)
        k.submitted += 1

        def job() -> Rejection | None:
            said = k.check(out)
            if said is None:
                out.unlink()
                origin.unlink()
                return None
            return Rejection(k.what, out, origin, said)

        self._futures.append(self._pool.submit(job))

    def finish(self) -> list[Rejection]:
        """Check the reservoirs too, wait for every check; the rejections."""
        for k in self.kinds.values():
            for _, make, origin_text in k.reservoir:
                self._submit(k, make(), origin_text)
            k.reservoir.clear()
        rejections = [r for f in self._futures if (r := f.result()) is not None]
        self._pool.shutdown()
        return rejections

    def summary(self) -> dict[str, dict[str, int]]:
        return {
            name: {"distinct": k.offered, "checked": k.submitted} for name, k in self.kinds.items()
        }
