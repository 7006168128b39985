"""``write_conditionally``: created when absent, replaced at the version read, and done
again on top of what another writer wrote when it lost a race."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from atlasd.kube.api import Obj
from atlasd.kube.conditional import write_conditionally
from atlasd.kube.errors import Conflict
from atlasd.kube.resources import CONFIGMAPS
from tests.unit.fakekube import FakeKube, api_error

NS = "monitoring"


def _cm(data: dict[str, str]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "c", "namespace": NS}, "data": data}  # fmt: skip


def _append(item: str, seen: list[Obj | None]) -> Any:
    def body(current: Obj | None) -> dict[str, Any]:
        seen.append(current)
        have = dict(current["data"]) if current is not None else {}
        return _cm({**have, item: "1"})

    return body


def _write(kube: FakeKube, body: Any, tries: int = 3) -> None:
    trio.run(
        lambda: write_conditionally(kube, CONFIGMAPS, "c", namespace=NS, body=body, tries=tries)
    )


def test_created_then_replaced_keeping_what_was_there() -> None:
    kube = FakeKube()
    seen: list[Obj | None] = []
    _write(kube, _append("a", seen))
    _write(kube, _append("b", seen))
    stored = kube.get_stored("configmaps", "c")
    assert stored is not None and stored["data"] == {"a": "1", "b": "1"}
    assert seen[0] is None and seen[1] is not None
    assert [verb for verb, _ in kube.writes] == ["create", "replace"]


def test_a_lost_race_is_written_again_on_a_fresh_read() -> None:
    kube = FakeKube()
    _write(kube, _append("a", []))
    kube.fail_next.append(api_error(Conflict, "update", ("configmaps", "c")))
    seen: list[Obj | None] = []
    _write(kube, _append("b", seen))
    assert len(seen) == 2  # read again after the Conflict
    stored = kube.get_stored("configmaps", "c")
    assert stored is not None and stored["data"] == {"a": "1", "b": "1"}


def test_it_gives_up_after_its_tries() -> None:
    kube = FakeKube()
    _write(kube, _append("a", []))
    kube.fail_next.extend(api_error(Conflict, "update", ("configmaps", "c")) for _ in range(2))
    with pytest.raises(Conflict):
        _write(kube, _append("b", []), tries=2)
