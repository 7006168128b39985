"""The ConfigMap mirror of the zone against a real kube-apiserver.

The mirror (``atlas-coredns``, key ``atlas.zone``) follows the file; a writer that
starts on an empty directory (a new pod: the zone lives on an emptyDir) continues the
serial above the one the ConfigMap remembers; a deleted ConfigMap is recreated; and an
API server that goes away and comes back only delays the mirror, never the file.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from atlasd.dns.writer import ZONE_KEY, Zone, run_zone_writer
from atlasd.dns.zone import parse_serial
from atlasd.kube.client import KubeClient
from atlasd.kube.config import load_config
from atlasd.kube.errors import KubeError, NotFound
from atlasd.kube.resources import CONFIGMAPS
from atlasd.model import DownstreamCluster, Fleet, ServicePort, Settings
from tests.harness.feed import fed
from tests.harness.kube import ApiServer
from tests.harness.wait import wait_until_async

pytestmark = pytest.mark.integration


def fleet(settings: Settings, *names: str) -> Fleet:
    return Fleet.of(
        settings,
        tuple(
            DownstreamCluster(
                name=n, external_ip="203.0.113.1", ports=(ServicePort("thanos", 10901),)
            )
            for n in names
        ),
    )


@asynccontextmanager
async def writer(
    path: Path, kube: KubeClient, settings: Settings, **kw: Any
) -> AsyncIterator[tuple[Callable[[Fleet], Any], list[Zone]]]:
    """The zone writer mirroring into the API server; a push does not wait."""
    async with fed(
        run_zone_writer, callback="on_zone", path=path, kube=kube, settings=settings, **kw
    ) as w:
        yield w.send.send, w.seen


async def mirrored(kube: KubeClient, settings: Settings) -> str | None:
    try:
        cm = await kube.get(CONFIGMAPS, settings.dns_configmap_name, namespace=settings.namespace)
    except NotFound:
        return None
    return str(cm.get("data", {}).get(ZONE_KEY))


async def test_configmap_follows_the_file_and_carries_the_serial(
    apiserver: ApiServer, namespace: str, tmp_path: Path
) -> None:
    settings = Settings(namespace=namespace, dns_configmap_name="zone-mirror")
    path = tmp_path / "pod1" / "atlas.zone"
    path.parent.mkdir()
    async with KubeClient(load_config(str(apiserver.admin_kubeconfig))) as kube:

        async def mirror_is_file() -> bool:
            return path.exists() and await mirrored(kube, settings) == path.read_text()

        async with writer(path, kube, settings) as (push, _):
            await push(fleet(settings, "east"))
            await wait_until_async(mirror_is_file, timeout=30, what="ConfigMap = file")
            await push(fleet(settings, "east", "west"))
            await wait_until_async(mirror_is_file, timeout=30, what="ConfigMap = file, 2")
        cm = await kube.get(CONFIGMAPS, "zone-mirror", namespace=namespace)
        assert cm["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "atlasd"
        serial = parse_serial(path.read_text())
        assert serial is not None

        # A new pod: empty zone directory, a clock an hour behind. The serial continues
        # from the ConfigMap, and the zone is rewritten there and in the file.
        path2 = tmp_path / "pod2" / "atlas.zone"
        path2.parent.mkdir()
        async with writer(path2, kube, settings, clock=lambda: float(serial - 3600)) as (
            push,
            written,
        ):
            await push(fleet(settings, "east", "west"))
        assert written[0].serial == serial + 1
        assert await mirrored(kube, settings) == path2.read_text()

        # Deleted by hand: the next writer puts it back even though the file is current.
        await kube.delete(CONFIGMAPS, "zone-mirror", namespace=namespace)
        async with writer(path2, kube, settings) as (push, written):
            await push(fleet(settings, "east", "west"))
        assert [z.serial for z in written] == [serial + 1]  # reported as found, not rewritten
        assert await mirrored(kube, settings) == path2.read_text()


async def test_apiserver_outage_delays_only_the_mirror(
    apiserver: ApiServer, namespace: str, tmp_path: Path
) -> None:
    settings = Settings(namespace=namespace)
    path = tmp_path / "atlas.zone"
    async with KubeClient(load_config(str(apiserver.admin_kubeconfig))) as kube:
        async with writer(path, kube, settings) as (push, written):
            await push(fleet(settings, "east"))
            await wait_until_async(
                lambda: _equal(kube, settings, path), timeout=30, what="first mirror"
            )
            await trio.to_thread.run_sync(apiserver.stop_apiserver)
            try:
                await push(fleet(settings, "east", "west"))
                # The file does not wait for the API server.
                await wait_until_async(
                    lambda: "west-thanos-sidecar0" in path.read_text(),
                    timeout=10,
                    what="file written while the API server is down",
                )
                with pytest.raises(KubeError):
                    await mirrored(kube, settings)
            finally:
                await trio.to_thread.run_sync(apiserver.start_apiserver)
            await wait_until_async(
                lambda: _equal(kube, settings, path), timeout=90, what="mirror caught up"
            )
        assert len(written) == 2


async def _equal(kube: KubeClient, settings: Settings, path: Path) -> bool:
    try:
        return await mirrored(kube, settings) == path.read_text()
    except KubeError:
        return False
