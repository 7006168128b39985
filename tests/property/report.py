"""What each property test ran and found (printed at the end of the session)."""

from __future__ import annotations

from typing import Any

RESULTS: dict[str, dict[str, Any]] = {}
