"""The zone writer: atomic writes, only on change, coalescing, serial across restarts."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from atlasd.dns import writer
from atlasd.dns.answer import Answer, answer_bytes
from atlasd.dns.writer import (
    ZONE_KEY,
    Zone,
    ZoneState,
    configmap,
    run_zone_writer,
)
from atlasd.dns.zone import SrvRecord, name_server, parse_serial, records, render_zone
from atlasd.files import write_atomic
from atlasd.kube.errors import Forbidden, ServerError
from atlasd.model import DownstreamCluster, Fleet, ServicePort, Settings
from tests.unit.fakekube import FakeKube

SETTINGS = Settings(namespace="obs")
NOW = 1_764_000_000.0


def fleet(*names: str, replicas: int = 1, group: str | None = None) -> Fleet:
    return Fleet.of(
        SETTINGS,
        tuple(
            DownstreamCluster(
                name=n,
                external_ip="192.0.2.1",
                ports=(ServicePort("thanos", 10901),),
                replicas=replicas,
                dns_group=group,
            )
            for n in names
        ),
    )


def api_error(cls: type[Exception], code: int) -> Exception:
    return cls(status=code, reason=cls.__name__, message="", verb="x", resource="configmaps")  # type: ignore[call-arg]


def with_zone(text: str | None = None) -> FakeKube:
    """A fake API whose zone ConfigMap holds ``text`` (None: there is none)."""
    kube = FakeKube()
    if text is not None:
        kube.put(configmap(SETTINGS, text))
    return kube


def stored_zone(kube: FakeKube) -> str | None:
    cm = kube.get_stored("configmaps", SETTINGS.dns_configmap_name)
    return None if cm is None else str(cm["data"][ZONE_KEY])


class Clock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def start_writer(
    nursery: trio.Nursery,
    fleets: trio.MemoryReceiveChannel[Fleet],
    path: Path,
    written: list[Zone],
    *,
    kube: FakeKube | None = None,
    clock: Clock | None = None,
) -> ZoneState:
    """Start a writer on ``fleets`` in ``nursery``; what it writes goes to ``written``."""
    state: ZoneState = await nursery.start(
        lambda task_status: run_zone_writer(
            fleets=fleets,
            path=path,
            kube=kube,
            settings=SETTINGS,
            clock=clock or Clock(),
            on_zone=written.append,
            task_status=task_status,
        )
    )
    return state


async def run_writer(
    path: Path,
    fleets_to_send: list[Fleet],
    *,
    kube: FakeKube | None = None,
    clock: Clock | None = None,
) -> tuple[list[Zone], ZoneState]:
    """Run a writer over ``fleets_to_send`` (sent as a burst), return what it wrote."""
    written: list[Zone] = []
    send, recv = trio.open_memory_channel[Fleet](len(fleets_to_send) + 1)
    for f in fleets_to_send:
        send.send_nowait(f)
    send.close()
    async with trio.open_nursery() as nursery:
        state = await start_writer(nursery, recv, path, written, kube=kube, clock=clock)
    if kube is not None:
        # The mirror reads and writes only its ConfigMap, in atlasd's namespace.
        where = {(plural, ns, name) for _, plural, ns, name in kube.calls}
        assert where <= {("configmaps", SETTINGS.namespace, SETTINGS.dns_configmap_name)}
    return written, state


def test_write_atomic(tmp_path: Path) -> None:
    path = tmp_path / "atlas.zone"
    write_atomic(path, "one\n")
    write_atomic(path, "two\n")
    assert path.read_text() == "two\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert os.listdir(tmp_path) == ["atlas.zone"]  # no temp files left behind


def test_write_atomic_failure_leaves_old_file_and_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "atlas.zone"
    write_atomic(path, "old\n")
    with pytest.raises(UnicodeEncodeError):
        write_atomic(path, "bad \udcff surrogate\n")
    assert path.read_text() == "old\n"
    assert os.listdir(tmp_path) == ["atlas.zone"]


async def test_burst_is_coalesced_into_one_write(tmp_path: Path) -> None:
    path = tmp_path / "atlas.zone"
    burst = [fleet(*(f"c{j}" for j in range(i))) for i in range(1, 101)]
    written, state = await run_writer(path, burst)
    assert len(written) == 1
    assert path.read_text() == written[0].text
    assert len(written[0].records) == 100
    assert state.serial == int(NOW)


@pytest.mark.parametrize(("queued", "until"), [(0, 0.09), (2, 1.0)])
async def test_a_pass_with_changes_queued_behind_it_waits_the_interval(
    autojump_clock: trio.testing.MockClock, queued: int, until: float
) -> None:
    """A pass (10 ms of CPU) that finds nothing queued pauses its share (90 ms): a change
    after it, however soon, goes at once. With changes already queued (a burst, e.g.
    onboarding) the next pass begins a second after this one did: each rewrites the whole
    file, and CoreDNS reads it once a second."""
    send, recv = trio.open_memory_channel[Fleet](10)
    for _ in range(queued):
        send.send_nowait(fleet("east"))
    started = trio.current_time()
    await writer.pace(recv, started=started, cpu=0.01)
    assert trio.current_time() - started == pytest.approx(until)


async def test_unchanged_records_do_not_rewrite(tmp_path: Path) -> None:
    path = tmp_path / "atlas.zone"
    written: list[Zone] = []
    send, recv = trio.open_memory_channel[Fleet](0)
    async with trio.open_nursery() as nursery:
        await start_writer(nursery, recv, path, written)
        async with send:
            await send.send(fleet("east"))
            # Same records, different cluster order / external IP: no write.
            await send.send(fleet("east"))
            await send.send(fleet("west", "east"))
            await send.send(fleet("east", "west"))
            await send.send(fleet("east", "west", replicas=2))
    assert [len(z.records) for z in written] == [1, 2, 4]
    assert [z.serial for z in written] == [int(NOW), int(NOW) + 1, int(NOW) + 2]


async def test_serial_grows_across_restart(tmp_path: Path) -> None:
    path = tmp_path / "atlas.zone"
    first, _ = await run_writer(path, [fleet("east")], clock=Clock(NOW))
    # Restarted with the clock behind (a different node, a stepped clock): still grows.
    second, state = await run_writer(path, [fleet("east", "west")], clock=Clock(NOW - 3600))
    assert second[0].serial == first[0].serial + 1
    assert parse_serial(path.read_text()) == state.serial == first[0].serial + 1


async def test_restart_with_same_records_keeps_file_and_serial(tmp_path: Path) -> None:
    path = tmp_path / "atlas.zone"
    first, _ = await run_writer(path, [fleet("east")], clock=Clock(NOW))
    before = path.stat()
    second, state = await run_writer(path, [fleet("east")], clock=Clock(NOW + 100))
    # Not rewritten: on_zone is told the zone found on disk, once.
    assert second == [state.current] and second[0].serial == first[0].serial
    assert state.serial == first[0].serial
    assert path.stat().st_ino == before.st_ino


async def test_invalid_fleet_is_skipped_and_last_zone_kept(tmp_path: Path) -> None:
    path = tmp_path / "atlas.zone"
    bad = fleet("evil\n@ 60 IN A 192.0.2.66")
    first, _ = await run_writer(path, [fleet("east")])
    good_text = path.read_text()
    written, state = await run_writer(path, [bad])
    assert written == []
    assert state.serial == first[0].serial
    assert path.read_text() == good_text
    assert "evil" not in good_text
    # And a writer whose burst ends in a good fleet writes it.
    written, _ = await run_writer(path, [bad, fleet("west")])
    assert "west-thanos-sidecar0" in path.read_text()


async def test_deletion_rewrites_the_zone(tmp_path: Path) -> None:
    path = tmp_path / "atlas.zone"
    await run_writer(path, [fleet("east", "west")])
    await run_writer(path, [fleet("east")])
    text = path.read_text()
    assert "east-thanos-sidecar0" in text
    assert "west-thanos-sidecar0" not in text
    await run_writer(path, [fleet()])
    assert " IN SRV " not in path.read_text()


async def test_configmap_mirror_and_serial_from_configmap(tmp_path: Path) -> None:
    path = tmp_path / "atlas.zone"
    # The pod restarted with an empty dir; the ConfigMap remembers a larger serial.
    remembered = f"atlas. 60 IN SOA a. b. {int(NOW) + 500} 1 2 3 4\n"
    kube = with_zone(remembered)
    written, _ = await run_writer(path, [fleet("east")], kube=kube)
    assert written[0].serial == int(NOW) + 501
    assert kube.applied == [configmap(SETTINGS, written[0].text)]
    cm = kube.applied[0]
    assert cm["metadata"]["name"] == "atlas-coredns"
    assert cm["metadata"]["namespace"] == "obs"
    assert cm["metadata"]["labels"] == {"app.kubernetes.io/managed-by": "atlasd"}


async def test_same_records_but_larger_serial_in_configmap_rewrites(tmp_path: Path) -> None:
    # The file is current but an earlier leader's mirror went further: never hand the
    # mirror a smaller serial than it had.
    path = tmp_path / "atlas.zone"
    first, _ = await run_writer(path, [fleet("east")])
    ahead = first[0].text.replace(f" {first[0].serial} ", f" {first[0].serial + 9} ")
    kube = with_zone(ahead)
    again, _ = await run_writer(path, [fleet("east")], kube=kube)
    assert [z.serial for z in again] == [first[0].serial + 10]
    assert stored_zone(kube) == path.read_text() == again[0].text


async def test_configmap_mirror_retries_server_errors(tmp_path: Path, autojump_clock: Any) -> None:
    path = tmp_path / "atlas.zone"
    kube = FakeKube()
    kube.fail_next = [api_error(ServerError, 500), api_error(ServerError, 503)]
    written, _ = await run_writer(path, [fleet("east")], kube=kube)
    assert [a["data"][ZONE_KEY] for a in kube.applied] == [written[0].text]


async def test_configmap_mirror_catches_up_when_file_is_current(tmp_path: Path) -> None:
    path = tmp_path / "atlas.zone"
    written, _ = await run_writer(path, [fleet("east")])
    kube = with_zone(None)  # e.g. the ConfigMap was deleted
    again, _ = await run_writer(path, [fleet("east")], kube=kube)
    assert [z.serial for z in again] == [written[0].serial]  # the file's, not rewritten
    assert stored_zone(kube) == written[0].text


async def test_a_zone_too_large_for_a_configmap_is_reported_once_per_stretch(
    tmp_path: Path, autojump_clock: Any, caplog: pytest.LogCaptureFixture, monkeypatch: Any
) -> None:
    """Above a ConfigMap's size the mirror is skipped with one error, not one per fleet (the
    writer hands over the current text on every fleet, changed or not); once the zone fits
    again it is applied, and a later too-large zone is reported again."""
    small = ZoneState(previous_text=None, previous_serial=None).next_zone(fleet("a"))
    big = ZoneState(previous_text=None, previous_serial=None).next_zone(fleet(*"abcdefgh"))
    assert small is not None and big is not None
    monkeypatch.setattr(writer, "MAX_CONFIGMAP_ZONE_BYTES", len(small.text) + 10)
    kube = FakeKube()
    latest = writer.Latest[str]()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer._mirror, kube, SETTINGS, latest, None)
        texts = (big.text, big.text, big.text + "\n", small.text, big.text, small.text, big.text)
        for text in texts:
            latest.put(text)
            await trio.sleep(2 * writer.MIRROR_INTERVAL)
        latest.close()
    assert [a["data"][ZONE_KEY] for a in kube.applied] == [small.text]
    errors = [r for r in caplog.records if "more than a ConfigMap holds" in r.getMessage()]
    assert len(errors) == 3


async def test_configmap_forbidden_propagates(tmp_path: Path) -> None:
    kube = FakeKube()
    kube.fail_next = [api_error(Forbidden, 403)]
    with pytest.RaisesGroup(Forbidden, flatten_subgroups=True):
        await run_writer(tmp_path / "atlas.zone", [fleet("east")], kube=kube)


_SIZES = st.dictionaries(
    st.sampled_from([f"c{i}" for i in range(8)]),
    st.tuples(st.integers(1, 3), st.sampled_from([None, "g1", "g2"])),
    max_size=8,
)


@settings(max_examples=200, deadline=None)
@given(steps=st.lists(st.tuples(_SIZES, st.booleans()), min_size=1, max_size=8))
def test_kept_body_and_count_match_a_full_render(
    steps: list[tuple[dict[str, tuple[int, str | None]], bool]],
) -> None:
    """Clusters come, go and change their record count (replicas, a group); whether told
    which keys changed or not, each zone is what rendering the whole fleet gives."""
    state = ZoneState(previous_text=None, previous_serial=None, clock=Clock())
    before: dict[str, tuple[int, str | None]] = {}
    for sizes, told in steps:
        f = Fleet.of(
            SETTINGS,
            tuple(
                DownstreamCluster(
                    name=n,
                    external_ip="192.0.2.1",
                    ports=(ServicePort("thanos", 10901), ServicePort("prometheus", 9090)),
                    replicas=r,
                    dns_group=g,
                )
                for n, (r, g) in sorted(sizes.items())
            ),
        )
        changed = {k for k in sizes.keys() | before.keys() if sizes.get(k) != before.get(k)}
        zone = state.next_zone(f, changed if told else None)
        if zone is not None:
            assert zone.text == render_zone(f, serial=zone.serial)
            assert zone.count == len(records(f)) == len(zone.records)
            assert zone.answers == _full_answers(records(f))
            state.committed(zone)
        else:
            assert state.current is not None and state.current.count == len(records(f))
            assert state.current.answers == _full_answers(records(f))
        before = sizes


def _full_answers(recs: tuple[SrvRecord, ...]) -> tuple[Answer, ...]:
    by_name: dict[str, list[SrvRecord]] = {}
    for r in recs:
        by_name.setdefault(r.owner, []).append(r)
    ns = name_server(SETTINGS)
    out = [Answer(n, len(rs), answer_bytes(n, rs, name_server=ns)) for n, rs in by_name.items()]
    return tuple(sorted(out, key=lambda a: (-a.bytes, a.name)))
