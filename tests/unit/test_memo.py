"""The bounded memo: made once while kept, emptied when full, None kept like any value."""

from __future__ import annotations

from atlasd.memo import Memo


def test_a_value_is_made_once_while_kept_and_again_after_the_memo_fills() -> None:
    made: list[str] = []

    def make(k: str) -> str | None:
        made.append(k)
        return None if k == "none" else k.upper()

    memo: Memo[str, str | None] = Memo(3)
    assert [memo.get(k, lambda k=k: make(k)) for k in ("a", "none", "a", "none")] == [
        "A", None, "A", None,
    ]  # fmt: skip
    assert made == ["a", "none"]
    memo.get("b", lambda: make("b"))
    assert len(memo) == 3
    memo.get("c", lambda: make("c"))  # full: emptied, then kept
    assert len(memo) == 1
    memo.get("a", lambda: make("a"))
    assert made == ["a", "none", "b", "c", "a"]
