"""Informers against a real kube-apiserver: bursts, restarts, compaction (410)."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import trio

from atlasd.kube.client import KubeClient
from atlasd.kube.config import load_config
from atlasd.kube.resources import CONFIGMAPS, SECRETS, SERVICES, ApiResource
from atlasd.watch.backoff import Backoff
from atlasd.watch.informer import Change, Informer, all_synced, run_informers
from tests.harness.kube import ApiServer
from tests.harness.wait import wait_until_async

pytestmark = pytest.mark.integration


def _cm(namespace: str, name: str, value: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name, "namespace": namespace, "labels": {"burst": "yes"}},
        "data": {"v": value},
    }


def _rvs(objs: dict[str, dict[str, Any]]) -> dict[str, str]:
    return {k: v["metadata"]["resourceVersion"] for k, v in objs.items()}


async def _fresh(kube: KubeClient, res: ApiResource, namespace: str) -> dict[str, str]:
    items, _ = await kube.list(res, namespace=namespace)
    return {i["metadata"]["name"]: i["metadata"]["resourceVersion"] for i in items}


async def _each(limit: int, fn: Any, args: list[Any]) -> None:
    sem = trio.Semaphore(limit)

    async def one(a: Any) -> None:
        async with sem:
            await fn(a)

    async with trio.open_nursery() as nursery:
        for a in args:
            nursery.start_soon(one, a)


class Gate:
    """A loopback TCP proxy to the API server that the test can cut (an outage as the
    informer sees it) while the real API server restarts and changes happen behind it."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.open = True
        self.port = 0
        self._scopes: set[trio.CancelScope] = set()

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, client: trio.SocketStream) -> None:
        if not self.open:
            await client.aclose()
            return
        with trio.CancelScope() as scope:
            self._scopes.add(scope)
            try:
                upstream = await trio.open_tcp_stream("127.0.0.1", self.target_port)
            except OSError:
                await client.aclose()
                return
            async with client, upstream, trio.open_nursery() as nursery:
                nursery.start_soon(self._pump, client, upstream, nursery.cancel_scope)
                nursery.start_soon(self._pump, upstream, client, nursery.cancel_scope)
        self._scopes.discard(scope)

    @staticmethod
    async def _pump(src: trio.SocketStream, dst: trio.SocketStream, done: trio.CancelScope) -> None:
        try:
            while data := await src.receive_some(65536):
                await dst.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        done.cancel()

    def cut(self) -> None:
        self.open = False
        for scope in list(self._scopes):
            scope.cancel()

    def restore(self) -> None:
        self.open = True


async def test_burst_of_1000_changes_reaches_the_cache(
    apiserver: ApiServer, namespace: str
) -> None:
    async with KubeClient(load_config(str(apiserver.admin_kubeconfig))) as kube:
        inf = Informer(kube, CONFIGMAPS, namespace=namespace, label_selector="burst=yes")
        last: dict[str, str] = {}

        def record(change: Change) -> None:
            last[change.key] = change.type

        inf.subscribe(record)
        async with trio.open_nursery() as nursery:
            await nursery.start(inf.run)
            assert inf.items() == {}
            names = [f"cm-{i}" for i in range(500)]
            await _each(50, lambda n: kube.create(_cm(namespace, n, "v1")), names)
            await _each(50, lambda n: kube.apply(_cm(namespace, n, "v2")), names[:250])
            await _each(50, lambda n: kube.delete(CONFIGMAPS, n, namespace=namespace), names[250:])
            await wait_until_async(
                lambda: (
                    sorted(inf.items()) == sorted(names[:250])
                    and all(o["data"] == {"v": "v2"} for o in inf.items().values())
                ),
                timeout=60,
                what="the cache to reflect 1000 changes",
            )
            fresh = await _fresh(kube, CONFIGMAPS, namespace)
            assert _rvs(inf.items()) == fresh
            assert {k for k, t in last.items() if t == "DELETED"} == set(names[250:])
            assert inf.lists == 1  # no relist was needed
            nursery.cancel_scope.cancel()


