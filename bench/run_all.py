"""Run every benchmark in turn (default sizes), then say how each ended and how long it took.

    .venv/bin/python bench/run_all.py [--only NAME ...] [--with-soak] [--timeout SECONDS]

NAMEs: xds, reconcile, watch, dns, idle (and soak, with ``--with-soak``: the long form).
Each benchmark's own output is printed as it runs; it starts its own kube-apiserver, Envoy
or CoreDNS on loopback where it needs one. Run on a quiet machine: the figures are
wall-clock and CPU times, and anything else running skews them.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

BENCHMARKS: dict[str, list[str]] = {
    "xds": ["bench/bench_xds.py"],
    "reconcile": ["bench/bench_reconcile.py"],
    "watch": ["bench/bench_watch.py"],
    "dns": ["bench/bench_dns.py"],
    "idle": ["bench/bench_idle.py"],
    "soak": ["bench/soak.py", "--scale", "long"],
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=sorted(BENCHMARKS), default=None)
    parser.add_argument("--with-soak", action="store_true", help="also run the long soak")
    parser.add_argument("--timeout", type=float, default=1800, help="per benchmark, seconds")
    args = parser.parse_args()
    names = args.only or [n for n in BENCHMARKS if n != "soak" or args.with_soak]
    results: list[tuple[str, str, float]] = []
    for name in names:
        print(f"\n===== {name}: {' '.join(BENCHMARKS[name])}", flush=True)
        t0 = time.monotonic()
        try:
            code = subprocess.run(
                [sys.executable, *BENCHMARKS[name]], cwd=ROOT, timeout=args.timeout, check=False
            ).returncode
            outcome = "ok" if code == 0 else f"exit {code}"
        except subprocess.TimeoutExpired:
            outcome = f"timed out after {args.timeout:.0f} s"
        results.append((name, outcome, time.monotonic() - t0))
    print("\n===== summary")
    for name, outcome, seconds in results:
        print(f"{name:<10} {outcome:<28} {seconds:7.0f} s")
    return 0 if all(outcome == "ok" for _, outcome, _ in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
