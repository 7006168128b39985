"""``atlasd check``: one command for CI and on-call (like ``linkerd check``).

Reads a running atlasd's ``/status`` and judges it: one line per check, each failure with
what to do; ``-o json`` for machines; exit 0 when every check passes, 1 when one fails
or atlasd cannot be reached (a one-line error, never a traceback).
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass
from typing import Any

import click

from atlasd.cli.app import cli
from atlasd.cli.options import fail, status_url_option
from atlasd.cli.status import fetch_status

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """``30d``, ``12h``, ``90m``, ``45s`` -> seconds; ``ValueError`` otherwise."""
    m = re.fullmatch(r"\s*(\d+)\s*([smhd])\s*", text)
    if m is None:
        raise ValueError(f"{text!r} is not a duration like 30d, 12h, 90m or 45s")
    return int(m.group(1)) * _UNITS[m.group(2)]


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    hint: str = ""


def _names(items: list[str], limit: int = 5) -> str:
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def checks(doc: dict[str, Any], *, fail_within: float, now: float) -> list[Check]:
    """Every check of a ``/status`` document."""
    out: list[Check] = []
    ready = bool(doc.get("ready"))
    out.append(
        Check(
            "atlasd is ready",
            ready,
            "ready" if ready else "waiting for: " + ", ".join(doc.get("not_ready") or []),
            "" if ready else "atlasd's log says why (docs/operations.md, Endpoints)",
        )
    )
    unhealthy = list(doc.get("unhealthy") or [])
    out.append(
        Check(
            "no subsystem keeps failing",
            not unhealthy,
            "; ".join(unhealthy) or "all subsystems running",
            "" if not unhealthy else "the subsystem's error is in /status subsystems and the log",
        )
    )
    soon = []
    for c in doc.get("certificates") or []:
        not_after = c.get("not_after")
        if isinstance(not_after, (int, float)) and not_after - now < fail_within:
            days = (not_after - now) / 86400
            soon.append(f"{c.get('name')} ({'expired' if days < 0 else f'{days:.0f}d left'})")
    out.append(
        Check(
            "certificates are not about to expire",
            not soon,
            _names(soon) or f"{len(doc.get('certificates') or [])} certificates",
            ""
            if not soon
            else "leaves renew by themselves at 2/3 of their life; the CA "
            "rotates when Secret atlas-ca is annotated goatlas.io/ca-rotate (docs/operations.md)",
        )
    )
    envoys = doc.get("envoys") or []
    nacking = sorted({str(e.get("node")) for e in envoys if e.get("last_nack")})
    out.append(
        Check(
            "no Envoy rejects its configuration",
            not nacking,
            _names(nacking) or f"{len(envoys)} streams, none NACKing",
            "" if not nacking else "`atlasd status` shows each NACK's message",
        )
    )
    connected = {str(e.get("node")) for e in envoys}
    clusters = [str(c.get("name")) for c in doc.get("clusters") or []]
    missing = [n for n in ["atlas", *clusters] if n not in connected]
    out.append(
        Check(
            "every Envoy is connected",
            not missing,
            ("not connected: " + _names(missing)) if missing else f"{len(connected)} nodes",
            ""
            if not missing
            else "each names a cluster whose Envoy has no ADS stream to "
            "atlasd (through the observability Envoy's 10900; `atlas` is that Envoy itself)",
        )
    )
    too_large = [str(a.get("name")) for a in (doc.get("zone") or {}).get("too_large") or []]
    out.append(
        Check(
            "every SRV answer fits one DNS message",
            not too_large,
            _names(too_large) or "all fit",
            ""
            if not too_large
            else "point Thanos Query at the endpoint configuration, or "
            "split the clusters into DNS groups (docs/dns.md)",
        )
    )
    problems = doc.get("problems") or []
    objects = sorted({str(p.get("object")) for p in problems})
    out.append(
        Check(
            "no cluster Service is invalid",
            not problems,
            _names(objects) or "none",
            ""
            if not problems
            else "each has a Warning Event naming the field (`atlasd status` lists them)",
        )
    )
    query = doc.get("query")
    if query:
        sights = query.get("clusters") or {}
        unseen = sorted(
            f"{n} ({(s.get('probe') or {})['hop']})" if (s.get("probe") or {}).get("hop") else n
            for n, s in sights.items()
            if not s.get("seen")
        )
        dup = sorted(n for n, s in sights.items() if s.get("duplicate_of"))
        up = bool(query.get("up"))
        out.append(
            Check(
                "Thanos Query sees every cluster",
                up and not unseen,
                (f"Query not read: {query.get('error')}" if not up else "")
                + (("; " if not up else "") + "not seen: " + _names(unseen) if unseen else "")
                or f"{len(sights)} seen",
                ""
                if up and not unseen
                else "`atlasd status` gives Query's error per cluster, `atlasd probe <c>` the hop",
            )
        )
        out.append(
            Check(
                "no two clusters announce the same external labels",
                not dup,
                _names(dup) or "none",
                "" if not dup else "give each cluster's Prometheus its own external labels",
            )
        )
    return out


@cli.command()
@status_url_option
@click.option(
    "--fail-within",
    default="30d",
    show_default=True,
    help="Fail for certificates expiring within this long (30d, 12h, 90m, 45s).",
)
@click.option("-o", "--output", type=click.Choice(["text", "json"]), default="text")
def check(url: str, fail_within: str, output: str) -> None:
    """Check a running atlasd: exit 0 when all is well, 1 with one line per problem."""
    try:
        within = parse_duration(fail_within)
    except ValueError as exc:
        fail(f"--fail-within: {exc}")
    try:
        doc = fetch_status(url)
    except ValueError as exc:
        fail(str(exc))
    results = checks(doc, fail_within=within, now=time.time())
    if output == "json":
        click.echo(json.dumps({"ok": all(c.ok for c in results),
                               "checks": [asdict(c) for c in results]}, indent=2))  # fmt: skip
    else:
        for c in results:
            mark = "ok  " if c.ok else "FAIL"
            click.echo(f"{mark} {c.name}: {c.detail}" + (f"\n     -> {c.hint}" if c.hint else ""))
    raise SystemExit(0 if all(c.ok for c in results) else 1)