async def test_watch_survives_an_api_server_restart(apiserver: ApiServer, namespace: str) -> None:
    async with KubeClient(load_config(str(apiserver.admin_kubeconfig))) as kube:
        for i in range(5):
            await kube.create(_cm(namespace, f"before-{i}", "x"))
        inf = Informer(kube, CONFIGMAPS, namespace=namespace, backoff=Backoff(initial=0.2, cap=2.0))
        async with trio.open_nursery() as nursery:
            await nursery.start(inf.run)
            assert len(inf.items()) == 5
            await trio.to_thread.run_sync(apiserver.restart)
            await kube.create(_cm(namespace, "after", "y"))
            await kube.apply(_cm(namespace, "before-0", "changed"))
            await kube.delete(CONFIGMAPS, "before-1", namespace=namespace)
            fresh = await _fresh(kube, CONFIGMAPS, namespace)
            await wait_until_async(
                lambda: _rvs(inf.items()) == fresh, timeout=60, what="cache == fresh LIST"
            )
            assert inf.errors >= 1  # it did see the outage
            nursery.cancel_scope.cancel()


async def test_outage_with_restart_and_compaction_relists_to_the_truth(
    apiserver: ApiServer, namespace: str
) -> None:
    admin_cfg = load_config(str(apiserver.admin_kubeconfig))
    async with KubeClient(admin_cfg) as admin, trio.open_nursery() as nursery:
        gate = Gate(apiserver.port)
        await nursery.start(gate.serve)
        watched = dataclasses.replace(admin_cfg, server=f"https://127.0.0.1:{gate.port}")
        async with KubeClient(watched) as kube:
            names = [f"cm-{i}" for i in range(40)]
            await _each(20, lambda n: admin.create(_cm(namespace, n, "v1")), names)
            inf = Informer(
                kube, CONFIGMAPS, namespace=namespace, backoff=Backoff(initial=0.2, cap=2.0)
            )
            changes: list[Change] = []
            inf.subscribe(changes.append)
            await nursery.start(inf.run)
            assert len(inf.items()) == 40
            stale_rv = inf.resource_version

            gate.cut()
            await trio.to_thread.run_sync(apiserver.restart)
            # The burst during the outage: creates, updates, deletes.
            await _each(
                20,
                lambda n: admin.create(_cm(namespace, n, "new")),
                [f"new-{i}" for i in range(30)],
            )
            await _each(20, lambda n: admin.apply(_cm(namespace, n, "v2")), names[:15])
            await _each(
                20, lambda n: admin.delete(CONFIGMAPS, n, namespace=namespace), names[15:30]
            )
            await trio.to_thread.run_sync(apiserver.compact_etcd)
            fresh = await _fresh(admin, CONFIGMAPS, namespace)
            assert len(fresh) == 40 + 30 - 15
            lists_before = inf.lists
            gate.restore()

            await wait_until_async(
                lambda: _rvs(inf.items()) == fresh, timeout=90, what="cache == fresh LIST"
            )
            assert inf.lists > lists_before  # 410 forced a relist
            assert inf.resource_version != stale_rv
            deleted = {c.key for c in changes if c.type == "DELETED"}
            assert deleted == set(names[15:30])  # nothing lost, nothing phantom
            assert all(inf.items()[n]["data"] == {"v": "v2"} for n in names[:15])
        nursery.cancel_scope.cancel()


async def test_readiness_waits_for_every_informer(apiserver: ApiServer, namespace: str) -> None:
    async with KubeClient(load_config(str(apiserver.admin_kubeconfig))) as kube:
        await kube.create(_cm(namespace, "one", "1"))
        informers = [
            Informer(kube, res, namespace=namespace) for res in (SERVICES, SECRETS, CONFIGMAPS)
        ]
        assert not all_synced(informers)
        async with trio.open_nursery() as nursery:
            await nursery.start(run_informers, informers)
            assert all_synced(informers)
            assert list(informers[2].items()) == ["one"]
            nursery.cancel_scope.cancel()


async def test_streaming_list_informer(apiserver: ApiServer, namespace: str) -> None:
    async with KubeClient(load_config(str(apiserver.admin_kubeconfig))) as kube:
        names = [f"s-{i}" for i in range(25)]
        await _each(10, lambda n: kube.create(_cm(namespace, n, "v1")), names)
        inf = Informer(kube, CONFIGMAPS, namespace=namespace, streaming_list=True)
        async with trio.open_nursery() as nursery:
            await nursery.start(inf.run)
            assert inf.streaming_list  # the server accepted it
            assert sorted(inf.items()) == sorted(names)
            await kube.create(_cm(namespace, "later", "x"))
            await kube.delete(CONFIGMAPS, "s-0", namespace=namespace)
            fresh = await _fresh(kube, CONFIGMAPS, namespace)
            await wait_until_async(
                lambda: _rvs(inf.items()) == fresh, timeout=60, what="cache == fresh LIST"
            )
            assert inf.lists == 1 and inf.watches == 1  # one stream did it all
            nursery.cancel_scope.cancel()
