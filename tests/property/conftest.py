"""Property tests: load the Hypothesis profile, and report what each test ran."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from tests.property import profile
from tests.property.report import RESULTS


def pytest_report_header() -> str:
    return f"atlasd property profile: {profile.NAME} ({profile.CURRENT})"


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not RESULTS:
        return
    terminalreporter.section(f"property tests ({profile.NAME} profile)")
    for name, result in RESULTS.items():
        terminalreporter.write_line(f"{name}: {json.dumps(result, sort_keys=True)}")
    out = os.environ.get("ATLASD_PROPERTY_REPORT")
    if out:
        Path(out).write_text(json.dumps({"profile": profile.NAME, "tests": RESULTS}, indent=2))
