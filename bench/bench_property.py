"""The property tests (tests/property) in their long profile, with what they ran and found.

    .venv/bin/python bench/bench_property.py [--profile long|ci|quick] [--keep DIR]

Runs ``pytest tests/property`` with ``ATLASD_HYPOTHESIS_PROFILE`` (default ``long``: 20x
the examples of ``make test`` — 100,000 single Services, 10,000 fleets — every distinct
zone checked by named-checkzone, 1,500 Envoy configurations per test validated by a real
Envoy), then prints how many examples each test ran, their verdicts, how many outputs
the real tools checked, the wall time and the load average before and after.
Every profile is derandomized: a run repeats exactly. ``--keep DIR`` keeps pytest's
temporary directory there (any rejected zone or Envoy configuration, with its input).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="long", choices=["long", "ci", "quick", "triage"])
    parser.add_argument("--keep", type=Path, default=None, help="pytest --basetemp")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        env = {
            **os.environ,
            "ATLASD_HYPOTHESIS_PROFILE": args.profile,
            "ATLASD_PROPERTY_REPORT": str(report),
        }
        cmd = [sys.executable, "-m", "pytest", "tests/property", "-q", "-p", "no:cacheprovider"]
        if args.keep is not None:
            cmd.append(f"--basetemp={args.keep}")
        load_before = os.getloadavg()
        t0 = time.monotonic()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, check=False)
        wall = time.monotonic() - t0
        load_after = os.getloadavg()
        found = json.loads(report.read_text()) if report.exists() else {}
    print(f"\nprofile {args.profile}: pytest exit {proc.returncode}, wall {wall:.0f} s")
    print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f} (1 min)")
    for name, result in (found.get("tests") or {}).items():
        print(f"  {name}: {json.dumps(result, sort_keys=True)}")
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
