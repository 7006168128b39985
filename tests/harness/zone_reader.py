"""A zone file's reader in a process of its own, as CoreDNS is: it reads and parses the
file over and over until its stdin closes, then prints what it saw as one JSON line.

``python -m tests.harness.zone_reader ZONE_FILE ORIGIN SRV_OWNER``: every read must be a
whole zone whose SRV records at ``SRV_OWNER`` point at ``c0``..``c{n-1}``'s sidecars (the
shape of ``test_dns_coredns``'s fleets), ``n`` the number of records; a torn file would
lose its tail. Prints ``{"reads": N, "bad": B, "samples": [...]}`` (B reads were not whole,
the first 10 of them cut to their last 200 characters). It prints ``ready`` once it has
read the file the first time.

A process, not a thread of the test: a thread parsing in a loop holds the interpreter lock
the writer under test needs, which made 1,000 rewrites take ~80 s instead of ~10 s.
"""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path

import dns.zone


def check(text: str, origin: str, owner: str) -> str | None:
    """None if ``text`` is a whole zone of the expected shape, else why not."""
    try:
        zone = dns.zone.from_text(text, origin=origin, relativize=False)
        rrset = zone.find_rdataset(owner, "SRV") if text.count(" IN SRV ") else None
    except Exception as exc:  # a torn file parses wrong in many ways: each is a finding
        return f"{exc!r}: {text[-200:]!r}"
    n = len(rrset) if rrset is not None else 0
    targets = {r.target.to_text() for r in rrset} if rrset is not None else set()
    want = {f"c{j}-thanos-sidecar0.monitoring.svc.cluster.local." for j in range(n)}
    if not text.endswith("\n") or targets != want:
        return text[-200:]
    return None


def main(argv: list[str]) -> int:
    path, origin, owner = Path(argv[0]), argv[1], argv[2]
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    reads = bad = 0
    samples: list[str] = []
    while not stop.is_set():
        problem = check(path.read_text(), origin, owner)
        reads += 1
        if reads == 1:
            print("ready", flush=True)
        if problem is not None:
            bad += 1
            if len(samples) < 10:
                samples.append(problem)
    print(json.dumps({"reads": reads, "bad": bad, "samples": samples}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
