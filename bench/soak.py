"""The soak in its long form: 200 live clusters churning under faults (see
``tests/integration/test_soak.py`` for what runs and what is checked).

    .venv/bin/python bench/soak.py [--scale long|short] [--keep DIR]
    .venv/bin/python bench/soak.py --scale large [--clusters N] [--minutes M] [--json] ...

Runs the soak test with ``ATLASD_SOAK_SCALE`` set and its output shown (timeline, request
counts, atlasd's RSS per process, watch relists). ``--keep DIR`` keeps every process log
(atlasd, Envoys, CoreDNS, Prometheus, kube-apiserver) under DIR. Exit status is pytest's.

``--scale large`` is the soak at scale instead (``bench/soak_large.py``: thousands of
clusters and downstream streams, two replicas, a leader SIGKILL and a rolling restart
among the faults); the other arguments are its own.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", choices=("long", "short", "large"), default="long")
    parser.add_argument("--keep", type=Path, default=None, help="keep the logs under this dir")
    args, rest = parser.parse_known_args()
    if args.scale == "large":
        sys.path.insert(0, str(ROOT))
        from bench import soak_large

        if args.keep is not None:
            rest.append(f"--workdir={args.keep}")
        return soak_large.main(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    argv = [
        sys.executable,
        "-m",
        "pytest",
        "tests/integration/test_soak.py",
        "-s",
        "-q",
        "-p",
        "no:cacheprovider",
    ]
    if args.keep is not None:
        argv.append(f"--basetemp={args.keep.resolve()}")
    env = dict(os.environ, ATLASD_SOAK_SCALE=args.scale)
    t0 = time.monotonic()
    code = subprocess.run(argv, cwd=ROOT, env=env, check=False).returncode
    print(f"soak ({args.scale}): exit {code} after {time.monotonic() - t0:.0f} s")
    return code


if __name__ == "__main__":
    raise SystemExit(main())
