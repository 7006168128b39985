"""The board of live ADS streams tells its reader about every change (nobody polls it)."""

from __future__ import annotations

from atlasd.xds.snapshot import CLUSTER
from atlasd.xds.streams import StatusBoard


def test_every_change_of_a_stream_is_told_and_nothing_else() -> None:
    told: list[str] = []
    board = StatusBoard()
    stop = board.listen(lambda: told.append("x"))
    sid = board.open(node="east", kind="delta", peer="p")
    board.acked(sid, CLUSTER, "v1")
    board.nacked(sid, CLUSTER, "v2", "bad")
    assert len(told) == 3
    board.acked(sid + 1, CLUSTER, "v1")  # no such stream: nothing changed
    board.close(sid + 1)
    assert len(told) == 3
    board.close(sid)
    assert len(told) == 4 and board.all() == []
    stop()
    board.open(node="west", kind="delta", peer="p")
    assert len(told) == 4, "a listener that stopped is told nothing"
