"""``bench/soak.py --scale large`` at a small N and one round, so the soak at scale cannot
silently rot: churn (clusters added, removed, external IPs changed, invalid Services) and
one fault (a rolling restart of both replicas), then every object atlasd should write is
there and nothing else, the observability Envoy follows the churn, every invalid Service
has its Warning Event, every stream and both real Envoys are current, and no request
through the traffic pair failed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness.netns import require_namespaces

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
N = 10


def test_one_round_converges_with_no_failed_request(tmp_path: Path) -> None:
    require_namespaces("a network and mount namespace of its own")
    argv = [sys.executable, "bench/soak.py", "--scale=large", f"--clusters={N}", "--minutes=0",
            "--rounds=1", "--faults=rolling-restart", "--converge-timeout=120",
            f"--keep={tmp_path / 'soak'}", "--json"]  # fmt: skip
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=600)
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
    assert out["initial"]["current"] == N and out["initial"]["stale"] == 0
    [only] = out["rounds"]
    assert only["fault"] == "rolling-restart" and only["ok"], only
    assert only["objects_missing"] == 0 and only["objects_extra"] == 0, only
    assert only["envoy_s"] is not None and only["invalid_warned"], only
    assert only["stale"] == 0 and only["client_disagrees"] == 0 and only["real_envoys_current"]
    # The churn happened: clusters came and went, IPs changed, invalid Services were refused.
    assert all(v > 0 for v in out["ops"].values()), out["ops"]
    assert out["requests"] > 0 and out["requests_failed"] == 0, out["failed_sample"]
    assert out["nacks"] == 0
    assert set(out["rss"]) == {"fleet-a", "fleet-b"}
