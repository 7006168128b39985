"""A bounded memo of pure results.

Emptied at once when full: nothing old is kept alive past the bound, and an entry
dropped is at worst computed again, never wrong. A key holds no secret (a digest stands
for key material), since the memo keeps its keys alive until it is emptied.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Memo(Generic[K, V]):
    """``get(key, make)``: ``make()``'s result for ``key``, made once while it is kept."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._kept: dict[K, V] = {}

    def get(self, key: K, make: Callable[[], V]) -> V:
        try:
            return self._kept[key]
        except KeyError:
            pass
        value = make()
        if len(self._kept) >= self.limit:
            self._kept.clear()
        self._kept[key] = value
        return value

    def __len__(self) -> int:
        return len(self._kept)
