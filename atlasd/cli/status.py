"""``atlasd status``: what a running atlasd says at ``/status``, as tables or JSON."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import click
import trio
import yaml

from atlasd.cli.app import cli
from atlasd.cli.options import fail, output_option, status_url_option

# -- status -------------------------------------------------------------------------------


def fetch_status(url: str) -> dict[str, Any]:
    """GET ``<url>/status``; raises ValueError saying what answered if it is not atlasd."""
    import httpx2

    target = f"{url.rstrip('/')}/status"
    try:
        resp = httpx2.get(target, timeout=10)
    except httpx2.HTTPError as exc:
        raise ValueError(f"cannot reach {target}: {exc}") from None
    server = resp.headers.get("server")
    who = f" (server: {server})" if server else ""
    hint = "is --url atlasd's --http-listen address?"
    if resp.status_code != 200:
        raise ValueError(f"{target} answered {resp.status_code} {resp.reason_phrase}{who}: {hint}")
    try:
        doc = resp.json()
    except ValueError:
        kind = resp.headers.get("content-type", "no content type")
        raise ValueError(f"{target} answered 200 with {kind}, not JSON{who}: {hint}") from None
    if not isinstance(doc, dict) or "clusters" not in doc:
        raise ValueError(f"{target} answered JSON that is not atlasd's status{who}: {hint}")
    return doc


@cli.command()
@status_url_option
@output_option
@click.option(
    "--watch", "-w", is_flag=True, help="Keep printing as the status changes (WebSocket stream)."
)
def status(url: str, output: str, watch: bool) -> None:
    """Show clusters, each Envoy's sync state, certificate expiry and problems."""

    def show(doc: dict[str, Any]) -> None:
        if output == "json":
            click.echo(json.dumps(doc, indent=2, sort_keys=True, default=str))
        elif output == "yaml":
            click.echo(yaml.safe_dump(doc, sort_keys=True), nl=False)
        else:
            click.echo(render_status(doc))

    if not watch:
        try:
            doc = fetch_status(url)
        except ValueError as exc:
            fail(str(exc))
        show(doc)
        return

    from trio_websocket import ConnectionClosed, HandshakeError, open_websocket_url

    ws_url = (
        url.rstrip("/").replace("http://", "ws://").replace("https://", "wss://") + "/status/stream"
    )

    async def stream() -> None:
        async with open_websocket_url(ws_url) as ws:
            while True:
                show(json.loads(await ws.get_message()))

    try:
        trio.run(stream)
    except (OSError, HandshakeError, ConnectionClosed, ValueError) as exc:
        fail(f"status stream {ws_url} ended: {exc}")
    except KeyboardInterrupt:
        pass


def _ago(ts: Any) -> str:
    if not isinstance(ts, int | float):
        return "-"
    days = (ts - dt.datetime.now(dt.UTC).timestamp()) / 86400
    return f"{days:.0f}d" if days >= 0 else "EXPIRED"


def _since(ts: Any) -> str:
    if not isinstance(ts, int | float):
        return "-"
    seconds = max(0.0, dt.datetime.now(dt.UTC).timestamp() - ts)
    return f"{seconds:.0f} s ago" if seconds < 120 else f"{seconds / 60:.0f} min ago"


def print_table(header: list[str], rows: list[list[str]]) -> None:
    click.echo(_table_text(header, rows))


def _table_text(header: list[str], rows: list[list[str]]) -> str:
    widths = (
        [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=False)]
        if rows
        else [len(h) for h in header]
    )
    lines = [
        "   ".join(str(v).ljust(w) for v, w in zip(r, widths, strict=False)).rstrip()
        for r in [header, *rows]
    ]
    return "\n".join(lines)


def _query_cell(sight: dict[str, Any] | None) -> str:
    """What Thanos Query sees of one cluster, in one cell."""
    if sight is None:
        return "not observed yet"
    dup = sight.get("duplicate_of") or []
    extra = f"; labels also announced by {', '.join(dup)}" if dup else ""
    if sight.get("seen"):
        return "seen" + extra
    probe = sight.get("probe") or {}
    hop = f" [path: {probe['hop']}]" if probe.get("hop") else ""
    return f"NOT SEEN{hop}: {str(sight.get('error') or '')[:80]}{extra}"


