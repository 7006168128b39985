"""The applier and enrollment: an enrolled cluster's keys are never made nor stored; a
cluster switched to enrollment by annotation loses the keys atlasd stored for it."""

from __future__ import annotations

import copy
import datetime as dt

import yaml

from atlasd import labels
from atlasd.kube.secrets import secret_data
from atlasd.model import Settings
from atlasd.reconcile import enrolled
from tests.harness.reconcile import leader
from tests.unit.fakekube import FakeKube, live_with
from tests.unit.reconcile.builders import cluster_service
from tests.unit.reconcile.pkitools import CountingKeys

NOW = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
S = Settings(enroll_address="atlasd.example:6307")
ENROLL = {labels.ENROLLMENT_ANNOTATION: "true"}


def _values(kube: FakeKube, cluster: str) -> bytes:
    stored = kube.get_stored("secrets", labels.values_secret_name(cluster))
    assert stored is not None
    return secret_data(stored)["values.yaml"]


async def test_an_enrolled_cluster_gets_values_without_keys_and_no_identity() -> None:
    kube = await live_with(
        cluster_service("east", "203.0.113.1", annotations=ENROLL),
        cluster_service("west", "203.0.113.2"),
    )
    async with leader(kube, S, now=NOW, keys=CountingKeys(), post_event=kube.post_event) as run:
        result = await run.settle()
        assert not [i for i in result.issued if i.startswith("east/")]
        assert kube.get_stored("secrets", "east-atlas-identity") is None
        assert kube.get_stored("secrets", "west-atlas-identity") is not None
        raw = _values(kube, "east")
        assert b"-----BEGIN" not in raw
        assert yaml.safe_load(raw)["agent"]["server"] == "atlasd.example:6307"
        assert kube.events == []
        kube.writes.clear()
        assert (await run.settle()).writes == 0 and kube.writes == []


async def test_switching_to_enrollment_deletes_the_stored_keys_and_says_so() -> None:
    kube = await live_with(cluster_service("east", "203.0.113.1"))
    async with leader(kube, S, now=NOW, keys=CountingKeys(), post_event=kube.post_event) as run:
        await run.settle()
        stored = kube.get_stored("secrets", "east-atlas-identity")
        assert stored is not None
        identity = secret_data(stored)
        assert b"PRIVATE KEY" in _values(kube, "east")
        svc = copy.deepcopy(kube.get_stored("services", "east"))
        assert svc is not None
        svc["metadata"]["annotations"] = dict(ENROLL)
        kube.put(svc)
        result = await run.settle()
        assert result.deleted == 1 and result.issued == () and result.events == 1
        assert kube.get_stored("secrets", "east-atlas-identity") is None
        assert b"-----BEGIN" not in _values(kube, "east")
        ((ref, reason, message),) = kube.events
        assert (ref.name, reason) == ("east", "KeysDeleted")
        assert "east-atlas-identity" in message and "atlasd cluster token east" in message
        # The deleted keys' certificates (copies of the old values hold the keys) stay
        # known, so `atlasd cluster revoke east` still reaches them; no key is kept.
        record = kube.get_stored("secrets", enrolled.enrolled_secret_name("east"))
        assert record is not None
        kept = secret_data(record)
        assert sorted(kept.values()) == sorted([identity["server.crt"], identity["client.crt"]])
        assert not any(b"PRIVATE KEY" in pem for pem in kept.values())
        # And back: the compatible mode makes keys again.
        svc = copy.deepcopy(kube.get_stored("services", "east"))
        assert svc is not None
        svc["metadata"]["annotations"] = {labels.ENROLLMENT_ANNOTATION: "false"}
        kube.put(svc)
        result = await run.settle()
        assert set(result.issued) == {"east/server", "east/client"}
        assert b"PRIVATE KEY" in _values(kube, "east")


async def test_without_an_enroll_address_the_values_say_nothing_and_an_event_says_why() -> None:
    kube = await live_with(cluster_service("east", "203.0.113.1", annotations=ENROLL))
    async with leader(
        kube, Settings(), now=NOW, keys=CountingKeys(), post_event=kube.post_event
    ) as run:
        await run.settle()
        assert yaml.safe_load(_values(kube, "east"))["agent"]["server"] == ""
        ((ref, reason, message),) = kube.events
        assert (ref.name, reason) == ("east", "EnrollAddressMissing")
        assert "--enroll-address" in message
        assert (await run.settle()).events == 0  # once while it lasts


async def test_a_bad_annotation_protects_the_cluster() -> None:
    kube = await live_with(cluster_service("east", "203.0.113.1"))
    async with leader(kube, S, now=NOW, keys=CountingKeys(), post_event=kube.post_event) as run:
        await run.settle()
        svc = copy.deepcopy(kube.get_stored("services", "east"))
        assert svc is not None
        svc["metadata"]["annotations"] = {labels.ENROLLMENT_ANNOTATION: "True"}
        kube.put(svc)
        kube.writes.clear()
        result = await run.settle()
        assert kube.writes == [] and kube.get_stored("secrets", "east-atlas-identity")
        ((ref, reason, message),) = kube.events
        assert (ref.name, reason) == ("east", "InvalidCluster")
        assert labels.ENROLLMENT_ANNOTATION in message
        assert [p.field for p in result.problems] == [
            f'metadata.annotations["{labels.ENROLLMENT_ANNOTATION}"]'
        ]
