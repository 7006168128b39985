"""How much the property tests run: ``ATLASD_HYPOTHESIS_PROFILE`` = ``ci`` (default, in
``make test``), ``long`` (x20 examples, every distinct zone checked), ``quick`` (x0.05) or ``triage``
(ci's examples, a failure reported unshrunk).

Every profile is derandomized (a fixed seed per test) and keeps no example database, so
a run is reproducible: the same examples every time, on every machine.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from hypothesis import HealthCheck, Phase, settings

NAME = os.environ.get("ATLASD_HYPOTHESIS_PROFILE", "ci")


@dataclass(frozen=True)
class Profile:
    scale: float  # multiplies each test's example count
    zones: int | None  # distinct zones checked by named-checkzone per test (None: all)
    envoys: int | None  # distinct Envoy configurations validated per test


PROFILES = {
    "quick": Profile(scale=0.05, zones=20, envoys=8),
    "ci": Profile(scale=1, zones=150, envoys=40),
    "long": Profile(scale=20, zones=None, envoys=1500),
    # ci's examples, first failure reported unshrunk (shrinking one can take minutes).
    "triage": Profile(scale=1, zones=150, envoys=40),
}
if NAME not in PROFILES:
    raise RuntimeError(f"ATLASD_HYPOTHESIS_PROFILE={NAME!r}: one of {sorted(PROFILES)}")
CURRENT = PROFILES[NAME]

for name in PROFILES:
    settings.register_profile(
        name,
        derandomize=True,
        database=None,
        deadline=None,  # a loaded 2-core machine makes timings meaningless
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        phases=[p for p in Phase if p is not Phase.shrink or name not in ("quick", "triage")],
    )
settings.load_profile(NAME)


def examples(ci: int) -> int:
    """The example count for a test that runs ``ci`` examples in the ci profile."""
    return max(1, int(ci * CURRENT.scale))