def render_status(doc: dict[str, Any]) -> str:
    """The human-readable ``atlasd status`` (tables of clusters, Envoys, problems)."""
    parts = [
        f"atlasd {doc.get('version')}  leader={doc.get('leader')}  ready={doc.get('ready')}"
        + (
            f"  (waiting for: {', '.join(doc.get('not_ready') or [])})"
            if not doc.get("ready")
            else ""
        ),
    ]
    leadership = doc.get("leadership") or {}
    if leadership.get("reason"):
        parts.append(f"NOT LEADING: {leadership['reason']}")
    for a in (doc.get("zone") or {}).get("too_large") or []:
        parts.append(
            f"DNS ANSWER TOO LARGE: {a['name']} holds {a['records']} sidecars, {a['bytes']} "
            "bytes (at most 65535 fit in one DNS message): Thanos Query cannot resolve it; "
            "split the clusters into DNS groups (docs/dns.md)"
        )
    for why in doc.get("unhealthy") or []:
        parts.append(f"UNHEALTHY: {why}")
    loop = doc.get("loop")
    if loop:
        last = loop.get("last") or {}
        parts.append(
            f"EVENT LOOP STALLED {loop.get('stalls')} times over {loop.get('threshold_ms')} ms "
            f"since start; the last held it {last.get('held_ms')} ms, {_since(last.get('at'))}, "
            f"in: {last.get('where')}"
        )
    query = doc.get("query")
    if query:
        counts = query.get("counts") or {}
        parts.append(
            f"THANOS QUERY {query.get('url')}: "
            + (f"NOT READ ({query.get('error')}); last view: " if query.get("error") else "")
            + f"{counts.get('seen', 0)} seen, {counts.get('unseen', 0)} not seen, "
            f"{counts.get('unknown', 0)} unknown stores, {counts.get('duplicate', 0)} duplicate"
        )
        for u in query.get("unknown") or []:
            parts.append(
                f"QUERY SEES A STORE ATLASD DOES NOT SERVE: {u['store']}"
                + (f" (cluster={','.join(u['cluster'])})" if u.get("cluster") else "")
            )
    parts += ["", "CLUSTERS"]
    envoys = doc.get("envoys") or []
    by_node: dict[str, list[dict[str, Any]]] = {}
    for e in envoys:
        by_node.setdefault(str(e.get("node")), []).append(e)
    rows = []
    for c in doc.get("clusters") or []:
        streams = by_node.get(c["name"], [])
        sync = (
            ", ".join(f"{e['kind']}:{'NACK' if e.get('last_nack') else 'ok'}" for e in streams)
            or "not connected"
        )
        row = [
            c["name"],
            c["external_ip"],
            str(c["replicas"]),
            c.get("dns_group") or "-",
            sync,
            # An enrolled cluster's certificates are its agent's (renewed by it).
            ("enrolled" if c.get("mode") == "enrollment" else _ago(c.get("certificate_expiry")))
            + (f" ({c['revoked_certificates']} revoked)" if c.get("revoked_certificates") else ""),
        ]
        if query:
            row.append(_query_cell((query.get("clusters") or {}).get(c["name"])))
        rows.append(row)
    header = ["NAME", "EXTERNAL-IP", "REPLICAS", "DNS-GROUP", "ENVOY", "CERT-EXPIRES"]
    parts.append(_table_text([*header, "QUERY"] if query else header, rows))
    if doc.get("pending"):
        parts += ["", "PENDING (certificates not issued yet): " + ", ".join(doc["pending"])]
    parts += ["", "ENVOYS"]
    erows = []
    for e in envoys:
        acked = e.get("acked") or {}
        nack = e.get("last_nack")
        erows.append(
            [
                str(e.get("node")),
                str(e.get("kind")),
                str(e.get("peer")),
                " ".join(f"{k}={str(v)[:8]}" for k, v in sorted(acked.items())) or "-",
                (nack or {}).get("message", "-")[:60] if nack else "-",
            ]
        )
    parts.append(_table_text(["NODE", "KIND", "PEER", "ACKED", "LAST-NACK"], erows))
    problems = doc.get("problems") or []
    if problems:
        parts += ["", "PROBLEMS"]
        parts.append(
            _table_text(
                ["OBJECT", "FIELD", "MESSAGE"],
                [[p["object"], p["field"], p["message"]] for p in problems],
            )
        )
    return "\n".join(parts)
